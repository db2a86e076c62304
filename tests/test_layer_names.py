"""A module path names what a forward hook on that module sees, or it is a LayerError: checked against float64
forward hooks on seeded torchvision models exported by both torch exporters.

The cases are the ones that went wrong: dynamo's Split for `x.chunk()` carries no scope metadata (shufflenet's
`stage3`, maxvit's `blocks.3`), a dynamo tensor named like a module (swin's `permute`), TorchScript scopes below a
non-root module (`features.4.block.3`) and in a wrapped segmentation model (`model.backbone.16`).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
import torchvision

import onnxcam
from onnxcam.graph import names

from .torch_models import _randomize_batchnorm, export, make_model, rel_err

EXPORTERS = ["torchscript", "dynamo"]


class Segmenter(torch.nn.Module):
    """torchvision's segmentation models return a dict; deployments wrap them to return the 'out' logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


class Pair(torch.nn.Module):
    """A module with a tuple output: two tensors leave it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, torch.relu(y)


class PairNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 3, 1)
        self.relu = torch.nn.ReLU()  # its output is the first ReLU: dynamo names that tensor 'relu' too
        self.pair = Pair()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        a, b = self.pair(self.relu(self.stem(x)))
        return self.fc((a * b).mean(dim=(2, 3)))


def _prepared(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no in-place ops (a hook must see the value before them), BatchNorm with random statistics (a
    fresh one is almost the identity, which would hide a Conv+BatchNorm fold)."""
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    _randomize_batchnorm(model)
    return model.eval()


def _small_maxvit() -> torch.nn.Module:
    """maxvit_t's architecture scaled down (window 2, 64x64 input) so that it exports in seconds."""
    torch.manual_seed(0)
    return _prepared(torchvision.models.maxvit.MaxVit(
        input_size=(64, 64), stem_channels=16, partition_size=2, block_channels=[16, 32, 48, 64],
        block_layers=[1, 1, 1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10))


def _segmenter() -> torch.nn.Module:
    torch.manual_seed(0)
    seg = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                       num_classes=4)
    return _prepared(Segmenter(seg))


def _pair_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return PairNet().eval()


MODELS = {  # key -> (builder, input size)
    "shufflenet_v2_x0_5": (lambda: make_model("shufflenet_v2_x0_5"), 64),
    "mobilenet_v3_small": (lambda: make_model("mobilenet_v3_small"), 64),
    "swin_t": (lambda: make_model("swin_t"), 32),
    "maxvit_small": (_small_maxvit, 64),
    "segmenter": (_segmenter, 64),
    "pair": (_pair_net, 16),
    "maxvit_t": (lambda: make_model("maxvit_t"), 224),  # the real one: needs 224 (7x7 windows at 1/32)
}

PATHS = {  # module paths per model: the cases that went wrong first, then neighbours
    "shufflenet_v2_x0_5": ["stage3", "stage3.1", "stage2[-1]", "stage4.0.branch1", "conv5"],
    "mobilenet_v3_small": ["features.4.block.3", "features.4.block.2", "features.4", "features[-1]", "avgpool"],
    "swin_t": ["module:permute", "features.1.0", "features.1.0.attn", "features.2.reduction", "features[-1]",
               "norm"],
    "maxvit_small": ["blocks.3", "blocks.3.layers.0", "blocks.1.layers.0.layers.grid_attention",
                     "blocks.2.layers.0.layers.grid_attention.attn_layer", "stem"],
    "segmenter": ["model.backbone.16", "model.classifier.0", "model.backbone.4.block.3", "model.classifier[-1]"],
    "maxvit_t": ["blocks.3", "blocks.3.layers.1", "blocks.2.layers.4.layers.grid_attention", "blocks.0"],
}


@functools.cache
def _torch_model(key: str) -> torch.nn.Module:
    return MODELS[key][0]()


@functools.cache
def _input(key: str) -> torch.Tensor:
    size = MODELS[key][1]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))


@functools.cache
def _onnx(key: str, exporter: str) -> onnx.ModelProto:
    out = export(_torch_model(key), _input(key), exporter, dynamic_batch=False)  # static shapes: constant Slices
    return onnx.load(out) if isinstance(out, str) else onnx.load_from_string(out)


def _resolve(proto: onnx.ModelProto, name: str) -> str:
    tensors = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    return names.resolve(proto, name, tensors)


