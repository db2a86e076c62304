"""Detection heads: recognising raw, pre-NMS YOLO outputs, decoding them, and targets that explain one detection.

Layouts (FACTS.md "Output layouts of deployed models"), each box (cx, cy, w, h) in input pixels:
- "yolov8": (N, 4 + C, A), then C class scores after sigmoid, no objectness (YOLOv8, YOLO11);
- "yolov8t": the same transposed, (N, A, 4 + C);
- "yolov5": (N, A, 5 + C), objectness then C class scores (YOLOv5, YOLOv7, YOLOX's concatenated scales).
A is the anchor count: the cells of the strides 8-32 (or 8-64, 4-32) grids, times 3 anchors per cell for
anchor-based heads. A layout is recognised from the output shape and the input size (and the class count of the
model's metadata where it has one), or named with decode=.

A detection's score is its class score (v8) or objectness x class score (v5). onnxcam explains it in one run by a
seed on the output: the gradient of score (+ the IoU of the box with a reference box, FasterRCNNBoxScoreTarget's
semantics) with respect to the output, which is exact because the seed is that gradient evaluated at the output.
"""

from __future__ import annotations

import ast
import json
import logging
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

DECODES = {"yolov8": "(N, 4+C, A)", "yolov8t": "(N, A, 4+C)", "yolov5": "(N, A, 5+C)"}
STRIDE_SETS = ((8, 16, 32), (8, 16, 32, 64), (4, 8, 16, 32))


@dataclass(frozen=True)
class DetectionLayout:
    """Where a head's numbers sit in one sample's output (the batch axis removed)."""

    decode: str          # a key of DECODES
    anchors: int
    classes: int
    source: str          # how it was recognised: "shape", "shape and metadata", "decode="

    @property
    def anchors_last(self) -> bool:
        return self.decode == "yolov8"

    @property
    def objectness(self) -> bool:
        return self.decode == "yolov5"

    @property
    def first_class(self) -> int:
        return 5 if self.objectness else 4

    def rows(self, sample: np.ndarray) -> np.ndarray:
        """One sample's output as (features, anchors): a view, so writing into it writes the sample."""
        return sample if self.anchors_last else sample.T

    def describe(self) -> dict:
        return {"decode": self.decode, "layout": DECODES[self.decode], "anchors": self.anchors,
                "classes": self.classes, "objectness": self.objectness, "box": "cx, cy, w, h in input pixels",
                "recognised_from": self.source}


@dataclass
class Detection:
    anchor: int
    label: int
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in input pixels

    def to_json(self) -> dict:
        return {"anchor": self.anchor, "label": self.label, "score": round(self.score, 6),
                "box": [round(v, 3) for v in self.box]}


# ---- recognising a layout ------------------------------------------------------------------------------------
def anchor_counts(input_hw: tuple[int, int]) -> dict[int, str]:
    """Anchor counts a YOLO head has at this input size -> a description (stride-2 stages round up, as a
    3x3 stride-2 convolution with padding 1 does)."""
    counts = {}
    for strides in STRIDE_SETS:
        cells = sum(_cells(input_hw, s) for s in strides)
        counts.setdefault(cells, f"one per cell of strides {'/'.join(map(str, strides))}")
        counts.setdefault(3 * cells, f"three per cell of strides {'/'.join(map(str, strides))}")
    return counts


