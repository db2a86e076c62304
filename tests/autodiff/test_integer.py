"""Checks of onnxcam/autodiff/rules/integer.py (ConvInteger, MatMulInteger) and quantize.py's DynamicQuantizeLinear:
onnxruntime's dynamic quantization, differentiated straight through as its float equivalent.

Each case is the chain quantize_dynamic writes: x -> DynamicQuantizeLinear -> ConvInteger/MatMulInteger (weights
integer, with zero points) -> Cast -> Mul by x_scale * w_scale; for DynamicQuantizeLinear alone, x ->
DynamicQuantizeLinear -> DequantizeLinear. The reference is the float op on the dequantized weights, (w - zp) *
scale, in float64 (the identity for the lone quantizer); the chain is linear in that convention, so central
differences are exact. Every case also checks that onnxruntime's quantized output is the float equivalent within
its rounding, so the function differentiated is the one the runtime computes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from . import gradcheck
from .gradcheck import Case
from .test_qlinear import onnx_op

rng = np.random.default_rng(17)


def conv_case(id, w_zp, w_scale, **attrs):
    """ConvInteger on x (1, 4, 6, 5) with uint8 weights (8, 4/group, 3, 3); w_scale scalar or per output channel
    (onnxruntime's ConvInteger takes only a per-tensor zero point)."""
    group = attrs.get("group", 1)
    w = rng.integers(0, 256, (8, 4 // group, 3, 3)).astype(np.uint8)
    inputs = {"x": rng.standard_normal((1, 4, 6, 5)), "w": w, "w_zp": np.asarray(w_zp, np.uint8),
              "w_scale": np.asarray(w_scale, np.float32)}
    return Case("ConvInteger", inputs, ["x"], attrs, 13, id=f"ConvInteger-{id}")


def matmul_case(id, a_shape, w_zp, w_scale):
    """MatMulInteger of x (any rank) by int8 weights (K, 6); w_zp scalar or per column. Weights in 7 bits, as
    quantize_dynamic's reduce_range keeps them: onnxruntime's u8 x s8 kernels add pairs of products in int16,
    which saturates with full-range weights (its forward then leaves the float equivalent)."""
    w = rng.integers(-63, 64, (a_shape[-1], 6)).astype(np.int8)
    inputs = {"x": rng.standard_normal(a_shape), "w": w, "w_zp": np.asarray(w_zp, np.int8),
              "w_scale": np.asarray(w_scale, np.float32)}
    return Case("MatMulInteger", inputs, ["x"], {}, 13, id=f"MatMulInteger-{id}")


CASES = [
    Case("DynamicQuantizeLinear", {"x": rng.standard_normal((2, 3, 4)) * 3}, ["x"], {}, 11, id="DQL-then-DQ"),
    Case("DynamicQuantizeLinear", {"x": rng.uniform(0.5, 2.0, (2, 5))}, ["x"], {}, 20,
         id="DQL-positive-range-opset20"),  # the range is widened to hold 0: zero point 0
    conv_case("scalar-zp", 131, 0.004, pads=[1, 1, 1, 1]),
    conv_case("per-channel-scale-strided-grouped", 120, rng.uniform(0.002, 0.006, 8), strides=[2, 1], group=2),
    matmul_case("3d-scalar-zp", (5, 2, 4), 0, 0.01),
    matmul_case("per-column-zp", (3, 4), rng.integers(-5, 5, 6), rng.uniform(0.005, 0.02, 6)),
]


def _dequantized_weight(case: Case) -> np.ndarray:
    w, zp, s = (np.asarray(case.inputs[k], np.float64) for k in ("w", "w_zp", "w_scale"))
    if case.op == "ConvInteger" and s.ndim:
        s = s[:, None, None, None]
    return (w - zp) * s


def _chain_model(case: Case, dtype=np.float32) -> onnx.ModelProto:
    """quantize_dynamic's chain for a case (output y0, as gradcheck expects)."""
    x = case.inputs["x"]
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"])]
    inits = []
    if case.op == "DynamicQuantizeLinear":
        nodes.append(helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["y0"]))
    else:
        scale = np.asarray(case.inputs["w_scale"], np.float32)
        if case.op == "ConvInteger" and scale.ndim:
            scale = scale.reshape(-1, 1, 1)  # per output channel, against (N, M, H, W)
        inits = [numpy_helper.from_array(np.asarray(case.inputs[k]), k) for k in ("w", "w_zp")]
        inits.append(numpy_helper.from_array(scale, "w_scale"))
        nodes += [helper.make_node(case.op, ["xq", "w", "xz", "w_zp"], ["acc"], **case.attrs),
                  helper.make_node("Cast", ["acc"], ["accf"], to=onnx.TensorProto.FLOAT),
                  helper.make_node("Mul", ["xs", "w_scale"], ["scale"]),
                  helper.make_node("Mul", ["accf", "scale"], ["y0"])]
    graph = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y0", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 8
    return model


def _float_equivalent(case: Case, feeds64: dict) -> np.ndarray:
    x = feeds64["x"]
    if case.op == "DynamicQuantizeLinear":
        return x
    if case.op == "MatMulInteger":
        return x @ _dequantized_weight(case)
    return onnx_op("Conv", **case.attrs)(x, _dequantized_weight(case))


@pytest.fixture
def chain(monkeypatch):
    monkeypatch.setattr(gradcheck, "_model", _chain_model)
    monkeypatch.setattr(gradcheck, "_reference", _float_equivalent)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case, chain):
    gradcheck.check_case(case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_runtime_computes_the_float_equivalent(case):
    """Within rounding: x quantized to 8 bits (half a step of its range), times the weights' size."""
    from onnxcam.runtime import cpu_session

    x = np.asarray(case.inputs["x"], np.float32)
    got = cpu_session(_chain_model(case).SerializeToString()).run(None, {"x": x})[0]
    want = _float_equivalent(case, {"x": x.astype(np.float64)})
    step = (max(x.max(), 0) - min(x.min(), 0)) / 255
    weight = 1.0 if case.op == "DynamicQuantizeLinear" else np.abs(_dequantized_weight(case)).sum(
        axis=tuple(range(1, 4)) if case.op == "ConvInteger" else 0).max()
    assert np.abs(got - want).max() <= 0.5 * step * weight + 1e-5
