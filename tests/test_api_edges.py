"""The Python API (the CAM classes) on Faster R-CNN's per-region scores and on CTC text recognizers: a right answer
against float64 torch, or one line naming what to do instead.

- A seed array given as a target on an image whose count of regions (its own proposals) differs from the one the
  CAM object saw last is checked against that image's own run, not a remembered score shape.
- Methods whose runs of their own change the regions (masked or noisy inputs, aug_smooth, Ablation-CAM rerunning
  the RPN after its layer) are refused for per-region scores: a row's score there is another region's. Where the
  regions provably stay (computed from nothing the method changes), Ablation-CAM explains them, checked against a
  float64 torch ablation.
- targets=None on a recognizer explains the decoded string (the command line's text-line map), with every method.
"""

from __future__ import annotations

import copy
import functools
import re

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper

import onnxcam
from onnxcam.cam.torchcam_methods import ISCAM, SSCAM, SmoothGradCAMpp
from onnxcam.errors import InputError
from onnxcam.graph.model import ModelGraph
from onnxcam.tasks import choose, detect, ocr

from .detectors import check_gradcam
from .test_cli_ocr import _float64_scores, _line, _raw_gradcam
from .test_tasks_fasterrcnn import _dim, _exported, _first_run, _torch_forward
from .test_tasks_ocr import _crnn, _export

SCORE = "/model/roi_heads/Softmax_output_0"


# ---- Faster R-CNN -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fasterrcnn():
    """test_tasks_fasterrcnn.py's tiny Faster R-CNN (seeded, exported once), its selection, and a GradCAM on it
    that has explained x's best detection (so it has seen x's count of regions)."""
    model, onnx_model, x = _exported("tiny")
    selection = choose.selection_of(ModelGraph(onnx.load_from_string(onnx_model), tuple(x.shape)))
    cam = onnxcam.GradCAM(model=onnx_model, device="cpu")
    first, _ = _first_run(cam, selection, x)
    cam(x.numpy(), targets=[detect.SelectedDetectionTarget(selection, first.outputs, index=0)])
    return model, onnx_model, x, selection, cam


def test_a_seed_array_fits_the_image_own_regions(fasterrcnn):
    """cam(dim, targets=[seed]) with a dense (R, C) seed laid out on the dark image's own run, after the same CAM
    explained x (another count of regions): the map is that weighting's, against float64 autograd of the same
    weighting of torch's (R, C) Softmax. By construction: only regions whose box-head ReLU inputs are all clear of 0
    are weighted. A seed laid out on x's regions is refused in one line by the run (it names the counts)."""
    model, _, x, selection, cam = fasterrcnn
    dim = _dim(x).numpy()
    seen_before = cam.result.logits.shape[1]
    first, _ = _first_run(cam, selection, _dim(x))
    regions = first.logits.shape[1]
    assert regions not in (seen_before, selection.anchors), (regions, seen_before, selection.anchors)
    seen = _torch_forward(model, _dim(x))
    assert seen["regions"] == regions
    relu_inputs = torch.cat([seen["fc6"], seen["fc7"]], 1).detach().abs()
    clear = (relu_inputs.min(1).values > 1e-4 * relu_inputs.max()).numpy()
    assert clear.sum() > len(clear) // 2
    weights = np.random.default_rng(1).standard_normal((regions, selection.classes)) * clear[:, None]
    cam(dim, targets=[np.float32(weights)])
    assert cam.result.logits.shape == (1, regions, selection.classes)
    score64 = (torch.from_numpy(weights) * torch.softmax(seen["logits"], -1)).sum()
    check_gradcam(cam, cam.explainer.layers[0], seen["a"], score64)
    with pytest.raises(InputError, match=rf"^the seed covers {seen_before} regions, but this run's per-region score "
                                         rf"has {regions} \(the count of regions is the run's\)"):
        cam(dim, targets=[np.ones((seen_before, selection.classes), np.float32)])
    with pytest.raises(InputError, match=r"^the per-region scores '.*' are one image's regions, a count of their own "
                                         r"per image: explain one image per call, not 2$"):
        cam(np.concatenate([dim, dim]), targets=[np.float32(weights)] * 2)