def _cells(input_hw: tuple[int, int], stride: int) -> int:
    h, w = input_hw
    while stride > 1:
        h, w, stride = -(-h // 2), -(-w // 2), stride // 2
    return h * w


def recognise(shape: tuple, input_hw: tuple[int, int], classes: int | None = None, decode: str | None = None,
              name: str = "output") -> DetectionLayout:
    """The detection layout of an output of `shape` (batch first) at input size (H, W), or InputError naming the
    shape and the decode= values that would read it. classes: the class count the model's metadata gives."""
    if decode is not None and decode not in DECODES:
        raise InputError(f"unknown detection decode {decode!r}; choose from {', '.join(DECODES)}")
    if len(shape) != 3 or not all(isinstance(d, int) for d in shape[1:]):
        raise InputError(f"output {name!r} has shape {_fmt(shape)}: a YOLO detection head is 3-D, (N, 4+C, A) or "
                         "(N, A, 5+C); give the output holding the class scores (output=)")
    _, a, b = shape
    if decode is not None:
        return _given(decode, a, b, name, shape)
    counts = anchor_counts(input_hw)
    if classes is not None:  # the metadata's class count settles square-ish shapes
        for decode_, anchors, features in (("yolov8", b, a), ("yolov8t", a, b), ("yolov5", a, b)):
            if anchors in counts and features == (5 if decode_ == "yolov5" else 4) + classes:
                return DetectionLayout(decode_, anchors, classes, "shape and metadata")
    if b in counts and 5 <= a < b:
        return DetectionLayout("yolov8", b, a - 4, "shape")
    if a in counts and 5 <= b < a:
        if classes is not None and b == 4 + classes:
            return DetectionLayout("yolov8t", a, classes, "shape and metadata")
        if classes is not None and b != 5 + classes:
            raise InputError(f"output {name!r} has shape {_fmt(shape)}: {b} numbers per anchor fit neither 4 + "
                             f"{classes} nor 5 + {classes} classes (the metadata's class count); give decode="
                             f"{_choices()}")
        return DetectionLayout("yolov5", a, b - 5, "shape" if classes is None else "shape and metadata")
    raise InputError(f"output {name!r} has shape {_fmt(shape)}, which is no detection layout onnxcam recognises for "
                     f"a {input_hw[0]}x{input_hw[1]} input (YOLO heads: (N, 4+C, A) or (N, A, 5+C) with A one of "
                     f"{sorted(counts)[:6]}...); give decode={_choices()}")


def _given(decode: str, a: int, b: int, name: str, shape: tuple) -> DetectionLayout:
    features, anchors = (a, b) if decode == "yolov8" else (b, a)
    first = 5 if decode == "yolov5" else 4
    if features <= first:
        raise InputError(f"output {name!r} has shape {_fmt(shape)}: decode={decode!r} {DECODES[decode]} needs more "
                         f"than {first} numbers per anchor, it has {features}")
    return DetectionLayout(decode, anchors, features - first, "decode=")


def _choices() -> str:
    return ", ".join(f"'{k}' for {v}" for k, v in DECODES.items())


def class_names(metadata: dict[str, str]) -> list[str] | None:
    """Class names from a model's metadata_props: ultralytics' `names` ("{0: 'person', ...}") or onnxcam.labels."""
    raw = metadata.get("names")
    if raw:
        try:
            names = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            names = None
        if isinstance(names, dict) and all(isinstance(k, int) for k in names):
            return [str(names.get(i, i)) for i in range(max(names) + 1)] if names else None
        if isinstance(names, list):
            return [str(n) for n in names]
    raw = metadata.get("onnxcam.labels")
    if raw:
        try:
            names = json.loads(raw)
        except ValueError:
            return None
        return [str(n) for n in names] if isinstance(names, list) else None
    return None


# ---- decoding --------------------------------------------------------------------------------------------------
def boxes_xyxy(rows: np.ndarray) -> np.ndarray:
    """(features, A) rows -> (A, 4) boxes x1, y1, x2, y2 from the first four rows (cx, cy, w, h)."""
    cx, cy, w, h = (np.asarray(rows[i], np.float64) for i in range(4))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def class_scores(rows: np.ndarray, layout: DetectionLayout) -> np.ndarray:
    """(C, A) scores of every class at every anchor (objectness x class probability for v5-style heads)."""
    scores = np.asarray(rows[layout.first_class:], np.float64)
    return scores * np.asarray(rows[4], np.float64) if layout.objectness else scores


def decode(output: np.ndarray, layout: DetectionLayout, conf: float = 0.25, top: int | None = None,
           iou: float = 0.45, classes=None) -> list[list[Detection]]:
    """Per sample, its detections: each anchor's best class above `conf` (and among `classes`, when given),
    class-wise NMS at `iou`, the `top` highest scores first (NMS stops there: greedy, its first boxes are final)."""
    found = []
    for sample in np.asarray(output):
        rows = layout.rows(sample)
        scores = class_scores(rows, layout)
        labels, best = scores.argmax(axis=0), scores.max(axis=0)
        keep = best > conf
        if classes is not None:
            keep &= np.isin(labels, list(classes))
        keep = np.flatnonzero(keep)
        boxes = boxes_xyxy(rows)
        kept = keep[nms(boxes[keep], best[keep], iou, labels[keep], limit=top)]
        found.append([Detection(int(a), int(labels[a]), float(best[a]), tuple(float(v) for v in boxes[a]))
                      for a in kept])
    return found


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (n, 4) boxes against (m, 4) boxes, xyxy: (n, m)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _area(x: np.ndarray) -> np.ndarray:
    return np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.45, labels: np.ndarray | None = None,
        limit: int | None = None) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first (per class when labels are given: boxes
    of different classes are shifted apart so they never overlap); the first `limit` of them when given (a box is
    kept or not by the better boxes alone: the first ones are final before the rest is looked at)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if labels is not None and len(boxes):
        boxes = boxes + (np.asarray(labels, np.float64) * (boxes.max() + 1))[:, None]
    order, kept = np.argsort(-np.asarray(scores), kind="stable"), []
    while order.size and (limit is None or len(kept) < limit):  # one IoU row per kept box
        i, order = order[0], order[1:]
        kept.append(i)
        if order.size:
            order = order[box_iou(boxes[i], boxes[order])[0] <= iou]
    return np.asarray(kept, np.int64)


