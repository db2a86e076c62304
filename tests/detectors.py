"""Shared pieces of the whole-detector tests (SSDlite, RetinaNet, Faster R-CNN from torchvision): the wrapper that
returns one image's detections, the seeded BatchNorm statistics, and the one TorchScript export they all use."""

from __future__ import annotations

import io

import numpy as np
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


class HeadLogits(nn.Module):
    """A whole torchvision detector (Whole) up to its heads' class logits: the part with kinks on the score's path
    (the post-processing's clamps and TopK only choose boxes). SSDlite and RetinaNet alike."""

    def __init__(self, model: Whole):
        super().__init__()
        self.model = model

    def forward(self, x):
        net = self.model.model
        images, _ = net.transform(list(x))
        return net.head(list(net.backbone(images.tensors).values()))["cls_logits"]


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


def conv_stage(cin: int, cout: int) -> nn.Sequential:
    """A stride-2 3x3 conv, BatchNorm and ReLU: the stages of the miniature backbones."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def close(got: np.ndarray, want: np.ndarray, tol: float = 1e-4) -> float:
    """Asserts the largest error relative to the largest reference value is under tol; returns it."""
    err = float(np.abs(np.float64(got) - want).max() / (np.abs(want).max() + 1e-30))
    assert err < tol, f"relative error {err:.2e}"
    return err


def two_targets(selection, first, found: list) -> tuple[list, int]:
    """The best detection by index and, by a slightly moved box and its label, the one whose score is clearest of
    the others (index k): both clear of every other score by far more than float32 error, so float64 keeps their
    ranks and the selection. (targets, k)."""
    from onnxcam.tasks import detect

    scores = np.array([d.score for d in found])
    gaps = [np.delete(np.abs(scores - s), i).min() for i, s in enumerate(scores)]
    k = 1 + int(np.argmax(gaps[1:]))
    assert gaps[0] > 1e-5 and gaps[k] > 1e-5 and scores[0] == scores.max()
    b = found[k].box
    targets = [detect.SelectedDetectionTarget(selection, first.outputs, index=0),
               detect.SelectedDetectionTarget(selection, first.outputs, label=found[k].label,
                                              box=(b[0] + 1.5, b[1] - 1.0, b[2] + 0.5, b[3] + 1.0))]
    assert targets[1].match(first.logits[0]).index == k
    return targets, k


def check_gradcam(cam, layer: str, act64: torch.Tensor, score64: torch.Tensor) -> None:
    """The CAM's last call against float64 autograd: the layer's activations, the score's gradient there and the
    raw Grad-CAM map (channel means of the gradient times the activations)."""
    r = cam.result
    close(r.activations[layer], act64.detach().numpy(), 1e-5)
    want = torch.autograd.grad(score64, act64, retain_graph=True)[0].numpy()
    assert np.abs(want).max() > 0
    close(r.gradients[layer], want)
    weights = want.mean(axis=(2, 3))
    close(cam.raw[layer], (weights[:, :, None, None] * act64.detach().numpy()).sum(axis=1))
