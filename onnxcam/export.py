"""Export an explanation as a model: the explainable model plus the CAM method's arithmetic, in standard ONNX ops.

The exported model keeps the original inputs and outputs and adds the outputs `cam` (N, H, W) in [0, 1] at the
input's resolution ((N, S, H, W) with top_k = S), `cam_class` (N,) or (N, S) int64, the explained classes, and
`cam_raw`, the raw low-resolution map before ReLU and scaling ((N, h, w) / (N, S, h, w); `cam_raw_<i>` per
target layer when there are several). By default it explains each sample's top class (its S best with top_k),
ranked in the graph with TopK. Choosing the classes takes an input, and ONNX has no input that a caller may
omit in every runtime (an initializer-backed default is ignored by onnxruntime-node and onnxruntime-web, which
feed only declared inputs), so that is a second variant, class_input=True: a required input `cam_target`
(N, S) int64 whose negative entries take the class ranked there (-1 in column j: the (j+1)-th best class).

The maps are pytorch-grad-cam's post-processing, as onnxcam's Python path does it (cam/postprocess.py): per layer
ReLU, per-image min-max scaling (1e-7 added to the max), bilinear resize, then ReLU, the mean over layers and the
same scaling again. The resize is ONNX Resize in "linear" mode with "half_pixel" coordinates, which is cv2's
INTER_LINEAR (no antialiasing) at every size, down-scaling included (tests/test_export.py checks it against cv2).
Methods whose maps need a decomposition that ONNX has no op for (Eigen-CAM's SVD, KPCA) are refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import rewrite
from .errors import InputError, ModelError

log = logging.getLogger(__name__)

TARGET = "cam_target"
CAM = "cam"
CAM_CLASS = "cam_class"
RAW = "cam_raw"
_PREFIX = "onnxcam_export/"


class _Ops:
    """Appends ONNX nodes under generated names; reductions written for the model's opset."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{_PREFIX}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self._name(op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self._name(op_type), **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        name = self._name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def reduce(self, kind: str, x: str, axes: list[int], keepdims: bool) -> str:
        """ReduceSum takes its axes as an input from opset 13, the other reductions from opset 18."""
        as_input = self.opset >= (13 if kind == "Sum" else 18)
        if as_input:
            return self.op(f"Reduce{kind}", x, self.const(axes, np.int64), keepdims=int(keepdims))
        return self.op(f"Reduce{kind}", x, axes=axes, keepdims=int(keepdims))


# ---- the methods, on A (N, 1, C, h, w) and G (N, S, C, h, w): channel axis 2, space (3, 4) ---------------------
_C, _SPACE = [2], [3, 4]


def _weighted(o: _Ops, weights: str, a: str) -> str:
    return o.reduce("Sum", o.op("Mul", weights, a), _C, False)


def _gradcam(o: _Ops, a: str, g: str) -> str:
    return _weighted(o, o.reduce("Mean", g, _SPACE, True), a)


def _counterfactual(o: _Ops, a: str, g: str) -> str:
    return _gradcam(o, a, o.op("Neg", g))


def _hirescam(o: _Ops, a: str, g: str) -> str:
    return o.reduce("Sum", o.op("Mul", g, a), _C, False)


def _elementwise(o: _Ops, a: str, g: str) -> str:
    return o.reduce("Sum", o.op("Relu", o.op("Mul", g, a)), _C, False)


def _layercam(o: _Ops, a: str, g: str) -> str:
    return o.reduce("Sum", o.op("Mul", o.op("Relu", g), a), _C, False)


def _gradcam_plusplus(o: _Ops, a: str, g: str) -> str:
    """methods.gradcam_plusplus, in its order of operations (float32 rounding matches it)."""
    g2 = o.op("Mul", g, g)
    g3 = o.op("Mul", g2, g)
    sum_a = o.reduce("Sum", a, _SPACE, True)
    denominator = o.op("Add", o.op("Add", o.op("Mul", o.const(2.0), g2), o.op("Mul", sum_a, g3)), o.const(1e-6))
    alpha = o.op("Where", o.op("Equal", g, o.const(0.0)), o.const(0.0), o.op("Div", g2, denominator))
    return _weighted(o, o.reduce("Sum", o.op("Mul", o.op("Relu", g), alpha), _SPACE, True), a)


