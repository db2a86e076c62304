"""Detectors, segmenters and vision transformers (onnxcam/tasks): layouts recognised, the automatic layer per task,
targets on the raw outputs, and gradients at that layer against float64 torch autograd with forward hooks."""

from __future__ import annotations

import copy
import functools
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import onnxcam
from onnxcam import image
from onnxcam.cam.api import method_object
from onnxcam.cli import main
from onnxcam.errors import InputError
from onnxcam.graph.model import ModelGraph
from onnxcam.pipeline import ImageFile
from onnxcam.targets import ClassifierOutputTarget
from onnxcam.tasks import choose, detect, segment
from onnxcam.tasks.layout import token_grid, tokens_to_maps
from onnxcam.tasks.run import SCALE_METHODS, TaskRunner

from .kinks import KinkMode, kink_inputs, onnx_kink_inputs

SIZE = 64  # YOLO input: strides 8/16/32 give 8x8 + 4x4 + 2x2 = 84 anchors
CLASSES, REG_MAX = 3, 8


# ---- a YOLOv8-style detector built by hand -------------------------------------------------------------------
class ConvAct(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.conv(x))


class TinyYolo(nn.Module):
    """Backbone to stride 32, a PAN-style neck whose stride-8 output feeds every scale, per-scale decoupled heads
    (a DFL box branch and a sigmoid class branch) concatenated to (N, 4 + C, A) as ultralytics exports YOLOv8."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Sequential(ConvAct(3, 8, 2), ConvAct(8, 16, 2), ConvAct(16, 16, 2))
        self.c4, self.c5 = ConvAct(16, 24, 2), ConvAct(24, 32, 2)
        self.p3 = ConvAct(16, 16)
        self.down3, self.n4 = ConvAct(16, 16, 2), ConvAct(40, 24)
        self.down4, self.n5 = ConvAct(24, 24, 2), ConvAct(56, 32)
        self.box = nn.ModuleList(nn.Sequential(ConvAct(c, 16), nn.Conv2d(16, 4 * REG_MAX, 1)) for c in (16, 24, 32))
        self.cls = nn.ModuleList(nn.Sequential(ConvAct(c, 16), nn.Conv2d(16, CLASSES, 1)) for c in (16, 24, 32))
        self.dfl = nn.Conv2d(REG_MAX, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(REG_MAX, dtype=torch.float32).view(1, REG_MAX, 1, 1)
        centres, strides = [], []
        for stride in (8, 16, 32):
            n = SIZE // stride
            ys, xs = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
            centres.append(torch.stack([xs.flatten(), ys.flatten()]))
            strides.append(torch.full((1, n * n), float(stride)))
        self.register_buffer("centres", torch.cat(centres, 1))
        self.register_buffer("strides", torch.cat(strides, 1))

    def forward(self, x):
        c3 = self.c3(x)
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p3 = self.p3(c3)
        n4 = self.n4(torch.cat([self.down3(p3), c4], 1))
        n5 = self.n5(torch.cat([self.down4(n4), c5], 1))
        heads = [torch.cat([b(f), c(f)], 1).flatten(2) for f, b, c in zip((p3, n4, n5), self.box, self.cls)]
        box, cls = torch.cat(heads, 2).split((4 * REG_MAX, CLASSES), 1)
        n, _, a = box.shape
        dist = self.dfl(box.view(n, 4, REG_MAX, a).transpose(2, 1).softmax(1)).view(n, 4, a)
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = self.centres - lt, self.centres + rb
        dbox = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * self.strides
        return torch.cat([dbox, cls.sigmoid()], 1)


def _export(model: nn.Module, x: torch.Tensor, output: str = "output0", dynamic: bool = True) -> bytes:
    f = io.BytesIO()
    axes = {"images": {0: "N"}, output: {0: "N"}} if dynamic else None
    torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17, input_names=["images"],
                      output_names=[output], dynamic_axes=axes)
    return f.getvalue()


def _hooked(model: nn.Module, module: str, x: torch.Tensor, follow=None):
    """float64 output and the module's output (a forward hook), with the graph kept for autograd."""
    md = copy.deepcopy(model).double()
    seen = {}
    handle = dict(md.named_modules())[module].register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    with KinkMode(follow) if follow is not None else torch.enable_grad():
        out = md(x.double())
    handle.remove()
    return out, seen["a"]


def _close(got: np.ndarray, want: np.ndarray, tol: float = 1e-4) -> float:
    err = float(np.abs(np.float64(got) - want).max() / (np.abs(want).max() + 1e-30))
    assert err < tol, f"relative error {err:.2e}"
    return err


