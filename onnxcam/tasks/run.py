"""The command line's per-task pipeline for detectors, segmenters and text recognizers: images in, labelled
pictures and JSON out.

Per image: one run reads the score (a zero seed), the detections are decoded (or the classes present found, or the
text decoded), then one run with one seed per detection/class/character makes the maps (the image repeated, a batch
of targets). Files: `<name>.<task>.png` (all boxes, all class outlines, or the text line with each character's
columns boxed and the decoded string above), `<name>.<method>.<k>.overlay.png` per detection, class or character
(its map with its box or mask outline; a recognizer also gets `<name>.<method>.string.overlay.png`, the map of the
whole string), with save_raw `<name>.<method>.<k>.npz` per item (RAW_KEYS), and `<name>.json` (task, decoding,
target, layer and the rule that chose it, the task picture, boxes / classes / text and characters with their files),
written last. Per-item pictures carry a caption band unless caption is off. Every option of `onnxcam explain` is
used or refused here (run_cli, TaskRunner._refuse_unused), never ignored. `TaskRunner.explain` is the one place an image
becomes a record and maps (onnxcam/ray.py makes its table rows from it). Reuses pipeline.py's public pieces
(find_images, ImageFile) and image.py.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__, files, image, preprocess
from ..cam.api import REGISTRY, canonical, method_object
from ..errors import InputError, OnnxCamError
from ..explainer import Explainer
from ..graph.load import LoadedModel
from ..graph.model import ModelGraph
from . import detect, ocr, segment
from .choose import TASK_CHOICES, input_hw, scale_layers, selection_of, task_of

log = logging.getLogger(__name__)
STRING = "string"  # the file-name part of a recognizer's whole-string map (characters are numbered)
CONF, TOP = 0.25, 5  # a detection's score threshold, and the items explained per image, when not given
# save_raw's .npz per item, the classifier's keys where they mean the same: map (at input size), logits (the
# image's explained output, batch axis removed), target (the class; -1: a recognizer's whole string), layers, and per
# layer n lowres_n (the method's map before ReLU and scaling), activations_n, gradients_n; plus item (its JSON),
# box (detect, ocr: x1, y1, x2, y2 image pixels) or mask (segment: the class's pixels at the output's size).
# the methods whose map at a layer is zero where the target's gradient there is zero (weights or products of the
# gradient): a multi-scale detector is explained with each scale's layer apart for them (TaskRunner._scales)
SCALE_METHODS = frozenset({"gradcam", "hirescam", "gradcam_elementwise", "gradcam++", "xgradcam", "layercam"})
RAW_KEYS = ("map", "logits", "target", "layers", "item", "box", "mask", "lowres_n", "activations_n", "gradients_n")


@dataclass
class TaskResult:
    """One image explained: its JSON record, the items explained (JSON-ready dicts: the detections, classes, or
    the string then the characters), one map per item at the model's input size, and where they are written."""

    record: dict
    items: list[dict]
    maps: np.ndarray
    json_path: Path | None = None
    written: bool = False
    files: dict = field(default_factory=dict)  # item index -> its overlay's path (items whose map is not zero)
    raw: dict = field(default_factory=dict)  # item index -> its .npz's path (with save_raw)