def _hooks(key: str, modules: list[str]) -> dict[str, np.ndarray]:
    """Each module's output at its first call, from forward hooks on a float64 copy of the torch model (and the
    model's output under the key "")."""
    import copy

    model = copy.deepcopy(_torch_model(key)).double()
    seen: dict[str, np.ndarray] = {}
    named = dict(model.named_modules())

    def keep(name, output):
        seen.setdefault(name, output.detach().clone().numpy())  # returns None: the output is not replaced

    hooks = [named[m].register_forward_hook(lambda mod, i, o, m=m: keep(m, o)) for m in modules]
    with torch.no_grad():
        seen[""] = model(_input(key).double()).numpy()
    for h in hooks:
        h.remove()
    return seen


def _torch_name(key: str, path: str) -> str:
    """The torch module a path names: 'module:x' -> 'x', 'a[-1]' -> 'a.<its last child>'."""
    path = path.removeprefix("module:")
    if not path.endswith("]"):
        return path
    base, index = path[:-1].split("[")
    children = [n for n, _ in dict(_torch_model(key).named_modules())[base].named_children()]
    return f"{base}.{children[int(index)]}"


def _check_paths(key: str, exporter: str) -> None:
    proto = _onnx(key, exporter)
    paths = PATHS[key]
    modules = [_torch_name(key, p) for p in paths]
    want = _hooks(key, modules)
    x = _input(key).numpy()
    ex = onnxcam.Explainer(proto, layers=paths, device="cpu")
    r = ex.run(x, seed=np.ones(want[""].shape, np.float32))  # a seed shaped like the output: segmenters too
    for path, module in zip(paths, modules):
        tensor = _resolve(proto, path)
        assert tensor in ex.layers, (exporter, path, tensor, ex.layers)
        err = rel_err(r.activations[tensor], want[module])
        assert err < 1e-4, f"{key} {exporter}: {path!r} -> {tensor!r} differs from the hook on {module!r} by {err:.3g}"


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("key", ["shufflenet_v2_x0_5", "mobilenet_v3_small", "swin_t", "maxvit_small", "segmenter"])
def test_module_paths_match_forward_hooks(key, exporter):
    _check_paths(key, exporter)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_maxvit_t_module_paths_match_forward_hooks(exporter):
    _check_paths("maxvit_t", exporter)


def test_dynamo_chunk_split_is_not_taken_as_a_scope_exit():
    """dynamo's Split (from x.chunk) has no scope: stage3 is the output of its last block, not of stage3.0."""
    proto = _onnx("shufflenet_v2_x0_5", "dynamo")
    splits = [n for n in proto.graph.node if n.op_type == "Split"]
    assert splits and not any(p.key == names.NAME_SCOPES for n in splits for p in n.metadata_props)
    assert _resolve(proto, "stage3") == _resolve(proto, "stage3.7") != _resolve(proto, "stage3.0")


def test_a_tensor_named_like_a_module_is_ambiguous():
    proto = _onnx("swin_t", "dynamo")
    module_out = _resolve(proto, "module:permute")
    assert module_out != "permute"
    with pytest.raises(onnxcam.LayerError) as err:
        _resolve(proto, "permute")
    assert str(err.value) == ("layer name 'permute' is ambiguous: it is the tensor 'permute' and the module 'permute', "
                              f"whose output is the tensor {module_out!r}; write 'tensor:permute' or 'module:permute'")
    with pytest.raises(onnxcam.LayerError, match="ambiguous"):
        onnxcam.Explainer(proto, layers=["permute"], device="cpu")
    # tensor:permute is dynamo's name for the output of features.0.1 (a Permute module)
    r = onnxcam.Explainer(proto, layers=["tensor:permute"], device="cpu").run(_input("swin_t").numpy(), 0)
    assert rel_err(r.activations["permute"], _hooks("swin_t", ["features.0.1"])["features.0.1"]) < 1e-4


def test_a_tensor_and_a_module_with_the_same_output_are_one_name():
    """Dynamo names the first ReLU's output 'relu'; the module 'relu' whose output it is makes no ambiguity."""
    proto = _onnx("pair", "dynamo")
    assert "relu" in {o for n in proto.graph.node for o in n.output}
    assert _resolve(proto, "relu") == _resolve(proto, "module:relu") == _resolve(proto, "tensor:relu") == "relu"