@functools.cache
def yolo() -> tuple[nn.Module, bytes, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyYolo().eval()
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return model, _export(model, x), x


def test_yolo_layout_is_recognised_and_refused_with_the_option():
    layout = detect.recognise((1, 4 + CLASSES, 84), (SIZE, SIZE))
    assert (layout.decode, layout.anchors, layout.classes) == ("yolov8", 84, CLASSES)
    v5 = detect.recognise((1, 3 * 84, 5 + 80), (SIZE, SIZE))  # three anchors per cell, objectness
    assert (v5.decode, v5.classes, v5.objectness) == ("yolov5", 80, True)
    assert detect.recognise((1, 84, 4 + 60), (SIZE, SIZE), classes=60).decode == "yolov8t"
    with pytest.raises(InputError, match=r"shape \(1, 26, 97\).*give decode='yolov8'"):
        detect.recognise((1, 26, 97), (32, 128), name="ctc")  # a CTC recognizer's (N, T, C)
    assert detect.recognise((1, 26, 97), (32, 128), decode="yolov8").anchors == 97


def test_yolo_automatic_layer_is_the_neck_and_matches_torch():
    """The automatic layer was the DFL convolution (gradient exactly 0 for class scores); now the neck's stride-8
    output, which feeds all three scales. Gradients of a detection's class score (and of score + IoU with a
    reference box) at it match float64 autograd; the Grad-CAM map is the torch one, in the input's orientation."""
    model, onnx_model, x = yolo()
    mg = ModelGraph(onnx.load_from_string(onnx_model), (1, 3, SIZE, SIZE))
    score = mg.default_score()
    layer = mg.default_layer(score)
    assert mg.layer_rule == "detect: the last map feeding all 3 head outputs (the neck)"
    out64, act64 = _hooked(model, "p3", x)
    cam = onnxcam.GradCAM(model=onnx_model, device="cpu")
    layout = detect.recognise(mg.shape(mg.tensor(score)), (SIZE, SIZE))
    outputs = cam.score_outputs(x.numpy())
    dets = detect.decode(outputs, layout, conf=0.0, top=1)
    every = detect.decode(outputs, layout, conf=0.0)
    assert [d[:3] for d in every] == [d[:3] for d in detect.decode(outputs, layout, conf=0.0, top=3)]
    wanted = {every[0][1].label, every[0][2].label}
    assert detect.decode(outputs, layout, conf=0.0, top=4, classes=wanted)[0] == \
        [d for d in every[0] if d.label in wanted][:4]
    ref = [(d[0].box[0] + 1.3, d[0].box[1] - 0.7, d[0].box[2] + 2.1, d[0].box[3] + 0.9) for d in dets]
    for iou in (False, True):
        targets = [detect.DetectionTarget(layout, anchor=d[0].anchor, label=d[0].label, box=b if iou else None,
                                          iou=iou) for d, b in zip(dets, ref)]
        maps = cam(x.numpy(), targets=targets)
        r = cam.result
        assert cam.target_layers == [layer]
        _close(r.activations[layer], act64.detach().numpy(), 1e-5)  # the layer is p3's output
        total = 0
        for i, (d, b) in enumerate(zip(dets, ref)):
            a, c = d[0].anchor, d[0].label
            total = total + out64[i, 4 + c, a]
            if iou:
                cx, cy, w, h = out64[i, :4, a]
                box = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
                ix = torch.minimum(box[2], torch.tensor(b[2], dtype=torch.float64)) - torch.maximum(box[0], torch.tensor(b[0], dtype=torch.float64))
                iy = torch.minimum(box[3], torch.tensor(b[3], dtype=torch.float64)) - torch.maximum(box[1], torch.tensor(b[1], dtype=torch.float64))
                inter = ix.clamp(min=0) * iy.clamp(min=0)
                total = total + inter / (w * h + (b[2] - b[0]) * (b[3] - b[1]) - inter)
                assert float(inter) > 0
        want = torch.autograd.grad(total, act64, retain_graph=True)[0].numpy()
        _close(r.gradients[layer], want)
        weights = want.mean(axis=(2, 3))
        _close(cam.raw[layer], (weights[:, :, None, None] * act64.detach().numpy()).sum(axis=1))
        assert maps.shape == (2, SIZE, SIZE) and all(m.std() > 0.05 for m in maps)


def test_yolo_target_errors_name_the_option():
    _, onnx_model, x = yolo()
    layout = detect.recognise((1, 4 + CLASSES, 84), (SIZE, SIZE))
    with pytest.raises(InputError, match=r"detection anchor 84 is out of range: the head's anchors number 84"):
        onnxcam.GradCAM(model=onnx_model, device="cpu")(x.numpy()[:1], [detect.DetectionTarget(layout, anchor=84)])
    with pytest.raises(InputError, match="needs box="):
        detect.DetectionTarget(layout, anchor=0, iou=True)


def test_iou_gradient_matches_autograd():
    box, ref = torch.tensor([20.0, 30.0, 16.0, 22.0], dtype=torch.float64, requires_grad=True), (15.3, 17.1, 31.7, 44.9)
    cx, cy, w, h = box
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    inter = (torch.minimum(x2, torch.tensor(ref[2], dtype=torch.float64)) - torch.maximum(x1, torch.tensor(ref[0], dtype=torch.float64))).clamp(min=0) * \
        (torch.minimum(y2, torch.tensor(ref[3], dtype=torch.float64)) - torch.maximum(y1, torch.tensor(ref[1], dtype=torch.float64))).clamp(min=0)
    iou = inter / (w * h + (ref[2] - ref[0]) * (ref[3] - ref[1]) - inter)
    want = torch.autograd.grad(iou, box)[0].numpy()
    np.testing.assert_allclose(detect.iou_gradient(box.detach().numpy(), ref), want, rtol=1e-5, atol=1e-8)
    corners = [[float(v) for v in (x1, y1, x2, y2)]]
    assert abs(float(detect.box_iou(corners, [ref])[0, 0]) - float(iou)) < 1e-9


def test_nms_keeps_the_best_of_overlapping_boxes_per_class():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], np.float64)
    kept = detect.nms(boxes, np.array([0.9, 0.8, 0.7, 0.6]), 0.45, labels=np.array([0, 0, 1, 0]))
    assert kept.tolist() == [0, 2, 3]


