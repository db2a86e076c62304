"""ShapleyCAM (arXiv 2501.06261): parity with pytorch-grad-cam 1.5.7's on the same model, input, layer and targets,
and its Hessian-vector product checked on its own against float64 torch autograd.

The smooth model puts SiLU, GELU and Sigmoid between the target layer and a linear head, so the gradient depends on
the activation and H A is far from zero: the tests assert that it moves the maps well beyond the tolerance (a
ShapleyCAM without its second-order term would fail the parity). On a ReLU / global-average-pooling / linear head the
gradient does not depend on the activation at all (ReLU masks carry no gradient): H A is exactly zero and ShapleyCAM
is Grad-CAM. The models have no kinks after the layer, or (ReLU model) inputs whose pre-activations are far from 0.
"""

from __future__ import annotations

import copy
import functools
import io

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils import model_targets as torch_targets

import onnxcam
from onnxcam.errors import InputError, UnsupportedOpError
from onnxcam.targets import (
    ClassifierOutputReST,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
    FinerWeightedTarget,
)

TOL = 1e-4
SIZE = 16
CLASSES = [2, 4]
TARGETS = {  # name: (onnxcam target, pytorch-grad-cam target)
    "class": (ClassifierOutputTarget, torch_targets.ClassifierOutputTarget),
    "softmax": (ClassifierOutputSoftmaxTarget, torch_targets.ClassifierOutputSoftmaxTarget),
    "rest": (ClassifierOutputReST, torch_targets.ClassifierOutputReST),
}


class Smooth(torch.nn.Module):
    """conv-SiLU (the target layer: `act`), then conv-GELU, conv-Sigmoid, global average pooling and a linear head;
    tail "pool" puts a 2x2 MaxPool before the Sigmoid (its gradient is a ScatterElements, differentiated again),
    tail "abs_scatter" an absolute value with some channels overwritten (Abs's gradient reads Sign; the write is a
    ScatterND whose gradients are a ScatterND and a GatherND: all differentiated again), tail "scatter" a
    torch.scatter (ScatterElements: its updates' gradient is a GatherElements, differentiated again), tail "gather"
    a torch.gather (GatherElements, whose gradient is a ScatterElements), tail "gru" a GRU along the positions (its
    gradient is a Scan, which has no rule)."""

    def __init__(self, tail: str = ""):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.act = torch.nn.SiLU()
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.gelu = torch.nn.GELU()
        self.conv3 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.tail = {"pool": torch.nn.MaxPool2d(2), "abs_scatter": _AbsScatter(), "scatter": _Scatter(),
                     "gather": _Gather(), "gru": _Gru()}.get(tail, torch.nn.Identity())
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        h = self.gelu(self.conv2(self.act(self.conv1(x))))
        return self.fc(torch.sigmoid(self.tail(self.conv3(h))).mean((2, 3)))


class _AbsScatter(torch.nn.Module):
    """|x| with channels 1, 3, 6 overwritten by tanh of channels 0, 2, 5 (index_put: a ScatterND with indices
    computed at run time from the batch size)."""

    def forward(self, x):
        y = x.abs()
        y[:, [1, 3, 6]] = torch.tanh(x[:, [0, 2, 5]])
        return y


class _Scatter(torch.nn.Module):
    """x with channel 0 of each position replaced by tanh(x) of channel 1 (torch.scatter: a ScatterElements)."""

    def forward(self, x):
        return x.scatter(1, torch.zeros_like(x[:, :1], dtype=torch.long), torch.tanh(x[:, 1:2]))


class _Gather(torch.nn.Module):
    """Channels 0, 0, 3, 1, 5, 7, 7, 2 of x (torch.gather with indices expanded to x's shape at run time: a
    GatherElements reading channels 0 and 7 twice, so their gradients add up, and channels 4 and 6 not at all)."""

    def forward(self, x):
        index = torch.tensor([0, 0, 3, 1, 5, 7, 7, 2]).view(1, 8, 1, 1).expand_as(x)
        return x.gather(1, index)


