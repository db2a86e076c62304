"""Vision transformers and channels-last families (Swin, MaxViT, ConvNeXt, a DeiT-style ViT with a distillation
token), and test_tasks.py's YOLO-like head and LRASPP, exported by both torch exporters: the automatic layer and the
rule that picked it, and Grad-CAM at it against float64 torch autograd with forward hooks.

The raw map is compared with the one made from torch's own activation (turned to (N, C, h, w) from its layout
by hand), which fixes its orientation. The transformer families are smooth (GELU, LayerNorm, Softmax): no kink
can flip between float32 and float64. Dynamo exports take tens of seconds here: cached per module, marked slow.
"""

from __future__ import annotations

import copy
import functools
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import onnxcam
from onnxcam.graph.model import ModelGraph
from onnxcam.targets import ClassifierOutputTarget
from onnxcam.tasks import detect, segment
from onnxcam.tasks.layout import tokens_to_maps

from . import test_tasks as tt
from .kinks import kink_inputs, onnx_kink_inputs

SIZE, CLASSES = 32, 5


# ---- tiny members of each family -------------------------------------------------------------------------------
class DeiT(VisionTransformer):
    """torchvision's ViT with DeiT's distillation token after the class token (N, 2 + 4*4, C) and its second
    head; the logits are the mean of both heads, as DeiT's inference."""

    def __init__(self):
        super().__init__(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                         num_classes=CLASSES)
        self.dist_token = nn.Parameter(torch.randn(1, 1, 16) * 0.1)
        self.encoder.pos_embedding = nn.Parameter(torch.randn(1, self.seq_length + 1, 16) * 0.02)
        self.head_dist = nn.Linear(16, CLASSES)
        nn.init.normal_(self.heads.head.weight, std=0.5)  # torchvision zero-initializes the head: no gradient

    def forward(self, x):
        x = self._process_input(x)
        n = x.shape[0]
        x = self.encoder(torch.cat([self.class_token.expand(n, -1, -1), self.dist_token.expand(n, -1, -1), x], 1))
        return (self.heads(x[:, 0]) + self.head_dist(x[:, 1])) / 2


def _swin() -> nn.Module:
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                           stochastic_depth_prob=0.0, num_classes=CLASSES)


def _maxvit() -> nn.Module:
    model = MaxVit(input_size=(SIZE, SIZE), stem_channels=8, partition_size=2, block_channels=[8, 16],
                   block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=CLASSES)
    for m in model.modules():  # torchvision's std 0.02 leaves activations of 1e-3 and maps of 1e-4
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    return model


def _convnext() -> nn.Module:
    # layer_scale 0.5, not torchvision's 1e-6: the blocks' branches must count in the gradient
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], layer_scale=0.5, num_classes=CLASSES)


# family: builder, the torch module at the automatic layer, whether it is that module's input or output, the
# activation's layout, and the rule expected to pick it
FAMILIES = {
    "swin": (_swin, "norm", "input", "nhwc", "channels-last: the last stage's output before the final norm"),
    "maxvit": (_maxvit, "blocks.1", "output", "nchw", "classify: the last spatial activation"),
    "convnext": (_convnext, "features.3", "output", "nchw", "classify: the last spatial activation"),
    "deit": (DeiT, "encoder.layers.encoder_layer_1.ln_1", "input", "tokens", "vit: the input of the last block's norm"),
}


@functools.cache
def family(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = FAMILIES[name][0]().eval()
    return model, torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))


@functools.cache
def exported(name: str, dynamo: bool) -> bytes:
    """The family's ONNX bytes from one exporter (weights inline), once per module."""
    model, x = _model_and_input(name)
    if not dynamo:
        f = io.BytesIO()
        axes = {"images": {0: "N"}, "logits": {0: "N"}} if name != "lraspp" else None
        torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17, input_names=["images"],
                          output_names=["logits"], dynamic_axes=axes)
        return f.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        torch.onnx.export(model, (x,), dynamo=True, input_names=["images"], output_names=["logits"]).save(path)
        return onnx.load(path).SerializeToString()  # the batch stays fixed at x's (2)


def _model_and_input(name: str) -> tuple[nn.Module, torch.Tensor]:
    if name == "yolo":
        model, _, x = tt.yolo()
        return model, x
    if name == "lraspp":
        model, _, x = tt.lraspp()
        return model, x
    return family(name)


def _torch_reference(model: nn.Module, module: str, where: str, x: torch.Tensor):
    """float64 logits and the module's input or output, with the graph kept for autograd."""
    md = copy.deepcopy(model).double()
    seen = {}
    target = dict(md.named_modules())[module]
    if where == "input":
        handle = target.register_forward_pre_hook(lambda m, i: seen.__setitem__("a", i[0]))
    else:
        handle = target.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    out = md(x.double())
    handle.remove()
    return out, seen["a"]


def _as_maps(t: np.ndarray, layout: str, batch: int) -> np.ndarray:
    if layout == "nhwc":
        return t.transpose(0, 3, 1, 2)
    if layout == "tokens":
        return tokens_to_maps(t, t, (SIZE, SIZE), batch)[0]
    return t


def _close(got: np.ndarray, want: np.ndarray, tol: float = 1e-4) -> float:
    err = float(np.abs(np.float64(got) - want).max() / (np.abs(want).max() + 1e-30))
    assert err < tol, f"relative error {err:.2e}"
    return err


