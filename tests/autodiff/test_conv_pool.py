"""Numerical checks of onnxcam/autodiff/rules/conv_pool.py.

The reference is onnx's evaluator in float64 where it implements the form. Where it does not (grouped
ConvTranspose; ConvTranspose output_shape without auto_pad; MaxPool with SAME_LOWER; GlobalMaxPool on 1-D and 3-D
maps), the reference is written here in numpy float64. Every case also checks that onnxruntime's forward agrees with its
reference, so each gradient is checked against the function the runtime really computes.
"""

from __future__ import annotations

import itertools
from unittest import mock

import numpy as np
import onnx
import pytest

from . import gradcheck
from .gradcheck import Case, check_case, distinct, onnxcam_gradients

rng = np.random.default_rng(3)


# ---- helpers shared with test_shape.py ---------------------------------------------------------------------------

def runtime_forward(case: Case) -> np.ndarray:
    """The case's output as onnxruntime computes it (float32)."""
    from onnxcam.runtime import cpu_session

    model = gradcheck._model(case, np.float32)
    for out in model.graph.output:
        out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    feeds = {k: np.asarray(v, np.float32) for k, v in case.inputs.items() if k in case.wrt}
    return cpu_session(model.SerializeToString()).run(None, feeds)[case.score_output]


def check_forward(case: Case, reference=None, atol=1e-5) -> None:
    """onnxruntime's forward matches the reference the gradient is checked against."""
    feeds = {k: np.asarray(v, np.float64) for k, v in case.inputs.items() if k in case.wrt}
    want = reference({**case.inputs, **feeds}) if reference else gradcheck._reference(case, feeds)
    got = runtime_forward(case)
    assert got.shape == want.shape, f"{case}: onnxruntime gives shape {got.shape}, the reference {want.shape}"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=f"{case}: forward differs")


def check_against(case: Case, reference) -> None:
    """check_case with `reference(inputs) -> output` (numpy float64) in place of onnx's evaluator."""
    with mock.patch.object(gradcheck, "_reference", lambda _, feeds: reference({**case.inputs, **feeds})):
        check_case(case)


def runtime_reference(case: Case):
    """onnxruntime's own float32 forward as the reference, for LINEAR ops whose form onnx's evaluator lacks or
    computes differently: with the case's step h = 1 the central difference of a linear map is exact, so the
    check is the adjoint (dot-product) test of the emitted gradient against the real op.
    """
    assert case.h == 1.0, f"{case}: a runtime reference needs h=1 (float32 cannot resolve small steps)"

    def reference(values):
        probe = Case(case.op, {k: (values[k] if k in case.wrt else v) for k, v in case.inputs.items()}, case.wrt,
                     case.attrs, case.opset, case.n_outputs, case.score_output, case.input_order)
        return runtime_forward(probe).astype(np.float64)
    return reference


# ---- numpy references for the forms onnx's evaluator lacks --------------------------------------------------------

