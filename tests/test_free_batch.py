"""A batch-1 export takes a batch (graph/free_batch.py, Explainer.free_batch): several images in one run, a
picture's items on one forward, each sample's result the one it has alone; exports whose trace baked the batch in
(folded into another axis, samples mixed) keep their batch of 1, and their samples run alone as before."""

from __future__ import annotations

import io
import logging

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from onnxcam import Explainer
from onnxcam import explainer as explainer_module
from onnxcam.cache import CACHE

from .test_shared_forward import SIZE, _export, _seeds

LAYER = "/down/down.1/Mul_output_0"  # the stride-4 map after its SiLU: both scales' gradients cross it


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(5).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def _traced(net: type, outputs: tuple = ("y",)) -> bytes:
    """torch's TorchScript export of a seeded `net` traced at batch 1 (no dynamic axes: the batch is fixed)."""
    torch.manual_seed(0)
    f = io.BytesIO()
    torch.onnx.export(net().eval(), (torch.zeros(1, 3, SIZE, SIZE),), f, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=list(outputs))
    return f.getvalue()


def _runs(monkeypatch) -> list:
    """The batch sizes of the explainable model's onnxruntime runs, recorded from here on."""
    seen = []
    run_one = explainer_module.Explainer._run_one

    def spy(self, compiled, x, *args, **kwargs):
        seen.append(len(x))
        return run_one(self, compiled, x, *args, **kwargs)
    monkeypatch.setattr(explainer_module.Explainer, "_run_one", spy)
    return seen


def _alone(model: bytes, x: np.ndarray, seed: np.ndarray, layer: str):
    """Each sample explained alone (the export as it is: its batch kept)."""
    ex = Explainer(model, layers=layer)
    results = [ex.run(x[i:i + 1], seed=seed[i:i + 1]) for i in range(len(x))]
    assert ex.analysis.fixed_batch == 1
    return results


def _same(result, alone: list, layer: str) -> None:
    for i, r in enumerate(alone):
        np.testing.assert_allclose(result.gradients[layer][i:i + 1], r.gradients[layer], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.activations[layer][i:i + 1], r.activations[layer], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.logits[i:i + 1], r.logits, rtol=1e-5, atol=1e-6)


def test_a_batch_1_export_explains_several_images_in_one_run_each_as_alone(monkeypatch):
    fixed, free = _export(nn.MaxPool2d(5, 1, 2), dynamic=False), _export(nn.MaxPool2d(5, 1, 2), dynamic=True)
    x = _images(3)
    seed = _seeds((320, 6), [(5, 4), (300, 5), (3, 1)])
    alone = _alone(fixed, x, seed, LAYER)
    runs = _runs(monkeypatch)
    ex = Explainer(fixed, layers=LAYER)
    result = ex.run(x, seed=seed)
    assert runs == [3], "the three images take one run"
    assert ex.analysis.fixed_batch is None and ex.proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    _same(result, alone, LAYER)
    assert np.abs(result.gradients[LAYER]).max() > 0
    # and the export made with a free batch gives the same (an independent graph of the same net)
    exported_free = Explainer(free, layers=LAYER).run(x, seed=seed)
    np.testing.assert_allclose(result.gradients[LAYER], exported_free.gradients[LAYER], rtol=1e-5, atol=1e-6)


def test_a_batch_1_exports_items_of_one_picture_share_one_forward(monkeypatch):
    """As `onnxcam explain` runs a detector picture's items: the image repeated, one seed each."""
    fixed = _export(nn.MaxPool2d(5, 1, 2), dynamic=False)
    x = np.repeat(_images(1), 3, axis=0)
    seed = _seeds((320, 6), [(5, 4), (300, 5), (250, 1)])
    alone = _alone(fixed, x, seed, LAYER)
    runs = _runs(monkeypatch)
    ex = Explainer(fixed, layers=LAYER, share_forward=True)
    result = ex.run(x, seed=seed)
    assert runs == [1], "one forward, the three seeds' backward on it"
    _same(result, alone, LAYER)


class _BatchInChannels(nn.Module):
    """A trace that folds the batch into the channels (x.reshape(-1, H, W)): no free batch gives the same."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        maps = self.conv(x.reshape(-1, 1, SIZE, SIZE)).relu()
        return self.fc(maps.mean((2, 3)).reshape(x.shape[0], 3, 4).sum(1))


class _MixesSamples(nn.Module):
    """Scales by the largest value of the whole batch: alone, each sample by its own."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        maps = self.conv(x).relu()
        return self.fc((maps / maps.max()).mean((2, 3)))


@pytest.mark.parametrize("net, layer, why", [
    (_BatchInChannels, "/Reshape_1_output_0", "a run of 2 samples failed"),
    (_MixesSamples, "/conv/Conv_output_0", "differs when run with another sample")])
