"""RoiAlign's numerical cases live in tests/test_roi_align.py; listed here for test_rule_coverage."""

from tests.test_roi_align import CASES  # noqa: F401
