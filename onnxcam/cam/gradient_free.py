"""Gradient-free CAM methods that weight channels by forward passes: Score-CAM and Ablation-CAM.

Both start from one plain forward (the score, the layers' activations); neither differentiates anything.
- Score-CAM masks the input with each channel's upsampled, min-max scaled map, so each weight is a whole forward.
  The masked inputs run in batches; every channel whose map is constant gives the same all-zero masked input, so
  one forward of a zero input serves all of them (ReLU layers often hold many dead channels).
- Ablation-CAM changes the layer's activations only, so only the part of the model after the layer runs again:
  the model is cut at the layer (graph/cut.py) and the ablated activations are fed to that tail in batches (at a
  last stage, the pooling and the classifier). pytorch-grad-cam reruns the whole model for each ablation batch.

Targets are read off the explainer's score (the logits, as for the gradient methods), one target per sample;
targets=None on a text recognizer is its decoded string (BaseCAM.default_targets). A two-stage detector's per-region
scores (Faster R-CNN's (R, C)) are refused when the method's runs would read other regions (Score-CAM's masked
inputs change the proposals; Ablation-CAM's rerun of the model after a layer does when the regions are computed from
that layer); with regions provably kept, each target is frozen to its weighting of the image's own scores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import onnx

from ..errors import InputError, LayerError, ModelError, NumericalError
from ..explainer import Result
from ..graph.cut import tail_model
from ..graph.evaluate import runtime_failure
from ..runtime import session
from ..tasks import ocr
from . import methods
from .base import BaseCAM, has_op
from .projection import get_2d_projection
from .targets import ClassifierOutputTarget, _SeedTarget, per_sample

log = logging.getLogger(__name__)


class _ForwardCAM(BaseCAM):
    """A method whose channel weights come from plain forwards; subclasses give `channel_weights`."""

    gradient_free = True
    builds_gradients = False  # plain forwards only: the gradient graph is never built
    perturbs = "input"  # Score-CAM and its kin run masked copies of the input

    def __init__(self, model, target_layers=None, reshape_transform=None, *, batch_size: int = 32, **options):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, not {batch_size!r}")
        super().__init__(model, target_layers, reshape_transform, **options)
        self.batch_size = int(batch_size)

    # ---- the forward runs ------------------------------------------------------------------------------------------
    def _extra_outputs(self) -> list[str]:
        """Tensors besides the score and the layers that the first forward must return."""
        return []

    def _whole(self, names: list[str]):
        """The plain session on the whole model, with `names` among its outputs (Explainer.plain_session)."""
        return self.explainer.plain_session(names)

    def _batch(self) -> int:
        """The batch of the repeated forwards: 1 for models exported with a batch of 1."""
        return 1 if self.explainer.analysis.fixed_batch == 1 else self.batch_size

    def _forward(self, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """The whole model on x (in chunks when its batch is fixed at 1), returning `names`."""
        sess = self._whole(names)
        if x.dtype != self.explainer.analysis.dtype:  # the masked inputs are float32 whatever the model takes
            x = x.astype(self.explainer.analysis.dtype)
        step = len(x) if self.explainer.analysis.fixed_batch != 1 else 1
        parts = []
        for start in range(0, len(x), step):
            try:
                parts.append(sess.run(names, {self.explainer.input_name: x[start:start + step]}))
            except Exception as exc:  # onnxruntime's own error types
                raise ModelError(f"onnxruntime failed on input {self.explainer.input_name!r} of shape {x.shape}: "
                                 f"{runtime_failure(exc)}") from exc
        # one image's per-region scores have no batch axis: each run's are stacked (one row per input)
        stack = getattr(self._call, "per_region", False) and len(parts) > 1
        return [np.stack(chunk) if stack and name == self.explainer.score_name else np.concatenate(chunk)
                for name, chunk in zip(names, zip(*parts))]

    def _scores(self, outputs: np.ndarray, samples: np.ndarray, as_rows: bool = False) -> np.ndarray:
        """float32 target score of each output row, row i read by sample samples[i]'s target. as_rows: outputs
        are already one row per sample (_rows)."""
        targets = self._call.numpy_targets
        rows = outputs if as_rows else self._rows(outputs)
        return np.float32([np.asarray(targets[n](o)).item() for n, o in zip(samples, rows)])

    def _rows(self, outputs: np.ndarray) -> np.ndarray:
        """A batch's score with one row per sample: a recognizer's (T, N, C) read as (N, T, C), one image's
        per-region (R, C) as (1, R, C)."""
        if getattr(self._call, "per_region", False):
            return outputs[None] if outputs.ndim == 2 else outputs
        return outputs.transpose(1, 0, 2) if getattr(self._call, "sequence_first", False) else outputs

    def run(self, x: np.ndarray, targets=None) -> Result:
        """One plain forward: the score and the layers' activations (no gradients); resolves the targets."""
        ex = self.explainer
        x = ex.check_input(x)
        ex.choose_layers(x.shape)
        done = "makes runs of its own on changed copies of the input" if self.perturbs == "input" else \
            "reruns the model after its layers with channels ablated"
        self.refuse_moved_regions(x, f"{type(self).__name__} {done}", self.perturbs)
        # per-region scores whose regions stay (refused above otherwise): one image's (R, C), no batch axis
        self._call.per_region = has_op(ex, ["RoiAlign"]) and self._per_region_graph(x)
        if self._call.per_region and len(x) != 1:
            raise InputError(f"the per-region scores {ex.score_name!r} are one image's regions: explain one image "
                             f"per call, not {len(x)}")
        if not self._call.per_region:
            ex.free_batch(x.shape)  # the masked or ablated copies in batches, not one run each
        layers = self.target_layers
        names = list(dict.fromkeys([ex.score_name, *layers, *self._extra_outputs()]))
        values = dict(zip(names, self._forward(x, names)))
        logits = values[ex.score_name]
        targets = self.default_targets(x) if targets is None else per_sample(targets, len(x))
        # CTC targets on a (T, N, C) score: the samples are its axis 1 (ocr.sequence_layout)
        self._call.sequence_first = targets is not None and any(ocr.is_sequence_target(t) for t in targets) and \
            ocr.sequence_layout(logits.shape, len(x), declared=_declared(ex.proto, ex.score_name)) == "TNC"
        rows = self._rows(logits)
        logits = rows if self._call.per_region else logits  # (1, R, C), as the gradient methods give it
        # per thread, as the other results; CTC targets keep the input's own decoding on the perturbed copies, and
        # targets of per-region scores their weighting of the image's own regions (a detection's entry)
        freeze = _frozen_weights if self._call.per_region else ocr.frozen
        self._call.numpy_targets = [freeze(t, row) for t, row in zip(_numpy_targets(targets, rows), rows)]
        classes = [t.category if type(t) is ClassifierOutputTarget else -1 for t in self._call.numpy_targets]
        r = Result(logits, np.int64(classes), {layer: values[layer] for layer in layers}, {},
                   {name: values[name] for name in names if name not in layers})
        self.outputs, self.result = logits, r
        return r

    # ---- per layer -------------------------------------------------------------------------------------------------
    def raw_map(self, r: Result, layer: str, x: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
        activations = self.layer_activations(r.activations[layer], layer, x)
        weights = self.channel_weights(r, layer, x, activations)
        return methods.weighted_sum(weights, activations, eigen_smooth)

    def layer_activations(self, a: np.ndarray, layer: str, x: np.ndarray) -> np.ndarray:
        """A layer's activations as (N, C, h, w) float32."""
        if self.reshape_transform is not None:
            a = self.reshape_transform(a)
        elif a.ndim == 4 and self._channels_last(a.shape, x):
            a = a.transpose(0, 3, 1, 2)
        if a.ndim != 4:
            raise InputError(f"layer {layer!r} has shape {a.shape}; CAM methods need a 4-D (N, C, h, w) activation "
                             "(give a reshape_transform for token or 3-D layouts)")
        return np.asarray(a, np.float32)

    def channel_weights(self, r: Result, layer: str, x: np.ndarray, activations: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class ScoreCAM(_ForwardCAM):
    """Score-CAM (Wang et al., arXiv 1910.01279): w_c = softmax over channels of the target's score on the input
    masked by channel c's map (upsampled bilinearly with aligned corners, scaled to [0, 1]).

    batch_size: masked inputs per forward. `forwards` tells how many inputs the last call ran.
    A constant channel's mask is zero (0 / (0 + 1e-8)); pytorch-grad-cam gets the same for the all-zero channels of
    ReLU layers, but for a constant non-zero channel its upsampling can leave float rounding noise that its min-max
    scaling then blows up into a noise mask: here such a channel is masked to zero as well, as the formula means.
    """

    @property
    def forwards(self) -> int:
        """How many inputs this thread's last call ran through the model after its first forward."""
        return getattr(self._call, "forwards", 0)

    def forward(self, x: np.ndarray, targets=None, eigen_smooth: bool = False) -> np.ndarray:
        self._call.forwards, self._call.zero_output = 0, None
        return super().forward(x, targets, eigen_smooth)

    def channel_weights(self, r: Result, layer: str, x: np.ndarray, activations: np.ndarray) -> np.ndarray:
        nhwc = self._input_channels_last(x)
        height, width = (x.shape[1], x.shape[2]) if nhwc else (x.shape[2], x.shape[3])
        n, c = activations.shape[:2]
        constant = np.ptp(activations.reshape(n, c, -1), axis=2) == 0
        scores = self._constant_channel_scores(x, constant)
        pairs = np.argwhere(~constant)
        buffer = np.empty((min(self._batch(), len(pairs)), *x.shape[1:]), np.float32)  # reused by every batch
        for start in range(0, len(pairs), self._batch()):
            chunk = pairs[start:start + self._batch()]
            masks = score_masks(activations[chunk[:, 0], chunk[:, 1]], height, width)  # one batch at a time
            masked = masked_inputs(x, chunk[:, 0], masks, nhwc, buffer[:len(chunk)])
            out = self._forward(masked, [self.explainer.score_name])[0]
            scores[chunk[:, 0], chunk[:, 1]] = self._scores(out, chunk[:, 0])
            self._call.forwards += len(chunk)
        return methods.score_weights(scores)

    def _constant_channel_scores(self, x: np.ndarray, constant: np.ndarray) -> np.ndarray:
        """(N, C) scores with the channels marked `constant` filled: a constant upsampled map masks the input to the
        same all-zero input, so one forward of it serves every such channel (the others are left to the caller)."""
        scores = np.empty(constant.shape, np.float32)
        if constant.any():
            zero = self._zero_input_output(x)
            for i, ch in zip(*np.nonzero(constant)):
                scores[i, ch] = self._scores(zero, [i])[0]
        return scores

    def _zero_input_output(self, x: np.ndarray) -> np.ndarray:
        """The score of an all-zero input (every constant channel's masked input), run once per call."""
        if self._call.zero_output is None:
            self._call.zero_output = self._forward(np.zeros_like(x[:1]), [self.explainer.score_name])[0]
            self._call.forwards += 1
        return self._call.zero_output


class AblationCAM(_ForwardCAM):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020): w_c = (y - y_c) / y, the relative drop of the target score y
    when channel c of the layer is ablated.

    Only the part of the model after the layer runs for the ablations (its tail, fed the ablated activations and
    whatever else it reads from before the layer, in batches of batch_size). As in pytorch-grad-cam, a channel is
    ablated to 0 when the sample's smallest activation is 0, else to that minimum - 1e7. pytorch-grad-cam lowers
    that value by another 1e7 for each earlier channel of the same batch (it takes the minimum of the batch it has
    already ablated); here every channel gets the same value, so layers with negative values differ from it.

    ratio_channels_to_ablate (pytorch-grad-cam's experimental speed-up): below 1, each sample ablates only the
    int(C * ratio) channels that score highest and the int(C * ratio) that score lowest on how much of each channel
    lies where the sample's first principal component is (channels_to_ablate); the others get weight 0. From 0.5 up
    the two sets cover every channel, and each is ablated once (the full map); pytorch-grad-cam ablates the overlap
    twice, and its bookkeeping then gives every channel after the first repeated one its original score (weight 0).
    """

    ABLATION_VALUE = 1e7
    perturbs = "layers"  # the model after the layer reruns on ablated activations

    def __init__(self, model, target_layers=None, reshape_transform=None, *, batch_size: int = 32,
                 ratio_channels_to_ablate: float = 1.0, **options):
        ratio = ratio_channels_to_ablate
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)) or \
                not 0 < ratio <= 1:
            raise InputError(f"ratio_channels_to_ablate must be a number in (0, 1], not {ratio!r}")
        super().__init__(model, target_layers, reshape_transform, batch_size=batch_size, **options)
        self.ratio_channels_to_ablate = float(ratio)
        self._tails: dict = {}  # (layer, input shapes) -> (session, fed tensor names)
        self._fed_names: dict = {}  # layer -> the tensors its tail reads besides the layer

    def _extra_outputs(self) -> list[str]:
        from ..graph.cut import tail_nodes

        out = []
        for layer in self.target_layers:
            if layer not in self._fed_names:
                self._fed_names[layer] = tail_nodes(self.explainer.proto, layer, self.explainer.score_name)[1][1:]
            out += self._fed_names[layer]
        return out

    def _tail(self, layer: str, values: dict[str, np.ndarray]):
        names = [layer, *self._fed_names[layer]]
        key = (layer, tuple((values[name].shape[1:], values[name].dtype.str) for name in names),
               self.explainer.analysis.fixed_batch)
        if key not in self._tails:
            ex = self.explainer
            examples = {name: values[name] for name in names}
            if ex.analysis.fixed_batch == 1:  # run one ablated copy at a time: the tail's inputs hold one sample
                n = len(values[layer])
                examples = {name: v[:1] if _per_sample(v, n) else v for name, v in examples.items()}
            model, feeds = tail_model(ex.proto, layer, ex.score_name, examples, batch=ex.analysis.fixed_batch != 1)
            used = {t.name for t in model.graph.initializer}
            weights = {name: w for name, w in ex.weights.items() if name in used}
            self._tails[key] = (session(model.SerializeToString(), ex.device, weights), feeds)
        return self._tails[key]

    def channel_weights(self, r: Result, layer: str, x: np.ndarray, activations: np.ndarray) -> np.ndarray:
        raw = r.activations[layer]
        axis = self._channel_axis(raw, layer, x, activations.shape[1])
        values = {layer: raw, **{name: r.outputs[name] for name in self._fed_names[layer]}}
        sess, feeds = self._tail(layer, values)
        original = self._scores(r.logits, range(len(raw)))
        if np.any(original == 0):
            bad = np.nonzero(original == 0)[0].tolist()
            raise NumericalError(f"samples {bad}: the target score is 0, and Ablation-CAM divides by it")
        n, c = activations.shape[:2]
        lows = raw.reshape(n, -1).min(axis=1)
        fill = np.where(lows == 0, 0, lows - np.float32(self.ABLATION_VALUE)).astype(raw.dtype)
        ablated = np.empty((n, c), np.float32)
        # Tensors the tail reads that are not per-sample activations (shape vectors computed for this batch, such
        # as a flatten's [n, -1]) are fed as they are; every ablation run then has this batch's size, n.
        shaped = {name for name in feeds[1:] if not _per_sample(values[name], n)}
        ablated[:] = original[:, None]  # channels left out by ratio_channels_to_ablate: no drop, weight 0
        chosen = np.concatenate([channels_to_ablate(a, self.ratio_channels_to_ablate) for a in activations])
        for samples, channels, count in _chunks(np.nonzero(chosen.reshape(n, c)), n if shaped else self._batch(),
                                                bool(shaped)):
            batch = raw[samples]  # a copy: fancy indexing
            index = [np.arange(len(samples))] + [slice(None)] * (raw.ndim - 1)
            index[axis] = channels
            batch[tuple(index)] = fill[samples].reshape(-1, *[1] * (raw.ndim - 2))
            fed = {layer: batch, **{name: values[name] if name in shaped else values[name][samples]
                                    for name in feeds[1:]}}
            try:
                out = sess.run([self.explainer.score_name], fed)[0]
            except Exception as exc:  # onnxruntime's own error types
                raise ModelError(f"onnxruntime failed on the model after layer {layer!r}: "
                                 f"{runtime_failure(exc)}") from exc
            # one row per ablated copy (a recognizer's (T, B, C) has them on axis 1) before the padding is cut
            ablated[samples[:count], channels[:count]] = self._scores(self._rows(out)[:count], samples[:count], True)
        return methods.ablation_weights(original, ablated)

    def _channel_axis(self, raw: np.ndarray, layer: str, x: np.ndarray, channels: int) -> int:
        """The channel axis of the layer's own tensor: 1 (NCHW), 3 (NHWC), or the last of tokens (N, T, C)."""
        if raw.ndim == 4:
            axis = 3 if self.reshape_transform is None and self._channels_last(raw.shape, x) else 1
        elif raw.ndim == 3:
            axis = 2
        else:
            raise LayerError(f"layer {layer!r} has shape {raw.shape}: Ablation-CAM ablates channels of a 4-D "
                             "(N, C, h, w) or token (N, T, C) layer")
        if raw.shape[axis] != channels:
            raise LayerError(f"layer {layer!r} {raw.shape}: its axis {axis} has {raw.shape[axis]} channels but the "
                             f"reshaped activations have {channels}")
        return axis


def _frozen_weights(target, row: np.ndarray):
    """A target of per-region scores as the fixed weighting it gives the image's own (R, C) scores: its value on
    another run's scores of the same regions is that weighted sum (a detection's entry, for a detection target)."""
    return _SeedTarget(np.asarray(target.seed(row), np.float32))


def _per_sample(value: np.ndarray, n: int) -> bool:
    """A batch-major float tensor (an activation), as opposed to shapes and other integer plumbing."""
    return value.dtype.kind == "f" and value.ndim >= 2 and value.shape[0] == n


def _chunks(pairs: tuple[np.ndarray, np.ndarray], size: int, full: bool = False
            ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(samples, channels, count): the ablations' index arrays `size` at a time, sample-major.

    full: every chunk has exactly `size` rows (a tail fed shape tensors computed for a batch of that size): a short
    last chunk is padded with copies of its first pair; only its first `count` rows are real."""
    samples, channels = pairs
    for start in range(0, len(samples), size):
        s, c = samples[start:start + size], channels[start:start + size]
        count = len(s)
        if full and count < size:
            s, c = np.pad(s, (0, size - count), mode="edge"), np.pad(c, (0, size - count), mode="edge")
        yield s, c, count


def channels_to_ablate(activations: np.ndarray, ratio: float = 1.0) -> np.ndarray:
    """(C,) bool: the channels of one sample's (C, h, w) activations that Ablation-CAM ablates (pytorch-grad-cam's
    AblationLayer.activations_to_be_ablated): all for ratio 1, else the int(C * ratio) highest and lowest scores of
    sum(mask * m_c) / sum(m_c), with m_c = |A_c| min-max scaled and mask = where the sample's first principal
    component's |projection|, min-max scaled, exceeds 0.01. A constant channel's score is NaN, which sorts highest
    (as numpy sorts it there); ties go by channel order."""
    c = activations.shape[0]
    chosen = np.zeros(c, bool)
    if ratio == 1:
        chosen[:] = True
        return chosen
    projection = np.abs(get_2d_projection(activations[None])[0])
    projection -= projection.min()
    projection /= projection.max()
    mask = (projection > 0.01).reshape(-1)
    flat = np.abs(np.float32(activations)).reshape(c, -1)
    flat -= flat.min(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        flat /= flat.max(axis=1, keepdims=True)
        scores = np.float32((mask * flat).sum(axis=1) / flat.sum(axis=1))
    order = np.argsort(scores, kind="stable")
    k = int(c * ratio)
    chosen[order[::-1][:k]] = True
    chosen[order[:k]] = True
    return chosen


def _declared(proto: onnx.ModelProto, name: str) -> tuple | None:
    """The dims a model output declares (ints, or names for symbolic ones); None for an inner tensor."""
    for o in proto.graph.output:
        if o.name == name:
            return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in o.type.tensor_type.shape.dim)
    return None


def _numpy_targets(targets, logits: np.ndarray) -> list:
    """One numpy target per sample (None: each sample's top class; an int: that class for all)."""
    n = len(logits)
    if targets is None:
        return [ClassifierOutputTarget(int(np.argmax(row))) for row in logits.reshape(n, -1)]
    return per_sample(targets, n)


def masked_inputs(x: np.ndarray, samples: np.ndarray, masks: np.ndarray, nhwc: bool, out: np.ndarray) -> np.ndarray:
    """out[j] = x[samples[j]] * masks[j] (masks (B, H, W) broadcast over the channels), written in place: one pass
    over each output, no per-row copy of x. samples must be sorted (each sample's rows are one run)."""
    starts = np.flatnonzero(np.r_[True, samples[1:] != samples[:-1]])
    for a, b in zip(starts, [*starts[1:], len(samples)]):
        np.multiply(x[samples[a]], masks[a:b, :, :, None] if nhwc else masks[a:b, None], out=out[a:b])
    return out


def score_masks(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Score-CAM's masks of (B, h, w) channel maps: upsampled to (B, height, width), each scaled to [0, 1] as
    (m - min) / (max - min + 1e-8)."""
    masks = upsample_bilinear_aligned(maps[None], height, width)[0]
    flat = masks.reshape(len(masks), -1)
    low = flat.min(axis=1, keepdims=True)
    flat -= low
    flat /= flat.max(axis=1, keepdims=True) + np.float32(1e-8)
    return masks


def upsample_bilinear_aligned(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, C, h, w) -> (N, C, height, width) float32, bilinear with aligned corners (torch's UpsamplingBilinear2d),
    as two small matrix products: each output pixel is the same two-by-two interpolation of the same neighbours."""
    rows, cols = _interpolation(a.shape[2], height), _interpolation(a.shape[3], width)
    return np.ascontiguousarray(rows @ (np.asarray(a, np.float32) @ cols.T))


def upsample_bilinear(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, C, h, w) -> (N, C, height, width) float32, bilinear with half-pixel centres (torch's
    F.interpolate(mode="bilinear", align_corners=False), cv2's INTER_LINEAR), as two small matrix products."""
    rows = _interpolation(a.shape[2], height, aligned=False)
    cols = _interpolation(a.shape[3], width, aligned=False)
    return np.ascontiguousarray(rows @ (np.asarray(a, np.float32) @ cols.T))


def _interpolation(size: int, out: int, aligned: bool = True) -> np.ndarray:
    """(out, size) float32 matrix of linear interpolation weights, torch's index arithmetic: aligned corners
    (source = dst * (size - 1) / (out - 1)) or half-pixel centres (source = (dst + 0.5) * size / out - 0.5, >= 0)."""
    if aligned:
        scale = np.float32((size - 1) / (out - 1)) if out > 1 else np.float32(0)
        real = scale * np.arange(out, dtype=np.float32)
    else:
        scale = np.float32(size) / np.float32(out)
        real = np.maximum(scale * (np.arange(out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    low = np.minimum(real.astype(np.int64), size - 1)
    frac = np.clip(real - low.astype(np.float32), 0, 1)
    high = np.minimum(low + 1, size - 1)
    m = np.zeros((out, size), np.float32)
    m[np.arange(out), low] += np.float32(1) - frac
    m[np.arange(out), high] += frac
    return m
