"""Several seeds of one sample on one forward (autodiff/passes_shared.py, Explainer(share_forward=True)): the same
gradients as the copies of the sample the seeds would otherwise run on, the forward run once, and graphs that
cannot broadcast their forward refused, the copies then running as before."""

from __future__ import annotations

import io
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from onnxcam import Explainer, rewrite
from onnxcam import explainer as explainer_module
from onnxcam.errors import LayerError
from onnxcam.graph.load import with_weights
from onnxcam.graph.model import ModelGraph

SIZE = 32


class TwoScales(nn.Module):
    """A small two-scale detector head: SiLU convolutions, a SPP-style 5x5 MaxPool (its positions recomputed in the
    gradient), the scales' (N, A, 6) rows concatenated (skip_zero_slabs' Ifs per scale)."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.SiLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.SiLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.SiLU())
        self.pool = pool
        self.head8 = nn.Conv2d(8, 6, 1)
        self.head16 = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.SiLU(), nn.Conv2d(16, 6, 1))

    def forward(self, x):
        a = self.stem(x)
        b = self.pool(self.down(a))
        rows = [self.head8(a).flatten(2), self.head16(b).flatten(2)]
        return torch.cat(rows, 2).permute(0, 2, 1).sigmoid()


def _export(pool: nn.Module, dynamic: bool = True) -> bytes:
    torch.manual_seed(0)
    net = TwoScales(pool).eval()
    f = io.BytesIO()
    axes = {"images": {0: "N"}, "out": {0: "N"}} if dynamic else None
    torch.onnx.export(net, (torch.zeros(1, 3, SIZE, SIZE),), f, dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["out"], dynamic_axes=axes)
    return f.getvalue()


def _image() -> np.ndarray:
    return np.random.default_rng(3).random((1, 3, SIZE, SIZE), dtype=np.float32)


def _seeds(shape: tuple, spots: list[tuple]) -> np.ndarray:
    seeds = np.zeros((len(spots), *shape), np.float32)
    for s, (anchor, column) in enumerate(spots):
        seeds[s, anchor, column] = 1.0 + s  # distinct weights: a seed mixed up with another shows
    return seeds


# anchors 0-255 are the stride-2 scale's, 256-319 the stride-4 one's: seeds on both and on one twice
SPOTS = [(10, 5), (300, 2), (130, 4), (290, 5)]


@pytest.fixture(scope="module")
def detector() -> bytes:
    return _export(nn.MaxPool2d(5, 1, 2))


def test_the_seeds_of_one_image_get_its_copies_gradients_on_one_forward(detector):
    plain = Explainer(detector, "stem", input_shape=(1, 3, SIZE, SIZE))
    shared = Explainer(detector, "stem", input_shape=(1, 3, SIZE, SIZE), share_forward=True)
    x = np.repeat(_image(), len(SPOTS), axis=0)
    seeds = _seeds(plain.score_shape(x.shape)[1:], SPOTS)
    calls = []
    real = explainer_module._broadcast_forward

    def spy(r, rw, n):
        calls.append((r.logits.shape[0], n))  # the run's own forward: one sample
        return real(r, rw, n)
    explainer_module._broadcast_forward = spy
    try:
        want, got = plain.run(x, seed=seeds), shared.run(x, seed=seeds)
    finally:
        explainer_module._broadcast_forward = real
    assert calls == [(1, len(SPOTS))]
    layer = plain.layers[0]
    g_want, g_got = want.gradients[layer], got.gradients[layer]
    assert g_got.shape == g_want.shape and np.all(np.abs(g_want).reshape(len(SPOTS), -1).max(axis=1) > 0)
    # the same ops on the same values: equal up to what another batch size may change in a kernel's rounding
    np.testing.assert_allclose(g_got, g_want, rtol=0, atol=1e-6 * np.abs(g_want).max())
    np.testing.assert_allclose(got.activations[layer], want.activations[layer], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.logits, want.logits, rtol=0, atol=1e-6)
    assert got.outputs["out"].shape == want.outputs["out"].shape
    np.testing.assert_array_equal(got.seed, want.seed)


def test_the_shared_model_runs_its_forward_once_and_its_backward_per_seed(detector):
    mg = ModelGraph(onnx.load_from_string(detector), (1, 3, SIZE, SIZE))
    score = mg.default_score(None)
    rw = rewrite.build(mg, [mg.tensor("/stem/stem.3/Mul_output_0").name], score, shared=True)
    assert rw.shared
    ops = [n.op_type for n in rw.model.graph.node]
    assert "Expand" in ops and "If" in ops  # forward maps broadcast; skip_zero_slabs' Ifs kept
    expanded = {n.input[0] for n in rw.model.graph.node if n.op_type == "Expand"}
    assert rewrite.SEED not in expanded  # the seed already has the seeds' batch
    seed = next(i for i in rw.model.graph.input if i.name == rewrite.SEED)
    assert seed.type.tensor_type.shape.dim[0].dim_param != rw.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    # the rules' factors (the SiLUs' slopes) are computed once, on the forward's one sample: run with 1 image and
    # 4 seeds, gradient maps of batch 1 beside the layer's gradient of batch 4
    exposed = onnx.ModelProto()
    exposed.CopyFrom(with_weights(rw.model, rw.weights))
    products = [n.output[0] for n in exposed.graph.node if n.name.startswith("onnxcam_grad") and n.op_type == "Mul"]
    exposed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in products)
    sess = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    seeds = np.zeros((4, 1, *rw.score_shape[1:]), np.float32)
    seeds[:, 0, 10, 5] = 1.0
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": _image(), rewrite.SEED: seeds})))
    assert got[rewrite.grad_name(rw.layers[0])].shape[0] == 4
    assert sum(got[name].shape[0] == 1 for name in products) >= 3, "slopes computed on the one sample"


def test_a_copy_that_differs_runs_the_copies(detector):
    ex = Explainer(detector, "stem", input_shape=(1, 3, SIZE, SIZE), share_forward=True)
    plain = Explainer(detector, "stem", input_shape=(1, 3, SIZE, SIZE))
    x = np.repeat(_image(), 2, axis=0)
    x[1, 0, 7, 7] += 0.5
    seeds = _seeds(ex.score_shape(x.shape)[1:], SPOTS[:2])
    got, want = ex.run(x, seed=seeds), plain.run(x, seed=seeds)
    layer = ex.layers[0]
    np.testing.assert_array_equal(got.gradients[layer], want.gradients[layer])
    assert got.activations[layer].flags.writeable  # the copies' own run, not a broadcast view


class Chunked(nn.Module):
    """A C2f-style split: torch's export of chunk() on a free batch computes the halves' bounds from
    Shape(x)[1] at run time (Shape, Gather, Add, Div, Mul into the Slices), integers the gradient reads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.SiLU())
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1), nn.SiLU())
        self.head = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, 1)
        return self.head(torch.cat([a, self.inner(b)], 1)).flatten(2).permute(0, 2, 1).sigmoid()


