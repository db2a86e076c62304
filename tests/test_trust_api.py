"""The API can be trusted with what arrives (issue "Trust", points 2, 4, 5, 7 and 8, API side).

- Dynamic sizes: a text-recognizer-like model that only runs at height 48 is explained at every width it accepts,
  through Explainer and GradCAM, without input_shape=, and matches float64 torch.autograd; nothing runs it at a
  guessed size; a size it refuses is one InputError.
- A declared output shape that is wrong ((1, 'seqlen') for a (T, N, C) output) is not trusted.
- Bad inputs and options are one onnxcam error each; NaN/Inf anywhere is a NumericalError naming the tensor and
  the samples; an all-zero map is flagged with its reason.
- One CAM object shared by threads: each thread reads its own call's outputs.
"""

from __future__ import annotations

import copy
import functools
import io
import threading

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam.errors import InputError, ModelError, NumericalError, OnnxCamError

RNG = np.random.default_rng(0)


# ---- a model that only runs at height 48 (a CTC recognizer's Reshape to 16 x 12 rows) -----------------------------
class Recognizer(torch.nn.Module):
    """conv s2 -> relu -> conv s2 -> relu -> reshape to (N, 192, T) (needs H == 48) -> mean over T -> linear."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, 2, 1)
        self.c2 = torch.nn.Conv2d(8, 16, 3, 2, 1)
        self.fc = torch.nn.Linear(192, 5)

    def features(self, x):
        return torch.relu(self.c2(torch.relu(self.c1(x))))

    def head(self, h):
        return self.fc(h.reshape(h.shape[0], 192, -1).mean(2))

    def forward(self, x):
        return self.head(self.features(x))


@functools.cache
def recognizer() -> tuple[Recognizer, bytes]:
    torch.manual_seed(0)
    model = Recognizer().eval()
    f = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 3, 48, 192),), f, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N"}})
    return model, f.getvalue()


def torch_reference(model: Recognizer, x: np.ndarray, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 logits, the last ReLU's output and d(sum of the target logits) / d(that output)."""
    md = copy.deepcopy(model).double()
    h = md.features(torch.tensor(x, dtype=torch.float64))
    logits = md.head(h)
    picked = logits[torch.arange(len(x)), torch.as_tensor(np.asarray(targets))].sum()
    (grad,) = torch.autograd.grad(picked, [h])
    return logits.detach().numpy(), h.detach().numpy(), grad.numpy()


def line_images(n: int, width: int) -> np.ndarray:
    return RNG.standard_normal((n, 3, 48, width)).astype(np.float32)