def conv_transpose_ref(x, w, *, strides, begin, out_sz, dilations=None, group=1):
    """Scatter each input element over its window in the full output, then take the window that starts at `begin`."""
    nd = x.ndim - 2
    dilations = dilations or [1] * nd
    in_sz, kernel, cg, mg = x.shape[2:], w.shape[2:], x.shape[1] // group, w.shape[1]
    size = [max((in_sz[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1, begin[i] + out_sz[i])
            for i in range(nd)]
    full = np.zeros((x.shape[0], group * mg, *size))
    for tap in itertools.product(*[range(k) for k in kernel]):
        where = tuple(slice(tap[i] * dilations[i], tap[i] * dilations[i] + (in_sz[i] - 1) * strides[i] + 1,
                            strides[i]) for i in range(nd))
        for g in range(group):
            part = np.einsum("nc...,cm->nm...", x[:, g * cg:(g + 1) * cg], w[(slice(g * cg, (g + 1) * cg), slice(None))
                                                                            + tap])
            full[(slice(None), slice(g * mg, (g + 1) * mg)) + where] += part
    return full[(slice(None), slice(None)) + tuple(slice(begin[i], begin[i] + out_sz[i]) for i in range(nd))]


def max_pool_ref(x, *, kernel, strides, begin, out_sz, dilations=None):
    """The maximum over each window of x padded with -inf."""
    nd = x.ndim - 2
    dilations = dilations or [1] * nd
    size = [(out_sz[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(nd)]
    padded = np.full(x.shape[:2] + tuple(max(s, b + n) for s, b, n in zip(size, begin, x.shape[2:])), -np.inf)
    padded[(slice(None), slice(None)) + tuple(slice(b, b + n) for b, n in zip(begin, x.shape[2:]))] = x
    taps = [padded[(slice(None), slice(None)) + tuple(slice(t * d, t * d + (o - 1) * s + 1, s) for t, d, o, s
                                                      in zip(tap, dilations, out_sz, strides))]
            for tap in itertools.product(*[range(k) for k in kernel])]
    return np.max(taps, axis=0)


# ---- cases --------------------------------------------------------------------------------------------------------

def conv(x_shape, w_shape, opset=17, bias=False, **attrs):
    inputs = {"x": rng.standard_normal(x_shape), "w": rng.standard_normal(w_shape)}
    if bias:
        inputs["b"] = rng.standard_normal(w_shape[0])
    return Case("Conv", inputs, ["x"], attrs, opset, id=f"Conv-{opset}-{x_shape}-{w_shape}-{attrs}")


def conv_t(x_shape, w_shape, opset=17, **attrs):
    inputs = {"x": rng.standard_normal(x_shape), "w": rng.standard_normal(w_shape)}
    return Case("ConvTranspose", inputs, ["x"], attrs, opset, id=f"ConvTranspose-{opset}-{x_shape}-{attrs}")


def pool(op, x_shape, opset=17, **attrs):
    """Pool cases on distinct values: no ties, so no max sits within finite-difference reach of another."""
    return Case(op, {"x": distinct(rng, x_shape)}, ["x"], attrs, opset, id=f"{op}-{opset}-{x_shape}-{attrs}")


CONV = [
    conv((1, 2, 5, 5), (3, 2, 3, 3)),
    conv((2, 2, 5, 5), (3, 2, 3, 3), bias=True, pads=[1, 1, 1, 1]),
    conv((1, 2, 6, 7), (3, 2, 3, 3), pads=[0, 1, 2, 1], strides=[2, 2]),  # asymmetric pads
    conv((1, 2, 7, 7), (3, 2, 3, 2), strides=[2, 3], dilations=[2, 1], pads=[1, 0, 0, 2]),
    conv((1, 2, 9, 9), (3, 2, 3, 3), strides=[4, 4]),  # windows miss the input's tail
    conv((2, 4, 6, 6), (4, 2, 3, 3), group=2, pads=[1, 1, 1, 1]),
    conv((1, 3, 6, 6), (3, 1, 3, 3), group=3, strides=[2, 2]),  # depthwise
    conv((1, 3, 6, 6), (6, 1, 3, 3), group=3, strides=[2, 2], auto_pad="SAME_UPPER"),  # depthwise, multiplier 2
    conv((1, 3, 7, 6), (6, 1, 2, 2), group=3, strides=[2, 1], auto_pad="SAME_LOWER"),
    # grouped strided convs take the polyphase adjoint: odd and even sizes, asymmetric pads, stride 3, 2 per group
    conv((2, 4, 14, 14), (4, 1, 5, 5), group=4, strides=[2, 2], pads=[2, 2, 2, 2]),
    conv((1, 4, 13, 10), (4, 1, 5, 3), group=4, strides=[2, 2], pads=[1, 2, 2, 0]),
    conv((1, 3, 11, 11), (6, 1, 4, 3), group=3, strides=[3, 3], pads=[0, 1, 2, 1]),
    conv((1, 4, 9, 8), (6, 2, 3, 3), group=2, strides=[2, 2], auto_pad="SAME_UPPER"),
    conv((1, 4, 6, 6), (4, 1, 2, 2), opset=10, group=4, strides=[2, 2]),
    conv((1, 3, 7, 6), (2, 3, 3, 3), strides=[3, 2], auto_pad="VALID"),
    conv((1, 3, 8), (2, 3, 3), strides=[2], pads=[2, 1], dilations=[2]),  # 1-D
    conv((1, 2, 4, 5, 5), (2, 2, 2, 3, 2), strides=[1, 2, 2], pads=[1, 0, 1, 0, 1, 1]),  # 3-D
    conv((1, 2, 5, 5), (3, 2, 3, 3), opset=9, pads=[1, 1, 1, 1], strides=[2, 2]),
    conv((1, 2, 6, 6), (3, 2, 3, 3), opset=11, pads=[0, 1, 1, 0], strides=[2, 2]),
    conv((1, 4, 6, 6), (4, 1, 3, 3), opset=13, group=4, auto_pad="SAME_UPPER"),
    conv((1, 2, 6, 6), (2, 2, 2, 2), opset=22, strides=[2, 2], dilations=[2, 2]),
    # taps that only ever read padding (DeepLab's ASPP on a small map): the centre alone, one side, strided
    conv((1, 2, 5, 5), (3, 2, 3, 3), dilations=[6, 6], pads=[6, 6, 6, 6]),
    conv((1, 2, 5, 6), (3, 2, 3, 3), dilations=[5, 2], pads=[10, 2, 0, 2]),
    conv((1, 2, 7, 7), (3, 2, 3, 3), strides=[2, 2], dilations=[8, 1], pads=[8, 1, 8, 1]),
]

CONV_TRANSPOSE = [
    conv_t((1, 2, 4, 4), (2, 3, 3, 3)),
    conv_t((2, 2, 4, 4), (2, 3, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1]),
    conv_t((1, 2, 4, 4), (2, 3, 3, 3), strides=[2, 2], pads=[1, 0, 0, 1]),
    conv_t((1, 2, 4, 4), (2, 3, 3, 3), strides=[2, 3], pads=[1, 0, 0, 1], output_padding=[1, 2]),
    conv_t((1, 4, 4, 4), (4, 1, 3, 3), group=4, strides=[2, 2], dilations=[2, 1]),  # depthwise
    conv_t((1, 2, 4, 4), (2, 3, 3, 3), strides=[2, 2], auto_pad="SAME_UPPER"),
    conv_t((1, 2, 4, 4), (2, 3, 3, 3), strides=[2, 2], auto_pad="SAME_LOWER"),
    conv_t((1, 2, 4, 4), (2, 3, 2, 2), strides=[2, 2], auto_pad="VALID"),
    conv_t((1, 2, 4, 4), (2, 3, 3, 3), strides=[2, 2], output_shape=[8, 9], auto_pad="SAME_UPPER"),
    conv_t((1, 2, 5), (2, 3, 3), strides=[2], pads=[2, 1], dilations=[2]),  # 1-D
    conv_t((1, 2, 3, 3, 3), (2, 1, 2, 2, 2), strides=[2, 1, 2], pads=[1, 0, 0, 0, 1, 1]),  # 3-D
    conv_t((1, 2, 4, 4), (2, 3, 3, 3), opset=9, strides=[2, 2], pads=[1, 1, 1, 1]),
    conv_t((1, 2, 4, 4), (2, 3, 3, 3), opset=11, strides=[2, 2], output_padding=[1, 0]),
    conv_t((1, 2, 4, 4), (2, 3, 3, 3), opset=22, strides=[2, 2], output_shape=[8, 8], auto_pad="SAME_LOWER"),
]

MAX_POOL_GEOMETRIES = [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [1, 1]},  # overlapping windows: an element is the max of several
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 0, 1], "ceil_mode": 1},
    {"kernel_shape": [2, 2], "strides": [1, 2], "dilations": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
]

MAX_POOL = [pool("MaxPool", (2, 2, 7, 7), opset, **geometry)
            for opset in (11, 17) for geometry in MAX_POOL_GEOMETRIES] + [
    pool("MaxPool", (1, 2, 7, 7), 9, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    pool("MaxPool", (1, 2, 7, 7), 13, kernel_shape=[3, 3], strides=[2, 2], dilations=[1, 2], ceil_mode=1),
    pool("MaxPool", (1, 2, 7, 7), 15, kernel_shape=[2, 3], strides=[1, 2]),
    pool("MaxPool", (1, 2, 7, 7), 16, kernel_shape=[2, 3], strides=[1, 2]),
    pool("MaxPool", (1, 2, 7, 7), 22, kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0]),
    pool("MaxPool", (1, 2, 8), 11, kernel_shape=[3], strides=[2], pads=[1, 1]),  # 1-D, old rule
    pool("MaxPool", (1, 2, 8), 18, kernel_shape=[3], strides=[2], pads=[1, 1]),  # 1-D, scatter rule
    pool("MaxPool", (1, 2, 4, 4, 4), 13, kernel_shape=[2, 2, 2], strides=[2, 1, 2]),  # 3-D
    pool("MaxPool", (1, 2, 4, 4, 4), 18, kernel_shape=[2, 2, 2], strides=[2, 1, 2]),
]

AVERAGE_POOL = [
    pool("AveragePool", (1, 2, 6, 6), kernel_shape=[2, 2], strides=[2, 2]),
    pool("AveragePool", (2, 2, 7, 7), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    pool("AveragePool", (1, 2, 7, 7), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
    pool("AveragePool", (1, 2, 7, 7), kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 0, 1], ceil_mode=1),
    pool("AveragePool", (1, 2, 7, 7), kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 0, 1], ceil_mode=1,
         count_include_pad=1),
    pool("AveragePool", (1, 2, 6, 6), kernel_shape=[3, 3], strides=[1, 1]),  # overlapping windows
    pool("AveragePool", (1, 2, 7, 7), kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
    pool("AveragePool", (1, 2, 7, 7), kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER",
         count_include_pad=1),
    pool("AveragePool", (1, 2, 8), kernel_shape=[3], strides=[2], pads=[1, 1]),  # 1-D
    pool("AveragePool", (1, 2, 4, 4, 4), kernel_shape=[2, 2, 2], strides=[2, 1, 2]),  # 3-D
    pool("AveragePool", (1, 2, 7, 7), 9, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    pool("AveragePool", (1, 2, 7, 7), 11, kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0], ceil_mode=1),
    pool("AveragePool", (1, 2, 7, 7), 19, kernel_shape=[2, 2], strides=[2, 1], dilations=[2, 2], pads=[1, 1, 0, 1]),
    pool("AveragePool", (1, 2, 7, 7), 22, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
         count_include_pad=1),
]

GLOBAL_POOL = [
    pool("GlobalAveragePool", (2, 3, 4, 5)),
    pool("GlobalAveragePool", (1, 3, 6), 9),
    pool("GlobalAveragePool", (1, 2, 3, 4, 2), 22),
    pool("GlobalMaxPool", (2, 3, 4, 5)),
]

CASES = CONV + CONV_TRANSPOSE + MAX_POOL + AVERAGE_POOL + GLOBAL_POOL


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case):
    check_forward(case)
    check_case(case)


# Forms onnx's evaluator gets wrong or lacks: (case, numpy reference).
NUMPY_CASES = [
    (conv_t((1, 4, 3, 3), (4, 3, 3, 3), group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
     lambda v: conv_transpose_ref(v["x"], v["w"], group=2, strides=[2, 2], begin=[1, 1], out_sz=[5, 5])),
    (conv_t((1, 6, 3, 4), (6, 1, 3, 2), group=3, strides=[2, 1], dilations=[1, 2], pads=[0, 1, 1, 0]),
     lambda v: conv_transpose_ref(v["x"], v["w"], group=3, strides=[2, 1], dilations=[1, 2], begin=[0, 1],
                                  out_sz=[6, 5])),
    # output_shape without auto_pad: pads derived from the total crop, the odd one at the begin.
    (conv_t((1, 2, 4, 4), (2, 3, 3, 3), strides=[2, 2], output_shape=[8, 9]),
     lambda v: conv_transpose_ref(v["x"], v["w"], strides=[2, 2], begin=[1, 0], out_sz=[8, 9])),
    (conv_t((1, 2, 4, 4), (2, 3, 3, 3), opset=11, strides=[3, 2], output_shape=[10, 8]),
     lambda v: conv_transpose_ref(v["x"], v["w"], strides=[3, 2], begin=[1, 1], out_sz=[10, 8])),
    # SAME_LOWER pooling: out = ceil(7 / 2) = 4, total pad 1, at the begin.
    (pool("MaxPool", (1, 2, 7, 7), 13, kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER"),
     lambda v: max_pool_ref(v["x"], kernel=[2, 2], strides=[2, 2], begin=[1, 1], out_sz=[4, 4])),
    (pool("MaxPool", (1, 2, 7, 7), 18, kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER"),
     lambda v: max_pool_ref(v["x"], kernel=[2, 2], strides=[2, 2], begin=[1, 1], out_sz=[4, 4])),
    (pool("GlobalMaxPool", (1, 3, 6), 9), lambda v: v["x"].max(axis=2, keepdims=True)),
    (pool("GlobalMaxPool", (1, 2, 3, 4, 2)), lambda v: v["x"].max(axis=(2, 3, 4), keepdims=True)),
]


@pytest.mark.parametrize("case, reference", NUMPY_CASES, ids=[str(c) for c, _ in NUMPY_CASES])
def test_rule_numpy_reference(case, reference):
    check_forward(case, reference)
    check_against(case, reference)


@pytest.mark.parametrize("opset", [13, 17])
def test_max_pool_ties_follow_torch(opset):
    """On ties the gradient goes to the first maximum of each window (the Indices output), as in torch."""
    torch = pytest.importorskip("torch")
    x = np.round(rng.uniform(0, 2, (1, 2, 6, 6)))  # values 0, 1, 2: ties in most windows
    case = Case("MaxPool", {"x": x}, ["x"], {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, opset)
    u = rng.standard_normal((1, 2, 6, 6))
    got = onnxcam_gradients(case, u)["x"]
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(xt, 3, stride=1, padding=1).backward(torch.tensor(u))
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_pool_ceil_mode_window_in_end_padding():
    """onnx shape inference keeps a ceil_mode window that would start in the end padding; the runtimes drop it.
    graph/model.py measures every shape of models with ceil_mode pools, so the seed gets the runtime's shape."""
    check_case(pool("AveragePool", (1, 2, 6, 6), kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 1],
                    ceil_mode=1))


def test_taps_that_only_read_padding_leave_the_adjoint():
    """A 3x3 convolution with dilation 6 on a 5x5 map only ever reads the input through its centre tap: its
    adjoint is a 1x1 Conv without padding (the centre weights), not a dilated 3x3 over a padded map. Values: the
    float64 finite-difference check of the same case in CONV."""
    from onnxcam import rewrite
    from onnxcam.graph.model import ModelGraph

    from .gradcheck import _model

    c = conv((1, 2, 5, 5), (3, 2, 3, 3), dilations=[6, 6], pads=[6, 6, 6, 6])
    rw = rewrite.build(ModelGraph(_model(c, np.float32)), ["x"], "y0")
    (grad,) = [n for n in rw.model.graph.node if n.name.startswith("onnxcam_grad") and n.op_type == "Conv"]
    pads = next(list(a.ints) for a in grad.attribute if a.name == "pads")
    assert pads == [0, 0, 0, 0]
