"""Detectors exported whole with their post-processing (torchvision's SSDlite: NMS inside an If, TopK, GatherND;
separate boxes, scores and labels outputs): the class scores the detections were selected from are explained, a
target picks one final detection by index or by box and class, the automatic layer is the backbone's last map
feeding every head, and the gradients match float64 torch autograd with forward hooks on the same model."""

from __future__ import annotations

import copy
import json

import cv2
import numpy as np
import onnx
import pytest
import torch
import torchvision
from click.testing import CliRunner

import onnxcam
from onnxcam.cli import main
from onnxcam.errors import InputError
from onnxcam.graph.model import ModelGraph
from onnxcam.tasks import choose, detect

from .detectors import HeadLogits, check_gradcam, export_whole, seed_batchnorm, two_targets
from .kinks import KinkMode, kink_inputs, onnx_kink_inputs

SIZE, CLASSES = 320, 4  # SSDlite's fixed input; background + 3 classes
LAYER_MODULE = "model.backbone.features.0.13"  # the expansion of block 13: SSDlite's stride-16 map (C4)


@pytest.fixture(scope="module")
def ssdlite():
    return build_ssdlite()


def build_ssdlite():
    """A seeded SSDlite320 (no weights), BatchNorm statistics and the class head made non-trivial (its fresh init
    scores every class 1/C), exported once: (torch model, ONNX bytes, input)."""
    torch.manual_seed(0)
    net = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                     num_classes=CLASSES)
    seed_batchnorm(net)
    g = torch.Generator().manual_seed(3)
    for p in net.head.classification_head.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return export_whole(net, SIZE)



@pytest.mark.slow
def test_ssdlite_class_scores_before_nms_are_explained_at_the_backbone(ssdlite):
    """The post-NMS outputs are recognised; the score explained is the Softmax they were selected from (not the
    boxes output, not a post-NMS copy), the task is detect, and the automatic layer is the backbone's stride-16
    map feeding all six heads."""
    _, onnx_model, _ = ssdlite
    mg = ModelGraph(onnx.load_from_string(onnx_model), (1, 3, SIZE, SIZE))
    selection = choose.selection_of(mg)
    assert selection is not None and (selection.boxes, selection.scores, selection.labels) == ("boxes", "scores",
                                                                                             "labels")
    assert (selection.activation, selection.classes) == ("Softmax", CLASSES) and selection.anchors == 3234
    score = mg.default_score()
    assert score == selection.score and mg.producer(mg.tensor(score)).op == "Softmax"
    assert choose.task_of(mg, score, strict=True) == "detect"
    layer = mg.default_layer(score)
    assert layer == "/model/backbone/features.0/features.0.13/features.0.13.2/HardSwish_output_0"
    assert mg.layer_rule == "detect: the last map feeding all 6 head outputs (the neck)"


def _torch_detection(model, x, follow, box, label):
    """float64 forward following onnxruntime's kinks: the layer's activation and the scores output's entry of
    the detection with this label whose box matches `box` (IoU > 0.99)."""
    md = copy.deepcopy(model).double()
    seen = {}
    handle = dict(md.named_modules())[LAYER_MODULE].register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    with KinkMode(follow):
        boxes, scores, labels = md(x.double())
    handle.remove()
    same = torch.nonzero(labels == label).flatten()
    overlaps = detect.box_iou(boxes[same].detach().numpy(), box)[:, 0]
    assert overlaps.max() > 0.99, "the float64 model lost the detection"
    return seen["a"], scores[same[int(overlaps.argmax())]]