def test_a_height_48_model_is_built_for_the_size_that_arrives():
    model, onnx_bytes = recognizer()
    ex = onnxcam.Explainer(onnx_bytes, device="cpu")  # before: a probe at 224 x 224 failed in here
    with pytest.raises(InputError, match="chosen at the size of the first run"):
        ex.layers  # noqa: B018 - the property is what is tested
    with pytest.raises(InputError, match="has a dynamic size: give the input shape"):
        ex.explainable_model  # noqa: B018
    assert ex.score_shape((1, 3, 48, 64)) == ("N", 5)
    for width in (192, 96, 64):
        x = line_images(2, width)
        r = ex.run(x, targets=[1, 3])
        logits, act, grad = torch_reference(model, x, [1, 3])
        (layer,) = ex.layers
        assert r.activations[layer].shape == (2, 16, 12, width // 4)
        np.testing.assert_allclose(r.logits, logits, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r.activations[layer], act, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r.gradients[layer], grad, rtol=1e-4, atol=1e-7)
    assert ex.explainable_model.graph.input[0].name == "x"  # the last size run


def test_gradcam_on_a_dynamic_model_needs_no_input_shape():
    model, onnx_bytes = recognizer()
    cam = onnxcam.GradCAM(model=onnx_bytes, target_layers=None, device="cpu")
    for width in (192, 128):
        x = line_images(2, width)
        maps = cam(input_tensor=x)
        assert maps.shape == (2, 48, width)
        _, act, grad = torch_reference(model, x, cam.result.targets)
        (layer,) = cam.target_layers
        want = np.einsum("nc,nchw->nhw", grad.mean(axis=(2, 3)), act)  # Grad-CAM's raw map in float64
        np.testing.assert_allclose(cam.raw[layer], want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_a_size_the_model_refuses_is_one_input_error_naming_it():
    _, onnx_bytes = recognizer()
    ex = onnxcam.Explainer(onnx_bytes, device="cpu")
    with pytest.raises(InputError, match=r"input 'x' of shape \(2, 3, 224, 224\) is not a size this model accepts: "
                                         r".*Reshape node '/Reshape'.*cannot be reshaped"):
        ex.run(RNG.standard_normal((2, 3, 224, 224)).astype(np.float32))
    with pytest.raises(InputError, match=r"input 'x' expects shape \(\?, 3, \?, \?\); got \(2, 48, 192\)"):
        ex.run(line_images(2, 192)[:, 0])


def test_threads_share_a_dynamic_explainer_at_different_sizes():
    model, onnx_bytes = recognizer()
    ex = onnxcam.Explainer(onnx_bytes, layers=["/Relu_1_output_0"], device="cpu")
    inputs = {width: line_images(1, width) for width in (40, 56, 72, 88)}  # four sizes built at once
    got, errors = {}, []
    start = threading.Barrier(len(inputs))

    def work(width):
        try:
            start.wait()
            got[width] = ex.run(inputs[width], targets=2).gradients["/Relu_1_output_0"]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for width, x in inputs.items():
        np.testing.assert_allclose(got[width], torch_reference(model, x, [2])[2], rtol=1e-4, atol=1e-7)


# ---- a declared output shape that is wrong --------------------------------------------------------------------------
W_SEQ = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
FC_SEQ = RNG.standard_normal((4, 7)).astype(np.float32)


def time_major() -> onnx.ModelProto:
    """conv -> relu -> mean over H -> (T, N, C) -> MatMul: returns (W, N, 7) but declares [1, 'seqlen']."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("ReduceMean", ["relu", "axis"], ["rows"], keepdims=0),
             helper.make_node("Transpose", ["rows"], ["tnc"], perm=[2, 0, 1]),
             helper.make_node("MatMul", ["tnc", "fc"], ["logits"])]
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, "W"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seqlen"])],
                              [numpy_helper.from_array(W_SEQ, "w"), numpy_helper.from_array(np.array([2]), "axis"),
                               numpy_helper.from_array(FC_SEQ, "fc")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def test_a_wrong_declared_output_shape_is_not_trusted(caplog):
    x = RNG.standard_normal((2, 3, 8, 16)).astype(np.float32)
    seed = RNG.standard_normal((16, 2, 7)).astype(np.float32)
    ex = onnxcam.Explainer(time_major(), device="cpu")
    assert ex.score_shape(x.shape) == (16, "N", 7)
    assert "declares shape (1, ?) but the model computes (16, N, 7)" in caplog.text
    r = ex.run(x, seed=seed)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    relu = torch.relu(torch.nn.functional.conv2d(xt, torch.tensor(W_SEQ, dtype=torch.float64), padding=1))
    relu.retain_grad()
    out = relu.mean(2).permute(2, 0, 1) @ torch.tensor(FC_SEQ, dtype=torch.float64)
    (out * torch.tensor(seed, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(r.logits, out.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.gradients["relu"], relu.grad.numpy(), rtol=1e-5, atol=1e-7)


# ---- bad inputs and options: one onnxcam error each -----------------------------------------------------------------
W_CONV = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
W_FC = RNG.standard_normal((5, 4)).astype(np.float32)


def tiny(shape=("N", 3, 6, 6), fc=W_FC, elem=TensorProto.FLOAT) -> onnx.ModelProto:
    """[Cast ->] Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: d logit_k / d relu = fc[k, c] / (h*w)."""
    nodes = [helper.make_node("Conv", ["xf" if elem != TensorProto.FLOAT else "x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    if elem != TensorProto.FLOAT:
        nodes.insert(0, helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
    x = helper.make_tensor_value_info("x", elem, shape)
    if shape is None:
        x = helper.make_value_info("x", helper.make_tensor_type_proto(elem, None))
    graph = helper.make_graph(nodes, "tiny", [x], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(W_CONV, "w"), numpy_helper.from_array(fc, "fc")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def closed_form(fc: np.ndarray, classes, hw: tuple) -> np.ndarray:
    return np.stack([np.broadcast_to(fc[c][:, None, None] / (hw[0] * hw[1]), (4, *hw)) for c in classes])


X = RNG.standard_normal((3, 3, 6, 6)).astype(np.float32)


def test_an_input_without_a_declared_shape_is_built_for_x():
    ex = onnxcam.Explainer(tiny(shape=None), device="cpu")
    for x in (X, RNG.standard_normal((2, 3, 5, 9)).astype(np.float32)):
        r = ex.run(x, targets=1)
        np.testing.assert_allclose(r.gradients["relu"], closed_form(W_FC, [1] * len(x), x.shape[2:]), rtol=1e-5)
    with pytest.raises(InputError, match=r"input 'x' of shape \(3, 6, 6\) is not a size this model accepts"):
        ex.run(X[0])


def test_absurd_sizes_are_refused_before_anything_is_built():
    with pytest.raises(ModelError, match=r"input 'x' declares shape \(\?, 3, 1099511627776, 1099511627776\): "
                                         r"3.63e\+24 values per sample"):
        onnxcam.Explainer(tiny(shape=("N", 3, 2**40, 2**40)), device="cpu")
    with pytest.raises(InputError, match=r"input shape \(1, 3, 1099511627776, 6\) for 'x'"):
        onnxcam.Explainer(tiny(shape=("N", 3, "H", 6)), device="cpu", input_shape=(1, 3, 2**40, 6))
    with pytest.raises(InputError, match="must be positive ints"):
        onnxcam.Explainer(tiny(shape=("N", 3, "H", 6)), device="cpu", input_shape=(1, 3, 0, 6))


def test_an_integer_input_takes_its_own_type():
    ex = onnxcam.Explainer(tiny(elem=TensorProto.UINT8), device="cpu")
    pixels = RNG.integers(0, 256, (2, 3, 6, 6)).astype(np.uint8)
    want = ex.run(pixels, targets=[0, 4])
    np.testing.assert_allclose(want.gradients["relu"], closed_form(W_FC, [0, 4], (6, 6)), rtol=1e-5)
    same = ex.run(pixels.astype(np.float32), targets=[0, 4])  # integral floats are fed as uint8
    np.testing.assert_array_equal(same.logits, want.logits)
    with pytest.raises(InputError, match="input 'x' takes uint8 values; x holds 0.5, which is not one"):
        ex.run(np.full((1, 3, 6, 6), 0.5, np.float32))
    with pytest.raises(InputError, match="input 'x' takes uint8 values; x holds 300"):
        ex.run(np.full((1, 3, 6, 6), 300, np.int64))


@pytest.mark.parametrize("kwargs,message", [
    ({"targets": 2**70}, "target class 1180591620717411303424 is out of range"),
    ({"targets": [2**70, 1, 2]}, "target class 1180591620717411303424 is out of range"),
    ({"targets": np.array([2**64 - 1, 1, 2], np.uint64)}, "target class 18446744073709551615 is out of range"),
    ({"top_k": True}, "top_k must be a positive int, not True"),
    ({"targets": [[1, 2], [3]]}, "targets must be None, an int"),
    ({"seed": np.array([["a"] * 5] * 3)}, "seed must be an array of numbers shaped like the score"),
])
def test_bad_targets_are_one_input_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        onnxcam.Explainer(tiny(), device="cpu").run(X, **kwargs)


def test_bad_targets_through_the_cam_classes():
    cam = onnxcam.GradCAM(tiny(), None, device="cpu")
    with pytest.raises(InputError, match="target class 1180591620717411303424 is out of range"):
        cam(X, [2**70] * 3)
    with pytest.raises(InputError, match="input_tensor is not an array"):
        cam([[1.0, 2.0], [3.0]])
    with pytest.raises(InputError, match=r"target <object .*> has no seed\(output\) method"):
        cam(X, [object()] * 3)


def test_a_fixed_batch_is_checked_before_running():
    ex = onnxcam.Explainer(tiny(shape=(4, 3, 6, 6)), device="cpu")
    with pytest.raises(InputError, match="input 'x' has a fixed batch of 4; got 3 samples"):
        ex.run(X)


# ---- non-finite values ----------------------------------------------------------------------------------------------
def with_nan(x: np.ndarray, sample: int, value: float) -> np.ndarray:
    x = x.copy()
    x[sample, 1, 2, 3] = value
    return x


@pytest.mark.parametrize("x,message", [
    (with_nan(X, 1, np.nan), r"input 'x' holds NaN in samples \[1\]"),
    (with_nan(X, 2, np.inf), r"input 'x' holds Inf in samples \[2\]"),
    (with_nan(X.astype(np.float64), 0, 1e300), (r"input 'x' is float32, and x holds values it cannot represent "
                                                r"\(up to 1e\+300\) in samples \[0\]")),
    (np.where(np.arange(3)[:, None, None, None] == 1, np.float32(1e38), X),
     (r"the activation of layer 'relu' holds (NaN|Inf|NaN and Inf) in samples \[1\] \(also non-finite: the score "
      r"'logits'")),  # +-Inf sums may meet (NaN) or not, as the kernel orders them
])
def test_non_finite_inputs_and_overflows_are_numerical_errors(x, message):
    with pytest.raises(NumericalError, match=message):
        onnxcam.Explainer(tiny(), device="cpu").run(x)


def test_nan_weights_are_a_numerical_error_through_both_faces():
    fc = W_FC.copy()
    fc[2, 1] = np.nan
    with pytest.raises(NumericalError, match=r"the score 'logits' holds NaN in samples \[0, 1, 2\]"):
        onnxcam.Explainer(tiny(fc=fc), device="cpu").run(X)
    with pytest.raises(NumericalError, match="holds NaN"):
        onnxcam.GradCAM(tiny(fc=fc), None, device="cpu")(X)
    assert issubclass(NumericalError, OnnxCamError)


# ---- all-zero maps --------------------------------------------------------------------------------------------------
def test_an_all_zero_map_says_why():
    fc = W_FC.copy()
    fc[3] = 0  # class 3's score does not depend on the features
    maps = onnxcam.GradCAM(tiny(fc=fc), None, device="cpu")
    got = maps(X, [3, 0, 3])
    assert not got[[0, 2]].any() and got[1].any()
    np.testing.assert_array_equal(maps.degenerate, [True, False, True])
    assert maps.degenerate_reasons[1] is None
    assert maps.degenerate_reasons[0] == "the map is all zero: the gradient of class 3's score at 'relu' is zero " \
                                         "everywhere"
    e = onnxcam.explain(tiny(fc=fc), X, "gradcam", targets=[3, 0, 3], device="cpu")
    np.testing.assert_array_equal(e.degenerate, [True, False, True])
    # A counterfactual map of a class whose gradient is positive everywhere: nothing argues against it.
    positive = np.abs(W_FC)
    e = onnxcam.explain(tiny(fc=positive), np.abs(X), "counterfactual_gradcam", targets=1, device="cpu")
    assert e.degenerate.all() and "nowhere positive" in e.degenerate_reasons[0]


# ---- one object, several threads ------------------------------------------------------------------------------------
def test_each_thread_reads_its_own_outputs():
    cam = onnxcam.GradCAM(tiny(), None, device="cpu")
    inputs = [RNG.standard_normal((2, 3, 6, 6)).astype(np.float32) * (t + 1) for t in range(4)]
    expected = [cam.explainer.run(x).logits for x in inputs]
    mismatches, errors = [], []
    start = threading.Barrier(len(inputs))

    def work(t):
        try:
            start.wait()
            for _ in range(150):
                cam(input_tensor=inputs[t])
                if not np.allclose(cam.outputs, expected[t], rtol=1e-5, atol=1e-6) or \
                        not np.allclose(cam.result.logits, expected[t], rtol=1e-5, atol=1e-6):
                    mismatches.append(t)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches, (errors, len(mismatches))
