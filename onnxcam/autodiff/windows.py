"""Window propagation for passes.crop_seed_windows: run a region of gradient nodes on the part of each map that can
hold nonzeros.

A region is a set of gradient nodes whose tensors are all (N, C, H, W) maps with static sizes. Its sources are the
gradient tensors that enter it; at run time each source's rows and columns that hold a nonzero are found
(|g| summed over the channels, != 0: a NaN or inf counts), and every tensor of the region runs on a box of its map
that holds all its nonzeros. The boxes come from tables built here from the ops' geometry, one small table of op kinds:
- elementwise ops (Mul, Div, Add, Sub, Neg, Sum, Identity) and channel Slices, Pads and Concats: the union of
  their gradient inputs' windows;
- Conv: output o reads inputs o*s - b + j*d, so input row i reaches outputs [ceil((i + b - span)/s),
  floor((i + b)/s)] (span = (k-1)d); a stride-1 'same' Conv keeps the map's size and index (the head's 3x3s),
  a strided one with span < s (the nearest Upsample's gradient: block sums) shrinks it;
- ConvTranspose (a strided Conv's gradient): input row i reaches outputs [i*s - b, i*s - b + span].
For a source s, a tensor's table gives, for each row (column) i of s, the rows (columns) of the tensor that a
nonzero at i can reach: a box is the min of the starts and the max of the ends over the hit rows of every source
that reaches the tensor (a zero source reaches nothing). Tensors of one map size reached from the same sources
share one box, the union of their windows at that size: a stride-1 Conv then reads and writes the same box, and
its zero padding at the box's border stands for values that are zero. Where boxes differ (a Sum of branches from
other sources, a Conv that changes the map's size) the tensor is moved into the reader's box with a Pad and a
Slice; tensors that leave the region are padded back to their whole map; forward tensors a node multiplies are
cropped to its box. Exact: nothing outside a box is ever nonzero, so every product and sum is the dense one's,
up to the order of float32 sums.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)

__all__ = ["Region", "window_region"]

_LINEAR_IN_ALL = {"Add", "Sub", "Sum", "Neg", "Identity", "Concat"}  # every map input is a gradient
# Forward ops that act value by value (with broadcasting): a box of their output is their work on boxes.
_POINTWISE = {"Add", "Sub", "Mul", "Div", "Neg", "Sigmoid", "Tanh", "Relu", "Where", "Greater", "Less",
              "GreaterOrEqual", "LessOrEqual", "Equal", "Not", "And", "Or", "Cast", "Abs", "Exp", "Reciprocal",
              "Identity", "Sqrt"}
_BIG = 1 << 40  # a source row without nonzeros: added to a start (subtracted from an end) it drops out
_NONE = 1 << 30  # a table entry that reaches nothing


@dataclass
class Region:
    """The nodes to run on windows (graph order), the gradient tensors (by id) they may read, static shapes."""
    nodes: list
    gradients: set
    shapes: dict
    rule: str = "passes.crop_seed_windows"
    keys: dict = field(default_factory=dict)  # id(tensor) -> (H, W, frozenset of source ids)
    points: set = field(default_factory=set)  # ids of the seed's maps: one anchor is one nonzero there


def _conv_geometry(n: gs.Node, kernel: list) -> tuple | None:
    """(strides, begin pads, spans) of a 2-D Conv or ConvTranspose node, or None (auto_pad, output_shape)."""
    if n.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or "output_shape" in n.attrs:
        return None
    strides = [int(s) for s in n.attrs.get("strides", [1, 1])]
    dilations = [int(d) for d in n.attrs.get("dilations", [1, 1])]
    pads = [int(p) for p in n.attrs.get("pads", [0, 0, 0, 0])]
    if len(strides) != 2 or len(pads) != 4 or len(kernel) != 2:
        return None
    return strides, pads, [(k - 1) * d for k, d in zip(kernel, dilations)]


def _kind(n: gs.Node, region: Region) -> str | None:
    """The node's entry in the table of op kinds ('same', 'strided', 'transposed', 'join'), or None when it cannot
    run on a window: its maps are not static 4-D, or a precondition of its kind fails."""
    shapes, grads = region.shapes, region.gradients
    maps = [t for t in n.inputs if id(t) in grads]
    out = shapes.get(n.outputs[0].name) if len(n.outputs) == 1 else None
    if not maps or not _static4(out) or not all(_static4(shapes.get(t.name)) for t in maps):
        return None
    if n.op in ("Conv", "ConvTranspose"):
        if len(maps) != 1 or n.inputs[0] is not maps[0] or len(n.inputs) > 2:
            return None  # a bias would be no linear map of the gradient
        w = shapes.get(n.inputs[1].name)
        kernel = [int(k) for k in n.attrs.get("kernel_shape", (w or ())[2:])]
        geo = _conv_geometry(n, kernel)
        if geo is None:
            return None
        strides, pads, spans = geo
        if n.op == "ConvTranspose":
            return "transposed"
        if strides == [1, 1] and tuple(out[2:]) == tuple(shapes[maps[0].name][2:]) and \
                all(pads[a] + pads[a + 2] == spans[a] for a in (0, 1)):
            return "same"
        return "strided" if all(sp < s for sp, s in zip(spans, strides)) else None
    if any(tuple(shapes[t.name][2:]) != tuple(out[2:]) for t in maps):
        return None
    if n.op in _LINEAR_IN_ALL:
        ok = len(maps) == len(n.inputs) and (n.op != "Concat" or int(n.attrs.get("axis", 0)) in (0, 1, -3, -4))
    elif n.op in ("Mul", "Div"):
        ok = len(maps) == 1 and (n.op == "Mul" or n.inputs[0] is maps[0])
        ok = ok and all(_croppable(shapes.get(t.name), out) is not None for t in n.inputs if t is not maps[0])
    elif n.op == "Slice":
        ok = n.inputs[0] is maps[0] and _constant_axes(n.inputs[3:4], n.inputs[1:3])
    elif n.op == "Pad":
        ok = n.inputs[0] is maps[0] and _channel_pad(n)
    else:
        ok = False
    return "join" if ok else None


def _static4(shape) -> bool:
    return shape is not None and len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape)


def _croppable(shape, out) -> bool | None:
    """True when a forward tensor of `shape` must be cropped with a map of shape `out`, False when it broadcasts
    over the map (size 1 on both axes), None when neither (no window then)."""
    if shape is None or len(shape) > 4 or any(not isinstance(d, int) for d in shape):
        return None
    spatial = ((1, 1) + tuple(shape))[-2:]
    if len(shape) == 4 and spatial == tuple(out[2:]):
        return True
    return False if spatial == (1, 1) else None


def _constant_axes(axes: list, bounds: list) -> bool:
    """A Slice of the batch or channel axes only, with constant bounds and axes."""
    if len(axes) != 1 or not all(isinstance(t, gs.Constant) for t in [*axes, *bounds]):
        return False
    return all(int(a) in (0, 1, -3, -4) for a in np.asarray(axes[0].values).reshape(-1))


def _channel_pad(n: gs.Node) -> bool:
    """A zero Pad of the batch or channel axes only, with constant pads (the Slice rule's channel gradient)."""
    mode = n.attrs.get("mode", "constant")
    if mode not in ("constant", b"constant") or len(n.inputs) < 2 or not isinstance(n.inputs[1], gs.Constant):
        return False
    if len(n.inputs) > 2 and n.inputs[2].name and not (isinstance(n.inputs[2], gs.Constant)
                                                       and not np.any(n.inputs[2].values)):
        return False
    if len(n.inputs) > 3 and n.inputs[3].name:
        return False  # an axes input: keep it simple
    pads = np.asarray(n.inputs[1].values).reshape(-1)
    return pads.size == 8 and not np.any(pads[[2, 3, 6, 7]])


# ---- tables -------------------------------------------------------------------------------------------------

def _point_table(hw: tuple) -> tuple[np.ndarray, np.ndarray]:
    """A source's own table: row (column) i reaches row (column) i."""
    k = max(hw)
    lo, hi = np.full((2, k), _NONE, np.int64), np.full((2, k), -_NONE, np.int64)
    for a in (0, 1):
        lo[a, : hw[a]] = np.arange(hw[a])
        hi[a, : hw[a]] = np.arange(hw[a]) + 1
    return lo, hi


def _union(tables: list[dict]) -> dict:
    out: dict = {}
    for t in tables:
        for s, (lo, hi) in t.items():
            if s in out:
                out[s] = (np.minimum(out[s][0], lo), np.maximum(out[s][1], hi))
            else:
                out[s] = (lo.copy(), hi.copy())
    return out


def _mapped(table: dict, first, last, extent: tuple) -> dict:
    """Each window [lo, hi) of `table` mapped to [first(lo), last(hi)), clipped to the map's `extent`."""
    out = {}
    for s, (lo, hi) in table.items():
        empty = lo >= hi
        new_lo = np.stack([np.clip(first(a, lo[a]), 0, extent[a]) for a in (0, 1)])
        new_hi = np.stack([np.clip(last(a, hi[a]), 0, extent[a]) for a in (0, 1)])
        empty |= new_lo >= new_hi
        out[s] = (np.where(empty, _NONE, new_lo), np.where(empty, -_NONE, new_hi))
    return out


def _propagate(n: gs.Node, kind: str, tables: dict, shapes: dict) -> dict:
    """The table of n's output from those of its gradient inputs."""
    ins = [tables[id(t)] for t in n.inputs if id(t) in tables]
    extent = tuple(shapes[n.outputs[0].name][2:])
    if kind == "join":
        return _union(ins)
    kernel = [int(k) for k in n.attrs.get("kernel_shape", shapes[n.inputs[1].name][2:])]
    strides, pads, spans = _conv_geometry(n, kernel)
    if kind == "transposed":  # input i reaches outputs [i*s - b, i*s - b + span]
        return _mapped(ins[0], lambda a, lo: lo * strides[a] - pads[a],
                       lambda a, hi: (hi - 1) * strides[a] - pads[a] + spans[a] + 1, extent)
    # input i reaches outputs [ceil((i + b - span) / s), floor((i + b) / s)]
    return _mapped(ins[0], lambda a, lo: -((spans[a] - lo - pads[a]) // strides[a]),
                   lambda a, hi: (hi - 1 + pads[a]) // strides[a] + 1, extent)


# ---- emission -----------------------------------------------------------------------------------------------

class _Emitter:
    """Emits the run-time boxes and the crops of one region."""

    def __init__(self, b, region: Region, tables: dict, sources: dict):
        self.b, self.region, self.sources = b, region, sources
        self.penalties: dict = {}
        self.boxes: dict = {}
        self.crops: dict = {}
        self.moves: dict = {}
        self.padding: dict = {}
        # the union of windows per map size and source: every tensor of that size shares it
        self.level: dict = {}
        for tid, (h, w, _) in region.keys.items():
            for s, (lo, hi) in tables[tid].items():
                have = self.level.setdefault((h, w), {})
                have[s] = (np.minimum(have[s][0], lo), np.maximum(have[s][1], hi)) if s in have else (lo, hi)

    def penalty(self, s: int):
        """(2, K) int64: 0 at the rows (first line) and columns (second) of source s that hold a nonzero, _BIG
        elsewhere and past the map's end."""
        if s not in self.penalties:
            b, g = self.b, self.sources[s]
            hw = tuple(self.region.shapes[g.name][2:])
            k = max(hw)
            # |g| summed over the channels by a 1x1 Conv of ones (onnxruntime's quickest reduction of them; a NaN
            # or inf sums to one too), then the max over the batch and the other spatial axis
            ones = b.const(np.ones((1, self.region.shapes[g.name][1], 1, 1), b.dtype))
            m = b.op("Conv", b.op("Abs", g), ones)
            lines = []
            for axis in (3, 2):  # rows: max over columns; columns: max over rows
                zero = b.cast(b.op("Equal", b.reduce("ReduceMax", m, [0, 1, axis], keepdims=False), 0.0), np.int64)
                pen = b.op("Mul", zero, b.ints([_BIG]))
                if hw[3 - axis] < k:
                    pen = b.op("Pad", pen, b.ints([0, k - hw[3 - axis]]), b.const(np.asarray(_BIG, np.int64)))
                lines.append(b.unsqueeze(pen, [0]))
            self.penalties[s] = b.op("Concat", *lines, axis=0)
        return self.penalties[s]

    def box(self, key: tuple):
        """(starts, ends), two int64 pairs (rows, columns): the box of every tensor with this key."""
        if key not in self.boxes:
            b = self.b
            h, w, srcs = key
            order = sorted(srcs)
            lo = np.concatenate([self.level[(h, w)][s][0] for s in order], axis=1)
            hi = np.concatenate([self.level[(h, w)][s][1] for s in order], axis=1)
            if srcs not in self.penalties:  # one Concat per set of sources, whatever the map size
                self.penalties[srcs] = self.penalty(order[0]) if len(order) == 1 else \
                    b.op("Concat", *map(self.penalty, order), axis=1)
            pen = self.penalties[srcs]
            start = b.reduce("ReduceMin", b.op("Add", b.const(lo), pen), [1], keepdims=False)
            end = b.reduce("ReduceMax", b.op("Sub", b.const(hi), pen), [1], keepdims=False)
            start = b.op("Min", start, b.ints([h - 1, w - 1]))  # no source holds a nonzero: a 1x1 box of zeros
            end = b.op("Max", end, b.op("Add", start, b.ints([1, 1])))
            self.boxes[key] = start, end
        return self.boxes[key]

    def crop(self, t: gs.Tensor, key: tuple):
        """Forward tensor or source t cropped to the box of `key`."""
        if (id(t), key) not in self.crops:
            pushed = self._pushed(t, key)
            if pushed is None:
                start, end = self.box(key)
                pushed = self.b.op("Slice", t, start, end, self.b.ints([2, 3]), widen=False)
            self.crops[(id(t), key)] = pushed
        return self.crops[(id(t), key)]

    def _pushed(self, t: gs.Tensor, key: tuple):
        """t on the box of `key` by running its pointwise producer on crops of the producer's inputs, or None. Only
        for a forward tensor that a rule made for one reader (fold_silu's factor s + out (1 - s)): the producer
        then computes the box alone, where it computed the whole map for a Slice to copy the box out of it."""
        p = t.inputs[0] if len(t.inputs) == 1 else None
        if p is None or p.name not in self.b.origins or p.op not in _POINTWISE or len(p.outputs) != 1 \
                or len(t.outputs) != 1 or _is_output(self.b, t) or id(t) in self.region.gradients:
            return None
        out = self.region.shapes.get(t.name)
        if not _static4(out) or tuple(out[2:]) != tuple(key[:2]):
            return None
        plan = [_croppable(self.region.shapes.get(x.name), out) for x in p.inputs]
        if any(c is None for c in plan):
            return None
        for i, (x, cropped) in enumerate(zip(list(p.inputs), plan)):
            if cropped:
                p.inputs[i] = self.crop(x, key)
        return t

    def rebox(self, y, c0, c1, key: tuple, memo=None):
        """y, which holds rows/columns [c0, c1) of its map (zero elsewhere), as the box of `key`; `memo` names
        (c0, c1) when they are another key's box, whose move to `key` is then computed once."""
        b = self.b
        if memo is None or (memo, key) not in self.moves:
            start, end = self.box(key)
            zero = b.ints([0, 0])
            pads = b.op("Concat", zero, b.op("Max", b.op("Sub", c0, start), zero), zero,
                        b.op("Max", b.op("Sub", end, c1), zero), axis=0)
            first = b.op("Max", b.op("Sub", start, c0), zero)
            move = pads, first, b.op("Add", first, b.op("Sub", end, start))
            if memo is None:
                return self._moved(y, move)
            self.moves[(memo, key)] = move
        return self._moved(y, self.moves[(memo, key)])

    def _moved(self, y, move):
        pads, first, last = move
        y = self.b.op("Pad", y, pads, self.b.const(np.asarray(0.0, self.b.dtype)))
        return self.b.op("Slice", y, first, last, self.b.ints([2, 3]))

    def pad_back(self, inner, key: tuple, out: gs.Tensor) -> None:
        """Write the whole map `out` from its box `inner`: zeros around it."""
        b = self.b
        if key not in self.padding:
            start, end = self.box(key)
            zero = b.ints([0, 0])
            self.padding[key] = b.op("Concat", zero, start, zero, b.op("Sub", b.ints([key[0], key[1]]), end), axis=0)
        padded = b.op("Pad", inner, self.padding[key], b.const(np.asarray(0.0, b.dtype)))
        _replace(padded.inputs[0].outputs, padded, out)


def window_region(b, region: Region, bounds_rule: str | None = None, worth: float | None = None) -> int:
    """Run `region` on windows; return how many of its nodes do (0: nothing changed).

    bounds_rule: the rule name recorded for the nodes that compute the boxes (passes.crop_seed_windows places
    them). worth: keep only the nodes that read the seed's maps (region.points) and whose windows, for one
    nonzero there, cover at most this share of their map on average: beyond, the crops, pads and the boxes'
    small nodes cost more than they save (a gradient from elsewhere is nonzero on a large part of its map). For a
    region that runs only when its sources hold a nonzero (an If): a zero source's 1x1 boxes are then no gain."""
    nodes, kinds = _windowable(region, region.nodes)
    tables, sources = _tables(region, nodes, kinds)
    if worth is not None:
        nodes, kinds = _windowable(region, _worth_it(region, nodes, tables, worth))
        region.keys.clear()
        tables, sources = _tables(region, nodes, kinds)
    if not any(n.op in ("Conv", "ConvTranspose") for n in nodes):
        return 0
    inside = {id(n) for n in nodes}
    em = _Emitter(b, region, tables, sources)
    before = b.node, b.rule
    try:
        now: dict = {}  # id(region tensor or source) -> what the region reads for it (its box)
        for n in nodes:
            origin = b.origins[n.name]
            b.node = gs.Node(origin[1], name=origin[0])
            _window_node(b, em, n, kinds[id(n)], now, inside, bounds_rule)
    finally:
        b.node, b.rule = before
    return len(nodes)


def _windowable(region: Region, nodes: list) -> tuple[list, dict]:
    """The nodes that can run on windows (those of the table of op kinds) and {id(node): kind}."""
    kinds = {id(n): k for n in nodes if (k := _kind(n, region)) is not None}
    return [n for n in nodes if id(n) in kinds], kinds


def _tables(region: Region, nodes: list, kinds: dict) -> tuple[dict, dict]:
    """({id(tensor): {id(source): (starts, ends)}}, {id(source): source}) for the nodes (graph order); sets the
    region's keys."""
    made = {id(t) for n in nodes for t in n.outputs}
    tables: dict = {}
    sources: dict = {}
    for n in nodes:
        for t in n.inputs:
            if id(t) in region.gradients and id(t) not in made and id(t) not in tables:
                sources[id(t)] = t
                tables[id(t)] = {id(t): _point_table(tuple(region.shapes[t.name][2:]))}
                region.keys[id(t)] = (*region.shapes[t.name][2:], frozenset({id(t)}))
        out = n.outputs[0]
        tables[id(out)] = _propagate(n, kinds[id(n)], tables, region.shapes)
        region.keys[id(out)] = (*region.shapes[out.name][2:], frozenset(tables[id(out)]))
    return tables, sources


def _worth_it(region: Region, nodes: list, tables: dict, worth: float) -> list:
    """The nodes (graph order) whose windows cover at most `worth` of their map (_share) and whose gradient inputs
    are the seed's maps or outputs of nodes kept: the region stops where its windows grow large."""
    out = set(region.points)  # ids of the tensors the kept nodes may read
    kept = []
    for n in nodes:
        t = n.outputs[0]
        if _share(tables[id(t)], region.shapes[t.name]) <= worth and \
                all(id(x) in out for x in n.inputs if id(x) in region.gradients):
            kept.append(n)
            out.add(id(t))
    return kept


def _share(table: dict, shape: tuple) -> float:
    """The largest share of the map, over the sources, that the window of one nonzero covers on average."""
    share = 0.0
    for lo, hi in table.values():
        lengths = [np.maximum(hi[a] - lo[a], 0)[lo[a] < _NONE] for a in (0, 1)]
        if all(len(x) for x in lengths):
            share = max(share, float(lengths[0].mean() * lengths[1].mean()) / (shape[2] * shape[3]))
    return share


def _window_node(b, em: _Emitter, n: gs.Node, kind: str, now: dict, inside: set, bounds_rule) -> None:
    """Rewire node n to read and write boxes (its gradient inputs moved into its box, forward ones cropped)."""
    keys, shapes = em.region.keys, em.region.shapes
    out = n.outputs[0]
    key = keys[id(out)]
    b.rule = bounds_rule or em.region.rule
    for t in n.inputs:
        if id(t) in em.sources and id(t) not in now:
            now[id(t)] = em.crop(t, keys[id(t)])
    em.box(key)
    for k in {keys[id(t)] for t in n.inputs if id(t) in keys}:
        em.box(k)
    b.rule = em.region.rule
    if kind in ("same", "join"):
        for i, t in enumerate(list(n.inputs)):
            if id(t) in keys:
                got = now[id(t)]
                if keys[id(t)] != key:
                    got = em.rebox(got, *em.box(keys[id(t)]), key, memo=keys[id(t)])
                n.inputs[i] = got
            elif n.op in ("Mul", "Div") and _croppable(shapes.get(t.name), shapes[out.name]):
                n.inputs[i] = em.crop(t, key)
        _write(b, em, n, out, key, now, inside)
        return
    x = n.inputs[0]
    on_box = _transposed_on_box if kind == "transposed" else _strided_on_box
    y, c0, c1 = on_box(b, n, now[id(x)], *em.box(keys[id(x)]), shapes)
    inner = em.rebox(y, c0, c1, key)
    # the new nodes compute n's output; n itself goes
    n.inputs.clear()
    n.outputs.clear()
    last_node = inner.inputs[0]
    now[id(out)] = inner
    if any(id(r) not in inside for r in out.outputs) or _is_output(b, out):
        em.pad_back(inner, key, out)
    else:
        _replace(last_node.outputs, inner, out)
        now[id(out)] = out


def _geometry_consts(b, n: gs.Node, shapes: dict) -> tuple:
    """(strides, begin pads, spans) of Conv or ConvTranspose n as int64 pairs, and its attributes without pads."""
    kernel = [int(k) for k in n.attrs.get("kernel_shape", shapes[n.inputs[1].name][2:])]
    strides, pads, spans = _conv_geometry(n, kernel)
    attrs = {k: v for k, v in n.attrs.items() if k not in ("pads", "output_padding")}
    return b.ints(strides), b.ints(pads[:2]), b.ints(spans), attrs


def _transposed_on_box(b, n: gs.Node, x, start, end, shapes: dict) -> tuple:
    """(ConvTranspose n run without pads on x, the box [start, end) of its input; the rows/columns [c0, c1) of
    its output map that the result holds): local output q is map row start*s - b + q."""
    s, bp, sp, attrs = _geometry_consts(b, n, shapes)
    one = b.ints([1, 1])
    y = b.op("ConvTranspose", x, n.inputs[1], **attrs)
    c0 = b.op("Sub", b.op("Mul", start, s), bp)
    return y, c0, b.op("Add", c0, b.op("Add", b.op("Mul", b.op("Sub", b.op("Sub", end, start), one), s),
                                        b.op("Add", sp, one)))


def _strided_on_box(b, n: gs.Node, x, start, end, shapes: dict) -> tuple:
    """(Conv n, span < stride, run without pads on x, the box [start, end) of its input, with r zeros in front so
    that local row 0 is map row start - r = o0*s - b, and enough behind for the last output the box reaches;
    the rows/columns [o0, o0 + count) of its output map that the result holds)."""
    s, bp, sp, attrs = _geometry_consts(b, n, shapes)
    one, zero = b.ints([1, 1]), b.ints([0, 0])
    r = b.op("Mod", b.op("Add", start, bp), s)
    o0 = b.op("Div", b.op("Add", b.op("Sub", start, r), bp), s)
    last = b.op("Div", b.op("Add", b.op("Sub", end, one), bp), s)
    needed = b.op("Add", b.op("Mul", b.op("Sub", last, o0), s), b.op("Add", sp, one))
    have = b.op("Add", r, b.op("Sub", end, start))
    q = b.op("Max", b.op("Sub", needed, have), zero)
    padded = b.op("Pad", x, b.op("Concat", zero, r, zero, q, axis=0), b.const(np.asarray(0.0, b.dtype)))
    count = b.op("Add", b.op("Div", b.op("Sub", b.op("Add", have, q), b.op("Add", sp, one)), s), one)
    return b.op("Conv", padded, n.inputs[1], **attrs), o0, b.op("Add", o0, count)


def _write(b, em: _Emitter, n: gs.Node, out: gs.Tensor, key: tuple, now: dict, inside: set) -> None:
    """n writes its box; a tensor read outside the region is padded back to its map for those readers."""
    if not (any(id(r) not in inside for r in out.outputs) or _is_output(b, out)):
        now[id(out)] = out
        return
    inner = gs.Variable(f"{out.name}__onnxcam_window", dtype=out.dtype or b.dtype)
    _replace(n.outputs, out, inner)
    now[id(out)] = inner
    em.pad_back(inner, key, out)


def _is_output(b, t: gs.Tensor) -> bool:
    return any(o is t for o in b.graph.outputs)


def _replace(tensors, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, t in enumerate(list(tensors)):
        if t is old:
            tensors[i] = new
