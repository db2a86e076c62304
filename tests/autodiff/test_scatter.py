"""Numerical checks of the ScatterElements rule (onnxcam/autodiff/rules/select.py), which MaxPool's and TopK's
gradients emit: a second derivative (ShapleyCAM's Hessian-vector product, tests/test_shapley.py) passes through it.
Single-node gradcheck cases against onnx's float64 evaluator, for the data and the updates: without a reduction
(distinct positions per column: repeated ones are undefined in ONNX) and with reduction='add' (positions repeat).
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxcam.errors import UnsupportedOpError

from .gradcheck import Case, check_case, distinct

rng = np.random.default_rng(29)
DATA = distinct(rng, (2, 3, 4))
UPDATES = distinct(rng, (2, 2, 4))
DISTINCT = np.stack([np.stack([rng.permutation(3)[:2] for _ in range(4)], axis=1) for _ in range(2)])  # (2, 2, 4)
REPEATED = rng.integers(0, 3, (2, 2, 4))


def scatter(indices, opset, id, **attrs):
    return Case("ScatterElements", {"x": DATA, "i": np.asarray(indices, np.int64), "u": UPDATES}, ["x", "u"], attrs,
                opset, id=f"ScatterElements-{opset}-{id}")


CASES = [
    scatter(DISTINCT, 11, "axis1", axis=1),
    scatter(DISTINCT - 3, 18, "negative-axis-and-indices", axis=-2),
    scatter(REPEATED, 16, "add-repeated", axis=1, reduction="add"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case):
    check_case(case)


def test_other_reductions_are_a_clear_error():
    case = scatter(REPEATED, 16, "mul", axis=1, reduction="mul")
    with pytest.raises(UnsupportedOpError, match=r"ScatterElements node .*reduction 'mul'"):
        check_case(case)


def test_the_cases_positions_are_distinct_or_repeat_as_named():
    columns = lambda idx: idx.transpose(0, 2, 1).reshape(-1, idx.shape[1])  # positions per column
    assert all(len(set(col)) == len(col) for col in columns(DISTINCT))
    assert any(len(set(col)) < len(col) for col in columns(REPEATED))
