"""Numerical checks of onnxcam/autodiff/rules/activations.py. Inputs keep clear of each function's kinks."""

import math

import numpy as np
import onnx
import pytest

from onnxcam.runtime import cpu_session

from . import gradcheck
from .gradcheck import Case, away_from_zero, check_case

rng = np.random.default_rng(2)
X = rng.standard_normal((2, 3, 4))
AWAY = away_from_zero(rng, (2, 3, 4), margin=0.1)
X4 = rng.standard_normal((2, 3, 2, 2))


def avoiding(points, scale=1.0, margin=0.1, shape=(2, 3, 4)):
    """Random values spread by `scale`, moved at least `margin` away from each kink in `points`."""
    x = rng.standard_normal(shape) * scale
    for p in points:
        near = np.abs(x - p) < margin
        x = np.where(near, p + np.where(x >= p, margin, -margin) * 2, x)
    return x


CLIPPED = avoiding([-0.5, 0.5])
LO, HI = np.float32(-0.5), np.float32(0.5)
# kinks of HardSigmoid where alpha x + beta reaches 0 and 1: at -2.5, 2.5 by default; -1, 1 for alpha=0.5, beta=0.5
HARD = avoiding([-2.5, 2.5, -1.0, 1.0], scale=3.0)
SWISH = avoiding([-3.0, 3.0], scale=4.0)
GELU_X = np.where(rng.random((2, 3, 4)) < 0.5, -1.0, 1.0) * rng.uniform(1.0, 3.0, (2, 3, 4))


def _softmax_cases(op):
    x3, x4 = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 2, 2))
    return [  # before opset 13 the input is coerced to 2-D at `axis` (default 1): here it differs from one axis
        Case(op, {"x": x3}, ["x"], {"axis": 1}, opset=11, id=f"{op}-11-axis1-3d"),
        Case(op, {"x": x4}, ["x"], {"axis": 1}, opset=11, id=f"{op}-11-axis1-4d"),
        Case(op, {"x": x4}, ["x"], opset=9, id=f"{op}-9-default-axis-4d"),
        Case(op, {"x": x3}, ["x"], {"axis": -2}, opset=11, id=f"{op}-11-axis-minus2"),
        Case(op, {"x": x3}, ["x"], {"axis": 0}, opset=12, id=f"{op}-12-axis0"),
        Case(op, {"x": x4}, ["x"], {"axis": -3}, opset=13, id=f"{op}-13-axis-minus3"),
        Case(op, {"x": x3}, ["x"], opset=13, id=f"{op}-13-default-axis"),
        Case(op, {"x": x3}, ["x"], {"axis": 1}, opset=13, id=f"{op}-13-axis1"),
    ]


CASES = [
    Case("Relu", {"x": AWAY}, ["x"]),
    Case("Relu", {"x": AWAY}, ["x"], opset=9, id="Relu-9"),
    Case("LeakyRelu", {"x": AWAY}, ["x"], id="LeakyRelu-default-alpha"),
    Case("LeakyRelu", {"x": AWAY}, ["x"], {"alpha": 0.2}, opset=9, id="LeakyRelu-9-alpha"),
    Case("PRelu", {"x": away_from_zero(rng, (2, 3, 2, 2)), "slope": rng.uniform(0.1, 0.5, (3, 1, 1))},
         ["x", "slope"], id="PRelu-channel-slope"),
    Case("PRelu", {"x": AWAY, "slope": rng.uniform(0.1, 0.5, 4)}, ["x", "slope"], opset=9, id="PRelu-9-last-axis"),
    Case("PRelu", {"x": AWAY, "slope": np.float32(0.25)}, ["x"], opset=16, id="PRelu-16-scalar-slope"),
    Case("Clip", {"x": CLIPPED}, ["x"], {"min": -0.5, "max": 0.5}, opset=9, id="Clip-9-attrs"),
    Case("Clip", {"x": CLIPPED}, ["x"], {"min": -0.5}, opset=10, id="Clip-10-min-attr-only"),
    Case("Clip", {"x": CLIPPED}, ["x"], {"max": 0.5}, opset=9, id="Clip-9-max-attr-only"),
    Case("Clip", {"x": CLIPPED, "lo": LO, "hi": HI}, ["x"], opset=11, id="Clip-11-inputs"),
    Case("Clip", {"x": CLIPPED, "hi": HI}, ["x"], opset=13, input_order=["x", "", "hi"], id="Clip-13-no-min"),
    Case("Clip", {"x": CLIPPED, "lo": LO}, ["x"], opset=13, input_order=["x", "lo"], id="Clip-13-no-max"),
    Case("Clip", {"x": CLIPPED}, ["x"], opset=12, id="Clip-12-no-bounds"),
    Case("Sigmoid", {"x": X}, ["x"]),
    Case("HardSigmoid", {"x": HARD}, ["x"], id="HardSigmoid-default"),
    Case("HardSigmoid", {"x": HARD}, ["x"], {"alpha": 0.5, "beta": 0.5}, opset=9, id="HardSigmoid-9-attrs"),
    Case("HardSwish", {"x": SWISH}, ["x"], opset=14),
    Case("Tanh", {"x": X}, ["x"]),
    Case("Erf", {"x": X}, ["x"], opset=9, id="Erf-9"),
    Case("Erf", {"x": X}, ["x"], opset=13),
    # the two Gelu forms differ by < 1e-3 in slope (most near |x| = 2): a tight tolerance tells them apart
    Case("Gelu", {"x": GELU_X}, ["x"], opset=20, rtol=1e-5, id="Gelu-20-exact"),
    Case("Gelu", {"x": GELU_X}, ["x"], {"approximate": "tanh"}, opset=20, rtol=1e-5, id="Gelu-20-tanh"),
    Case("Mish", {"x": X * 2}, ["x"], opset=18),
    Case("Softplus", {"x": X * 2}, ["x"]),
    Case("Softsign", {"x": AWAY}, ["x"]),
    Case("Elu", {"x": AWAY}, ["x"], id="Elu-default"),
    Case("Elu", {"x": AWAY}, ["x"], {"alpha": 0.5}, opset=9, id="Elu-9-alpha"),
    Case("Selu", {"x": AWAY}, ["x"], id="Selu-default"),
    Case("Selu", {"x": AWAY}, ["x"], {"alpha": 1.5, "gamma": 2.0}, opset=9, id="Selu-9-attrs"),
    *_softmax_cases("Softmax"),
    *_softmax_cases("LogSoftmax"),
]

