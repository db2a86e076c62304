"""Static shapes: ONNX shape inference with the input's size pinned, and probes that measure what it misses.

Inference runs on a copy in which small constant subgraphs (computed pads, shapes) are folded (graph/fold.py);
where it still cannot see through run-time computed shapes, a probe measures them on the part of the model between
the nearest known activations and the unknown tensors (in numpy when that part is shape plumbing, else with
onnxruntime's profiler).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx

from ..errors import ModelError
from .evaluate import runtime_failure
from .fold import FOLDERS, fold_constants
from .inputs import BATCH, declared_shape, fmt_shape
from .load import is_placeholder

__all__ = ["infer"]

log = logging.getLogger(__name__)


def infer(skeleton: onnx.ModelProto, weights: dict, input_name: str, shape: tuple) -> onnx.ModelProto:
    """Shape inference on the weight-less skeleton with the input's shape pinned (batch symbolic)."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(skeleton)
    del pinned.graph.value_info[:]
    declared_outputs = _unpin_outputs(pinned)
    for inp in pinned.graph.input:
        if inp.name == input_name and shape is not None:
            dims = inp.type.tensor_type.shape.dim
            if len(dims) == 0 and shape:
                for _ in shape:
                    dims.add()
            for d, v in zip(dims, shape):
                if isinstance(v, int):
                    d.Clear()
                    d.dim_value = v
                elif v is not None and not d.HasField("dim_value"):
                    d.Clear()
                    d.dim_param = v
    folded, values = fold_constants(pinned)
    try:
        inferred = onnx.shape_inference.infer_shapes(folded, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is a convenience; the probe below recovers what it misses
        log.debug("shape inference failed: %s", exc)
        inferred = folded
    if values:  # the model as it is, with what inference found, and the folded tensors' own shapes and types
        del inferred.graph.node[:]
        inferred.graph.node.extend(pinned.graph.node)
        del inferred.graph.initializer[:]
        inferred.graph.initializer.extend(pinned.graph.initializer)
        inferred.graph.value_info.extend(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for name, v in values.items())
    _probe_missing_shapes(inferred, weights, input_name, shape)
    if shape is not None and all(isinstance(d, int) for d in shape[1:]):  # symbolic shapes say little
        _compare_outputs(inferred, declared_outputs)
    return inferred


def _unpin_outputs(model: onnx.ModelProto) -> dict:
    """Remove the graph outputs' declared shapes (returned by name): exporters write wrong ones (a text recognizer
    declares [1, 'seqlen'] and returns (T, 1, C)), and inference keeps a declared shape over what it computes."""
    declared = {}
    for out in model.graph.output:
        tt = out.type.tensor_type
        if tt.HasField("shape"):
            declared[out.name] = declared_shape(out)
            tt.ClearField("shape")
    return declared


def _compare_outputs(model: onnx.ModelProto, declared: dict) -> None:
    """Say when an output's declared shape disagrees with the computed (inferred or measured) one."""
    for out in model.graph.output:
        want = declared.get(out.name)
        tt = out.type.tensor_type
        if want is None or not tt.HasField("shape"):
            continue
        got = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        if len(got) != len(want) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                        for a, b in zip(got, want)):
            log.warning("output %r declares shape %s but the model computes %s: the computed shape is used",
                        out.name, fmt_shape(want), fmt_shape(got))


def _probe_missing_shapes(proto: onnx.ModelProto, weights: dict, input_name: str, shape: tuple) -> None:
    """Fill shapes that inference left unknown by running the model (with its weights) at batch 1 and 2."""
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        return  # a free size: never measured at a guessed one (the model may accept only some sizes)
    known = {vi.name: vi for vi in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input)}
    measure_all = _shape_inference_unreliable(proto)
    missing = []
    for node in proto.graph.node:
        for out in node.output:
            vi = known.get(out)
            if out and (vi is None or not _fully_shaped(vi) or measure_all):
                missing.append(out)
    if not missing:
        return
    typed = {name for name in missing if name in known and known[name].type.tensor_type.elem_type}
    part = proto if measure_all else _part_computing(proto, missing, known)
    shapes, dtypes = _probe(part, weights, input_name, shape, missing, typed)
    for name, (s1, s2) in shapes.items():
        dims = [BATCH if a != b else a for a, b in zip(s1, s2)] if s2 is not None else list(s1)
        vi = known.get(name)
        if vi is None:
            vi = proto.graph.value_info.add()
            vi.name = name
        elem = vi.type.tensor_type.elem_type
        vi.type.tensor_type.Clear()
        vi.type.tensor_type.elem_type = elem or dtypes[name]
        for d in dims:
            dim = vi.type.tensor_type.shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            else:
                dim.dim_param = d


