"""A torchvision RetinaNet exported whole (its post-processing: per-level Sigmoid, TopK, box decoding, NMS; boxes,
scores and labels outputs): the head's (N, A, C) logits that every level's Sigmoid reads are explained, a target
picks one final detection by index or by box and class, the automatic layer is the FPN map feeding every level,
and the gradients match float64 torch autograd with a forward hook, through torchvision's own post-processing.

The net is torchvision's RetinaNet (head, anchors, transform and post-processing unchanged) on a small seeded
backbone, so that the export and the float64 reference take seconds. Its float64 forward follows onnxruntime's
ReLU/MaxPool branches (tests/kinks.py), and the test checks that both forwards select the same detections from
the same (anchor, class) entries before it compares gradients: the selection agrees by check, not by luck.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import onnxcam
from onnxcam.cli import main
from onnxcam.errors import InputError
from onnxcam.graph.model import ModelGraph
from onnxcam.tasks import choose, detect

from .detectors import HeadLogits, Whole, check_gradcam, close, conv_stage, export_whole, seed_batchnorm, two_targets
from .kinks import KinkMode, kink_inputs, onnx_kink_inputs

SIZE, CLASSES = 160, 4  # P3-P7 at 20, 10, 5, 3, 2 cells; 9 anchors per cell: 4842 anchors
LAYER = "/model/backbone/fpn/inner_blocks.2/inner_blocks.2.0/Conv_output_0"  # the FPN's lateral of C5
LAYER_MODULE = "model.backbone.fpn.inner_blocks.2.0"


class Body(nn.Module):
    """A ResNet-shaped backbone in miniature: a stride-4 stem (with a max pool), then stages at strides 8-32."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_stage(3, 16), nn.MaxPool2d(3, 2, 1))
        self.layer2, self.layer3, self.layer4 = conv_stage(16, 24), conv_stage(24, 32), conv_stage(32, 48)

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.stem(x))))



@functools.cache
def _retinanet() -> tuple[Whole, bytes, torch.Tensor]:
    """A seeded RetinaNet (no weights; BatchNorm statistics and the class head made non-trivial: its fresh init
    scores every anchor 0.01), exported once: (torch model, ONNX bytes, input)."""
    torch.manual_seed(0)
    backbone = BackboneWithFPN(Body(), {"layer2": "0", "layer3": "1", "layer4": "2"}, [24, 32, 48], 32,
                               extra_blocks=LastLevelP6P7(32, 32))
    net = RetinaNet(backbone, CLASSES, min_size=SIZE, max_size=SIZE, fixed_size=(SIZE, SIZE), score_thresh=0.3,
                    topk_candidates=100, detections_per_img=10)
    seed_batchnorm(net)
    g = torch.Generator().manual_seed(3)
    for m in net.head.classification_head.modules():
        if isinstance(m, nn.Conv2d):  # He init, scaled so that the best scores sit near 0.8, not saturated
            fan_in = m.weight[0].numel()
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * 0.8 * (2 / fan_in) ** 0.5)
            m.bias.data.zero_()
    return export_whole(net, SIZE)


def _selection(onnx_model: bytes) -> detect.Selection:
    return choose.selection_of(ModelGraph(onnx.load_from_string(onnx_model), (1, 3, SIZE, SIZE)))


def test_retinanet_logits_before_the_per_level_sigmoid_are_explained_at_the_fpn():
    """The post-NMS outputs are traced back through TopK, the per-level Sigmoids and the level slices to the head's
    (N, A, C) logits (not the boxes output, not a post-NMS copy): the task is detect, and the automatic layer is
    the FPN map feeding all five levels' heads, never the score."""
    _, onnx_model, _ = _retinanet()
    mg = ModelGraph(onnx.load_from_string(onnx_model), (1, 3, SIZE, SIZE))
    selection = choose.selection_of(mg, strict=True)
    assert (selection.boxes, selection.scores, selection.labels) == ("boxes", "scores", "labels")
    assert (selection.activation, selection.logits, selection.classes, selection.anchors) == ("Sigmoid", True,
                                                                                             CLASSES, 4842)
    score = mg.default_score()
    assert score == selection.score and mg.producer(mg.tensor(score)).op == "Concat"
    assert tuple(mg.shape(mg.tensor(score))) == (1, 4842, CLASSES)
    assert choose.task_of(mg, score, strict=True) == "detect"
    assert mg.default_layer(score) == LAYER
    assert mg.layer_rule == "detect: the last map feeding all 5 head outputs (the neck)"
    assert selection.describe()["score_layout"] == "(N, 4842, 4) logits, Sigmoid per level after the selection"