def test_nms_of_thousands_of_candidates_is_the_greedy_one():
    """The vectorized loop keeps what the textbook greedy NMS keeps (ties in score broken by position)."""
    rng = np.random.default_rng(5)
    xy = rng.random((2000, 2)) * 100
    boxes = np.concatenate([xy, xy + rng.random((2000, 2)) * 30 + 1], axis=1)
    scores = np.round(rng.random(2000), 2)  # ties
    labels = rng.integers(0, 3, 2000)
    shifted = boxes + (labels * (boxes.max() + 1))[:, None]
    overlap = detect.box_iou(shifted, shifted)

    def greedy(iou):
        order, kept = list(np.argsort(-scores, kind="stable")), []
        while order:
            i = order.pop(0)
            kept.append(i)
            order = [j for j in order if overlap[i, j] <= iou]
        return kept
    for iou in (0.3, 0.7):
        want = greedy(iou)
        assert 200 < len(want) < 1990  # some suppressed, many kept
        assert detect.nms(boxes, scores, iou, labels).tolist() == want
        assert detect.nms(boxes, scores, iou, labels, limit=7).tolist() == want[:7]  # stops at the top ones


def _forward_nodes_of_gradient(mg: ModelGraph, layer: str | list, score: str, apart: bool = False) -> set:
    """Names of the forward nodes whose gradient rules the explainable model runs (rewrite._sign's origins), built
    on a fresh copy of mg: a build changes the graph it is given, so a second build on it would not be this one."""
    from onnxcam import rewrite
    layers = [layer] if isinstance(layer, str) else layer
    model = rewrite.build(ModelGraph(mg.proto, mg.input_shape, mg.weights), layers, score, apart=apart).model
    return {next(iter(json.loads(n.doc_string).values()))["node"] for n in model.graph.node
            if n.doc_string.startswith("{")}


def test_class_target_seeds_the_class_scores_alone_with_the_same_gradient():
    """A class target has no box term: seeding the head's class scores (the class input of the final Concat)
    gives the gradient at the automatic layer of seeding output0, without the DFL/box branch on the gradient path;
    a seed with an IoU term weights the box rows and keeps output0."""
    _, onnx_model, x = yolo()
    mg = ModelGraph(onnx.load_from_string(onnx_model), (1, 3, SIZE, SIZE))
    score = mg.default_score()
    layer = mg.default_layer(score)
    layout = detect.recognise(mg.shape(mg.tensor(score)), (SIZE, SIZE))
    rows = detect.class_rows(mg, score, layout)
    assert rows is not None and (rows.lo, rows.hi) == (4, 4 + CLASSES)
    assert mg.producer(mg.tensor(rows.tensor)).op == "Sigmoid"
    whole = onnxcam.Explainer(onnx_model, layers=[layer], score=score, device="cpu")
    alone = onnxcam.Explainer(onnx_model, layers=[layer], score=rows.tensor, device="cpu")
    outputs = whole.run(x.numpy(), seed=np.zeros((2, 4 + CLASSES, 84), np.float32)).logits
    seeds = np.stack([detect.detection_seed(o, layout, anchor, label) for o, anchor, label
                      in zip(outputs, (5, 70), (2, 0))])
    want = whole.run(x.numpy(), seed=seeds).gradients[layer]
    got = alone.run(x.numpy(), seed=rows.slice(seeds)).gradients[layer]
    assert np.abs(want).max() > 1e-3 and np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    via_output, via_classes = (_forward_nodes_of_gradient(mg, layer, s) for s in (score, rows.tensor))
    # the box convolutions still get (zero) gradient nodes: the Split of their Concat with the class rows passes
    # a zero slab back; the DFL convolution, on the box rows alone, gets none
    box = {n for n in via_output if n.startswith("/dfl/")}
    assert "/dfl/Conv" in box and not via_classes & box
    iou = detect.detection_seed(outputs[0], layout, 5, 2, ref_box=(0.0, 0.0, 40.0, 40.0))
    assert not rows.covers(iou)
    with pytest.raises(InputError, match="seed the detection output itself"):
        rows.slice(iou)


