"""Explicit Pad nodes before convolutions, as TF-style "same" padding exports them (efficientnet-lite's
static_padding, tf2onnx): the gradient folds the Pad's crop into the adjoint convolution where it can.
Checked against float64 torch.autograd on a small network that has every case: stride-1 pads folded into the
adjoint Conv, asymmetric pads before a depthwise stride-2 convolution (a ConvTranspose, then a Slice), a pad
wider than the kernel's reach (no fold: a Slice), ReLU6 and ReLU masks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import onnxcam

from .torch_models import export, find_tensor, rel_err, torch_gradients, well_conditioned_input


class PaddedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 8, 3, stride=2), nn.ReLU6())
        self.block = nn.Sequential(
            nn.ZeroPad2d(1), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU6(),            # fold into the adjoint Conv
            nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(8, 8, 5, stride=2, groups=8),   # ConvTranspose, Slice
            nn.ReLU(),
            nn.ZeroPad2d(3), nn.Conv2d(8, 12, 3), nn.ReLU6(),                     # pad > kernel reach: a Slice
        )
        self.head = nn.Sequential(nn.Conv2d(12, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


MODULES = ["stem", "block.2"]


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = PaddedNet().eval()
    for p in model.parameters():  # biases that put the ReLU6 bounds within reach of the activations
        if p.ndim == 1:
            nn.init.uniform_(p, -0.5, 0.5)
    x = well_conditioned_input(model, 32, MODULES, [3, 7])
    return model, x


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_gradients_through_explicit_pads_match_torch(case, exporter):
    model, x = case
    onnx_model = export(model, x, exporter)
    logits, acts, want = torch_gradients(model, x, MODULES, [3, 7])
    layers = [find_tensor(onnx_model, x.numpy(), a) for a in acts]
    r = onnxcam.Explainer(onnx_model, layers=layers, device="cpu").run(x.numpy(), targets=[3, 7])
    assert rel_err(r.logits, logits) < 1e-5
    for layer, g in zip(layers, want):
        assert rel_err(r.gradients[layer], g) < 1e-5, layer


def test_pad_crops_fold_into_the_adjoint_conv(case):
    """A crop is a copy: the stride-1 convolution's Pad folds into its adjoint Conv's pads, the others stay."""
    model, x = case
    onnx_model = export(model, x, "torchscript")
    _, acts, _ = torch_gradients(model, x, ["stem"], [0, 0])
    ex = onnxcam.Explainer(onnx_model, layers=[find_tensor(onnx_model, x.numpy(), acts[0])], device="cpu")
    grad = [n for n in ex.explainable_model.graph.node if n.name.startswith("onnxcam_grad/")]
    # Crops are the Slices without steps (the kernel flips have steps): the stride-2 one's and the wide one's.
    assert sum(1 for n in grad if n.op_type == "Slice" and len(n.input) == 4) == 2