# ---- targets ---------------------------------------------------------------------------------------------------
def detection_seed(sample: np.ndarray, layout: DetectionLayout, anchor: int, label: int,
                   ref_box=None) -> np.ndarray:
    """d(score of class `label` at `anchor` [+ IoU(its box, ref_box)]) / d(one sample's output)."""
    sample = np.asarray(sample, np.float32)
    _check_index(anchor, layout.anchors, "anchor", "the head's anchors")
    _check_index(label, layout.classes, "class", "the head's classes")
    seed = np.zeros(sample.shape, np.float32)
    rows, out = layout.rows(seed), layout.rows(sample)
    row = layout.first_class + label
    if layout.objectness:  # d(obj * cls): product rule, evaluated at this output
        rows[row, anchor], rows[4, anchor] = out[4, anchor], out[row, anchor]
    else:
        rows[row, anchor] = 1.0
    if ref_box is not None:
        rows[:4, anchor] += iou_gradient(out[:4, anchor], ref_box)
    return seed


def iou_gradient(cxcywh, ref_box) -> np.ndarray:
    """d IoU(box, ref_box) / d (cx, cy, w, h) of a box given as centre and size; ref_box is x1, y1, x2, y2.
    An edge exactly on the reference's edge (a kink) counts as the box's own."""
    cx, cy, w, h = (float(v) for v in cxcywh)
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    rx1, ry1, rx2, ry2 = (float(v) for v in ref_box)
    iw, ih = min(x2, rx2) - max(x1, rx1), min(y2, ry2) - max(y1, ry1)
    if iw <= 0 or ih <= 0:
        return np.zeros(4, np.float32)
    inter = iw * ih
    union = w * h + (rx2 - rx1) * (ry2 - ry1) - inter
    # d inter / d (x1, x2, y1, y2): only the box's own edges that bound the intersection move it
    di = np.array([-ih * (x1 >= rx1), ih * (x2 <= rx2), -iw * (y1 >= ry1), iw * (y2 <= ry2)])
    du = np.array([-h, h, -w, w]) - di  # union = w h + area_ref - inter
    d = (di * union - inter * du) / union ** 2  # d IoU / d (x1, x2, y1, y2)
    return np.float32([d[0] + d[1], d[2] + d[3], (d[1] - d[0]) / 2, (d[3] - d[2]) / 2])


def _check_index(value: int, size: int, what: str, of: str) -> None:
    if not 0 <= int(value) < size:
        raise InputError(f"detection {what} {int(value)} is out of range: {of} number {size} (0 to {size - 1})")


