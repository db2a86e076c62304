"""Ops that move, select or copy elements. Reshapes map the gradient back with the input's run-time shape;
selections, paddings and interpolations act per axis through a matrix (Builder.axis_matmul).
"""

from __future__ import annotations

import numpy as np

from . import rule


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b, n, gy):
    return (lambda: b.reshape_like(gy[0], n.inputs[0]), None)


@rule("Transpose")
def _transpose(b, n, gy):
    rank = len(b.shape(n.inputs[0]))
    perm = list(n.attrs.get("perm", range(rank)[::-1]))
    return (lambda: b.op("Transpose", gy[0], perm=[int(p) for p in np.argsort(perm)]),)


@rule("Concat")
def _concat(b, n, gy):
    """Each input gets its slab of gy along the axis."""
    rank = len(b.shape(n.outputs[0]))
    axis = int(n.attrs["axis"]) % rank
    sizes = [b.static_dims(x, [axis])[0] for x in n.inputs]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)

    def piece(i):
        return lambda: b.slice(gy[0], [offsets[i]], [offsets[i + 1]], [axis])
    return [piece(i) for i in range(len(n.inputs))]
