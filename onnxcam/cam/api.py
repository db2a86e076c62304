"""explain(): the functional face of the CAM methods."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..explainer import Explainer, Result
from . import cams, fullgrad, gradient_free, guided

# method name -> class; "gradcam++" has "gradcampp" as an alias for command lines and file names
CLASSES = {
    "gradcam": cams.GradCAM,
    "hirescam": cams.HiResCAM,
    "gradcam_elementwise": cams.GradCAMElementWise,
    "gradcam++": cams.GradCAMPlusPlus,
    "gradcampp": cams.GradCAMPlusPlus,
    "xgradcam": cams.XGradCAM,
    "layercam": cams.LayerCAM,
    "eigencam": cams.EigenCAM,
    "eigengradcam": cams.EigenGradCAM,
    "kpca_cam": cams.KPCA_CAM,
    "counterfactual_gradcam": cams.CounterfactualGradCAM,
    "cam": cams.CAM,
    "saliency": cams.Saliency,
    "gradient_x_input": cams.GradientXInput,
    "guided_backprop": guided.GuidedBackprop,
    "guided_gradcam": guided.GuidedGradCAM,
    "randomcam": cams.RandomCAM,
    "fem": cams.FEM,
    "finercam": cams.FinerCAM,
    "scorecam": gradient_free.ScoreCAM,
    "ablationcam": gradient_free.AblationCAM,
    "fullgrad": fullgrad.FullGrad,
}
_INPUT_METHODS = {"saliency", "gradient_x_input", "guided_backprop"}


@dataclass
class Explanation:
    maps: np.ndarray            # (N, H, W) float32 in [0, 1] at the input's size; (N, H, W, C) for the guided methods
    raw: dict                   # layer -> (N, h, w) raw map before ReLU and scaling (Grad-CAM's for guided_gradcam)
    logits: np.ndarray          # (N, K): the score
    targets: np.ndarray         # (N,): the explained classes (-1 where the seed is not one class)
    layers: list                # the target layers, as tensor names
    method: str
    result: Result              # the run's activations and gradients
    # per sample: one line saying why its map is all zero (no finding: a zero gradient, nothing positive), or None
    degenerate_reasons: list = field(default_factory=list)

    @property
    def degenerate(self) -> np.ndarray:
        """(N,) bool: the samples whose map is all zero (degenerate_reasons says why)."""
        return np.array([why is not None for why in self.degenerate_reasons], bool)


def explanation(obj, maps: np.ndarray, method: str) -> Explanation:
    """The Explanation of the call that `obj` (a method object of method_object) just made in this thread."""
    inner = obj.gradcam if method == "guided_gradcam" else obj
    r = inner.result
    return Explanation(maps, dict(getattr(inner, "raw", {})), r.logits, r.targets, list(inner.target_layers), method,
                       r, list(obj.degenerate_reasons))


def method_object(model, method: str, layers=None, *, device: str = "auto", channels_last: bool | None = None,
                  **options):
    """The method's object (a BaseCAM, or GuidedGradCAM) on a path, bytes, ModelProto or Explainer."""
    cls = CLASSES.get(method)
    if cls is None:
        raise InputError(f"unknown method {method!r}; choose from {', '.join(CLASSES)}")
    if method in _INPUT_METHODS:
        device = model.device if isinstance(model, Explainer) else device
        return cls(model, device=device, channels_last=channels_last, **options)
    if isinstance(model, Explainer):
        return cls(model, layers, channels_last=channels_last, **options)
    return cls(model, layers, device=device, channels_last=channels_last, **options)


def explain(model, x, method: str = "hirescam", targets=None, layers=None, *, device: str = "auto",
            eigen_smooth: bool = False, aug_smooth: bool = False, channels_last: bool | None = None,
            **options) -> Explanation:
    """Explain a preprocessed batch with one method; model is a path, bytes, ModelProto or Explainer.

    method: one of onnxcam.cam.api.CLASSES (gradcam, hirescam, gradcam++, ..., guided_gradcam).
    targets: None (each sample's top class), an int, or one target per sample (ints or onnxcam.targets objects).
    layers: target layer names or module paths, None for the automatic choice (ignored by input-space methods).
    options: passed to the method's class (e.g. kernel= for kpca_cam, score= / output= / input_shape=).
    """
    obj = method_object(model, method, layers, device=device, channels_last=channels_last, **options)
    if method == "guided_backprop":
        maps = obj(x, targets)
    else:
        maps = obj(x, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)
    return explanation(obj, maps, method)
