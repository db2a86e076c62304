"""RandomCAM, FEM, FinerCAM, ScoreCAM, AblationCAM and FullGrad: parity with pytorch-grad-cam 1.5.7 on the same
model, input, layers and targets (maps within 1e-4), how the forward-only methods run, and the graph cut.

Models: test_cam_parity's seeded resnet18 (BatchNorm folded into the convolutions, as the exporter folds it) for the
methods that cost one run, and a small seeded network for those that run a forward per channel: a skip connection
that bypasses the target layer (so the cut tail reads a tensor from before it), a BatchNormalization the exporter
cannot fold (after a ReLU: a bias layer of its own for FullGrad), and three dead channels at the target layer (ReLU of
a very negative bias: exactly zero, so Score-CAM's shared zero-input forward and Ablation-CAM's zero ablation hold by
construction).
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as TorchTarget

import onnxcam
from onnxcam.cam.gradient_free import upsample_bilinear_aligned
from onnxcam.errors import InputError, LayerError
from onnxcam.graph.cut import tail_model, tail_nodes
from onnxcam.runtime import cpu_session

from .test_cam_parity import CLASSES, SIZE, case

TOL = 1e-4
DEAD = 3  # dead channels at the small model's target layer


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                        torch.nn.BatchNorm2d(8))
        self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 12, 3, stride=2, padding=1), torch.nn.ReLU())
        self.conv = torch.nn.Conv2d(12, 16, 3, padding=1)
        self.skip = torch.nn.Conv2d(8, 16, 1, stride=2)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        h = self.stem(x)
        y = torch.relu(self.conv(self.block(h)) + self.skip(h))
        return self.fc(y.mean((2, 3)))


@functools.cache
def small() -> tuple[torch.nn.Module, bytes, torch.Tensor]:
    torch.manual_seed(0)
    model = Small().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        bn = model.stem[2]
        bn.running_mean.copy_(torch.randn(8, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(8, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(8, generator=g) * 0.2)
        model.block[0].bias[:DEAD] = -100.0  # pre-activations are within +-10: these channels are exactly 0
        model.fc.weight.mul_(10)  # scores of a size where relative drops are well defined
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    f = io.BytesIO()
    torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return model, f.getvalue(), x


def _torch_targets(classes):
    return None if classes is None else [TorchTarget(k) for k in classes]


def _diff(got, want) -> float:
    assert got.shape == want.shape and got.dtype == np.float32
    return float(np.abs(got - want).max())


# ---- methods of one run ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes", [None, CLASSES])
def test_fem_and_randomcam_match_pytorch_grad_cam(classes):
    c = case("resnet18")
    ex = onnxcam.Explainer(c.onnx, c.layers, device="cpu")
    with pgc.FEM(c.model, c.torch_layers(c.model)) as cam:
        want = cam(c.x, _torch_targets(classes))
    assert _diff(onnxcam.FEM(ex)(c.x, classes), want) < TOL
    np.random.seed(7)  # RandomCAM draws from numpy's global generator, as pytorch-grad-cam does
    with pgc.RandomCAM(c.model, c.torch_layers(c.model)) as cam:
        want = cam(c.x, _torch_targets(classes))
    np.random.seed(7)
    assert _diff(onnxcam.RandomCAM(ex)(c.x, classes), want) < TOL


def test_randomcam_with_its_own_generator_is_reproducible():
    c = case("resnet18")
    ex = onnxcam.Explainer(c.onnx, c.layers, device="cpu")
    a = onnxcam.RandomCAM(ex, rng=np.random.default_rng(3))(c.x)
    b = onnxcam.RandomCAM(ex, rng=np.random.default_rng(3))(c.x)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - onnxcam.RandomCAM(ex, rng=np.random.default_rng(4))(c.x)).max() > 0.1


@pytest.mark.parametrize("options", [{}, {"alpha": 0.5, "comparison_categories": [1, 4]}, {"target_idx": 2}])
def test_finercam_matches_pytorch_grad_cam(options):
    c = case("resnet18")
    with pgc.FinerCAM(c.model, c.torch_layers(c.model)) as cam:
        want = cam(c.x, None, **options)
    finer = onnxcam.FinerCAM(c.onnx, c.layers, device="cpu")
    got = finer(c.x, None, **options)
    assert _diff(got, want) < TOL
    assert finer.outputs.shape == (2, 10)


def test_finercam_reads_the_logits_once():
    """Its targets need the logits: one zero-seed run gives them, and the target's seed reuses them."""
    c = case("resnet18")
    finer = onnxcam.FinerCAM(c.onnx, ["layer4"], device="cpu")
    runs = []
    real = finer.base_cam.explainer.run
    finer.base_cam.explainer.run = lambda *a, **k: runs.append(k) or real(*a, **k)
    finer(c.x)
    assert len(runs) == 2  # the logits, then the explained run