# TinyYolo's neck output per scale and the anchors of that scale (8x8, then 4x4, then 2x2 cells)
SCALES = {"p3": range(64), "n4": range(64, 80), "n5": range(80, 84)}


def _hooked_scales(model: nn.Module, x: torch.Tensor, names=tuple(SCALES)) -> tuple[torch.Tensor, dict]:
    """float64 output and each named module's output (forward hooks), with the graph kept for autograd."""
    md = copy.deepcopy(model).double()
    seen, modules = {}, dict(md.named_modules())
    handles = [modules[m].register_forward_hook(lambda _m, _i, o, m=m: seen.__setitem__(m, o)) for m in names]
    with torch.enable_grad():
        out = md(x.double())
    for handle in handles:
        handle.remove()
    return out, seen


def test_each_scale_is_explained_apart_at_its_own_map_and_matches_torch():
    """scale_layers finds each scale's neck output (p3, n4, n5). Differentiated apart, a detection's gradient is
    float64 autograd's at its own scale's map and exactly zero at the others (where the full gradient of a coarse
    detection at p3 is not: the neck between the scales carries it), and the neck between the scales (down3,
    down4) gets no gradient nodes at all."""
    model, onnx_model, x = yolo()
    mg = ModelGraph(onnx.load_from_string(onnx_model), (1, 3, SIZE, SIZE))
    score = mg.default_score()
    scales = choose.scale_layers(mg, score)
    assert scales is not None and len(scales.names) == 3 and "neck" in scales.rule
    out64, acts = _hooked_scales(model, x)
    ex = onnxcam.Explainer(onnx_model, layers=list(scales.names), score=score, device="cpu", apart=True)
    for own, (module, anchors) in enumerate(SCALES.items()):
        seeds = np.zeros((2, 4 + CLASSES, 84), np.float32)
        picks = [(anchors[0], 1), (anchors[-1], 2)]  # one detection per image
        for i, (a, c) in enumerate(picks):
            seeds[i, 4 + c, a] = 1.0
        r = ex.run(x.numpy(), seed=seeds)
        total = sum(out64[i, 4 + c, a] for i, (a, c) in enumerate(picks))
        for k, (name, other) in enumerate(zip(scales.names, SCALES)):
            _close(r.activations[name], acts[other].detach().numpy(), 1e-5)  # the layers are the hooked modules
            want = torch.autograd.grad(total, acts[other], retain_graph=True)[0].numpy()
            if k == own:
                _close(r.gradients[name], want)
            else:
                assert not np.any(r.gradients[name])
                assert k > own or np.abs(want).max() > 1e-6  # finer maps do get gradient through the neck
    apart = _forward_nodes_of_gradient(mg, list(scales.names), score, apart=True)
    whole = _forward_nodes_of_gradient(mg, list(scales.names), score)
    # (the layers' own producers name their gradient's fan-in Sum in both: not a differentiation of the neck)
    neck = {n for n in whole if n.startswith(("/down3/", "/down4/", "/n4/conv", "/n5/conv"))}
    assert neck and not apart & neck and apart < whole
    layout = detect.recognise((1, 4 + CLASSES, 84), (SIZE, SIZE))
    with pytest.raises(InputError, match=r"ShapleyCAM's Hessian-vector product is not built for layers .* apart"):
        onnxcam.ShapleyCAM(ex)(x.numpy()[:1], targets=[detect.DetectionTarget(layout, anchor=0, label=1)])


