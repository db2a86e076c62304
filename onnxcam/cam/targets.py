"""Targets: what score a map explains, with pytorch-grad-cam's class names and arguments.

onnxcam differentiates sum(seed * score) in one onnxruntime run, where the seed has the score's shape. A target
therefore gives its gradient with respect to one sample's model output: `seed(output) -> array shaped like output`.
For a linear target (a class score, a masked sum) the seed is a constant one-hot or mask, and changing targets never
rebuilds anything. A target whose gradient depends on the output values (ClassifierOutputSoftmaxTarget) needs the
logits first: the CAM classes then make two runs, the first to read the logits.

`target(output)` also evaluates the target on a numpy output, as pytorch-grad-cam's targets do on torch tensors.
Custom targets: any object with a `seed(output)` method (and `needs_output = True` if the seed depends on the
output's values); a numpy array shaped like one sample's output is taken as the seed itself.

This is the one implementation of every target: it sits with the CAM classes that differentiate them. Two modules
re-export it: onnxcam.targets (the short public path) and onnxcam.utils.model_targets (pytorch-grad-cam 1.5.7's
module path, so that swapping the import is the whole change).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

__all__ = [
    "TARGETS",
    "BinaryClassifierOutputTarget",
    "ClassifierOutputReST",
    "ClassifierOutputSoftmaxTarget",
    "ClassifierOutputTarget",
    "FasterRCNNBoxScoreTarget",
    "FinerWeightedTarget",
    "RawScoresOutputTarget",
    "SemanticSegmentationTarget",
    "SoftmaxOutputTarget",
    "as_target",
    "seeds",
]


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


class ClassifierOutputReST(ClassifierOutputTarget):
    """ReST (arXiv 2501.06261): the logit minus the cross-entropy of the class, z_c - CE(z, c) = 2 z_c - logsumexp(z).
    Its seed 2 onehot_c - softmax(z) needs the logits (a first run)."""

    needs_output = True

    def __call__(self, model_output: np.ndarray):
        z = np.asarray(model_output)
        return 2 * _pick(z, self.category) - _logsumexp(z)

    def seed(self, output: np.ndarray) -> np.ndarray:
        _expect_vector(self, output)
        _check_class(self, output.shape[0])
        seed = -_softmax(np.asarray(output, np.float64))
        seed[self.category] += 2
        return seed.astype(np.float32)


class SoftmaxOutputTarget:
    """All class probabilities, softmax(z) (a vector per sample: for metrics and gradient-free methods).

    Their sum is 1 whatever the logits, so its gradient is identically zero: seed() refuses rather than return a
    map of nothing (pytorch-grad-cam's backward fails on the non-scalar)."""

    needs_output = False

    def __call__(self, model_output: np.ndarray):
        return _softmax(np.asarray(model_output))

    def seed(self, output: np.ndarray) -> np.ndarray:
        raise InputError("SoftmaxOutputTarget scores every class's probability; they sum to 1, so the gradient is "
                         "zero: use ClassifierOutputSoftmaxTarget(category) to explain one class's probability")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FinerWeightedTarget:
    """Finer-CAM's score (arXiv 2501.11309): sum_j p_j (z_main - alpha z_j) / (sum_j p_j + 1e-9) over the comparison
    classes j, with p = softmax(z). As in pytorch-grad-cam the weights p_j are differentiated too, so the seed
    needs the logits (a first run)."""

    needs_output = True

    def __init__(self, main_category: int, comparison_categories, alpha: float):
        self.main_category = int(main_category)
        self.comparison_categories = [int(c) for c in comparison_categories]
        self.alpha = float(alpha)
        if not self.comparison_categories:
            raise InputError("FinerWeightedTarget needs at least one comparison category")

    def __call__(self, model_output: np.ndarray):
        z = np.asarray(model_output)
        p = _softmax(z)
        main = _pick(z, self.main_category)
        num = sum(_pick(p, j) * (main - self.alpha * _pick(z, j)) for j in self.comparison_categories)
        return num / (sum(_pick(p, j) for j in self.comparison_categories) + 1e-9)

    def seed(self, output: np.ndarray) -> np.ndarray:
        _expect_vector(self, output)
        k = output.shape[0]
        for c in (self.main_category, *self.comparison_categories):
            if not 0 <= c < k:
                raise InputError(f"{self!r}: class {c} is out of range, the model has {k} classes (0..{k - 1})")
        z = np.asarray(output, np.float64)
        p = _softmax(z)
        eye = np.eye(k)
        # score = N / D; dp_j/dz = p_j (e_j - p); each listed class counts once per listing, as in the sums
        num = sum(p[j] * (z[self.main_category] - self.alpha * z[j]) for j in self.comparison_categories)
        den = sum(p[j] for j in self.comparison_categories) + 1e-9
        d_num = sum(p[j] * (eye[j] - p) * (z[self.main_category] - self.alpha * z[j])
                    + p[j] * (eye[self.main_category] - self.alpha * eye[j]) for j in self.comparison_categories)
        d_den = sum(p[j] * (eye[j] - p) for j in self.comparison_categories)
        return (d_num / den - num * d_den / den**2).astype(np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.main_category}, {self.comparison_categories}, alpha={self.alpha})"


