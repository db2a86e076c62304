"""Layer names as users know them -> ONNX tensor names.

A layer can be named by:
- an ONNX tensor name, or a node name (its first output);
- a PyTorch module path ("layer4", "layer4.1.conv2", "features[-1]", "model.layer4[-1]"): torch.onnx's TorchScript
  exporter writes module scopes into node names ("/layer4/layer4.1/relu_1/Relu"; a module called twice gets
  "relu", "relu_1"), its dynamo exporter into the node metadata `pkg.torch.onnx.name_scopes`;
- a Keras layer name ("c2"): tf2onnx keeps it as a component of node names ("functional_1/c2_1/Relu"; Keras 3 adds a
  call suffix "_1").

A name means exactly one tensor or it is an error. A module path stands for what a forward hook on that module
sees: the one tensor its first call leaves behind (produced inside, used outside or a graph output). A module with
several such tensors (a tuple output) raises LayerError listing them. When a name is both a tensor (or node) and a
module path and the two are different tensors (dynamo names tensors after ops: swin_t's tensor "permute" is the
output of "features.0.1", its module "permute" another tensor), LayerError names both; the prefixes
"tensor:NAME" (a tensor or node name only) and "module:PATH" (a module or layer name only) pick one.

Nodes without scope information (the dynamo exporter's Split for `x.chunk()` carries no metadata) belong to the
deepest scope that holds both a node upstream and a node downstream of them: a module call is a contiguous stretch
of the traced program, so whatever runs between two of its nodes runs inside it. They never inherit the scope of
their neighbour on one side only.
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
from .inputs import model_inputs

log = logging.getLogger(__name__)

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
FX_NODE = "pkg.torch.onnx.fx_node"
REWRITE_RULE = "pkg.onnxscript.rewriter.rule_name"
TENSOR_PREFIX = "tensor:"
MODULE_PREFIX = "module:"
_CALL_SUFFIX = re.compile(r"_\d+$")
_INDEX = re.compile(r"^(?P<base>.*?)\[(?P<index>-?\d+)\]$")
_NOT_ACTIVATIONS = {"Constant", "Shape", "Size", "ConstantOfShape"}
_SHAPE_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Identity"}
_FX_NAME = re.compile(r"%(\w+)")

Scope = tuple[str, ...]  # the scopes a node lies in, outermost first ("layer4", "layer4.1", "layer4.1.relu")


@dataclass
class _Scopes:
    """Module scopes of one model: scope -> indices of its nodes in graph order; aliases (short names) -> scopes."""

    nodes: dict[str, list[int]] = field(default_factory=dict)
    aliases: dict[str, set[str]] = field(default_factory=dict)

    def add(self, scope: str, index: int, aliases=()) -> None:
        self.nodes.setdefault(scope, []).append(index)
        for alias in aliases:
            if alias and alias != scope:
                self.aliases.setdefault(alias, set()).add(scope)


def resolve(proto: onnx.ModelProto, name: str, tensors: Container[str]) -> str:
    """The one tensor a layer name stands for (see the module docstring); LayerError when it names none, or
    several (a tensor and a different module output, or a module with several outputs)."""
    if not isinstance(name, str):
        raise LayerError(f"layer names are strings (tensor names or module paths), not {type(name).__name__}: "
                         f"{name!r}")
    if name.startswith(TENSOR_PREFIX):
        tensor = _tensor_or_node(proto, name[len(TENSOR_PREFIX):], tensors)
        if tensor is None:
            raise LayerError(f"no tensor or node named {name[len(TENSOR_PREFIX):]!r} in the model"
                             f"{_suggest(name[len(TENSOR_PREFIX):], None, tensors)}")
        return tensor
    view = _View(proto)
    if name.startswith(MODULE_PREFIX):
        tensor = view.module_output(name[len(MODULE_PREFIX):])
        if tensor is None:
            raise LayerError(f"no module named {name[len(MODULE_PREFIX):]!r} in the model"
                             f"{_suggest(name[len(MODULE_PREFIX):], view.scopes, ())}")
        return tensor
    direct = _tensor_or_node(proto, name, tensors)
    try:
        module = view.module_output(name)
    except LayerError as exc:
        if direct is None:
            raise
        raise LayerError(f"layer name {name!r} is ambiguous: it is the tensor {direct!r} and a module ({exc}); write "
                         f"'{TENSOR_PREFIX}{name}' for the tensor") from None
    if direct is not None and module is not None and direct != module:
        raise LayerError(f"layer name {name!r} is ambiguous: it is the tensor {direct!r} and the module {name!r}, "
                         f"whose output is the tensor {module!r}; write '{TENSOR_PREFIX}{name}' or "
                         f"'{MODULE_PREFIX}{name}'")
    if direct is not None or module is not None:
        return direct if direct is not None else module
    raise LayerError(f"no tensor, node or module named {name!r} in the model{_suggest(name, view.scopes, tensors)}")


def module_paths(proto: onnx.ModelProto) -> list[str]:
    """Every module scope the exporter recorded, in graph order (for listing and error messages)."""
    return list(_View(proto).scopes.nodes)


def node_module(node: onnx.NodeProto | None) -> str | None:
    """The innermost module (or Keras layer scope) a node was exported from, where the exporter recorded it (torch
    scopes, dynamo name_scopes, TF names); None without one, or without a node (a graph input)."""
    scope = _known_scope(node) if node is not None else None
    return scope[-1] if scope else None


# ---- scopes from node names and metadata ---------------------------------------------------------------------------
def _known_scope(node: onnx.NodeProto) -> Scope | None:
    """The scopes the exporter wrote for a node; None when it wrote nothing (a node added by an optimizer)."""
    dynamo = _dynamo_scopes(node)
    if dynamo is not None:
        return tuple(dynamo)
    if node.name.startswith("/"):
        return tuple(_torchscript_scopes(node.name))
    if "/" in node.name:
        parts = node.name.split("/")[:-1]
        return tuple("/".join(parts[:depth + 1]) for depth in range(len(parts)))
    return None


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
    """'/features/features.4/block/block.3/Conv' -> ['features', 'features.4', 'features.4.block',
    'features.4.block.3'] (full dotted paths).

    The exporter names each scope by its module's path from the last non-numeric part on ("block.3" for
    "features.4.block.3"), so a part that extends its parent's own such name by numbers is a numbered child of it;
    any other part is an attribute of the parent."""
    full, out = "", []
    for part in node_name.split("/")[1:-1]:
        if not part:
            continue
        if not full:
            full = part
        else:
            own = _unqualified(full)
            rest = part[len(own) + 1:] if part.startswith(own + ".") else ""
            full = f"{full}.{rest}" if rest and all(a.isdigit() for a in rest.split(".")) else f"{full}.{part}"
        out.append(full)
    return out


def _unqualified(path: str) -> str:
    """torch.onnx's scope name of a module path: from its last non-numeric part on ("features.4.block.3" ->
    "block.3", "features.4" -> "features.4")."""
    atoms = path.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isdigit():
            return ".".join(atoms[i:])
    return path


class _View:
    """One model's nodes with their scopes (recorded or inferred), producers, consumers and which tensors are
    activations (computed from the inputs, not shapes or constants)."""

    def __init__(self, proto: onnx.ModelProto):
        self.nodes = list(proto.graph.node)
        self.graph_outputs = {o.name for o in proto.graph.output}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        self.initializers = {t.name for t in proto.graph.initializer}
        self.active = {i.name for i in model_inputs(proto)}
        for i, node in enumerate(self.nodes):
            for t in node.input:
                self.consumers.setdefault(t, []).append(i)
            for t in node.output:
                self.producer[t] = i
            if node.op_type not in _NOT_ACTIVATIONS and any(t in self.active for t in node.input):
                self.active.update(t for t in node.output if t)
        known = [_known_scope(node) for node in self.nodes]
        self.node_scope = self._infer(known)
        self.scopes = _Scopes()
        for i, node in enumerate(self.nodes):
            keras = known[i] is not None and not node.name.startswith("/") and _dynamo_scopes(node) is None
            aliases = node.name.split("/")[:-1] if keras else []  # tf2onnx: "c2_1" answers to "c2" too
            for depth, scope in enumerate(self.node_scope[i]):
                alias = (aliases[depth], _CALL_SUFFIX.sub("", aliases[depth])) if depth < len(aliases) else ()
                self.scopes.add(scope, i, aliases=alias)

    def _infer(self, known: list[Scope | None]) -> list[Scope]:
        """Scopes for nodes the exporter left unscoped: the longest common prefix of the scope of a recorded node
        upstream and one downstream (through other unscoped nodes); the root when either side has none."""
        up: list[set[Scope]] = [set() for _ in self.nodes]
        down: list[set[Scope]] = [set() for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            if known[i] is None:
                for t in node.input:
                    p = self.producer.get(t)
                    if p is not None and p != i:
                        up[i] |= {known[p]} if known[p] is not None else up[p]
        for i in range(len(self.nodes) - 1, -1, -1):
            if known[i] is None:
                for t in self.nodes[i].output:
                    for c in self.consumers.get(t, ()):
                        if c != i:
                            down[i] |= {known[c]} if known[c] is not None else down[c]
        scopes = []
        for i, scope in enumerate(known):
            if scope is None:
                scope = max((_common(u, d) for u in up[i] for d in down[i]), key=len, default=())
                log.debug("node %r has no scope recorded; taken as inside %r", self.nodes[i].name, scope)
            scopes.append(scope)
        return scopes

    def module_output(self, name: str) -> str | None:
        """The tensor a forward hook on module `name` sees; None when no module has that name."""
        for candidate in (name, name[len("model."):] if name.startswith("model.") else None):
            if candidate:
                scope = _find_scope(self.scopes, candidate)
                if scope is not None:
                    tensor = self._exit_tensor(scope)
                    log.debug("layer %r is module scope %r, tensor %r", name, scope, tensor)
                    return tensor
        return None

    def _first_call(self, members: list[int]) -> list[int]:
        """The nodes of a module's first call: its nodes up to the first computing node of another scope (dynamo
        records no call number; TorchScript scopes later calls as 'relu_1' and never gets here with them)."""
        inside = set(members)
        for i in range(members[0], members[-1] + 1):
            if i not in inside and any(t in self.active for t in self.nodes[i].output):
                return [m for m in members if m < i]
        return members

    def _exit_tensor(self, scope: str) -> str:
        call = self._first_call(self.scopes.nodes[scope])
        inside = set(call)
        exits = list(dict.fromkeys(
            t for i in call for t in self.nodes[i].output
            if t in self.active and (t in self.graph_outputs or any(c not in inside for c in self.consumers.get(t, ())))))
        if not exits:
            raise LayerError(f"module {scope!r} has no output tensor used outside it")
        if len(exits) > 1:
            raise LayerError(f"module {scope!r} leaves {len(exits)} tensors, not one: {exits}; name the one you want "
                             f"as '{TENSOR_PREFIX}<name>', or a module inside it")
        self._check_not_folded(scope, exits[0])
        self._check_not_merged(scope, exits[0], inside)
        return exits[0]

    def _check_not_merged(self, scope: str, tensor: str, inside: set[int]) -> None:
        """dynamo's optimizer collapses chains of shape ops (Reshape(Reshape(x)) -> Reshape(x), or nothing when they
        cancel); when a module's last op was one of them, its output is gone. The op after it still carries its fx
        record, whose input is then a tensor the model no longer has."""
        for c in self.consumers.get(tensor, ()):
            node = self.nodes[c]
            meta = {p.key: p.value for p in node.metadata_props}
            if c in inside or node.op_type not in _SHAPE_OPS or FX_NODE not in meta:
                continue
            if tensor not in _FX_NAME.findall(meta[FX_NODE])[1:]:
                rule = f" (rule {meta[REWRITE_RULE]})" if REWRITE_RULE in meta else ""
                raise LayerError(f"the exporter's optimizer merged the last op of module {scope!r} into the "
                                 f"{node.op_type} node {node.name!r} after it{rule}: the model has no tensor with "
                                 f"this module's own output. The nearest tensors are {tensor!r} (before the merged "
                                 f"op) and {node.output[0]!r} (after it); name one as '{TENSOR_PREFIX}<name>'")

    def _check_not_folded(self, scope: str, tensor: str) -> None:
        """TorchScript folds a BatchNorm into the Conv before it and names the new weights 'onnx::Conv_<n>': that
        Conv node then computes the BatchNorm's output, which a hook on the Conv module never sees."""
        node = self.nodes[self.producer[tensor]]
        if node.op_type != "Conv" or len(node.input) < 2 or self.node_scope[self.producer[tensor]][-1:] != (scope,):
            return
        weight = node.input[1]
        if weight in self.initializers and weight not in self.producer and weight.startswith("onnx::"):
            raise LayerError(f"module {scope!r} is a convolution the exporter merged with the BatchNorm after it (its "
                             f"weights became {weight!r}): the model has no tensor with this module's own output. The "
                             f"merged output is the tensor {tensor!r} ('{TENSOR_PREFIX}{tensor}'), what a hook on the "
                             "BatchNorm sees")


def _common(a: Scope, b: Scope) -> Scope:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _tensor_or_node(proto: onnx.ModelProto, name: str, tensors: Container[str]) -> str | None:
    if name in tensors:
        return name
    for node in proto.graph.node:
        if node.name == name and node.output and node.output[0]:
            return node.output[0]
    return None


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


def _suggest(name: str, scopes: _Scopes | None, tensors) -> str:
    """Close matches among module scopes (None: modules not asked for) and tensor names."""
    modules = [] if scopes is None else difflib.get_close_matches(name, list(scopes.nodes) + list(scopes.aliases),
                                                                  n=5, cutoff=0.5)
    names = difflib.get_close_matches(name, list(tensors), n=5, cutoff=0.5)
    hints = []
    if modules:
        hints.append(f"modules: {modules}")
    if names:
        hints.append(f"tensors: {names}")
    if not hints:
        return "; it has no module scopes to match" if scopes is not None and not scopes.nodes else ""
    # BatchNorm is folded into the Conv before it by most exporters, so its scope is gone.
    folded = " (BatchNorm layers are usually folded into the Conv before them)" if "bn" in name.lower() else ""
    return "; close matches: " + "; ".join(hints) + folded