class DetectionTarget:
    """One detection of a YOLO head, as a target for the CAM classes (a seed on the raw output).

    anchor: the anchor index; or label with box (x1, y1, x2, y2, input pixels): the anchor whose box matches it
    best by IoU (at least iou_threshold) among those whose best class is `label` (pytorch-grad-cam's
    FasterRCNNBoxScoreTarget; no match gives a zero seed, as its zero score does). iou=True adds the matched box's
    IoU to the score. label defaults to the anchor's best class. Without the IoU term the CAM classes seed the
    head's class scores alone where the output copies them (class_layout), as the command line does."""

    def __init__(self, layout: DetectionLayout, anchor: int | None = None, label: int | None = None,
                 box=None, iou: bool = False, iou_threshold: float = 0.5):
        if anchor is None and (box is None or label is None):
            raise InputError("a DetectionTarget needs an anchor, or a label and a box to match")
        if iou and box is None:
            raise InputError("DetectionTarget(iou=True) needs box=: the IoU is the detection's with that box")
        self.layout, self.anchor, self.label, self.iou, self.iou_threshold = layout, anchor, label, iou, iou_threshold
        self.box = None if box is None else tuple(float(v) for v in box)

    @property
    def needs_output(self) -> bool:
        """Whether the seed depends on the output's values (the CAM classes then read them by a first run): a box
        to match, the anchor's best class to find, an IoU term, or objectness x class (the product rule). An
        anchor and a label of a head without objectness give a constant one-hot seed."""
        return self.anchor is None or self.label is None or self.iou or self.layout.objectness

    @property
    def class_layout(self) -> DetectionLayout | None:
        """The head's layout when this target's seed weights only its class rows (and objectness): no IoU term.
        The CAM classes then seed the head's class-score tensor instead of the output where the output is a pure
        copy of it (class_rows), keeping the box branch off the gradient path. None: seed the output itself."""
        return None if self.iou else self.layout

    def match(self, sample: np.ndarray) -> tuple[int, int] | None:
        """(anchor, label) this target explains in one sample's output; None when no box matches."""
        rows = self.layout.rows(np.asarray(sample))
        if self.anchor is not None:
            _check_index(self.anchor, self.layout.anchors, "anchor", "the head's anchors")
            label = self.label if self.label is not None else int(class_scores(rows[:, [self.anchor]],
                                                                                self.layout).argmax())
            return int(self.anchor), int(label)
        _check_index(self.label, self.layout.classes, "class", "the head's classes")
        same = np.flatnonzero(class_scores(rows, self.layout).argmax(axis=0) == self.label)
        if not len(same):
            return None
        overlaps = box_iou(boxes_xyxy(rows[:, same]), self.box)[:, 0]
        best = int(overlaps.argmax())
        return (int(same[best]), int(self.label)) if overlaps[best] >= self.iou_threshold else None

    def seed(self, output: np.ndarray) -> np.ndarray:
        found = self.match(output)
        if found is None:
            log.info("%r: no box of class %s overlaps %s by IoU %.2f or more: zero target", self, self.label,
                     self.box, self.iou_threshold)
            return np.zeros(np.shape(output), np.float32)
        anchor, label = found
        return detection_seed(output, self.layout, anchor, label, self.box if self.iou else None)

    def __call__(self, output: np.ndarray) -> float:
        """The target's value on one sample's output (score, + IoU when iou=True)."""
        found = self.match(output)
        if found is None:
            return 0.0
        anchor, label = found
        rows = self.layout.rows(np.asarray(output))
        value = float(class_scores(rows[:, [anchor]], self.layout)[label, 0])
        if self.iou:
            value += float(box_iou(boxes_xyxy(rows[:, [anchor]]), self.box)[0, 0])
        return value

    def __repr__(self) -> str:
        what = f"anchor={self.anchor}" if self.anchor is not None else f"label={self.label}, box={self.box}"
        return f"DetectionTarget({what}, iou={self.iou})"


def _fmt(shape) -> str:
    return "(" + ", ".join("N" if d is None or isinstance(d, str) else str(d) for d in shape) + ")"