@pytest.mark.slow
def test_ssdlite_detection_gradient_matches_float64_torch(ssdlite):
    """A detection picked by index (the best) and one picked by box + class (FasterRCNNBoxScoreTarget's
    matching: a box near another detection's) are explained at the automatic layer; the gradients of their
    scores, and the Grad-CAM maps, match float64 autograd through torchvision's own post-processing."""
    model, onnx_model, x = ssdlite
    follow, _ = onnx_kink_inputs(onnx_model, x, kink_inputs(HeadLogits(copy.deepcopy(model)).double(), x.double()))
    cam = onnxcam.GradCAM(model=onnx_model, device="cpu")
    ex = cam.explainer
    selection = choose.selection_of(ModelGraph(onnx.load_from_string(onnx_model), (1, 3, SIZE, SIZE)))
    first = ex.run(x.numpy(), seed=np.zeros((1, selection.anchors, selection.classes), np.float32))
    found = detect.selected(selection, first.logits[0], first.outputs)
    targets, k = two_targets(selection, first, found)
    layer = ex.layers[0]
    for target, d in zip(targets, (found[0], found[k])):
        maps = cam(x.numpy(), targets=[target])
        act64, score64 = _torch_detection(model, x, follow, d.box, d.label)
        assert abs(float(score64) - d.score) < 1e-5 and target(first.logits[0]) == d.score
        check_gradcam(cam, layer, act64, score64)
        assert maps.shape == (1, SIZE, SIZE)


@pytest.mark.slow
def test_selected_target_bad_input_is_one_line(ssdlite):
    _, onnx_model, x = ssdlite
    ex = onnxcam.Explainer(onnx_model, device="cpu")
    selection = choose.selection_of(ModelGraph(onnx.load_from_string(onnx_model), (1, 3, SIZE, SIZE)))
    first = ex.run(x.numpy(), seed=np.zeros((1, selection.anchors, selection.classes), np.float32))
    n = first.outputs["scores"].shape[0]
    with pytest.raises(InputError, match=rf"detection index {n} is out of range: the model returned {n} "
                                         rf"detections \(index 0 to {n - 1}\) in output 'scores'"):
        detect.SelectedDetectionTarget(selection, first.outputs, index=n)
    with pytest.raises(InputError, match="iou=True is not available"):
        detect.SelectedDetectionTarget(selection, first.outputs, label=1, box=(0, 0, 9, 9), iou=True)
    far = detect.SelectedDetectionTarget(selection, first.outputs, label=1, box=(-90, -90, -80, -80))
    assert not far.seed(first.logits[0]).any() and far(first.logits[0]) == 0.0


@pytest.mark.slow
def test_cli_explains_a_whole_detector_with_labelled_boxes_and_json(ssdlite, tmp_path):
    """`onnxcam explain --task detect` reads the detections after the model's NMS, writes the labelled boxes, one
    overlay per detection above --conf and the JSON; with none above --conf, one line names the best score and
    the flag."""
    _, onnx_model, x = ssdlite
    model_path = tmp_path / "ssdlite.onnx"
    model_path.write_bytes(onnx_model)
    picture = tmp_path / "street.png"
    cv2.imwrite(str(picture), np.uint8(np.round(x[0].permute(1, 2, 0).numpy()[:, :, ::-1] * 255)))
    out = tmp_path / "out"
    args = [str(model_path), str(picture), "--task", "detect", "--mean", "0,0,0", "--std", "1,1,1", "--out",
            str(out), "--method", "layercam", "--device", "cpu"]
    res = CliRunner().invoke(main, ["explain", *args, "--conf", "0.3", "--top", "2"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "street.json").read_text())
    assert record["task"] == "detect" and record["decoding"]["decode"] == "selected"
    assert record["score"] == record["decoding"]["score_tensor"]
    dets = record["detections"]
    assert 1 <= len(dets) <= 2 and all(d["score"] > 0.3 and len(d["box"]) == 4 for d in dets)
    assert (out / "street.detect.png").exists() and all((out / d["overlay"]).exists() for d in dets)
    best = max(d["score"] for d in dets)
    res = CliRunner().invoke(main, ["explain", *args, "--conf", "0.999"])
    assert res.exit_code == 1
    line = next(ln for ln in res.output.splitlines() if "no detection" in ln)
    assert "no detection scores above conf 0.999: the best of " in line and f"is {best:.3f}" in line
    assert line.endswith("lower conf (option --conf)")


