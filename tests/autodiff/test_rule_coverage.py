"""Meta-test: every registered gradient rule has at least one numerical test case."""

import importlib
import pkgutil

import tests.autodiff as pkg
from onnxcam.autodiff.rules import RULES, load_all, rule_key


def _all_cases():
    cases = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("test_"):
            cases += getattr(importlib.import_module(f"tests.autodiff.{info.name}"), "CASES", [])
    return cases


def test_every_rule_has_a_numerical_case():
    load_all()
    tested = {rule_key(c.op, c.domain) for c in _all_cases()}
    untested = sorted(set(RULES) - tested)
    assert not untested, f"rules without a numerical test case: {untested}"
