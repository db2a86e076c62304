"""Faster R-CNN exported whole (torchvision's fasterrcnn_mobilenet_v3_large_320_fpn: the RPN's TopK and NMS inside
If nodes, a RoiAlign per FPN level, the box head, per-class boxes and NMS again): the final detections are read
from its outputs, the (R, C) region scores they were selected from are explained as one image's (1, R, C) (R being
the run's own count of proposals: images with other counts share one explainer), the automatic layer is the neck's map feeding both FPN levels, and the gradient of a detection's score matches float64
torch autograd (forward hooks on the same model) through RoiAlign. The proposals are constants to the gradient, as
torchvision detaches them."""

from __future__ import annotations

import copy
import functools
import json
from collections import OrderedDict

import cv2
import numpy as np
import onnx
import pytest
import torch
import torchvision
from click.testing import CliRunner
from onnx import TensorProto, helper
from torch import nn

import onnxcam
from onnxcam import rewrite
from onnxcam.autodiff import builder
from onnxcam.autodiff.passes_regions import ROI_RULE, RULE
from onnxcam.cli import main
from onnxcam.errors import InputError, LayerError
from onnxcam.graph.model import ModelGraph
from onnxcam.runtime import cpu_session
from onnxcam.tasks import choose, detect

from .detectors import check_gradcam, close, conv_stage, export_whole, seed_batchnorm, two_targets

CLASSES = 5  # background + 4 classes
LAYER_MODULE = "model.backbone.fpn.inner_blocks.1.0"  # the FPN's lateral conv on the last stage: feeds both levels
LAYER = "/model/backbone/fpn/inner_blocks.1/inner_blocks.1.0/Conv_output_0"


class TinyBackbone(nn.Module):
    """Strides 8 and 16 through an FPN (16 channels): torchvision's Faster R-CNN on it exports in seconds."""

    def __init__(self):
        super().__init__()
        self.body, self.c3, self.c4 = nn.Sequential(conv_stage(3, 8), conv_stage(8, 16)), conv_stage(16, 24), conv_stage(24, 32)
        self.fpn = torchvision.ops.FeaturePyramidNetwork([24, 32], 16)
        self.out_channels = 16

    def forward(self, x):
        c3 = self.c3(self.body(x))
        return self.fpn(OrderedDict([("0", c3), ("1", self.c4(c3))]))


def _tiny() -> nn.Module:
    """torchvision's FasterRCNN (RPN, MultiScaleRoIAlign, box head, post-processing unchanged) on a small backbone.
    Anchors of 32 and 64 px at stride 8 and a canonical scale of 45 px send the regions to both FPN levels, split
    by the image's data (a 256 px input of torch.rand seed 1 gives 1 region at the first level, 86 at the second).
    Up to 100 proposals are kept after the RPN's NMS, which leaves fewer (a count per image: 87 for that input,
    64 for _dim(), 89 for the shape probe's)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    return FasterRCNN(TinyBackbone(), min_size=256, max_size=256,
                      rpn_anchor_generator=AnchorGenerator(((32, 64), (96, 128)), ((0.5, 1.0, 2.0),) * 2),
                      box_roi_pool=torchvision.ops.MultiScaleRoIAlign(["0", "1"], 7, 2, canonical_scale=45),
                      box_head=TwoMLPHead(16 * 49, 64), box_predictor=FastRCNNPredictor(64, CLASSES),
                      rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=100, box_detections_per_img=20)


def _mobilenet() -> nn.Module:
    """The model zoo's fasterrcnn_mobilenet_v3_large_320_fpn, untrained (both FPN levels at stride 32: every region
    goes to the first)."""
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=CLASSES)


NETS = {"tiny": (_tiny, 256), "mobilenet": (_mobilenet, 320)}


def _dim(x: torch.Tensor) -> torch.Tensor:
    """A dark, faintly noisy image of x's size: the tiny net's RPN keeps fewer proposals for it than for x."""
    return 0.05 * torch.rand(x.shape, generator=torch.Generator().manual_seed(9))


@functools.cache
def _exported(name: str):
    """A seeded Faster R-CNN (no weights), BatchNorm statistics and the class predictor made non-trivial (its
    fresh init scores every region alike), exported once: (torch model, ONNX bytes, input)."""
    build, size = NETS[name]
    torch.manual_seed(0)
    net = build()
    seed_batchnorm(net)
    g = torch.Generator().manual_seed(3)
    for p in net.roi_heads.box_predictor.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return export_whole(net, size)


@pytest.fixture(scope="module", params=["tiny", pytest.param("mobilenet", marks=pytest.mark.slow)])
def fasterrcnn(request):
    return _exported(request.param)


@pytest.fixture(scope="module")
def tiny_fasterrcnn():
    """The tiny net alone: the one set up to keep a count of regions that differs per image."""
    return _exported("tiny")


def _explained(fasterrcnn):
    _, onnx_model, x = fasterrcnn
    cam = onnxcam.GradCAM(model=onnx_model, device="cpu")
    selection = choose.selection_of(ModelGraph(onnx.load_from_string(onnx_model), tuple(x.shape)))
    return (cam, selection, *_first_run(cam, selection, x))


@pytest.fixture(scope="module")
def explained(fasterrcnn):
    """One GradCAM on the export, its selection and the first run's detections."""
    return _explained(fasterrcnn)


