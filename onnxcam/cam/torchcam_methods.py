"""torchcam 0.5's additions to the CAM family: Smooth Grad-CAM++, SS-CAM and IS-CAM, with its arithmetic.

- SmoothGradCAMpp (Omeiza et al., arXiv 1908.01224): Grad-CAM++'s alpha from gradients averaged over noisy copies
  of the input (x + N(0, std^2), num_samples of them): one run for the clean input, one for all noisy copies.
- SSCAM (Wang et al., arXiv 2006.14255): Score-CAM whose masks get noise N(0, std^2) at the input's resolution,
  the score increases averaged over num_samples draws.
- ISCAM (Naidu et al., arXiv 2010.03023): Score-CAM whose masks are integrated: the i-th pass scales the masked input
  by sum_{j<=i} j / num_samples.

What torchcam 0.5 does and these do too (so the same noise gives the same maps, tests/test_torchcam_methods.py):
- SS-CAM/IS-CAM masks are the layer's channels min-max scaled at the layer's size ((a - min) / (max - min + 1e-8)),
  then upsampled bilinearly with half-pixel centres (torch's align_corners=False); no scaling after upsampling
  (pytorch-grad-cam's and onnxcam's ScoreCAM scale after an aligned-corners upsampling). Each weight is the softmax
  over channels of the mean of (masked score - clean score).
- Smooth Grad-CAM++: alpha = mean(g^2) / (2 mean(g^2) + sum_ij(mean(g^3) A) + 1e-8) with A the clean input's
  activations, w = sum_ij alpha relu(g); torchcam's hooks leave g and the map's activations at the LAST noisy copy's
  values (the gradient hook and the activation hook both fire on every noisy forward), so g and the activations of the
  weighted sum are the last noisy copy's here too. This is torchcam's algorithm; the paper's map weights the clean
  activations (a difference of the size of the noise's effect on the layer).
Noise is drawn from numpy's global generator (np.random.seed reproduces it), from `rng`, or from `noise(shape)`;
torchcam draws it from torch's: pass `noise=` to use the very same values.
The maps are then post-processed as every onnxcam CAM: ReLU, min-max scaling, resizing to the input (torchcam
returns the low-resolution map scaled with 1e-8: `raw` holds the map before both).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ..errors import InputError
from ..explainer import Result
from ..tasks import ocr
from . import methods
from .base import BaseCAM
from .gradient_free import ScoreCAM, masked_inputs, upsample_bilinear

log = logging.getLogger(__name__)

EPS = 1e-8  # torchcam's normalisation and Grad-CAM++ epsilon


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


def _std(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or \
            not np.isfinite(value) or value < 0:
        raise InputError(f"std must be a finite number >= 0, not {value!r}")
    return float(value)


class _Noise:
    """Gaussian noise N(0, std^2) of a requested shape: from `noise(shape)`, a numpy Generator, or np.random."""

    def __init__(self, std: float, rng: np.random.Generator | int | None, noise: Callable | None):
        if noise is not None and not callable(noise):
            raise InputError(f"noise must be a function of a shape, not {type(noise).__name__}")
        self.std, self.noise = std, noise
        self.rng = np.random.default_rng(rng) if isinstance(rng, (int, np.integer)) else rng

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        if self.noise is not None:
            drawn = self.noise(tuple(shape))
            drawn = np.asarray(drawn.detach().cpu().numpy() if hasattr(drawn, "detach") else drawn, np.float32)
            if drawn.shape != tuple(shape):
                raise InputError(f"noise({tuple(shape)}) returned an array of shape {drawn.shape}")
            return drawn
        source = np.random if self.rng is None else self.rng
        return np.float32(source.normal(0, self.std, size=shape))


class SmoothGradCAMpp(BaseCAM):
    """Smooth Grad-CAM++ as torchcam 0.5 computes it (see the module docstring): Grad-CAM++'s weights from
    gradients averaged over num_samples noisy copies x + N(0, std^2) of the input.

    rng: a numpy Generator or seed (default: numpy's global generator); noise: a function shape -> noise array that
    replaces the draws (e.g. torch's, to reproduce torchcam's maps exactly).
    """

    perturbs = "input"  # its noisy copies: refused for per-region scores (BaseCAM.refuse_moved_regions)

    def __init__(self, model, target_layers=None, reshape_transform=None, *, num_samples: int = 4, std: float = 0.3,
                 rng: np.random.Generator | int | None = None, noise: Callable | None = None, **options):
        self.num_samples = _positive_int("num_samples", num_samples)
        self.std = _std(std)
        self._noise = _Noise(self.std, rng, noise)
        super().__init__(model, target_layers, reshape_transform, **options)

    def forward(self, x: np.ndarray, targets=None, eigen_smooth: bool = False) -> np.ndarray:
        r = self.run(x, targets)
        n = len(x)
        if targets is None:  # each sample's top class; a recognizer's decoded string (BaseCAM.default_targets)
            targets = self.default_targets(x) or [int(t) for t in r.targets]
        elif isinstance(targets, (int, np.integer)):
            targets = [int(targets)] * n
        # the noisy copies score what the input scored: a class stays a class, a CTC target keeps the input's own
        # decoding (frozen at the clean scores; not each noisy copy's, and no decoding run per copy)
        if any(ocr.is_sequence_target(t) for t in targets):
            targets = ocr.frozen_per_sample(r.logits, list(targets), tuple(self.explainer_used.score_shape(x.shape)))
        noisy = np.concatenate([x + self._noise(x.shape) for _ in range(self.num_samples)])
        rn = self.run(noisy, list(targets) * self.num_samples)  # copy s is rows s*n .. s*n + n - 1
        self._call.smooth = {layer: self._noisy_arrays(r, rn, layer, x, n) for layer in self.target_layers}
        return self.maps_for(x, r, eigen_smooth)

    def _noisy_arrays(self, r: Result, rn: Result, layer: str, x: np.ndarray, n: int):
        """(clean activations, mean g^2, mean g^3, last copy's activations, last copy's gradients), (N, C, h, w)."""
        clean, _ = self.layer_arrays(r, layer, x)
        acts, grads = self.layer_arrays(rn, layer, x)
        g2, g3 = np.zeros_like(clean), np.zeros_like(clean)
        for s in range(self.num_samples):  # summed in torchcam's order, then divided
            g = grads[s * n:(s + 1) * n]
            g2 += g ** 2
            g3 += g ** 3
        g2 /= np.float32(self.num_samples)
        g3 /= np.float32(self.num_samples)
        return clean, g2, g3, acts[-n:], grads[-n:]

    def raw_map(self, r: Result, layer: str, x: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
        clean, g2, g3, acts, grads = self._call.smooth[layer]
        weights = smooth_gradcampp_weights(clean, g2, g3, grads)
        return methods.weighted_sum(weights, acts, eigen_smooth)


def smooth_gradcampp_weights(clean: np.ndarray, g2: np.ndarray, g3: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """(N, C) channel weights: sum_ij alpha_ij relu(g_ij), alpha = g2 / (2 g2 + sum_ij(g3 A) + 1e-8)."""
    n, c = clean.shape[:2]
    spread = (g3 * clean).reshape(n, c, -1).sum(axis=2)[:, :, None, None]
    alpha = g2 / (2 * g2 + spread + np.float32(EPS))
    return (alpha * np.maximum(grads, 0)).reshape(n, c, -1).sum(axis=2)


class _TorchcamScoreCAM(ScoreCAM):
    """torchcam's Score-CAM family: masks scaled at the layer's size and upsampled with half-pixel centres; each
    weight the softmax over channels of the mean score increase over num_samples passes (subclasses say how a pass
    masks the input)."""

    def __init__(self, model, target_layers=None, reshape_transform=None, *, batch_size: int = 32,
                 num_samples: int = 10, **options):
        self.num_samples = _positive_int("num_samples", num_samples)
        super().__init__(model, target_layers, reshape_transform, batch_size=batch_size, **options)

    def channel_weights(self, r: Result, layer: str, x: np.ndarray, activations: np.ndarray) -> np.ndarray:
        nhwc = self._input_channels_last(x)
        size = (x.shape[1], x.shape[2]) if nhwc else (x.shape[2], x.shape[3])
        n, c = activations.shape[:2]
        scaled = torchcam_normalize(activations)
        baseline = self._scores(r.logits, np.arange(n))
        total = np.zeros((n, c), np.float32)
        for s in range(self.num_samples):
            total += self._pass_scores(s, x, scaled, size, nhwc) - baseline[:, None]
        return methods.score_weights(total / np.float32(self.num_samples))

    def _masked_scores(self, x: np.ndarray, pairs: np.ndarray, masks_of: Callable, nhwc: bool,
                       scale: float | None = None) -> np.ndarray:
        """Target scores of x[sample] * masks_of(chunk) (times `scale`) for (sample, channel) pairs, in batches."""
        scores = np.empty(len(pairs), np.float32)
        buffer = np.empty((min(self._batch(), len(pairs)), *x.shape[1:]), np.float32)
        for start in range(0, len(pairs), self._batch()):
            chunk = pairs[start:start + self._batch()]
            masked = masked_inputs(x, chunk[:, 0], masks_of(chunk), nhwc, buffer[:len(chunk)])
            if scale is not None:
                masked *= np.float32(scale)
            out = self._forward(masked, [self.explainer.score_name])[0]
            scores[start:start + len(chunk)] = self._scores(out, chunk[:, 0])
            self._call.forwards += len(chunk)
        return scores

    def _pass_scores(self, s: int, x: np.ndarray, scaled: np.ndarray, size: tuple[int, int],
                     nhwc: bool) -> np.ndarray:
        raise NotImplementedError


class SSCAM(_TorchcamScoreCAM):
    """SS-CAM (Smoothed Score-CAM) as torchcam 0.5 computes it: each of num_samples passes masks the input with the
    upsampled scaled channels plus noise N(0, std^2) drawn at the input's resolution for all channels at once.

    rng / noise: as for SmoothGradCAMpp (noise(shape) with shape (N, C, H, W), once per pass and layer).
    """

    def __init__(self, model, target_layers=None, reshape_transform=None, *, batch_size: int = 32,
                 num_samples: int = 35, std: float = 2.0, rng: np.random.Generator | int | None = None,
                 noise: Callable | None = None, **options):
        self.std = _std(std)
        self._noise = _Noise(self.std, rng, noise)
        super().__init__(model, target_layers, reshape_transform, batch_size=batch_size, num_samples=num_samples,
                         **options)

    def _pass_scores(self, s, x, scaled, size, nhwc):
        n, c = scaled.shape[:2]
        noise = self._noise((n, c, *size))
        pairs = np.argwhere(np.ones((n, c), bool))  # sample-major, as torchcam flattens them

        def masks_of(chunk):
            return upsample_bilinear(scaled[chunk[:, 0], chunk[:, 1]][None], *size)[0] + noise[chunk[:, 0],
                                                                                                chunk[:, 1]]

        return self._masked_scores(x, pairs, masks_of, nhwc).reshape(n, c)


class ISCAM(_TorchcamScoreCAM):
    """IS-CAM (Integrated Score-CAM) as torchcam 0.5 computes it: pass i (1-based) masks the input with the upsampled
    scaled channels and multiplies it by sum_{j<=i} j / num_samples.

    A constant channel's mask is zero, so its masked input is all zero in every pass: one forward of a zero input
    serves all of them (`forwards` counts the inputs run).
    """

    def __init__(self, model, target_layers=None, reshape_transform=None, *, batch_size: int = 32,
                 num_samples: int = 10, **options):
        super().__init__(model, target_layers, reshape_transform, batch_size=batch_size, num_samples=num_samples,
                         **options)

    def _pass_scores(self, s, x, scaled, size, nhwc):
        n, c = scaled.shape[:2]
        coeff = sum((j + 1) / self.num_samples for j in range(s + 1))  # torchcam's running float sum
        constant = ~scaled.reshape(n, c, -1).any(axis=2)
        scores = self._constant_channel_scores(x, constant)
        pairs = np.argwhere(~constant)
        got = self._masked_scores(x, pairs, lambda chunk: upsample_bilinear(
            scaled[chunk[:, 0], chunk[:, 1]][None], *size)[0], nhwc, scale=coeff)
        scores[pairs[:, 0], pairs[:, 1]] = got
        return scores


def torchcam_normalize(a: np.ndarray) -> np.ndarray:
    """torchcam's per-channel min-max scaling over the spatial axes: (a - min) / (max(a - min) + 1e-8), float32."""
    n, c = a.shape[:2]
    flat = np.array(a, np.float32).reshape(n, c, -1)
    flat -= flat.min(axis=2, keepdims=True)
    flat /= flat.max(axis=2, keepdims=True) + np.float32(EPS)
    return flat.reshape(a.shape)
