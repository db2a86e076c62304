"""Numerical checks of onnxcam/autodiff/rules/roi.py: RoiAlign's gradient with respect to its feature map.

RoiAlign (mode 'avg') is linear in X, so finite differences are exact up to rounding (CASES, gradcheck's adjoint test
against onnx's float64 evaluator) and the gradient is compared with float64 torchvision.ops.roi_align autograd.
Sampling positions depend on the regions only; they are checked to lie away from the one discontinuity, the
validity bounds -1 and H (W), so float32 and float64 read the same samples by construction. Regions: inside,
partly and wholly outside the image, tiny (below one pixel, the legacy mode's minimum size), on both images of a
batch of 2; both coordinate modes; fixed and adaptive sampling.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from onnx import TensorProto, helper

from onnxcam import rewrite
from onnxcam.errors import UnsupportedOpError
from onnxcam.graph.model import ModelGraph
from onnxcam.runtime import cpu_session

from .autodiff.gradcheck import Case, check_case, onnxcam_gradients

rng = np.random.default_rng(21)
X = rng.standard_normal((2, 3, 9, 11))
ROIS = np.array([[1.3, 0.7, 7.9, 6.2],      # inside
                 [-3.1, -2.2, 4.4, 3.3],    # over the top-left corner
                 [5.2, 4.1, 5.6, 4.3],      # tiny: under one pixel
                 [8.3, 6.6, 14.7, 12.9],    # over the bottom-right corner
                 [-9.4, -8.7, -4.1, -5.3],  # wholly outside: reads nothing
                 [0.2, 0.1, 10.6, 8.7]], np.float32)
BATCH = np.array([0, 1, 1, 0, 1, 1], np.int64)
SCALE, PH, PW = 0.9, 3, 4
MODES = {"output_half_pixel": False, "half_pixel": True}  # ONNX mode -> torchvision's `aligned`


def roi_case(mode: str, ratio: int, opset: int = 17, rois=ROIS, batch=BATCH) -> Case:
    return Case("RoiAlign", {"X": X, "rois": rois, "batch_indices": batch}, ["X"],
                {"coordinate_transformation_mode": mode, "output_height": PH, "output_width": PW,
                 "sampling_ratio": ratio, "spatial_scale": SCALE}, opset, id=f"RoiAlign-{mode}-ratio{ratio}")


CASES = [roi_case(mode, ratio) for mode in MODES for ratio in (2, 0)]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule_against_finite_differences(case):
    check_case(case)


def _sample_positions(lo, hi, pooled, ratio, aligned):
    """One axis's sampling positions of a region, as torchvision and onnxruntime compute them (float64)."""
    offset = 0.5 if aligned else 0.0
    start, end = lo * SCALE - offset, hi * SCALE - offset
    size = end - start if aligned else max(end - start, 1.0)
    grid = ratio if ratio > 0 else int(np.ceil(size / pooled))
    return [start + p * size / pooled + (i + 0.5) * size / pooled / grid for p in range(pooled) for i in range(grid)]


def _assert_clear_of_bounds(rois: np.ndarray, ratio: int, aligned: bool) -> None:
    """Every sample clear of the validity bounds -1 and H (W): float32 and float64 read the same samples."""
    for (x1, y1, x2, y2) in rois:
        for pos, extent in ((_sample_positions(y1, y2, PH, ratio, aligned), X.shape[2]),
                            (_sample_positions(x1, x2, PW, ratio, aligned), X.shape[3])):
            assert min(min(abs(p + 1), abs(p - extent)) for p in pos) > 1e-3


