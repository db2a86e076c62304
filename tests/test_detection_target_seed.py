"""The API's DetectionTarget without an IoU term seeds the head's class scores, not the whole output (issue 14):
the same maps and gradients as seeding output0 (and as float64 torch autograd), from a graph that leaves the box
branch out; a target with an IoU term still seeds output0."""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import torch
from torch import nn

import onnxcam
from onnxcam.graph.model import ModelGraph
from onnxcam.tasks import detect

from .test_tasks import CLASSES, SIZE, _close, _export, _hooked, yolo


def _layout(onnx_model: bytes, decode: str | None = None) -> tuple[str, detect.DetectionLayout, detect.ClassRows]:
    mg = ModelGraph(onnx.load_from_string(onnx_model), (1, 3, SIZE, SIZE))
    score = mg.default_score()
    layout = detect.recognise(mg.shape(mg.tensor(score)), (SIZE, SIZE), decode=decode)
    return score, layout, detect.class_rows(mg, score, layout)


@functools.cache
def _yolo_cam():
    """The TinyYolo fixture, a GradCAM at its automatic layer, and each sample's best detection."""
    model, onnx_model, x = yolo()
    score, layout, rows = _layout(onnx_model)
    cam = onnxcam.GradCAM(model=onnx_model, device="cpu")
    dets = [d[0] for d in detect.decode(cam.score_outputs(x.numpy()), layout, conf=0.0, top=1)]
    return model, x, cam, score, layout, rows, dets


def _box_branch(model: onnx.ModelProto, output: str, classes: str) -> set:
    """Forward nodes that only the box rows of `output` depend on: ancestors of its Concat's first input (the box
    rows) that are not ancestors of the class-score tensor (the DFL convolution and the box decoding)."""
    made = {o: n for n in model.graph.node if not n.doc_string.startswith("{") for o in n.output}

    def ancestors(name: str) -> set:
        found, todo = set(), [name]
        while todo:
            node = made.get(todo.pop())
            if node is not None and node.name not in found:
                found.add(node.name)
                todo.extend(node.input)
        return found

    return ancestors(made[output].input[0]) - ancestors(classes)


def _gradient_origins(ex: onnxcam.Explainer) -> set:
    """The forward nodes whose gradient rules the dense-seed graph of `ex` runs."""
    model = ex.compiled(by_class=False).rewritten.model
    return {json.loads(n.doc_string)["onnxcam_origin"]["node"] for n in model.graph.node
            if n.doc_string.startswith("{")}


def test_class_only_detection_target_seeds_the_class_scores():
    """Class-only targets (one by anchor, one matched by label and box) explained through the API: the run seeds
    the Sigmoid's class scores, and its graph has no gradient node for the box branch (the output0 graph has, the
    DFL convolution among them); maps, gradients, logits and seeds equal those of seeding output0 with the same
    seeds within 1e-5, and the gradients match float64 autograd of the class scores."""
    model, x, cam, score, layout, rows, dets = _yolo_cam()
    b = dets[1].box
    targets = [detect.DetectionTarget(layout, anchor=dets[0].anchor, label=dets[0].label),
               detect.DetectionTarget(layout, label=dets[1].label, box=(b[0] + 1.0, b[1] - 0.5, b[2], b[3] + 0.5))]
    maps = cam(x.numpy(), targets=targets)
    r, layer, used = cam.result, cam.target_layers[0], cam.explainer_used
    assert used is not cam.explainer and used.score_name == rows.tensor and used.layers == [layer]
    assert cam.outputs.shape == (2, 4 + CLASSES, 84) and r.seed.shape == cam.outputs.shape

    whole = _gradient_origins(cam.explainer)
    box = _box_branch(cam.explainer.compiled(by_class=False).rewritten.model, score, rows.tensor)
    assert "/dfl/Conv" in box and "/dfl/Conv" in whole
    assert not _gradient_origins(used) & box

    anchors = [t.match(o)[0] for t, o in zip(targets, cam.outputs)]
    assert anchors == [d.anchor for d in dets]  # the moved box still matches sample 1's detection
    want_maps = cam(x.numpy(), targets=list(r.seed))  # seed arrays: output0 itself
    assert cam.explainer_used is cam.explainer
    want = cam.result
    assert np.abs(want.gradients[layer]).max() > 1e-3
    assert np.abs(r.gradients[layer] - want.gradients[layer]).max() <= 1e-5 * np.abs(want.gradients[layer]).max()
    assert np.abs(maps - want_maps).max() <= 1e-5 and all(m.std() > 0.05 for m in maps)
    np.testing.assert_array_equal(r.logits, want.logits)
    np.testing.assert_array_equal(r.seed, want.seed)

    out64, act64 = _hooked(model, "p3", x)
    total = sum(out64[i, 4 + d.label, d.anchor] for i, d in enumerate(dets))
    _close(r.gradients[layer], torch.autograd.grad(total, act64)[0].numpy())