def _xgradcam(o: _Ops, a: str, g: str) -> str:
    sum_a = o.op("Add", o.reduce("Sum", a, _SPACE, True), o.const(1e-7))
    return _weighted(o, o.reduce("Sum", o.op("Div", o.op("Mul", g, a), sum_a), _SPACE, True), a)


EXPORTABLE: dict[str, Callable] = {
    "gradcam": _gradcam,
    "hirescam": _hirescam,
    "gradcam_elementwise": _elementwise,
    "gradcam++": _gradcam_plusplus,
    "xgradcam": _xgradcam,
    "layercam": _layercam,
    "counterfactual_gradcam": _counterfactual,
}
_ALIASES = {"gradcampp": "gradcam++"}


# ---- post-processing --------------------------------------------------------------------------------------------
def _scaled(o: _Ops, x: str) -> str:
    """Per image: subtract the min, divide by 1e-7 + the max (postprocess._scale_in_place), over the last 2 axes."""
    shifted = o.op("Sub", x, o.reduce("Min", x, [-2, -1], True))
    return o.op("Div", shifted, o.op("Add", o.const(1e-7), o.reduce("Max", shifted, [-2, -1], True)))


def _resized(o: _Ops, x: str, height: int, width: int) -> str:
    """(N, S, h, w) -> (N, S, H, W) as cv2.resize INTER_LINEAR: Resize linear with half_pixel coordinates."""
    sizes = o.op("Concat", o.op("Slice", o.op("Shape", x), o.const([0], np.int64), o.const([2], np.int64)),
                 o.const([height, width], np.int64), axis=0)
    empty = o.const(np.zeros(0, np.float32)) if o.opset < 13 else ""  # roi, scales: required inputs before 13
    return o.op("Resize", x, empty, empty, sizes, mode="linear", coordinate_transformation_mode="half_pixel")


def _aggregated(o: _Ops, per_layer: list[str]) -> str:
    """postprocess.aggregate_layers: ReLU, the mean over layers, scaled again (one layer: just scaled again, since
    its ReLU is the identity and the mean of one map is that map)."""
    if len(per_layer) == 1:
        return _scaled(o, per_layer[0])
    stacked = o.op("Concat", *[o.op("Unsqueeze", m, o.const([1], np.int64)) if o.opset >= 13
                               else o.op("Unsqueeze", m, axes=[1]) for m in per_layer], axis=1)
    return _scaled(o, o.reduce("Mean", o.op("Relu", stacked), [1], False))


# ---- the export ---------------------------------------------------------------------------------------------------
def exportable_method(method: str) -> str:
    """The canonical name of an exportable method; InputError naming those that can be exported otherwise."""
    name = _ALIASES.get(method, method)
    if name not in EXPORTABLE:
        raise InputError(f"method {method!r} cannot be exported as an ONNX graph (Eigen-CAM's SVD, KPCA and the "
                         f"guided, input-space and perturbation methods have no graph form here); exportable: "
                         f"{', '.join(EXPORTABLE)}")
    return name