@pytest.fixture(scope="module")
def tiny_explained(tiny_fasterrcnn):
    return _explained(tiny_fasterrcnn)


def test_region_scores_are_explained_at_the_neck(fasterrcnn, explained):
    """The post-NMS outputs are recognised; the score explained is the (R, C) Softmax over the regions (no batch
    axis: explained as (1, R, C)); the task is detect, and the automatic layer is the FPN map feeding both levels
    (not a RoiAlign crop, not an RPN map: the proposals carry no gradient)."""
    _, onnx_model, x = fasterrcnn
    cam, selection, first, found = explained
    mg = ModelGraph(onnx.load_from_string(onnx_model), tuple(x.shape))
    assert selection.regions and selection.classes == CLASSES and selection.activation == "Softmax"
    score = mg.default_score()
    assert score == selection.score and mg.shape(mg.tensor(score)) == (selection.anchors, CLASSES)
    assert choose.task_of(mg, score, strict=True) == "detect"
    assert mg.default_layer(score) == LAYER == cam.explainer.layers[0]
    assert mg.layer_rule == "detect: the last map feeding all 2 head outputs (the neck)"
    levels = _regions_per_level(onnx_model, x)
    assert first.logits.shape == (1, sum(levels), CLASSES) and len(found) > 2
    assert selection.describe()["score_layout"] == f"(regions, {CLASSES}) after Softmax"
    assert selection.describe()["regions"] == "per image" and "anchors" not in selection.describe()
    if isinstance(fasterrcnn[0].model.backbone, TinyBackbone):  # both RoiAligns read regions: both on the path
        assert len(levels) == 2 and min(levels) > 0


def _regions_per_level(onnx_model: bytes, x: torch.Tensor) -> list[int]:
    """How many regions each RoiAlign reads for x (onnxruntime, the plain model)."""
    proto = onnx.load_from_string(onnx_model)
    rois = [n.input[1] for n in proto.graph.node if n.op_type == "RoiAlign"]
    proto.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in rois)
    sess = cpu_session(proto.SerializeToString())
    return [len(r) for r in sess.run(rois, {"images": x.numpy()})]


