"""Targets: what score a map explains, with pytorch-grad-cam's class names and arguments.

onnxcam differentiates sum(seed * score) in one onnxruntime run, where the seed has the score's shape. A target
therefore gives its gradient with respect to one sample's model output: `seed(output) -> array shaped like output`.
For a linear target (a class score, a masked sum) the seed is a constant one-hot or mask, and changing targets never
rebuilds anything. A target whose gradient depends on the output values (ClassifierOutputSoftmaxTarget) needs the
logits first: the CAM classes then make two runs, the first to read the logits.

`target(output)` also evaluates the target on a numpy output, as pytorch-grad-cam's targets do on torch tensors.
Custom targets: any object with a `seed(output)` method (and `needs_output = True` if the seed depends on the
output's values); a numpy array shaped like one sample's output is taken as the seed itself.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError


class ClassifierOutputTarget:
    """The score of one class: output[category]."""

    needs_output = False

    def __init__(self, category: int):
        self.category = int(category)

    def __call__(self, model_output: np.ndarray):
        model_output = np.asarray(model_output)
        return model_output[self.category] if model_output.ndim == 1 else model_output[:, self.category]

    def seed(self, output: np.ndarray) -> np.ndarray:
        _expect_vector(self, output)
        _check_class(self, output.shape[0])
        seed = np.zeros(output.shape, np.float32)
        seed[self.category] = 1
        return seed

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.category})"


class ClassifierOutputSoftmaxTarget(ClassifierOutputTarget):
    """The softmax probability of one class; its seed p_c (onehot_c - p) needs the logits (a first run)."""

    needs_output = True

    def __call__(self, model_output: np.ndarray):
        p = _softmax(np.asarray(model_output))
        return p[self.category] if p.ndim == 1 else p[:, self.category]

    def seed(self, output: np.ndarray) -> np.ndarray:
        _expect_vector(self, output)
        _check_class(self, output.shape[0])
        p = _softmax(np.asarray(output, np.float32))
        onehot = np.zeros_like(p)
        onehot[self.category] = 1
        return (p[self.category] * (onehot - p)).astype(np.float32)


class BinaryClassifierOutputTarget:
    """A single-logit binary classifier: the logit for category 1, its negation for category 0."""

    needs_output = False

    def __init__(self, category: int):
        self.category = int(category)

    def _sign(self) -> float:
        return 1.0 if self.category == 1 else -1.0

    def __call__(self, model_output: np.ndarray):
        return np.asarray(model_output) * self._sign()

    def seed(self, output: np.ndarray) -> np.ndarray:
        if output.size != 1:
            raise InputError(f"{self!r} needs one output value per sample (a single-logit binary classifier); "
                             f"this model gives {output.shape}: use ClassifierOutputTarget")
        return np.full(output.shape, self._sign(), np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.category})"


class RawScoresOutputTarget:
    """The raw output itself; with several values per sample, their sum (pytorch-grad-cam needs a scalar here)."""

    needs_output = False

    def __call__(self, model_output: np.ndarray):
        return np.asarray(model_output)

    def seed(self, output: np.ndarray) -> np.ndarray:
        return np.ones(output.shape, np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SemanticSegmentationTarget:
    """A segmentation model's (K, H, W) output: the sum of class `category`'s scores over the pixels of `mask`."""

    needs_output = False

    def __init__(self, category: int, mask: np.ndarray):
        self.category = int(category)
        self.mask = np.asarray(_numpy(mask), np.float32)

    def __call__(self, model_output: np.ndarray):
        return (np.asarray(model_output)[self.category, :, :] * self.mask).sum()

    def seed(self, output: np.ndarray) -> np.ndarray:
        if output.ndim != 3:
            raise InputError(f"{self!r} needs a (K, H, W) output per sample; this model gives {output.shape}")
        _check_class(self, output.shape[0])
        if self.mask.shape != output.shape[1:]:
            raise InputError(f"{self!r}: the mask is {self.mask.shape}, the output's maps are {output.shape[1:]}")
        seed = np.zeros(output.shape, np.float32)
        seed[self.category] = self.mask
        return seed

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.category}, mask of shape {self.mask.shape})"


TARGETS = (ClassifierOutputTarget, ClassifierOutputSoftmaxTarget, BinaryClassifierOutputTarget,
           RawScoresOutputTarget, SemanticSegmentationTarget)
_BY_NAME = {cls.__name__: cls for cls in TARGETS}


def as_target(target):
    """An onnxcam target for `target`: onnxcam's own, a seed array, an int class, or pytorch-grad-cam's target of the
    same name (so that code which keeps its pytorch_grad_cam.utils.model_targets import still works)."""
    if isinstance(target, np.ndarray):
        return _SeedTarget(target)
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        return ClassifierOutputTarget(int(target))
    if callable(getattr(target, "seed", None)):
        return target
    cls = _BY_NAME.get(type(target).__name__)
    if cls is not None:
        if cls is RawScoresOutputTarget:
            return cls()
        if cls is SemanticSegmentationTarget:
            return cls(target.category, target.mask)
        return cls(target.category)
    raise TypeError(f"target {target!r} has no seed(output) method: onnxcam needs each target's gradient with "
                    "respect to the model output (see onnxcam.targets); torch-code targets cannot run on ONNX")


def seeds(targets: list, outputs: np.ndarray) -> np.ndarray:
    """Stack each sample's seed; outputs is the score (N, ...) (only its shape is read unless a target needs it)."""
    rows = []
    for target, output in zip(targets, outputs):
        seed = np.asarray(target.seed(output), np.float32)
        if seed.shape != output.shape:
            raise InputError(f"target {target!r} gave a seed of shape {seed.shape} for an output of shape "
                             f"{output.shape}")
        rows.append(seed)
    return np.stack(rows)


class _SeedTarget:
    needs_output = False

    def __init__(self, seed: np.ndarray):
        self.weights = np.asarray(seed, np.float32)

    def seed(self, output: np.ndarray) -> np.ndarray:
        if self.weights.shape != output.shape:
            raise InputError(f"a seed target must have one sample's output shape {output.shape}, "
                             f"not {self.weights.shape}")
        return self.weights

    def __repr__(self) -> str:
        return f"seed array of shape {self.weights.shape}"


def _expect_vector(target, output: np.ndarray) -> None:
    if output.ndim != 1:
        raise InputError(f"{target!r} needs a class-score vector per sample; this model gives {output.shape} "
                         "(use SemanticSegmentationTarget for (K, H, W) outputs, or a seed array)")


def _check_class(target, k: int) -> None:
    if not 0 <= target.category < k:
        raise InputError(f"{target!r}: class {target.category} is out of range, the model has {k} classes "
                         f"(0..{k - 1})")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _numpy(value):
    """A torch tensor or anything array-like -> numpy, without importing torch."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