def export(model, method: str | None = None, layers=None, *, top_k: int | None = None,
           size: tuple[int, int] | None = None, class_input: bool = False, path=None,
           **options) -> onnx.ModelProto:
    """The model with its explanation in the graph (module docstring); saved to `path` when given.

    model: a path, bytes, ModelProto, an Explainer (its layers), or a CAM object (its method, layers, layouts).
    method: an exportable method name (EXPORTABLE; default gradcam, or the CAM object's own).
    layers: target layer names (None: the automatic choice); not with an Explainer or a CAM object.
    top_k: explain S = top_k classes per sample in one run; `cam` is then (N, S, H, W).
    size: (H, W) to build for, needed when the model's spatial size is dynamic (the export then takes that size).
    class_input: add the input `cam_target` (N, S) int64 of classes to explain (negative: the ranked class).
    options: as for the CAM classes (score=, output=, channels_last=, base_dir=).
    """
    from .cam.base import BaseCAM

    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1):
        raise InputError(f"top_k must be a positive int, not {top_k!r}")
    obj, method = _method_object(model, method, layers, size, options)
    if not isinstance(obj, BaseCAM):
        raise InputError(f"method {method!r} cannot be exported")
    if obj.reshape_transform is not None:
        raise InputError("a reshape_transform is a Python function: it cannot be exported into the graph")
    ex = obj.explainer
    shape = ex._sized(_build_shape(ex, size))
    compiled = ex._compiled(shape, top_k or 1, True)  # the by-class graph with S seeds (as Explainer.run builds it)
    rw = compiled.rewritten
    if not rw.by_class:
        raise ModelError(f"the score {rw.score!r} is {tuple(rw.score_shape)}, not (N, classes): export explains "
                         "classes of a 2-D score")
    from .graph.load import with_weights

    proto = with_weights(rw.model, ex.weights)
    opset = _onnx_opset(proto)
    if opset < 11:
        raise ModelError(f"the model has opset {opset}: the exported resize needs Resize's half_pixel mode "
                         "(opset 11 or later); convert the model with onnx.version_converter first")
    dummy = np.broadcast_to(np.float32(0), (1, *shape[1:]))  # for the layout guesses, which read only the shape
    out = _append_cam(proto, rw, compiled.dequantize, obj, method, dummy, top_k, class_input)
    if path is not None:
        onnx.save(out, str(path))
        log.info("wrote %s (%s, layers %s)", path, method, ", ".join(rw.layers))
    return out


def _method_object(model, method, layers, size, options):
    """The CAM object to export, and its method name."""
    from .cam.api import CLASSES, method_object
    from .cam.base import BaseCAM
    from .explainer import Explainer

    if isinstance(model, BaseCAM):
        found = [name for name, cls in CLASSES.items() if type(model) is cls and name not in _ALIASES]
        given = method if method is not None else (found[0] if found else type(model).__name__)
        if method is not None and exportable_method(method) not in found or layers is not None or options:
            raise InputError("a CAM object is exported with its own method, layers and options")
        return model, exportable_method(given)
    method = exportable_method(method or "gradcam")
    if isinstance(model, Explainer):
        if layers is not None:
            raise InputError("an Explainer is exported with its own layers")
        return method_object(model, method, None, **options), method
    if size is not None:
        options.setdefault("input_shape", _shape_with_size(model, size, options.get("base_dir")))
    return method_object(model, method, layers, device="cpu", **options), method


