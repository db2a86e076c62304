"""What `onnxcam info` and `onnxcam layers` report about a model: inputs, outputs, preprocessing, the score,
candidate target layers with their module paths, and which ops on the way to the score lack a gradient rule."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import preprocess
from .errors import InputError, OnnxCamError
from .graph import names
from .graph.inputs import model_inputs
from .graph.load import LoadedModel, model_digest
from .graph.model import ModelGraph

log = logging.getLogger(__name__)
DEFAULT_PROBE_SIZE = (224, 224)
# Ops that move or re-shape a map without computing a new feature: hidden from `layers` unless --all.
_PLUMBING = {"Pad", "Reshape", "Transpose", "Identity", "Cast", "Slice", "Squeeze", "Unsqueeze", "Flatten",
             "Expand", "Tile", "Split", "Gather", "QuantizeLinear", "DequantizeLinear", "Dropout"}


@dataclass
class OpenModel:
    path: Path
    proto: onnx.ModelProto
    pre: preprocess.Preprocess
    size_note: str              # set when the input size was assumed, not known
    graph: ModelGraph
    score: str | None
    default_layer: str | None
    problems: dict              # what could not be determined -> why
    digest: str = ""            # the model hash (graph/load.py model_digest)


@dataclass
class LayerRow:
    name: str
    op: str
    shape: str
    module: str | None
    default: bool
    missing: tuple[str, ...] = ()   # ops without a gradient rule between this layer and the score


def open_model(path, *, size=None, mean=None, std=None, layout="auto", bgr=False) -> OpenModel:
    loaded = LoadedModel.of(path)  # read once; `proto` is its skeleton (no large weights)
    proto = loaded.skeleton
    note = ""
    pre = preprocess.resolve(proto, size=size, mean=mean, std=std, layout=layout, bgr=bgr,
                             assumed_size=DEFAULT_PROBE_SIZE)
    if pre.sources["size"] == "assumed":
        note = (f"(the input size is dynamic: shapes shown for {DEFAULT_PROBE_SIZE[0]}x{DEFAULT_PROBE_SIZE[1]}; "
                "explain needs --size HxW)")
    graph = ModelGraph(proto, pre.input_shape(1), loaded.weights)
    check_input_size(graph, pre)
    problems = {}
    score = layer = None
    try:
        score = graph.default_score()
        layer = graph.default_layer(score)
    except OnnxCamError as exc:
        problems["score" if score is None else "layer"] = str(exc)
    return OpenModel(Path(path), proto, pre, note, graph, score, layer, problems, loaded.digest)


def check_input_size(graph: ModelGraph, pre: preprocess.Preprocess) -> None:
    """Raise InputError when the input size is too small for the model: some tensor would get an empty or negative
    dimension (a 7x7 pooling on a 2x2 map), which onnxruntime only reports mid-run, after logging it itself.
    Activations only (float, rank >= 3): shape plumbing may hold legitimately empty tensors."""
    for node in graph.graph.nodes:
        for out in node.outputs:
            shape = graph.shape(out)
            if shape and len(shape) >= 3 and _is_float(out) and any(isinstance(d, int) and d < 1 for d in shape):
                h, w = pre.size
                raise InputError(f"the input size {h}x{w} is too small for this model: the {node.op} node "
                                 f"{node.name or out.name!r} would output shape {_fmt(shape)}")


def candidate_layers(m: OpenModel, show_all: bool = False) -> list[LayerRow]:
    """4-D activations with spatial size > 1 on the path from the input to the score, in graph order."""
    if m.score is None:
        raise InputError(f"cannot list layers: {m.problems['score']}")
    g = m.graph
    nodes, on_path = g.path_nodes([g.tensor(g.input_name)], g.tensor(m.score))
    protos = _node_protos(m.proto)
    unsupported = _unsupported_nodes(m)
    rows = []
    for node in nodes:
        if node.op in _PLUMBING and not show_all:
            continue
        for out in node.outputs:
            shape = g.shape(out)
            if out.name not in on_path or not _is_map(shape):
                continue
            rows.append(LayerRow(out.name, node.op, _fmt(shape), names.node_module(protos.get(out.name)),
                                 out.name == m.default_layer, _missing_after(g, out, unsupported)))
    if m.default_layer and not any(r.default for r in rows):  # e.g. the choice is a plumbing op's output
        t = g.tensor(m.default_layer)
        node = g.producer(t)
        rows.append(LayerRow(t.name, node.op if node else "input", _fmt(g.shape(t)),
                             names.node_module(protos.get(t.name)), True))
    return rows


def _unsupported_nodes(m: OpenModel) -> dict[str, str]:
    """{output tensor name: op} of the float-valued nodes on the input -> score path that have no gradient rule."""
    from .autodiff.rules import find_rule, load_all

    load_all()
    g = m.graph
    nodes, on_path = g.path_nodes([g.tensor(g.input_name)], g.tensor(m.score))
    return {o.name: n.op for n in nodes if find_rule(n.op, g.opset, n.domain or "") is None
            and any(o.name in on_path and _is_float(o) for o in n.outputs) for o in n.outputs}


def _missing_after(g: ModelGraph, t, unsupported: dict[str, str]) -> tuple[str, ...]:
    if not unsupported:
        return ()
    reach = g.forward_reach([t])
    return tuple(sorted({op for name, op in unsupported.items() if name in reach and name != t.name}))


def gradient_support(m: OpenModel) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """(op types on the path from the input to the score, {unsupported op: count} on that path,
    {unsupported op: count} between the automatic layer and the score)."""
    from .autodiff.rules import find_rule, load_all

    load_all()
    g = m.graph
    opset = g.opset

    def missing(start) -> tuple[list[str], Counter]:
        nodes, on_path = g.path_nodes([start], g.tensor(m.score))
        # Integer side computations (Shape -> Gather -> Concat feeding a Reshape) carry no gradient.
        nodes = [n for n in nodes if any(o.name in on_path and _is_float(o) for o in n.outputs)]
        return sorted({n.op for n in nodes}), Counter(n.op for n in nodes if find_rule(n.op, opset, n.domain or "")
                                                     is None)

    ops, from_input = missing(g.tensor(g.input_name))
    from_layer = missing(g.tensor(m.default_layer))[1] if m.default_layer else Counter()
    return ops, dict(from_input), dict(from_layer)


def describe(m: OpenModel) -> list[tuple[str, str]]:
    """(heading, text) rows for `onnxcam info`."""
    p, g = m.proto, m.graph
    opsets = ", ".join(f"{imp.domain or 'ai.onnx'} {imp.version}" for imp in p.opset_import)
    producer = " ".join(s for s in (p.producer_name, p.producer_version) if s) or "unknown"
    size_mb = m.path.stat().st_size / 1e6 if m.path.is_file() else 0
    rows = [
        ("Model", f"{m.path} ({size_mb:.1f} MB)"),
        ("Hash", m.digest or model_digest(p)),
        ("Producer", producer),
        ("Format", f"IR version {p.ir_version}; opsets: {opsets}; {len(p.graph.node)} nodes"),
        ("Inputs", "\n".join(_value_info(v) for v in model_inputs(p))),
        ("Outputs", "\n".join(_value_info(v) for v in p.graph.output)),
    ]
    if m.score is not None:
        t = g.tensor(m.score)
        node = g.producer(t)
        rows.append(("Logits", f"{m.score} {_fmt(g.shape(t))}" + (f", from {node.op}" if node else "")))
    else:
        rows.append(("Logits", f"not found: {m.problems['score']}"))
    if m.default_layer is not None:
        t = g.tensor(m.default_layer)
        node = g.producer(t)
        rows.append(("Layer", (f"{m.default_layer} {_fmt(g.shape(t))}, from {node.op if node else 'the input'} "
                               "(the automatic choice; `onnxcam layers` lists the others)")))
    elif "layer" in m.problems:
        rows.append(("Layer", f"none found: {m.problems['layer']}"))
    rows.append(("Preprocess", _preprocess_text(m)))
    labels = preprocess.labels_from_metadata(p)
    rows.append(("Labels", f"{len(labels)} class names in the metadata ({preprocess.LABELS_KEY}), e.g. "
                           f"{', '.join(repr(s) for s in labels[:3])}" if labels
                 else "none in the metadata (explain --labels FILE, or --labels imagenet)"))
    if m.score is not None:
        rows.append(("Gradients", _gradient_text(m)))
    return rows


def _preprocess_text(m: OpenModel) -> str:
    pre = m.pre
    src = pre.sources

    def nums(v):
        return ",".join(f"{x:.4g}" for x in v)

    found = preprocess.PREPROCESS_KEY in preprocess.metadata(m.proto)
    head = (f"from the metadata ({preprocess.PREPROCESS_KEY})" if found
            else "no onnxcam.preprocess metadata: defaults below (override with --size/--mean/--std/--layout/--bgr)")
    lines = [head,
             (f"size {pre.size[0]}x{pre.size[1]} ({src.get('size', 'assumed')}), layout {pre.layout} "
              f"({src['layout']}), color {pre.color} ({src['color']}), resize {pre.resize}"),
             f"mean {nums(pre.mean)} ({src['mean']}), std {nums(pre.std)} ({src['std']}) in [0,1] units"]
    if m.size_note:
        lines.append(m.size_note)
    return "\n".join(lines)


def _gradient_text(m: OpenModel) -> str:
    ops, from_input, from_layer = gradient_support(m)
    if not from_input:
        return f"every op on the path from the input to the score has a gradient rule ({', '.join(ops)})"
    listed = ", ".join(f"{op} ({n} node{'s' * (n > 1)})" for op, n in sorted(from_input.items()))
    text = f"no gradient rule for: {listed}"
    if m.default_layer is None:
        return text
    if from_layer:
        return text + "\nthe automatic layer is affected: choose a layer after these ops (`onnxcam layers`)"
    return text + ("\nlayers whose path to the score crosses these ops cannot be explained; "
                   "the automatic layer can")


def _node_protos(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in proto.graph.node for out in n.output}


def _is_map(shape) -> bool:
    if shape is None or len(shape) != 4:
        return False
    return sum(1 for d in shape[1:] if not (isinstance(d, int) and d <= 1)) >= 2


def _is_float(t) -> bool:
    return t.dtype is None or np.issubdtype(np.dtype(t.dtype), np.floating)


def _value_info(v: onnx.ValueInfoProto) -> str:
    tt = v.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "?"
    if not tt.HasField("shape"):
        return f"{v.name}: {dtype} (shape unknown)"
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return f"{v.name}: {dtype} ({', '.join(dims)})"


def _fmt(shape) -> str:
    if shape is None:
        return "(?)"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
