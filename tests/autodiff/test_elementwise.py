"""Numerical checks of onnxcam/autodiff/rules/elementwise.py."""

import numpy as np
import pytest
from onnx import TensorProto

from onnxcam.errors import OnnxCamError

from .gradcheck import Case, away_from_zero, check_case, distinct, onnxcam_gradients

rng = np.random.default_rng(1)
A = rng.standard_normal((2, 3, 4))
B = rng.standard_normal((3, 1))
C = rng.standard_normal(4)
POS = rng.uniform(0.5, 2.0, (2, 3, 4))
AWAY = away_from_zero(rng, (2, 3, 4), margin=0.2)
# Max/Min: values distinct across all three (broadcast) operands, so no two can tie
_D = distinct(rng, (2 * 3 * 4 + 3 + 4,))
DA, DB, DC = _D[:24].reshape(2, 3, 4), _D[24:27].reshape(3, 1), _D[27:]
COND = rng.random(4) < 0.5


def _variadic(op):
    return [
        Case(op, {"a": DA, "b": DB, "c": DC}, ["a", "b", "c"], id=f"{op}-three-broadcast"),
        Case(op, {"a": DA, "b": DB}, ["a", "b"], opset=8, id=f"{op}-8-two-broadcast"),
        Case(op, {"a": DA}, ["a"], id=f"{op}-single"),
    ]


