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


def test_broadcasting_is_summed_back_only_by_the_walk():
    """Rules declare a broadcast-shaped gradient (broadcast=True, b.broadcast_shaped); none reduces it itself, so
    the reduction lives in one place (engine.backward)."""
    import pathlib

    from onnxcam.autodiff import rules
    offenders = [f"{path.name}:{i}" for path in sorted(pathlib.Path(rules.__file__).parent.glob("*.py"))
                 for i, line in enumerate(path.read_text().splitlines(), 1) if "unbroadcast(" in line]
    assert offenders == []
