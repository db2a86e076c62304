"""Numerical checks of onnxcam/autodiff/rules/recurrent.py (RNN, GRU, LSTM, com.microsoft DynamicQuantizeLSTM).

onnx's reference evaluator ignores sequence_lens, clip and activations, so the float64 reference here is a plain
step-by-step numpy implementation of the ONNX definitions (`recurrent` below), checked against onnxruntime's own
float32 forward on every case (test_reference_is_the_runtime_forward) before its central differences judge
onnxcam's gradient. Then whole torch.nn.LSTM/GRU/RNN stacks (2 layers, bidirectional) exported by the TorchScript
exporter are compared with torch's float64 autograd.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

from onnxcam.errors import UnsupportedOpError

from . import gradcheck
from .gradcheck import Case

MS = "com.microsoft"
rng = np.random.default_rng(21)
T, N, C, H = 5, 3, 4, 3


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


ACTS = {"Sigmoid": _sigmoid, "Tanh": np.tanh, "Relu": lambda a: np.maximum(a, 0.0)}
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4, "DynamicQuantizeLSTM": 4}
DEFAULT_ACTS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}


def _dequantized(q, scale, zp):
    """DynamicQuantizeLSTM's [D, K, 4H] int8 weight as ONNX's float [D, 4H, K]."""
    along = (slice(None), None, None) if np.ndim(scale) == 1 else (slice(None), None, slice(None))
    return np.swapaxes((q.astype(np.float64) - zp[along]) * scale[along], 1, 2)


def recurrent(op: str, ins: list, attrs: dict) -> list:
    """[Y, Y_h(, Y_c)] of an RNN/GRU/LSTM node in float64, step by step as the ONNX operator docs define it.

    ins: the node's inputs by position (None where omitted)."""
    kind = "LSTM" if op == "DynamicQuantizeLSTM" else op
    ins = list(ins) + [None] * (12 - len(ins))
    x, w, r, bias, lens, h0, c0, peep = ins[:8]
    if op == "DynamicQuantizeLSTM":
        w, r = _dequantized(w, ins[8], ins[9]), _dequantized(r, ins[10], ins[11])
    layout, hidden = attrs.get("layout", 0), attrs["hidden_size"]
    if layout:
        x = np.swapaxes(x, 0, 1)
        h0, c0 = (None if s is None else np.swapaxes(s, 0, 1) for s in (h0, c0))
    steps, batch, _ = x.shape
    dirs = w.shape[0]
    g = GATES[kind]
    bias = np.zeros((dirs, 2 * g * hidden)) if bias is None else bias
    lens = np.full(batch, steps) if lens is None else lens
    h0 = np.zeros((dirs, batch, hidden)) if h0 is None else h0
    c0 = np.zeros((dirs, batch, hidden)) if c0 is None else c0
    acts = attrs.get("activations", DEFAULT_ACTS[kind] * dirs)
    clip = attrs.get("clip")

    def gate(name, a):
        return ACTS[name](a if clip is None else np.clip(a, -clip, clip))

    y = np.zeros((steps, dirs, batch, hidden))
    yh, yc = np.zeros((dirs, batch, hidden)), np.zeros((dirs, batch, hidden))
    for d in range(dirs):
        fa = acts[d * len(DEFAULT_ACTS[kind]):(d + 1) * len(DEFAULT_ACTS[kind])]
        reverse = attrs.get("direction") == "reverse" or d == 1
        h, c = h0[d].copy(), c0[d].copy()
        wb, rb = bias[d, :g * hidden], bias[d, g * hidden:]
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            xw, hr = x[t] @ w[d].T + wb, h @ r[d].T + rb
            if kind == "RNN":
                new_h, new_c = gate(fa[0], xw + hr), c
            elif kind == "GRU":
                z = gate(fa[0], xw[:, :hidden] + hr[:, :hidden])
                rr = gate(fa[0], xw[:, hidden:2 * hidden] + hr[:, hidden:2 * hidden])
                rn = r[d][2 * hidden:]
                if attrs.get("linear_before_reset", 0):
                    pre = xw[:, 2 * hidden:] + rr * hr[:, 2 * hidden:]
                else:
                    pre = xw[:, 2 * hidden:] + (rr * h) @ rn.T + rb[2 * hidden:]
                new_h, new_c = (1 - z) * gate(fa[1], pre) + z * h, c
            else:
                zz = xw + hr
                p = np.zeros((3, hidden)) if peep is None else peep[d].reshape(3, hidden)
                i = gate(fa[0], zz[:, :hidden] + p[0] * c)
                f = gate(fa[0], zz[:, 2 * hidden:3 * hidden] + p[2] * c)
                new_c = f * c + i * gate(fa[1], zz[:, 3 * hidden:])
                o = gate(fa[0], zz[:, hidden:2 * hidden] + p[1] * new_c)
                new_h = o * ACTS[fa[2]](new_c)
            active = (t < lens)[:, None]
            h, c = np.where(active, new_h, h), np.where(active, new_c, c)
            y[t, d] = np.where(active, new_h, 0.0)
        yh[d], yc[d] = h, c
    if layout:
        y, yh, yc = y.transpose(2, 0, 1, 3), np.swapaxes(yh, 0, 1), np.swapaxes(yc, 0, 1)
    return [y, yh, yc] if kind == "LSTM" else [y, yh]