def test_torchscript_paths_below_a_non_root_module():
    proto = _onnx("mobilenet_v3_small", "torchscript")
    node = next(n for n in proto.graph.node if n.name == "/features/features.4/block/block.3/block.3.0/Conv")
    assert names.node_module(node) == "features.4.block.3.0"
    assert "features.4.block.3" in names.module_paths(proto)
    with pytest.raises(onnxcam.LayerError, match=r"^no tensor, node or module named 'features.4.block.block.3' in "
                       r"the model; close matches: modules: \['features.4.block.3'"):
        _resolve(proto, "features.4.block.block.3")
    seg = _onnx("segmenter", "torchscript")
    assert {"model.backbone.16", "model.classifier.0", "model.classifier.0.convs.0.0"} <= set(names.module_paths(seg))


def test_a_convolution_merged_with_its_batchnorm_is_an_error():
    """TorchScript folds BatchNorm into the Conv before it: the Conv module's own output is not in the model."""
    proto = _onnx("mobilenet_v3_small", "torchscript")
    conv = next(n for n in proto.graph.node if n.name == "/features/features.0/features.0.0/Conv")
    with pytest.raises(onnxcam.LayerError) as err:
        _resolve(proto, "features.0.0")
    assert str(err.value) == (
        f"module 'features.0.0' is a convolution the exporter merged with the BatchNorm after it (its weights became "
        f"{conv.input[1]!r}): the model has no tensor with this module's own output. The merged output is the tensor "
        f"{conv.output[0]!r} ('tensor:{conv.output[0]}'), what a hook on the BatchNorm sees")
    # the container holding Conv and BatchNorm is fine: its hook sees the merged output
    assert _resolve(proto, "features.4.block.3") == next(
        n for n in proto.graph.node if n.name == "/features/features.4/block/block.3/block.3.0/Conv").output[0]


def test_a_module_output_merged_away_by_the_optimizer_is_an_error():
    """maxvit's window attention ends in a Reshape that dynamo's optimizer merges with the grid attention's first
    Reshape: the module's (N, C, H, W) output is not in the model any more. TorchScript keeps it."""
    path = "blocks.1.layers.0.layers.window_attention"
    proto = _onnx("maxvit_small", "dynamo")
    last = next(n for n in proto.graph.node if names.node_module(n) == f"{path}.departition_op"
                and n.op_type == "Transpose")
    merged = next(n for n in proto.graph.node if last.output[0] in n.input)
    with pytest.raises(onnxcam.LayerError) as err:
        _resolve(proto, path)
    assert str(err.value) == (
        f"the exporter's optimizer merged the last op of module {path!r} into the Reshape node {merged.name!r} after "
        f"it (rule ReshapeReshape): the model has no tensor with this module's own output. The nearest tensors are "
        f"{last.output[0]!r} (before the merged op) and {merged.output[0]!r} (after it); name one as 'tensor:<name>'")
    torchscript = _onnx("maxvit_small", "torchscript")
    r = onnxcam.Explainer(torchscript, layers=[path], device="cpu").run(_input("maxvit_small").numpy(), 0)
    assert rel_err(r.activations[_resolve(torchscript, path)], _hooks("maxvit_small", [path])[path]) < 1e-4


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_module_with_two_outputs_is_an_error(exporter):
    proto = _onnx("pair", exporter)
    conv, relu = (next(n for n in proto.graph.node if n.op_type == op and names.node_module(n) == m).output[0]
                  for op, m in (("Conv", "pair.conv"), ("Relu", "pair")))
    with pytest.raises(onnxcam.LayerError) as err:
        _resolve(proto, "pair")
    assert str(err.value) == (f"module 'pair' leaves 2 tensors, not one: {[conv, relu]}; name the one you want as "
                              "'tensor:<name>', or a module inside it")
    assert _resolve(proto, "pair.conv") == conv


def test_prefixed_names_that_miss():
    proto = _onnx("pair", "torchscript")
    with pytest.raises(onnxcam.LayerError) as err:
        _resolve(proto, "tensor:pair.conv")
    assert str(err.value) == "no tensor or node named 'pair.conv' in the model"
    with pytest.raises(onnxcam.LayerError) as err:
        _resolve(proto, "module:input")
    assert str(err.value) == "no module named 'input' in the model"
    assert _resolve(proto, "tensor:input") == "input"
