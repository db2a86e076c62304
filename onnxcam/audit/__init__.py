"""Audits: the same images explained by several models (an fp32 model and its edge builds, two exporters' graphs)
and compared with the first (`onnxcam compare`)."""

from .compare import AGREEMENT, DISTANCES, Comparison, ModelSpec, compare
from .report import write_reports

__all__ = ["AGREEMENT", "DISTANCES", "Comparison", "ModelSpec", "compare", "write_reports"]
