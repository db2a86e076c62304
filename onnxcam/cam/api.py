"""explain(): the functional face of the CAM methods."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..explainer import Explainer, Result
from . import cams, fullgrad, gradient_free, guided, shapley, torchcam_methods


@dataclass(frozen=True)
class MethodInfo:
    """One CAM method as the command line, explain() and the classes see it (REGISTRY is the one list of them)."""

    cls: type
    title: str                      # the name in the README's method table
    class_agnostic: bool = False    # the map does not depend on the target class (written once per image)
    shared_run: bool = True         # maps from a run shared with other methods (BaseCAM.maps_for); False: its own call
    input_space: bool = False       # a map at the model input (no target layer)
    aliases: tuple[str, ...] = ()


# method name -> MethodInfo: the one registry that the command line (cli.py, pipeline.py), explain() and the class
# lookup read; a method added here is reachable from all three (tests/test_method_registry.py checks it, and that the
# README's method table lists it)
REGISTRY: dict[str, MethodInfo] = {
    "gradcam": MethodInfo(cams.GradCAM, "Grad-CAM"),
    "hirescam": MethodInfo(cams.HiResCAM, "HiResCAM"),
    "gradcam_elementwise": MethodInfo(cams.GradCAMElementWise, "GradCAMElementWise"),
    "gradcam++": MethodInfo(cams.GradCAMPlusPlus, "Grad-CAM++", aliases=("gradcampp",)),
    "xgradcam": MethodInfo(cams.XGradCAM, "XGrad-CAM"),
    "layercam": MethodInfo(cams.LayerCAM, "LayerCAM"),
    "eigencam": MethodInfo(cams.EigenCAM, "EigenCAM", class_agnostic=True),
    "eigengradcam": MethodInfo(cams.EigenGradCAM, "EigenGradCAM"),
    "kpca_cam": MethodInfo(cams.KPCA_CAM, "KPCA-CAM", class_agnostic=True),
    "counterfactual_gradcam": MethodInfo(cams.CounterfactualGradCAM, "Counterfactual Grad-CAM"),
    "cam": MethodInfo(cams.CAM, "CAM"),
    "saliency": MethodInfo(cams.Saliency, "Saliency", input_space=True),
    "gradient_x_input": MethodInfo(cams.GradientXInput, "Gradient x Input", input_space=True),
    "guided_backprop": MethodInfo(guided.GuidedBackprop, "Guided Backprop", shared_run=False, input_space=True),
    "guided_gradcam": MethodInfo(guided.GuidedGradCAM, "Guided Grad-CAM", shared_run=False),
    "randomcam": MethodInfo(cams.RandomCAM, "RandomCAM", class_agnostic=True),
    "fem": MethodInfo(cams.FEM, "FEM", class_agnostic=True),
    "finercam": MethodInfo(cams.FinerCAM, "FinerCAM", shared_run=False),
    "scorecam": MethodInfo(gradient_free.ScoreCAM, "ScoreCAM", shared_run=False),
    "ablationcam": MethodInfo(gradient_free.AblationCAM, "AblationCAM", shared_run=False),
    "fullgrad": MethodInfo(fullgrad.FullGrad, "FullGrad", shared_run=False),
    "smoothgradcam++": MethodInfo(torchcam_methods.SmoothGradCAMpp, "SmoothGradCAM++", shared_run=False,
                                  aliases=("smoothgradcampp",)),
    "sscam": MethodInfo(torchcam_methods.SSCAM, "SS-CAM", shared_run=False),
    "iscam": MethodInfo(torchcam_methods.ISCAM, "IS-CAM", shared_run=False),
    "shapleycam": MethodInfo(shapley.ShapleyCAM, "ShapleyCAM", shared_run=False),
}
# method name or alias -> class ("gradcam++" has "gradcampp" as an alias for command lines and file names)
CLASSES = {name: info.cls for key, info in REGISTRY.items() for name in (key, *info.aliases)}
CLASS_AGNOSTIC = frozenset(name for name, info in REGISTRY.items() if info.class_agnostic)
_INPUT_METHODS = frozenset(name for name, info in REGISTRY.items() if info.input_space)


@dataclass
class Explanation:
    """What explain() returns for one method: the maps and everything they were made from (fields below)."""

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
    inner = obj.gradcam if canonical(method) == "guided_gradcam" else obj
    r = inner.result
    return Explanation(maps, dict(getattr(inner, "raw", {})), r.logits, r.targets, list(inner.target_layers), method,
                       r, list(obj.degenerate_reasons))


def canonical(method: str) -> str:
    """The registry name of a method name or alias ('gradcampp' -> 'gradcam++'); InputError for an unknown one."""
    for name, info in REGISTRY.items():
        if method == name or method in info.aliases:
            return name
    raise InputError(f"unknown method {method!r}; choose from {', '.join(REGISTRY)}")


def method_object(model, method: str, layers=None, *, device: str = "auto", channels_last: bool | None = None,
                  **options):
    """The method's object (a BaseCAM, or GuidedGradCAM) on a path, bytes, ModelProto or Explainer."""
    method = canonical(method)
    cls = REGISTRY[method].cls
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

    method: a name of onnxcam.cam.api.REGISTRY (gradcam, hirescam, gradcam++, ..., fullgrad) or an alias.
    targets: None (each sample's top class), an int, or one target per sample (ints or onnxcam.targets objects).
    layers: target layer names or module paths, None for the automatic choice (ignored by input-space methods).
    options: passed to the method's class (e.g. kernel= for kpca_cam, score= / output= / input_shape=).
    """
    obj = method_object(model, method, layers, device=device, channels_last=channels_last, **options)
    if canonical(method) == "guided_backprop":
        maps = obj(x, targets)
    else:
        maps = obj(x, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)
    return explanation(obj, maps, method)
