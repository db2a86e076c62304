"""Text recognizers (CTC) and text detectors (DBNet): what their outputs mean, targets on them, and the automatic
layer of a recognizer.

A CTC recognizer gives per-time-step class scores, (N, T, C) or sequence-first (T, N, C) (CRNNs feed their LSTMs
sequence-first and keep that layout). Targets, each a linear weighting of the scores (a dense seed, so one run of
Explainer.run(x, seed=...) differentiates it):

- TimeStepTarget(step, category): the score of one class at one time step;
- CharacterTarget(position): one character of the greedy CTC decoding: the argmax per step, repeats collapsed,
  the blank (class 0 by default) dropped; the character's score summed over the time steps it came from;
- StringTarget(): every decoded character's score (the decoded string's).

Scores are read as they are (logits or log-probabilities, whatever the score tensor holds). The CAM classes take
these targets too (`GradCAM(model)(x, targets=[CharacterTarget(1)] * len(x))`): a target with `sequence = True`
is seeded through run_sequence, on each sample's (T, C) scores whichever axis holds the batch, so a (T, N, C)
score is never cut along its time axis as if that were the batch; with no targets a recognizer's CAM explains
StringTarget() (BaseCAM.default_targets: the command line's map of the whole text line). A DBNet text detector's
(N, 1, H, W) probability map is a single-map segmentation output: segment.ClassMaskTarget(0) already sums it over the
pixels above DBNet's 0.3 threshold (text_region_target below only names it).

The automatic layer of a recognizer is its last convolutional map before the sequence model (ocr_layer): an NCHW
map with the input's orientation; CRNNs usually collapse its height to 1, so the map is a strip over the text's
columns (resized to the input, each column's weight spreads over the full height). Never the LSTM's output: that
has no spatial layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from . import segment

log = logging.getLogger(__name__)

__all__ = ["BLANK", "LAYOUTS", "Character", "CharacterTarget", "StringTarget", "TimeStepTarget", "WeightedSteps",
           "frozen", "frozen_per_sample", "greedy_decode", "is_recognizer", "is_sequence_target", "ocr_layer",
           "run_sequence", "sequence_layout", "sequence_seed", "text_region_target"]

BLANK = 0  # the CTC blank class of most recognizers (PaddleOCR, CRNN ports, torch's CTCLoss default)
LAYOUTS = ("auto", "NTC", "TNC")
RECURRENT = {"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"}


# ---- layout --------------------------------------------------------------------------------------------------
def sequence_layout(shape: tuple, batch: int, layout: str = "auto", declared: tuple | None = None) -> str:
    """"NTC" or "TNC" for a 3-D score of `shape` computed for `batch` samples.

    auto: the axis that holds the batch (the one the graph declares symbolic in `declared`, else the one of size
    `batch`); InputError naming the shape and the layout option when both axes fit (or neither)."""
    if layout not in LAYOUTS:
        raise InputError(f"unknown sequence layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    shape = tuple(shape)
    if len(shape) != 3:
        raise InputError(f"a CTC recognizer's score is (N, T, C) or (T, N, C); this one is {shape}")
    if layout != "auto":
        axis = 0 if layout == "NTC" else 1
        if shape[axis] != batch:
            raise InputError(f"score of shape {shape} is not {layout} for a batch of {batch}: axis {axis} is "
                             f"{shape[axis]}")
        return layout
    if declared is not None and len(declared) == 3:
        symbolic = [isinstance(d, str) for d in declared[:2]]
        if symbolic[0] != symbolic[1]:
            return "NTC" if symbolic[0] else "TNC"
    fits = (shape[0] == batch, shape[1] == batch)
    if fits == (True, False) or shape[:2] == (1, 1):  # (1, 1, C): one step of one sample, both read the same
        return "NTC"
    if fits == (False, True):
        return "TNC"
    what = "as (N, T, C) and as (T, N, C)" if all(fits) else "neither as (N, T, C) nor as (T, N, C)"
    raise InputError(f"score of shape {shape} reads {what} for a batch of {batch}; give layout='NTC' or 'TNC' "
                     "(to ocr.run_sequence; a CAM class then makes the maps with maps_for)")


def _steps_first(scores: np.ndarray, layout: str) -> np.ndarray:
    """(N, T, C) view of scores in `layout`."""
    return scores if layout == "NTC" else scores.transpose(1, 0, 2)


# ---- decoding ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Character:
    """One decoded character: its class and the time steps whose argmax it is (one run of repeats)."""

    category: int
    steps: tuple[int, ...]


def greedy_decode(steps: np.ndarray, blank: int = BLANK) -> list[Character]:
    """Greedy CTC decoding of one sample's (T, C) scores: the argmax per step, runs of repeats collapsed into one
    character (keeping the steps they span), blanks dropped (two equal characters need a blank between them)."""
    steps = np.asarray(steps)
    if steps.ndim != 2:
        raise InputError(f"greedy CTC decoding needs one sample's (T, C) scores, not {steps.shape}")
    _check_class(blank, steps.shape[1], "blank class")
    best = steps.argmax(axis=1)
    chars, start = [], 0
    for t in range(1, len(best) + 1):
        if t == len(best) or best[t] != best[start]:
            if best[start] != blank:
                chars.append(Character(int(best[start]), tuple(range(start, t))))
            start = t
    return chars


def _check_class(category: int, classes: int, what: str = "class") -> None:
    if not 0 <= category < classes:
        raise InputError(f"{what} {category} is out of range: the score has {classes} classes (0 to {classes - 1})")


# ---- targets (one sample's (T, C) scores) --------------------------------------------------------------------
class TimeStepTarget:
    """The score of class `category` at time step `step`."""

    needs_output = False
    sequence = True  # seeds one sample's (T, C) scores: the CAM classes seed it through run_sequence

    def __init__(self, step: int, category: int):
        self.step, self.category = int(step), int(category)

    def seed(self, steps: np.ndarray) -> np.ndarray:
        t, c = np.shape(steps)
        if not 0 <= self.step < t:
            raise InputError(f"time step {self.step} is out of range: the score has {t} time steps (0 to {t - 1})")
        _check_class(self.category, c)
        seed = np.zeros((t, c), np.float32)
        seed[self.step, self.category] = 1.0
        return seed

    def __call__(self, steps: np.ndarray) -> float:
        return float((np.asarray(steps) * self.seed(steps)).sum())

    def __repr__(self) -> str:
        return f"TimeStepTarget(step={self.step}, category={self.category})"


class StringTarget:
    """The decoded string's score: each greedily decoded character's class score summed over its time steps."""

    needs_output = True
    sequence = True

    def __init__(self, blank: int = BLANK):
        self.blank = int(blank)

    def characters(self, steps: np.ndarray) -> list[Character]:
        chars = greedy_decode(steps, self.blank)
        if not chars:
            raise InputError(f"the scores decode to no characters (every time step's best class is the blank "
                             f"{self.blank}): nothing to explain; give a TimeStepTarget, or the blank class")
        return chars

    def seed(self, steps: np.ndarray) -> np.ndarray:
        seed = np.zeros(np.shape(steps), np.float32)
        for ch in self.characters(steps):
            seed[list(ch.steps), ch.category] = 1.0
        return seed

    def __call__(self, steps: np.ndarray) -> float:
        return float((np.asarray(steps) * self.seed(steps)).sum())

    def __repr__(self) -> str:
        return f"StringTarget(blank={self.blank})"


class CharacterTarget(StringTarget):
    """The `position`-th decoded character (0-based; negative counts from the end): its class score summed over
    the time steps it came from."""

    def __init__(self, position: int, blank: int = BLANK):
        super().__init__(blank)
        self.position = int(position)

    def seed(self, steps: np.ndarray) -> np.ndarray:
        chars = self.characters(steps)
        if not -len(chars) <= self.position < len(chars):
            raise InputError(f"character {self.position} is out of range: the decoded string has {len(chars)} "
                             f"characters (0 to {len(chars) - 1})")
        ch = chars[self.position]
        seed = np.zeros(np.shape(steps), np.float32)
        seed[list(ch.steps), ch.category] = 1.0
        return seed

    def __repr__(self) -> str:
        return f"CharacterTarget({self.position}, blank={self.blank})"


class WeightedSteps:
    """A fixed weighting of one sample's (T, C) scores: a sequence target frozen at one output (frozen()), so that
    perturbed copies of an input (Score-CAM, Ablation-CAM) score the characters decoded from the input itself."""

    needs_output = False
    sequence = True

    def __init__(self, weights: np.ndarray):
        self.weights = np.asarray(weights, np.float32)

    def seed(self, steps: np.ndarray) -> np.ndarray:
        if np.shape(steps) != self.weights.shape:
            raise InputError(f"weights of shape {self.weights.shape} for scores of shape {np.shape(steps)}")
        return self.weights

    def __call__(self, steps: np.ndarray) -> float:
        return float((np.asarray(steps, np.float64) * self.seed(steps)).sum())

    def __repr__(self) -> str:
        return f"WeightedSteps(weights of shape {self.weights.shape})"


def frozen(target, steps: np.ndarray):
    """A sequence target as the fixed weighting it gives one sample's (T, C) `steps` (its decoding fixed there);
    any other target as it is."""
    return WeightedSteps(target.seed(steps)) if is_sequence_target(target) else target


def frozen_per_sample(scores: np.ndarray, targets: list, declared: tuple | None = None) -> list:
    """Each sequence target frozen at its own sample's (T, C) scores of the batch's (N, T, C) or (T, N, C) `scores`
    (the layout as sequence_seed finds it); other targets as they are."""
    if not any(is_sequence_target(t) for t in targets):
        return list(targets)
    per_sample = _steps_first(np.asarray(scores), sequence_layout(np.shape(scores), len(targets), "auto", declared))
    return [frozen(t, s) for t, s in zip(targets, per_sample)]


def sequence_seed(scores: np.ndarray, targets, layout: str = "auto", declared: tuple | None = None) -> np.ndarray:
    """The dense seed, in the scores' own layout, of one target for every sample or one target per sample
    (a list). `scores` is the (N, T, C) or (T, N, C) score of the whole batch; `declared` its graph shape (the
    symbolic batch axis decides the layout)."""
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise InputError(f"a CTC recognizer's score is (N, T, C) or (T, N, C); this one is {scores.shape}")
    targets = list(targets) if isinstance(targets, (list, tuple)) else None if targets is None else targets
    batch = len(targets) if isinstance(targets, list) else None
    if batch is None:
        raise InputError("give the targets as a list with one per sample, so that the batch (and the layout) is "
                         "known; or use run_sequence")
    order = sequence_layout(scores.shape, batch, layout, declared)
    per_sample = _steps_first(scores, order)
    seed = np.stack([np.asarray(t.seed(s), np.float32) for t, s in zip(targets, per_sample)])
    return seed if order == "NTC" else np.ascontiguousarray(seed.transpose(1, 0, 2))


def is_sequence_target(target) -> bool:
    """A target of one sample's (T, C) sequence scores (TimeStepTarget, CharacterTarget, StringTarget, or any
    target that sets `sequence = True`)."""
    return bool(getattr(target, "sequence", False))


def run_sequence(explainer, x: np.ndarray, target, layout: str = "auto", extra_inputs: dict | None = None):
    """Explain `target` (one for all samples, or a list with one per sample) of a recognizer's score for the batch
    x: a run that reads the scores (a zero seed), then the run with the target's seed. Returns the second run's
    explainer.Result (gradients at explainer.layers). The CAM classes call it for sequence targets."""
    n = len(x)
    targets = list(target) if isinstance(target, (list, tuple)) else [target] * n
    if len(targets) != n:
        raise InputError(f"got {len(targets)} targets for a batch of {n} samples")
    declared = tuple(explainer.score_shape(x.shape))
    shape = tuple(n if not isinstance(d, int) else d for d in declared)
    extra = {} if extra_inputs is None else {"extra_inputs": extra_inputs}
    needs = any(getattr(t, "needs_output", True) for t in targets)
    scores = explainer.run(x, seed=np.zeros(shape, np.float32), **extra).logits if needs else np.zeros(shape)
    seed = sequence_seed(scores, targets, layout, declared)
    return explainer.run(x, seed=seed, **extra)


# ---- text detectors ------------------------------------------------------------------------------------------
def text_region_target(threshold: float = segment.DBNET_THRESHOLD, mask: np.ndarray | None = None):
    """A DBNet probability map's target: its sum over `mask`, by default the pixels above `threshold` (0.3, DBNet's
    binarization threshold). It is segmentation's single-map target (segment.ClassMaskTarget(0))."""
    return segment.ClassMaskTarget(0, mask, threshold)


