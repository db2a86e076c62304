"""Whole torchvision models, both torch exporters, three stages each: onnxcam's gradients equal float64
torch.autograd's at the same module outputs (a tensor hook on the module output), batch 2, explicit and default
targets. Models get seeded random weights; nothing is downloaded. Inputs are chosen away from float32 kinks
(torch_models.well_conditioned_input), so a mismatch means a wrong gradient graph, not rounding.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import onnxcam

from .torch_models import export, find_tensor, make_model, rel_err, torch_gradients, well_conditioned_input

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


@functools.cache
def _model_and_input(name):
    """The seeded model and its well-conditioned input, found once for both exporters."""
    size, modules = STAGES[name]
    model = make_model(name)
    return model, well_conditioned_input(model, size, modules, EXPLICIT)
TOL = 1e-4


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(STAGES))
def test_gradients_match_torch(name, exporter):
    modules = STAGES[name][1]
    model, x = _model_and_input(name)
    explicit = EXPLICIT
    onnx_model = export(model, x, exporter)
    logits, acts, _ = torch_gradients(model, x, modules, [0, 0])
    layers = [find_tensor(onnx_model, x.numpy(), a) for a in acts]
    ex = onnxcam.Explainer(onnx_model, layers=layers, device="cpu")

    _, _, want = torch_gradients(model, x, modules, explicit)
    r = ex.run(x.numpy(), targets=explicit)
    assert rel_err(r.logits, logits) < TOL
    for layer, a, g in zip(layers, acts, want):
        assert rel_err(r.activations[layer], a) < TOL, layer
        assert rel_err(r.gradients[layer], g) < TOL, f"{name}/{exporter} {layer}: {rel_err(r.gradients[layer], g)}"

    top = np.argmax(logits, axis=1)
    _, _, want = torch_gradients(model, x, modules, top)
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
