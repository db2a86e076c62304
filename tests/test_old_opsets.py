"""Old opsets (9-12): torch exports with axes as attributes, Upsample, attribute Clip and the pre-13 Softmax,
explained by onnxcam and compared with torch.autograd in float64 at the same layers.

Each case exports a small model at one opset (torch.onnx.export, dynamo=False), explains a few layers in one run
and checks activations (relative error <= 1e-5) and gradients of the summed target logits (<= 1e-4), both as
||onnxcam - torch|| / ||torch||.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import onnxcam

ACT_RTOL, GRAD_RTOL = 1e-5, 1e-4
TARGETS = [3, 7]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class Tiny(nn.Module):
    """Each explained layer adds ops to its path: relu4 (Flatten, Gemm), conv3 (a channel Softmax gate, Mul,
    fan-out),
    clip (nearest Upsample/Resize), relu1 (MaxPool, attribute Clip). The model ends in Softmax."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.clip = nn.ReLU6()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.gate = nn.Softmax(dim=1)
        self.conv4 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.relu4 = nn.ReLU()
        self.fc = nn.Linear(6 * 4 * 4, 10)
        self.softmax = nn.Softmax(dim=1)

    def logits(self, x):
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.up(self.clip(self.conv2(x)))
        x = self.conv3(x)
        x = x * self.gate(x)
        x = self.relu4(self.conv4(x))
        return self.fc(torch.flatten(x, 1))

    def forward(self, x):
        return self.softmax(self.logits(x))


class Bilinear(nn.Module):
    """Bilinear upsampling (align_corners=False) between convolutions, no pooling on the path."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.relu1 = nn.ReLU()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.clip = nn.Hardtanh(-1.0, 2.0)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 10)

    def logits(self, x):
        x = self.up(self.relu1(self.conv1(x)))
        x = self.clip(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))

    def forward(self, x):
        return torch.log_softmax(self.logits(x), dim=1)


class Classifier(nn.Module):
    """A torchvision network (in-place ReLUs off, so module outputs stay as computed) followed by a Softmax."""

    def __init__(self, name: str):
        super().__init__()
        import torchvision

        self.net = getattr(torchvision.models, name)(weights=None, num_classes=10)
        for m in self.net.modules():
            if hasattr(m, "inplace"):
                m.inplace = False

    def logits(self, x):
        return self.net(x)

    def forward(self, x):
        return torch.softmax(self.net(x), dim=1)


def resnet18():
    return Classifier("resnet18")


def squeezenet1_1():
    return Classifier("squeezenet1_1")


def _export(model: nn.Module, x: torch.Tensor, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return onnx.load_from_string(buf.getvalue())


def _module_tensor(proto: onnx.ModelProto, module: str) -> str:
    """The ONNX tensor a module's output became: the output of the last node in the module's scope.

    torch names scopes by attribute path, a Sequential child as "<parent>.<index>": net.features.3 is
    /net/features/features.3/.
    """
    parts = []
    for p in module.split("."):
        parts.append(f"{parts[-1]}.{p}" if p.isdigit() else p)
    scope = "/" + "/".join(parts) + "/"
    outs = [n.output[0] for n in proto.graph.node if n.name.startswith(scope)]
    assert outs, f"no node of module {module!r} in the export; nodes: {[n.name for n in proto.graph.node]}"
    return outs[-1]


def _torch_reference(model: nn.Module, x: np.ndarray, modules: list[str], targets) -> tuple[dict, dict]:
    """Activations and d(sum of target logits)/d(activation) per module, in float64."""
    model = model.double().eval()
    acts = {}
    hooks = []
    for name in modules:
        def hook(_, __, out, name=name):
            out.retain_grad()
            acts[name] = out
        hooks.append(dict(model.named_modules())[name].register_forward_hook(hook))
    logits = model.logits(torch.from_numpy(x.astype(np.float64)))
    logits[torch.arange(len(targets)), torch.tensor(targets)].sum().backward()
    for h in hooks:
        h.remove()
    model.float()
    return ({k: v.detach().numpy() for k, v in acts.items()}, {k: v.grad.numpy() for k, v in acts.items()})


OPSETS = (9, 10, 11, 12)
# (model, module, opsets): one case per opset, so each failure names the op that breaks it.
LAYERS = [(Tiny, "relu4", OPSETS), (Tiny, "conv3", OPSETS), (Tiny, "clip", OPSETS), (Tiny, "relu1", OPSETS),
          (Bilinear, "clip", (11, 12)), (Bilinear, "relu1", (11, 12)),
          # torchvision at 64x64: ceil_mode MaxPools and Fire Concats mid-network, residual Adds.
          (squeezenet1_1, "net.features.3", (10,)), (squeezenet1_1, "net.features.12", (10,)),
          (resnet18, "net.layer1", (9,)), (resnet18, "net.layer3", (9,))]
# Bilinear at opsets 9-10 is left out on purpose: torch exports it as Upsample/Resize "linear" with asymmetric
# coordinates, which computes something else than torch's align_corners=False (torch warns so at export).

# Cases onnxcam cannot explain yet, with the exact cause; strict, so a fix shows up as XPASS.
KNOWN_FAILURES: dict[tuple[str, str, int], str] = {}


def _cases():
    for cls, module, opsets in LAYERS:
        for opset in opsets:
            reason = KNOWN_FAILURES.get((cls.__name__, module, opset))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(cls, module, opset, marks=marks, id=f"{cls.__name__}-{module}-opset{opset}")


_EXPORTS: dict = {}


def _exported(cls, opset):
    """One export (and one float64 reference model) per model class and opset, shared by its layers."""
    if (cls, opset) not in _EXPORTS:
        torch.manual_seed(0)
        model = cls().eval()
        size = 64 if cls in (resnet18, squeezenet1_1) else 16
        x = np.random.default_rng(opset).standard_normal((2, 3, size, size)).astype(np.float32)
        _EXPORTS[(cls, opset)] = (model, x, _export(model, torch.from_numpy(x), opset))
    return _EXPORTS[(cls, opset)]


@pytest.mark.parametrize("model_cls,module,opset", list(_cases()))
def test_old_opset_gradients_match_torch(model_cls, module, opset):
    model, x, proto = _exported(model_cls, opset)
    assert proto.opset_import[0].version == opset
    layer = _module_tensor(proto, module)
    r = onnxcam.Explainer(proto, layers=[layer], device="cpu").run(x, targets=TARGETS)
    want_acts, want_grads = _torch_reference(model, x, [module], TARGETS)
    act_err = rel_err(r.activations[layer], want_acts[module])
    grad_err = rel_err(r.gradients[layer], want_grads[module])
    assert act_err <= ACT_RTOL and grad_err <= GRAD_RTOL, (
        f"{module} ({layer}) at opset {opset}: activation rel err {act_err:.3g}, gradient {grad_err:.3g}")


def test_old_exports_use_the_old_forms():
    """The cases above really exercise the pre-13 forms: Upsample (9), attribute Clip (<11), Softmax (<13)."""
    _, _, proto9 = _exported(Tiny, 9)
    ops9 = {n.op_type: n for n in proto9.graph.node}
    assert "Upsample" in ops9 and {a.name for a in ops9["Clip"].attribute} == {"min", "max"}
    _, _, proto12 = _exported(Tiny, 12)
    assert {"Softmax", "Resize", "MaxPool"} <= {n.op_type for n in proto12.graph.node}
