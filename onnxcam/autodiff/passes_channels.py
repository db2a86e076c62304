"""seed_channels: a segmenter's last upsampling differentiated on the seeded class maps alone.

A segmenter's output is its class maps upsampled to the input's size (torchvision's FCN, DeepLabV3 and LRASPP end
in a bilinear Resize of (N, K, H/8, W/8) maps); the seed of a class target (tasks/segment.py) fills one of the K
maps, the others are zeros. The Resize rule would carry all K maps back at the input's size (LRASPP at 320 px:
1.6 of its 2.4 ms of gradient, 21 maps of which 20 are zeros). Here the walk instead finds, in the graph, the
channels where any sample's seed is nonzero (at least one: an all-zero seed keeps channel 0, and its gradient is
zero), gathers them, runs the Resize's adjoint on them as maps of one channel (shape.resize_adjoint; the
channels folded into the batch axis), and scatters the result into zeros shaped like the Resize's input. Exact:
the adjoint acts on each channel alone, and a channel whose seed is all zero has a zero gradient. The cost is two
reads of the seed (its maximum and minimum per channel) where the adjoint of the K maps read and wrote them
several times. onnxruntime's ReduceMax skips NaN: a channel whose seed holds NaN and zeros only would be left out,
but the Explainer refuses a seed holding NaN or Inf before the run (explainer._refuse_non_finite).

Precondition: the score is the output of a Resize (or Upsample) of a float32 rank-4 map that resizes axes 2 and
3 only, with a static channel count of at least 4, at opset 11 or later (ScatterElements); the seed is the dense
seed input (not a one-hot row of class indices). The nodes have no gradient rule of their own (NonZero): a graph
differentiated again is built without this pass (passes.SEED_PASSES).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .builder import Builder
from .rules.shape import resize_adjoint, resizes_spatial_axes_only

RULE = "passes_channels.seed_channels"
_MIN_CHANNELS = 4  # below, gathering the seeded maps saves less than the two reductions over the seed cost


def seed_channels(b: Builder, nodes: list[gs.Node], score: gs.Tensor, seed: gs.Tensor) -> set[int]:
    """{id of the Resize making the score} when the pass applies (see the module's precondition), else empty."""
    if "seed_channels" not in b.passes or b.opset < 11 or b.dtype != np.float32 or not b.made(seed):
        return set()
    if b.one_hot_classes(seed) is not None or seed.name in b.region_seeds:
        return set()
    n = score.inputs[0] if len(score.inputs) == 1 else None
    if n is None or n.op not in ("Resize", "Upsample") or not any(m is n for m in nodes):
        return set()
    x = n.inputs[0]
    in_shape, out_shape = b.model.shape(x), b.model.shape(score)
    if len(in_shape or ()) != 4 or len(out_shape or ()) != 4 or not isinstance(in_shape[1], int):
        return set()
    if in_shape[1] != out_shape[1] or in_shape[1] < _MIN_CHANNELS or not resizes_spatial_axes_only(b, n):
        return set()
    if not all(isinstance(d, int) for d in out_shape[2:]):
        return set()
    return {id(n)}


def seed_channels_gradient(b: Builder, n: gs.Node, gy: list) -> list:
    """The Resize's input gradient, computed on the channels the seed gy[0] fills (see the module's text)."""
    x, g = n.inputs[0], gy[0]
    height, width = b.shape(n.outputs[0])[2:]

    def grad():
        # (K,) flags: some seed is nonzero there. onnxruntime's ReduceMax and ReduceMin read the map once each
        # (0.3 ms for LRASPP's 21 maps at 320 px; its ReduceL1 and ReduceSumSquare take 1 ms, Abs 0.5)
        top = b.reduce("ReduceMax", g, [0, 2, 3], keepdims=False)
        bottom = b.reduce("ReduceMin", g, [0, 2, 3], keepdims=False)
        seeded = b.op("Or", b.op("Not", b.op("Equal", top, 0.0)), b.op("Not", b.op("Equal", bottom, 0.0)))
        first = b.op("ArgMax", b.mask(seeded), axis=0, keepdims=1)  # channel 0 when none: no shape is ever empty
        seeded = b.op("Or", seeded, b.op("Equal", b.ints(np.arange(b.shape(x)[1])), first))
        channels = b.squeeze(b.op("NonZero", seeded), [0])  # (k,) sorted
        taken = b.op("Gather", g, channels, axis=1)  # (N, k, H, W)
        maps = b.op("Reshape", taken, b.ints([-1, 1, height, width]))
        adjoint = resize_adjoint(b, n, maps, 1)  # (N * k, 1, h, w)
        shape = b.op("Concat", b.slice(b.shape_of(taken), [0], [2], [0]), b.slice(b.shape_of(x), [2], [4], [0]),
                     axis=0)
        back = b.op("Reshape", adjoint, shape)  # (N, k, h, w)
        where = b.op("Expand", b.op("Reshape", channels, b.ints([1, -1, 1, 1])), shape)
        return b.op("ScatterElements", b.zeros_like(x), where, back, axis=1)
    return (grad,) + (None,) * (len(n.inputs) - 1)