# ---- cases -----------------------------------------------------------------------------------------------------------

def _weights(kind, dirs, hidden=H, inputs=C, scale=0.6):
    g = GATES[kind]
    return {"W": rng.standard_normal((dirs, g * hidden, inputs)) * scale,
            "R": rng.standard_normal((dirs, g * hidden, hidden)) * scale,
            "B": rng.standard_normal((dirs, 2 * g * hidden)) * 0.3}


def rcase(kind, direction="forward", score=0, layout=0, lens=None, init=False, wrt_init=False, peep=False,
          bias=True, opset=14, id="", **attrs):
    """A case of one recurrent node; inputs named by the ONNX input they fill."""
    dirs = 2 if direction == "bidirectional" else 1
    x = rng.standard_normal((N, T, C) if layout else (T, N, C))
    inputs = {"X": x, **_weights(kind, dirs)}
    order = ["X", "W", "R", "B" if bias else ""]
    if not bias:
        del inputs["B"]
    state = (N, dirs, H) if layout else (dirs, N, H)
    if lens is not None:
        inputs["L"] = np.asarray(lens, np.int32)
    order.append("L" if lens is not None else "")
    for name in (["h0", "c0"] if kind == "LSTM" else ["h0"]):
        if init or wrt_init:
            inputs[name] = rng.standard_normal(state) * 0.5
        order.append(name if init or wrt_init else "")
    if peep:
        inputs["P"] = rng.standard_normal((dirs, 3 * H)) * 0.5
        order.append("P")
    while order and order[-1] == "":
        order.pop()
    wrt = ["X"] + ([n for n in ("h0", "c0") if n in inputs] if wrt_init else [])
    attrs = {"hidden_size": H, "direction": direction, **({"layout": layout} if layout else {}), **attrs}
    n_out = 3 if kind == "LSTM" else 2
    return Case(kind, inputs, wrt, attrs, opset, n_outputs=n_out, score_output=score, input_order=order,
                id=f"{kind}-{id or direction}-out{score}")


def _dq_lstm_case(per_column: bool):
    """A DynamicQuantizeLSTM as quantize_dynamic writes it: W [D, C, 4H], R [D, H, 4H] int8, scales per direction
    (or per column), int8 zero points."""
    dirs = 2
    w = rng.integers(-60, 61, (dirs, C, 4 * H)).astype(np.int8)  # 7 bits: u8 x s8 pairs never saturate int16
    r = rng.integers(-60, 61, (dirs, H, 4 * H)).astype(np.int8)
    shape = (dirs, 4 * H) if per_column else (dirs,)
    inputs = {"X": rng.standard_normal((T, N, C)), "W": w, "R": r,
              "B": rng.standard_normal((dirs, 8 * H)) * 0.3,
              "h0": rng.standard_normal((dirs, N, H)) * 0.5, "c0": rng.standard_normal((dirs, N, H)) * 0.5,
              "ws": rng.uniform(0.006, 0.012, shape).astype(np.float32), "wz": np.zeros(shape, np.int8),
              "rs": rng.uniform(0.006, 0.012, shape).astype(np.float32), "rz": np.zeros(shape, np.int8)}
    order = ["X", "W", "R", "B", "", "h0", "c0", "", "ws", "wz", "rs", "rz"]
    return Case("DynamicQuantizeLSTM", inputs, ["X", "h0", "c0"], {"hidden_size": H, "direction": "bidirectional"},
                14, n_outputs=3, score_output=0, input_order=order, domain=MS,
                id=f"DynamicQuantizeLSTM-{'per-column' if per_column else 'per-direction'}")


