"""Layer names as users know them -> ONNX tensor names.

A layer can be named by:
- an ONNX tensor name, or a node name (its first output);
- a PyTorch module path ("layer4", "layer4.1.conv2", "features[-1]", "model.layer4[-1]"): torch.onnx's TorchScript
  exporter writes module scopes into node names ("/layer4/layer4.1/relu_1/Relu"; a module called twice gets
  "relu", "relu_1"), its dynamo exporter into the node metadata `pkg.torch.onnx.name_scopes`;
- a Keras layer name ("c2"): tf2onnx keeps it as a component of node names ("functional_1/c2_1/Relu"; Keras 3 adds a
  call suffix "_1").

A scope stands for the tensor that leaves it: produced inside, used outside (or a graph output). When a module ran
more than once, its first call is taken, as a PyTorch forward hook (pytorch-grad-cam's) records first.
"""

from __future__ import annotations

import ast
import difflib
import logging
import re
from collections.abc import Container
from dataclasses import dataclass, field

import onnx

from ..errors import LayerError

log = logging.getLogger(__name__)

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_CALL_SUFFIX = re.compile(r"_\d+$")
_INDEX = re.compile(r"^(?P<base>.*?)\[(?P<index>-?\d+)\]$")
_NOT_ACTIVATIONS = {"Constant", "Shape", "Size", "ConstantOfShape"}


@dataclass
class _Scopes:
    """Module scopes of one model: scope -> indices of its nodes; aliases (short names) -> scopes."""

    nodes: dict[str, list[int]] = field(default_factory=dict)
    aliases: dict[str, set[str]] = field(default_factory=dict)

    def add(self, scope: str, index: int, aliases=()) -> None:
        self.nodes.setdefault(scope, []).append(index)
        for alias in aliases:
            if alias and alias != scope:
                self.aliases.setdefault(alias, set()).add(scope)


def resolve(proto: onnx.ModelProto, name: str, tensors: Container[str]) -> str:
    """The tensor a layer name stands for; LayerError with close matches when nothing answers to it."""
    if not isinstance(name, str):
        raise LayerError(f"layer names are strings (tensor names or module paths), not {type(name).__name__}: "
                         f"{name!r}")
    if name in tensors:
        return name
    nodes = list(proto.graph.node)
    for node in nodes:
        if node.name == name and node.output and node.output[0]:
            return node.output[0]
    scopes = _index(nodes)
    for candidate in (name, name[len("model."):] if name.startswith("model.") else None):
        if candidate:
            scope = _find_scope(scopes, candidate)
            if scope is not None:
                tensor = _exit_tensor(proto, nodes, scopes.nodes[scope], scope)
                log.debug("layer %r is module scope %r, tensor %r", name, scope, tensor)
                return tensor
    raise LayerError(f"no tensor, node or module named {name!r} in the model{_suggest(name, scopes, tensors)}")


def module_paths(proto: onnx.ModelProto) -> list[str]:
    """Every module scope the exporter recorded, in graph order (for listing and error messages)."""
    return list(_index(list(proto.graph.node)).nodes)


# ---- scopes from node names and metadata ---------------------------------------------------------------------------
def _index(nodes: list[onnx.NodeProto]) -> _Scopes:
    scopes = _Scopes()
    for i, node in enumerate(nodes):
        dynamo = _dynamo_scopes(node)
        if dynamo is not None:
            for scope in dynamo:
                scopes.add(scope, i)
        elif node.name.startswith("/"):
            for scope in _torchscript_scopes(node.name):
                scopes.add(scope, i)
        elif "/" in node.name:
            parts = node.name.split("/")[:-1]
            for depth, part in enumerate(parts):
                scope = "/".join(parts[:depth + 1])
                scopes.add(scope, i, aliases=(part, _CALL_SUFFIX.sub("", part)))
    return scopes


def _dynamo_scopes(node: onnx.NodeProto) -> list[str] | None:
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            # ['', 'layer4', 'layer4.1', 'layer4.1.relu', 'relu_16']: the root, module paths, then the fx node.
            return [s for s in value[1:-1] if isinstance(s, str) and s]
    return None


def _torchscript_scopes(node_name: str) -> list[str]:
    """'/layer4/layer4.1/relu_1/Relu' -> ['layer4', 'layer4.1', 'layer4.1.relu_1'] (full dotted paths)."""
    full, out = "", []
    for part in node_name.split("/")[1:-1]:
        if not part:
            continue
        full = part if not full or part.startswith(full + ".") else f"{full}.{part}"
        out.append(full)
    return out


def _find_scope(scopes: _Scopes, name: str) -> str | None:
    match = _INDEX.match(name)
    if match:
        parent = _find_scope(scopes, match["base"])
        if parent is None:
            return None
        return _child(scopes, parent, int(match["index"]), name)
    if name in scopes.nodes:
        return name
    owners = scopes.aliases.get(name, set())
    if len(owners) > 1:
        exact = {s for s in owners if s.rsplit("/", 1)[-1] == name}
        owners = exact or owners
    if len(owners) > 1:
        raise LayerError(f"layer name {name!r} is ambiguous: it names the scopes {sorted(owners)}; give one of them")
    return next(iter(owners), None)


def _child(scopes: _Scopes, parent: str, index: int, name: str) -> str:
    """The index-th child of a container module, Python-style: numbered children (nn.Sequential, nn.ModuleList) in
    number order, named ones in the order they first run (an nn.Sequential's order)."""
    prefix = parent + "."
    children = list(dict.fromkeys(s[len(prefix):].split(".")[0] for s in scopes.nodes if s.startswith(prefix)))
    # TorchScript scopes a module's second call as "<name>_1": a call, not a child.
    children = [c for c in children if not (_CALL_SUFFIX.search(c) and _CALL_SUFFIX.sub("", c) in children)]
    if children and all(c.isdigit() for c in children):
        children.sort(key=int)
    if not children:
        raise LayerError(f"{name!r}: module {parent!r} has no child modules in the model")
    try:
        return f"{prefix}{children[index]}"
    except IndexError:
        raise LayerError(f"{name!r}: module {parent!r} has {len(children)} children: {children}") from None


def _exit_tensor(proto: onnx.ModelProto, nodes: list[onnx.NodeProto], members: list[int], scope: str) -> str:
    inside = set(members)
    used_outside: set[str] = {o.name for o in proto.graph.output}
    for i, node in enumerate(nodes):
        if i not in inside:
            used_outside.update(node.input)
    exits = [out for i in members if nodes[i].op_type not in _NOT_ACTIVATIONS
             for out in nodes[i].output if out and out in used_outside]
    if not exits:
        raise LayerError(f"module {scope!r} has no output tensor used outside it")
    if len(exits) > 1:
        log.debug("module %r has several outputs %s (calls or tuple outputs); taking the first", scope, exits)
    return exits[0]


def _suggest(name: str, scopes: _Scopes, tensors) -> str:
    modules = difflib.get_close_matches(name, list(scopes.nodes) + list(scopes.aliases), n=5, cutoff=0.5)
    names = difflib.get_close_matches(name, list(tensors), n=5, cutoff=0.5)
    hints = []
    if modules:
        hints.append(f"modules: {modules}")
    if names:
        hints.append(f"tensors: {names}")
    if not hints:
        return "; it has no module scopes to match" if not scopes.nodes else ""
    # BatchNorm is folded into the Conv before it by most exporters, so its scope is gone.
    folded = " (BatchNorm layers are usually folded into the Conv before them)" if "bn" in name.lower() else ""
    return "; close matches: " + "; ".join(hints) + folded
