"""explain(): the functional face of onnxcam."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..explainer import Explainer, Result
from .methods import METHODS
from .postprocess import aggregate_layers, layer_map


@dataclass
class Explanation:
    maps: np.ndarray            # (N, H, W) float32 in [0, 1] at the input's spatial size
    raw: dict                   # layer -> (N, h, w) raw map (before ReLU and scaling)
    logits: np.ndarray          # (N, K)
    targets: np.ndarray         # (N,)
    layers: list
    method: str
    result: Result              # activations and gradients


def explain(model, x: np.ndarray, method: str = "hirescam", targets=None, layers=None, *,
            device: str = "auto", channels_last: bool = False) -> Explanation:
    """Explain a preprocessed batch with one CAM method; model is a path/bytes/ModelProto or an Explainer."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose from {', '.join(sorted(METHODS))}")
    ex = model if isinstance(model, Explainer) else Explainer(model, layers=layers, device=device)
    r = ex.run(x, targets)
    size = (x.shape[2], x.shape[1]) if channels_last else (x.shape[-1], x.shape[-2])
    raw = {layer: METHODS[method](r.activations[layer], r.gradients[layer]) for layer in ex.layers}
    maps = aggregate_layers([layer_map(raw[layer], size) for layer in ex.layers])
    return Explanation(maps, raw, r.logits, r.targets, list(ex.layers), method, r)