@pytest.mark.parametrize("method", sorted(SCALE_METHODS))
def test_detections_are_explained_at_their_own_scale(tmp_path, photo, method):
    """The task pipeline explains a multi-scale head's detections with the per-scale layers apart: each
    detection records its own scale's layer, and its map is the method's map at that one layer with the whole
    gradient (the other layers' maps are zero; the mean of the scaled maps, scaled again, is that map)."""
    _, onnx_model, _ = yolo()
    path = _write(tmp_path, "yolo.onnx", onnx_model)
    runner = TaskRunner(path, method=method, conf=0, top=84, out=tmp_path / "unused")
    assert runner.apart and len(runner.layers) == 3 and runner.layers[0] == runner.explainer.layers[0]
    result = runner.explain(ImageFile(photo, Path(photo.stem)), write=False)
    layout = detect.recognise((1, 4 + CLASSES, 84), (SIZE, SIZE))
    x = image.to_input(image.read_image(photo), runner.pre)[None]
    shown = {}  # scale -> detections with a map that is not all zero
    for item, got in zip(result.items, result.maps):
        own = next(k for k, anchors in enumerate(SCALES.values()) if item["anchor"] in anchors)
        assert item["layer"] == runner.layers[own]
        cam = method_object(path, method, [runner.layers[own]], device="cpu")
        want = cam(x, targets=[detect.DetectionTarget(layout, anchor=item["anchor"], label=item["label"])])[0]
        assert np.abs(got - want).max() < 1e-4
        shown[own] = shown.get(own, 0) + int(got.std() > 0.05)
    assert len(shown) >= 2 and sum(shown.values()) >= 2  # detections of several scales, maps not all zero


def test_class_rows_fall_back_to_the_output_unless_a_pure_copy():
    """YOLOv5-style (N, A, 5+C): the objectness x class seed is exact on the Concat input holding objectness and
    classes; a head whose class tensor also holds box rows, or whose output is no Concat, seeds the output."""
    class V5(nn.Module):
        def __init__(self, split: int):
            super().__init__()
            self.conv, self.split = nn.Conv2d(3, 5 + CLASSES, 8, 8), split

        def forward(self, x):
            p = self.conv(x).flatten(2).sigmoid()
            return torch.cat([p[:, :self.split] * 8, p[:, self.split:]], 1).transpose(1, 2)

    x = torch.rand(1, 3, SIZE, SIZE)
    for split, want in ((4, (4, 5 + CLASSES)), (2, None)):
        mg = ModelGraph(onnx.load_from_string(_export(V5(split).eval(), x)), (1, 3, SIZE, SIZE))
        layout = detect.recognise((1, 64, 5 + CLASSES), (SIZE, SIZE), decode="yolov5")
        rows = detect.class_rows(mg, mg.default_score(), layout)
        if want is None:  # the objectness row comes with box rows: no tensor holds the score's rows alone
            assert rows is None
            continue
        assert (rows.lo, rows.hi) == want
        seed = detect.detection_seed(np.full((64, 5 + CLASSES), 0.5, np.float32), layout, 3, 1)
        sliced = rows.slice(seed)  # (N, A, 5+C) was transposed from the Concat's (N, 5+C, A)
        assert sliced.shape == (1 + CLASSES, 64) and sliced[0, 3] == sliced[2, 3] == 0.5 and sliced.sum() == 1


# ---- a segmenter ---------------------------------------------------------------------------------------------
class Out(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


@functools.cache
def lraspp() -> tuple[nn.Module, bytes, torch.Tensor]:
    torch.manual_seed(0)
    net = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                    num_classes=4)
    for m in net.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
        if isinstance(m, nn.BatchNorm2d):  # fresh statistics are the identity: make the folded Conv+BN real
            g = torch.Generator().manual_seed(m.num_features)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    model = Out(net).eval()
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    return model, _export(model, x, "out", dynamic=False), x  # a dynamic batch makes its Resize sizes run-time


def test_segmenter_layer_is_the_backbone_end_and_class_mask_matches_torch():
    """The automatic layer was the 128-channel head map; now the backbone's last stage. The class-mask target
    (the class's argmax pixels) matches float64 autograd, following onnxruntime's branches at ReLU kinks."""
    model, onnx_model, x = lraspp()
    mg = ModelGraph(onnx.load_from_string(onnx_model), (1, 3, SIZE, SIZE))
    layer = mg.default_layer(mg.default_score())
    assert mg.layer_rule == "segment: the last map of the backbone module (before the decoder)"
    seen, _ = onnx_kink_inputs(onnx_model, x, kink_inputs(copy.deepcopy(model).double(), x.double()))
    out64, act64 = _hooked(model, "model.backbone.16", x, follow=seen)
    cam = onnxcam.GradCAM(model=onnx_model, device="cpu")
    outputs = cam.score_outputs(x.numpy())
    c = segment.classes_present(outputs[0])[0]
    target = segment.ClassMaskTarget(c)
    mask = target.mask_for(outputs[0])
    assert mask.sum() > 0
    maps = cam(x.numpy(), targets=[target])
    _close(cam.result.activations[layer], act64.detach().numpy(), 1e-5)
    want = torch.autograd.grad((out64[0, c] * torch.from_numpy(np.float64(mask))).sum(), act64)[0].numpy()
    _close(cam.result.gradients[layer], want)
    # seeded random weights put this map below zero everywhere (ReLU'd to zero, reported): the raw map is
    # checked instead, against torch's, which also fixes its orientation
    weights = want.mean(axis=(2, 3))
    _close(cam.raw[layer], (weights[:, :, None, None] * act64.detach().numpy()).sum(axis=1))
    assert maps.shape == (1, SIZE, SIZE) and np.ptp(cam.raw[layer]) > 1e-3