def test_an_export_whose_trace_baked_the_batch_in_keeps_it(monkeypatch, caplog, net, layer, why):
    model = _traced(net)
    x = _images(2)
    seed = np.eye(5, dtype=np.float32)[[1, 3]]
    alone = _alone(model, x, seed, layer)
    CACHE.clear()  # the check's verdict, cached by another test of this model, would not be logged again
    runs = _runs(monkeypatch)
    ex = Explainer(model, layers=layer)
    with caplog.at_level(logging.INFO, logger="onnxcam.explainer"):
        result = ex.run(x, seed=seed)
    assert runs == [1, 1], "each sample runs alone"
    assert ex.analysis.fixed_batch == 1 and not ex.free_batch()
    assert any("keeps its batch of 1" in r.getMessage() and why in r.getMessage() for r in caplog.records)
    _same(result, alone, layer)


class _Token(nn.Module):
    """A class token joined to the patches, as a vision transformer's embedding: traced at batch 1, a one-row
    constant that must follow the data's batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, 4)
        self.token = nn.Parameter(torch.randn(1, 1, 8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        patches = self.conv(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.token.expand(x.shape[0], -1, -1), patches], 1)
        return self.fc(tokens.relu().mean(1))


def test_a_class_token_traced_at_batch_1_follows_the_batch(monkeypatch):
    model = _traced(_Token)
    assert any(n.op_type == "Concat" for n in onnx.load_from_string(model).graph.node)
    x = _images(3)
    seed = np.eye(5, dtype=np.float32)[[0, 2, 4]]
    layer = "/conv/Conv_output_0"
    alone = _alone(model, x, seed, layer)
    runs = _runs(monkeypatch)
    ex = Explainer(model, layers=layer)
    _same(ex.run(x, seed=seed), alone, layer)
    assert runs == [3]


@pytest.mark.parametrize("method", ["AblationCAM", "ScoreCAM"])
def test_the_copies_methods_on_batch_1_exports_give_each_images_map_alone(method):
    """Ablation-CAM's and Score-CAM's own runs: in batches on a freed export, one at a time on one that keeps its
    batch (the tail after the layer then holds one sample: it was declared with the whole batch's)."""
    import onnxcam

    for net in (_Token, _MixesSamples):
        model = _traced(net)
        x = _images(2)
        cam = getattr(onnxcam, method)(model, ["/conv/Conv_output_0"], device="cpu", batch_size=3)
        together = cam(x, [1, 3])
        assert cam.explainer.analysis.fixed_batch == (None if net is _Token else 1)
        for i, category in enumerate([1, 3]):
            alone = getattr(onnxcam, method)(model, ["/conv/Conv_output_0"], device="cpu")(x[i:i + 1], [category])
            np.testing.assert_allclose(together[i:i + 1], alone, rtol=1e-4, atol=1e-5)
            assert np.ptp(alone) > 0


class _WithGrid(nn.Module):
    """A second output computed from constants alone (an anchor grid): the same at any batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.register_buffer("grid", torch.arange(12.0).reshape(6, 2))

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3))), self.grid * 2.0


def test_an_output_that_does_not_depend_on_the_input_is_left_as_it_is(monkeypatch):
    model = _traced(_WithGrid, ("y", "grid"))
    x = _images(3)
    seed = np.eye(5, dtype=np.float32)[[0, 2, 4]]
    layer = "/conv/Conv_output_0"
    alone = _alone(model, x, seed, layer)
    runs = _runs(monkeypatch)
    result = Explainer(model, layers=layer, output="y").run(x, seed=seed)
    assert runs == [3]
    _same(result, alone, layer)
    grid = onnx.load_from_string(model).graph.output[1].name  # an initializer: the exporter folded it
    np.testing.assert_array_equal(result.outputs[grid], np.arange(12.0).reshape(6, 2) * 2)


def test_a_freed_model_that_does_not_build_runs_each_sample_alone(monkeypatch, caplog):
    """The check passed but the gradient's build refuses the freed graph: the export as it is, as before."""
    fixed = _export(nn.MaxPool2d(5, 1, 2), dynamic=False)
    x = _images(2)
    seed = _seeds((320, 6), [(5, 4), (300, 5)])
    alone = _alone(fixed, x, seed, LAYER)
    build = explainer_module.rewrite.build

    def refusing(mg, *args, **kwargs):
        if not mg.fixed_batch:
            raise explainer_module.LayerError("a rule that needs a static batch (simulated)")
        return build(mg, *args, **kwargs)
    monkeypatch.setattr(explainer_module.rewrite, "build", refusing)
    CACHE.clear()  # a freed build of this model cached by another test would not be built again
    runs = _runs(monkeypatch)
    ex = Explainer(fixed, layers=LAYER)
    with caplog.at_level(logging.INFO, logger="onnxcam.explainer"):
        result = ex.run(x, seed=seed)
    assert runs == [1, 1]
    assert ex.analysis.fixed_batch == 1 and not ex.free_batch()
    assert any("did not build" in r.getMessage() for r in caplog.records)
    _same(result, alone, LAYER)