CASES = [
    Case("Add", {"a": A, "b": B}, ["a", "b"], id="Add-broadcast"),
    Case("Add", {"a": A, "b": C}, ["a", "b"], opset=13, id="Add-13-broadcast-1d"),
    Case("Sub", {"a": A, "b": B}, ["a", "b"], id="Sub-broadcast"),
    Case("Sub", {"a": C, "b": A}, ["a", "b"], opset=14, id="Sub-14-broadcast-first"),
    Case("Mul", {"a": A, "b": B}, ["a", "b"], id="Mul-broadcast"),
    Case("Mul", {"a": A, "b": A[1]}, ["a", "b"], opset=9, id="Mul-9-broadcast-2d"),
    Case("Div", {"a": A, "b": POS[0, :, :1]}, ["a", "b"], id="Div-broadcast"),
    Case("Div", {"a": C, "b": POS}, ["a", "b"], opset=13, id="Div-13-broadcast-numerator"),
    Case("Pow", {"x": POS, "p": B}, ["x", "p"], id="Pow-base-and-exponent-broadcast"),
    Case("Pow", {"x": POS[0], "p": POS}, ["x", "p"], opset=7, id="Pow-7-broadcast-base"),
    Case("Pow", {"x": A, "p": np.int64(3)}, ["x"], opset=15, id="Pow-15-int-exponent-negative-base"),
    Case("Pow", {"x": A, "p": np.float32(2.0)}, ["x"], opset=13, id="Pow-13-square"),
    Case("Neg", {"x": A}, ["x"]),
    Case("Sqrt", {"x": POS}, ["x"]),
    Case("Reciprocal", {"x": AWAY}, ["x"]),
    Case("Exp", {"x": A}, ["x"]),
    Case("Log", {"x": POS}, ["x"]),
    Case("Abs", {"x": AWAY}, ["x"]),
    *_variadic("Max"),
    *_variadic("Min"),
    Case("Sum", {"a": A, "b": B, "c": C}, ["a", "b", "c"], id="Sum-three-broadcast"),
    Case("Sum", {"a": A}, ["a"], opset=8, id="Sum-8-single"),
    Case("Mean", {"a": A, "b": B, "c": C}, ["a", "b", "c"], id="Mean-three-broadcast"),
    Case("Mean", {"a": A, "b": A}, ["a", "b"], opset=13, id="Mean-13-two"),
    Case("Where", {"cond": COND, "a": A, "b": B}, ["a", "b"], input_order=["cond", "a", "b"],
         id="Where-broadcast-condition"),
    Case("Where", {"cond": COND.reshape(1, 4), "a": C, "b": A}, ["a", "b"], opset=9, input_order=["cond", "a", "b"],
         id="Where-9-broadcast-all"),
    Case("Identity", {"x": A}, ["x"]),
    Case("Dropout", {"x": A}, ["x"], {"ratio": 0.3}, opset=7, id="Dropout-7-ratio-attr"),
    Case("Dropout", {"x": A}, ["x"], {"ratio": 0.3}, opset=10, n_outputs=2, id="Dropout-10-ratio-attr-mask"),
    Case("Dropout", {"x": A, "ratio": np.float32(0.3), "training": np.bool_(False)}, ["x"], opset=13,
         input_order=["x", "ratio", "training"], id="Dropout-13-inference-inputs"),
    Case("Dropout", {"x": A}, ["x"], opset=12, id="Dropout-12-no-optional-inputs"),
    # The reference evaluates this cast in float32: a tiny step would measure rounding. Cast is linear, so h=0.1.
    Case("Cast", {"x": A}, ["x"], {"to": TensorProto.FLOAT}, opset=13, h=0.1, id="Cast-13-float"),
    Case("Cast", {"x": A}, ["x"], {"to": TensorProto.DOUBLE}, opset=9, id="Cast-9-to-double"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case):
    check_case(case)


@pytest.mark.parametrize("op, pick", [("Max", np.maximum), ("Min", np.minimum)])
def test_max_min_ties_split_evenly(op, pick):
    """Where operands tie at the result, each gets gy / (number tied), like torch.maximum."""
    a = np.round(rng.standard_normal((3, 4)))  # few distinct values: many ties
    b, c = np.round(rng.standard_normal((3, 4))), np.round(rng.standard_normal(4))
    seed = rng.standard_normal((3, 4))
    grads = onnxcam_gradients(Case(op, {"a": a, "b": b, "c": c}, ["a", "b", "c"]), seed)
    y = pick(pick(a, b), c)
    hits = [(v == y).astype(np.float64) for v in (a, b, c)]
    count = hits[0] + hits[1] + hits[2]
    assert (count > 1).any(), "the inputs should contain ties"
    np.testing.assert_allclose(grads["a"], seed * hits[0] / count, rtol=1e-6)
    np.testing.assert_allclose(grads["b"], seed * hits[1] / count, rtol=1e-6)
    np.testing.assert_allclose(grads["c"], (seed * hits[2] / count).sum(axis=0), rtol=1e-6)


@pytest.mark.parametrize("case, message", [
    (Case("Cast", {"x": A}, ["x"], {"to": TensorProto.INT64}), "INT64"),
    (Case("Dropout", {"x": A, "ratio": np.float32(0.3), "training": np.bool_(True)}, ["x"], opset=13,
          input_order=["x", "ratio", "training"]), "training mode"),
    (Case("Dropout", {"x": A}, ["x"], opset=6), "training mode"),  # is_test=0 by default
], ids=str)
def test_refused(case, message):
    with pytest.raises(OnnxCamError, match=message):
        onnxcam_gradients(case, np.ones((2, 3, 4)))


# ---- x * Sigmoid(x) (SiLU / Swish, spelled out by EfficientNet exports) --------------------------------------------
def _silu_model(order: str, extra_sigmoid_consumer: bool):
    from onnx import helper

    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Mul", ["x", "s"] if order == "xs" else ["s", "x"], ["y"])]
    if extra_sigmoid_consumer:  # s also reaches the score on its own: its gradient path may not be folded away
        nodes += [helper.make_node("Mul", ["s", "v"], ["sv"]), helper.make_node("Add", ["y", "sv"], ["out"])]
    else:
        nodes += [helper.make_node("Identity", ["y"], ["out"])]
    graph = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor("v", TensorProto.FLOAT, [4], V.astype(np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


V = rng.standard_normal(4)


def _silu_gradients(model, layers, u):
    from onnxcam import rewrite
    from onnxcam.graph.model import ModelGraph
    from onnxcam.runtime import cpu_session

    rw = rewrite.build(ModelGraph(model), layers, "out")
    sess = cpu_session(rw.model.SerializeToString(), rw.initializer_arrays())
    feeds = {"x": A.astype(np.float32), rewrite.SEED: u.astype(np.float32)[:, None]}
    if rw.has_ranking:
        feeds[rewrite.RANKED] = np.array(False)
    ops = [n.op_type for n in rw.model.graph.node if n.name.startswith("onnxcam_grad")]
    return dict(zip(layers, sess.run([rewrite.grad_name(layer) for layer in layers], feeds))), ops


@pytest.mark.parametrize("order", ["xs", "sx"])
@pytest.mark.parametrize("extra", [False, True], ids=["alone", "sigmoid-also-used"])
def test_silu_gradient_matches_the_closed_form_in_float64(order, extra):
    u = rng.standard_normal((2, 3, 4))
    s = 1 / (1 + np.exp(-A))
    want = u * (s + A * s * (1 - s)) + (u * V * s * (1 - s) if extra else 0)
    got, ops = _silu_gradients(_silu_model(order, extra), ["x"], u)
    np.testing.assert_allclose(got["x"], want, rtol=1e-5, atol=1e-6)
    # folded: the Sigmoid branch gets no backward of its own (4 elementwise passes, no Sum of two branches)
    assert ("Sum" in ops) == extra


def test_silu_with_the_sigmoid_as_a_target_is_not_folded():
    u = rng.standard_normal((2, 3, 4))
    s = 1 / (1 + np.exp(-A))
    got, _ = _silu_gradients(_silu_model("xs", False), ["x", "s"], u)
    np.testing.assert_allclose(got["s"], u * A, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["x"], u * (s + A * s * (1 - s)), rtol=1e-5, atol=1e-6)