@pytest.mark.parametrize("n_seeds", [1, 3])
def test_one_seed_is_read_in_place(n_seeds):
    """A segmenter's seed is a full-size map per class: one seed per sample is taken from the seed input by a
    Squeeze, which onnxruntime runs in place (a Gather copied it: 1 ms for 21 classes at 320 px), several by a
    Gather each. (The gradient through the Squeeze is the one the test above checks against float64 autograd.)"""
    from onnxcam import rewrite
    _, onnx_model, _ = lraspp()
    mg = ModelGraph(onnx.load_from_string(onnx_model), (1, 3, SIZE, SIZE))
    score = mg.default_score()
    rw = rewrite.build(mg, [mg.default_layer(score)], score, n_seeds=n_seeds)
    readers = [n.op_type for n in rw.model.graph.node if rewrite.SEED in n.input]
    assert readers == (["Squeeze"] if n_seeds == 1 else ["Gather"] * n_seeds)


def test_single_map_output_mask_is_thresholded():
    sample = np.zeros((1, 4, 4), np.float32)
    sample[0, 1:3, 2] = 0.9
    assert segment.classes_present(sample) == [0]
    assert segment.ClassMaskTarget(0).seed(sample)[0].sum() == 2
    with pytest.raises(InputError, match=r"class 2 is out of range: the output has 1 class maps"):
        segment.ClassMaskTarget(2).seed(sample)


