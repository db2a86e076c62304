"""Closed forms of the CAM methods on tiny ONNX models, where the right answer is known by hand.

- Conv -> Relu -> GlobalAveragePool -> Gemm: d logit_c / d A = W[c] / (h*w) everywhere, so the Grad-CAM weights are
  W[c] / (h*w), and Grad-CAM, HiResCAM and CAM give the same map (CAM's raw map is h*w times Grad-CAM's).
- Conv -> Relu -> Flatten -> Gemm: HiResCAM's map sums to the logit minus the bias, and is exactly zero wherever the
  class weights are zero, while Grad-CAM's is not (the HiResCAM paper's argument).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam.cam import methods

H = W = 8
C, K = 4, 5
RELU = "relu_out"


def tiny_model(head: str, nhwc: bool = False) -> bytes:
    """Conv(3->4, 3x3, pad 1) -> Relu -> (GAP -> Flatten | Flatten) -> Gemm(K), batch dynamic."""
    rng = np.random.default_rng(0)
    conv_w = rng.standard_normal((C, 3, 3, 3)).astype(np.float32)
    conv_b = rng.standard_normal(C).astype(np.float32) * 0.1
    features = C if head == "gap" else C * H * W
    fc_w = rng.standard_normal((K, features)).astype(np.float32)
    if head == "flatten":
        # class 1 ignores the top half of the map, in every channel
        fc_w.reshape(K, C, H, W)[1, :, : H // 2, :] = 0
    fc_b = rng.standard_normal(K).astype(np.float32)
    nodes, first = [], "input"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]))
        first = "nchw"
    nodes += [helper.make_node("Conv", [first, "conv_w", "conv_b"], ["conv_out"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["conv_out"], [RELU])]
    if head == "gap":
        nodes += [helper.make_node("GlobalAveragePool", [RELU], ["pooled"]),
                  helper.make_node("Flatten", ["pooled"], ["flat"])]
    else:
        nodes.append(helper.make_node("Flatten", [RELU], ["flat"]))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1))
    shape = ["N", H, W, 3] if nhwc else ["N", 3, H, W]
    graph = helper.make_graph(
        nodes, f"tiny_{head}", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])],
        [numpy_helper.from_array(v, n) for n, v in
         (("conv_w", conv_w), ("conv_b", conv_b), ("fc_w", fc_w), ("fc_b", fc_b))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def head_weights(model: bytes) -> tuple[np.ndarray, np.ndarray]:
    init = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(model).graph.initializer}
    return init["fc_w"], init["fc_b"]


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).standard_normal((2, 3, H, W)).astype(np.float32)


@pytest.fixture(scope="module")
def gap_model():
    return tiny_model("gap")


@pytest.fixture(scope="module")
def flat_model():
    return tiny_model("flatten")


def test_gradcam_weights_are_class_weights_over_area(gap_model, x):
    fc_w, _ = head_weights(gap_model)
    r = onnxcam.Explainer(gap_model, [RELU], device="cpu").run(x, [2, 4])
    weights = np.mean(r.gradients[RELU], axis=(2, 3))
    np.testing.assert_allclose(weights, fc_w[[2, 4]] / (H * W), rtol=1e-6)


def test_gradcam_hirescam_and_cam_agree_on_gap_linear(gap_model, x):
    ex = onnxcam.Explainer(gap_model, [RELU], device="cpu")
    maps = {cls.__name__: cls(ex) for cls in (onnxcam.GradCAM, onnxcam.HiResCAM)}
    maps["CAM"] = onnxcam.CAM(gap_model, device="cpu")
    out = {name: cam(x, [2, 4]) for name, cam in maps.items()}
    np.testing.assert_allclose(out["GradCAM"], out["HiResCAM"], atol=1e-6)
    np.testing.assert_allclose(out["GradCAM"], out["CAM"], atol=1e-6)
    np.testing.assert_allclose(maps["CAM"].raw[RELU], maps["GradCAM"].raw[RELU] * H * W, rtol=1e-4, atol=1e-6)
    assert maps["CAM"].target_layers == [RELU]


def test_hirescam_sums_to_logit_minus_bias(flat_model, x):
    _, fc_b = head_weights(flat_model)
    ex = onnxcam.Explainer(flat_model, [RELU], device="cpu")
    r = ex.run(x, [1, 3])
    raw = methods.hirescam(r.activations[RELU], r.gradients[RELU])
    picked = r.logits[[0, 1], [1, 3]] - fc_b[[1, 3]]
    np.testing.assert_allclose(raw.sum(axis=(1, 2)), picked, rtol=1e-5)


def test_hirescam_is_zero_where_class_weights_are_zero_gradcam_is_not(flat_model, x):
    ex = onnxcam.Explainer(flat_model, [RELU], device="cpu")
    r = ex.run(x, 1)  # class 1 ignores the top half
    a, g = r.activations[RELU], r.gradients[RELU]
    hires, grad = methods.hirescam(a, g), methods.gradcam(a, g)
    assert np.all(hires[:, : H // 2, :] == 0)
    assert np.abs(hires[:, H // 2:, :]).max() > 0
    top = grad[:, : H // 2, :]
    assert np.count_nonzero(top) > top.size // 2  # zero only where every channel is dead


def test_counterfactual_gradcam_negates_gradcam(gap_model, x):
    r = onnxcam.Explainer(gap_model, [RELU], device="cpu").run(x, [0, 1])
    a, g = r.activations[RELU], r.gradients[RELU]
    np.testing.assert_array_equal(methods.counterfactual_gradcam(a, g), -methods.gradcam(a, g))


def test_gradient_x_input_is_hirescam_at_the_input(gap_model, x):
    sal = onnxcam.GradientXInput(gap_model, device="cpu")
    hires = onnxcam.HiResCAM(gap_model, ["input"], device="cpu")
    np.testing.assert_array_equal(sal(x, [2, 2]), hires(x, [2, 2]))


def test_cam_needs_a_pooled_layer(flat_model):
    with pytest.raises(onnxcam.LayerError, match="global"):
        onnxcam.CAM(flat_model, device="cpu")
    with pytest.raises(onnxcam.LayerError, match="not globally average-pooled"):
        onnxcam.CAM(tiny_model("gap"), ["conv_out"], device="cpu")


def test_channels_last_input_gives_the_same_maps(gap_model, x):
    """An NHWC model (a Transpose first, as tf2onnx exports) explains like its NCHW twin, smoothing included."""
    nhwc = onnxcam.GradCAM(tiny_model("gap", nhwc=True), [RELU], device="cpu")
    nchw = onnxcam.GradCAM(gap_model, [RELU], device="cpu")
    x_nhwc = x.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(nhwc(x_nhwc, [2, 4]), nchw(x, [2, 4]), atol=1e-6)
    np.testing.assert_allclose(nhwc(x_nhwc, [2, 4], aug_smooth=True), nchw(x, [2, 4], aug_smooth=True), atol=1e-6)
    gb_nhwc = onnxcam.GuidedBackprop(tiny_model("gap", nhwc=True), device="cpu")(x_nhwc, [2, 4])
    gb_nchw = onnxcam.GuidedBackprop(gap_model, device="cpu")(x, [2, 4])
    np.testing.assert_allclose(gb_nhwc, gb_nchw, atol=1e-7)
