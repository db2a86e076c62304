"""Targets: each one's seed (its gradient with respect to one sample's output), the checks on target lists, and
parity with pytorch-grad-cam for the targets that need other model shapes (segmentation, single-logit)."""

from __future__ import annotations

import io

import numpy as np
import pytest

import onnxcam
from onnxcam.targets import (
    BinaryClassifierOutputTarget,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
    RawScoresOutputTarget,
    SemanticSegmentationTarget,
    as_target,
)
from tests.test_cam_closed_forms import RELU, tiny_model


def numeric_gradient(f, out: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    out = out.astype(np.float64)
    grad = np.zeros_like(out)
    for i in np.ndindex(out.shape):
        step = np.zeros_like(out)
        step[i] = eps
        grad[i] = (f(out + step) - f(out - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize("target", [ClassifierOutputTarget(2), ClassifierOutputSoftmaxTarget(2),
                                    ClassifierOutputSoftmaxTarget(0), RawScoresOutputTarget()])
def test_seed_is_the_gradient_of_the_target(target):
    out = np.random.default_rng(0).standard_normal(5).astype(np.float32)
    want = numeric_gradient(lambda o: np.sum(target(o)), out)
    np.testing.assert_allclose(target.seed(out), want, atol=1e-5)


def test_binary_and_segmentation_seeds():
    np.testing.assert_array_equal(BinaryClassifierOutputTarget(1).seed(np.zeros(1)), [1])
    np.testing.assert_array_equal(BinaryClassifierOutputTarget(0).seed(np.zeros(1)), [-1])
    mask = np.zeros((4, 4), bool)
    mask[1:3, 2:] = True
    target = SemanticSegmentationTarget(1, mask)
    out = np.random.default_rng(0).standard_normal((3, 4, 4))
    seed = target.seed(out)
    assert seed.shape == out.shape and seed[1].sum() == 4 and seed[[0, 2]].sum() == 0
    assert np.isclose(target(out), (seed * out).sum())


@pytest.mark.parametrize("target, output, match", [
    (ClassifierOutputTarget(5), np.zeros(5), "out of range"),
    (ClassifierOutputTarget(1), np.zeros((3, 4, 4)), "SemanticSegmentationTarget"),
    (BinaryClassifierOutputTarget(1), np.zeros(3), "one output value"),
    (SemanticSegmentationTarget(0, np.ones((2, 2))), np.zeros((3, 4, 4)), "mask"),
])
def test_seed_errors_name_the_target(target, output, match):
    with pytest.raises(onnxcam.InputError, match=match):
        target.seed(output)


def test_as_target_accepts_ints_arrays_and_foreign_targets_by_name():
    assert as_target(3).category == 3
    seed = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(as_target(seed).seed(np.zeros(5)), seed)

    class ClassifierOutputSoftmaxTarget:  # pytorch-grad-cam's, as far as onnxcam can tell
        def __init__(self, category):
            self.category = category

        def __call__(self, model_output):
            raise AssertionError("torch code never runs")

    adapted = as_target(ClassifierOutputSoftmaxTarget(1))
    assert type(adapted).__module__ == "onnxcam.cam.targets" and adapted.category == 1 and adapted.needs_output
    with pytest.raises(TypeError, match="seed"):
        as_target(lambda output: output[0])


@pytest.fixture(scope="module")
def cam():
    return onnxcam.HiResCAM(tiny_model("gap"), [RELU], device="cpu")


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)


def test_target_list_must_match_the_batch(cam, x):
    with pytest.raises(ValueError, match="2 samples"):
        cam(x, [ClassifierOutputTarget(1)])
    with pytest.raises(ValueError, match="2 samples"):
        cam(x, [1, 2, 3])


def test_int_targets_and_seed_arrays_equal_class_targets(cam, x):
    want = cam(x, [ClassifierOutputTarget(1), ClassifierOutputTarget(4)])
    np.testing.assert_array_equal(cam(x, [1, 4]), want)
    np.testing.assert_array_equal(cam(x, [np.eye(5, dtype=np.float32)[1], np.eye(5, dtype=np.float32)[4]]), want)
    assert cam(x, 3).shape == (2, 8, 8)


def test_softmax_target_runs_twice_and_matches_its_seed(cam, x):
    maps = cam(x, [ClassifierOutputSoftmaxTarget(1), ClassifierOutputSoftmaxTarget(4)])
    logits = cam.outputs
    seed = np.stack([ClassifierOutputSoftmaxTarget(c).seed(row) for c, row in zip((1, 4), logits)])
    np.testing.assert_array_equal(maps, cam(x, list(seed)))


def test_default_targets_are_each_samples_top_class(cam, x):
    maps = cam(x)
    np.testing.assert_array_equal(maps, cam(x, list(np.argmax(cam.outputs, axis=1))))


# ---- parity with pytorch-grad-cam on segmentation and single-logit models -------------------------------------------
def _export(model, x) -> bytes:
    torch = pytest.importorskip("torch")
    f = io.BytesIO()
    torch.onnx.export(model, x, f, dynamo=False, opset_version=17, input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "N"}, "out": {0: "N"}})
    return f.getvalue()


def _torch_cnn(head):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    body = [torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
            torch.nn.ReLU()]
    return torch.nn.Sequential(*body, *head).eval()


def test_segmentation_target_matches_pytorch_grad_cam():
    torch = pytest.importorskip("torch")
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget as TorchSegmentation

    model = _torch_cnn([torch.nn.Conv2d(8, 3, 1)])  # (N, 3, H, W) class maps
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    masks = [(np.arange(256).reshape(16, 16) % 3 == k).astype(np.float32) for k in (0, 1)]
    with pgc.GradCAM(model, [model[3]]) as ref:
        want = ref(x, [TorchSegmentation(2, masks[0]), TorchSegmentation(1, masks[1])])
    got = onnxcam.GradCAM(_export(model, x), ["3"], device="cpu")(
        x, [SemanticSegmentationTarget(2, masks[0]), SemanticSegmentationTarget(1, masks[1])])
    assert np.abs(got - want).max() < 1e-4


def test_binary_target_matches_pytorch_grad_cam():
    torch = pytest.importorskip("torch")
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget as TorchBinary

    model = _torch_cnn([torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 1)])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with pgc.LayerCAM(model, [model[3]]) as ref:
        want = ref(x, [TorchBinary(0), TorchBinary(1)])
    got = onnxcam.LayerCAM(_export(model, x), ["3"], device="cpu")(
        x, [BinaryClassifierOutputTarget(0), BinaryClassifierOutputTarget(1)])
    assert np.abs(got - want).max() < 1e-4
