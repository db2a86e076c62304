"""The fuzzer (tests/fuzz.py) over every family: hostile model bytes, crafted models, hostile external data,
hostile images and hostile input arrays. Every failure kind (a foreign exception, a silent wrong answer, a read
outside the model folder, a partial file, a hang, a crash) must count 0; the message lists the cases.
"""

from __future__ import annotations

from collections import Counter

import pytest

from .fuzz import FAILURES, FAMILIES, report, run_family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz_family_has_no_failures(family):
    rows = run_family(family, seed=0)
    assert len(rows) == FAMILIES[family][1]
    counts = Counter(r["kind"] for r in rows)
    assert counts["ok"] + counts["refused"] > 0
    assert not any(counts[k] for k in FAILURES), report({family: rows})