def _fully_shaped(vi: onnx.ValueInfoProto) -> bool:
    """Every dim known: a number, or a symbol the model declared (inference's own 'unk__' names are unknowns)."""
    tt = vi.type.tensor_type
    return tt.HasField("shape") and all(
        d.HasField("dim_value") or (d.dim_param and not d.dim_param.startswith("unk__")) for d in tt.shape.dim)


def _part_computing(proto: onnx.ModelProto, names: list, known: dict) -> onnx.ModelProto:
    """The part of the model that computes `names` from the nearest activations whose shapes are known.

    Those activations (float, rank >= 3, every dim a number or the batch) become inputs: a probe then runs a few
    nodes on small random tensors instead of the whole model. Integer and 1-D tensors are never cut, since their
    values (shapes, pads, scales) may decide the shapes being measured; nor is anything under a control-flow node.
    """
    g = proto.graph
    producer = {out: node for node in g.node for out in node.output}
    wanted, cuts, kept, stack = set(names), {}, set(), list(names)
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or id(node) in kept or name in cuts:
            continue
        if name not in wanted and _activation_with_known_shape(known.get(name)):
            cuts[name] = known[name]
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return proto  # subgraphs read outer names implicitly: keep the whole model
        kept.add(id(node))
        stack.extend(i for i in node.input if i)
    if not cuts:
        return proto
    part = onnx.ModelProto()
    part.CopyFrom(proto)
    nodes = [n for n in g.node if id(n) in kept]
    used = {i for n in nodes for i in n.input}
    del part.graph.node[:]
    part.graph.node.extend(nodes)
    inputs = [i for i in g.input if i.name in used] + list(cuts.values())
    del part.graph.input[:]
    part.graph.input.extend(inputs)
    initializers = [t for t in g.initializer if t.name in used]
    del part.graph.initializer[:]
    part.graph.initializer.extend(initializers)
    del part.graph.output[:]
    part.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    return part


def _activation_with_known_shape(vi) -> bool:
    tt = vi.type.tensor_type if vi is not None else None
    return (tt is not None and tt.elem_type in _FLOAT_TYPES and tt.HasField("shape") and len(tt.shape.dim) >= 3 and
            all(d.HasField("dim_value") or (i == 0 and d.dim_param and not d.dim_param.startswith("unk__"))
                for i, d in enumerate(tt.shape.dim)))


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def _shape_inference_unreliable(proto: onnx.ModelProto) -> bool:
    """onnx's inference disagrees with onnxruntime on ceil_mode pools whose last window starts in the end
    padding, and everything after such a pool inherits the error: then every shape is measured."""
    return any(n.op_type in ("MaxPool", "AveragePool", "LpPool") and
               any(a.name == "ceil_mode" and a.i for a in n.attribute) for n in proto.graph.node)


_PROBE_CHUNK = 96


