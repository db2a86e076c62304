"""Numerical checks of onnxcam/autodiff/rules/reduce.py: every Reduce* op with axes as attribute (ReduceSum before
opset 13, the others before 18) and as input, keepdims 0/1, negative axes, all axes, and noop_with_empty_axes."""

import numpy as np
import pytest

from .gradcheck import Case, check_case, distinct

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
def test_rule(case):
    check_case(case)