def _shape_with_size(model, size, base_dir) -> tuple:
    """(1, C, H, W) or (1, H, W, C): the model's declared input shape at spatial size `size` (H, W)."""
    from .graph.load import load_model

    proto = load_model(model, base_dir)
    init = {t.name for t in proto.graph.initializer}
    inp = next((i for i in proto.graph.input if i.name not in init), None)
    dims = [] if inp is None else [d.dim_value if d.HasField("dim_value") else None
                                   for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise InputError(f"the model's input has shape {dims}; a size (H, W) applies to a 4-D image input")
    height, width = (int(s) for s in size)
    if dims[1] is not None and dims[1] <= 4:
        return 1, dims[1], height, width
    if dims[3] is not None and dims[3] <= 4:
        return 1, height, width, dims[3]
    raise InputError(f"cannot tell the channel axis of the input shape {dims}: give input_shape= instead of a size")


def _build_shape(ex, size) -> tuple | None:
    """The input shape to build for: None for the model's own static one (a different size given is an error) or
    the last run's; the declared shape at `size` for a dynamic-size model."""
    built = ex._analysis.build_shape
    if built is None:
        if size is not None:
            return _shape_with_size(ex.proto, size, None)
        if ex._last_shape is None:
            raise InputError(f"input {ex.input_name!r} has a dynamic size: give the size (H, W) to export for")
        return None
    if size is None:
        return None
    spatial = tuple(built[1:3]) if built[3] <= 4 < built[1] else tuple(built[2:4])
    if spatial != tuple(size):
        raise InputError(f"input {ex.input_name!r} is fixed at {spatial[0]}x{spatial[1]}; size {tuple(size)} "
                         "does not apply")
    return None


def _onnx_opset(proto: onnx.ModelProto) -> int:
    return next((imp.version for imp in proto.opset_import if imp.domain in ("", "ai.onnx")), 1)


def _append_cam(proto: onnx.ModelProto, rw: rewrite.Rewritten, dequantize: dict, obj, method: str,
                x: np.ndarray, top_k: int | None, class_input: bool) -> onnx.ModelProto:
    """Replace the seed inputs by `cam_target`, append the method and post-processing, keep only the original
    outputs and the CAM ones."""
    graph = proto.graph
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    clash = [name for name in (TARGET, CAM, CAM_CLASS, RAW) if name in taken]
    if clash:
        raise ModelError(f"the model already has a tensor named {clash[0]!r}, a name the export adds")
    o = _Ops(_onnx_opset(proto))
    s = top_k or 1
    if class_input:  # negative entries take the class ranked there (the in-graph TopK)
        given = o.op("Expand", TARGET, o.op("Shape", rewrite.TOP_CLASSES))  # (1, S) broadcasts to the batch
        o.op("Where", o.op("Less", given, o.const(0, np.int64)), rewrite.TOP_CLASSES, given, out=rewrite.CLASSES)
    else:
        o.op("Identity", rewrite.TOP_CLASSES, out=rewrite.CLASSES)
    o.op("Constant", out=rewrite.RANKED, value=numpy_helper.from_array(np.array(False), rewrite.RANKED))
    class_nodes, o.nodes = o.nodes, []
    height, width = (int(v) for v in reversed(obj.target_size(x)))
    raws, resized, raw_sizes = [], [], []
    for layer in rw.layers:
        a, g, raw_size = _layer_tensors(o, rw, layer, dequantize.get(layer), obj, x, s)
        raw_sizes.append(raw_size)
        raw = EXPORTABLE[method](o, a, g)  # (N, S, h, w)
        raws.append(raw)
        resized.append(_resized(o, _scaled(o, o.op("Relu", raw)), height, width))
    maps = _aggregated(o, resized)
    single = top_k is None
    squeeze = (lambda t, out: o.op("Squeeze", t, o.const([1], np.int64), out=out) if o.opset >= 13
               else o.op("Squeeze", t, axes=[1], out=out))
    raw_names = [RAW] if len(raws) == 1 else [f"{RAW}_{i}" for i in range(len(raws))]
    for name, t in ((CAM, maps), (CAM_CLASS, rewrite.CLASSES), *zip(raw_names, raws)):
        squeeze(t, name) if single else o.op("Identity", t, out=name)
    _splice(graph, class_nodes, o, rw)
    batch = _batch_dim(graph, rw.input_name)
    lead = [batch] if single else [batch, s]
    descriptions = {
        CAM: f"{method} map{'s' if len(rw.layers) > 1 else ''} of {', '.join(rw.layers)} at the input's size, "
             "in [0, 1] (ReLU, per-image min-max scaling, bilinear resize as cv2 INTER_LINEAR)",
        CAM_CLASS: "the explained class of each map",
        **{name: f"the raw {method} map of layer {layer!r} before ReLU and scaling"
           for name, layer in zip(raw_names, rw.layers)},
    }
    outputs = [helper.make_tensor_value_info(CAM, TensorProto.FLOAT, [*lead, height, width], descriptions[CAM]),
               helper.make_tensor_value_info(CAM_CLASS, TensorProto.INT64, lead, descriptions[CAM_CLASS])]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, [*lead, *raw_size], descriptions[name])
                for name, raw_size in zip(raw_names, raw_sizes)]
    target_doc = (f"(N, {s}) classes to explain (or (1, {s}) for every sample); a negative entry takes the class "
                  f"ranked there: -1 everywhere explains {'each sample`s top class' if single else f'its {s} best'}")
    keep = [out for out in graph.output if out.name in rw.original_outputs]
    del graph.output[:]
    graph.output.extend(keep + outputs)
    inputs = [i for i in graph.input if i.name not in (rewrite.CLASSES, rewrite.RANKED)]
    del graph.input[:]
    if class_input:
        inputs.append(helper.make_tensor_value_info(TARGET, TensorProto.INT64, [None, s], target_doc))
    graph.input.extend(inputs)
    _describe(proto, rw, method, descriptions, {TARGET: target_doc} if class_input else {}, top_k)
    return proto