def _torch_forward(model, x) -> dict:
    """float64 forward of the whole model: its outputs (boxes, scores, labels) and, by forward hooks, the layer's
    activation (a), the box head's pre-ReLU values (fc6, fc7) and logits of every region, and the count of regions
    (proposals) the box head read."""
    md = copy.deepcopy(model).double()
    seen, mods = {}, dict(md.named_modules())
    hooks = [mods[name].register_forward_hook(lambda m, i, o, key=key: seen.__setitem__(key, o))
             for key, name in (("a", LAYER_MODULE), ("fc6", "model.roi_heads.box_head.fc6"),
                               ("fc7", "model.roi_heads.box_head.fc7"),
                               ("logits", "model.roi_heads.box_predictor.cls_score"))]
    hooks.append(mods["model.roi_heads.box_roi_pool"].register_forward_hook(
        lambda m, i, o: seen.__setitem__("regions", len(i[1][0]))))  # (features, proposals per image, sizes)
    seen["boxes"], seen["scores"], seen["labels"] = md(x.double())
    for h in hooks:
        h.remove()
    return seen


def _torch_detection(model, x, box, label):
    """float64: the layer's activation, the scores output's entry of the detection with this label whose box matches
    `box` (IoU > 0.99), the box head's pre-ReLU values of its region, and the count of regions."""
    seen = _torch_forward(model, x)
    same = torch.nonzero(seen["labels"] == label).flatten()
    overlaps = detect.box_iou(seen["boxes"][same].detach().numpy(), box)[:, 0]
    assert overlaps.max() > 0.99, "the float64 model lost the detection"
    score = seen["scores"][same[int(overlaps.argmax())]]
    probs = torch.softmax(seen["logits"], -1).detach()
    region = int(torch.argmin((probs[:, label] - score.detach()).abs()))  # the score is a copy of its entry
    return seen["a"], score, [seen["fc6"][region].detach().numpy(), seen["fc7"][region].detach().numpy()], \
        seen["regions"]


def test_detection_gradient_matches_float64_torch(fasterrcnn, explained):
    """The best detection (by index) and one picked by box + class are explained at the automatic layer; their
    scores' gradients and Grad-CAM maps match float64 autograd through torchvision's own RoiAlign, box head and
    post-processing. By construction: both detections' scores are clear of every other by far more than float32
    error (float64 keeps their ranks and selection), and their regions' box-head ReLU inputs are clear of 0."""
    model, _, x = fasterrcnn
    cam, selection, first, found = explained
    _check_two_detections(model, cam, selection, x, first, found)


def _check_two_detections(model, cam, selection, x, first, found) -> int:
    """test_detection_gradient_matches_float64_torch's check of x's best detection and one matched by box + class,
    given x's first run; returns the count of regions, the same in float64 torch as in the run."""
    targets, k = two_targets(selection, first, found)
    layer = cam.explainer.layers[0]
    for target, d in zip(targets, (found[0], found[k])):
        maps = cam(x.numpy(), targets=[target])
        act64, score64, relu_inputs, regions = _torch_detection(model, x, d.box, d.label)
        assert regions == first.logits.shape[1] == cam.result.logits.shape[1]
        assert all(np.abs(z).min() > 1e-4 * np.abs(z).max() for z in relu_inputs)
        assert abs(float(score64) - d.score) < 1e-5 and target(first.logits[0]) == d.score
        check_gradcam(cam, layer, act64, score64)
        assert maps.shape == (1, *x.shape[2:]) and np.ptp(cam.raw[layer]) > 0
    return first.logits.shape[1]


def _first_run(cam, selection, x: torch.Tensor):
    """x's run with a zero seed (reading the score; laid out on the probe's regions, which fits any count) and
    its detections."""
    first = cam.explainer.run(x.numpy(), seed=np.zeros((1, selection.anchors, selection.classes), np.float32))
    return first, detect.selected(selection, first.logits[0], first.outputs)