def _check_family(name: str, dynamo: bool) -> None:
    """Automatic layer and rule; activation, gradient and raw Grad-CAM map against float64 torch."""
    _, module, where, layout, rule = FAMILIES[name]
    model, x = family(name)
    onnx_model = exported(name, dynamo)
    mg = ModelGraph(onnx.load_from_string(onnx_model), (2, 3, SIZE, SIZE))
    layer = mg.default_layer(mg.default_score())
    assert mg.layer_rule.startswith(rule), mg.layer_rule
    out64, act64 = _torch_reference(model, module, where, x)
    cam = onnxcam.GradCAM(model=onnx_model, device="cpu")
    maps = cam(x.numpy(), targets=[ClassifierOutputTarget(c) for c in (1, 3)])
    assert cam.target_layers == [layer]
    a = act64.detach().numpy()
    _close(cam.result.activations[layer], a, 1e-5)  # the layer is the module's tensor, in its own layout
    want = torch.autograd.grad(out64[0, 1] + out64[1, 3], act64)[0].numpy()
    _close(cam.result.gradients[layer], want)
    a_map, g_map = _as_maps(a, layout, 2), _as_maps(want, layout, 2)
    raw = cam.raw[layer]
    assert raw.shape == a_map.shape[:1] + a_map.shape[2:]
    _close(raw, (g_map.mean(axis=(2, 3))[:, :, None, None] * a_map).sum(axis=1))  # torch's map: same orientation
    assert maps.shape == (2, SIZE, SIZE) and all(np.ptp(r) > 1e-3 for r in raw) and all(m.std() > 0.05 for m in maps)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_layer_and_gradients_torchscript_exporter(name):
    """Swin: the automatic layer was the final norm's output transposed to NCHW; now the last stage's (N, H, W,
    C) output, read as channels-last maps. DeiT: the residual stream into the last block (class and
    distillation tokens dropped). MaxViT and ConvNeXt: the last stage's NCHW output."""
    _check_family(name, dynamo=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_layer_and_gradients_dynamo_exporter(name):
    """The same with torch.onnx.export(dynamo=True) (Gelu ops, a fixed batch, initializers shared by value).
    DeiT's automatic layer was a (tokens, N, heads, dim) attention product whose fixed (2, 2) dims happened to
    scale like the input; attention products are no maps now."""
    _check_family(name, dynamo=True)


# ---- the YOLO-like head and LRASPP of test_tasks.py, dynamo exporter ------------------------------------------
@pytest.mark.slow
def test_yolo_dynamo_export_layer_is_the_neck_and_matches_torch():
    model, _, x = tt.yolo()
    onnx_model = exported("yolo", True)
    mg = ModelGraph(onnx.load_from_string(onnx_model), tuple(x.shape))
    score = mg.default_score()
    layer = mg.default_layer(score)
    assert mg.layer_rule == "detect: the last map feeding all 3 head outputs (the neck)"
    out64, act64 = _torch_reference(model, "p3", "output", x)
    cam = onnxcam.GradCAM(model=onnx_model, device="cpu")
    layout = detect.recognise(mg.shape(mg.tensor(score)), (tt.SIZE, tt.SIZE))
    dets = detect.decode(cam.score_outputs(x.numpy()), layout, conf=0.0, top=1)
    maps = cam(x.numpy(), targets=[detect.DetectionTarget(layout, anchor=d[0].anchor, label=d[0].label)
                                   for d in dets])
    assert cam.target_layers == [layer]
    a = act64.detach().numpy()
    _close(cam.result.activations[layer], a, 1e-5)
    total = sum(out64[i, 4 + d[0].label, d[0].anchor] for i, d in enumerate(dets))
    want = torch.autograd.grad(total, act64)[0].numpy()
    _close(cam.result.gradients[layer], want)
    _close(cam.raw[layer], (want.mean(axis=(2, 3))[:, :, None, None] * a).sum(axis=1))
    assert maps.shape == (2, tt.SIZE, tt.SIZE) and all(m.std() > 0.05 for m in maps)


@pytest.mark.slow
def test_lraspp_dynamo_export_layer_is_the_backbone_end_and_matches_torch():
    model, _, x = tt.lraspp()
    onnx_model = exported("lraspp", True)
    mg = ModelGraph(onnx.load_from_string(onnx_model), tuple(x.shape))
    layer = mg.default_layer(mg.default_score())
    assert mg.layer_rule == "segment: the last map of the backbone module (before the decoder)"
    seen, _ = onnx_kink_inputs(onnx_model, x, kink_inputs(copy.deepcopy(model).double(), x.double()))
    out64, act64 = tt._hooked(model, "model.backbone.16", x, follow=seen)
    cam = onnxcam.GradCAM(model=onnx_model, device="cpu")
    outputs = cam.score_outputs(x.numpy())
    c = segment.classes_present(outputs[0])[0]
    target = segment.ClassMaskTarget(c)
    mask = target.mask_for(outputs[0])
    maps = cam(x.numpy(), targets=[target])
    a = act64.detach().numpy()
    _close(cam.result.activations[layer], a, 1e-5)
    want = torch.autograd.grad((out64[0, c] * torch.from_numpy(np.float64(mask))).sum(), act64)[0].numpy()
    _close(cam.result.gradients[layer], want)
    _close(cam.raw[layer], (want.mean(axis=(2, 3))[:, :, None, None] * a).sum(axis=1))
    assert maps.shape == (1, tt.SIZE, tt.SIZE) and np.ptp(cam.raw[layer]) > 1e-3
