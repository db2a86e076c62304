"""The public face: every method through explain() and its class, pytorch-grad-cam's calling conventions, and the
principal-component projections against pytorch-grad-cam's own (scikit-learn's KernelPCA for KPCA-CAM)."""

from __future__ import annotations

import numpy as np
import pytest

import onnxcam
from onnxcam.cam import CLASSES, METHODS, deprocess_image
from onnxcam.cam.projection import KERNELS, get_2d_projection, get_2d_projection_kernel
from tests.test_cam_closed_forms import RELU, tiny_model

N, SIZE = 2, 8


@pytest.fixture(scope="module")
def model():
    return tiny_model("gap")


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).standard_normal((N, 3, SIZE, SIZE)).astype(np.float32)


def test_public_names():
    from onnxcam import GradCAM, GuidedBackprop, HiResCAM  # noqa: F401  -- the issue's example imports
    from onnxcam.targets import ClassifierOutputTarget  # noqa: F401

    for name in ("GradCAM", "HiResCAM", "GradCAMElementWise", "GradCAMPlusPlus", "XGradCAM", "LayerCAM", "EigenCAM",
                 "EigenGradCAM", "KPCA_CAM", "GuidedBackpropReLUModel"):
        assert name in onnxcam.__all__, name  # pytorch-grad-cam's names: an import swap migrates
    assert set(METHODS) <= set(CLASSES)


@pytest.mark.parametrize("method", list(CLASSES))
def test_explain_every_method(method, model, x):
    e = onnxcam.explain(model, x, method, targets=[1, 3], layers=[RELU], device="cpu")
    guided = method.startswith("guided")
    assert e.maps.shape == ((N, SIZE, SIZE, 3) if guided else (N, SIZE, SIZE)) and e.maps.dtype == np.float32
    if not guided:
        assert 0 <= e.maps.min() and e.maps.max() <= 1
    assert e.logits.shape == (N, 5) and list(e.targets) == [1, 3] and e.method == method
    if method not in ("guided_backprop",):
        assert all(raw.shape == (N, SIZE, SIZE) for raw in e.raw.values()) and e.raw


def test_explain_with_an_explainer_builds_what_a_method_needs(model, x):
    ex = onnxcam.Explainer(model, [RELU], device="cpu")
    plain = onnxcam.explain(ex, x, "hirescam")
    assert plain.result.activations.keys() == {RELU}
    for method in ("cam", "saliency", "guided_gradcam"):
        np.testing.assert_array_equal(onnxcam.explain(ex, x, method).maps,
                                      onnxcam.explain(model, x, method, layers=[RELU], device="cpu").maps)


def test_explain_rejects_unknown_methods(model, x):
    with pytest.raises(onnxcam.InputError, match="gradcam"):
        onnxcam.explain(model, x, "gradcam+++")


def test_calling_convention(model, x):
    with onnxcam.GradCAM(model=model, target_layers=[RELU], device="cpu") as cam:
        maps = cam(input_tensor=x, targets=None, aug_smooth=False, eigen_smooth=False)
    assert maps.shape == (N, SIZE, SIZE)
    assert cam.outputs.shape == (N, 5) and cam.target_layers == [RELU]
    assert cam.raw[RELU].shape == (N, SIZE, SIZE)
    with pytest.raises(ValueError), onnxcam.GradCAM(model, [RELU], device="cpu") as cam:
        cam(x, [1])  # errors are not swallowed by the context manager


def test_torch_tensors_are_accepted(model, x):
    torch = pytest.importorskip("torch")
    cam = onnxcam.HiResCAM(model, [RELU], device="cpu")
    np.testing.assert_array_equal(cam(torch.from_numpy(x)), cam(x))
    gb = onnxcam.GuidedBackpropReLUModel(model, device="cpu")
    assert gb(torch.from_numpy(x)).shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(gb.forward(x), cam.outputs)


def test_default_layer_is_the_last_spatial_activation(model, x):
    assert onnxcam.GradCAM(model, device="cpu").target_layers == [RELU]


def test_kpca_kernels_run(model, x):
    for kernel in KERNELS:
        maps = onnxcam.KPCA_CAM(model, [RELU], kernel=kernel, device="cpu")(x)
        assert maps.shape == (N, SIZE, SIZE) and np.isfinite(maps).all()
    with pytest.raises(ValueError, match="kernel"):
        onnxcam.KPCA_CAM(model, [RELU], kernel="laplacian", device="cpu")(x)


# ---- projections against the reference implementations -------------------------------------------------------------
@pytest.fixture(scope="module")
def activations():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 16, 7, 7)).astype(np.float32)
    a[0, :, 2:4] += 3 * rng.standard_normal(16).astype(np.float32)[:, None, None]  # a dominant direction
    return np.maximum(a, 0)


@pytest.mark.parametrize("shape", [(3, 16, 7, 7), (2, 256, 4, 4), (2, 64, 1, 9)])
def test_eigen_projection_matches_pytorch_grad_cam(activations, shape):
    """Also with more channels than positions, where the SVD's shapes differ from pytorch-grad-cam's call."""
    svd = pytest.importorskip("pytorch_grad_cam.utils.svd_on_activations")
    a = activations if shape == activations.shape else np.maximum(
        np.random.default_rng(4).standard_normal(shape).astype(np.float32), 0)
    want = svd.get_2d_projection(a)
    np.testing.assert_allclose(get_2d_projection(a), want, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_projection_matches_scikit_learn(activations, kernel):
    """pytorch-grad-cam's get_2d_projection_kernel is scikit-learn's KernelPCA; onnxcam's is numpy only."""
    svd = pytest.importorskip("pytorch_grad_cam.utils.svd_on_activations")
    want = svd.get_2d_projection_kernel(activations, kernel)
    got = get_2d_projection_kernel(activations, kernel)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_deprocess_image_matches_pytorch_grad_cam():
    image = pytest.importorskip("pytorch_grad_cam.utils.image")
    img = np.random.default_rng(0).standard_normal((8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(deprocess_image(img), image.deprocess_image(img))


def test_reshape_transform_applies_to_activations_and_gradients(model, x):
    """pytorch-grad-cam's hook for token layouts; here a numpy function (a flip, to see it act)."""
    plain = onnxcam.HiResCAM(model, [RELU], device="cpu")
    flipped = onnxcam.HiResCAM(model, [RELU], reshape_transform=lambda t: t[:, :, ::-1, :], device="cpu")
    np.testing.assert_array_equal(flipped(x, [1, 2]), plain(x, [1, 2])[:, ::-1, :])