def test_images_with_fewer_regions_share_the_explainer(tiny_fasterrcnn, tiny_explained):
    """The region count is the run's: a dark image whose RPN keeps fewer proposals than x's (and than the shape
    probe's) is explained by the same built explainer, its detections' gradients matching float64 autograd, the
    selection checked equal, as for x (whose count differs from the probe's too)."""
    fasterrcnn, explained = tiny_fasterrcnn, tiny_explained
    model, onnx_model, x = fasterrcnn
    cam, selection, first, found = explained
    built = cam.explainer.compiled(tuple(x.shape), 1, by_class=False)
    dim_first, dim_found = _first_run(cam, selection, _dim(x))
    counts = [sum(_regions_per_level(onnx_model, x)), sum(_regions_per_level(onnx_model, _dim(x))),
              selection.anchors]
    assert len(set(counts)) == 3 and counts[1] < counts[0], counts
    assert [_check_two_detections(model, cam, selection, xi, f, d)
            for xi, f, d in ((_dim(x), dim_first, dim_found), (x, first, found))] == counts[1::-1]
    assert cam.explainer.compiled(tuple(x.shape), 1, by_class=False) is built


def test_a_seed_over_many_regions_matches_float64_torch(tiny_fasterrcnn, tiny_explained):
    """A seed weighting every class of most of the dark image's regions (its rows enter the graph at their regions)
    against float64 autograd of the same weighting of torch's (R, C) Softmax: each row must land on its own region.
    By construction: the regions weighted are those whose box-head ReLU inputs are all clear of 0."""
    fasterrcnn, explained = tiny_fasterrcnn, tiny_explained
    model, _, x = fasterrcnn
    cam, selection, _, _ = explained
    first, _ = _first_run(cam, selection, _dim(x))
    seen = _torch_forward(model, _dim(x))
    assert seen["regions"] == first.logits.shape[1]
    relu_inputs = torch.cat([seen["fc6"], seen["fc7"]], 1).detach().abs()
    clear = (relu_inputs.min(1).values > 1e-4 * relu_inputs.max()).numpy()
    assert clear.sum() > len(clear) // 2, clear.sum()
    weights = np.random.default_rng(0).standard_normal((1, len(clear), selection.classes)) * clear[None, :, None]
    dim = _dim(x).numpy()
    cam.maps_for(dim, cam.explainer.run(dim, seed=np.float32(weights)))
    score64 = (torch.from_numpy(weights[0]) * torch.softmax(seen["logits"], -1)).sum()
    check_gradcam(cam, cam.explainer.layers[0], seen["a"], score64)


def _gradient_at_layer(onnx_model: bytes, x: torch.Tensor, seed: np.ndarray, passes: tuple) -> tuple:
    """(the gradient at LAYER of <seed, (R, C) score> for x, the explainable model built with `passes` only, fed
    the seed's nonzero rows as the Explainer does; how many of its nodes passes_regions.region_rows and roi_rows
    emitted)."""
    every = builder.PASSES
    builder.PASSES = passes
    try:
        mg = ModelGraph(onnx.load_from_string(onnx_model), tuple(x.shape))
        rw = rewrite.build(mg, [LAYER], mg.default_score())
    finally:
        builder.PASSES = every
    regions = np.flatnonzero(np.any(seed, axis=1))
    feeds = {"images": x.numpy(), rewrite.REGIONS: regions[None], rewrite.ROWS: np.float32(seed[regions][None])}
    grad = cpu_session(rw.model.SerializeToString(), rw.weights).run([rewrite.grad_name(LAYER)], feeds)[0]
    rules = [json.loads(n.doc_string)[rewrite.ORIGIN]["rule"] for n in rw.model.graph.node
             if n.doc_string.startswith("{")]
    return grad, rules.count(RULE), rules.count(ROI_RULE)