def _torch_run(model: Whole, x: torch.Tensor, follow: list) -> dict:
    """float64 forward following onnxruntime's kinks: the layer's activation, the head's logits and the
    detections (boxes, scores, labels), with each detection's (anchor, class) entry of the logits."""
    md = copy.deepcopy(model).double()
    seen = {}
    modules = dict(md.named_modules())
    hooks = [modules[LAYER_MODULE].register_forward_hook(lambda m, i, o: seen.__setitem__("a", o)),
             modules["model.head"].register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o["cls_logits"]))]
    with KinkMode(follow):
        boxes, scores, labels = md(x.double())
    for h in hooks:
        h.remove()
    probs = torch.sigmoid(seen["logits"][0]).detach().numpy()
    anchors = [int(np.abs(probs[:, c] - s).argmin()) for s, c in zip(scores.detach().numpy(), labels.numpy())]
    return {**seen, "boxes": boxes, "scores": scores, "labels": labels, "anchors": anchors}


@functools.cache
def _follow() -> list:
    model, onnx_model, x = _retinanet()
    follow, _ = onnx_kink_inputs(onnx_model, x, kink_inputs(HeadLogits(copy.deepcopy(model)).double(), x.double()))
    return follow


def test_retinanet_detection_gradient_matches_float64_torch():
    """Both forwards select the same detections from the same (anchor, class) entries; a detection picked by
    index (the best) and one by box + class (FasterRCNNBoxScoreTarget's matching, a box near it) are explained
    at the automatic layer; their scores' gradients (through the Sigmoid: s (1 - s) at the entry) and the
    Grad-CAM maps match float64 autograd through torchvision's post-processing."""
    model, onnx_model, x = _retinanet()
    ref = _torch_run(model, x, _follow())
    cam = onnxcam.GradCAM(model=onnx_model, device="cpu")
    ex = cam.explainer
    assert ex.layers == [LAYER]
    selection = _selection(onnx_model)
    first = ex.run(x.numpy(), seed=np.zeros((1, selection.anchors, selection.classes), np.float32))
    found = detect.selected(selection, first.logits[0], first.outputs)
    # the same selection in both: detections, their entries, their order
    assert len(found) == 10 and [(d.anchor, d.label) for d in found] == list(zip(ref["anchors"],
                                                                                 ref["labels"].tolist()))
    close(np.array([d.score for d in found]), ref["scores"].detach().numpy(), 1e-5)
    close(first.logits, ref["logits"].detach().numpy(), 1e-5)
    targets, k = two_targets(selection, first, found)
    for target, j in zip(targets, (0, k)):
        maps = cam(x.numpy(), targets=[target])
        act64, score64 = ref["a"], ref["scores"][j]
        assert abs(target(first.logits[0]) - float(score64)) < 1e-6
        check_gradcam(cam, LAYER, act64, score64)
        assert maps.shape == (1, SIZE, SIZE) and cam.degenerate_reasons == [None]


def test_retinanet_bad_detection_index_is_one_line():
    _, onnx_model, x = _retinanet()
    selection = _selection(onnx_model)
    ex = onnxcam.Explainer(onnx_model, device="cpu")
    first = ex.run(x.numpy(), seed=np.zeros((1, selection.anchors, selection.classes), np.float32))
    with pytest.raises(InputError, match=r"^detection index 10 is out of range: the model returned 10 detections "
                                         r"\(index 0 to 9\) in output 'scores'$"):
        detect.SelectedDetectionTarget(selection, first.outputs, index=10)


