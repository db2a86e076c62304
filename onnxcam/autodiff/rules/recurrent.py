"""Recurrent layers: RNN, GRU, LSTM (and com.microsoft DynamicQuantizeLSTM as LSTM on its dequantized weights).

Backpropagation through time over the static sequence length T (refused when T is not static). What does not
recur is computed for all steps at once: the forward node's output Y gives every step's previous hidden state, so
gate pre-activations and each gate's local derivative factor are a few batched MatMuls and elementwise ops over
[T, N, *]. Only the dependence of step t on step t+1 stays sequential: per step one small MatMul by the recurrent
weights and a handful of elementwise ops on [N, H] (LSTM also recomputes its cell state forward, which no output
holds: two ops per step). The input gradient is then one batched MatMul by W.

The sequential part is one Scan per recurrence (its body the step, written once), not T unrolled copies. Measured
with onnxruntime 1.31 on CPU: the LSTM backward recurrence (H=128, one thread) ran in 0.8-1.7 ms as a Scan vs
1.2-1.5 ms unrolled at T=40, N=1, 2.9 vs 5.8 ms at T=80 and 5.8-8.0 vs 6.7-10.8 ms at T=80, N=8; a whole CRNN
explanation (2-layer bidirectional LSTM, T=40) ran as fast either way within the noise of a loaded 2-core machine,
but its gradient graph has 313 nodes instead of 1,761, builds 2-4x faster and its session is created 4-5x faster.
Scan (unlike Loop) also has no condition to hand back to the host on every step. Before opset 9 (no Scan-9) the
same step functions are unrolled.

Conventions (ONNX): gate order i, o, f, c (LSTM) and z, r, h (GRU); W [D, G*H, C], R [D, G*H, H], B [D, 2*G*H]
(W's then R's biases); layout 0 is time-major (X [T, N, C], Y [T, D, N, H], states [D, N, H]), layout 1 batch-major
(X [N, T, C], Y [N, T, D, H], states [N, D, H]). With sequence_lens a step t >= length of a sample leaves that
sample's state unchanged and writes zeros to Y; the reverse direction starts at the sample's last step. clip bounds
the inputs of the gate activations. Gradients flow to X and, when on the path, to initial_h and initial_c; the
weights get none.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from . import rule
from .qlinear import MS

_DEFAULT_ACTS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
_SUPPORTED_ACTS = ("Sigmoid", "Tanh", "Relu")


@dataclass
class _Net:
    """One recurrent node as the rules read it, in time-major terms."""

    kind: str        # RNN, GRU, LSTM
    n: object        # the forward node
    steps: int       # T
    hidden: int      # H
    layout: int
    directions: list  # "forward" / "reverse", one per direction d
    acts: list       # per direction, the activation names
    clip: float | None
    w: object        # W [D, G*H, C] (a forward tensor, or dequantized weights)
    r: object        # R [D, G*H, H]


def _attr(n, name, default=None):
    v = n.attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else v


def _input(n, i):
    return n.inputs[i] if i < len(n.inputs) and n.inputs[i].name else None


def _net(b, n, kind: str, w=None, r=None) -> _Net:
    layout = int(n.attrs.get("layout", 0))
    x = n.inputs[0]
    steps = b.static_dims(x, [1 if layout else 0])[0]
    direction = _attr(n, "direction", "forward")
    directions = ["forward", "reverse"] if direction == "bidirectional" else [direction]
    if direction not in ("forward", "reverse", "bidirectional"):
        raise b.error(f"has direction {direction!r}")
    names = [a.decode() if isinstance(a, bytes) else a for a in n.attrs.get("activations", [])]
    per = len(_DEFAULT_ACTS[kind])
    names = names or _DEFAULT_ACTS[kind] * len(directions)
    if len(names) != per * len(directions):
        raise b.error(f"lists {len(names)} activations; {per} per direction expected")
    unknown = sorted({a for a in names if a not in _SUPPORTED_ACTS})
    if unknown:
        raise b.error(f"uses activation(s) {unknown}; supported: {list(_SUPPORTED_ACTS)}")
    if int(n.attrs.get("input_forget", 0)):
        raise b.error("couples the input and forget gates (input_forget=1), which is not supported")
    clip = n.attrs.get("clip")
    return _Net(kind, n, steps, int(n.attrs["hidden_size"]), layout, directions,
                [names[d * per:(d + 1) * per] for d in range(len(directions))],
                None if clip is None else float(clip), w if w is not None else n.inputs[1],
                r if r is not None else n.inputs[2])


# ---- activations: value and derivative of each allowed function ---------------------------------------------------

def _act(b, name: str, a, clip):
    """(f(clip(a)), f'(clip(a)) * dclip/da) of a pre-activation tensor `a`."""
    inside = None
    if clip is not None:
        inside = b.mask(b.op("LessOrEqual", b.op("Abs", a), clip))
        a = b.clip(a, -clip, clip)
    if name == "Sigmoid":
        y = b.op("Sigmoid", a)
        d = b.op("Mul", y, b.op("Sub", 1.0, y))
    elif name == "Tanh":
        y = b.op("Tanh", a)
        d = b.op("Sub", 1.0, b.op("Mul", y, y))
    else:  # Relu
        y = b.op("Relu", a)
        d = b.mask(b.op("Greater", a, 0.0))
    return y, d if inside is None else b.op("Mul", d, inside)


def _value(b, name: str, a, clip):
    """f(clip(a)) alone (the forward recomputation needs no derivative)."""
    if clip is not None:
        a = b.clip(a, -clip, clip)
    return b.op(name, a)


# ---- slicing a node's tensors by direction and time ------------------------------------------------------------------

def _time_major_x(b, net: _Net):
    x = net.n.inputs[0]
    return b.op("Transpose", x, perm=[1, 0, 2]) if net.layout else x


def _seq_of(b, net: _Net, y, d: int):
    """Direction d of a Y-shaped tensor, time-major [T, N, H]."""
    if net.layout:
        return b.op("Transpose", b.op("Gather", y, b.ints(d), axis=2), perm=[1, 0, 2])
    return b.op("Gather", y, b.ints(d), axis=1)


def _state_of(b, net: _Net, s, d: int):
    """Direction d of a state-shaped tensor ([D, N, H] or [N, D, H]) as [1, N, H]."""
    if net.layout:
        return b.op("Transpose", b.slice(s, [d], [d + 1], [1]), perm=[1, 0, 2])
    return b.slice(s, [d], [d + 1], [0])


def _states(b, net: _Net, per_direction: list):
    """[1, N, H] states, one per direction, back into the node's state layout."""
    s = per_direction[0] if len(per_direction) == 1 else b.op("Concat", *per_direction, axis=0)
    return b.op("Transpose", s, perm=[1, 0, 2]) if net.layout else s


def _masked(b, g, mask):
    """A Y gradient without its padded steps: Y holds constant zeros there."""
    return g if mask is None else b.op("Mul", g, mask)


def _zero_state(b, xs, hidden: int):
    """Zeros [1, N, H] for the batch of time-major xs."""
    if b.opset < 9:  # no ConstantOfShape yet: a product with a zero matrix has the shape
        width = b.static_dims(xs, [2])[0]
        return b.op("MatMul", b.slice(xs, [0], [1], [0]), b.const(np.zeros((width, hidden))))
    batch = b.slice(b.shape_of(xs), [1], [2], [0])
    return b.op("ConstantOfShape", b.op("Concat", b.ints([1]), batch, b.ints([hidden]), axis=0),
                value=_zero_value(b))


def _zero_value(b):
    return gs.Constant("zero", np.zeros(1, b.dtype))


def _split_steps(b, t, steps: int) -> list:
    """[T, ...] -> T tensors [1, ...]."""
    if steps == 1:
        return [t]
    sizes = [1] * steps
    if b.opset >= 13:
        return b.op("Split", t, b.ints(sizes), axis=0, outputs=steps)
    return b.op("Split", t, axis=0, split=sizes, outputs=steps)


def _matmul_t(b, x, m):
    """x @ m^T for a 2-D weight m."""
    return b.op("MatMul", x, b.op("Transpose", m, perm=[1, 0]))


def _masks(b, net: _Net, xs):
    """(mask [T, N, 1] of the steps each sample runs, the same one step later), as 0/1 floats; None without
    sequence_lens (or when every length is T)."""
    seq = _input(net.n, 4)
    if seq is None:
        return None, None
    known = b.model.value(seq)
    if known is not None and np.all(np.asarray(known) == net.steps):
        return None, None
    lengths = b.unsqueeze(b.cast(seq, np.int64), [0])  # [1, N]

    def upto(offset):
        steps = b.ints(np.arange(offset, net.steps + offset).reshape(-1, 1))
        return b.unsqueeze(b.mask(b.op("Less", steps, lengths)), [2])
    return upto(0), upto(1)


def _previous(b, seq, first, forward: bool, steps: int):
    """The state before each step in processing order: [first, seq[:-1]] forward, [seq[1:], first] in reverse."""
    if steps == 1:
        return first
    if forward:
        return b.op("Concat", first, b.slice(seq, [0], [steps - 1], [0]), axis=0)
    return b.op("Concat", b.slice(seq, [1], [steps], [0]), first, axis=0)


def _blend(b, m, on, off):
    """m * on + (1 - m) * off for a 0/1 mask m."""
    return b.op("Add", b.op("Mul", m, b.op("Sub", on, off)), off)


def _order(forward: bool, steps: int):
    return range(steps) if forward else range(steps - 1, -1, -1)


# ---- the recurrence: one Scan, or unrolled before opset 9 -----------------------------------------------------------

class _Body:
    """A Scan body under construction, with the part of the Builder's interface the step functions use (op, clip;
    numbers become constants of the body). Its tensors are named after the Scan node once that exists."""

    def __init__(self, b):
        self.b, self.opset, self.dtype = b, b.opset, b.dtype
        self.nodes: list = []
        self.tensors: list = []

    def var(self):
        v = gs.Variable(f"t{len(self.tensors)}", dtype=self.dtype)
        self.tensors.append(v)
        return v

    def _tensor(self, x):
        if isinstance(x, gs.Tensor):
            return x
        c = gs.Constant(f"t{len(self.tensors)}", np.asarray(x, dtype=self.dtype))
        self.tensors.append(c)
        return c

    def op(self, op_type, *inputs, outputs=1, **attrs):
        outs = [self.var() for _ in range(outputs)]
        self.nodes.append(gs.Node(op_type, inputs=[self._tensor(i) for i in inputs], outputs=outs, attrs=attrs))
        return outs[0] if outputs == 1 else outs

    def clip(self, x, lo, hi):
        if self.opset >= 11:
            return self.op("Clip", x, float(lo), float(hi))
        return self.op("Clip", x, min=float(lo), max=float(hi))

    def outputs(self, tensors: list) -> list:
        """The body's outputs: tensors it computes, each once (inputs, outer tensors and repeats pass through an
        Identity)."""
        made, seen, outs = {id(o) for n in self.nodes for o in n.outputs}, set(), []
        for t in tensors:
            outs.append(t if id(t) in made and id(t) not in seen else self.op("Identity", t))
            seen.add(id(t))
        return outs

    def name_after(self, prefix: str):
        for k, t in enumerate(self.tensors):
            t.name = f"{prefix}/{k}"
        for k, n in enumerate(self.nodes):
            n.name = f"{prefix}/{n.op}_{k}"


def _recur(b, step, init: list, seqs: list, forward: bool, steps: int):
    """Run `step(ops, states, xs) -> (states, ys)` over the steps in processing order (t ascending when forward,
    else descending). states: [N, *] tensors carried from step to step; xs: each sequence's [N, *] slice at step t;
    ys: [N, *] results. Returns (the final states, each y stacked in time order [T, N, *]). `ops` is the builder
    itself when unrolled, or a _Body."""
    if b.opset < 9:  # no Scan-9: unroll the same step
        pieces = [[b.squeeze(p, [0]) for p in _split_steps(b, sq, steps)] for sq in seqs]
        states, ys = list(init), None
        for t in _order(forward, steps):
            states, out = step(b, states, [p[t] for p in pieces])
            ys = ys or [[None] * steps for _ in out]
            for k, y in enumerate(out):
                ys[k][t] = b.unsqueeze(y, [0])
        return states, [_cat(b, y) for y in ys]
    body = _Body(b)
    s_in, x_in = [body.var() for _ in init], [body.var() for _ in seqs]
    s_out, y_out = step(body, s_in, x_in)
    outs = body.outputs(list(s_out) + list(y_out))
    for t in s_in + x_in + outs:  # every one is [N, *]; onnxruntime wants at least the rank of a body output
        t.dtype, t.shape = b.dtype, [None, None]
    graph = gs.Graph(nodes=body.nodes, inputs=s_in + x_in, outputs=outs, opset=b.opset)
    way = 0 if forward else 1
    res = b.op("Scan", *init, *seqs, outputs=len(outs), body=graph, num_scan_inputs=len(seqs),
               scan_input_directions=[way] * len(seqs), scan_output_directions=[way] * len(y_out))
    res = res if isinstance(res, list) else [res]
    body.name_after(res[0].inputs[0].name)
    return res[:len(init)], res[len(init):]


def _squeezed(b, state):
    """A [1, N, H] state as [N, H], the form the recurrence carries."""
    return b.squeeze(state, [0])


# ---- the rules ---------------------------------------------------------------------------------------------------

def _rule(kind: str, gates_fn, state_inputs: tuple):
    """A rule that runs `gates_fn` (the per-direction backward of one kind) once for all inputs it is asked for."""
    def grad_rule(b, n, gy, w=None, r=None):
        net = _net(b, n, kind, w, r)

        @functools.cache
        def run():
            return _backward(b, net, gy, gates_fn)

        def take(key):
            return lambda: run()[key]
        makers = [None] * len(n.inputs)
        makers[0] = take("x")
        for i, key in zip(state_inputs, ("h", "c")):
            if i < len(n.inputs):
                makers[i] = take(key)
        return makers
    return grad_rule


def _backward(b, net: _Net, gy, direction_fn) -> dict:
    """Sum the per-direction input gradients; stack the initial-state gradients back into the node's layout."""
    xs = _time_major_x(b, net)
    masks = _masks(b, net, xs)
    y = _forward_y(b, net)
    bias = _input(net.n, 3)
    h0, c0 = _input(net.n, 5), _input(net.n, 6) if net.kind == "LSTM" else None
    lstm = net.kind == "LSTM"
    dxs, dhs, dcs = [], [], []
    for d, direction in enumerate(net.directions):
        ctx = _Dir(
            d=d, forward=direction == "forward", hidden=net.hidden, acts=net.acts[d], xs=xs,
            w=b.op("Gather", net.w, b.ints(d), axis=0), r=b.op("Gather", net.r, b.ints(d), axis=0),
            bias=None if bias is None else b.op("Gather", bias, b.ints(d), axis=0),
            ys=_seq_of(b, net, y, d),
            h0=_state_of(b, net, h0, d) if h0 is not None else _zero_state(b, xs, net.hidden),
            c0=_state_of(b, net, c0, d) if c0 is not None else _zero_state(b, xs, net.hidden) if lstm else None,
            gys=None if gy[0] is None else _masked(b, _seq_of(b, net, gy[0], d), masks[0]),
            gh=None if len(gy) < 2 or gy[1] is None else _state_of(b, net, gy[1], d),
            gc=None if len(gy) < 3 or gy[2] is None else _state_of(b, net, gy[2], d),
            mask=masks[0], mask_next=masks[1])
        dx, dh, dc = direction_fn(b, net, ctx)
        dxs.append(dx)
        dhs.append(b.unsqueeze(dh, [0]))
        dcs.append(None if dc is None else b.unsqueeze(dc, [0]))
    dx = dxs[0] if len(dxs) == 1 else b.op("Add", *dxs)
    return {"x": b.op("Transpose", dx, perm=[1, 0, 2]) if net.layout else dx,
            "h": _states(b, net, dhs), "c": _states(b, net, dcs) if dcs[0] is not None else None}


def _forward_y(b, net: _Net):
    """Y of the forward node; a node that does not write Y gets a twin in the gradient graph that does. So does a
    DynamicQuantizeLSTM: the float LSTM on its dequantized weights, whose gradient is then exactly that of the float
    equivalent (its own Y also carries the rounding of X and h)."""
    n = net.n
    if n.op == net.kind and n.outputs and n.outputs[0].name:
        return n.outputs[0]
    attrs = dict(n.attrs)
    if n.op != net.kind:
        ins = [n.inputs[0], net.w, net.r] + list(n.inputs[3:8])
        return b.op("LSTM", *ins, outputs=3, **attrs)[0]
    return b.op(n.op, *n.inputs, outputs=len(n.outputs) or 1, **attrs)[0]


@dataclass
class _Dir:
    """One direction's tensors: weights [G*H, *], time-major sequences [T, N, *], states [1, N, H]."""

    d: int
    forward: bool
    hidden: int
    acts: list
    xs: object
    w: object
    r: object
    bias: object
    ys: object
    h0: object
    c0: object
    gys: object
    gh: object
    gc: object
    mask: object
    mask_next: object


def _hidden_before(b, net: _Net, c: _Dir):
    """Each step's previous hidden state from Y; in reverse with lengths, h0 where the step after is padding."""
    shifted = _previous(b, c.ys, c.h0, c.forward, net.steps)
    if c.mask_next is None or c.forward:
        return shifted
    return _blend(b, c.mask_next, shifted, c.h0)


def _pre(b, c: _Dir, gates: int, hidden: int, hprev, split_recurrent: bool = False):
    """Gate pre-activations [T, N, G*H]: X W^T + Wb (+ H_prev R^T + Rb unless split_recurrent, then both apart)."""
    zx = _matmul_t(b, c.xs, c.w)
    zh = _matmul_t(b, hprev, c.r)
    if c.bias is not None:
        zx = b.op("Add", zx, b.slice(c.bias, [0], [gates * hidden], [0]))
        zh = b.op("Add", zh, b.slice(c.bias, [gates * hidden], [2 * gates * hidden], [0]))
    return (zx, zh) if split_recurrent else b.op("Add", zx, zh)


def _split_last(b, z, count: int):
    """[..., G*H] -> G tensors [..., H] (equal parts)."""
    if b.opset >= 18:
        return b.op("Split", z, axis=-1, num_outputs=count, outputs=count)
    return b.op("Split", z, axis=-1, outputs=count)


def _rnn_direction(b, net: _Net, c: _Dir):
    """h_t = f(a_t), a_t = X_t Wi^T + h_{t-1} Ri^T + b: da = dh f'(a); dh_{t-1} = da Ri."""
    hprev = _hidden_before(b, net, c)
    _, fa = _act(b, c.acts[0], _pre(b, c, 1, net.hidden, hprev), net.clip)
    if c.mask is not None:
        fa = b.op("Mul", fa, c.mask)
    seqs, unpack = _step_inputs(b, c, [fa], _keep(b, c))

    def step(ops, states, xs):
        (fa_t,), keep_t, gy_t = unpack(xs)
        dh = _plus(ops, states[0], gy_t)
        da = ops.op("Mul", dh, fa_t)
        return [_passed(ops, ops.op("MatMul", da, c.r), dh, keep_t)], [da]
    (dh,), (das,) = _recur(b, step, [_start(b, c, c.gh)], seqs, not c.forward, net.steps)
    return b.op("MatMul", das, c.w), dh, None


def _gru_direction(b, net: _Net, c: _Dir):
    """z = f(az), r = f(ar), n = g(an), h = (1 - z) n + z h_prev with an = Xh + (r h_prev) Rh^T + Rbh (linear before
    reset 0) or Xh + r (h_prev Rh^T + Rbh) (1). Per step: dn-path, dz, dr, then dh_prev."""
    hidden, lbr = net.hidden, int(net.n.attrs.get("linear_before_reset", 0))
    hprev = _hidden_before(b, net, c)
    zx, zh = _pre(b, c, 3, hidden, hprev, split_recurrent=True)
    xz, xr, xn = _split_last(b, zx, 3)
    hz, hr, hn = _split_last(b, zh, 3)
    z, fz = _act(b, c.acts[0], b.op("Add", xz, hz), net.clip)
    r, fr = _act(b, c.acts[0], b.op("Add", xr, hr), net.clip)
    if lbr:
        an = b.op("Add", xn, b.op("Mul", r, hn))
    else:
        rn = b.slice(c.r, [2 * hidden], [3 * hidden], [0])
        rbn = None if c.bias is None else b.slice(c.bias, [5 * hidden], [6 * hidden], [0])
        an = b.op("Add", xn, _matmul_t(b, b.op("Mul", r, hprev), rn))
        if rbn is not None:
            an = b.op("Add", an, rbn)
    nn, fn = _act(b, c.acts[1], an, net.clip)
    fa = b.op("Mul", b.op("Sub", 1.0, z), fn)                # dan = dh * fa
    fzz = b.op("Mul", b.op("Sub", hprev, nn), fz)            # daz = dh * fzz
    keep = z if c.mask is None else _blend(b, c.mask, z, 1.0)  # dh_prev gets dh * keep directly
    if c.mask is not None:
        fa, fzz = b.op("Mul", fa, c.mask), b.op("Mul", fzz, c.mask)
    if lbr:  # dar = dan * hn_lin * f'(ar); d(h_prev R_h^T) = dan * r: one product by R per step
        fr_x = b.op("Mul", b.op("Mul", fa, hn), fr)
        seqs, unpack = _step_inputs(b, c, [b.op("Concat", fzz, fr_x, fa, axis=2),
                                           b.op("Concat", fzz, fr_x, b.op("Mul", fa, r), axis=2), keep])

        def step(ops, states, xs):
            (f_x_t, f_rec_t, keep_t), _, gy_t = unpack(xs)
            dh = _plus(ops, states[0], gy_t)
            dh3 = ops.op("Concat", dh, dh, dh, axis=-1)
            back = ops.op("MatMul", ops.op("Mul", dh3, f_rec_t), c.r)
            return [ops.op("Add", back, ops.op("Mul", dh, keep_t))], [ops.op("Mul", dh3, f_x_t)]
    else:  # d(r h_prev) = dan Rn; dar = d(r h_prev) * h_prev * f'(ar); dh_prev += d(r h_prev) * r
        rzr = b.slice(c.r, [0], [2 * hidden], [0])
        seqs, unpack = _step_inputs(b, c, [fa, fzz, b.op("Mul", hprev, fr), r, keep])

        def step(ops, states, xs):
            (fa_t, fzz_t, frh_t, r_t, keep_t), _, gy_t = unpack(xs)
            dh = _plus(ops, states[0], gy_t)
            dan = ops.op("Mul", dh, fa_t)
            drh = ops.op("MatMul", dan, rn)
            dzr = ops.op("Concat", ops.op("Mul", dh, fzz_t), ops.op("Mul", drh, frh_t), axis=-1)
            back = ops.op("Sum", ops.op("MatMul", dzr, rzr), ops.op("Mul", drh, r_t), ops.op("Mul", dh, keep_t))
            return [back], [ops.op("Concat", dzr, dan, axis=-1)]
    (dh,), (dzs,) = _recur(b, step, [_start(b, c, c.gh)], seqs, not c.forward, net.steps)
    return b.op("MatMul", dzs, c.w), dh, None


def _lstm_direction(b, net: _Net, c: _Dir):
    """i = f(ai), o = f(ao), fg = f(af), g = g(ac), c_t = fg c_prev + i g, h_t = o h(c_t); peepholes add P * c to
    ai, af (previous cell) and ao (new cell). The cell states are recomputed forward (no output holds them), then
    every local derivative is batched; per step: dc = dc_next + dh dc_t/dh..., dz, dh_prev = dz R, dc_prev."""
    hidden = net.hidden
    hprev = _hidden_before(b, net, c)
    zi, zo, zf, zc = _split_last(b, _pre(b, c, 4, hidden, hprev), 4)
    peep = _input(net.n, 7)
    p = None if peep is None else _split_last(b, b.op("Gather", peep, b.ints(c.d), axis=0), 3)  # i, o, f
    f_act, g_act, h_act = c.acts
    cells, cprev = _cell_states(b, net, c, zi, zf, zc, p)
    ai, af, ao = zi, zf, zo
    if p is not None:
        ai = b.op("Add", zi, b.op("Mul", p[0], cprev))
        af = b.op("Add", zf, b.op("Mul", p[2], cprev))
        ao = b.op("Add", zo, b.op("Mul", p[1], cells))
    i, di = _act(b, f_act, ai, net.clip)
    o, do = _act(b, f_act, ao, net.clip)
    fg, df = _act(b, f_act, af, net.clip)
    g, dg = _act(b, g_act, zc, net.clip)
    hc, dhc = _act(b, h_act, cells, None)
    f_o = b.op("Mul", hc, do)
    f_c = b.op("Mul", o, dhc)  # dc_t += dh * f_c
    if p is not None:
        f_c = b.op("Add", f_c, b.op("Mul", f_o, p[1]))
    f_i, f_f, f_g = b.op("Mul", g, di), b.op("Mul", cprev, df), b.op("Mul", i, dg)
    f_cp = fg if p is None else b.op("Sum", fg, b.op("Mul", f_i, p[0]), b.op("Mul", f_f, p[2]))
    f4 = b.op("Concat", f_i, f_o, f_f, f_g, axis=2)
    if c.mask is not None:
        f4, f_c = b.op("Mul", f4, c.mask), b.op("Mul", f_c, c.mask)
        f_cp = _blend(b, c.mask, f_cp, 1.0)
    seqs, unpack = _step_inputs(b, c, [f4, f_c, f_cp], _keep(b, c))

    def step(ops, states, xs):
        (f4_t, fc_t, fcp_t), keep_t, gy_t = unpack(xs)
        dh = _plus(ops, states[0], gy_t)
        dc = ops.op("Add", states[1], ops.op("Mul", dh, fc_t))
        dz = ops.op("Mul", ops.op("Concat", dc, dh, dc, dc, axis=-1), f4_t)
        return [_passed(ops, ops.op("MatMul", dz, c.r), dh, keep_t), ops.op("Mul", dc, fcp_t)], [dz]
    (dh, dc), (dzs,) = _recur(b, step, [_start(b, c, c.gh), _start(b, c, c.gc)], seqs, not c.forward, net.steps)
    return b.op("MatMul", dzs, c.w), dh, dc


def _cell_states(b, net: _Net, c: _Dir, zi, zf, zc, p):
    """(c_t for every step [T, N, H], the cell state before each step [T, N, H]), recomputed forward in
    processing order; a padded step (sequence_lens) keeps the state."""
    f_act, g_act, _ = c.acts
    g = _value(b, g_act, zc, net.clip)
    if p is None:  # the gates do not read the cell: batch them, two ops per step remain
        fg = _value(b, f_act, zf, net.clip)
        ig = b.op("Mul", _value(b, f_act, zi, net.clip), g)
        if c.mask is not None:
            fg, ig = _blend(b, c.mask, fg, 1.0), b.op("Mul", ig, c.mask)

        def step(ops, states, xs):
            new = ops.op("Add", ops.op("Mul", xs[0], states[0]), xs[1])
            return [new], [new, states[0]]
        seqs = [fg, ig]
    else:
        seqs = [zi, zf, g] + ([c.mask] if c.mask is not None else [])

        def step(ops, states, xs):
            state = states[0]
            i = _value(ops, f_act, ops.op("Add", xs[0], ops.op("Mul", p[0], state)), net.clip)
            f = _value(ops, f_act, ops.op("Add", xs[1], ops.op("Mul", p[2], state)), net.clip)
            new = ops.op("Add", ops.op("Mul", f, state), ops.op("Mul", i, xs[2]))
            new = new if len(xs) == 3 else _blend(ops, xs[3], new, state)
            return [new], [new, state]
    _, (cells, before) = _recur(b, step, [_squeezed(b, c.c0)], seqs, c.forward, net.steps)
    return cells, before


def _step_inputs(b, c: _Dir, factors: list, keep=None):
    """The sequences a backward recurrence reads at each step: the factors, then `keep` (when given), then the Y
    gradient (when there is one); and the function that unpacks a step's slices into (factors, keep, gy)."""
    seqs = list(factors) + ([keep] if keep is not None else []) + ([c.gys] if c.gys is not None else [])

    def unpack(xs):
        rest = list(xs[len(factors):])
        return list(xs[:len(factors)]), rest.pop(0) if keep is not None else None, rest.pop(0) if rest else None
    return seqs, unpack


def _start(b, c: _Dir, g):
    """The recurrence's initial state [N, H]: the gradient of the final state output, or zeros."""
    return _squeezed(b, g if g is not None else _zero_state(b, c.xs, c.hidden))


def _passed(ops, back, dh, keep_t):
    """dh_prev = what flows back through the cell, plus dh itself where a padded step passed the state through."""
    return back if keep_t is None else ops.op("Add", back, ops.op("Mul", dh, keep_t))


def _keep(b, c: _Dir):
    """1 - mask: where a padded step hands the state (and its gradient) through unchanged; None without lengths."""
    return None if c.mask is None else b.op("Sub", 1.0, c.mask)


def _plus(b, a, c):
    if a is None:
        return c
    return a if c is None else b.op("Add", a, c)


def _cat(b, parts: list):
    return parts[0] if len(parts) == 1 else b.op("Concat", *parts, axis=0)


_rnn = rule("RNN")(_rule("RNN", _rnn_direction, (5,)))
_gru = rule("GRU")(_rule("GRU", _gru_direction, (5,)))
_lstm = rule("LSTM")(_rule("LSTM", _lstm_direction, (5, 6)))


@rule("DynamicQuantizeLSTM", domain=MS)
def _dynamic_quantize_lstm(b, n, gy):
    """onnxruntime's quantize_dynamic LSTM: W [D, C, 4H] and R [D, H, 4H] int8 with per-direction (or per-column)
    scales and zero points (inputs 8-11). Differentiated as the float LSTM on its dequantized weights (the
    straight-through convention of quantize.py; X and h are quantized on the fly inside, and pass straight)."""
    w = _dequantized_weight(b, n, 1, 8, 9)
    r = _dequantized_weight(b, n, 2, 10, 11)
    return _lstm(b, n, gy, w, r)


def _dequantized_weight(b, n, data: int, scale: int, zero_point: int):
    """(q - zp) * scale of a [D, K, 4H] weight, transposed to ONNX's [D, 4H, K]."""
    q, s, zp = n.inputs[data], n.inputs[scale], _input(n, zero_point)

    def along(t):  # [D] -> [D, 1, 1]; [D, 4H] -> [D, 1, 4H]
        return b.unsqueeze(t, [1, 2]) if len(b.shape(t)) == 1 else b.unsqueeze(t, [1])
    w = b.cast(q, b.dtype)
    if zp is not None:
        w = b.op("Sub", w, b.cast(along(zp), b.dtype))
    w = b.op("Mul", w, along(s))
    return b.op("Transpose", w, perm=[0, 2, 1])