class _Gru(torch.nn.Module):
    """A GRU over the positions of x, read as a sequence of 8-channel vectors."""

    def __init__(self):
        super().__init__()
        self.gru = torch.nn.GRU(8, 8, batch_first=True)

    def forward(self, x):
        y, _ = self.gru(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape_as(x)


class ReluHead(torch.nn.Module):
    """conv-ReLU-conv-ReLU (the target layer: `act`), global average pooling, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.act = torch.nn.ReLU()
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.act(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def _export(model: torch.nn.Module, x: torch.Tensor, dynamic_batch: bool = True, opset: int | None = None) -> bytes:
    f = io.BytesIO()
    torch.onnx.export(model, x, f, dynamo=False, input_names=["x"], output_names=["logits"], opset_version=opset,
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}} if dynamic_batch else None)
    return f.getvalue()


@functools.cache
def smooth(tail: str = "", opset: int | None = None) -> tuple[torch.nn.Module, bytes, torch.Tensor]:
    torch.manual_seed(0)
    model = Smooth(tail).eval()
    with torch.no_grad():  # larger pre-activations: more curvature, H A / 2 at 20-40% of the gradient's weights
        for conv in (model.conv1, model.conv2, model.conv3):
            conv.weight *= 2
    for seed in range(100):  # an input clear of max-pool ties (pool) and of Abs's kink at 0 (abs_scatter)
        x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
        if _kink_gap(model, x, tail) > 1e-4:  # float32's error here is ~1e-6
            return model, _export(model, x, opset=opset), x
    raise AssertionError(f"no input clear of the kinks of tail {tail!r}")


def _kink_gap(model, x, tail: str) -> float:
    """In float64, how far the tail's input is from a kink: the smallest difference between the two largest values
    of a 2x2 max-pool window, or the smallest |x| before Abs."""
    if tail not in ("pool", "abs_scatter"):
        return np.inf
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        h = m.conv3(m.gelu(m.conv2(m.act(m.conv1(x.double())))))
    if tail == "abs_scatter":
        return float(h.abs().min())
    top2 = torch.nn.functional.unfold(h, 2, stride=2).reshape(h.shape[0], h.shape[1], 4, -1).topk(2, dim=2).values
    return float((top2[:, :, 0] - top2[:, :, 1]).min())


@functools.cache
def relu_head() -> tuple[torch.nn.Module, bytes, torch.Tensor]:
    torch.manual_seed(1)
    model = ReluHead().eval()
    for seed in range(100):  # an input whose ReLU inputs are all clear of the kink at 0
        x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            h1 = model.conv1(x)
            h2 = model.conv2(torch.relu(h1))
        if min(h1.abs().min(), h2.abs().min()) > 1e-4:  # float32's error here is ~1e-6
            return model, _export(model, x), x
    raise AssertionError("no input clear of the ReLU kinks")


def _reference(model, x, targets, cls=pgc.ShapleyCAM) -> np.ndarray:
    """pytorch-grad-cam's maps for `targets` on the module `act`."""
    model = copy.deepcopy(model)
    with cls(model=model, target_layers=[model.act]) as cam:
        return cam(input_tensor=x, targets=targets)


def _torch_hvp(model, x, category: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(g, H A) at `act` in float64 by double backward: g = dT/dA, H A = d<g, stop(A)>/dA."""
    model = copy.deepcopy(model).double()
    seen = {}
    hook = model.act.register_forward_hook(lambda m, i, out: seen.setdefault("a", out))
    z = model(x.double())
    hook.remove()
    a = seen["a"]
    if kind == "class":
        t = z[:, category]
    elif kind == "softmax":
        t = torch.softmax(z, -1)[:, category]
    else:
        t = z[:, category] - torch.nn.functional.cross_entropy(z, torch.full((len(z),), category), reduction="none")
    g = torch.autograd.grad(t.sum(), a, create_graph=True)[0]
    hvp = torch.autograd.grad(g, a, grad_outputs=a.detach())[0]
    return g.detach().numpy(), hvp.numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("tail", ["", "pool"])
@pytest.mark.parametrize("kind", list(TARGETS))
def test_matches_pytorch_grad_cam_and_the_hessian_term_counts(kind, tail):
    model, onnx_model, x = smooth(tail)
    ours, theirs = TARGETS[kind]
    cam = onnxcam.ShapleyCAM(onnx_model, ["act"], device="cpu")
    got = cam(x, [ours(c) for c in CLASSES])
    want = _reference(model, x, [theirs(c) for c in CLASSES])
    assert got.shape == want.shape == (2, SIZE, SIZE)
    assert np.abs(got - want).max() < TOL
    assert list(cam.result.targets) == CLASSES
    # without the Hessian term the maps would be Grad-CAM's: far from these
    gradcam = _reference(model, x, [theirs(c) for c in CLASSES], pgc.GradCAM)
    assert np.abs(gradcam - want).max() > 100 * TOL
    layer = cam.target_layers[0]
    hvp, g = cam.hvp[layer], cam.result.gradients[layer]
    assert np.abs(0.5 * hvp.mean((2, 3))).max() > 0.1 * np.abs(g.mean((2, 3))).max()


@pytest.mark.parametrize("tail", ["", "pool", "abs_scatter", "scatter", "gather"])
@pytest.mark.parametrize("kind", list(TARGETS))
def test_hessian_vector_product_matches_float64_autograd(kind, tail):
    model, onnx_model, x = smooth(tail)
    cam = onnxcam.ShapleyCAM(onnx_model, ["act"], device="cpu")
    cam(x, [TARGETS[kind][0](c) for c in CLASSES])
    layer = cam.target_layers[0]
    for i, c in enumerate(CLASSES):
        g, hvp = _torch_hvp(model, x[i:i + 1], c, kind)
        assert _rel(cam.result.gradients[layer][i:i + 1], g) < 1e-5
        assert _rel(cam.hvp[layer][i:i + 1], hvp) < 1e-5


@pytest.mark.parametrize("tail", ["scatter", "gather"])
def test_hessian_vector_product_below_opset_16(tail):
    """ScatterElements cannot add before opset 16, so GatherElements' gradient with indices computed at run time is
    a one-hot sum: emitted by the second walk (scatter), or by the first and differentiated again (gather)."""
    model, onnx_model, x = smooth(tail, opset=13)
    assert onnx.load_from_string(onnx_model).opset_import[0].version == 13
    cam = onnxcam.ShapleyCAM(onnx_model, ["act"], device="cpu")
    cam(x, [ClassifierOutputSoftmaxTarget(c) for c in CLASSES])
    layer = cam.target_layers[0]
    for i, c in enumerate(CLASSES):
        g, hvp = _torch_hvp(model, x[i:i + 1], c, "softmax")
        assert _rel(cam.result.gradients[layer][i:i + 1], g) < 1e-5
        assert _rel(cam.hvp[layer][i:i + 1], hvp) < 1e-5


def test_default_target_is_the_top_class_and_targets_mix_in_one_batch():
    model, onnx_model, x = smooth()
    cam = onnxcam.ShapleyCAM(onnx_model, ["act"], device="cpu")
    top = cam(x)
    with torch.no_grad():
        classes = model(x).argmax(1).tolist()
    assert list(cam.result.targets) == classes
    want = _reference(model, x, [torch_targets.ClassifierOutputTarget(c) for c in classes])
    assert np.abs(top - want).max() < TOL
    mixed = cam(x, [ClassifierOutputSoftmaxTarget(2), ClassifierOutputReST(4)])
    for i, target in enumerate([torch_targets.ClassifierOutputSoftmaxTarget(2), torch_targets.ClassifierOutputReST(4)]):
        want = _reference(model, x[i:i + 1], [target])
        assert np.abs(mixed[i:i + 1] - want).max() < TOL


def test_relu_gap_linear_head_is_gradcam():
    model, onnx_model, x = relu_head()
    targets = [ClassifierOutputTarget(c) for c in CLASSES]
    cam = onnxcam.ShapleyCAM(onnx_model, ["act"], device="cpu")
    got = cam(x, targets)
    layer = cam.target_layers[0]
    assert not np.any(cam.hvp[layer])
    np.testing.assert_array_equal(got, onnxcam.GradCAM(onnx_model, ["act"], device="cpu")(x, targets))
    want = _reference(model, x, [torch_targets.ClassifierOutputTarget(c) for c in CLASSES])
    assert np.abs(got - want).max() < TOL


def test_several_layers_each_get_their_own_product():
    """Each layer's H A is d<g_l, A_l>/dA_l of its own gradient, as with that layer alone (pytorch-grad-cam 1.5.7's
    ShapleyCAM cannot take two layers: its second autograd.grad runs through the graph the first one freed)."""
    _, onnx_model, x = smooth()
    targets = [ClassifierOutputReST(c) for c in CLASSES]
    both = onnxcam.ShapleyCAM(onnx_model, ["act", "gelu"], device="cpu")
    both(x, targets)
    for name, layer in zip(["act", "gelu"], both.target_layers):
        alone = onnxcam.ShapleyCAM(onnx_model, [name], device="cpu")
        alone(x, targets)
        assert np.any(both.hvp[layer])
        np.testing.assert_allclose(both.hvp[layer], alone.hvp[layer], rtol=0, atol=1e-6 * np.abs(alone.hvp[layer]).max())
        np.testing.assert_allclose(both.raw[layer], alone.raw[layer], rtol=0, atol=1e-6 * np.abs(alone.raw[layer]).max())


def test_eigen_smooth_and_a_batch_fixed_at_one():
    model, onnx_model, x = smooth()
    targets = [ClassifierOutputSoftmaxTarget(c) for c in CLASSES]
    got = onnxcam.ShapleyCAM(onnx_model, ["act"], device="cpu")(x, targets, eigen_smooth=True)
    model = copy.deepcopy(model)
    with pgc.ShapleyCAM(model=model, target_layers=[model.act]) as cam:
        want = cam(input_tensor=x, targets=[torch_targets.ClassifierOutputSoftmaxTarget(c) for c in CLASSES],
                   eigen_smooth=True)
    assert np.abs(got - want).max() < TOL
    one = onnxcam.ShapleyCAM(_export(model, x[:1], dynamic_batch=False), ["act"], device="cpu")
    assert one.explainer.analysis.fixed_batch == 1
    np.testing.assert_allclose(one(x, targets, eigen_smooth=True), got, rtol=0, atol=1e-6)


def test_reachable_by_name():
    _, onnx_model, x = smooth()
    e = onnxcam.explain(onnx_model, x.numpy(), "shapleycam", targets=CLASSES, layers=["act"], device="cpu")
    cam = onnxcam.ShapleyCAM(onnx_model, ["act"], device="cpu")
    np.testing.assert_array_equal(e.maps, cam(x, CLASSES))


def test_targets_without_a_second_derivative_are_refused():
    _, onnx_model, x = smooth()
    cam = onnxcam.ShapleyCAM(onnx_model, ["act"], device="cpu")
    with pytest.raises(InputError, match="FinerWeightedTarget.*second derivative"):
        cam(x, [FinerWeightedTarget(2, [3], 1.0)] * 2)


def test_an_op_without_a_rule_in_the_gradient_graph_is_named():
    """A GRU's gradient runs its backward recurrence in a Scan; differentiating it again needs a rule for Scan,
    which has none."""
    _, onnx_model, x = smooth("gru")
    cam = onnxcam.ShapleyCAM(onnx_model, ["act"], device="cpu")
    with pytest.raises(UnsupportedOpError, match="ShapleyCAM differentiates the gradient graph .*: .*Scan"):
        cam(x, CLASSES)