# Where onnx's reference evaluator (1.23) is not a float64 reference of the op, the check uses numpy instead:
# its Erf (and so Gelu) rounds to float32, and its Softmax/LogSoftmax before opset 13 ignore the 2-D coercion.
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _coerced(fn):
    """Opset < 13 softmax semantics: flatten to 2-D at `axis` (default 1), apply along dim 1, reshape back."""
    def run(case, feeds):
        x = feeds["x"]
        axis = case.attrs.get("axis", 1) % x.ndim
        return fn(x.reshape(math.prod(x.shape[:axis]), -1)).reshape(x.shape)
    return run


def _log_softmax(x2):
    shifted = x2 - x2.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


NUMPY = {
    "Erf": lambda case, feeds: _erf(feeds["x"]),
    "Gelu": lambda case, feeds: 0.5 * feeds["x"] * (1 + _erf(feeds["x"] / math.sqrt(2))),
    "Softmax": _coerced(lambda x2: np.exp(_log_softmax(x2))),
    "LogSoftmax": _coerced(_log_softmax),
}


def _numpy_reference(case):
    if case.op in ("Softmax", "LogSoftmax") and case.opset >= 13:
        return None
    if case.op == "Gelu" and case.attrs.get("approximate") == "tanh":
        return None
    return NUMPY.get(case.op)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case, monkeypatch):
    if (reference := _numpy_reference(case)) is not None:
        monkeypatch.setattr(gradcheck, "_reference", reference)
    check_case(case)


@pytest.mark.parametrize("case", [c for c in CASES if _numpy_reference(c) is not None], ids=str)
def test_numpy_reference_is_what_onnxruntime_computes(case):
    """The numpy stand-ins above must compute the op as onnxruntime runs it, or the checks prove nothing."""
    model = gradcheck._model(case, np.float32)
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    x = np.asarray(case.inputs["x"], np.float32)
    got = cpu_session(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _numpy_reference(case)(case, {"x": x.astype(np.float64)}), rtol=1e-5, atol=1e-6)


def test_hard_swish_slope_of_a_float32_map_is_exact_at_its_kinks():
    """A float32 4-D map's HardSwish slope comes from clipped depthwise 1x1 convolutions (ops onnxruntime keeps in
    its blocked layout): [x > 3] = clip(2^22 (x - 3), 0, 1) must be exact for every float, the kinks and their
    neighbours included. Values: torch's hardswish_backward rule (0 below -3, x/3 + 1/2 up to 3 included, 1 above)
    in float64 on the same float32 inputs."""
    from onnx import TensorProto, helper

    from onnxcam import rewrite
    from onnxcam.graph.model import ModelGraph
    from onnxcam.runtime import cpu_session

    near = []
    for k in (-3.0, 3.0):
        f = np.float32(k)
        near += [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    special = np.float32([*near, 0.0, -0.0, 1.5, -1.5, 6.0, -6.0, 1e-30, -1e-30, 3e38, -3e38, 1e6, -1e6])
    rng = np.random.default_rng(7)
    x = np.concatenate([special, rng.uniform(-8, 8, 64 - special.size).astype(np.float32)]).reshape(1, 4, 4, 4)
    node = helper.make_node("HardSwish", ["x"], ["y"])
    graph = helper.make_graph([node], "hs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    rw = rewrite.build(ModelGraph(model), ["x"], "y")
    ops = [n.op_type for n in rw.model.graph.node if n.name.startswith("onnxcam_grad")]
    assert "Conv" in ops and "Where" not in ops, ops
    u = rng.standard_normal(x.shape).astype(np.float32)
    sess = cpu_session(rw.model.SerializeToString(), rw.initializer_arrays())
    got = sess.run([rewrite.grad_name("x")], {"x": x, rewrite.SEED: u[:, None]})[0]
    x64 = x.astype(np.float64)
    slope = np.where(x64 < -3, 0.0, np.where(x64 <= 3, x64 / 3 + 0.5, 1.0))
    np.testing.assert_allclose(got, u * slope, rtol=1e-6, atol=1e-30)