@pytest.mark.parametrize("ratio", [2, 0])
@pytest.mark.parametrize("mode", list(MODES))
def test_rule_matches_float64_torchvision(mode, ratio):
    aligned = MODES[mode]
    _assert_clear_of_bounds(np.float64(ROIS), ratio, aligned)
    u = rng.standard_normal((len(ROIS), X.shape[1], PH, PW))
    got = onnxcam_gradients(roi_case(mode, ratio), u)["X"]
    x = torch.tensor(X, requires_grad=True)
    boxes = torch.tensor(np.c_[BATCH, np.float64(ROIS)])
    y = torchvision.ops.roi_align(x, boxes, (PH, PW), SCALE, ratio, aligned)
    (y * torch.tensor(u)).sum().backward()
    want = x.grad.numpy()
    assert np.abs(want[1]).max() > 0 and np.abs(want[0]).max() > 0  # both images are read
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_no_regions_give_a_zero_gradient():
    """A level of a multi-scale RoiAlign that gets no regions (Faster R-CNN's FPN levels): zeros, not an error."""
    case = roi_case("output_half_pixel", 0, rois=np.zeros((0, 4), np.float32), batch=np.zeros(0, np.int64))
    got = onnxcam_gradients(case, np.zeros((0, 3, PH, PW)))["X"]
    assert got.shape == X.shape and not got.any()


def _model(mode_attrs: dict, opset: int = 17, rois_from_x: bool = False):
    """X -> RoiAlign over ROIS (or over ROIS moved by the mean of X, regions computed from the features)."""
    nodes, inits = [], [helper.make_tensor("rois0", TensorProto.FLOAT, ROIS.shape, ROIS.ravel()),
                        helper.make_tensor("batch", TensorProto.INT64, BATCH.shape, BATCH)]
    rois = "rois0"
    if rois_from_x:
        inits.append(helper.make_tensor("k", TensorProto.FLOAT, [], [0.5]))
        nodes += [helper.make_node("ReduceMean", ["X"], ["mean"], keepdims=0),
                  helper.make_node("Mul", ["mean", "k"], ["shift"]),
                  helper.make_node("Add", ["rois0", "shift"], ["rois"])]
        rois = "rois"
    nodes.append(helper.make_node("RoiAlign", ["X", rois, "batch"], ["Y"], name="pool", output_height=PH,
                                  output_width=PW, spatial_scale=SCALE, **mode_attrs))
    graph = helper.make_graph(nodes, "roi", [helper.make_tensor_value_info("X", TensorProto.FLOAT, X.shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_regions_computed_from_the_features_are_constants_to_the_gradient():
    """Regions that depend on X (the RPN's proposals do, in an exported detector) get no gradient: the score's
    gradient is the one through the values read, as in torchvision, which detaches its proposals."""
    model = _model({"sampling_ratio": 2}, rois_from_x=True)
    rw = rewrite.build(ModelGraph(model), ["X"], "Y")
    sess = cpu_session(rw.model.SerializeToString(), rw.initializer_arrays())
    u = rng.standard_normal((len(ROIS), X.shape[1], PH, PW))
    got = sess.run([rewrite.grad_name("X")], {"X": np.float32(X), rewrite.SEED: np.float32(u)[:, None]})[0]
    x = torch.tensor(X, requires_grad=True)
    rois = torch.tensor(np.float64(ROIS)) + 0.5 * x.mean()
    _assert_clear_of_bounds(rois.detach().numpy(), 2, True)
    y = torchvision.ops.roi_align(x, torch.cat([torch.tensor(BATCH, dtype=torch.float64)[:, None], rois.detach()],
                                               1), (PH, PW), SCALE, 2, True)  # RoiAlign-16's default: half_pixel
    (y * torch.tensor(u)).sum().backward()
    assert np.abs(got - x.grad.numpy()).max() <= 1e-5 * np.abs(x.grad.numpy()).max()


@pytest.mark.parametrize("attrs, opset, message", [
    ({"mode": "max"}, 17, r"RoiAlign node 'pool' \(opset 17\) has mode 'max'; only mode 'avg' is differentiated"),
    ({}, 10, r"RoiAlign node 'pool' \(opset 10\) needs Range \(opset 11\+\)"),
])
def test_forms_without_a_rule_are_refused_in_one_line(attrs, opset, message):
    with pytest.raises(UnsupportedOpError, match=message):
        rewrite.build(ModelGraph(_model({"sampling_ratio": 2, **attrs}, opset)), ["X"], "Y")