def test_anchor_and_label_targets_need_no_first_run(monkeypatch):
    """An anchor and a label of a head without objectness make a constant one-hot seed: the call is one run (of
    the class-score graph), its seeds those the output's values give. A box to match, a label to find, an IoU term
    or objectness x class need the output's values (a first run)."""
    _, x, cam, _, layout, rows, dets = _yolo_cam()
    targets = [detect.DetectionTarget(layout, anchor=d.anchor, label=d.label) for d in dets]
    v5 = detect.recognise((1, 84, 5 + CLASSES), (SIZE, SIZE), decode="yolov5")
    assert not any(t.needs_output for t in targets)
    assert all(t.needs_output for t in (detect.DetectionTarget(layout, anchor=3),
                                        detect.DetectionTarget(layout, label=1, box=(0, 0, 9, 9)),
                                        detect.DetectionTarget(layout, anchor=3, label=1, box=(0, 0, 9, 9), iou=True),
                                        detect.DetectionTarget(v5, anchor=3, label=1)))
    runs, run = [], onnxcam.Explainer.run
    monkeypatch.setattr(onnxcam.Explainer, "run", lambda ex, *a, **k: runs.append(ex.score_name) or run(ex, *a, **k))
    cam(x.numpy(), targets=targets)
    assert runs == [rows.tensor]
    np.testing.assert_array_equal(cam.result.seed, np.stack([t.seed(o) for t, o in zip(targets, cam.outputs)]))


def test_a_target_with_an_iou_term_still_seeds_the_output():
    """One target with an IoU term in the batch keeps output0 seeded for all (its seed weights the box rows); the
    gradient of class score + IoU (sample 1) and of the class score (sample 0) matches float64 autograd."""
    model, x, cam, score, layout, rows, dets = _yolo_cam()
    b = dets[1].box
    ref = (b[0] + 1.3, b[1] - 0.7, b[2] + 2.1, b[3] + 0.9)
    targets = [detect.DetectionTarget(layout, anchor=dets[0].anchor, label=dets[0].label),
               detect.DetectionTarget(layout, anchor=dets[1].anchor, label=dets[1].label, box=ref, iou=True)]
    cam(x.numpy(), targets=targets)
    assert cam.explainer_used is cam.explainer and cam.explainer.score_name == score
    assert not rows.covers(cam.result.seed[1])  # the IoU term weights the box rows
    out64, act64 = _hooked(model, "p3", x)
    a, c = dets[1].anchor, dets[1].label
    cx, cy, w, h = out64[1, :4, a]
    box = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    inter = (torch.clamp(torch.minimum(box[2], torch.tensor(ref[2], dtype=torch.float64)) -
                         torch.maximum(box[0], torch.tensor(ref[0], dtype=torch.float64)), min=0) *
             torch.clamp(torch.minimum(box[3], torch.tensor(ref[3], dtype=torch.float64)) -
                         torch.maximum(box[1], torch.tensor(ref[1], dtype=torch.float64)), min=0))
    assert float(inter.detach()) > 0
    iou = inter / (w * h + (ref[2] - ref[0]) * (ref[3] - ref[1]) - inter)
    total = out64[0, 4 + dets[0].label, dets[0].anchor] + out64[1, 4 + c, a] + iou
    layer = cam.target_layers[0]
    _close(cam.result.gradients[layer], torch.autograd.grad(total, act64)[0].numpy())


class V5(nn.Module):
    """A YOLOv5-style head (N, A, 5 + C): objectness then class scores, exported as Concat([box rows x 8,
    objectness and classes]) then Transpose, behind a SiLU map of stride 4."""

    def __init__(self):
        super().__init__()
        self.conv1, self.act = nn.Conv2d(3, 8, 4, 4), nn.SiLU()
        self.conv2 = nn.Conv2d(8, 5 + CLASSES, 2, 2)

    def forward(self, x):
        p = self.conv2(self.act(self.conv1(x))).flatten(2).sigmoid()
        return torch.cat([p[:, :4] * 8, p[:, 4:]], 1).transpose(1, 2)


def test_objectness_times_class_target_seeds_the_concat_input():
    """YOLOv5 layout through the API: the objectness x class target seeds the Concat input holding objectness and
    classes (transposed back from (A, 5+C)); gradients equal those of seeding the output and float64 autograd of
    objectness x class score."""
    torch.manual_seed(0)
    model = V5().eval()
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    onnx_model = _export(model, x)
    _, layout, rows = _layout(onnx_model, decode="yolov5")
    assert (layout.anchors, rows.lo, rows.hi) == (64, 4, 5 + CLASSES)
    out64, act64 = _hooked(model, "act", x)
    cam = onnxcam.GradCAM(model=onnx_model, target_layers=["act"], device="cpu")  # a module path
    anchor, label = 27, 1
    cam(x.numpy(), targets=[detect.DetectionTarget(layout, anchor=anchor, label=label)])
    got, used = cam.result, cam.explainer_used
    assert used.score_name == rows.tensor and used is not cam.explainer
    cam(x.numpy(), targets=list(got.seed))
    want = cam.result.gradients[cam.target_layers[0]]
    grad = got.gradients[cam.target_layers[0]]
    assert np.abs(want).max() > 1e-4 and np.abs(grad - want).max() <= 1e-5 * np.abs(want).max()
    total = out64[0, anchor, 4] * out64[0, anchor, 5 + label]
    _close(grad, torch.autograd.grad(total, act64)[0].numpy())