# ---- seeding the class scores alone ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassRows:
    """The head's class-score tensor and the output rows it fills: output = Concat([box rows, ..., tensor],
    features axis) behind Transposes/Identities only, so the rows [lo, hi) of each sample's (features, anchors)
    view are a pure copy of `tensor`. A seed that is zero outside those rows (a class score, or objectness x class
    when the objectness row is among them) gives the same gradient seeded on `tensor`, and the box branch (YOLOv8's
    DFL) is off the gradient path: a class target costs less (issue 14, cost at the automatic layer)."""

    tensor: str
    lo: int
    hi: int
    perm: tuple[int, int]   # sample axis k of the Concat's output = sample axis perm[k] of the output
    features_axis: int      # the Concat's sample axis holding the features (0 or 1)

    def covers(self, seed: np.ndarray) -> bool:
        """True when one sample's output-shaped seed is zero outside the rows this tensor fills."""
        rows = self._concat_view(np.asarray(seed))
        outside = np.delete(rows, np.s_[self.lo:self.hi], axis=self.features_axis + rows.ndim - 2)
        return not np.any(outside)

    def slice(self, seed: np.ndarray) -> np.ndarray:
        """One sample's (or a batch's: leading axes kept) output-shaped seed as a seed of `tensor`; InputError
        when it is not zero outside the rows (an IoU term: seed the output instead)."""
        seed = np.asarray(seed, np.float32)
        if not self.covers(seed):
            raise InputError(f"this seed weights the box rows, which {self.tensor!r} does not hold: seed the "
                             "detection output itself (a target with an IoU term)")
        rows = self._concat_view(seed)
        index = [slice(None)] * rows.ndim
        index[self.features_axis + rows.ndim - 2] = slice(self.lo, self.hi)
        return np.ascontiguousarray(rows[tuple(index)])

    def _concat_view(self, seed: np.ndarray) -> np.ndarray:
        lead = seed.ndim - 2
        return seed.transpose(*range(lead), lead + self.perm[0], lead + self.perm[1])


def class_rows(mg, score: str, layout: DetectionLayout) -> ClassRows | None:
    """The class-score tensor behind a YOLO head's output `score`, when a seed on it is exactly a seed on the
    output restricted to its rows. Precondition, checked: the output is a Concat along the features axis (behind
    Transposes and Identities only) whose input holding the class rows (and, for objectness x class, the
    objectness row) holds no box row and has static sizes. Anything else (a Reshape, per-scale Concats along the
    anchors, a Mul after the Concat) gives None, logged at DEBUG: the output itself is then seeded."""
    t, perm = mg.tensor(score), [0, 1, 2]   # output axis i = axis perm[i] of the tensor reached walking back
    while (node := mg.producer(t)) is not None and node.op in ("Identity", "Transpose"):
        if node.op == "Transpose":
            p = node.attrs.get("perm")
            if p is None or len(p) != 3:
                return _no_rows(score, "a Transpose without a 3-D perm")
            perm = [int(p[k]) for k in perm]
        t = node.inputs[0]
    if node is None or node.op != "Concat":
        return _no_rows(score, f"it is made by {node.op if node is not None else 'no node'}, not a Concat")
    out_features = 1 if layout.anchors_last else 2
    features = perm[out_features]
    axis = int(node.attrs.get("axis", 0)) % 3
    if perm[0] != 0 or axis != features:
        return _no_rows(score, f"its Concat joins axis {axis}, not the features axis {features}")
    need = (4 if layout.objectness else layout.first_class, layout.first_class + layout.classes)
    lo = 0
    for inp in node.inputs:
        shape = mg.shape(inp)
        size = shape[axis] if shape is not None and len(shape) == 3 else None
        if not isinstance(size, int):
            return _no_rows(score, f"Concat input {inp.name!r} has no static size along the features axis")
        if lo <= need[0] and need[1] <= lo + size:
            if lo < 4:
                return _no_rows(score, f"Concat input {inp.name!r} holds box rows too")
            sample_perm = (perm[1] - 1, perm[2] - 1)
            return ClassRows(inp.name, lo, lo + size, sample_perm, features - 1)
        lo += size
    return _no_rows(score, f"no Concat input holds rows {need[0]} to {need[1] - 1} alone")


def _no_rows(score: str, why: str) -> None:
    log.debug("seeding output %r itself, not its class scores: %s", score, why)