def _layer_tensors(o: _Ops, rw: rewrite.Rewritten, layer: str, quantization, obj, x, s: int) -> tuple:
    """A layer's activation as (N, 1, C, h, w) and its gradients as (N, S, C, h, w), float32, real-valued;
    and (h, w)."""
    a, g = rw.act_outputs[layer], rewrite.grad_name(layer)
    shape = _output_shape(rw.model, a)
    if shape is None or len(shape) != 4:
        raise ModelError(f"layer {layer!r} has shape {shape}; the export needs a 4-D activation of static shape")
    a = o.op("Cast", a, to=TensorProto.FLOAT)
    if quantization is not None:  # integer layers stand for (q - zero point) * scale (Explainer._run_one)
        scale, zero = quantization
        a = o.op("Mul", o.op("Sub", a, o.const(zero)), o.const(scale))
        g = o.op("Div", g, o.const(scale))
    channels_last = obj._channels_last(tuple(shape), x)
    unsqueeze = (lambda t: o.op("Unsqueeze", t, o.const([1], np.int64)) if o.opset >= 13
                 else o.op("Unsqueeze", t, axes=[1]))
    a = unsqueeze(a)
    if s == 1:
        g = unsqueeze(g)  # the graph leaves out the seed axis when there is one seed
    if channels_last:
        a, g = (o.op("Transpose", t, perm=[0, 1, 4, 2, 3]) for t in (a, g))
    return a, g, tuple(shape[1:3] if channels_last else shape[2:4])


def _output_shape(model: onnx.ModelProto, name: str) -> list | None:
    for vi in (*model.graph.output, *model.graph.value_info):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return None


def _splice(graph: onnx.GraphProto, class_nodes: list, o: _Ops, rw: rewrite.Rewritten) -> None:
    """Insert the class nodes right after the TopK that ranks the classes (they feed the gradient), and the
    CAM nodes at the end."""
    nodes = list(graph.node)
    at = next(i for i, n in enumerate(nodes) if rewrite.TOP_CLASSES in n.output) + 1
    del graph.node[:]
    graph.node.extend(nodes[:at] + class_nodes + nodes[at:] + o.nodes)
    graph.initializer.extend(o.initializers)


def _batch_dim(graph: onnx.GraphProto, input_name: str):
    dim = next(i for i in graph.input if i.name == input_name).type.tensor_type.shape.dim
    if dim and dim[0].HasField("dim_value"):
        return dim[0].dim_value
    return dim[0].dim_param if dim and dim[0].dim_param else "N"


def _describe(proto: onnx.ModelProto, rw: rewrite.Rewritten, method: str, outputs: dict, inputs: dict,
              top_k: int | None) -> None:
    from . import __version__

    entries = {
        "onnxcam.version": __version__,
        "onnxcam.method": method,
        "onnxcam.layers": json.dumps(rw.layers),
        "onnxcam.score": rw.score,
        "onnxcam.top_k": str(top_k or 1),
        "onnxcam.outputs": json.dumps(outputs),
        "onnxcam.inputs": json.dumps(inputs),
    }
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
