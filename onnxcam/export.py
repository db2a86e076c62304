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
same scaling again. The resize is cv2's INTER_LINEAR (no antialiasing, half-pixel centres) at every size,
down-scaling included, as two MatMuls with its per-axis weights (tests/test_export.py checks it against cv2).
The graph is kept lean, since it runs on every inference: weighted channel sums are one MatMul, shapes are
static where the layer's are, the ranked-classes choice is fixed at export, a single layer's final scaling is
done on the small map before its resize (so only the resize writes a full-size tensor: `cam`), and what no
output needs is dropped.
Methods whose maps need a decomposition that ONNX has no op for (Eigen-CAM's SVD, KPCA) are refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import rewrite
from .errors import InputError, InternalError, ModelError

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

    def unsqueeze(self, x: str, axis: int) -> str:
        """Unsqueeze takes its axes as an input from opset 13."""
        if self.opset >= 13:
            return self.op("Unsqueeze", x, self.const([axis], np.int64))
        return self.op("Unsqueeze", x, axes=[axis])

    def rename(self, tensor: str, name: str) -> str:
        """Give a tensor a chosen name (a graph output): written by the last node (which nothing reads yet), it is
        renamed there, with no Identity to copy it; else an Identity."""
        if self.nodes and list(self.nodes[-1].output) == [tensor]:
            self.nodes[-1].output[0] = name
            return name
        return self.op("Identity", tensor, out=name)

    def reduce(self, kind: str, x: str, axes: list[int], keepdims: bool) -> str:
        """ReduceSum takes its axes as an input from opset 13, the other reductions from opset 18."""
        as_input = self.opset >= (13 if kind == "Sum" else 18)
        if as_input:
            return self.op(f"Reduce{kind}", x, self.const(axes, np.int64), keepdims=int(keepdims))
        return self.op(f"Reduce{kind}", x, axes=axes, keepdims=int(keepdims))


# ---- the methods, on one layer's tensors in its own layout (_Layer) ---------------------------------------------
@dataclass
class _Layer:
    """A target layer's float32 activation `a`, (N, C, h, w) or channels-last (N, h, w, C), and its gradients `g`
    in the same layout with the seed axis S at 1 when s > 1 (the rewritten graph leaves it out for one seed).

    Each method works in this layout, along the axes named here, and ends in the raw map (N, h, w) or (N, S, h, w)
    without a Squeeze or Transpose of a full-size tensor. pooled: ([p per seed], c) when each seed's gradient is
    p * c with p of spatial size 1 x 1 and c a scalar constant (the gradient of a global average pool), whose
    spatial mean is then p * c itself (_pooled_gradient)."""

    a: str
    g: str
    channels: int
    size: tuple[int, int]
    s: int
    channels_last: bool
    pooled: tuple[list[str], float] | None = None
    _a_by_seed: str | None = field(default=None, init=False, repr=False)

    @property
    def channel_axis(self) -> int:
        return (3 if self.channels_last else 1) + (self.s > 1)

    @property
    def space(self) -> list[int]:
        first = (1 if self.channels_last else 2) + (self.s > 1)
        return [first, first + 1]

    def a_by_seed(self, o: _Ops) -> str:
        """a with a seed axis of size 1 where g has one (s > 1), to broadcast against g."""
        if self.s == 1:
            return self.a
        if self._a_by_seed is None:
            self._a_by_seed = o.unsqueeze(self.a, 1)
        return self._a_by_seed


def _weighted(o: _Ops, layer: _Layer, weights: str) -> str:
    """sum_c w_c A_c as one MatMul per sample, (N, S, C) @ (N, C, h w): no (N, S, C, h, w) product to reduce."""
    (h, w), c, s = layer.size, layer.channels, layer.s
    if layer.channels_last:  # (N, h w, C) @ (N, C, S), then (N, S, h w)
        flat = o.op("Reshape", layer.a, o.const([0, h * w, c], np.int64))
        raw = o.op("MatMul", flat, o.op("Transpose", weights, perm=[0, 2, 1]))
        raw = raw if s == 1 else o.op("Transpose", raw, perm=[0, 2, 1])  # (N, h w, 1) is (N, 1, h w) in memory
    else:
        raw = o.op("MatMul", weights, o.op("Reshape", layer.a, o.const([0, c, h * w], np.int64)))
    return o.op("Reshape", raw, o.const([0, h, w] if s == 1 else [0, s, h, w], np.int64))


def _per_seed(o: _Ops, layer: _Layer, weights: str) -> str:
    """Channel weights as (N, S, C): with one seed, from (N, C) or any N * C values in that order (as (N, C, 1, 1));
    with several, they are (N, S, C) already."""
    return weights if layer.s > 1 else o.op("Reshape", weights, o.const([0, 1, layer.channels], np.int64))


def _channel_sum(o: _Ops, layer: _Layer, x: str) -> str:
    return o.reduce("Sum", x, [layer.channel_axis], False)


def _grad_mean(o: _Ops, layer: _Layer) -> str:
    """The gradients' spatial mean per channel, (N, S, C)."""
    if layer.pooled is not None:
        seeds, scale = layer.pooled
        stacked = seeds[0] if len(seeds) == 1 else o.op("Concat", *seeds, axis=1)  # (N, S C, 1, 1) / (N, S, 1, C)
        # Reshaped first: onnxruntime's Mul of a scalar and an (N, C, 1, 1) tensor takes a slow path (~10 ns per
        # element, 20x its speed on (N, 1, C)). The scale is a (1, 1, C) vector, not a scalar, which onnxruntime
        # would fuse into the MatMul as a FusedMatMul: twice as slow as MatMul on these shapes.
        weights = o.op("Reshape", stacked, o.const([0, layer.s, layer.channels], np.int64))
        return o.op("Mul", weights, o.const(np.full((1, 1, layer.channels), scale)))
    return _per_seed(o, layer, o.reduce("Mean", layer.g, layer.space, False))


def _gradcam(o: _Ops, layer: _Layer) -> str:
    return _weighted(o, layer, _grad_mean(o, layer))


def _counterfactual(o: _Ops, layer: _Layer) -> str:
    return _weighted(o, layer, o.op("Neg", _grad_mean(o, layer)))  # mean(-g) = -mean(g), exactly


def _hirescam(o: _Ops, layer: _Layer) -> str:
    return _channel_sum(o, layer, o.op("Mul", layer.g, layer.a_by_seed(o)))


def _elementwise(o: _Ops, layer: _Layer) -> str:
    return _channel_sum(o, layer, o.op("Relu", o.op("Mul", layer.g, layer.a_by_seed(o))))


def _layercam(o: _Ops, layer: _Layer) -> str:
    return _channel_sum(o, layer, o.op("Mul", o.op("Relu", layer.g), layer.a_by_seed(o)))


def _gradcam_plusplus(o: _Ops, layer: _Layer) -> str:
    """methods.gradcam_plusplus, in its order of operations (float32 rounding matches it)."""
    g, a = layer.g, layer.a_by_seed(o)
    g2 = o.op("Mul", g, g)
    g3 = o.op("Mul", g2, g)
    sum_a = o.reduce("Sum", a, layer.space, True)
    denominator = o.op("Add", o.op("Add", o.op("Mul", o.const(2.0), g2), o.op("Mul", sum_a, g3)), o.const(1e-6))
    alpha = o.op("Where", o.op("Equal", g, o.const(0.0)), o.const(0.0), o.op("Div", g2, denominator))
    weights = o.reduce("Sum", o.op("Mul", o.op("Relu", g), alpha), layer.space, False)
    return _weighted(o, layer, _per_seed(o, layer, weights))


def _xgradcam(o: _Ops, layer: _Layer) -> str:
    a = layer.a_by_seed(o)
    sum_a = o.op("Add", o.reduce("Sum", a, layer.space, True), o.const(1e-7))
    weights = o.reduce("Sum", o.op("Div", o.op("Mul", layer.g, a), sum_a), layer.space, False)
    return _weighted(o, layer, _per_seed(o, layer, weights))


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


# ---- post-processing, on (N, h, w) maps or (N, S, h, w) ----------------------------------------------------------
def _scaled(o: _Ops, x: str, out: str | None = None, extremes: str | None = None) -> str:
    """Per image: subtract the min, divide by 1e-7 + the max (postprocess._scale_in_place), over the last 2 axes.
    extremes: a tensor whose min and max per image are x's, to take them from instead (_scaled_before_resize)."""
    low = o.reduce("Min", extremes or x, [-2, -1], True)
    shifted = o.op("Sub", x, low)
    high = o.reduce("Max", shifted if extremes is None else o.op("Sub", extremes, low), [-2, -1], True)
    return o.op("Div", shifted, o.op("Add", o.const(1e-7), high), out=out)


def _scaled_before_resize(o: _Ops, x: str, source: tuple[int, int], size: tuple[int, int]) -> str:
    """x scaled so that its resize is the resize of x scaled at full size: _scaled(_resized(x)) without four
    passes over the (N, H, W) map and two full-size temporaries (equal to float32 rounding). The resize is linear
    with each output pixel's weights summing to 1, so it commutes with subtracting and dividing by per-image
    scalars; and the resized map's min and max lie on a few of its rows and columns (_bounding_rows), a grid of at
    most 2h x 2w pixels that two small MatMuls give."""
    grid = x
    if source[1] != size[1]:
        columns = _linear_weights(source[1], size[1])
        grid = o.op("MatMul", grid, o.const(columns[_bounding_rows(columns)].T))
    if source[0] != size[0]:
        rows = _linear_weights(source[0], size[0])
        grid = o.op("MatMul", o.const(rows[_bounding_rows(rows)]), grid)
    return _scaled(o, x, extremes=grid)


def _bounding_rows(weights: np.ndarray) -> np.ndarray:
    """The rows of a (size, source) linear-resize weight matrix whose outputs bound all its outputs, for any input.

    Each row mixes two neighbouring source pixels k and k + 1 (or takes one): the rows whose first pixel is k lie
    on the segment from pixel k to pixel k + 1, in the order of their weight on k, and a value linear along a
    segment is extreme at its ends; so each run's rows of most and least weight on k bound the others."""
    first = np.argmax(weights != 0, axis=1)
    beyond = weights.copy()
    beyond[np.arange(len(weights)), first] = 0
    beyond[np.arange(len(weights)), np.minimum(first + 1, weights.shape[1] - 1)] = 0
    if beyond.any():
        raise InternalError("each output pixel of a linear resize mixes at most two neighbouring source pixels")
    keep = set()
    for k in np.unique(first):
        run = np.flatnonzero(first == k)
        keep.update((int(run[np.argmax(weights[run, k])]), int(run[np.argmin(weights[run, k])])))
    return np.array(sorted(keep))


def _resized(o: _Ops, x: str, source: tuple[int, int], size: tuple[int, int]) -> str:
    """(..., h, w) -> (..., H, W) as cv2.resize INTER_LINEAR, the way image.resize_maps does it: it is separable,
    so a product with each axis' (size, source) weight matrix, columns first. Two small MatMuls cost less than
    Resize and need no run-time sizes (Shape, Slice, Concat); equal to Resize linear half_pixel and to cv2 to
    float32 rounding (tests/test_export.py checks against cv2 at sizes up and down)."""
    if source[1] != size[1]:
        x = o.op("MatMul", x, o.const(_linear_weights(source[1], size[1]).T))
    if source[0] != size[0]:
        x = o.op("MatMul", o.const(_linear_weights(source[0], size[0])), x)
    return x


def _linear_weights(source: int, size: int) -> np.ndarray:
    """(size, source): the weights of cv2's INTER_LINEAR (half-pixel centres, clamped at the borders, no
    antialiasing; its exact halving, done as INTER_AREA, has the same weights) for each output pixel."""
    centre = (np.arange(size) + 0.5) * (source / size) - 0.5
    left = np.floor(centre)
    frac = centre - left
    left = left.astype(np.int64)
    frac[left < 0] = 0.0
    left[left < 0] = 0
    last = left >= source - 1
    frac[last], left[last] = 0.0, source - 1
    weights = np.zeros((size, source), np.float64)
    rows = np.arange(size)
    np.add.at(weights, (rows, left), 1.0 - frac)
    np.add.at(weights, (rows, np.minimum(left + 1, source - 1)), frac)
    return weights.astype(np.float32)


def _aggregated(o: _Ops, per_layer: list[str], sources: list[tuple[int, int]], size: tuple[int, int],
                out: str) -> str:
    """The layers' scaled maps resized, then postprocess.aggregate_layers: ReLU, the mean over layers, scaled again.
    One layer is just scaled again (its ReLU is the identity and the mean of one map is that map), before its
    resize (_scaled_before_resize): the resize is then the last node, and the only one of full size."""
    if len(per_layer) == 1:
        return o.rename(_resized(o, _scaled_before_resize(o, per_layer[0], sources[0], size), sources[0], size), out)
    per_layer = [_resized(o, m, source, size) for m, source in zip(per_layer, sources)]
    stacked = o.op("Concat", *[o.unsqueeze(m, 1) for m in per_layer], axis=1)
    return _scaled(o, o.reduce("Mean", o.op("Relu", stacked), [1], False), out)


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
    shape = ex.resolved_input_shape(_build_shape(ex, size))
    compiled = ex.compiled(shape, top_k or 1, True)  # the by-class graph with S seeds (as Explainer.run builds it)
    rw = compiled.rewritten
    if not rw.by_class:
        raise ModelError(f"the score {rw.score!r} is {tuple(rw.score_shape)}, not (N, classes): export explains "
                         "classes of a 2-D score")
    from .graph.load import with_weights

    proto = with_weights(rw.model, ex.weights)
    opset = _onnx_opset(proto)
    if opset < 11:
        raise ModelError(f"the model has opset {opset}: the exported maps need opset 11 or later (Equal on floats, "
                         "TopK's k as an input); convert the model with onnx.version_converter first")
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
    from .graph.inputs import model_inputs
    from .graph.load import load_model

    proto = load_model(model, base_dir)
    inp = next(iter(model_inputs(proto)), None)
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
    built = ex.analysis.build_shape
    if built is None:
        if size is not None:
            return _shape_with_size(ex.proto, size, None)
        if ex.last_input_shape is None:
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
    """Replace the seed inputs by `cam_target` (or by the ranked classes), append the method and post-processing,
    keep only the original outputs and the CAM ones, and drop what no output needs."""
    graph = proto.graph
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    clash = [name for name in (TARGET, CAM, CAM_CLASS, RAW) if name in taken]
    if clash:
        raise ModelError(f"the model already has a tensor named {clash[0]!r}, a name the export adds")
    o = _Ops(_onnx_opset(proto))
    s = top_k or 1
    single = top_k is None
    if class_input:  # negative entries take the class ranked there (the in-graph TopK)
        given = o.op("Expand", TARGET, o.op("Shape", rewrite.TOP_CLASSES))  # (1, S) broadcasts to the batch
        o.op("Where", o.op("Less", given, o.const(0, np.int64)), rewrite.TOP_CLASSES, given, out=rewrite.CLASSES)
    class_nodes, o.nodes = o.nodes, []
    height, width = (int(v) for v in reversed(obj.target_size(x)))
    raw_names = [RAW] if len(rw.layers) == 1 else [f"{RAW}_{i}" for i in range(len(rw.layers))]
    scaled, raw_sizes = [], []
    shapes = _inferred_shapes(rw.model) if method in _POOLED_METHODS else {}
    for layer, raw_name in zip(rw.layers, raw_names):
        tensors = _layer_tensors(o, rw, layer, dequantize.get(layer), obj, x, s, shapes)
        raw_sizes.append(tensors.size)
        raw = o.rename(EXPORTABLE[method](o, tensors), raw_name)  # (N, h, w) or (N, S, h, w)
        scaled.append(_scaled(o, o.op("Relu", raw)))
    _aggregated(o, scaled, raw_sizes, (height, width), CAM)
    classes = rewrite.CLASSES if class_input else rewrite.TOP_CLASSES
    if single:
        o.op("Squeeze", classes, o.const([1], np.int64), out=CAM_CLASS) if o.opset >= 13 \
            else o.op("Squeeze", classes, axes=[1], out=CAM_CLASS)
    else:
        o.op("Identity", classes, out=CAM_CLASS)
    _splice(graph, class_nodes, o, classes)
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
    _prune(graph)
    _describe(proto, rw, method, descriptions, {TARGET: target_doc} if class_input else {}, top_k)
    return proto


# the methods that read the gradients only through their spatial mean (_grad_mean)
_POOLED_METHODS = {"gradcam", "counterfactual_gradcam"}


def _layer_tensors(o: _Ops, rw: rewrite.Rewritten, layer: str, quantization, obj, x, s: int,
                   shapes: dict) -> _Layer:
    """A layer's activation and gradients as float32 real values in their own layout (_Layer)."""
    a, g = rw.act_outputs[layer], rewrite.grad_name(layer)
    shape = _output_shape(rw.model, a)
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise ModelError(f"layer {layer!r} has shape {shape}; the export needs a 4-D activation of static shape")
    channels_last = obj._channels_last(tuple(shape), x)
    pooled = None if quantization is not None or not shapes else _pooled_gradient(rw.model, g, channels_last, s, shapes)
    a = o.op("Cast", a, to=TensorProto.FLOAT)
    if quantization is not None:  # integer layers stand for (q - zero point) * scale (Explainer._run_one)
        scale, zero = quantization
        a = o.op("Mul", o.op("Sub", a, o.const(zero)), o.const(scale))
        g = o.op("Div", g, o.const(scale))
    size, channels = (tuple(shape[1:3]), shape[3]) if channels_last else (tuple(shape[2:4]), shape[1])
    return _Layer(a, g, channels, size, s, channels_last, pooled)


def _pooled_gradient(model: onnx.ModelProto, g: str, channels_last: bool, s: int, shapes: dict) -> tuple | None:
    """([p per seed], c) when each seed's gradient is Mul(p, c) with p of its shape but 1 x 1 in space and c a
    constant equal at every position: the gradient of a global average pool (each position gets p / (h w)). Its
    spatial mean is p * c, so Grad-CAM's weights need neither the (N, S, C, h, w) gradients nor their mean. With
    several seeds g is the rewrite's Concat of each seed's gradient unsqueezed at axis 1. None otherwise."""
    producer = {out: node for node in model.graph.node for out in node.output}
    constants = {t.name: t for t in model.graph.initializer}
    seeds = [g]
    if s > 1:
        concat = producer.get(g)
        if concat is None or concat.op_type != "Concat" or len(concat.input) != s or g not in shapes:
            return None
        unsqueezes = [producer.get(name) for name in concat.input]
        if any(u is None or u.op_type != "Unsqueeze" for u in unsqueezes):
            return None
        seeds = [u.input[0] for u in unsqueezes]
        if any(shapes.get(u.output[0]) != shapes.get(seed, [])[:1] + [1] + shapes.get(seed, [])[1:]
               for u, seed in zip(unsqueezes, seeds)):
            return None  # not (seed's shape with an axis 1 inserted)
    found = [_pooled_one(producer.get(seed), seed, constants, [1, 2] if channels_last else [2, 3], shapes)
             for seed in seeds]
    if any(f is None for f in found) or len({scale for _, scale in found}) != 1:
        return None
    return [p for p, _ in found], found[0][1]


def _pooled_one(node, g: str, constants: dict, space: list[int], shapes: dict) -> tuple | None:
    """(p, c) for one seed's gradient g = Mul(p, c) as _pooled_gradient describes, or None."""
    if node is None or node.op_type != "Mul" or g not in shapes:
        return None
    for p, c in (node.input, node.input[::-1]):
        if c not in constants or p not in shapes:
            continue
        value = numpy_helper.to_array(constants[c])
        ps, gs = shapes[p], shapes[g]
        if value.size == 0 or value.ndim > 4 or not np.all(value == value.flat[0]) or len(ps) != 4 or len(gs) != 4:
            continue
        flat = all(ps[i] == 1 for i in space)
        same = all(ps[i] == gs[i] and ps[i] not in (None, "") for i in range(4) if i not in space)
        if flat and same:
            return p, float(value.flat[0])
    return None


def _inferred_shapes(model: onnx.ModelProto) -> dict:
    """name -> dims (int, a symbol, or None) from ONNX shape inference with data propagation ({} if it fails):
    the gradient graph's Reshapes take their shapes from Shape nodes."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError, ValueError) as exc:
        log.debug("shape inference failed (%s): no pooled-gradient shortcut", exc)
        return {}
    return {vi.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in vi.type.tensor_type.shape.dim]
            for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)
            if vi.type.tensor_type.HasField("shape")}


def _output_shape(model: onnx.ModelProto, name: str) -> list | None:
    for vi in (*model.graph.output, *model.graph.value_info):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return None


def _splice(graph: onnx.GraphProto, class_nodes: list, o: _Ops, classes: str) -> None:
    """Put the class nodes right after the TopK that ranks the classes, in place of the rewrite's Where(ranked,
    top classes, given classes): the export fixes its condition, so its readers read `classes` directly (one
    node less, and no constant input). The CAM nodes go at the end."""
    nodes = list(graph.node)
    where = next(n for n in nodes if n.op_type == "Where" and n.input[0] == rewrite.RANKED)
    nodes.remove(where)
    for node in nodes:
        for i, name in enumerate(node.input):
            if name == where.output[0]:
                node.input[i] = classes
    at = next(i for i, n in enumerate(nodes) if rewrite.TOP_CLASSES in n.output) + 1
    del graph.node[:]
    graph.node.extend(nodes[:at] + class_nodes + nodes[at:] + o.nodes)
    graph.initializer.extend(o.initializers)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers no output needs (the rewrite's other outputs: activations, gradients no
    method reads), so the runtime neither computes nor keeps them."""
    needed = {out.name for out in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inputs = {i.name for i in graph.input}
    used = [t for t in graph.initializer if t.name in needed or t.name in inputs]
    del graph.initializer[:]
    graph.initializer.extend(used)


def _reads(node: onnx.NodeProto) -> set:
    """The tensors a node reads, its subgraphs' outer-scope reads included."""
    names = set(node.input)
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
            for inner in sub.node:
                names |= _reads(inner)
    return names


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
