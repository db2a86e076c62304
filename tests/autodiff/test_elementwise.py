"""Numerical checks of onnxcam/autodiff/rules/elementwise.py."""

import numpy as np
import pytest

from .gradcheck import Case, check_case

rng = np.random.default_rng(1)
A = rng.standard_normal((2, 3, 4))
B = rng.standard_normal((3, 1))
POS = rng.uniform(0.5, 2.0, (2, 3, 4))

CASES = [
    Case("Add", {"a": A, "b": B}, ["a", "b"], id="Add-broadcast"),
    Case("Sub", {"a": A, "b": B}, ["a", "b"], id="Sub-broadcast"),
    Case("Mul", {"a": A, "b": B}, ["a", "b"], id="Mul-broadcast"),
    Case("Div", {"a": A, "b": POS[0, :, :1]}, ["a", "b"], id="Div-broadcast"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case):
    check_case(case)