def test_selected_detections_map_back_to_their_entries():
    """Each post-NMS detection is found at the entry it was copied from; equal entries of one class (flat image
    regions) are taken in anchor order; a score that is no entry is one line naming the score tensor."""
    sel = detect.Selection("probs", "boxes", "scores", "labels", anchors=5, classes=3, activation="Softmax")
    probs = np.float32([[0.1, 0.2, 0.7], [0.3, 0.6, 0.1], [0.2, 0.1, 0.7], [0.5, 0.4, 0.1], [0.8, 0.1, 0.1]])
    outputs = {"boxes": np.float32(np.arange(12).reshape(3, 4)), "scores": np.float32([0.7, 0.7, 0.6]),
               "labels": np.int64([2, 2, 1])}
    found = detect.selected(sel, probs, outputs)
    assert [(d.index, d.anchor, d.label) for d in found] == [(0, 0, 2), (1, 2, 2), (2, 1, 1)]
    target = detect.SelectedDetectionTarget(sel, outputs, label=2, box=(4, 5, 6, 7))
    seed = target.seed(probs)
    assert seed[2, 2] == 1 and seed.sum() == 1 and target(probs) == np.float32(0.7)
    with pytest.raises(InputError, match=r"detection 2 \(class 1, score 0.55\) of output 'scores' is no entry of "
                                         r"'probs': give score= the tensor it was selected from"):
        detect.selected(sel, probs, {**outputs, "scores": np.float32([0.7, 0.7, 0.55])})


def _post_nms_graph(batched: bool) -> onnx.ModelProto:
    """A tiny stand-in for a whole-detector export: a Softmax over (1, 16, 4) anchor scores (batched) or (16, 4)
    region scores (Faster R-CNN-like), then Gathers picking 5 detections into boxes, scores and labels outputs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    pick = np.int64([3, 17, 40, 41, 63])
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.int64([1, 16, 4] if batched else [16, 4]), "shape"),
             numpy_helper.from_array(np.int64([-1]), "flat"), numpy_helper.from_array(np.int64([-1, 4]), "rows"),
             numpy_helper.from_array(pick, "pick"), numpy_helper.from_array(pick % 16, "which")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
             helper.make_node("Reshape", ["probs", "flat"], ["flat_probs"]),
             helper.make_node("Gather", ["flat_probs", "pick"], ["scores"]),
             helper.make_node("Reshape", ["c", "rows"], ["all_boxes"]),
             helper.make_node("Gather", ["all_boxes", "which"], ["boxes"], axis=0),
             helper.make_node("Identity", ["pick"], ["labels"])]
    graph = helper.make_graph(nodes, "post_nms", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [5, 4]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [5]),
                               helper.make_tensor_value_info("labels", TensorProto.INT64, [5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_post_nms_outputs_are_read_from_the_softmax_or_refused_in_one_line():
    """Outputs after a selection are traced back to the (N, A, C) Softmax they copy (the score explained, task
    detect); region scores without a batch axis (Faster R-CNN's) are one line naming the tensor and score=,
    instead of explaining the boxes output as class scores."""
    mg = ModelGraph(_post_nms_graph(batched=True), (1, 3, 8, 8))
    selection = choose.selection_of(mg)
    assert (selection.score, selection.anchors, selection.classes) == ("probs", 16, 4)
    assert mg.default_score() == "probs" and choose.task_of(mg, "probs") == "detect"
    assert mg.default_score(output="boxes") == "boxes"  # a named output is honoured
    mg = ModelGraph(_post_nms_graph(batched=False), (1, 3, 8, 8))
    assert choose.selection_of(mg) is None
    with pytest.raises(InputError, match=r"outputs 'boxes', 'scores', 'labels' are detections after NMS, but the "
                                         r"class scores they are selected from \('probs' of shape \(16, 4\)\) .*"
                                         r"give score= a tensor to explain"):
        mg.default_score()
