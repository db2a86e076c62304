"""Numerical checks of onnxcam/autodiff/rules/reduce.py: every Reduce* op with axes as attribute (ReduceSum before
opset 13, the others before 18) and as input, keepdims 0/1, negative axes, all axes, and noop_with_empty_axes."""

import numpy as np
import pytest

from . import gradcheck
from .gradcheck import Case, check_case, distinct, onnxcam_gradients
from .test_linalg import with_rank0_io

rng = np.random.default_rng(3)
X = rng.standard_normal((2, 3, 4))
POS = rng.uniform(0.5, 2.0, (2, 3, 4))  # ReduceLogSum needs a positive sum
AWAY = np.where(rng.random((2, 3, 4)) < 0.5, -1.0, 1.0) * rng.uniform(0.3, 1.5, (2, 3, 4))  # ReduceL1: |x| kinks
UNIQUE = distinct(rng, (2, 3, 4))  # ReduceMax/Min: no ties
INPUT_FORM = {"ReduceSum": 13}  # the first opset reading axes from an input; 18 for the rest


def _ints(v):
    return np.asarray(v, np.int64)


def _cases(op, x):
    new = INPUT_FORM.get(op, 18)
    old = new - 1 if op != "ReduceSum" else 11
    return [
        Case(op, {"x": x}, ["x"], {"axes": [2, 1]}, opset=10, id=f"{op}-10-attr-two-axes"),
        Case(op, {"x": x}, ["x"], {"axes": [1]}, opset=old, id=f"{op}-{old}-attr-axis1"),
        Case(op, {"x": x}, ["x"], {"axes": [0, -1], "keepdims": 0}, opset=old, id=f"{op}-{old}-attr-neg-keep0"),
        Case(op, {"x": x}, ["x"], {"keepdims": 0}, opset=old, id=f"{op}-{old}-attr-all-axes"),
        Case(op, {"x": x, "axes": _ints([-2])}, ["x"], {"keepdims": 1}, opset=new, id=f"{op}-{new}-input-keep1"),
        Case(op, {"x": x, "axes": _ints([2, 0])}, ["x"], {"keepdims": 0}, opset=new, id=f"{op}-{new}-input-keep0"),
        Case(op, {"x": x}, ["x"], {"keepdims": 0}, opset=new, input_order=["x"], id=f"{op}-{new}-input-omitted"),
        Case(op, {"x": x, "axes": _ints([])}, ["x"], {"noop_with_empty_axes": 1}, opset=new,
             id=f"{op}-{new}-noop-empty-axes"),
    ]


CASES = (_cases("ReduceSum", X) + _cases("ReduceMean", X) + _cases("ReduceMax", UNIQUE)
         + _cases("ReduceMin", UNIQUE) + _cases("ReduceL1", AWAY) + _cases("ReduceL2", X)
         + _cases("ReduceSumSquare", X) + _cases("ReduceLogSum", POS) + _cases("ReduceLogSumExp", X))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case, monkeypatch):
    monkeypatch.setattr(gradcheck, "_model", with_rank0_io(gradcheck._model))  # all axes, keepdims=0: rank 0
    check_case(case)


@pytest.mark.parametrize("op, pick", [("ReduceMax", np.max), ("ReduceMin", np.min)])
@pytest.mark.parametrize("opset", [10, 18])
def test_ties_split_evenly(op, pick, opset):
    """Tied extrema share gy evenly, like torch.amax (finite differences cannot see this: ties are kinks)."""
    x = np.round(rng.standard_normal((2, 3, 4)))  # few distinct values: many ties
    attrs, inputs = {"keepdims": 0}, {"x": x}
    if opset < 18:
        attrs["axes"] = [2]
    else:
        inputs["axes"] = _ints([2])
    seed = rng.standard_normal((2, 3))
    grad = onnxcam_gradients(Case(op, inputs, ["x"], attrs, opset=opset), seed)["x"]
    hit = (x == pick(x, axis=2, keepdims=True)).astype(np.float64)
    assert (hit.sum(axis=2) > 1).any(), "the input should contain ties"
    np.testing.assert_allclose(grad, seed[..., None] * hit / hit.sum(axis=2, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("op, formula", [("ReduceSum", "_reduce_sum"), ("ReduceMax", "_reduce_max_min"),
                                         ("ReduceLogSumExp", "_reduce_log_sum_exp")])
def test_reduce_rules_are_named_after_their_formula(op, formula):
    """An internal error blames a reduction's formula by name (engine.rule_name), not a shared wrapper."""
    from onnxcam.autodiff.engine import rule_name
    from onnxcam.autodiff.rules import find_rule, load_all
    load_all()
    assert rule_name(find_rule(op, 18)) == f"reduce.{formula}"