def test_sizes_computed_from_static_dims_of_shapes_are_shared():
    torch.manual_seed(0)
    f = io.BytesIO()
    torch.onnx.export(Chunked().eval(), (torch.zeros(1, 3, SIZE, SIZE),), f, dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["out"],
                      dynamic_axes={"images": {0: "N"}, "out": {0: "N"}})
    model = f.getvalue()
    ops = [n.op_type for n in onnx.load_from_string(model).graph.node]
    assert "Shape" in ops and "Slice" in ops  # the bounds are computed, not constants
    mg = ModelGraph(onnx.load_from_string(model), (1, 3, SIZE, SIZE))
    score = mg.default_score(None)
    assert rewrite.build(mg, [mg.tensor("/stem/stem.1/Mul_output_0").name], score, shared=True).shared
    plain = Explainer(model, "stem", input_shape=(1, 3, SIZE, SIZE))
    shared = Explainer(model, "stem", input_shape=(1, 3, SIZE, SIZE), share_forward=True)
    x = np.repeat(_image(), 3, axis=0)
    seeds = _seeds(plain.score_shape(x.shape)[1:], [(10, 5), (200, 2), (100, 4)])
    want, got = plain.run(x, seed=seeds), shared.run(x, seed=seeds)
    layer = plain.layers[0]
    assert not shared._unshared and np.abs(want.gradients[layer]).max() > 0
    np.testing.assert_allclose(got.gradients[layer], want.gradients[layer], rtol=0,
                               atol=1e-6 * np.abs(want.gradients[layer]).max())


def test_graphs_that_cannot_broadcast_their_forward_are_refused_and_run_the_copies(caplog):
    # a 2x2 MaxPool's gradient scatters to the positions its forward node reports (pool_indices): integer
    # positions with the batch offset, which no broadcast makes another sample's
    model = _export(nn.MaxPool2d(2, 2))
    mg = ModelGraph(onnx.load_from_string(model), (1, 3, SIZE, SIZE))
    score = mg.default_score(None)
    with pytest.raises(LayerError, match="MaxPool.*positions, choices or sizes per sample"):
        rewrite.build(mg, [mg.tensor("/stem/stem.3/Mul_output_0").name], score, shared=True)
    ex = Explainer(model, "stem", input_shape=(1, 3, SIZE, SIZE), share_forward=True)
    plain = Explainer(model, "stem", input_shape=(1, 3, SIZE, SIZE))
    x = np.repeat(_image(), 3, axis=0)
    with caplog.at_level(logging.INFO, logger="onnxcam.explainer"):
        seeds = _seeds(ex.score_shape(x.shape)[1:], [(10, 5), (70, 2), (3, 4)])
        got = ex.run(x, seed=seeds)
    assert "run on copies" in caplog.text
    layer = ex.layers[0]
    np.testing.assert_array_equal(got.gradients[layer], plain.run(x, seed=seeds).gradients[layer])


def test_a_model_that_fixes_its_batch_is_refused_at_build():
    model = _export(nn.MaxPool2d(5, 1, 2), dynamic=False)
    mg = ModelGraph(onnx.load_from_string(model))
    score = mg.default_score(None)
    with pytest.raises(LayerError, match="fixes its batch"):
        rewrite.build(mg, [mg.default_layer(score)], score, shared=True)