def test_box_head_gradient_runs_on_the_seeded_rows_only(fasterrcnn, explained):
    """passes_regions.region_rows: the box head's gradient (Flatten, fc6, fc7, their ReLUs, the class Gemm, the
    Softmax) runs on the seeded regions' rows, gathered from the run's R, and is added back into RoiAlign's R crops;
    roi_rows: RoiAlign's gradient runs on the regions whose crops carry one. For x's best detection and for a seed
    over every region, the gradient at the layer is the one of the model built without either pass (float32 alike
    up to summation order), whose values the tests above hold to float64 torch (as they do the default build)."""
    _, onnx_model, x = fasterrcnn
    _, selection, first, found = explained
    probs = first.logits[0]
    seeds = [selection.seed(probs, found[0].anchor, found[0].label),
             np.random.default_rng(1).standard_normal(probs.shape)]
    without = tuple(p for p in builder.PASSES if p not in ("region_rows", "roi_rows"))
    for seed in seeds:
        got, *emitted = _gradient_at_layer(onnx_model, x, seed, builder.PASSES)
        want, *none = _gradient_at_layer(onnx_model, x, seed, without)
        assert min(emitted) > 0 and none == [0, 0] and np.abs(want).max() > 0
        close(got, want, 1e-5)


def test_seeds_of_other_regions_and_bad_indices_are_refused(tiny_fasterrcnn, tiny_explained):
    """One line each: a seed laid out on another run's regions, class targets (per-region scores need a seed), a
    detection index beyond the run's detections, and ShapleyCAM (its second derivatives take a dense seed)."""
    fasterrcnn, explained = tiny_fasterrcnn, tiny_explained
    _, onnx_model, x = fasterrcnn
    cam, selection, first, found = explained
    dim = _dim(x).numpy()
    seed = selection.seed(first.logits[0], found[0].anchor, found[0].label)[None]  # x's regions
    with pytest.raises(InputError, match=rf"^the seed covers {seed.shape[1]} regions, but this run's per-region "
                                         r"score has \d+ \(the count of regions is the run's\): build the seed from "
                                         r"this run's score \(Result.logits, shape \(1, \d+, 5\)\)$"):
        cam.explainer.run(dim, seed=seed)
    with pytest.raises(InputError, match=r"^the score holds per-region scores \(1, regions, 5\), whose regions are "
                                         r"the run's: give a seed shaped like one run's score"):
        cam.explainer.run(dim, targets=1)
    dim_first, dim_found = _first_run(cam, selection, _dim(x))
    n = len(dim_found)
    with pytest.raises(InputError, match=rf"^detection index {n} is out of range: the model returned {n} detections "
                                         rf"\(index 0 to {n - 1}\) in output 'scores'$"):
        detect.SelectedDetectionTarget(selection, dim_first.outputs, index=n)
    with pytest.raises(LayerError, match=r"^the score tensor '/model/roi_heads/Softmax_output_0' holds per-region "
                                         r"scores, seeded on each run's own regions: second derivatives "
                                         r"\(ShapleyCAM\)"):
        onnxcam.ShapleyCAM(model=onnx_model, device="cpu")(dim, targets=[seed[0]])


def test_cli_explains_fasterrcnn_with_labelled_boxes_and_json(fasterrcnn, explained, tmp_path):
    """`onnxcam explain --task detect` on the whole export: detections read after its NMS, drawn as labelled
    boxes, one overlay per detection above --conf, the JSON naming the per-region score layout."""
    _, onnx_model, x = fasterrcnn
    _, _, _, found = explained
    model_path = tmp_path / "fasterrcnn.onnx"
    model_path.write_bytes(onnx_model)
    picture = tmp_path / "street.png"
    cv2.imwrite(str(picture), np.uint8(np.round(x[0].permute(1, 2, 0).numpy()[:, :, ::-1] * 255)))
    out = tmp_path / "out"
    conf = found[-1].score / 2  # every detection is above it; --top keeps the best two
    res = CliRunner().invoke(main, ["explain", str(model_path), str(picture), "--task", "detect", "--mean", "0,0,0",
                                    "--std", "1,1,1", "--out", str(out), "--device", "cpu", "--conf", f"{conf:.6f}",
                                    "--top", "2"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "street.json").read_text())
    assert record["task"] == "detect" and record["decoding"]["decode"] == "selected"
    assert record["decoding"]["score_layout"] == f"(regions, {CLASSES}) after Softmax"
    dets = record["detections"]
    assert len(dets) == 2 and all(d["score"] > conf and len(d["box"]) == 4 for d in dets)
    assert (out / "street.detect.png").exists() and all((out / d["overlay"]).exists() for d in dets)


