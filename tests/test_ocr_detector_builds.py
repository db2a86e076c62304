"""Whole recognizer and detector graphs that did not build before (issue 14): a dynamically quantized CRNN
(ConvInteger, DynamicQuantizeLSTM, MatMulInteger, DynamicQuantizeLinear) and an SSD-style head that selects its
detections with TopK and GatherND.

The quantized CRNN is checked against its straight-through float equivalent, the convention of the quantized rules
(tests/autodiff/test_qlinear.py): float64 torch autograd through the dequantized weights, evaluated at the
activations the quantized runtime really produced. A DynamicQuantizeLSTM also quantizes its input and state on the
fly; so the reference feeds the second LSTM the runtime's first-LSTM output, passing the gradient straight through
it (x_rt + (y - y.detach())). The SSD-style graph is compared with float64 torch autograd on the runtime's own
selection, after asserting that no score sits within float32 reach of a tie that could reorder it.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam import rewrite
from onnxcam.graph.model import ModelGraph
from onnxcam.runtime import cpu_session

torch = pytest.importorskip("torch")

H, T_STEPS, CLASSES = 12, 16, 10


# ---- a dynamically quantized CRNN ------------------------------------------------------------------------------

class _CRNN(torch.nn.Module):
    """conv -> ReLU -> max pool over height -> (T, N, C) sequence -> 2-layer bidirectional LSTM -> per-step classes."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.pool = torch.nn.MaxPool2d((4, 1))
        self.lstm = torch.nn.LSTM(16, H, num_layers=2, bidirectional=True)
        self.fc = torch.nn.Linear(2 * H, CLASSES)

    def forward(self, x):
        f = self.pool(torch.relu(self.conv(x)))
        n, c, h, w = f.shape
        return self.fc(self.lstm(f.reshape(n, c * h, w).permute(2, 0, 1))[0])


@functools.cache
def _quantized_crnn() -> onnx.ModelProto:
    """The CRNN exported by the TorchScript exporter, then onnxruntime.quantization.quantize_dynamic (defaults)."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import quantize_dynamic

    torch.manual_seed(0)
    model = _CRNN().eval()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "crnn.onnx", Path(tmp) / "crnn_int8.onnx"
        torch.onnx.export(model, (torch.zeros(2, 1, 8, T_STEPS),), str(src), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
        quantize_dynamic(str(src), str(dst))
        return onnx.load(str(dst))


def _values(model: onnx.ModelProto) -> dict:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                   if n.op_type == "Constant"})
    return values


def _dequantized(values, q, scale, zp):
    """DynamicQuantizeLSTM's [D, K, 4H] weight as float64 [D, 4H, K]."""
    s, z = np.asarray(values[scale], np.float64), np.asarray(values[zp], np.float64)
    along = (slice(None), None, None) if s.ndim == 1 else (slice(None), None, slice(None))
    return np.swapaxes((values[q].astype(np.float64) - z[along]) * s[along], 1, 2)


def _torch_lstm(values, node) -> torch.nn.LSTM:
    """A float64 bidirectional torch LSTM holding a DynamicQuantizeLSTM's dequantized weights (ONNX gates i, o, f, c
    reordered to torch's i, f, c, o)."""
    w = _dequantized(values, node.input[1], node.input[8], node.input[9])
    r = _dequantized(values, node.input[2], node.input[10], node.input[11])
    b = np.asarray(values[node.input[3]], np.float64)
    lstm = torch.nn.LSTM(w.shape[2], H, bidirectional=True).double()

    def reorder(m):
        return torch.tensor(np.concatenate([m[k * H:(k + 1) * H] for k in (0, 2, 3, 1)]))
    with torch.no_grad():
        for d, suffix in ((0, ""), (1, "_reverse")):
            getattr(lstm, f"weight_ih_l0{suffix}").copy_(reorder(w[d]))
            getattr(lstm, f"weight_hh_l0{suffix}").copy_(reorder(r[d]))
            getattr(lstm, f"bias_ih_l0{suffix}").copy_(reorder(b[d, :4 * H]))
            getattr(lstm, f"bias_hh_l0{suffix}").copy_(reorder(b[d, 4 * H:]))
    return lstm