# ---- detectors exported whole (torchvision SSD/SSDlite, RetinaNet): detections after NMS -------------------------
@dataclass(frozen=True)
class Selection:
    """A detector exported with its post-processing: boxes (D, 4), scores (D,) and labels (D,) outputs after NMS,
    each score a copy (Gather, GatherND, TopK) of one entry of the (N, A, C) class scores `score` (the output of a
    Softmax or Sigmoid inside the graph). A detection is explained as that entry: the selection picks it, so its
    gradient is the entry's (differentiating through the Gathers gives the same one-hot seed).

    logits=True (RetinaNet): `score` is the head's (N, A, C) logits, and the Sigmoid comes after the selection
    has cut them into levels (one Sigmoid per level's slice of one image). A detection's score is then
    sigmoid(entry): its seed is sigmoid'(entry) = s (1 - s) at the entry, exact for the score explained."""

    score: str        # the pre-selection class scores (or logits), (N, A, C)
    boxes: str
    scores: str
    labels: str
    anchors: int
    classes: int
    activation: str   # "Softmax" or "Sigmoid"
    logits: bool = False  # the activation is applied after the selection (per level), not before
    regions: bool = False  # Faster R-CNN: `score` is (R, C), one image's regions, seen as (1, R, C); R is each
    # run's own (its proposals), anchors only the count the shape probe saw

    def probabilities(self, sample: np.ndarray) -> np.ndarray:
        """One image's (A, C) values the detections' scores are copies of: the sample itself, or (logits) its
        sigmoid, in float64."""
        sample = np.asarray(sample, np.float64)
        return 1 / (1 + np.exp(-sample)) if self.logits else sample

    def seed(self, sample: np.ndarray, anchor: int, label: int) -> np.ndarray:
        """d(score of the detection at (anchor, label)) / d(one image's (A, C) `score` entries)."""
        seed = np.zeros(np.shape(sample), np.float32)
        if self.logits:
            s = float(self.probabilities(np.asarray(sample)[anchor, label]))
            seed[anchor, label] = s * (1 - s)
        else:
            seed[anchor, label] = 1.0
        return seed

    def describe(self) -> dict:
        where = f"logits, {self.activation} per level after the selection" if self.logits else \
            f"after {self.activation}"
        # per-region scores: as many regions as each image's run proposes (anchors is only the probe's count)
        count = {"regions": "per image"} if self.regions else {"anchors": self.anchors}
        return {"decode": "selected", "layout": "boxes (D, 4), scores (D,), labels (D,) after NMS",
                "score_tensor": self.score, "score_layout": f"(regions, {self.classes}) {where}"
                if self.regions else f"(N, {self.anchors}, {self.classes}) {where}",
                **count, "classes": self.classes,
                "box": "x1, y1, x2, y2 in input pixels", "recognised_from": "outputs"}


@dataclass
class SelectedDetection:
    index: int        # position in the post-NMS outputs
    anchor: int       # row of the pre-selection class scores
    label: int
    score: float
    box: tuple[float, float, float, float]

    def to_json(self) -> dict:
        return {"index": self.index, "anchor": self.anchor, "label": self.label, "score": round(self.score, 6),
                "box": [round(v, 3) for v in self.box]}


# How far a runtime's float32 Sigmoid may be from the exact sigmoid of its float32 input (onnxruntime's CPU
# kernel, measured over 1e6 normal logits: 1.4e-7 at most): a logits selection's scores match entries within it.
SIGMOID_TOLERANCE = 1e-6