def _write_picture(x: torch.Tensor, path) -> torch.Tensor:
    """x as a PNG; returns the input the command line will read back from it (8-bit values)."""
    pixels = np.uint8(np.round(x[0].permute(1, 2, 0).numpy() * 255))
    cv2.imwrite(str(path), pixels[:, :, ::-1])
    return torch.from_numpy(np.float32(pixels / 255.0)).permute(2, 0, 1)[None]


def test_cli_explains_an_image_with_fewer_regions(tiny_fasterrcnn, tiny_explained, tmp_path):
    """The command line on the dark image, whose RPN keeps fewer regions than the shape probe's: its pictures and
    JSON are written; a method making runs of its own is refused in one line naming the option."""
    fasterrcnn, explained = tiny_fasterrcnn, tiny_explained
    _, onnx_model, x = fasterrcnn
    _, selection, _, _ = explained
    model_path = tmp_path / "fasterrcnn.onnx"
    model_path.write_bytes(onnx_model)
    read = _write_picture(_dim(x), tmp_path / "dark.png")
    assert sum(_regions_per_level(onnx_model, read)) < selection.anchors
    out = tmp_path / "out"
    args = ["explain", str(model_path), str(tmp_path / "dark.png"), "--task", "detect", "--mean", "0,0,0", "--std",
            "1,1,1", "--out", str(out), "--device", "cpu", "--conf", "0.01", "--top", "3"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    record = json.loads((out / "dark.json").read_text())
    dets = record["detections"]
    assert len(dets) == 3 and (out / "dark.detect.png").exists()
    assert all((out / d["overlay"]).exists() if d["zero_map"] is None else "overlay" not in d for d in dets)
    assert any(d["zero_map"] is None for d in dets)
    res = CliRunner().invoke(main, [*args, "--method", "scorecam"])
    assert res.exit_code != 0 and res.output.count("\n") == 1, res.output
    assert res.output.startswith("Error: method scorecam makes runs of its own; the per-region scores "
                                 f"{selection.score!r} are explained in the image's own run only"), res.output


def test_region_scores_need_a_batch_of_one_image():
    """Per-region scores of a model whose batch is free: the regions' images are unknown, one line says so."""
    nodes = [helper.make_node("RoiAlign", ["x", "rois", "idx"], ["crops"], output_height=2, output_width=2,
                              sampling_ratio=2),
             helper.make_node("Flatten", ["crops"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    inits = [helper.make_tensor("rois", TensorProto.FLOAT, [3, 4], np.float32(np.arange(12) % 5).ravel()),
             helper.make_tensor("idx", TensorProto.INT64, [3], [0, 0, 0]),
             helper.make_tensor("w", TensorProto.FLOAT, [12, 4], np.float32(np.linspace(-1, 1, 48)))]
    graph = helper.make_graph(nodes, "regions", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                               ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    mg = ModelGraph(model, ("N", 3, 8, 8))
    assert mg.per_region(mg.tensor("probs")) and not mg.per_region(mg.tensor("x"))
    with pytest.raises(LayerError, match=r"the score tensor 'probs' holds per-region scores \(3, 4\) computed from "
                                         r"RoiAlign's regions, with no batch axis: the model's input must be one "
                                         r"image \(a fixed batch of 1\), but 'x' is \(N, 3, 8, 8\)"):
        rewrite.build(mg, ["x"], "probs")
