"""Deep Feature Factorization: onnxcam's NMF is scikit-learn's (same start, same coordinate descent, same stopping
rule: equal bit for bit on the same matrix), and the whole DeepFeatureFactorization equals pytorch-grad-cam 1.5.7's on
a model whose activations are exact in float32 on both sides (small integer weights and inputs: every sum is an
integer below 2**24), so both factorize the very same matrix. On a seeded resnet18, where onnxruntime's and torch's
activations differ by float rounding, NMF's 200 iterations carry that difference along: there the maps are compared
within 1e-4 (measured 2e-6) and the factorizations by quality (the relative reconstruction error).
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pgc = pytest.importorskip("pytorch_grad_cam")
sklearn_nmf = pytest.importorskip("sklearn.decomposition").NMF

import onnxcam
from onnxcam.cam.feature_factorization import dff, nmf
from onnxcam.errors import InputError, LayerError

from .test_cam_methods_more import small
from .test_cam_parity import case


def _sklearn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter
        model = sklearn_nmf(n_components=k, init="random", random_state=0)
        return model.fit_transform(x), model.components_, model.n_iter_


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, k", [((40, 90), 4), ((7, 3), 2), ((30, 20), 6)])
def test_nmf_is_scikit_learns_bit_for_bit(dtype, shape, k):
    x = (np.random.default_rng(sum(shape)).standard_normal(shape) ** 2).astype(dtype)
    x[:, ::7] = 0  # zeros: the projected gradient's other branch
    w, h, iters = nmf(x, k)
    want_w, want_h, want_iters = _sklearn(x, k)
    assert iters == want_iters and w.dtype == want_w.dtype == dtype
    np.testing.assert_array_equal(w, want_w)
    np.testing.assert_array_equal(h, want_h)


class IntegerNet(torch.nn.Module):
    """Conv (integer weights and bias) -> ReLU -> global average pooling -> linear: the ReLU's output is exact."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(6, 5)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randint(-2, 3, self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randint(-3, 4, (6,), generator=g))

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


@functools.cache
def integer_case() -> tuple[torch.nn.Module, bytes, torch.Tensor]:
    torch.manual_seed(1)
    model = IntegerNet().eval()
    x = torch.randint(-3, 4, (2, 3, 16, 16), generator=torch.Generator().manual_seed(2)).float()
    f = io.BytesIO()
    torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return model, f.getvalue(), x


def test_dff_equals_pytorch_grad_cams_on_exact_activations():
    model, onnx_bytes, x = integer_case()
    ref = pgc.DeepFeatureFactorization(model, model.relu, computation_on_concepts=model.fc)
    want_concepts, want_maps, want_scores = ref(x, n_components=3)
    ours = onnxcam.DeepFeatureFactorization(onnx_bytes, "relu", computation_on_concepts="head", device="cpu")
    concepts, maps, scores = ours(x, n_components=3)
    np.testing.assert_array_equal(concepts, want_concepts)  # the same matrix, factorized the same way
    assert len(maps) == len(want_maps) == 2
    for got, want in zip(maps, want_maps):
        assert got.shape == want.shape == (3, 16, 16)
        np.testing.assert_allclose(got, want, atol=1e-6)
    # the model's head on each concept as a constant map = the classifier on the concept vector
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    # a torch module as computation_on_concepts, pytorch-grad-cam's own convention
    torch_scores = onnxcam.DeepFeatureFactorization(onnx_bytes, "relu", computation_on_concepts=model.fc,
                                                    device="cpu")(x, 3)[2]
    np.testing.assert_array_equal(torch_scores, want_scores)


def test_dff_on_resnet18_factorizes_as_well_as_pytorch_grad_cam():
    c = case("resnet18")
    module = c.model.layer4
    ref = pgc.DeepFeatureFactorization(c.model, module)
    want_concepts, want_maps = ref(c.x, n_components=4)
    ours = onnxcam.DeepFeatureFactorization(c.onnx, "layer4", device="cpu")
    concepts, maps = ours(c.x, n_components=4)
    assert concepts.shape == want_concepts.shape == (512, 4) and len(maps) == 2 and maps[0].shape == (4, 64, 64)
    # measured: heatmaps within 2.3e-6, concepts within 2.3e-5 of values up to 3.9 (this NMF is well conditioned)
    assert max(np.abs(a - b).max() for a, b in zip(maps, want_maps)) < 1e-4
    np.testing.assert_allclose(concepts, want_concepts, atol=1e-4 * np.abs(want_concepts).max())
    # quality: the reconstruction error of each factorization of its own activations, within 1% of each other
    acts = ours._forward.result.activations[ours.target_layer]
    x = acts.transpose(1, 0, 2, 3).reshape(512, -1)
    _, heat = dff(acts, 4)
    err = np.linalg.norm(x - concepts @ heat.transpose(1, 0, 2, 3).reshape(4, -1)) / np.linalg.norm(x)
    with torch.no_grad():
        seen = []
        hook = module.register_forward_hook(lambda m, i, o: seen.append(o.numpy()))
        c.model(c.x)
        hook.remove()
    xt = seen[0].transpose(1, 0, 2, 3).reshape(512, -1)
    _, heat_t = dff(seen[0], 4)
    err_t = np.linalg.norm(xt - want_concepts @ heat_t.transpose(1, 0, 2, 3).reshape(4, -1)) / np.linalg.norm(xt)
    assert abs(err - err_t) < 0.01 * err_t and err < 1


def test_bad_arguments_are_one_clear_error():
    _, onnx_bytes, x = integer_case()
    with pytest.raises(InputError, match="computation_on_concepts"):
        onnxcam.DeepFeatureFactorization(onnx_bytes, "relu", computation_on_concepts="fc", device="cpu")
    dff_ = onnxcam.DeepFeatureFactorization(onnx_bytes, "relu", device="cpu")
    for bad in (0, 2.5, True):
        with pytest.raises(InputError, match="n_components"):
            dff_(x, bad)
    _, small_bytes, sx = small()
    skip = onnxcam.DeepFeatureFactorization(small_bytes, "block", computation_on_concepts="head", device="cpu")
    with pytest.raises(LayerError, match="also reads"):  # its skip connection bypasses the layer
        skip(sx, 2)