@pytest.mark.parametrize("name", ["resnet18", "small"])
@pytest.mark.parametrize("classes", [None, CLASSES])
def test_fullgrad_matches_pytorch_grad_cam(name, classes):
    if name == "small":
        model, onnx_bytes, x = small()
    else:
        c = case(name)
        model, onnx_bytes, x = c.model, c.onnx, c.x
    with pgc.FullGrad(model, []) as cam:
        want = cam(x, _torch_targets(classes))
        layers = len(cam.target_layers)
    ours = onnxcam.FullGrad(onnx_bytes, device="cpu")
    assert len(ours.target_layers) == layers  # every biased conv (and the unfolded BatchNorm) found
    assert _diff(ours(x, classes), want) < TOL


def test_fullgrad_eigen_smooth_matches_pytorch_grad_cam():
    model, onnx_bytes, x = small()
    with pgc.FullGrad(model, []) as cam:
        want = cam(x, _torch_targets(CLASSES), eigen_smooth=True)
    assert _diff(onnxcam.FullGrad(onnx_bytes, device="cpu")(x, CLASSES, eigen_smooth=True), want) < TOL


# ---- forward-only methods -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes", [None, CLASSES])
def test_scorecam_matches_pytorch_grad_cam(classes):
    model, onnx_bytes, x = small()
    with pgc.ScoreCAM(model, [model.block]) as cam:
        want = cam(x, _torch_targets(classes))
    ours = onnxcam.ScoreCAM(onnx_bytes, ["block"], device="cpu", batch_size=5)
    assert _diff(ours(x, classes), want) < TOL
    # the dead channels' masked inputs are all zero: one shared forward instead of one per sample and channel
    assert ours.forwards == 2 * (12 - DEAD) + 1


