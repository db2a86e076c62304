"""Shared pieces of the whole-detector tests (SSDlite, RetinaNet, Faster R-CNN from torchvision): the wrapper that
returns one image's detections, the seeded BatchNorm statistics, and the one TorchScript export they all use."""

from __future__ import annotations

import io

import torch
from torch import nn


class Whole(nn.Module):
    """The detector on a (1, 3, H, W) batch, returning the first image's boxes, scores and labels."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        found = self.model(x)[0]
        return found["boxes"], found["scores"], found["labels"]


def seed_batchnorm(net: nn.Module) -> None:
    """Fresh BatchNorm layers are the identity: statistics seeded per layer (by its width) make the folded
    Conv+BN gradients non-trivial. In-place activations are turned off so forward hooks see what was computed."""
    for m in net.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
        if isinstance(m, nn.BatchNorm2d):
            g = torch.Generator().manual_seed(m.num_features)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def export_whole(net: nn.Module, size: int) -> tuple[Whole, bytes, torch.Tensor]:
    """(the detector wrapped by Whole in eval mode, its TorchScript export at opset 17 with outputs boxes, scores and
    labels, a seeded (1, 3, size, size) input)."""
    model = Whole(net).eval()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    f = io.BytesIO()
    torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17, input_names=["images"],
                      output_names=["boxes", "scores", "labels"])
    return model, f.getvalue(), x