# ---- the automatic layer -------------------------------------------------------------------------------------
def is_recognizer(mg, score: str) -> bool:
    """A 3-D score computed through a recurrent op (LSTM, GRU, RNN): a sequence recognizer's."""
    shape = mg.shape(mg.tensor(score))
    if shape is None or len(shape) != 3:
        return False
    behind = mg.backward_reach(mg.tensor(score))
    return any(n.op in RECURRENT and any(o.name in behind for o in n.outputs) for n in mg.graph.nodes)


def ocr_layer(mg, nodes: list, on_path: set, score_t):
    """The last NCHW map made by a convolutional op before the first recurrent op on the path (the backbone's
    output, before the sequence model); for a recognizer without one, the last such map before the score.
    Returns a choose.Choice, or None when the path holds no such map."""
    from .choose import Choice, _perm_from_origin

    recurrent = [n for n in nodes if n.op in RECURRENT]
    before = mg.order(recurrent[0]) if recurrent else None
    maps = []
    for node in nodes:
        if before is not None and mg.order(node) >= before:
            break
        for t in node.outputs:
            shape = mg.shape(t)
            if t.name in on_path and t is not score_t and shape is not None and len(shape) == 4 \
                    and all(isinstance(d, int) for d in shape[1:]) and shape[3] > 1 \
                    and _perm_from_origin(mg, t) == [0, 1, 2, 3]:
                maps.append(t)
    if not maps:
        return None
    last = maps[-1]
    h = mg.shape(last)[2]
    where = f"before the {recurrent[0].op} {recurrent[0].name!r}" if recurrent else "before the score"
    strip = "height collapsed to 1: a strip over the text's columns" if h == 1 else f"{h} rows high"
    return Choice(last.name, f"ocr: the last convolutional map {where} ({strip})")