def _head(values, model):
    """(dequantized weight [2H, classes], bias) of the MatMulInteger -> Cast -> Mul -> Add head."""
    nodes = list(model.graph.node)
    mm = next(n for n in nodes if n.op_type == "MatMulInteger")
    quantizer = next(n for n in nodes if n.op_type == "DynamicQuantizeLinear" and n.output[0] == mm.input[0])
    scale_mul = next(n for n in nodes if n.op_type == "Mul" and quantizer.output[1] in n.input)  # x_scale * w_scale
    w_scale = next(i for i in scale_mul.input if i in values)
    add = next(n for n in nodes if n.op_type == "Add" and "y" in n.output)
    bias = next(i for i in add.input if i in values)
    w = (values[mm.input[1]].astype(np.float64) - values[mm.input[3]].astype(np.float64)) * float(values[w_scale])
    return torch.tensor(w), torch.tensor(values[bias].astype(np.float64))


def _runtime(model, x, layer, u):
    """onnxcam's gradient at `layer` plus the runtime's activations there and at the second LSTM's input."""
    mg = ModelGraph(model)
    lstm2_in = [n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM"][1].input[0]
    rw = rewrite.build(mg, [layer], "y")
    proto = rw.model
    proto.graph.output.append(helper.make_tensor_value_info(lstm2_in, TensorProto.FLOAT, None))
    sess = cpu_session(proto.SerializeToString(), rw.initializer_arrays())
    outs = [rewrite.grad_name(layer), rw.act_outputs[layer], lstm2_in]
    return sess.run(outs, {"x": x, rewrite.SEED: u[:, None]})


def test_dynamically_quantized_crnn_builds_and_matches_its_straight_through_float_equivalent():
    model = _quantized_crnn()
    ops = {n.op_type for n in model.graph.node}
    assert {"DynamicQuantizeLinear", "ConvInteger", "DynamicQuantizeLSTM", "MatMulInteger"} <= ops
    x = np.random.default_rng(0).standard_normal((2, 1, 8, T_STEPS)).astype(np.float32)
    u = np.random.default_rng(1).standard_normal((T_STEPS, 2, CLASSES)).astype(np.float32)
    layer = "/conv/Conv_output_0"  # the conv layer's output (before its ReLU): the CAM layer of a CRNN
    grad, act, lstm2_in = _runtime(model, x, layer, u)

    values = _values(model)
    lstms = [_torch_lstm(values, n) for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM"]
    w, bias = _head(values, model)
    a = torch.tensor(act.astype(np.float64), requires_grad=True)
    f = torch.nn.functional.max_pool2d(torch.relu(a), (4, 1))
    n, c, h, width = f.shape
    y1 = lstms[0](f.reshape(n, c * h, width).permute(2, 0, 1))[0]
    x2 = torch.tensor(lstm2_in.astype(np.float64)) + (y1 - y1.detach())  # the runtime's value, y1's gradient
    score = lstms[1](x2)[0] @ w + bias
    (score * torch.tensor(u.astype(np.float64))).sum().backward()
    want = a.grad.numpy()
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(grad, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_quantized_crnn_follows_the_float_model():
    """Differentiated as its float equivalent, the int8 CRNN's input gradient stays close to the fp32 model's
    (quantization noise only): the straight-through chain does not lose or rescale anything."""
    model = _quantized_crnn()
    torch.manual_seed(0)
    fp32 = _CRNN().eval().double()
    x = np.random.default_rng(2).standard_normal((2, 1, 8, T_STEPS)).astype(np.float32)
    u = np.random.default_rng(3).standard_normal((T_STEPS, 2, CLASSES)).astype(np.float32)
    mg = ModelGraph(model)
    rw = rewrite.build(mg, ["x"], "y")
    got = cpu_session(rw.model.SerializeToString(), rw.initializer_arrays()).run(
        [rewrite.grad_name("x")], {"x": x, rewrite.SEED: u[:, None]})[0]
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    (fp32(xt) * torch.tensor(u.astype(np.float64))).sum().backward()
    want = xt.grad.numpy().ravel()
    assert np.corrcoef(got.ravel(), want)[0, 1] > 0.95
    assert 0.8 < np.linalg.norm(got) / np.linalg.norm(want) < 1.25


# ---- an SSD-style head: TopK over anchors, GatherND of the kept anchors' class scores ------------------------------

K_KEEP, ANCHORS_PER_CELL, SSD_CLASSES = 5, 2, 4


@functools.cache
def _ssd_head() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x (N, 3, 6, 6) -> Conv -> (N, A, C) class logits -> Sigmoid -> best class per anchor (ReduceMax) -> TopK
    over anchors -> GatherND(batch_dims=1) of the kept anchors' scores: outputs det_scores (N, K, C), top (N, K)
    and their anchor indices."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((ANCHORS_PER_CELL * SSD_CLASSES, 3, 3, 3)).astype(np.float32) * 0.5
    bias = rng.standard_normal(ANCHORS_PER_CELL * SSD_CLASSES).astype(np.float32) * 0.1
    shape = np.array([0, ANCHORS_PER_CELL, SSD_CLASSES, -1], np.int64)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["head"], pads=[1, 1, 1, 1], name="head_conv"),
        helper.make_node("Reshape", ["head", "shape4"], ["h4"]),
        helper.make_node("Transpose", ["h4"], ["ht"], perm=[0, 3, 1, 2]),
        helper.make_node("Reshape", ["ht", "shape3"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probs"]),
        helper.make_node("ReduceMax", ["probs"], ["best"], axes=[2], keepdims=0),
        helper.make_node("TopK", ["best", "k"], ["top", "anchors"], axis=1),
        helper.make_node("Unsqueeze", ["anchors", "minus1"], ["anchors3"]),
        helper.make_node("GatherND", ["probs", "anchors3"], ["det_scores"], batch_dims=1),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in (
        ("w", w), ("b", bias), ("shape4", shape), ("shape3", np.array([0, -1, SSD_CLASSES], np.int64)),
        ("k", np.array([K_KEEP], np.int64)), ("minus1", np.array([-1], np.int64)))]
    graph = helper.make_graph(nodes, "ssd_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("det_scores", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("top", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("anchors", TensorProto.INT64, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w, bias


def _torch_ssd(head: torch.Tensor, anchors: np.ndarray):
    """det_scores and top from the conv output in float64, selecting the runtime's anchors."""
    n = head.shape[0]
    logits = head.reshape(n, ANCHORS_PER_CELL, SSD_CLASSES, -1).permute(0, 3, 1, 2).reshape(n, -1, SSD_CLASSES)
    probs = torch.sigmoid(logits)
    idx = torch.tensor(anchors)
    det = torch.stack([probs[i, idx[i]] for i in range(n)])
    return det, det.max(dim=2).values, probs


@pytest.mark.parametrize("score,pick", [("det_scores", (1, 2, 3)), ("top", (0, 0)), ("det_scores", (0, 4, 1))])
def test_ssd_style_selection_matches_float64_autograd(score, pick):
    model, _, _ = _ssd_head()
    x = np.random.default_rng(8).standard_normal((2, 3, 6, 6)).astype(np.float32)
    mg = ModelGraph(model)
    rw = rewrite.build(mg, ["head"], score)
    out_shape = (2, K_KEEP, SSD_CLASSES) if score == "det_scores" else (2, K_KEEP)
    seed = np.zeros(out_shape, np.float32)
    seed[pick] = 1.0  # one detection's class score (or its best score)
    feeds = {"x": x, rewrite.SEED: seed[:, None]}
    if rw.has_ranking:
        feeds[rewrite.RANKED] = np.array(False)
    sess = cpu_session(rw.model.SerializeToString())
    grad, head, anchors = sess.run([rewrite.grad_name("head"), rw.act_outputs["head"], "anchors"], feeds)

    h = torch.tensor(head.astype(np.float64), requires_grad=True)
    det, top, probs = _torch_ssd(h, anchors)
    # No tie within float32 reach: the runtime's anchors are float64's top K, each anchor's best class is clear.
    ranked = torch.sort(probs.max(dim=2).values, dim=1, descending=True)
    assert np.array_equal(np.sort(anchors, axis=1), np.sort(ranked.indices[:, :K_KEEP].numpy(), axis=1))
    assert float((ranked.values[:, K_KEEP - 1] - ranked.values[:, K_KEEP]).min()) > 1e-5
    two = torch.topk(probs, 2, dim=2).values
    assert float((two[..., 0] - two[..., 1]).min()) > 1e-5
    ((det if score == "det_scores" else top) * torch.tensor(seed.astype(np.float64))).sum().backward()
    want = h.grad.numpy()
    assert np.count_nonzero(want) > 0
    np.testing.assert_allclose(grad, want, rtol=0, atol=1e-4 * np.abs(want).max())