def _probe(proto, weights, input_name, shape, names, typed: set = frozenset()):
    """Run the model at batch 1 (and 2 when the batch is free) and read the shapes of `names`.

    The shapes come from onnxruntime's profiler, which records every node's output shapes: the model runs as it
    is, reusing memory as a plain inference does. Tensors the profile does not name are measured as graph outputs,
    a few dozen per session: those all live until a run ends, so exposing every tensor at once would need the
    memory of all activations together (several times an inference on models full of run-time shapes).
    typed: names whose element type is known already (the profile cannot always tell it).
    """
    found = _shape_plumbing_probe(proto, input_name, shape, names)
    if found is not None:
        return found
    present = {t.name for t in proto.graph.initializer}
    weights = {name: v for name, v in weights.items() if name in present}  # a part of the model needs fewer
    shapes, dtypes = _profiled_shapes(proto, weights, input_name, shape, set(names))
    rest = [name for name in names if name not in shapes or (name not in dtypes and name not in typed)]
    shapes = {name: v for name, v in shapes.items() if name not in rest}
    for start in range(0, len(rest), _PROBE_CHUNK):
        found, types = _probe_chunk(proto, weights, input_name, shape, rest[start:start + _PROBE_CHUNK])
        shapes.update(found)
        dtypes.update(types)
    return shapes, dtypes


def _shape_plumbing_probe(proto, input_name, shape, names):
    """The probe in numpy, for a part made of shape plumbing only (a flatten's Shape -> Gather -> Concat ->
    Reshape): (shapes, dtypes) as _probe gives them, or None when the part has other ops or needs weights.
    A second onnxruntime session, however small, would cost more memory than the whole model's inference adds."""
    g = proto.graph
    if any(n.op_type not in FOLDERS or n.domain not in ("", "ai.onnx") or len(n.output) != 1 for n in g.node) or \
            any(is_placeholder(t) for t in g.initializer):
        return None
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    runs = []
    for n in _probe_batches(shape):
        values = dict(constants)
        for inp in g.input:
            tt = inp.type.tensor_type
            declared = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
            values[inp.name] = np.zeros(_probe_dims(declared, inp.name == input_name, shape, n),
                                        onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type or 1))
        try:
            for node in g.node:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                values[node.output[0]] = np.asarray(
                    FOLDERS[node.op_type]([values[i] if i else None for i in node.input], attrs))
        except Exception as exc:  # noqa: BLE001 - a form the numpy ops do not cover: onnxruntime measures it
            log.debug("numpy probe gave up: %s", exc)
            return None
        runs.append({name: values[name] for name in names})
    shapes = {name: (runs[0][name].shape, runs[1][name].shape if len(runs) > 1 else None) for name in names}
    return shapes, {name: onnx.helper.np_dtype_to_tensor_dtype(runs[0][name].dtype) for name in names}


# onnxruntime profiler type names -> ONNX element types
_PROFILE_TYPES = {"float": onnx.TensorProto.FLOAT, "double": onnx.TensorProto.DOUBLE,
                  "float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16,
                  "int64": onnx.TensorProto.INT64, "int32": onnx.TensorProto.INT32, "int16": onnx.TensorProto.INT16,
                  "int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8, "uint16": onnx.TensorProto.UINT16,
                  "uint32": onnx.TensorProto.UINT32, "uint64": onnx.TensorProto.UINT64, "bool": onnx.TensorProto.BOOL}


def _profiled_shapes(proto, weights, input_name, shape, wanted: set):
    """{name: (shape at batch 1, at batch 2 or None)}, {name: elem type} of the wanted tensors the profile shows."""
    import json
    import tempfile

    from ..runtime import cpu_session

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.value_info[:]
    for out in probe.graph.output:
        if out.type.tensor_type.elem_type == 0:  # an UNDEFINED declared type makes onnxruntime refuse the model
            out.ClearField("type")
    outputs_of = {}
    for i, node in enumerate(probe.graph.node):  # unique names: the profile identifies nodes by name
        node.name = f"onnxcam_probe_{i}"
        outputs_of[node.name] = list(node.output)
    with tempfile.TemporaryDirectory() as folder:
        sess = cpu_session(probe.SerializeToString(), weights, lean=True,
                           profile=os.path.join(folder, "probe"))
        try:
            for n in _probe_batches(shape):
                sess.run(None, _probe_feed(sess, input_name, shape, n))
        except Exception as exc:
            raise _probe_failed(exc, input_name, shape, n, probe, proto) from exc
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    seen: dict[str, list] = {}
    dtypes = {}
    for e in sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                    key=lambda e: e.get("ts", 0)):
        outs = outputs_of.get(e["name"][:-len("_kernel_time")])
        found = e.get("args", {}).get("output_type_shape")
        if outs is None or found is None or len(found) != len(outs):
            continue
        for name, entry in zip(outs, found):
            if name in wanted and len(entry) == 1:
                (kind, dims), = entry.items()
                seen.setdefault(name, []).append(tuple(int(d) for d in dims))
                if kind in _PROFILE_TYPES:
                    dtypes[name] = _PROFILE_TYPES[kind]
    runs = len(_probe_batches(shape))
    shapes = {name: (got[0], got[1] if runs > 1 else None) for name, got in seen.items() if len(got) == runs}
    if _has_narrow_floats(proto):  # onnxruntime runs some fp16 ops in float32 (inserted casts): "float" may lie
        dtypes = {name: t for name, t in dtypes.items() if t != onnx.TensorProto.FLOAT}
    return shapes, {name: dtypes[name] for name in shapes if name in dtypes}