# ---- a vision transformer ------------------------------------------------------------------------------------
@functools.cache
def vit() -> tuple[nn.Module, bytes, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initializes the head: no gradient at all
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return model, _export(model, x, "logits"), x


def test_vit_layer_is_the_last_blocks_norm_input_and_tokens_become_maps():
    """The automatic layer was a (tokens, N, heads, dim) attention tensor inside the last block (one map per
    token); now the residual stream entering the last block's norm, (N, 1 + 4*4, C), turned into (N, C, 4, 4)
    maps by dropping the class token. Gradients match float64 autograd; the map is torch's."""
    model, onnx_model, x = vit()
    mg = ModelGraph(onnx.load_from_string(onnx_model), (1, 3, 32, 32))
    layer = mg.default_layer(mg.default_score())
    assert mg.layer_rule.startswith("vit: the input of the last block's norm")
    md = copy.deepcopy(model).double()
    seen = {}
    md.encoder.layers.encoder_layer_1.ln_1.register_forward_hook(lambda m, i, o: seen.__setitem__("a", i[0]))
    out64 = md(x.double())
    act64 = seen["a"]
    cam = onnxcam.GradCAM(model=onnx_model, device="cpu")
    maps = cam(x.numpy(), targets=[ClassifierOutputTarget(c) for c in (1, 3)])
    assert cam.target_layers == [layer]
    _close(cam.result.activations[layer], act64.detach().numpy(), 1e-5)
    want = torch.autograd.grad(out64[0, 1] + out64[1, 3], act64)[0].numpy()
    _close(cam.result.gradients[layer], want)
    a_map, g_map = tokens_to_maps(act64.detach().numpy(), want, (32, 32), 2)
    _close(cam.raw[layer], (g_map.mean(axis=(2, 3))[:, :, None, None] * a_map).sum(axis=1))
    assert maps.shape == (2, 32, 32) and all(m.std() > 0.05 for m in maps)


def test_token_layouts():
    assert token_grid(197, (224, 224)) == token_grid(197, (224, 224), 16)
    assert (token_grid(198, (224, 224)).prefix, token_grid(196, (224, 224)).prefix) == (2, 0)  # DeiT, no token
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((2, 1 + 6, 5))  # (N, 1 + 2*3, C) at a 16x24 input, patch 8
    maps, _ = tokens_to_maps(tokens, tokens, (16, 24), 2)
    assert maps.shape == (2, 5, 2, 3) and (maps[:, :, 1, 0] == tokens[:, 4]).all()
    seq_first, _ = tokens_to_maps(tokens.transpose(1, 0, 2), tokens.transpose(1, 0, 2), (16, 24), 2)
    assert (seq_first == maps).all()
    with pytest.raises(InputError, match=r"activation of shape \(2, 10, 5\) is no token layout.*reshape_transform"):
        tokens_to_maps(np.zeros((2, 10, 5)), np.zeros((2, 10, 5)), (16, 24), 2)


# ---- the automatic choice on small graphs ----------------------------------------------------------------------
class RNetLike(nn.Module):
    """MTCNN's R-Net tail: a (N, C, h, w) map permuted to (N, w, h, C) before the dense layers, and a box
    regression output first, the class probabilities second."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.act = nn.PReLU(8)
        self.box, self.fc = nn.Linear(8 * 6 * 4, 4), nn.Linear(8 * 6 * 4, 2)

    def forward(self, x):
        h = self.act(self.conv(x)).permute(0, 3, 2, 1).flatten(1)
        return self.box(h), self.fc(h).softmax(1)


def test_permuted_map_is_skipped_and_the_class_output_is_explained():
    """The automatic layer was the permuted (N, w, h, C) tensor (a transposed map) and the score the box
    regression output (the first); now the PReLU map and the logits behind the Softmax."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 8)
    f = io.BytesIO()
    torch.onnx.export(RNetLike().eval(), (x,), f, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["box", "prob"])
    mg = ModelGraph(onnx.load_from_string(f.getvalue()), (1, 3, 12, 8))
    score = mg.default_score()
    assert mg.producer(mg.tensor(score)).op == "Gemm"
    assert [o.name for o in mg.graph.outputs if o.name in mg.forward_reach([mg.tensor(score)])] == ["prob"]
    layer = mg.default_layer(score)
    assert mg.producer(mg.tensor(layer)).op == "PRelu" and mg.shape(mg.tensor(layer)) == (1, 8, 6, 4)
    assert "swapped was skipped" in mg.layer_rule


class CtcLike(nn.Module):
    """A recognizer's (N, T, C) per-step scores: 32 steps x 97 characters at 32x128, no detection head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 97, (32, 4), (32, 4))

    def forward(self, x):
        return self.conv(x).squeeze(2).permute(0, 2, 1)


@functools.cache
def ctc() -> bytes:
    torch.manual_seed(0)
    return _export(CtcLike().eval(), torch.randn(1, 3, 32, 128))


def test_task_that_cannot_be_detected_names_what_was_found():
    mg = ModelGraph(onnx.load_from_string(ctc()), (1, 3, 32, 128))
    with pytest.raises(InputError, match=r"cannot tell the task.*shape \(N, 32, 97\).*decode=.*task="):
        choose.task_of(mg, mg.default_score(), strict=True)
    assert choose.task_of(mg, mg.default_score(), strict=True, decode="yolov8") == "detect"
    assert choose.task_of(mg, mg.default_score()) == "classify"  # not strict: the generic rules


# ---- the command line ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo():
    return onnxcam.SAMPLE_IMAGES[0]


def _write(tmp_path, name: str, data: bytes, names=None) -> str:
    proto = onnx.load_from_string(data)
    if names:
        proto.metadata_props.add(key="names", value=repr(dict(enumerate(names))))
    path = str(tmp_path / name)
    onnx.save(proto, path)
    return path


def test_cli_draws_detections_and_writes_boxes(tmp_path, photo):
    _, onnx_model, _ = yolo()
    path = _write(tmp_path, "yolo.onnx", onnx_model, ["cat", "dog", "cup"])
    result = CliRunner().invoke(main, ["explain", path, str(photo), "--out", str(tmp_path / "o"), "--conf", "0",
                                       "--top", "2"])
    assert result.exit_code == 0, result.output
    assert "Task detect (decode yolov8" in result.output and "the neck" in result.output
    stem = photo.stem
    record = json.loads((tmp_path / "o" / f"{stem}.json").read_text())
    assert record["task"] == "detect" and record["decoding"]["decode"] == "yolov8"
    assert record["decoding"]["seeded"] == "/Sigmoid_output_0"  # the class scores alone: no box term in the seeds
    assert record["layer_rule"].startswith("detect:") and len(record["detections"]) == 2
    assert len(record["layers"]) == 3 and "differentiated apart" in record["layer_rule"]  # one map per scale
    d = record["detections"][0]
    assert d["layer"] in record["layers"]
    listed = CliRunner().invoke(main, ["layers", path])
    assert listed.exit_code == 0 and "explains each detection at its own scale's layer instead: " \
        + ", ".join(record["layers"]) in listed.output
    assert d["name"] in ("cat", "dog", "cup") and len(d["box_image"]) == 4 and d["overlay"]
    for name in (f"{stem}.detect.png", d["overlay"]):
        assert (tmp_path / "o" / name).stat().st_size > 0
    bad = CliRunner().invoke(main, ["explain", _write(tmp_path, "ctc.onnx", ctc()), str(photo), "--out",
                                    str(tmp_path / "b")])
    assert bad.exit_code == 1 and "cannot tell the task" in bad.output and "decode=" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


class TinySeg(nn.Module):
    """A backbone module, a 1x1 class head and a x4 bilinear upsampling: (N, K, H, W) logits, or for K = 1 a
    DBNet-style sigmoid probability map."""

    def __init__(self, classes: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1)
        self.classes = classes

    def forward(self, x):
        y = nn.functional.interpolate(self.head(self.backbone(x)), scale_factor=4.0, mode="bilinear")
        return y.sigmoid() if self.classes == 1 else y


@pytest.mark.parametrize("classes", [3, 1])
def test_cli_outlines_segmentation_classes(tmp_path, photo, classes):
    torch.manual_seed(classes)
    model = TinySeg(classes).eval()
    if classes == 1:  # centre the probabilities on DBNet's 0.3 threshold: some pixels above, some below
        model.head.bias.data[:] = -0.85 - float(model.head.weight.sum()) * 0.3
    path = _write(tmp_path, "seg.onnx", _export(model, torch.randn(1, 3, 32, 32), "out", dynamic=False))
    result = CliRunner().invoke(main, ["explain", path, str(photo), "--out", str(tmp_path / "o"), "--top", "2"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "o" / f"{photo.stem}.json").read_text())
    assert record["task"] == "segment" and record["decoding"]["classes"] == classes
    assert record["layer_rule"] == "segment: the last map of the backbone module (before the decoder)"
    assert record["layers"] == ["/backbone/backbone.3/Relu_output_0"]
    assert 1 <= len(record["classes"]) <= min(2, classes) and all(c["pixels"] > 0 for c in record["classes"])
    assert (tmp_path / "o" / f"{photo.stem}.segment.png").exists()
    written = [c["overlay"] for c in record["classes"] if c["zero_map"] is None]
    assert written and all((tmp_path / "o" / name).exists() for name in written)


# ---- ultralytics' own YOLOv8n, built from its yaml with seeded weights (no download) ---------------------------
@pytest.mark.slow
def test_ultralytics_yolov8n_layer_and_gradients(tmp_path, monkeypatch):
    """YOLOv8n as ultralytics builds it (DFL box branch, three scales, 128 px): the automatic layer is the neck's
    stride-8 C2f (model.15), not the DFL convolution; a detection's class-score gradient there matches float64
    autograd. ultralytics is not a test dependency: skipped where it is not installed."""
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", nc=3, verbose=False).eval()
    for module in model.modules():
        if hasattr(module, "export"):
            module.export, module.format = True, "onnx"
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    onnx_model = _export(model, x)
    mg = ModelGraph(onnx.load_from_string(onnx_model), (1, 3, 128, 128))
    score = mg.default_score()
    layer = mg.default_layer(score)
    assert mg.layer_rule.startswith("detect: the last map feeding all")
    layout = detect.recognise(mg.shape(mg.tensor(score)), (128, 128))
    assert (layout.decode, layout.anchors, layout.classes) == ("yolov8", 336, 3)
    out64, act64 = _hooked(model, "model.15", x)
    cam = onnxcam.GradCAM(model=onnx_model, device="cpu")
    best = detect.decode(cam.score_outputs(x.numpy()), layout, conf=0.0, top=1)[0][0]
    cam(x.numpy(), targets=[detect.DetectionTarget(layout, anchor=best.anchor, label=best.label)])
    assert cam.target_layers == [layer]
    _close(cam.result.activations[layer], act64.detach().numpy(), 1e-5)
    want = torch.autograd.grad(out64[0, 4 + best.label, best.anchor], act64)[0].numpy()
    _close(cam.result.gradients[layer], want)
    assert np.ptp(cam.raw[layer]) > 0
    # each scale's own neck output (model.15, .18, .21), differentiated apart: a stride-32 anchor's gradient is
    # autograd's at model.21 and zero at the finer two
    scales = choose.scale_layers(mg, score)
    necks = ("model.15", "model.18", "model.21")
    out64, acts = _hooked_scales(model, x, necks)
    ex = onnxcam.Explainer(onnx_model, layers=list(scales.names), score=score, device="cpu", apart=True)
    seed = np.zeros((1, 4 + 3, 336), np.float32)
    seed[0, 4 + 1, 330] = 1.0  # anchors 320-335: the 4x4 stride-32 grid
    r = ex.run(x.numpy(), seed=seed)
    want = torch.autograd.grad(out64[0, 4 + 1, 330], acts["model.21"])[0].numpy()
    for name, module in zip(scales.names, necks):
        _close(r.activations[name], acts[module].detach().numpy(), 1e-5)
    _close(r.gradients[scales.names[2]], want)
    assert not np.any(r.gradients[scales.names[0]]) and not np.any(r.gradients[scales.names[1]])
