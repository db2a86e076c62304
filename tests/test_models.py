"""Whole torchvision models, both torch exporters, three stages each: onnxcam's gradients equal float64
torch.autograd's at the same module outputs (a tensor hook on the module output), batch 2, explicit and default
targets. Models get seeded random weights; nothing is downloaded.

The float64 reference takes, at every ReLU-like op and max pool, the branch that onnxruntime's float32 forward of
the exported model takes (tests/kinks.py): no random input is clear of float32's reach at every kink of these
nets (inception_v3 has dozens of max-pool near-ties that rounding can flip, each moving Mixed_5b's gradient by
up to 6e-3), so only a reference on the runtime's own piece makes a mismatch mean a wrong gradient graph.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import numpy as np
import pytest
import torch

import onnxcam

from .kinks import KinkMode, kink_inputs, onnx_kink_inputs
from .torch_models import export, find_tensor, make_model, rel_err, torch_gradients

# model -> (input size, early / middle / last stage modules)
STAGES = {
    "resnet18": (64, ["layer1", "layer3", "layer4"]),
    "resnet50": (64, ["layer1", "layer3", "layer4"]),
    "vgg11": (224, ["features.4", "features.12", "features.20"]),
    "mobilenet_v2": (64, ["features.3", "features.10", "features.18"]),
    "mobilenet_v3_small": (64, ["features.2", "features.7", "features.12"]),
    "efficientnet_b0": (64, ["features.2", "features.5", "features.8"]),
    "densenet121": (64, ["features.denseblock1", "features.denseblock3", "features"]),
    "convnext_tiny": (64, ["features.1", "features.5", "features.7"]),
    "regnet_y_400mf": (64, ["trunk_output.block1", "trunk_output.block3", "trunk_output.block4"]),
    "squeezenet1_1": (64, ["features.3", "features.7", "features.12"]),
    "inception_v3": (160, ["Mixed_5b", "Mixed_6a", "Mixed_7c"]),
}
EXPORTERS = ["torchscript", "dynamo"]
EXPLICIT = [5, 17]


TOL = 1e-4


@functools.cache
def _model_and_input(name):
    """The seeded model, a seeded input and the kink inputs of its float64 forward, made once for both exporters."""
    size, _ = STAGES[name]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    model = make_model(name)
    return model, x, kink_inputs(copy.deepcopy(model).double(), x.double())


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(STAGES))
def test_gradients_match_torch(name, exporter):
    modules = STAGES[name][1]
    model, x, kinks64 = _model_and_input(name)
    explicit = EXPLICIT
    onnx_model = export(model, x, exporter)
    seen, ort_logits = onnx_kink_inputs(onnx_model, x, kinks64)
    logits, acts, _ = torch_gradients(model, x, modules, [0, 0], follow=seen)
    layers = [find_tensor(onnx_model, x.numpy(), a) for a in acts]
    ex = onnxcam.Explainer(onnx_model, layers=layers, device="cpu")

    _, _, want = torch_gradients(model, x, modules, explicit, follow=seen)
    r = ex.run(x.numpy(), targets=explicit)
    assert rel_err(r.logits, logits) < TOL
    for layer, a, g in zip(layers, acts, want):
        assert rel_err(r.activations[layer], a) < TOL, layer
        assert rel_err(r.gradients[layer], g) < TOL, f"{name}/{exporter} {layer}: {rel_err(r.gradients[layer], g)}"

    top = np.argmax(ort_logits, axis=1)  # the runtime's float32 argmax: a near-tie of the top two follows it too
    _, _, want = torch_gradients(model, x, modules, top, follow=seen)
    r = ex.run(x.numpy())
    np.testing.assert_array_equal(r.targets, top)
    for layer, g in zip(layers, want):
        assert rel_err(r.gradients[layer], g) < TOL, f"{name}/{exporter} default target {layer}"


def test_default_layer_is_the_last_spatial_stage():
    model = make_model("resnet18")
    x = torch.randn(2, 3, 64, 64)
    onnx_model = export(model, x, "torchscript")
    _, acts, _ = torch_gradients(model, x, ["layer4"], [0, 0])
    assert onnxcam.Explainer(onnx_model, device="cpu").layers == [find_tensor(onnx_model, x.numpy(), acts[0])]


def test_fixed_batch_export_runs_larger_batches():
    """A dynamo export with the batch fixed at 1 still explains a batch of 3 (one sample at a time)."""
    model = make_model("resnet18")
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    path = export(model, x[:1], "dynamo", dynamic_batch=False)
    logits, acts, want = torch_gradients(model, x, ["layer3"], [1, 2, 3])
    layer = find_tensor(path, x[:1].numpy(), acts[0][:1])
    r = onnxcam.Explainer(path, layers=[layer], device="cpu").run(x.numpy(), targets=[1, 2, 3])
    assert r.gradients[layer].shape == want[0].shape
    assert rel_err(r.gradients[layer], want[0]) < TOL
    assert rel_err(r.logits, logits) < TOL


class _AtKink(torch.nn.Module):
    """op(x - 1 + point). At x = 1 + 1e-9 n float32 rounds x to 1, so its forward sits exactly on the kink
    everywhere (a max pool sees ties only), while float64's lies on either side of it."""

    def __init__(self, op, point):
        super().__init__()
        self.op, self.point = op, point

    def forward(self, x):
        return self.op(x - 1 + self.point)


@pytest.mark.parametrize(("op", "point"), [
    (torch.nn.ReLU(), 0.0), (torch.nn.ReLU6(), 0.0), (torch.nn.ReLU6(), 6.0), (torch.nn.Hardswish(), -3.0),
    (torch.nn.Hardswish(), 3.0), (torch.nn.Hardsigmoid(), -3.0), (torch.nn.Hardsigmoid(), 3.0),
    (torch.nn.MaxPool2d(3, 2), 0.5),
], ids=["relu", "relu6-0", "relu6-6", "hardswish-3", "hardswish+3", "hardsigmoid-3", "hardsigmoid+3", "maxpool"])
def test_reference_follows_float32_branches(op, point):
    """A float64 forward that follows the float32 forward's kink inputs has float32 autograd's gradient, where
    the float64 forward left to itself takes other branches (so the plain reference differs by O(1))."""
    model = _AtKink(op, point)
    x = 1 + 1e-9 * torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(model(x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def gradient(x, follow=None):
        x = x.clone().requires_grad_()
        with KinkMode(follow) if follow is not None else contextlib.nullcontext():
            y = model(x)
        return torch.autograd.grad((y * w.to(x.dtype)).sum(), x)[0].double().numpy()

    want = gradient(x.float())
    seen = [z.numpy() for z in kink_inputs(model, x.float())]
    assert all((z == point).all() for z in seen)  # float32 is on the kink
    assert rel_err(gradient(x, seen), want) < 1e-6
    assert rel_err(gradient(x), want) > 0.1