_NARROW_FLOATS = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _has_narrow_floats(proto: onnx.ModelProto) -> bool:
    g = proto.graph
    values = list(g.input) + list(g.output) + list(g.value_info)
    return (any(v.type.tensor_type.elem_type in _NARROW_FLOATS for v in values)
            or any(t.data_type in _NARROW_FLOATS for t in g.initializer)
            or any(a.name == "to" and a.i in _NARROW_FLOATS for n in g.node if n.op_type == "Cast" for a in n.attribute))


def _probe_batches(shape) -> tuple:
    return (1,) if isinstance(shape[0], int) else (1, 2)


def _probe_feed(sess, input_name, shape, n: int) -> dict:
    """Random inputs: `shape` with batch n for the model input and for the activations a probe starts from
    (_part_computing), ones for the free dims of any other input."""
    rng = np.random.default_rng(0)
    feed = {}
    for inp in sess.get_inputs():
        dims = _probe_dims(inp.shape, inp.name == input_name, shape, n)
        feed[inp.name] = rng.standard_normal(dims).astype(_np_type(inp.type))
    return feed


def _probe_dims(declared, model_input: bool, shape, n: int) -> list:
    """A probe input's dims at batch n: the model input's pinned shape, or another input's declared dims with the
    batch symbol at n and any other free dim at 1."""
    if model_input:
        return [n if i == 0 and not isinstance(d, int) else d for i, d in enumerate(shape)]
    return [d if isinstance(d, int) else n if d == shape[0] else 1 for d in declared]


def _probe_chunk(proto, weights, input_name, shape, names):
    from ..runtime import cpu_session  # local: graph analysis otherwise needs no runtime

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    for name in names:
        probe.graph.output.add().name = name
    del probe.graph.value_info[:]  # the probe measures; half-inferred shapes must not constrain it
    sess = cpu_session(probe.SerializeToString(), weights, lean=True)
    results, dtypes = [], {}
    for n in _probe_batches(shape):
        try:
            outs = sess.run(names, _probe_feed(sess, input_name, shape, n))
        except Exception as exc:
            raise _probe_failed(exc, input_name, shape, n, probe, proto) from exc
        results.append([o.shape for o in outs])
        dtypes.update({name: onnx.helper.np_dtype_to_tensor_dtype(o.dtype) for name, o in zip(names, outs)})
    second = results[1] if len(results) > 1 else [None] * len(names)
    shapes = {name: (tuple(a), None if b is None else tuple(b)) for name, a, b in zip(names, results[0], second)}
    return shapes, dtypes


def _probe_failed(exc: Exception, input_name: str, shape: tuple, n: int, probe: onnx.ModelProto,
                  original: onnx.ModelProto) -> ModelError:
    """The one line that says at which input size the model fails, in which node (by its own name), and why."""
    dims = tuple(_probe_dims(shape, True, shape, n))
    renamed = {p.name: o.name for p, o in zip(probe.graph.node, original.graph.node)}
    return ModelError(f"the model fails at input {input_name!r} shape {dims}: {runtime_failure(exc, renamed)}")


def _np_type(ort_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
            "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
            "tensor(int8)": np.int8, "tensor(bool)": np.bool_}.get(ort_type, np.float32)
