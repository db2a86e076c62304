"""Audits: the same images explained by several models (an fp32 model and its edge builds, two exporters' graphs)
and compared with the first (`onnxcam compare`); the HTML pages people read (compare's report, explain's contact
sheet)."""

from .compare import AGREEMENT, DISTANCES, Comparison, ModelSpec, compare
from .report import write_reports
from .sheet import write_contact_sheet

__all__ = ["AGREEMENT", "DISTANCES", "Comparison", "ModelSpec", "compare", "write_contact_sheet", "write_reports"]
