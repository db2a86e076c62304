"""Which map can I trust? Faithfulness and localization metrics for CAMs, on numpy, every perturbed batch run
through onnxruntime.

pytorch-grad-cam 1.5.7's module paths (`onnxcam.metrics.road`, `onnxcam.metrics.cam_mult_image`,
`onnxcam.metrics.perturbation_confidence`, `onnxcam.metrics.arcc`), torchcam 0.5's ClassificationMetric and
DeletionInsertionMetric (`onnxcam.metrics.classification`), and the pointing games (`onnxcam.metrics.pointing`).
A metric takes the model as an onnxcam Explainer, a path, bytes or a ModelProto (or a ModelScorer, to choose the
device, batch size or output tensor), and builds one plain onnxruntime session for it.
"""

from ._scoring import ModelScorer
from .arcc import ARCC, Coherency, Complexity
from .cam_mult_image import CamMultImageConfidenceChange, DropInConfidence, IncreaseInConfidence
from .classification import ClassificationMetric, DeletionInsertionMetric
from .perturbation_confidence import AveragerAcrossThresholds, PerturbationConfidenceMetric
from .pointing import energy_pointing_game, pointing_game
from .road import (
    NoisyLinearImputer,
    ROADCombined,
    ROADLeastRelevantFirst,
    ROADLeastRelevantFirstAverage,
    ROADMostRelevantFirst,
    ROADMostRelevantFirstAverage,
)

__all__ = [
    "ARCC",
    "AveragerAcrossThresholds",
    "CamMultImageConfidenceChange",
    "ClassificationMetric",
    "Coherency",
    "Complexity",
    "DeletionInsertionMetric",
    "DropInConfidence",
    "IncreaseInConfidence",
    "ModelScorer",
    "NoisyLinearImputer",
    "PerturbationConfidenceMetric",
    "ROADCombined",
    "ROADLeastRelevantFirst",
    "ROADLeastRelevantFirstAverage",
    "ROADMostRelevantFirst",
    "ROADMostRelevantFirstAverage",
    "energy_pointing_game",
    "pointing_game",
]