def test_cli_explains_a_whole_retinanet_with_labelled_boxes_and_json(tmp_path):
    """`onnxcam explain --task detect` reads RetinaNet's detections after its NMS, writes the labelled boxes, one
    overlay per detection above --conf (the --top best) and the JSON naming the logits explained."""
    _, onnx_model, x = _retinanet()
    model_path = tmp_path / "retinanet.onnx"
    model_path.write_bytes(onnx_model)
    picture = tmp_path / "street.png"
    cv2.imwrite(str(picture), np.uint8(np.round(x[0].permute(1, 2, 0).numpy()[:, :, ::-1] * 255)))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["explain", str(model_path), str(picture), "--task", "detect", "--mean", "0,0,0",
                                    "--std", "1,1,1", "--out", str(out), "--method", "gradcam", "--device", "cpu",
                                    "--conf", "0.5", "--top", "3"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "street.json").read_text())
    assert record["task"] == "detect" and record["decoding"]["decode"] == "selected"
    assert record["score"] == record["decoding"]["score_tensor"] and record["layers"] == [LAYER]
    assert "logits, Sigmoid per level" in record["decoding"]["score_layout"]
    dets = record["detections"]
    assert len(dets) == 3 and all(d["score"] > 0.5 and len(d["box"]) == 4 and d["zero_map"] is None for d in dets)
    assert (out / "street.detect.png").exists() and all((out / d["overlay"]).exists() for d in dets)


def test_task_runner_seeds_each_detection_through_the_sigmoid(tmp_path):
    """The command line's runner explains each detection's score, sigmoid(logit), not the logit: its gradients
    are the SelectedDetectionTarget's (checked against float64 torch above), in the same order as its items."""
    from onnxcam import image
    from onnxcam.pipeline import ImageFile
    from onnxcam.tasks.run import TaskRunner

    _, onnx_model, x = _retinanet()
    model_path = tmp_path / "retinanet.onnx"
    model_path.write_bytes(onnx_model)
    runner = TaskRunner(str(model_path), task="detect", method="gradcam", conf=0.5, top=2, mean=(0, 0, 0),
                        std=(1, 1, 1), device="cpu", out=tmp_path / "out")
    rgb = np.uint8(np.round(x[0].permute(1, 2, 0).numpy() * 255))
    record = runner.explain_file(ImageFile(tmp_path / "street.png", Path("street"), rgb))
    got = runner.cam.result.gradients[LAYER]
    xs = image.to_input(rgb, runner.pre)[None]
    cam = onnxcam.GradCAM(model=onnx_model, device="cpu")
    selection = _selection(onnx_model)
    first = cam.explainer.run(xs, seed=np.zeros((1, selection.anchors, selection.classes), np.float32))
    assert [d["index"] for d in record["detections"]] == [0, 1]
    for k in range(2):
        cam(xs, targets=[detect.SelectedDetectionTarget(selection, first.outputs, index=k)])
        close(got[k], cam.result.gradients[LAYER][0], 1e-5)


def test_logit_selection_matches_through_the_sigmoid_and_seeds_its_derivative():
    """For logits selected after a Sigmoid (RetinaNet), a detection's score is matched to the entry whose sigmoid
    it is (the closest within a runtime's Sigmoid error; equal entries in anchor order, each used once), its
    target's value is that probability and its seed is sigmoid'(entry) = s (1 - s) there, zero elsewhere."""
    sel = detect.Selection("logits", "boxes", "scores", "labels", anchors=4, classes=3, activation="Sigmoid",
                           logits=True)
    logits = np.float32([[0.5, -1.0, 2.0], [0.5, 1.0, -2.0], [0.2, 3.0, 0.0], [0.5, 0.0, 1.5]])
    s = 1 / (1 + np.exp(-np.float64(logits)))
    # scores as a float32 Sigmoid gives them, a little off the exact value; two detections of the tied 0.5 logits
    scores = np.float32([s[2, 1] + 1e-7, s[0, 0], s[1, 0] - 1e-7, s[3, 2]])
    outputs = {"boxes": np.zeros((4, 4), np.float32), "scores": scores, "labels": np.int64([1, 0, 0, 2])}
    found = detect.selected(sel, logits, outputs)
    assert [(d.anchor, d.label) for d in found] == [(2, 1), (0, 0), (1, 0), (3, 2)]
    target = detect.SelectedDetectionTarget(sel, outputs, index=3)
    seed = target.seed(logits)
    assert seed[3, 2] == np.float32(s[3, 2] * (1 - s[3, 2])) and np.count_nonzero(seed) == 1
    assert target(logits) == pytest.approx(s[3, 2], abs=1e-12)
    with pytest.raises(InputError, match=r"detection 0 \(class 1, score 0.9\) of output 'scores' is no entry of "
                                         r"'logits'"):
        detect.selected(sel, logits, {**outputs, "scores": np.float32([0.9, *scores[1:]])})