CASES = [
    rcase("RNN"),
    rcase("RNN", "reverse", score=1, init=True),
    rcase("RNN", "bidirectional", layout=1, lens=[5, 2, 4], wrt_init=True, id="layout1-lens"),
    rcase("RNN", "bidirectional", activations=["Relu", "Tanh"], bias=False, id="relu-nobias"),
    rcase("GRU"),
    rcase("GRU", "reverse", score=1, wrt_init=True, linear_before_reset=1),
    rcase("GRU", "bidirectional", lens=[3, 5, 1], init=True, id="lens"),
    rcase("GRU", "bidirectional", layout=1, lens=[3, 5, 1], wrt_init=True, linear_before_reset=1,
          id="layout1-lens-lbr"),
    rcase("GRU", "forward", clip=0.7, id="clip"),
    rcase("LSTM"),
    rcase("LSTM", "reverse", score=2, wrt_init=True),
    rcase("LSTM", "bidirectional", score=1, init=True),
    rcase("LSTM", "bidirectional", lens=[2, 5, 4], wrt_init=True, id="lens"),
    rcase("LSTM", "bidirectional", layout=1, lens=[5, 1, 3], wrt_init=True, peep=True, id="layout1-lens-peep"),
    rcase("LSTM", "reverse", peep=True, clip=0.8, init=True, id="peep-clip"),
    rcase("LSTM", "forward", activations=["Sigmoid", "Relu", "Tanh"], bias=False, opset=7, id="acts-opset7"),
    _dq_lstm_case(False),
    _dq_lstm_case(True),
]


def _inputs(case: Case, feeds64: dict) -> list:
    values = {**case.inputs, **feeds64}
    return [None if name == "" else np.asarray(values[name]) for name in case.input_order]


def _reference(case: Case, feeds64: dict) -> np.ndarray:
    return recurrent(case.op, _inputs(case, feeds64), case.attrs)[case.score_output]


def time_major(model_bytes: bytes) -> bytes:
    """The same model with every layout=1 recurrent node run as Transposes around its layout=0 twin: onnxruntime's
    CPU kernels refuse layout=1 ("Batchwise recurrent operations are not supported"), so this is how a
    layout=1 node's forward, and the gradient graph built for it, get run here."""
    from onnx import helper

    model = onnx.load_from_string(model_bytes)
    nodes = []
    for node in model.graph.node:
        layout = next((a for a in node.attribute if a.name == "layout"), None)
        if node.op_type not in GATES or layout is None or layout.i == 0:
            nodes.append(node)
            continue
        layout.i = 0
        ins, outs = list(node.input), list(node.output)
        for k in (0, 5, 6):  # X [N, T, C] and the states [N, D, H] -> time-major
            if k < len(ins) and ins[k]:
                nodes.append(helper.make_node("Transpose", [ins[k]], [ins[k] + "_tm"], perm=[1, 0, 2]))
                ins[k] += "_tm"
        for k, name in enumerate(outs):
            if name:
                perm = [2, 0, 1, 3] if k == 0 else [1, 0, 2]
                nodes.append(helper.make_node("Transpose", [name + "_tm"], [name], perm=perm))
                outs[k] = name + "_tm"
        del node.input[:], node.output[:]
        node.input.extend(ins)
        node.output.extend(outs)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.ClearField("value_info")
    return model.SerializeToString()


def _session(model_bytes, *args, **kwargs):
    from onnxcam.runtime import cpu_session
    return cpu_session(time_major(model_bytes), *args, **kwargs)


@pytest.fixture
def numpy_reference(monkeypatch):
    monkeypatch.setattr(gradcheck, "_reference", _reference)
    monkeypatch.setattr(gradcheck, "cpu_session", _session)