class TaskRunner:
    """A detector, segmenter or text recognizer opened for explaining image files. `task` is "classify" when the
    model's output reads as class scores (the caller then takes the classifier pipeline).

    method: one method, or a list of one (several are refused for these tasks: one picture per item).
    target: None (every item), or class numbers or names ("0,2", "cat"): detect keeps the detections of those
    classes, segment explains those classes where present; a recognizer refuses it, as it refuses conf and decode
    (None: not given; conf's and top's defaults are CONF and TOP).
    save_raw: also write `<name>.<method>.<k>.npz` per item (RAW_KEYS). caption: a band of text above each per-item
    picture (and a recognizer's text line): what it explains, the method and layer; False: the pictures alone.
    batch_size: the most items explained in one onnxruntime run (one image's items, in runs of this many).
    resume: skip images whose JSON records this model (hash), task, decoding, target, method, layers,
    preprocessing and caption, with every file it names. blank: a recognizer's CTC blank class."""

    def __init__(self, model, *, task: str = "auto", method="gradcam", layers=None, conf: float | None = None,
                 top: int | None = None, decode: str | None = None, size=None, mean=None, std=None, layout: str = "auto",
                 bgr: bool = False, labels=None, device: str = "auto", out="onnxcam-out", output: str | None = None,
                 max_pixels: int | None = image.MAX_PIXELS, resume: bool = False, blank: int = ocr.BLANK,
                 target: str | None = None, save_raw: bool = False, caption: bool = True, batch_size: int = 8):
        if task not in TASK_CHOICES:
            raise InputError(f"unknown task {task!r}; choose from {', '.join(TASK_CHOICES)}")
        if int(batch_size) < 1:
            raise InputError(f"batch_size {batch_size} explains nothing: give 1 or more", option="batch_size")
        methods = [method] if isinstance(method, str) else list(method)
        self.model_name, self.out, self.max_pixels = str(model), Path(out), max_pixels
        self.conf, self.top = CONF if conf is None else conf, TOP if top is None else int(top)
        self.resume, self.blank = resume, int(blank)
        self.save_raw, self.caption, self.batch_size = bool(save_raw), bool(caption), int(batch_size)
        self.method = canonical(methods[0])
        try:
            loaded = LoadedModel.of(model)  # one read, shared with the Explainer (and the classifier's Runner)
            proto = loaded.skeleton
            self.pre = preprocess.resolve(proto, size=size, mean=mean, std=std, layout=layout, bgr=bgr)
            self.names = _names(proto, labels)
            mg = ModelGraph(proto, self.pre.input_shape(1), loaded.weights)
            self.score = mg.default_score(output, task)
        except OnnxCamError:
            if task != "auto":
                raise
            self.task = "classify"  # the classifier pipeline reports what is wrong, as it always has
            return
        classes = len(self.names) if self.names else None
        self.task = task_of(mg, self.score, strict=True, decode=decode, classes=classes) if task == "auto" else task
        self.score_shape = mg.shape(mg.tensor(self.score))
        self.input_hw = input_hw(mg) or tuple(self.pre.size)
        if self.task == "classify":
            self._classifier_graph = loaded, mg  # for the classifier pipeline that follows (run_cli)
            return
        if len(methods) > 1:
            raise InputError(f"task {self.task} explains with one method at a time (one picture per item); got "
                             f"{', '.join(methods)}: run once per method", option="method")
        self.layout = None
        # a detector exported with its NMS: detections read from its outputs, each explained at the class score
        # it was selected from
        self.selection = selection_of(mg) if self.task == "detect" else None
        if self.selection is not None and self.selection.score != self.score:
            self.selection = None  # another score was asked for (output=): read it as a raw head
        if self.task == "detect":
            if self.selection is None:
                self.layout = detect.recognise(self.score_shape, self.input_hw, classes, decode, self.score)
        elif self.task == "segment":
            segment.check_output(self.score_shape[1:], self.score)
        else:
            self._check_recognizer()
        self._refuse_unused(conf=conf, decode=decode, target=target)
        self.target = self._classes_of(target)
        self.apart = False  # each layer differentiated apart: a multi-scale detector's per-scale maps
        if layers:
            self.layers, self.layer_rule = list(layers), "given"
        elif (scales := self._scales(mg)) is not None:
            self.layers, self.layer_rule, self.apart = list(scales.names), scales.rule, True
        else:
            self.layers, self.layer_rule = [mg.default_layer(self.score, self.task)], mg.layer_rule
        # a class target has no box term: seed the head's class scores alone, the box branch off the gradient path
        self.rows = detect.class_rows(mg, self.score, self.layout) if self.layout is not None else None
        seeded = self.rows.tensor if self.rows is not None else self.score
        self.seed_shape = mg.shape(mg.tensor(seeded))[1:]
        if self.selection is not None and self.selection.regions:  # Faster R-CNN: (R, C), explained as (1, R, C)
            self.seed_shape = (self.selection.anchors, self.selection.classes)  # the probe's R: a zero seed fits any
            self._refuse_own_runs()
        # share_forward: a picture's items (copies of it, a seed each) share one forward where the model allows
        self.explainer = Explainer(loaded, layers=self.layers, score=seeded, device=device,
                                   input_shape=self.pre.input_shape(1), apart=self.apart, share_forward=True)
        self.layers = self.explainer.layers
        self.cam = method_object(self.explainer, self.method)

    def _scales(self, mg: ModelGraph):
        """A raw multi-scale head's per-scale layers (choose.scale_layers), for the methods whose map at a layer is
        zero where the target's gradient there is: a detection's map is then its own scale's alone (the mean of
        the scaled per-layer maps, rescaled, is that map). None otherwise: the one neck map feeding every scale."""
        if self.task != "detect" or self.selection is not None or self.method not in SCALE_METHODS:
            return None
        return scale_layers(mg, self.score)

    def _refuse_own_runs(self) -> None:
        """Per-region scores have each run's own regions (its proposals): their seeds are laid out on the regions of
        the image's own run, which a method making runs of its own (perturbed inputs, noise, a guided copy) does not
        share."""
        if not REGISTRY[self.method].shared_run:
            shared = ", ".join(m for m, info in REGISTRY.items() if info.shared_run)
            raise InputError(f"method {self.method} makes runs of its own; the per-region scores {self.score!r} are "
                             f"explained in the image's own run only (their regions are that run's): choose from "
                             f"{shared}", option="method")

    def _refuse_unused(self, **given) -> None:
        """An option that means nothing for this task is refused, never ignored: conf and decode read detections,
        a recognizer's items (the string, then its characters in order) have no class to choose."""
        unused = {"conf": self.task != "detect", "decode": self.task != "detect", "target": self.task == "ocr"}
        for name, value in given.items():
            if value is not None and unused[name]:
                what = {"conf": "is a detection's score threshold", "decode": "is a detection head's layout",
                        "target": "chooses classes; a recognizer explains the whole string and its first `top` "
                                  "characters"}[name]
                raise InputError(f"{name} {value!r} {what}: task {self.task} does not use it; leave it out",
                                 option=name)

    def _classes_of(self, target: str | None) -> tuple[int, ...] | None:
        """The classes a target keeps (None: all). Class numbers or names; a classifier's topK is refused (the
        items are ranked by top)."""
        if target is None:
            return None
        from ..pipeline import parse_target

        try:
            spec = parse_target(str(target), self.names or None)
        except InputError as exc:
            raise InputError(str(exc), option="target") from None
        if spec.kind == "top":
            raise InputError(f"target {target!r} ranks a classifier's classes; task {self.task} explains its `top` "
                             f"best {'detections' if self.task == 'detect' else 'classes'}: give top={spec.k}, or "
                             "class numbers or names to keep", option="target")
        k = self._class_count()
        bad = [c for c in spec.classes if not 0 <= c < k]
        if bad:
            raise InputError(f"target class {bad[0]} is out of range: output {self.score!r} has {k} classes (0 to "
                             f"{k - 1})", option="target")
        return spec.classes

    def _class_count(self) -> int:
        if self.selection is not None:
            return self.selection.classes
        return self.layout.classes if self.layout is not None else self.score_shape[1]

    def _check_recognizer(self) -> None:
        """A recognizer's score is 3-D; its class names are the characters (with or without the blank)."""
        if self.score_shape is None or len(self.score_shape) != 3:
            raise InputError(f"output {self.score!r} has shape {self.score_shape}: a text recognizer's is (N, T, C) "
                             "or (T, N, C) per-time-step scores; give the output holding them (output=)")
        if self.method == "shapleycam":
            raise InputError("method shapleycam cannot explain a recognizer's sequence scores yet (its Hessian-vector "
                             "product has no rule for the recurrent layer's loop); choose another method",
                             option="method")
        k = self.score_shape[2]
        if self.names is not None and len(self.names) not in (k, k - 1):
            raise InputError(f"{len(self.names)} character names for a recognizer with {k} classes: give {k} names "
                             f"(the blank {self.blank} included) or {k - 1} (the blank left out, as PaddleOCR's "
                             "dictionaries do)", option="labels")

    # ---- what the items are called ---------------------------------------------------------------------------
    def decoding(self) -> dict:
        if self.selection is not None:
            return {**self.selection.describe(), "conf": self.conf, "top": self.top}
        if self.layout is not None:
            seeded = {"seeded": self.rows.tensor} if self.rows is not None else {}
            return {**self.layout.describe(), "conf": self.conf, "top": self.top, "nms_iou": 0.45, **seeded}
        if self.task == "ocr":
            return {"decode": "ctc greedy", "classes": self.score_shape[2], "blank": self.blank,
                    "score": "softmax over the classes, averaged over each character's time steps",
                    "top": self.top}
        k = self.score_shape[1]
        return {"maps": f"(N, {k}, H, W)", "classes": k,
                "mask": "pixels above 0.3" if k == 1 else "the class's argmax pixels", "top": self.top}

    def label(self, c: int) -> str:
        if self.task == "ocr":
            return self.character(c)
        return self.names[c] if self.names and 0 <= c < len(self.names) else f"class {c}"

    def character(self, c: int) -> str:
        """A recognizer's class as text: its name (names without the blank are shifted past it), else [c]."""
        if self.names and len(self.names) == self.score_shape[2]:
            return self.names[c]
        if self.names and c != self.blank:
            return self.names[c - (c > self.blank)]
        return f"[{c}]"

    # ---- one image -------------------------------------------------------------------------------------------
    def explain_file(self, f) -> dict:
        """Explain one pipeline.ImageFile and write its files; returns the JSON record (InputError when the image
        cannot be read)."""
        return self.explain(f).record

    def json_path(self, f) -> Path:
        base = self.out / f.base
        return base.with_name(f"{base.name}.json")

    def explain(self, f, write: bool = True) -> TaskResult:
        """Explain one pipeline.ImageFile: the record, the items and their maps; with write, its pictures and then
        its JSON (last: its presence means the image is complete). Without write nothing is written, but the
        record names the files a written run has (the same names)."""
        start = time.perf_counter()
        rgb = f.rgb if f.rgb is not None else image.read_image(f.path, self.max_pixels)
        x = image.to_input(rgb, self.pre)[None]
        if self.task == "ocr":
            items, maps, zero, extra = self._ocr(x, rgb)
        else:
            items, maps, zero, extra = self._boxes_or_classes(x, rgb)
        base = self.out / f.base
        picture = Path(f"{base}.{self.task}.png")
        result = TaskResult({}, items, maps, self.json_path(f), write)
        if write:
            base.parent.mkdir(parents=True, exist_ok=True)
            files.atomic_write(picture, image.encode_png(self._all(rgb, items)))
        for k, (item, mask) in enumerate(zip(items, maps)):
            item["zero_map"] = zero[k] if k < len(zero) else None
            stem = f"{base}.{self.method}.{item.get('_file', k)}"
            if item["zero_map"] is None:
                path = Path(f"{stem}.overlay.png")
                if write:
                    files.atomic_write(path, image.encode_png(self._one(image.overlay(rgb, mask), item)))
                item["overlay"] = path.name
                result.files[k] = path
            if self.save_raw:  # a zero map too, as the classifier's: its arrays say why it is zero
                raw = Path(f"{stem}.npz")
                item["raw"] = raw.name
                result.raw[k] = raw
        if write:
            for k, raw in result.raw.items():
                files.write_npz(raw, **self._raw_arrays(items[k], maps[k], extra, k))
        if self.task == "ocr":
            found = {**_public(extra), "string": _public(items[0]) if items else None,
                     "characters": [_public(c) for c in extra["_characters"]]}
        else:
            found = {"detections" if self.task == "detect" else "classes": [_public(i) for i in items]}
        result.record = {"image": str(f.path), "model": self.model_name, "model_hash": self.explainer.digest,
                         "onnxcam_version": __version__, "task": self.task, "decoding": self.decoding(),
                         "score": self.score, "layers": self.layers, "layer_rule": self.layer_rule,
                         "method": self.method, "target": self._target_text(), "captioned": self.caption,
                         "preprocess": _plain(self.pre.describe()), "picture": picture.name,
                         "seconds": round(time.perf_counter() - start, 4), **found}
        if write:
            files.write_json(result.json_path, result.record)
        return result

    def done_before(self, f) -> dict | None:
        """f's JSON when it records an explanation like this runner's (model hash, task, decoding, target, method,
        layers, preprocessing, caption, raw arrays or none) with every file it names present; else None (anything
        unreadable or different)."""
        path = self.json_path(f)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            same = (record["image"] == str(f.path) and record["model_hash"] == self.explainer.digest
                    and record["task"] == self.task and record["method"] == self.method
                    and record["layers"] == self.layers and record["score"] == self.score
                    and record["decoding"] == _plain(self.decoding())
                    and record.get("target") == self._target_text() and record.get("captioned") == self.caption
                    and record["preprocess"] == _plain(self.pre.describe()))
            items = record_items(record)
            same = same and all(("raw" in i) == self.save_raw for i in items)
            named = [record["picture"]] + [i[k] for i in items for k in ("overlay", "raw") if i.get(k)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return record if same and all((path.parent / name).is_file() for name in named) else None

    def _boxes_or_classes(self, x: np.ndarray, rgb: np.ndarray) -> tuple[list[dict], np.ndarray, list, dict]:
        if self.selection is not None and self.selection.regions:  # per-region scores: seen as (1, R, C) by run()
            run = self.explainer.run(x, seed=np.zeros((1, *self.seed_shape), np.float32))
            first, score = run.outputs, run.logits
        else:  # the detections or classes: one plain inference
            first = self.explainer.forward(x)
            score = first[self.explainer.score_name]
        sample = first[self.score][0] if self.rows is not None else score[0]
        items, seeds = self._targets(sample, rgb, first)
        if self.rows is not None:
            seeds = [self.rows.slice(s) for s in seeds]
        own: list[str | None] = []  # layers apart: each detection's own scale's layer

        def run(xs: np.ndarray, lo: int, hi: int) -> np.ndarray:
            maps = self._seeded(xs, seeds[lo:hi])
            if self.apart:
                gradients = self.cam.result.gradients
                own.extend(next((layer for layer in self.layers if np.any(gradients[layer][j])), None)
                           for j in range(hi - lo))
            return maps

        maps, zero, raws = self._in_runs(x, len(seeds), run)
        for item, layer in zip(items, own):
            item["layer"] = layer
        return items, maps, zero, {"_logits": sample, "_raws": raws}

    def _seeded(self, xs: np.ndarray, seeds: list) -> np.ndarray:
        """The maps of one image (repeated) for these seeds. Per-region scores (Faster R-CNN) have as many regions
        as this image's run proposed, so their seeds go straight to the explainer (the CAM's seed targets would be
        checked against a score shape of another run)."""
        if self.selection is None or not self.selection.regions:
            return self.cam(xs, targets=seeds)
        return self.cam.maps_for(xs, self.explainer.run(xs, seed=np.stack(seeds)))

    def _ocr(self, x: np.ndarray, rgb: np.ndarray) -> tuple[list[dict], np.ndarray, list, dict]:
        """The decoded string and its first `top` characters: items (the string first), their maps, and the
        record's text fields. Each character's box spans the image columns of its time steps (the steps split the
        input's width evenly: where a CRNN's columns come from)."""
        declared = tuple(self.explainer.score_shape(x.shape))
        shape = tuple(1 if not isinstance(d, int) else d for d in declared)
        scores = np.asarray(self.explainer.run(x, seed=np.zeros(shape, np.float32)).logits)
        order = ocr.sequence_layout(scores.shape, 1, "auto", declared)
        steps = scores[0] if order == "NTC" else scores[:, 0]
        z = np.exp(steps - steps.max(axis=1, keepdims=True), dtype=np.float64)
        probs = z / z.sum(axis=1, keepdims=True)
        chars = ocr.greedy_decode(steps, self.blank)
        text = "".join(self.character(c.category) for c in chars)
        h, w = rgb.shape[:2]
        per_step = w / len(steps)
        characters = [{"position": k, "class": c.category, "name": self.character(c.category),
                       "score": round(float(probs[list(c.steps), c.category].mean()), 6), "steps": list(c.steps),
                       "box_image": [round(c.steps[0] * per_step, 1), 0.0, round((c.steps[-1] + 1) * per_step, 1),
                                     float(h)], "_file": k} for k, c in enumerate(chars)]
        # every character is in the record; the string and the first `top` are explained (their dicts are items)
        extra = {"text": text, "layout": order, "steps": len(steps), "_characters": characters, "_logits": steps}
        if not chars:
            return [], np.zeros((0, *x.shape[-2:]), np.float32), [], extra
        string = {"text": text, "name": text, "score": round(float(np.mean([c["score"] for c in characters])), 6),
                  "characters": len(chars), "_file": STRING}
        targets = [ocr.StringTarget(self.blank)] + [ocr.CharacterTarget(k, self.blank)
                                                    for k in range(min(self.top, len(chars)))]
        seed = np.stack([t.seed(steps) for t in targets]).astype(np.float32)

        def run(xs: np.ndarray, lo: int, hi: int) -> np.ndarray:
            part = seed[lo:hi]
            if not REGISTRY[self.method].shared_run:  # its own runs (masked, ablated, noisy or guided copies): the
                # CAM class, each item's characters as decoded here (frozen: the copies do not decode again)
                return self.cam(xs, targets=[ocr.WeightedSteps(s) for s in part])
            r = self.explainer.run(xs, seed=part if order == "NTC" else np.ascontiguousarray(part.transpose(1, 0, 2)))
            return self.cam.maps_for(xs, r)

        maps, zero, extra["_raws"] = self._in_runs(x, len(targets), run)
        return [string] + characters[:len(targets) - 1], maps, zero, extra

    def _in_runs(self, x: np.ndarray, count: int, run) -> tuple[np.ndarray, list, list[dict]]:
        """The maps of one image's `count` items in runs of at most batch_size (a detector's hundred detections
        at full size would not fit one run): run(xs, lo, hi) makes items lo..hi-1's maps with x repeated. Also
        each item's zero-map reason and, with save_raw, its arrays of the run (RAW_KEYS' per-layer ones)."""
        maps, zero, raws = [], [], []
        for lo in range(0, count, self.batch_size):
            hi = min(count, lo + self.batch_size)
            maps.append(run(np.repeat(x, hi - lo, axis=0), lo, hi))
            zero += list(self.cam.degenerate_reasons)
            raws += [self._run_arrays(j) for j in range(hi - lo)] if self.save_raw else []
        if not maps:
            return np.zeros((0, *x.shape[-2:]), np.float32), [], []
        return np.concatenate(maps), zero, raws

    def _run_arrays(self, j: int) -> dict[str, np.ndarray]:
        """Sample j of the method's last run: per layer n its raw map, activations and gradients (copies: the
        run's arrays are freed with the next run)."""
        inner = self.cam.gradcam if self.method == "guided_gradcam" else self.cam  # its map's Grad-CAM part
        result = getattr(inner, "result", None)
        sources = {"lowres": getattr(inner, "raw", None) or {},
                   "activations": getattr(result, "activations", None) or {},
                   "gradients": getattr(result, "gradients", None) or {}}
        return {f"{key}_{n}": np.array(np.asarray(source[layer])[j]) for n, layer in enumerate(self.layers)
                for key, source in sources.items() if layer in source}

    def _raw_arrays(self, item: dict, mask: np.ndarray, extra: dict, k: int) -> dict[str, np.ndarray]:
        """save_raw's arrays of item k (RAW_KEYS)."""
        arrays = {"map": np.asarray(mask, np.float32), "logits": np.asarray(extra["_logits"]),
                  "target": np.int64(item.get("label", item.get("class", -1))), "layers": np.array(self.layers),
                  "item": np.array(json.dumps(_public(item), ensure_ascii=False))}
        if "box_image" in item:
            arrays["box"] = np.array(item["box_image"], np.float64)
        if "_mask" in item:
            arrays["mask"] = np.asarray(item["_mask"], bool)
        return {**arrays, **extra["_raws"][k]}

    def _target_text(self) -> str | None:
        return None if self.target is None else ",".join(map(str, self.target))

    def _wanted(self, c: int) -> bool:
        return self.target is None or c in self.target

    def _targets(self, sample: np.ndarray, rgb: np.ndarray, outputs: dict | None = None
                 ) -> tuple[list[dict], list[np.ndarray]]:
        """The items to explain in one sample's output (JSON-ready dicts) and their seeds (outputs: the model's
        own outputs, where a detector's detections are read after its NMS)."""
        h, w = rgb.shape[:2]
        if self.selection is not None:
            return self._selected(sample, outputs, w / self.input_hw[1], h / self.input_hw[0])
        if self.task == "detect":  # the classes kept before the top N: NMS is per class, so it is the same
            found = detect.decode(sample[None], self.layout, self.conf, self.top, classes=self.target)[0]
            sx, sy = w / self.input_hw[1], h / self.input_hw[0]
            items = [{**d.to_json(), "name": self.label(d.label),
                      "box_image": [round(v, 1) for v in (d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy)]}
                     for d in found]
            return items, [detect.detection_seed(sample, self.layout, d.anchor, d.label) for d in found]
        present = [c for c in segment.classes_present(sample) if self._wanted(c)][:self.top]
        targets = [segment.ClassMaskTarget(c) for c in present]
        items = [{"class": c, "name": self.label(c), "pixels": int(t.mask_for(sample).sum()),
                  "_mask": t.mask_for(sample)} for c, t in zip(present, targets)]
        return items, [t.seed(sample) for t in targets]

    def _selected(self, sample: np.ndarray, outputs: dict, sx: float, sy: float) -> tuple[list[dict], list]:
        """Detections after the model's own NMS above conf (the top N), each seeded at its pre-selection score;
        an InputError naming the best score found when none is above conf."""
        found = [d for d in detect.selected(self.selection, sample, outputs) if self._wanted(d.label)]
        kept = [d for d in found if d.score > self.conf][:self.top]
        if not kept:
            best = max(found, key=lambda d: d.score, default=None)
            what = (f"the best of {len(found)} is {best.score:.3f} ({self.label(best.label)})" if best
                    else "the model returned none")
            of = "" if self.target is None else f" of target {', '.join(self.label(c) for c in self.target)}"
            raise InputError(f"no detection{of} scores above conf {self.conf}: {what}; lower conf", option="conf")
        items = [{**d.to_json(), "name": self.label(d.label),
                  "box_image": [round(v, 1) for v in (d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy)]}
                 for d in kept]
        return items, [self.selection.seed(sample, d.anchor, d.label) for d in kept]

    # ---- pictures --------------------------------------------------------------------------------------------
    def _all(self, rgb: np.ndarray, items: list[dict]) -> np.ndarray:
        if self.task == "detect":
            return image.draw_boxes(rgb, [i["box_image"] for i in items],
                                    [f"{i['name']} {i['score']:.2f}" for i in items], [i["label"] for i in items])
        if self.task == "ocr":
            chars = [i for i in items if "position" in i]
            boxed = image.draw_boxes(rgb, [i["box_image"] for i in chars], [i["name"] for i in chars],
                                     [i["class"] for i in chars])
            if not self.caption:
                return boxed
            return image.caption(boxed, [f"text: {items[0]['text'] if items else '(no characters)'}"])
        for i in items:
            rgb = image.draw_outline(rgb, i["_mask"], i["class"])
        return rgb

    def _one(self, picture: np.ndarray, item: dict) -> np.ndarray:
        """An item's overlay: its box or outline drawn on it, under its caption unless caption is off (the
        uncaptioned picture is the captioned one's image area, pixel for pixel)."""
        marked = self._marked(picture, item)
        return image.caption(marked, self._caption_lines(item)) if self.caption else marked

    def _marked(self, picture: np.ndarray, item: dict) -> np.ndarray:
        if self.task == "detect":
            return image.draw_boxes(picture, [item["box_image"]], [f"{item['name']} {item['score']:.2f}"],
                                    [item["label"]])
        if self.task == "ocr":
            if "position" not in item:
                return picture
            return image.draw_boxes(picture, [item["box_image"]], [item["name"]], [item["class"]])
        return image.draw_outline(picture, item["_mask"], item["class"], item["name"])

    def _caption_lines(self, item: dict) -> list[str]:
        """What the item's map explains, then the method and layers (as the classifier's captions; a multi-scale
        detector's detection: its own scale's layer)."""
        layer = f"{self.method} @ {item.get('layer') or ', '.join(self.layers)}"
        if self.task == "ocr":
            if "position" not in item:
                return [f"text: {item['text']} {item['score']:.2f}", layer]
            return [f"character {item['position']}: {item['name']} {item['score']:.2f}", layer]
        if "score" in item:
            return [f"{item['name']} {item['score']:.2f}", layer]
        return [f"{item['name']} ({item['pixels']} px)", layer]

    def summary(self, record: dict) -> str:
        """One console line per image."""
        if self.task == "ocr":
            chars = record["characters"]
            scores = ", ".join(f"{c['name']} {c['score']:.2f}" for c in chars)
            what = f"{record['text']!r} ({scores})" if record["text"] else "no characters"
            return f"  {Path(record['image']).name}  ocr: {what}"
        items = record.get("detections", record.get("classes", []))
        what = ", ".join(f"{i['name']} {i['score']:.2f}" if "score" in i else f"{i['name']} ({i['pixels']} px)"
                         for i in items) or "nothing found"
        return f"  {Path(record['image']).name}  {self.task}: {what}"


def record_items(record: dict) -> list[dict]:
    """The items of a task's JSON record, in the order of their maps (a recognizer's string first)."""
    if record["task"] == "ocr":
        string = record["string"]
        return ([string] if string else []) + [c for c in record["characters"] if "zero_map" in c]
    return record["detections" if record["task"] == "detect" else "classes"]


def _names(proto, labels) -> list[str] | None:
    """Class names: a file ("imagenet": the bundled list), else ultralytics' `names` or onnxcam.labels metadata."""
    if labels == "imagenet":
        return preprocess.imagenet_labels()
    return preprocess.read_labels(labels) if labels else detect.class_names(preprocess.metadata(proto))


def _public(item: dict) -> dict:
    return {k: v for k, v in item.items() if not k.startswith("_")}


def _plain(d):
    """JSON-safe copy (tuples as lists)."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d


def run_cli(model, inputs, *, out, echo, report: bool = False, heatmap: bool = False, **options) -> int | None:
    """`onnxcam explain --task ...` for detectors, segmenters and recognizers: None when the model reads as a
    classifier (the caller then runs the classifier pipeline), else the exit status (1 when an image failed).
    Failed images are `Error:` lines on stderr, as in the classifier pipeline. report (the classifier's contact
    sheet of one overlay per class) and heatmap (the classifier's heatmap-alone PNGs) are refused: a task's items
    are no classes of one image, and its pictures are its own."""
    from ..pipeline import find_images

    runner = TaskRunner(model, out=out, **options)
    if runner.task == "classify":
        handed = getattr(runner, "_classifier_graph", None)
        if handed is not None:  # the classifier's Explainer builds on the graph read here: one analysis, not two
            loaded, mg = handed
            loaded.hand_over(mg, runner.pre.input_shape(1))
        return None
    if report:
        raise InputError(f"report draws a classifier's maps per class; task {runner.task} has none (its pictures "
                         f"are <name>.{runner.task}.png and one overlay per item)", option="report")
    if heatmap:
        raise InputError(f"heatmap writes a classifier's maps alone; task {runner.task} writes <name>.{runner.task}.png "
                         "and one overlay per item (save_raw keeps each item's map values)", option="heatmap")
    found = find_images(inputs, exclude=[out])
    kept = "" if runner.target is None else f"; target {', '.join(runner.label(c) for c in runner.target)}"
    echo(f"Task {runner.task} ({', '.join(f'{k} {v}' for k, v in runner.decoding().items())}){kept}; "
         f"layer{'s' if len(runner.layers) > 1 else ''} {', '.join(runner.layers)} ({runner.layer_rule})")
    failed = skipped = 0
    for f in found:
        if runner.resume and runner.done_before(f) is not None:
            skipped += 1
            continue
        try:
            echo(runner.summary(runner.explain_file(f)))
        except OnnxCamError as exc:
            failed += 1
            flag = {"conf": " (option --conf)"}.get(getattr(exc, "option", None), "")
            echo(f"Error: {f.path}: {exc}{flag}", err=True)
    done = len(found) - failed - skipped
    status = (f"; {failed} failed" if failed else "") + (f"; {skipped} skipped (explained before)" if skipped else "")
    echo(f"Explained {done} of {len(found)} images{status}; wrote to {out}")
    return 1 if failed else 0
