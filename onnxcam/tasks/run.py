"""The command line's per-task pipeline for detectors and segmenters: images in, labelled pictures and JSON out.

Per image: one run reads the score (a zero seed), the detections are decoded (or the classes present found), then
one run with one seed per detection/class makes the maps (the image repeated, a batch of targets). Files:
`<name>.<task>.png` (all boxes, or all class outlines), `<name>.<method>.<k>.overlay.png` per detection or class
(its map with its box or mask outline), and `<name>.json` (task, decoding, layer and the rule that chose it,
boxes / classes with their pictures). Reuses pipeline.py's public pieces (find_images, ImageFile) and image.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .. import __version__, image, preprocess
from ..cam.api import canonical, method_object
from ..errors import InputError, OnnxCamError
from ..explainer import Explainer
from ..files import atomic_write, write_json
from ..graph.load import LoadedModel
from ..graph.model import ModelGraph
from . import detect, segment
from .choose import TASK_CHOICES, input_hw, selection_of, task_of

log = logging.getLogger(__name__)


class TaskRunner:
    """A detector or segmenter opened for explaining image files. `task` is "classify" when the model's output
    reads as class scores (the caller then takes the classifier pipeline)."""

    def __init__(self, model, *, task: str = "auto", method: str = "gradcam", layers=None, conf: float = 0.25,
                 top: int = 5, decode: str | None = None, size=None, mean=None, std=None, layout: str = "auto",
                 bgr: bool = False, labels=None, device: str = "auto", out="onnxcam-out", output: str | None = None,
                 max_pixels: int | None = image.MAX_PIXELS):
        if task not in TASK_CHOICES:
            raise InputError(f"unknown task {task!r}; choose from {', '.join(TASK_CHOICES)}")
        self.model_name, self.out, self.conf, self.top, self.max_pixels = str(model), Path(out), conf, top, max_pixels
        self.method = canonical(method)
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
            return
        if self.task == "ocr":  # pictures of per-character maps are not drawn yet: the library explains them
            raise InputError(f"output {self.score!r} is a text recognizer's per-time-step scores: explain it in Python "
                             "with onnxcam.tasks.ocr (run_sequence and its character targets)")
        self.layout = None
        # a detector exported with its NMS: detections read from its outputs, each explained at the class score
        # it was selected from
        self.selection = selection_of(mg) if self.task == "detect" else None
        if self.selection is not None and self.selection.score != self.score:
            self.selection = None  # another score was asked for (output=): read it as a raw head
        if self.task == "detect":
            if self.selection is None:
                self.layout = detect.recognise(self.score_shape, self.input_hw, classes, decode, self.score)
        else:
            segment.check_output(self.score_shape[1:], self.score)
        if layers:
            self.layers, self.layer_rule = list(layers), "given"
        else:
            self.layers, self.layer_rule = [mg.default_layer(self.score, self.task)], mg.layer_rule
        # a class target has no box term: seed the head's class scores alone, the box branch off the gradient path
        self.rows = detect.class_rows(mg, self.score, self.layout) if self.layout is not None else None
        seeded = self.rows.tensor if self.rows is not None else self.score
        self.seed_shape = mg.shape(mg.tensor(seeded))[1:]
        self.explainer = Explainer(loaded, layers=self.layers, score=seeded, device=device,
                                   input_shape=self.pre.input_shape(1))
        self.layers = self.explainer.layers
        self.cam = method_object(self.explainer, self.method)

    # ---- one image -----------------------------------------------------------------------------------------
    def decoding(self) -> dict:
        if self.selection is not None:
            return {**self.selection.describe(), "conf": self.conf, "top": self.top}
        if self.layout is not None:
            seeded = {"seeded": self.rows.tensor} if self.rows is not None else {}
            return {**self.layout.describe(), "conf": self.conf, "top": self.top, "nms_iou": 0.45, **seeded}
        k = self.score_shape[1]
        return {"maps": f"(N, {k}, H, W)", "classes": k,
                "mask": "pixels above 0.3" if k == 1 else "the class's argmax pixels", "top": self.top}

    def label(self, c: int) -> str:
        return self.names[c] if self.names and 0 <= c < len(self.names) else f"class {c}"

    def explain_file(self, f) -> dict:
        """Explain one pipeline.ImageFile and write its files; returns the JSON record (InputError when the image
        cannot be read)."""
        start = time.perf_counter()
        rgb = f.rgb if f.rgb is not None else image.read_image(f.path, self.max_pixels)
        x = image.to_input(rgb, self.pre)[None]
        first = self.explainer.run(x, seed=np.zeros((1, *self.seed_shape), np.float32))
        sample = first.outputs[self.score][0] if self.rows is not None else first.logits[0]
        items, seeds = self._targets(sample, rgb, first.outputs)
        if self.rows is not None:
            seeds = [self.rows.slice(s) for s in seeds]
        maps, zero = np.zeros((0, *rgb.shape[:2]), np.float32), []
        if seeds:
            maps = self.cam(np.repeat(x, len(seeds), axis=0), targets=seeds)
            zero = list(self.cam.degenerate_reasons)
        base = self.out / f.base
        base.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(f"{base}.{self.task}.png", image.encode_png(self._all(rgb, items)))
        for k, (item, mask) in enumerate(zip(items, maps)):
            item["zero_map"] = zero[k] if k < len(zero) else None
            if item["zero_map"] is None:
                path = Path(f"{base}.{self.method}.{k}.overlay.png")
                atomic_write(path, image.encode_png(self._one(image.overlay(rgb, mask), item)))
                item["overlay"] = path.name
        record = {"image": str(f.path), "model": self.model_name, "model_hash": self.explainer.digest,
                  "onnxcam_version": __version__, "task": self.task, "decoding": self.decoding(),
                  "score": self.score, "layers": self.layers, "layer_rule": self.layer_rule, "method": self.method,
                  "preprocess": _plain(self.pre.describe()), "seconds": round(time.perf_counter() - start, 4),
                  "detections" if self.task == "detect" else "classes": [_public(i) for i in items]}
        write_json(f"{base}.json", record)
        return record

    def _targets(self, sample: np.ndarray, rgb: np.ndarray, outputs: dict | None = None
                 ) -> tuple[list[dict], list[np.ndarray]]:
        """The items to explain in one sample's output (JSON-ready dicts) and their seeds (outputs: the model's
        own outputs, where a detector's detections are read after its NMS)."""
        h, w = rgb.shape[:2]
        if self.selection is not None:
            return self._selected(sample, outputs, w / self.input_hw[1], h / self.input_hw[0])
        if self.task == "detect":
            found = detect.decode(sample[None], self.layout, self.conf, self.top)[0]
            sx, sy = w / self.input_hw[1], h / self.input_hw[0]
            items = [{**d.to_json(), "name": self.label(d.label),
                      "box_image": [round(v, 1) for v in (d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy)]}
                     for d in found]
            return items, [detect.detection_seed(sample, self.layout, d.anchor, d.label) for d in found]
        present = segment.classes_present(sample)[:self.top]
        targets = [segment.ClassMaskTarget(c) for c in present]
        items = [{"class": c, "name": self.label(c), "pixels": int(t.mask_for(sample).sum()),
                  "_mask": t.mask_for(sample)} for c, t in zip(present, targets)]
        return items, [t.seed(sample) for t in targets]

    def _selected(self, sample: np.ndarray, outputs: dict, sx: float, sy: float) -> tuple[list[dict], list]:
        """Detections after the model's own NMS above conf (the top N), each seeded at its pre-selection score;
        an InputError naming the best score found when none is above conf."""
        found = detect.selected(self.selection, sample, outputs)
        kept = [d for d in found if d.score > self.conf][:self.top]
        if not kept:
            best = max(found, key=lambda d: d.score, default=None)
            what = (f"the best of {len(found)} is {best.score:.3f} ({self.label(best.label)})" if best
                    else "the model returned none")
            raise InputError(f"no detection scores above conf {self.conf}: {what}; lower conf", option="conf")
        items = [{**d.to_json(), "name": self.label(d.label),
                  "box_image": [round(v, 1) for v in (d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy)]}
                 for d in kept]
        seeds = []
        for d in kept:
            seed = np.zeros(sample.shape, np.float32)
            seed[d.anchor, d.label] = 1.0
            seeds.append(seed)
        return items, seeds

    def _all(self, rgb: np.ndarray, items: list[dict]) -> np.ndarray:
        if self.task == "detect":
            return image.draw_boxes(rgb, [i["box_image"] for i in items],
                                    [f"{i['name']} {i['score']:.2f}" for i in items], [i["label"] for i in items])
        for i in items:
            rgb = image.draw_outline(rgb, i["_mask"], i["class"])
        return rgb

    def _one(self, picture: np.ndarray, item: dict) -> np.ndarray:
        if self.task == "detect":
            return image.draw_boxes(picture, [item["box_image"]], [f"{item['name']} {item['score']:.2f}"],
                                    [item["label"]])
        return image.draw_outline(picture, item["_mask"], item["class"], item["name"])

    def summary(self, record: dict) -> str:
        """One console line per image."""
        items = record.get("detections", record.get("classes", []))
        what = ", ".join(f"{i['name']} {i['score']:.2f}" if "score" in i else f"{i['name']} ({i['pixels']} px)"
                         for i in items) or "nothing found"
        return f"  {Path(record['image']).name}  {self.task}: {what}"


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


def run_cli(model, inputs, *, out, echo, **options) -> int | None:
    """`onnxcam explain --task ...` for detectors and segmenters: None when the model reads as a classifier (the
    caller then runs the classifier pipeline), else the exit status (1 when an image failed)."""
    from ..pipeline import find_images

    runner = TaskRunner(model, out=out, **options)
    if runner.task == "classify":
        return None
    files = find_images(inputs, exclude=[out])
    echo(f"Task {runner.task} ({', '.join(f'{k} {v}' for k, v in runner.decoding().items())}); layer "
         f"{', '.join(runner.layers)} ({runner.layer_rule})")
    failed = 0
    for f in files:
        try:
            echo(runner.summary(runner.explain_file(f)))
        except OnnxCamError as exc:
            failed += 1
            flag = {"conf": " (option --conf)"}.get(getattr(exc, "option", None), "")
            echo(f"  {f.path}: {exc}{flag}")
    echo(f"Explained {len(files) - failed} of {len(files)} images; wrote to {out}")
    return 1 if failed else 0
