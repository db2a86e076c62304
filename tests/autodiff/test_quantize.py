"""Checks of onnxcam/autodiff/rules/quantize.py: the straight-through estimator.

Finite differences of a rounding op are meaningless, so each Case here is a QuantizeLinear -> DequantizeLinear
pair (Q with `scale`, DQ with `dq_scale`), and the check is closed-form: the gradient reaching x is the seed times
dq_scale / scale, broadcast along `axis` for per-axis scales. With equal scales the pair passes the seed unchanged.
"""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcam.errors import UnsupportedOpError

from . import gradcheck
from .gradcheck import Case

rng = np.random.default_rng(7)
X = rng.standard_normal((2, 3, 4))
S3 = rng.uniform(0.01, 0.1, 3).astype(np.float32)
S4 = rng.uniform(0.01, 0.1, 4).astype(np.float32)
S = np.float32(0.037)


def _pair(op, scale, dq_scale, zp=None, opset=13, attrs=None, id=""):
    inputs = {"x": X, "scale": scale, "dq_scale": dq_scale}
    if zp is not None:
        inputs["zp"] = zp
    return Case(op, inputs, ["x"], attrs or {}, opset=opset, id=id)


CASES = [
    _pair("QuantizeLinear", S, S, np.int8(3), opset=10, id="QDQ-10-per-tensor-same-scale"),
    _pair("QuantizeLinear", S, np.float32(0.011), np.uint8(128), opset=10, id="QDQ-10-per-tensor-two-scales"),
    _pair("QuantizeLinear", S3, S3, np.zeros(3, np.int8), id="QDQ-13-per-axis-default-axis"),
    _pair("QuantizeLinear", S3[::-1].copy(), S3, np.zeros(3, np.int8), id="QDQ-13-per-axis-two-scales"),
    _pair("DequantizeLinear", S4, S4, np.zeros(4, np.uint8), attrs={"axis": -1}, id="QDQ-13-per-axis-negative"),
    _pair("DequantizeLinear", np.float32(0.25), np.float32(0.25), opset=19, id="QDQ-19-no-zero-point-power-of-two"),
    _pair("DequantizeLinear", S4, S4 * 2, np.zeros(4, np.int8), opset=21, attrs={"axis": 2},
          id="QDQ-21-per-axis-two-scales"),
]


def _pair_model(case, dtype=np.float32):
    """The Q -> DQ model of a case, standing in for gradcheck's single-node model (output y0, as it expects)."""
    zp = ["zp"] if "zp" in case.inputs else []
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", *zp], ["q"], **case.attrs),
             helper.make_node("DequantizeLinear", ["q", "dq_scale", *zp], ["y0"], **case.attrs)]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in case.inputs.items() if k != "x"]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, X.shape)],
                              [helper.make_tensor_value_info("y0", onnx.TensorProto.FLOAT, X.shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 8 if case.opset < 19 else 10
    return model


@pytest.fixture
def pair(monkeypatch):
    """onnxcam's gradient of sum(seed * y0) w.r.t. x for a case's Q -> DQ pair, through gradcheck's own runner."""
    monkeypatch.setattr(gradcheck, "_model", _pair_model)
    return lambda case, seed: gradcheck.onnxcam_gradients(case, seed)["x"]


def _unclamped(case):
    """1 where the quantized value is strictly inside its type's range, for a per-tensor uint8 quantization whose
    zero point is 0 (given or omitted): such a range starts at zero, the sign of a folded Relu, and quantize.py
    then passes no gradient where it clamps, as the float Relu would. 1 everywhere otherwise."""
    zp = np.asarray(case.inputs.get("zp", np.uint8(0)))
    if np.ndim(case.inputs["scale"]) or zp.dtype != np.uint8 or int(zp) != 0:
        return np.ones(X.shape)
    q = np.round(X / case.inputs["scale"])
    return ((q > 0) & (q < 255)).astype(np.float64)


def _along_axis(scale, case):
    scale = np.asarray(scale, np.float32)
    if scale.ndim == 0:
        return scale
    shape = [1] * X.ndim
    shape[case.attrs.get("axis", 1)] = -1
    return scale.reshape(shape)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_straight_through(case, pair):
    seed = rng.standard_normal(X.shape).astype(np.float32)
    grad = pair(case, seed)
    ratio = _along_axis(case.inputs["dq_scale"], case) / _along_axis(case.inputs["scale"], case)
    np.testing.assert_allclose(grad, seed * ratio * _unclamped(case), rtol=1e-6, atol=0)
    same, s = np.array_equal(case.inputs["scale"], case.inputs["dq_scale"]), case.inputs["scale"]
    if same and np.all(np.frexp(s)[0] == 0.5):  # g * s / s is exactly g for power-of-two scales
        np.testing.assert_array_equal(grad, seed * _unclamped(case))


def test_blocked_quantization_is_refused(pair):
    case = _pair("QuantizeLinear", S3, S3, opset=21, attrs={"axis": 1, "block_size": 2})
    with pytest.raises(UnsupportedOpError, match="block_size"):
        pair(case, np.ones(X.shape, np.float32))