def selected(selection: Selection, probs: np.ndarray, outputs: dict) -> list[SelectedDetection]:
    """The post-NMS detections of one image with the anchor each was picked from. probs: that image's (A, C)
    pre-selection scores (or logits); outputs: the model's outputs by name. The selection copies values, so each
    detection's score equals its entry exactly (for logits: the sigmoid of its entry, within SIGMOID_TOLERANCE;
    the closest entry is taken); equal entries of one class (flat image regions) are taken in anchor order, as
    TopK and NMS order equal scores by index."""
    values = selection.probabilities(probs)
    tol = SIGMOID_TOLERANCE if selection.logits else 0.0
    boxes = np.asarray(outputs[selection.boxes], np.float64).reshape(-1, 4)
    scores = np.asarray(outputs[selection.scores]).reshape(-1)
    labels = np.asarray(outputs[selection.labels]).reshape(-1).astype(np.int64)
    found, used = [], set()
    for i, (box, score, label) in enumerate(zip(boxes, scores, labels)):
        _check_index(label, selection.classes, "class", f"the classes of {selection.score!r}")
        away = np.abs(values[:, label] - np.float64(np.float32(score)))
        hits = np.flatnonzero(away <= tol)
        if not len(hits):
            raise InputError(f"detection {i} (class {label}, score {float(score):.6g}) of output {selection.scores!r} "
                             f"is no entry of {selection.score!r}: give score= the tensor it was selected from")
        hits = hits[np.argsort(away[hits], kind="stable")]  # the closest first; equal ones in anchor order
        free = [a for a in hits if (int(a), int(label)) not in used]
        anchor = int(free[0] if free else hits[-1])
        used.add((anchor, int(label)))
        found.append(SelectedDetection(i, anchor, int(label), float(score), tuple(float(v) for v in box)))
    return found


class SelectedDetectionTarget:
    """One detection of a whole-detector export, as a target for the CAM classes: a one-hot seed on the
    pre-selection class scores (explainer score = selection.score) at the entry the detection was picked from.

    Bound to one image's run (`outputs`: the model's outputs by name, e.g. Result.outputs): index selects the
    detection by its position in the post-NMS outputs; or label with box (x1, y1, x2, y2, input pixels): the
    detection of that label whose box matches best, by IoU >= iou_threshold (pytorch-grad-cam's
    FasterRCNNBoxScoreTarget; no match gives a zero seed, as its zero score does)."""

    needs_output = True

    def __init__(self, selection: Selection, outputs: dict, index: int | None = None, label: int | None = None,
                 box=None, iou: bool = False, iou_threshold: float = 0.5):
        if index is None and (box is None or label is None):
            raise InputError("a SelectedDetectionTarget needs an index, or a label and a box to match")
        if iou:
            raise InputError("iou=True is not available for detections selected after NMS: their boxes are not "
                             "differentiated; explain the score alone (iou=False)")
        self.selection, self.outputs, self.index, self.label = selection, outputs, index, label
        self.iou_threshold = iou_threshold
        self.box = None if box is None else tuple(float(v) for v in box)
        count = int(np.size(outputs[selection.scores]))
        if index is not None and not 0 <= int(index) < count:
            found = f"{count} detections (index 0 to {count - 1})" if count else "no detections"
            raise InputError(f"detection index {int(index)} is out of range: the model returned {found} in output "
                             f"{selection.scores!r}", option="index")

    def match(self, sample: np.ndarray) -> SelectedDetection | None:
        """The detection this target explains, given one sample's (A, C) pre-selection scores; None when no box
        matches."""
        found = selected(self.selection, sample, self.outputs)
        if self.index is not None:
            return found[int(self.index)]
        _check_index(self.label, self.selection.classes, "class", "the detector's classes")
        same = [d for d in found if d.label == self.label]
        if not same:
            return None
        overlaps = box_iou(np.array([d.box for d in same]), self.box)[:, 0]
        best = int(overlaps.argmax())
        return same[best] if overlaps[best] >= self.iou_threshold else None

    def seed(self, output: np.ndarray) -> np.ndarray:
        found = self.match(output)
        if found is None:
            log.info("%r: no detection of class %s overlaps %s by IoU %.2f or more: zero target", self, self.label,
                     self.box, self.iou_threshold)
            return np.zeros(np.shape(output), np.float32)
        return self.selection.seed(output, found.anchor, found.label)

    def __call__(self, output: np.ndarray) -> float:
        """The target's value on one sample's pre-selection scores (the detection's score)."""
        found = self.match(output)
        if found is None:
            return 0.0
        return float(self.selection.probabilities(np.asarray(output)[found.anchor, found.label]))

    def __repr__(self) -> str:
        what = f"index={self.index}" if self.index is not None else f"label={self.label}, box={self.box}"
        return f"SelectedDetectionTarget({what})"