class FasterRCNNBoxScoreTarget:
    """For each reference box (labels[i], bounding_boxes[i] as x1, y1, x2, y2): the predicted box of highest IoU with
    it, if that IoU exceeds iou_threshold and its label matches, adds IoU + its score; the total is the target.

    Works on a detector's post-processed outputs as a dict of arrays {"boxes": (B, 4), "labels": (B,), "scores":
    (B,)}, as torchvision's Faster R-CNN returns them; seed() gives the gradient as a dict of the same keys (zero for
    labels): d/dscores is 1 at each matched box, d/dboxes the IoU's gradient there. A whole exported detector (Faster
    R-CNN with its RoiAlign and NMS, SSD, RetinaNet) is explained through its post-processing with
    onnxcam.tasks.detect.SelectedDetectionTarget instead: it seeds the pre-selection (region) class score a detection
    was picked from, matched by index or by label and box (the same IoU matching), the score term without the IoU."""

    needs_output = True

    def __init__(self, labels, bounding_boxes, iou_threshold: float = 0.5):
        self.labels = np.asarray(_numpy(labels)).reshape(-1)
        self.bounding_boxes = np.asarray(_numpy(bounding_boxes), np.float64).reshape(-1, 4)
        if len(self.labels) != len(self.bounding_boxes):
            raise InputError(f"FasterRCNNBoxScoreTarget: {len(self.labels)} labels for {len(self.bounding_boxes)} "
                             "boxes; give one label per box")
        self.iou_threshold = float(iou_threshold)

    def _matches(self, boxes: np.ndarray, labels: np.ndarray) -> list[tuple[np.ndarray, int, float]]:
        """(reference box, matched predicted box index, IoU) per reference box that counts."""
        found = []
        for ref, label in zip(self.bounding_boxes, self.labels) if len(boxes) else ():
            ious = _iou(ref, boxes)
            i = int(np.argmax(ious))
            if ious[i] > self.iou_threshold and labels[i] == label:
                found.append((ref, i, float(ious[i])))
        return found

    def __call__(self, model_outputs: dict):
        boxes, labels, scores = _detections(model_outputs)
        return np.float64(sum(iou + scores[i] for _, i, iou in self._matches(boxes, labels)))

    def seed(self, outputs: dict) -> dict:
        boxes, labels, scores = _detections(outputs)
        d_boxes, d_scores = np.zeros(boxes.shape), np.zeros(scores.shape)
        for ref, i, _ in self._matches(boxes, labels):
            d_scores[i] += 1
            d_boxes[i] += _iou_gradient(ref, boxes[i])
        return {"boxes": d_boxes.astype(np.float32), "labels": np.zeros(labels.shape, np.float32),
                "scores": d_scores.astype(np.float32)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.labels)} boxes, iou_threshold={self.iou_threshold})"


def _pick(x: np.ndarray, idx: int):
    return x[idx] if x.ndim == 1 else x[..., idx]


def _logsumexp(z: np.ndarray):
    top = z.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=-1, keepdims=True)))[..., 0]