REFUSED = {
    "ScoreCAM": (onnxcam.ScoreCAM, "ScoreCAM makes runs of its own on changed copies of the input", "the input"),
    "SSCAM": (SSCAM, "SSCAM makes runs of its own on changed copies of the input", "the input"),
    "ISCAM": (ISCAM, "ISCAM makes runs of its own on changed copies of the input", "the input"),
    "SmoothGradCAMpp": (SmoothGradCAMpp, "SmoothGradCAMpp makes runs of its own on changed copies of the input",
                        "the input"),
    "AblationCAM": (onnxcam.AblationCAM, "AblationCAM reruns the model after its layers with channels ablated",
                    "layer '/model/backbone/fpn/inner_blocks.1/inner_blocks.1.0/Conv_output_0'"),
    "aug_smooth": (onnxcam.GradCAM, "aug_smooth explains flipped and brightened copies of the input", "the input"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_methods_that_change_the_regions_are_refused(fasterrcnn, name):
    """Each method whose own runs read other regions (the RPN reads the input, and the automatic layer) is refused
    in one line naming the method, the score, the RoiAlign and what its regions are computed from."""
    _, onnx_model, x, selection, cam = fasterrcnn
    cls, what, source = REFUSED[name]
    dim = _dim(x).numpy()
    first, _ = _first_run(cam, selection, _dim(x))
    seed = np.zeros(first.logits.shape[1:], np.float32)
    seed[0, 1] = 1
    method = cam if name == "aug_smooth" else cls(model=onnx_model, device="cpu")
    fix = "leave aug_smooth off" if name == "aug_smooth" else \
        "use a method that explains the image's own run (GradCAM, HiResCAM, ...)"
    message = (f"{what}, but the per-region scores {SCORE!r} are rows of the regions each run proposes (RoiAlign "
               f"'/model/roi_heads/box_roi_pool/RoiAlign' reads regions computed from {source}): a row's score in "
               f"another run would be another region's; {fix}")
    with pytest.raises(InputError, match=f"^{re.escape(message)}$") as caught:
        method(dim, targets=[seed], aug_smooth=name == "aug_smooth")
    assert caught.value.option == ("aug_smooth" if name == "aug_smooth" else "method")


# ---- per-region scores whose regions do not depend on the layer -------------------------------------------------
C_IN, C_LAYER, REGIONS, CLASSES, SIZE = 3, 4, 3, 5, 12
_rng = np.random.default_rng(5)
W_CONV = np.float32(_rng.standard_normal((C_LAYER, C_IN, 3, 3)) * 0.5)
W_FC = np.float32(_rng.standard_normal((C_LAYER * 4, CLASSES)))
BASE_ROIS = np.float32([[1.3, 0.9, 8.2, 7.4], [3.1, 2.6, 10.4, 9.9], [0.6, 4.2, 6.8, 10.7]])
ROI_SHIFT = np.float32([[0.5, 0.25, 0.5, 0.25]] * REGIONS)  # the regions move with the input's mean


@functools.cache
def _regions_beside_the_layer() -> bytes:
    """x (1, 3, 12, 12) -> Conv -> Relu ('layer') -> RoiAlign at regions computed from x's mean (not from the
    layer) -> Flatten -> Gemm: per-region logits (3, 5) whose regions an ablation of 'layer' keeps."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["layer"]),
             helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "shift"], ["moved"]),
             helper.make_node("Add", ["base", "moved"], ["rois"]),
             helper.make_node("RoiAlign", ["layer", "rois", "idx"], ["crops"], output_height=2, output_width=2,
                              sampling_ratio=2, coordinate_transformation_mode="output_half_pixel"),
             helper.make_node("Flatten", ["crops"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"])]
    inits = [helper.make_tensor(name, TensorProto.FLOAT, a.shape, a.ravel())
             for name, a in (("w", W_CONV), ("shift", ROI_SHIFT), ("base", BASE_ROIS), ("fc", W_FC))]
    inits.append(helper.make_tensor("idx", TensorProto.INT64, [REGIONS], [0] * REGIONS))
    graph = helper.make_graph(nodes, "regions", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                               [1, C_IN, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [REGIONS, CLASSES])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def _torch_tail(layer: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float64: the model after 'layer' (the regions from x)."""
    rois = torch.from_numpy(np.float64(BASE_ROIS)) + x.mean() * torch.from_numpy(np.float64(ROI_SHIFT))
    boxes = torch.cat([torch.zeros(REGIONS, 1, dtype=torch.float64), rois], 1)
    crops = torchvision.ops.roi_align(layer, boxes, 2, 1.0, 2, aligned=False)
    return crops.flatten(1) @ torch.from_numpy(np.float64(W_FC))


def test_ablation_keeps_regions_that_do_not_depend_on_the_layer():
    """Ablation-CAM at a layer the regions are not computed from: its reruns of the model after the layer read the
    image's own regions, so it explains a seed array's weighting of them (the map against a float64 torch
    ablation: each channel set to Ablation-CAM's fill, the weighted score's relative drop). Score-CAM, whose masked
    inputs move the regions (computed from the input), is refused."""
    model = _regions_beside_the_layer()
    x = np.float32(np.random.default_rng(7).standard_normal((1, C_IN, SIZE, SIZE)))
    weights = np.float32(np.random.default_rng(8).standard_normal((REGIONS, CLASSES)))
    cam = onnxcam.AblationCAM(model, ["layer"], device="cpu")
    cam(x, targets=[weights])
    x64 = torch.from_numpy(np.float64(x))
    a = torch.relu(torch.nn.functional.conv2d(x64, torch.from_numpy(np.float64(W_CONV)), padding=1))
    w64 = torch.from_numpy(np.float64(weights))
    y = float((w64 * _torch_tail(a, x64)).sum())
    fill = 0.0 if float(a.min()) == 0 else float(a.min()) - 1e7
    drops = []
    for c in range(C_LAYER):
        ablated = a.clone()
        ablated[:, c] = fill
        drops.append((y - float((w64 * _torch_tail(ablated, x64)).sum())) / y)
    want = (torch.tensor(drops)[:, None, None] * a[0]).sum(0).numpy()
    assert abs(y) > 0.1 and np.ptp(want) > 0
    np.testing.assert_allclose(cam.raw["layer"][0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert cam.outputs.shape == (1, REGIONS, CLASSES)
    with pytest.raises(InputError, match=r"^ScoreCAM makes runs of its own on changed copies of the input, but the "
                                         r"per-region scores 'logits' are rows of the regions each run proposes "
                                         r"\(RoiAlign '.*' reads regions computed from the input\)"):
        onnxcam.ScoreCAM(model, ["layer"], device="cpu")(x, targets=[weights])


# ---- recognizers: targets=None is the decoded string ------------------------------------------------------------
def test_no_targets_on_a_recognizer_explain_the_decoded_string():
    """GradCAM(crnn)(x) with no targets: the decoded string's map (ocr.StringTarget, the command line's text-line
    map), against float64 torch; on a batch of two, each sample's own string is seeded on its column of the
    (T, N, C) score."""
    _, model_bytes, xs = _crnn()
    x = _line()[1]
    cam = onnxcam.GradCAM(model_bytes, device="cpu")
    cam(x)
    want = _raw_gradcam(x, ocr.StringTarget())
    np.testing.assert_allclose(cam.raw[cam.target_layers[0]][0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    cam(xs)
    scores = cam.result.logits
    np.testing.assert_array_equal(cam.result.seed, np.stack([ocr.StringTarget().seed(scores[:, i])
                                                             for i in range(2)], axis=1))
    assert all(ocr.greedy_decode(scores[:, i]) for i in range(2))


def test_no_targets_on_a_recognizer_with_methods_of_their_own_runs():
    """Score-CAM scores its masked inputs by the input's own decoded string (frozen); Smooth Grad-CAM++'s clean run
    seeds that string; Ablation-CAM's map is a float64 torch ablation of the backbone's pooled strip scored by that
    string (its (T, B, C) reruns read per copy, not per time step)."""
    model, model_bytes, _ = _crnn()
    x = _line()[1]
    string = ocr.StringTarget().seed(_float64_scores(x))
    score = onnxcam.ScoreCAM(model_bytes, device="cpu")
    score(x)
    np.testing.assert_array_equal(score._call.numpy_targets[0].weights, string)
    smooth = SmoothGradCAMpp(model_bytes, device="cpu", rng=0)
    smooth(x)
    np.testing.assert_array_equal(smooth.result.seed[:, 0], string)  # (T, N, C): the sample's column
    cam = onnxcam.AblationCAM(model_bytes, device="cpu")
    cam(x)
    want = _ablation64(model, x, string)
    np.testing.assert_allclose(cam.raw[cam.target_layers[0]][0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_smooth_gradcampp_scores_the_inputs_own_string_on_its_noisy_copies(monkeypatch):
    """Smooth Grad-CAM++ with a CTC target: its noisy copies are seeded with the input's own decoded string (frozen
    at the clean scores, as a class index stays the same class), not each copy's decoding, and take one run (no
    decoding run): 3 runs in all (the clean run's decoding and seeded run, then the copies'). The noise here is
    strong enough that some copies decode to other strings."""
    _, model_bytes, _ = _crnn()
    x = _line()[1]
    smooth = SmoothGradCAMpp(model_bytes, device="cpu", rng=0, std=3.0, num_samples=4)
    runs = []
    real = type(smooth.explainer).run

    def spy(self, inputs, *args, **kwargs):
        out = real(self, inputs, *args, **kwargs)
        runs.append((len(inputs), kwargs.get("seed"), out.logits))
        return out

    monkeypatch.setattr(type(smooth.explainer), "run", spy)
    smooth(x, targets=[ocr.StringTarget()])
    assert [n for n, _, _ in runs] == [1, 1, 4]
    string = ocr.StringTarget().seed(runs[0][2][:, 0])
    noisy_seed, noisy_scores = runs[2][1], runs[2][2]  # (T, copies, C)
    for s in range(4):
        np.testing.assert_array_equal(noisy_seed[:, s], string)
    assert any(ocr.greedy_decode(noisy_scores[:, s]) != ocr.greedy_decode(runs[0][2][:, 0]) for s in range(4))


def _ablation64(model, x: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """float64 Ablation-CAM of sum(seed * scores) at the CRNN's pooled strip (forward hooks replace its output)."""
    md = copy.deepcopy(model).double()
    pool = md.backbone[4]
    x64, s64 = torch.from_numpy(np.float64(x)), torch.from_numpy(np.float64(seed))[:, None]
    kept = {}
    handle = pool.register_forward_hook(lambda m, i, o: kept.setdefault("a", o))
    with torch.no_grad():
        y = float((s64 * md(x64)).sum())
    handle.remove()
    a = kept["a"]
    fill = 0.0 if float(a.min()) == 0 else float(a.min()) - 1e7
    drops = []
    for c in range(a.shape[1]):
        ablated = a.clone()
        ablated[:, c] = fill
        handle = pool.register_forward_hook(lambda m, i, o, v=ablated: v)
        with torch.no_grad():
            drops.append((y - float((s64 * md(x64)).sum())) / y)
        handle.remove()
    assert abs(y) > 1
    return (torch.tensor(drops, dtype=torch.float64)[:, None, None] * a[0]).sum(0).numpy()


def test_no_targets_on_a_recognizer_that_decodes_nothing_is_one_line():
    """A recognizer whose every time step's best class is the blank: nothing to explain, one line."""
    model, _, xs = _crnn()
    blank = copy.deepcopy(model)
    with torch.no_grad():
        blank.fc.bias[0] = 1e3
    model_bytes = _export(blank, (torch.tensor(xs[:1]),), ["x"])
    with pytest.raises(InputError, match=r"^the scores decode to no characters \(every time step's best class is the "
                                         r"blank 0\): nothing to explain"):
        onnxcam.GradCAM(model_bytes, device="cpu")(xs[:1])
