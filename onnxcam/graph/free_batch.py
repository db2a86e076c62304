"""freed_batch: a batch-1 export made to take any batch, kept only where it computes each sample as the export does.

Most detector exports fix their batch at 1 (ultralytics' and YOLOX's defaults, torch's without dynamic_axes), so
several images, or several targets of one image, ran one run each. An export traced at batch 1 differs from one
traced with a free batch mostly in constants: the shapes of its Reshapes start with 1, and constants it joins to
the data (a class token) have one row. Here the input's batch becomes a symbol, each such Reshape copies its
input's batch (0 in place of 1), each such constant is expanded to the data's batch, and the result is kept only
if a run of two different samples gives, for every output and every layer asked for, each sample's own batch-1
result of the export (same shapes, values within float tolerance). Anything else the tracing baked in (a Gather
of sample 0, a batch folded into another axis, a layout with the batch elsewhere) fails that run, and the export
is used as it is.

Not attempted: models with side inputs (their values would be needed to check), and control flow or data-sized
ops (If, Loop, Scan, NonZero, NonMaxSuppression: a condition or a size computed from one sample's values).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .inputs import model_inputs
from .shapes import infer

log = logging.getLogger(__name__)

SYMBOL = "onnxcam_batch"
_REFUSED_OPS = {"If", "Loop", "Scan", "NonZero", "NonMaxSuppression", "Compress", "Unique"}
_SHAPE_OPS = {"Shape", "Size"}  # their outputs describe the data, they do not carry its samples
_RTOL = 1e-4


class NotFreed(Exception):
    """Why a batch-1 export keeps its batch (the message names what was found)."""


def freed_batch(skeleton: onnx.ModelProto, weights: dict, input_name: str, shape: tuple) -> onnx.ModelProto:
    """A copy of the skeleton (graph/load.py; its placeholders' values in weights) with a free batch on
    `input_name`, whose one sample has `shape` (see the module's text); to be checked with check_freed before use.
    NotFreed when the model is of a kind not attempted."""
    others = [i.name for i in model_inputs(skeleton) if i.name != input_name]
    if others:
        raise NotFreed(f"the model has other inputs ({', '.join(others)})")
    refused = sorted({n.op_type for n in skeleton.graph.node} & _REFUSED_OPS)
    if refused:
        raise NotFreed(f"the graph holds {', '.join(refused)}")
    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    graph = model.graph
    image = next(i for i in graph.input if i.name == input_name)
    dims = image.type.tensor_type.shape.dim
    if not dims or dims[0].dim_value != 1:
        raise NotFreed("the input's batch is not 1")
    carrying = _batch_tensors(graph, input_name)
    joins = [n for n in graph.node if n.op_type == "Concat" and any(i in carrying for i in n.input)
             and not all(i in carrying for i in n.input)]
    wanted = {i for n in joins for i in n.input}
    dims_of = _dims(skeleton, weights, input_name, (1, *shape[1:]), wanted) if joins else {}
    _free_dim(dims[0])
    for out in graph.output:
        out_dims = out.type.tensor_type.shape.dim
        if out.name in carrying and out_dims and out_dims[0].dim_value == 1:
            _free_dim(out_dims[0])
    del graph.value_info[:]
    constants = _constant_values(graph)
    _copy_batch_in_reshapes(graph, carrying, constants)
    _expand_joined_constants(graph, joins, carrying, dims_of)
    return model


def check_freed(original: onnx.ModelProto, freed: onnx.ModelProto, weights: dict, input_name: str,
                sample_shape: tuple, dtype, layers: list[str] = ()) -> None:
    """NotFreed unless the freed model, run on two different samples at once, gives for each output and layer
    each sample's batch-1 result of the original (same shapes, values within float tolerance)."""
    from ..runtime import session

    names = [o.name for o in original.graph.output]
    names += [n for n in layers if n not in names]
    carrying = _batch_tensors(original.graph, input_name)
    samples = _samples(sample_shape, dtype)
    try:  # first: a baked batch most often fails here, at once (onnxruntime's own types: a failing node)
        after = _session(session, freed, weights, names)
        together = dict(zip(names, after.run(names, {input_name: np.concatenate(samples)})))
        del after
        before = _session(session, original, weights, names)
        alone = [dict(zip(names, before.run(names, {input_name: s}))) for s in samples]
        del before
    except Exception as exc:  # noqa: BLE001
        raise NotFreed(f"a run of 2 samples failed: {str(exc).splitlines()[0][:200]}") from None
    for name in names:
        got, want = together[name], [a[name] for a in alone]
        if name not in carrying:  # computed from constants alone (an anchor grid): the same for any batch
            if got.shape != want[0].shape or not _close(got, want[0]):
                raise NotFreed(f"tensor {name!r}, which does not depend on the input, changed with the batch")
            continue
        if want[0].ndim == 0 or want[0].shape[0] != 1 or got.shape != (2, *want[0].shape[1:]):
            raise NotFreed(f"tensor {name!r} is {tuple(got.shape)} for 2 samples, {tuple(want[0].shape)} for one")
        for i, w in enumerate(want):
            if not _close(got[i:i + 1], w):
                raise NotFreed(f"tensor {name!r} of sample {i} differs when run with another sample")


def _free_dim(dim) -> None:
    dim.Clear()
    dim.dim_param = SYMBOL


def _batch_tensors(graph: onnx.GraphProto, input_name: str) -> set[str]:
    """The tensors computed from the input's values (their first axis is the batch, unless the check says not)."""
    carrying = {input_name}
    for node in graph.node:  # exports are topologically sorted (onnx requires it)
        if node.op_type not in _SHAPE_OPS and any(i in carrying for i in node.input):
            carrying.update(o for o in node.output if o)
    return carrying


def _dims(skeleton: onnx.ModelProto, weights: dict, input_name: str, shape: tuple, wanted: set) -> dict:
    """{tensor: its dims at batch 1 (ints, None where unknown)}: onnx's shape inference, and where it leaves a
    wanted tensor's unknown (a class token's Expand to a computed shape), graph/shapes.py's (folded constants,
    probes: slower)."""
    found = {}
    for thorough in (False, True):
        if thorough:
            inferred = infer(skeleton, weights, input_name, shape)
        else:
            try:
                inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
            except Exception as exc:  # noqa: BLE001 - a convenience: the thorough inference follows
                log.debug("shape inference failed: %s", exc)
                continue
        found = {t.name: tuple(t.dims) for t in inferred.graph.initializer}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            if vi.type.tensor_type.HasField("shape"):
                found[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                       for d in vi.type.tensor_type.shape.dim)
        if all(found.get(name) and found[name][0] for name in wanted):
            break
    return found


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """The small integer constants of the graph (initializers and Constant nodes), by name."""
    values = {}
    for t in graph.initializer:
        if t.data_type == onnx.TensorProto.INT64 and not t.external_data:
            values[t.name] = numpy_helper.to_array(t)
    for node in graph.node:
        if node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None and attr.t.data_type == onnx.TensorProto.INT64:
                values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _copy_batch_in_reshapes(graph: onnx.GraphProto, carrying: set, constants: dict) -> None:
    """Each Reshape of the data to a constant shape that starts with 1 keeps its input's batch instead (a 0 there
    copies the input's first dimension; not with allowzero, where 0 means 0)."""
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[0] not in carrying or len(node.input) < 2:
            continue
        shape = constants.get(node.input[1])
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        if shape is None or shape.ndim != 1 or not shape.size or shape[0] != 1 or allowzero:
            continue
        name = f"{node.input[1]}__{SYMBOL}"
        if name not in constants:
            graph.initializer.append(numpy_helper.from_array(np.concatenate([[0], shape[1:]]).astype(np.int64),
                                                             name))
            constants[name] = shape
        node.input[1] = name


def _expand_joined_constants(graph: onnx.GraphProto, joins: list, carrying: set, ranks: dict) -> None:
    """A Concat along another axis than the batch of the data and a one-row tensor that does not depend on it
    (a class token): that tensor is expanded to the data's batch first."""
    new_nodes, joined = [], {id(n) for n in joins}
    for node in graph.node:
        if id(node) in joined:
            data = next((i for i in node.input if i in carrying), None)
            rank = len(ranks.get(data) or ()) if data else 0
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if data is not None and rank and axis % rank != 0:
                for k, name in enumerate(node.input):
                    dims = ranks.get(name)
                    if name not in carrying and dims and len(dims) == rank and dims[0] == 1:
                        node.input[k] = _expanded(new_nodes, name, data, rank, f"{node.name or node.output[0]}_{k}")
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)


def _expanded(nodes: list, name: str, data: str, rank: int, tag: str) -> str:
    """Nodes appended to `nodes` that expand `name` (one row) to the batch of `data`; the expanded tensor's name."""
    prefix = f"{SYMBOL}/{tag}"
    ones = helper.make_tensor(f"{prefix}/ones", onnx.TensorProto.INT64, [rank - 1], [1] * (rank - 1))
    first = helper.make_tensor(f"{prefix}/first", onnx.TensorProto.INT64, [1], [0])
    nodes.extend([
        helper.make_node("Constant", [], [f"{prefix}/ones"], value=ones),
        helper.make_node("Constant", [], [f"{prefix}/first"], value=first),
        helper.make_node("Shape", [data], [f"{prefix}/shape"]),
        helper.make_node("Gather", [f"{prefix}/shape", f"{prefix}/first"], [f"{prefix}/batch"], axis=0),
        helper.make_node("Concat", [f"{prefix}/batch", f"{prefix}/ones"], [f"{prefix}/to"], axis=0),
        helper.make_node("Expand", [name, f"{prefix}/to"], [f"{prefix}/expanded"]),
    ])
    return f"{prefix}/expanded"


def _samples(shape: tuple, dtype) -> list[np.ndarray]:
    """Two different inputs of one sample each (seeded): normal values, or 0-255 for integer inputs."""
    rng = np.random.default_rng(0)
    dtype = np.dtype(dtype)
    one = (1, *shape[1:])
    if dtype.kind in "iu":
        return [rng.integers(0, 256, one).astype(dtype) for _ in range(2)]
    return [rng.standard_normal(one).astype(dtype) for _ in range(2)]


def _session(session, model: onnx.ModelProto, weights: dict, names: list[str]):
    """A CPU session of the skeleton `model` (its placeholders' values in weights) exposing `names` as outputs."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    have = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    return session(exposed.SerializeToString(), "cpu", weights)


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    if want.dtype.kind not in "fc":
        return bool(np.array_equal(got, want))
    # each value within 1e-4 of its own size, or 1e-5 of the tensor's largest (values that cancel out): a batch
    # of two may sum in another order, but one output's small entries (a detector's class scores beside its box
    # coordinates) must not hide a change behind its large ones
    finite = want[np.isfinite(want)]
    scale = float(np.abs(finite).max()) if finite.size else 1.0
    return bool(np.allclose(got, want, rtol=_RTOL, atol=0.1 * _RTOL * max(scale, 1e-6), equal_nan=True))