def _detections(outputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(outputs, dict) or not {"boxes", "labels", "scores"} <= set(outputs):
        raise InputError("FasterRCNNBoxScoreTarget needs a detector's outputs as a dict with 'boxes' (B, 4), "
                         "'labels' (B,) and 'scores' (B,)")
    boxes = np.asarray(_numpy(outputs["boxes"]), np.float64).reshape(-1, 4)
    return boxes, np.asarray(_numpy(outputs["labels"])).reshape(-1), \
        np.asarray(_numpy(outputs["scores"]), np.float64).reshape(-1)


def _iou(ref: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x1, y1, x2, y2) box with each of (B, 4), as torchvision.ops.box_iou."""
    w = np.clip(np.minimum(ref[2], boxes[:, 2]) - np.maximum(ref[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(ref[3], boxes[:, 3]) - np.maximum(ref[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = (ref[2] - ref[0]) * (ref[3] - ref[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def _iou_gradient(ref: np.ndarray, box: np.ndarray) -> np.ndarray:
    """d IoU(ref, box) / d box, for overlapping boxes (a match has IoU > threshold >= 0)."""
    x1, y1 = max(ref[0], box[0]), max(ref[1], box[1])
    x2, y2 = min(ref[2], box[2]), min(ref[3], box[3])
    w, h = x2 - x1, y2 - y1
    inter = w * h
    union = (ref[2] - ref[0]) * (ref[3] - ref[1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter
    # d inter / d box: a coordinate of the box moves the intersection only where it is the binding edge (at an
    # exact tie with the reference's edge, a kink, it is taken as not binding)
    d_inter = np.array([-h if box[0] > ref[0] else 0.0, -w if box[1] > ref[1] else 0.0,
                        h if box[2] < ref[2] else 0.0, w if box[3] < ref[3] else 0.0])
    d_area = np.array([-(box[3] - box[1]), -(box[2] - box[0]), box[3] - box[1], box[2] - box[0]])
    d_union = d_area - d_inter
    return d_inter / union - inter * d_union / union**2


TARGETS = (ClassifierOutputTarget, ClassifierOutputSoftmaxTarget, ClassifierOutputReST, BinaryClassifierOutputTarget,
           RawScoresOutputTarget, SoftmaxOutputTarget, SemanticSegmentationTarget, FinerWeightedTarget,
           FasterRCNNBoxScoreTarget)
# pytorch-grad-cam's target of the same class name -> its onnxcam equivalent, from the attributes both share
_FROM_TORCH = {
    "ClassifierOutputTarget": lambda t: ClassifierOutputTarget(t.category),
    "ClassifierOutputSoftmaxTarget": lambda t: ClassifierOutputSoftmaxTarget(t.category),
    "ClassifierOutputReST": lambda t: ClassifierOutputReST(t.category),
    "BinaryClassifierOutputTarget": lambda t: BinaryClassifierOutputTarget(t.category),
    "RawScoresOutputTarget": lambda t: RawScoresOutputTarget(),
    "SoftmaxOutputTarget": lambda t: SoftmaxOutputTarget(),
    "SemanticSegmentationTarget": lambda t: SemanticSegmentationTarget(t.category, t.mask),
    "FinerWeightedTarget": lambda t: FinerWeightedTarget(t.main_category, t.comparison_categories, t.alpha),
    "FasterRCNNBoxScoreTarget": lambda t: FasterRCNNBoxScoreTarget(t.labels, t.bounding_boxes, t.iou_threshold),
}


def per_sample(targets, n: int) -> list:
    """One target object per sample of a batch of n (an int: that class for every sample), in onnxcam errors."""
    if isinstance(targets, (int, np.integer)):
        targets = [targets] * n
    targets = list(targets)
    if len(targets) != n:
        raise InputError(f"got {len(targets)} targets for a batch of {n} samples; give one per sample")
    try:
        return [as_target(t) for t in targets]
    except TypeError as exc:  # an object that is no target: the API speaks in onnxcam errors
        raise InputError(str(exc)) from None


def as_target(target):
    """An onnxcam target for `target`: onnxcam's own, a seed array, an int class, or pytorch-grad-cam's target of the
    same name (so that code which keeps its pytorch_grad_cam.utils.model_targets import still works)."""
    if isinstance(target, np.ndarray):
        return _SeedTarget(target)
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        return ClassifierOutputTarget(int(target))
    if callable(getattr(target, "seed", None)):
        return target
    adapt = _FROM_TORCH.get(type(target).__name__)
    if adapt is not None:
        return adapt(target)
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
    """A seed array given as a target: the weighting of one sample's output whose gradient is taken, and whose
    weighted sum is the target's value (what the gradient-free methods score their perturbed runs by)."""

    needs_output = False

    def __init__(self, seed: np.ndarray):
        self.weights = np.asarray(seed, np.float32)

    def seed(self, output: np.ndarray) -> np.ndarray:
        if self.weights.shape != np.shape(output):
            raise InputError(f"a seed target must have one sample's output shape {np.shape(output)}, "
                             f"not {self.weights.shape}")
        return self.weights

    def __call__(self, output: np.ndarray) -> float:
        return float((np.asarray(output, np.float64) * self.seed(output)).sum())

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