def _runtime_outputs(case: Case) -> list:
    model = gradcheck._model(case, np.float32)
    for out in model.graph.output:
        out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    feeds = {k: np.asarray(v, np.float32) for k, v in case.inputs.items() if k in case.wrt}
    return _session(model.SerializeToString()).run(None, feeds)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_is_the_runtime_forward(case):
    """The numpy reference computes what onnxruntime computes (sequence_lens, clip, peepholes, layouts included);
    for DynamicQuantizeLSTM, which also quantizes X and h on the fly, within that rounding."""
    want = recurrent(case.op, _inputs(case, {}), case.attrs)
    got = _runtime_outputs(case)
    tol = 2e-2 if case.domain else 1e-5
    for k, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, atol=tol, rtol=0, err_msg=f"{case}: output {k}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case, numpy_reference):
    gradcheck.check_case(case)


def test_clip_reaches_the_gates():
    """The clip case is built so that clipping changes the result (else it would test nothing)."""
    case = next(c for c in CASES if c.id.startswith("GRU-clip"))
    unclipped = {k: v for k, v in case.attrs.items() if k != "clip"}
    a = recurrent(case.op, _inputs(case, {}), case.attrs)[0]
    b = recurrent(case.op, _inputs(case, {}), unclipped)[0]
    assert np.abs(a - b).max() > 1e-2


def test_sequence_length_not_static_is_refused():
    from onnx import TensorProto, helper

    from onnxcam import rewrite
    from onnxcam.graph.model import ModelGraph

    w = _weights("GRU", 1)
    node = helper.make_node("GRU", ["x", "W", "R"], ["y", "yh"], name="rec", hidden_size=H)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", C])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(w[k].astype(np.float32), k) for k in ("W", "R")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    with pytest.raises(UnsupportedOpError, match=r"GRU node 'rec'.*static sizes"):
        rewrite.build(ModelGraph(model), ["x"], "y")


# ---- whole torch stacks --------------------------------------------------------------------------------------------

class _Stack:
    """A 2-layer bidirectional torch recurrent stack, plus a linear head, exported once per kind."""

    def __init__(self, kind: str, batch_first: bool):
        import torch

        torch.manual_seed({"LSTM": 1, "GRU": 2, "RNN": 3}[kind])
        cls = getattr(torch.nn, kind)
        self.rec = cls(6, 5, num_layers=2, bidirectional=True, batch_first=batch_first).double().eval()
        self.head = torch.nn.Linear(10, 7).double().eval()
        self.batch_first = batch_first

    def forward(self, x):
        return self.head(self.rec(x)[0])


@functools.cache
def _exported(kind: str, batch_first: bool):
    import io

    import torch

    stack = _Stack(kind, batch_first)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rec, self.head = stack.rec, stack.head

        def forward(self, x):
            return stack.forward(x)
    x = torch.zeros((2, 8, 6) if batch_first else (8, 2, 6))
    model = M().float()
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    model.double()
    return stack, onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("kind,batch_first", [("LSTM", False), ("GRU", True), ("RNN", False)])
def test_torch_stack_matches_float64_autograd(kind, batch_first):
    import torch

    stack, model = _exported(kind, batch_first)
    assert sum(n.op_type == kind for n in model.graph.node) == 2
    x = np.random.default_rng(4).standard_normal((2, 8, 6) if batch_first else (8, 2, 6)).astype(np.float32)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = stack.forward(xt)
    u = torch.tensor(np.random.default_rng(6).standard_normal(tuple(y.shape)))
    (y * u).sum().backward()
    got = _input_gradient(model, x, u.numpy())
    np.testing.assert_allclose(got, xt.grad.numpy(), atol=1e-4 * float(np.abs(xt.grad.numpy()).max()), rtol=0)


def _input_gradient(model: onnx.ModelProto, x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """onnxcam's d(sum(u * y))/dx for the model's first output y, through rewrite.build."""
    from onnxcam import rewrite
    from onnxcam.graph.model import ModelGraph
    from onnxcam.runtime import cpu_session

    mg = ModelGraph(model)
    out = model.graph.output[0].name
    rw = rewrite.build(mg, [mg.input_name], out)
    sess = cpu_session(rw.model.SerializeToString(), rw.initializer_arrays())
    feeds = {mg.input_name: x, rewrite.SEED: u.astype(np.float32)[:, None]}
    if rw.has_ranking:
        feeds[rewrite.RANKED] = np.array(False)
    return sess.run([rewrite.grad_name(mg.input_name)], feeds)[0]
