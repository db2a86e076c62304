"""Numerical checks of onnxcam/autodiff/rules/shape.py.

The reference is onnx's evaluator in float64, and every such case also checks that onnxruntime's forward agrees
with it. Where the evaluator lacks the form or computes it differently from onnxruntime (negative pads; Resize-10,
Upsample linear, Resize-18 with negative axes; nearest_mode=floor and align_corners with scales, where the two
disagree), the op is linear and the reference is onnxruntime's own forward with a unit step: the adjoint test of
the gradient against the op the runtime really computes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from .gradcheck import Case, check_case
from .test_conv_pool import check_against, check_forward, runtime_reference

rng = np.random.default_rng(5)
X = rng.standard_normal((2, 3, 4, 5))


def ints(*v):
    return np.array(v, np.int64)


def floats(*v):
    return np.array(v, np.float32)


def case(op, inputs, opset=17, order=None, **attrs):
    """A case on X (or the given x), differentiated with respect to x; other inputs are constants."""
    inputs = {"x": X, **inputs} if "x" not in inputs else inputs
    return Case(op, inputs, ["x"], attrs, opset, input_order=order,
                id=f"{op}-{opset}-{ {k: v.tolist() for k, v in inputs.items() if k != 'x'} }-{attrs}")


def split(opset, score, inputs=None, order=None, outputs=3, **attrs):
    c = case("Split", inputs or {}, opset, order, **attrs)
    c.n_outputs, c.score_output, c.id = outputs, score, f"{c.id}-output{score}"
    return c


RESHAPES = [
    case("Reshape", {"s": ints(2, -1, 5)}),
    case("Reshape", {"s": ints(0, 12, 5)}, 9),
    case("Flatten", {}, 11, axis=2),
    case("Flatten", {}, 13),
    case("Squeeze", {"x": X[:, :1]}, 11, axes=[1]),
    case("Squeeze", {"x": X[:, :1], "a": ints(-3)}, 13),
    case("Unsqueeze", {}, 11, axes=[0, 3]),
    case("Unsqueeze", {"a": ints(-1, 1)}, 18),
    case("Transpose", {}, 9, perm=[0, 2, 3, 1]),
    case("Transpose", {}, 13),
    case("Concat", {"x": X, "c": X[:, :2]}, 9, order=["c", "x", "c"], axis=1),
    case("Concat", {"x": X, "c": X[..., :1]}, 13, order=["x", "c", "x"], axis=-1),
]

SPLITS = [
    split(9, 1, axis=2, outputs=2),  # equal halves, no sizes given
    split(11, 0, axis=1, split=[1, 2], outputs=2),
    split(11, 2, axis=-1, split=[2, 1, 2]),
    split(13, 1, {"s": ints(1, 3, 1)}, axis=3),
    split(18, 2, axis=3, num_outputs=3),  # 5 = 2 + 2 + 1
    split(18, 0, {"s": ints(1, 1, 2)}, axis=2),
]

SLICES = [
    case("Slice", {}, 9, starts=[1, -3], ends=[3, 100], axes=[1, 3]),  # negative start, clamped end
    case("Slice", {}, 9, starts=[0, 1], ends=[-1, 3]),  # axes omitted
    case("Slice", {"b": ints(1), "e": ints(4)}, 10),  # axes and steps omitted
    case("Slice", {"b": ints(0, 4), "e": ints(3, 0), "a": ints(2, 3), "s": ints(2, -1)}, 10),  # step 2, reversed
    case("Slice", {"b": ints(-1, 1), "e": ints(-100, 5), "a": ints(-1, 1), "s": ints(-2, 1)}, 13),  # clamped ends
    case("Slice", {"b": ints(10, 0), "e": ints(-10, 2), "s": ints(-3, 1)}, 13,
         order=["x", "b", "e", "", "s"]),  # start beyond the axis, steps without axes
    case("Slice", {"b": ints(0, 1, 0), "e": ints(2**63 - 1, 4, 5), "a": ints(0, 2, 3), "s": ints(1, 1, 3)}, 18),
]

GATHERS = [
    case("Gather", {"i": ints(2, 0, 2)}, 9, axis=1),  # repeated index: gradients add up
    case("Gather", {"i": ints(-1, 1)}, 13, axis=-1),  # negative index and axis
    case("Gather", {"i": np.array(3, np.int64)}, 13, axis=2),  # scalar index drops the axis
    case("Gather", {"i": ints(1)}, 13),  # axis 0
    case("Gather", {"i": ints(0, 4, 4, -5, 2, 2).reshape(2, 3)}, 18, axis=3),  # 2-D indices
    case("Gather", {"i": ints(2, 1, 0, 1).reshape(2, 1, 2)}, 13, axis=1),
]

PADS = [
    case("Pad", {}, 9, pads=[0, 0, 1, 2, 0, 1, 0, 1]),
    case("Pad", {}, 9, pads=[0, 0, 2, 1, 0, 0, 1, 3], mode="reflect"),
    case("Pad", {}, 10, pads=[0, 1, 2, 1, 0, 0, 3, 0], mode="edge"),
    case("Pad", {"p": ints(0, 0, 1, 1, 0, 0, 2, 0)}, 11),
    case("Pad", {"p": ints(0, 0, 1, 1, 0, 0, 2, 0), "v": np.array(1.5)}, 13),  # constant_value: no gradient
    case("Pad", {"p": ints(0, 0, 3, 2, 0, 0, 2, 4)}, 13, mode="reflect"),
    case("Pad", {"p": ints(1, 0, 0, 3, 0, 2, 4, 1)}, 13, mode="edge"),
    case("Pad", {"p": ints(2, 1, 3, 2), "v": np.array(0.0), "a": ints(-1, 2)}, 18),  # axes input
    case("Pad", {"p": ints(2, 1, 3, 2), "a": ints(3, 2)}, 18, order=["x", "p", "", "a"], mode="reflect"),
    case("Pad", {"p": ints(0, 0, 1, 3, 0, 0, 2, 6), "a": ints(0, 1, 2, 3)}, 19, order=["x", "p", "", "a"],
         mode="wrap"),  # wraps more than once
    case("Pad", {"p": ints(0, 0, 1, 3, 0, 0, 2, 1)}, 21, mode="wrap"),
]


def resize(opset, scales=None, sizes=None, roi=None, h=1e-6, **attrs):
    """Resize with its optional inputs in place: "" for absent ones, or empty tensors before opset 13."""
    inputs, order = {"x": X}, ["x"]
    if opset < 11:
        inputs["s"], order = floats(*scales), order + ["s"]
    else:
        for name, value in (("r", roi), ("s", scales), ("z", sizes)):
            if value is None and name in "rs" and opset < 13:
                value = []  # roi and scales are not optional before opset 13
            if value is not None:
                inputs[name] = ints(*value) if name == "z" else floats(*value)
            order.append(name if value is not None else "")
    c = Case("Resize", inputs, ["x"], attrs, opset, input_order=order, h=h,
             id=f"Resize-{opset}-s{scales}-z{sizes}-roi{roi}-{attrs}")
    return c


NEAREST = [resize(13, [1, 1, 1.5, 0.6], mode="nearest", nearest_mode=m, coordinate_transformation_mode=t)
           for m in ("round_prefer_floor", "round_prefer_ceil", "ceil")
           for t in ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel")]
INTERPOLATING = [resize(opset, [1, 1, 1.7, 2.0] if by_scale else None, None if by_scale else [2, 3, 7, 3],
                        mode=mode, coordinate_transformation_mode=t)
                 for mode in ("linear", "cubic")
                 for t, opset in (("half_pixel", 13), ("asymmetric", 11), ("pytorch_half_pixel", 13),
                                  ("half_pixel_symmetric", 19))
                 for by_scale in (True, False)]
RESIZES = NEAREST + INTERPOLATING + [
    resize(19, sizes=[2, 3, 7, 3], mode="linear", coordinate_transformation_mode="align_corners"),
    resize(18, sizes=[2, 3, 7, 3], mode="cubic", coordinate_transformation_mode="align_corners"),
    resize(11, [1, 1, 2, 2], roi=[0, 0, 0, 0, 1, 1, 1, 1], mode="linear"),
    resize(11, sizes=[2, 3, 7, 3], roi=[0] * 8, mode="cubic", cubic_coeff_a=-0.5, exclude_outside=1),
    resize(13, sizes=[2, 3, 6, 6], roi=[0, 0, 0.2, 0.1, 1, 1, 0.9, 0.7], mode="linear",
           coordinate_transformation_mode="tf_crop_and_resize"),
    resize(13, sizes=[2, 3, 6, 6], roi=[0, 0, -0.2, 0.1, 1, 1, 1.3, 0.7], mode="nearest",
           coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=2.0),  # outside: constant
    resize(18, [0.5, 0.6], mode="linear", antialias=1, axes=[2, 3]),
    resize(18, sizes=[2, 3], mode="cubic", antialias=1, axes=[2, 3]),
    resize(18, sizes=[3, 6], mode="linear", axes=[2, 3], keep_aspect_ratio_policy="stretch"),
    resize(13, [1, 1, 2, 2], mode="nearest"),  # the common FPN upsampling
    case("Upsample", {"s": floats(1, 1, 2, 3)}, 9, mode="nearest"),
]

COPIES = [
    case("Expand", {"x": X[:1, :, :1], "s": ints(2, 3, 4, 5)}, 9),
    case("Expand", {"x": X[0, 0, :, :1], "s": ints(2, 1, 1, 3)}, 13),  # rank grows
    case("Tile", {"r": ints(1, 2, 1, 3)}, 9),
    case("Tile", {"r": ints(2, 1, 2, 1)}, 13),
    case("DepthToSpace", {"x": rng.standard_normal((1, 8, 2, 3))}, 11, blocksize=2),
    case("DepthToSpace", {"x": rng.standard_normal((1, 8, 2, 3))}, 13, blocksize=2, mode="CRD"),
    case("DepthToSpace", {"x": rng.standard_normal((2, 18, 2, 2))}, 13, blocksize=3, mode="DCR"),
    case("SpaceToDepth", {"x": rng.standard_normal((1, 2, 4, 6))}, 13, blocksize=2),
]

CASES = RESHAPES + SPLITS + SLICES + GATHERS + PADS + RESIZES + COPIES


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case):
    check_forward(case)
    check_case(case)


def runtime_case(c: Case) -> Case:
    c.h = 1.0
    return c


# Linear forms onnx's evaluator lacks, or computes unlike onnxruntime: checked against the runtime (module doc).
RUNTIME_CASES = [runtime_case(c) for c in [
    case("Pad", {"p": ints(0, 0, -1, 2, 0, 1, 1, -2)}, 13),  # negative pads crop
    case("Pad", {"p": ints(0, 0, -1, 2, 0, 0, 2, -2)}, 13, mode="reflect"),
    case("Pad", {"p": ints(0, 0, 2, -1, 0, 0, -1, 2)}, 19, mode="wrap"),
    case("Pad", {}, 9, pads=[0, -1, 1, 0, 0, 0, -2, 1], mode="edge"),
    resize(10, [1, 1, 2, 1.5], mode="nearest"),
    resize(10, [1, 1, 0.5, 1.5], mode="linear"),
    resize(13, [1, 1, 1.5, 0.6], mode="nearest", nearest_mode="floor", coordinate_transformation_mode="half_pixel"),
    resize(13, [1, 1, 1.7, 2.0], mode="linear", coordinate_transformation_mode="align_corners"),
    resize(13, [1, 1, 1.7, 2.0], mode="cubic", coordinate_transformation_mode="align_corners"),
    resize(18, sizes=[7, 8], mode="nearest", axes=[-2, -1]),
    case("Upsample", {"s": floats(1, 1, 2, 1.5)}, 9, mode="linear"),
]]


@pytest.mark.parametrize("case", RUNTIME_CASES, ids=str)
def test_rule_runtime_reference(case):
    check_against(case, runtime_reference(case))


def _runtime_gather(opset, axis, x_shape, idx):
    """Gather whose indices are a graph input (computed at run time); d(sum(u * y))/dx from onnxcam."""
    from onnx import TensorProto, helper

    from onnxcam import rewrite
    from onnxcam.graph.model import ModelGraph
    from onnxcam.runtime import cpu_session

    nodes = [helper.make_node("Gather", ["x", "i"], ["y"], name="pick", axis=axis)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)),
                                           helper.make_tensor_value_info("i", TensorProto.INT64, list(idx.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    rw = rewrite.build(ModelGraph(model), ["x"], "y")
    rng = np.random.default_rng(5)
    x = rng.standard_normal(x_shape).astype(np.float32)
    y = np.take(x, idx, axis=axis)
    u = rng.standard_normal(y.shape).astype(np.float32)
    feeds = {"x": x, "i": idx, rewrite.SEED: u[:, None]}
    if rw.has_ranking:
        feeds[rewrite.RANKED] = np.array(False)
    got = cpu_session(rw.model.SerializeToString()).run([rewrite.grad_name("x")], feeds)[0]
    return got, u


@pytest.mark.parametrize("axis,idx", [(1, np.array([3, 0, 3, -1])), (0, np.array([1, 1, 0])),
                                      (2, np.array([[0, 2], [2, -3]]))], ids=str)
def test_gather_with_run_time_indices_scatters_back(axis, idx):
    """The dynamo exporter flattens through Gather with indices computed from the batch size: the gradient is a
    scatter-add (repeated indices add up, negative ones count from the end), checked against numpy."""
    x_shape = (2, 5, 3)
    got, u = _runtime_gather(18, axis, x_shape, idx)
    want = np.zeros(x_shape)
    moved = np.moveaxis(want, axis, 0)
    gu = np.moveaxis(u.astype(np.float64), list(range(axis, axis + idx.ndim)), list(range(idx.ndim)))
    np.add.at(moved, idx % x_shape[axis], gu)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_run_time_indices_before_opset_16_are_a_clear_error():
    from onnxcam.errors import UnsupportedOpError

    with pytest.raises(UnsupportedOpError, match=r"Gather node 'pick'.*run time.*opset 16"):
        _runtime_gather(13, 1, (2, 5), np.array([1, 2, 3]))


REPEATS = {  # id -> (Resize case, the block the gradient sums, or None where the matrix products stay)
    "yolo-2x-asymmetric-floor": (resize(13, [1, 1, 2, 2], mode="nearest", coordinate_transformation_mode="asymmetric",
                                        nearest_mode="floor"), [2, 2]),
    "half-pixel-2x": (resize(13, [1, 1, 2, 2], mode="nearest"), [2, 2]),
    "upsample-2x3": (case("Upsample", {"s": floats(1, 1, 2, 3)}, 9, mode="nearest"), [2, 3]),
    "height-only-sizes": (resize(13, sizes=[2, 3, 12, 5], mode="nearest"), [3, 1]),
    "non-integer": (resize(13, [1, 1, 1.5, 2], mode="nearest"), None),
    "linear-2x": (resize(13, [1, 1, 2, 2], mode="linear"), None),
}


@pytest.mark.parametrize("name", REPEATS)
def test_nearest_repeat_gradient_is_a_block_sum(name):
    """A nearest Resize that repeats each element k times per axis sends back the sum of each block of the seed,
    as one depthwise Conv (no MatMul); any other resize keeps the measured matrices. Values: the float64 block
    sum of the seed."""
    from onnxcam import rewrite
    from onnxcam.graph.model import ModelGraph
    from onnxcam.runtime import cpu_session

    from .gradcheck import _model

    c, block = REPEATS[name]
    mg = ModelGraph(_model(c, np.float32))
    rw = rewrite.build(mg, ["x"], "y0")
    ops = [n.op_type for n in rw.model.graph.node if n.name.startswith("onnxcam_grad")]
    assert ("Conv" in ops and "MatMul" not in ops) == (block is not None), ops
    if block is None:
        return
    out_shape = (2, 3) + tuple(d * k for d, k in zip(X.shape[2:], block))
    u = rng.standard_normal(out_shape)
    sess = cpu_session(rw.model.SerializeToString(), rw.initializer_arrays())
    got = sess.run([rewrite.grad_name("x")], {"x": X.astype(np.float32), rewrite.SEED: u.astype(np.float32)[:, None]})
    want = u.reshape(2, 3, X.shape[2], block[0], X.shape[3], block[1]).sum(axis=(3, 5))
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


BANDS = {  # id -> (Resize case on a (1, 2, 40, 32) map, whether each resized axis runs as a band)
    "segmenter-8x-linear": (resize(13, [1, 1, 8, 8], mode="linear"), True),
    "pytorch-half-pixel-4x": (resize(13, [1, 1, 4, 4], mode="linear",
                                     coordinate_transformation_mode="pytorch_half_pixel"), True),
    "asymmetric-4x": (resize(13, [1, 1, 4, 4], mode="linear", coordinate_transformation_mode="asymmetric"), True),
    "cubic-4x": (resize(13, [1, 1, 4, 4], mode="cubic"), True),
    "width-only": (resize(13, [1, 1, 1, 4], mode="linear"), True),
    "linear-2x": (resize(13, [1, 1, 2, 2], mode="linear"), False),  # the dense product is cheaper
    "align-corners-4x": (resize(13, sizes=[1, 2, 160, 128], mode="linear",
                                coordinate_transformation_mode="align_corners"), False),  # not periodic
    "non-integer": (resize(13, [1, 1, 1.5, 2.5], mode="linear"), False),
}


def _axis_matrix64(attrs: dict, size_in: int, size_out: int) -> np.ndarray:
    """m[i, j]: the weight of input i in output j of a resize along one axis, from onnx's float64 evaluator run
    on an identity basis (independent of onnxruntime and of the rule's own measurement)."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator
    node = helper.make_node("Resize", ["x", "", "", "z"], ["y"], **attrs)
    graph = helper.make_graph([node], "axis", [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, None)],
                              [onnx.numpy_helper.from_array(np.array([1, size_in, 1, size_out], np.int64), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    basis = np.eye(size_in).reshape(1, size_in, 1, size_in)
    return ReferenceEvaluator(model).run(None, {"x": basis})[0].reshape(size_in, size_out)


@pytest.mark.parametrize("name", BANDS)
def test_integer_upsampling_gradient_runs_as_a_band(name):
    """An integer upsampling's gradient along each axis is a strided depthwise Conv with the matrix's band, plus
    products over the border columns where the clamped coordinates differ from the band (resize_band.py);
    non-periodic matrices and small factors keep the dense products. Values: the transposed per-axis matrices of
    onnx's float64 evaluator applied to a random seed."""
    from onnxcam import rewrite
    from onnxcam.graph.model import ModelGraph
    from onnxcam.runtime import cpu_session

    from .gradcheck import _model

    c, band = BANDS[name]
    x = np.random.default_rng(3).standard_normal((1, 2, 40, 32))
    model = _model(dataclasses.replace(c, inputs={**c.inputs, "x": x}), np.float32)
    rw = rewrite.build(ModelGraph(model), ["x"], "y0")
    convs = [n for n in rw.model.graph.node if n.name.startswith("onnxcam_grad") and n.op_type == "Conv"]
    assert bool(convs) == band, [n.op_type for n in rw.model.graph.node]
    out_shape = rw.score_shape
    u = np.random.default_rng(4).standard_normal((1, *out_shape[1:]))
    want = u
    for axis in (2, 3):
        m = _axis_matrix64(c.attrs, x.shape[axis], out_shape[axis])
        want = np.moveaxis(np.moveaxis(want, axis, -1) @ m.T, -1, axis)
    sess = cpu_session(rw.model.SerializeToString(), rw.initializer_arrays())
    got = sess.run([rewrite.grad_name("x")], {"x": x.astype(np.float32), rewrite.SEED: u.astype(np.float32)[:, None]})
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_seeded_class_maps_alone_cross_the_last_upsampling():
    """A segmenter's seed fills one or a few of its K class maps: the last Resize's adjoint runs on the channels
    some sample's seed fills, as one-channel maps (passes_channels.seed_channels), and the rest of the gradient
    is zeros. Values, for two samples and two seeds filling different channels, and for an all-zero seed: the
    transposed per-axis matrices of onnx's float64 evaluator, channel by channel."""
    from onnxcam import rewrite
    from onnxcam.graph.model import ModelGraph
    from onnxcam.runtime import cpu_session

    from .gradcheck import _model

    c = resize(13, [1, 1, 8, 8], mode="linear")
    x = np.random.default_rng(5).standard_normal((2, 5, 40, 32))
    model = _model(dataclasses.replace(c, inputs={**c.inputs, "x": x}), np.float32)
    rw = rewrite.build(ModelGraph(model), ["x"], "y0", n_seeds=2)
    ops = [n.op_type for n in rw.model.graph.node]
    assert "NonZero" in ops and "ScatterElements" in ops, ops
    convs = [n for n in rw.model.graph.node if n.name.startswith("onnxcam_grad") and n.op_type == "Conv"]
    weights = {i.name: i for i in rw.model.graph.initializer}
    assert convs and all(weights[n.input[1]].dims[0] == 1 for n in convs)  # one channel's band
    seeds = np.zeros((2, 2, 5, 320, 256))
    rng = np.random.default_rng(6)
    seeds[0, 0, 1] = rng.standard_normal((320, 256))  # sample 0: class 1; sample 1: classes 1 and 3
    seeds[1, 0, 3, 10:90, 40:] = -2.0
    seeds[1, 0, 1, 5] = 0.5
    seeds[:, 1, 4] = rng.standard_normal((2, 320, 256))  # the second seed: class 4 in both
    m_h, m_w = _axis_matrix64(c.attrs, 40, 320), _axis_matrix64(c.attrs, 32, 256)
    want = np.einsum("nskhw,ih,jw->nskij", seeds, m_h, m_w)
    sess = cpu_session(rw.model.SerializeToString(), rw.initializer_arrays())
    got = sess.run([rewrite.grad_name("x")], {"x": x.astype(np.float32), rewrite.SEED: seeds.astype(np.float32)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.all(got[:, :, [0, 2]] == 0)
    zero = sess.run([rewrite.grad_name("x")], {"x": x.astype(np.float32), rewrite.SEED: np.zeros_like(seeds, np.float32)})
    assert zero[0].shape == got.shape and not zero[0].any()


def test_a_free_batch_resize_to_sizes_computed_from_its_input_shape():
    """A free-batch export writes a Resize's sizes as Concat(Shape(x)[:2], (H, W)): not constant, its batch being
    the run's. The rule takes the output's static sizes then; values as the transposed per-axis matrices of onnx's
    float64 evaluator, for a batch of 3 the graph did not fix."""
    from onnx import TensorProto, helper

    from onnxcam import rewrite
    from onnxcam.graph.model import ModelGraph
    from onnxcam.runtime import cpu_session

    attrs = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
    nodes = [helper.make_node("Shape", ["x"], ["shape"], start=0, end=2),
             helper.make_node("Concat", ["shape", "hw"], ["sizes"], axis=0),
             helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "free", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 10, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(ints(80, 64), "hw")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rw = rewrite.build(ModelGraph(model, (1, 4, 10, 8)), ["x"], "y")
    x = np.random.default_rng(7).standard_normal((3, 4, 10, 8))
    seed = np.random.default_rng(8).standard_normal((3, 4, 80, 64))
    want = np.einsum("nkhw,ih,jw->nkij", seed, _axis_matrix64(attrs, 10, 80), _axis_matrix64(attrs, 8, 64))
    sess = cpu_session(rw.model.SerializeToString(), rw.initializer_arrays())
    got = sess.run([rewrite.grad_name("x")], {"x": x.astype(np.float32),
                                               rewrite.SEED: seed[:, None].astype(np.float32)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