def test_upsampling_is_torchs_aligned_bilinear():
    a = np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32)
    want = torch.nn.UpsamplingBilinear2d(size=(13, 29))(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(upsample_bilinear_aligned(a, 13, 29), want, atol=1e-6)


@pytest.mark.parametrize("classes", [None, CLASSES])
def test_ablationcam_matches_pytorch_grad_cam(classes):
    model, onnx_bytes, x = small()
    with pgc.AblationCAM(model, [model.block], batch_size=5) as cam:
        want = cam(x, _torch_targets(classes))
    ours = onnxcam.AblationCAM(onnx_bytes, ["block"], device="cpu", batch_size=5)
    assert _diff(ours(x, classes), want) < TOL


def _ablation_reference(model, module, x, classes) -> np.ndarray:
    """Ablation-CAM by hand in torch: each channel of the sample set to 0 if the sample's smallest activation is 0,
    else to that minimum - 1e7, through the whole model (a forward hook replaces the module's output)."""
    from onnxcam.cam.postprocess import aggregate_layers, layer_map

    with torch.no_grad():
        seen = []
        hook = module.register_forward_hook(lambda m, i, o: seen.append(o))
        logits = model(x)
        hook.remove()
        a = seen[0]
        weights = np.zeros(a.shape[:2], np.float32)
        for n, k in enumerate(classes):
            low = a[n].min()
            fill = 0.0 if low == 0 else low - 1e7
            for ch in range(a.shape[1]):
                b = a[n:n + 1].clone()
                b[:, ch] = fill
                hook = module.register_forward_hook(lambda m, i, o, b=b: b)
                score = model(x[n:n + 1])[0, k]
                hook.remove()
                weights[n, ch] = (logits[n, k] - score) / logits[n, k]
    raw = (weights[:, :, None, None] * a.numpy()).sum(axis=1)
    return aggregate_layers([layer_map(raw, (SIZE, SIZE))])


def test_ablationcam_of_a_layer_with_negative_values_follows_its_rule():
    """At a BatchNorm output (no zero), every channel is ablated to min - 1e7; pytorch-grad-cam lowers the value by
    1e7 more per channel already ablated in its batch, so it differs there (documented in AblationCAM)."""
    model, onnx_bytes, x = small()
    want = _ablation_reference(model, model.stem, x, CLASSES)
    got = onnxcam.AblationCAM(onnx_bytes, ["stem"], device="cpu", batch_size=3)(x, CLASSES)
    assert _diff(got, want) < TOL
    with pgc.AblationCAM(model, [model.stem], batch_size=3) as cam:
        assert np.abs(cam(x, _torch_targets(CLASSES)) - want).max() > 1e-2


def test_ablationcam_runs_only_the_tail():
    """The ablations run the part after the layer: no node before it, the skip connection's output fed instead."""
    _, onnx_bytes, x = small()
    ours = onnxcam.AblationCAM(onnx_bytes, ["block"], device="cpu", batch_size=7)
    ours(x)
    ((_session, feeds),) = ours._tails.values()
    layer = ours.target_layers[0]
    assert feeds[0] == layer and len(feeds) == 2  # the layer, and the skip convolution's output
    proto = ours.explainer.proto
    nodes, _ = tail_nodes(proto, layer, ours.explainer.score_name)
    ops = sorted(n.op_type for n in nodes)
    assert ops.count("Conv") == 1 and "BatchNormalization" not in ops  # only self.conv runs again


def test_cut_tail_reproduces_the_whole_model():
    _, onnx_bytes, x = small()
    ex = onnxcam.Explainer(onnx_bytes, ["block"], device="cpu")
    layer = ex.layers[0]
    _, feeds = tail_nodes(ex.proto, layer, "logits")
    whole = onnxcam.AblationCAM(ex)
    values = dict(zip(["logits", *feeds], whole._forward(x.numpy(), ["logits", *feeds])))
    model, names = tail_model(ex.proto, layer, "logits", values)
    used = {t.name for t in model.graph.initializer}
    sess = cpu_session(model.SerializeToString(), {k: v for k, v in ex.weights.items() if k in used})
    got = sess.run(["logits"], {name: values[name] for name in names})[0]
    np.testing.assert_allclose(got, values["logits"], rtol=1e-5, atol=1e-6)


def test_cut_refuses_a_layer_the_score_does_not_read():
    _, onnx_bytes, _ = small()
    ex = onnxcam.Explainer(onnx_bytes, ["block"], device="cpu")
    with pytest.raises(LayerError, match="does not depend on layer"):
        tail_nodes(ex.proto, ex.layers[0], ex.proto.graph.input[0].name)


# ---- the registry and argument checks -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["randomcam", "fem", "finercam", "scorecam", "ablationcam", "fullgrad"])
def test_explain_knows_the_new_methods(method):
    _, onnx_bytes, x = small()
    e = onnxcam.explain(onnx_bytes, x.numpy(), method=method, layers=["block"], device="cpu")
    assert e.maps.shape == (2, SIZE, SIZE) and e.maps.dtype == np.float32
    assert np.all(e.maps.max(axis=(1, 2)) > 0.99) and e.logits.shape == (2, 10)


def test_bad_batch_size_is_one_clear_error():
    _, onnx_bytes, _ = small()
    for bad in (0, 2.5, True):
        with pytest.raises(InputError, match="batch_size"):
            onnxcam.ScoreCAM(onnx_bytes, ["block"], device="cpu", batch_size=bad)


def test_ablationcam_on_a_tail_that_reads_shape_tensors():
    """Lite0's tail after its last activation flattens with a shape vector computed for the run's batch ([n, -1]):
    it is fed as it is (not sliced per sample), and each ablation batch keeps the run's size. Batch 2 gives each
    sample's batch-1 map exactly (before: onnxruntime refused the tail's Reshape)."""
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    both = onnxcam.explain(onnxcam.BUNDLED_MODEL, x, method="ablationcam").maps
    for i in range(2):
        alone = onnxcam.explain(onnxcam.BUNDLED_MODEL, x[i:i + 1], method="ablationcam").maps
        np.testing.assert_allclose(both[i], alone[0], atol=1e-6)
    assert both.std() > 0


# ---- AblationCAM's ratio_channels_to_ablate -------------------------------------------------------------------------
def _selection_margins(a: np.ndarray, ratio: float) -> tuple[float, float]:
    """How far one sample's choice of channels is from changing: the smallest gap between the finite scores on
    either side of a cut (NaN scores, of constant channels, sort highest), and the projection's distance from 0.01."""
    from onnxcam.cam.projection import get_2d_projection

    proj = np.abs(get_2d_projection(a[None])[0])
    proj = (proj - proj.min()) / proj.max()
    flat = np.abs(a).reshape(len(a), -1)
    flat = flat - flat.min(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        scores = ((proj.reshape(-1) > 0.01) * flat).sum(1) / flat.sum(1)
    k, finite = int(len(a) * ratio), np.sort(scores[np.isfinite(scores)])
    top = k - (len(a) - len(finite))  # finite scores among the k highest
    gaps = [finite[k] - finite[k - 1]] + ([finite[-top] - finite[-top - 1]] if top > 0 else [])
    return min(gaps), float(np.abs(proj - 0.01).min())


@pytest.mark.parametrize("classes", [None, CLASSES])
def test_ablationcam_ratio_matches_pytorch_grad_cam(classes):
    model, onnx_bytes, x = small()
    with pgc.AblationCAM(model, [model.block], batch_size=5, ratio_channels_to_ablate=0.25) as cam:
        want = cam(x, _torch_targets(classes))
    ours = onnxcam.AblationCAM(onnx_bytes, ["block"], device="cpu", batch_size=5, ratio_channels_to_ablate=0.25)
    got = ours(x, classes)
    assert _diff(got, want) < TOL
    # By construction, not by luck: 3 of the 12 channels are the dead ones (NaN scores, the highest), 3 the lowest
    # scores, and each cut and the 0.01 threshold are 1e-5 away at least, 10x the relative difference between
    # onnxruntime's and torch's activations here (~1e-6).
    for a in ours.result.activations[ours.target_layers[0]]:
        gap, threshold = _selection_margins(np.float64(a), 0.25)
        assert gap > 1e-5 and threshold > 1e-5
    with pgc.AblationCAM(model, [model.block], batch_size=5) as cam:
        assert np.abs(cam(x, _torch_targets(classes)) - got).max() > 1e-2  # the ratio changes the map


def test_ablationcam_ratio_above_half_ablates_every_channel_once():
    """From 0.5 up the highest and lowest int(C * ratio) cover every channel: the map is the full ablation's.
    pytorch-grad-cam ablates the overlap twice, and its bookkeeping then gives every channel after the first repeated
    one its original score (weight 0), so its map differs from its own full ablation (documented in AblationCAM)."""
    model, onnx_bytes, x = small()
    full = onnxcam.AblationCAM(onnx_bytes, ["block"], device="cpu")(x, CLASSES)
    half = onnxcam.AblationCAM(onnx_bytes, ["block"], device="cpu", batch_size=4, ratio_channels_to_ablate=0.75)
    np.testing.assert_array_equal(half(x, CLASSES), full)
    with pgc.AblationCAM(model, [model.block], batch_size=4, ratio_channels_to_ablate=0.75) as cam:
        assert np.abs(cam(x, _torch_targets(CLASSES)) - full).max() > 1e-2


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, "half", True])
def test_ablationcam_bad_ratio_is_one_clear_error(bad):
    _, onnx_bytes, _ = small()
    with pytest.raises(InputError, match="ratio_channels_to_ablate"):
        onnxcam.AblationCAM(onnx_bytes, ["block"], device="cpu", ratio_channels_to_ablate=bad)
