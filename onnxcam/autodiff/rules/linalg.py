"""Gemm, MatMul and two-operand Einsum: each gradient is again a product, with the other operand transposed."""

from __future__ import annotations

import re

from . import rule


@rule("Gemm")
def _gemm(b, n, gy):
    """Y = alpha * A' B' + beta * C, with A' = A^T if transA, B' = B^T if transB."""
    a, bb = n.inputs[0], n.inputs[1]
    alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
    ta, tb = int(n.attrs.get("transA", 0)), int(n.attrs.get("transB", 0))
    g = gy[0]

    def d_a():  # dA' = alpha gy B'^T; dA = dA'^T when transA
        if ta:
            return b.op("Gemm", bb, g, alpha=alpha, transA=tb, transB=1)
        return b.op("Gemm", g, bb, alpha=alpha, transB=1 - tb)

    def d_b():  # dB' = alpha A'^T gy; dB = dB'^T when transB
        if tb:
            return b.op("Gemm", g, a, alpha=alpha, transA=1, transB=ta)
        return b.op("Gemm", a, g, alpha=alpha, transA=1 - ta)

    def d_c():
        c = n.inputs[2]
        scaled = g if beta == 1.0 else b.op("Mul", g, beta)
        return b.unbroadcast(scaled, b.shape(n.outputs[0]), b.shape(c))
    return (d_a, d_b, d_c)


@rule("MatMul")
def _matmul(b, n, gy):
    """numpy matmul semantics: batched, broadcast over leading dims, 1-D operands promoted and squeezed back."""
    a, c = n.inputs
    sa, sc, so = b.shape(a), b.shape(c), b.shape(n.outputs[0])

    def lifted(t, shape, axis):
        return (b.unsqueeze(t, [axis]), shape[:axis] + (1,) + shape[axis:]) if len(shape) == 1 else (t, shape)

    def prepared():
        a2, sa2 = lifted(a, sa, 0)
        c2, sc2 = lifted(c, sc, 1)
        g, go = gy[0], so
        if len(sa) == 1:  # the output lost the row axis
            g, go = b.unsqueeze(g, [len(so) - 1]), go[:-1] + (1,) + go[-1:]
        if len(sc) == 1:
            g, go = b.unsqueeze(g, [len(go)]), go + (1,)
        return a2, sa2, c2, sc2, g, go

    def t(x, rank):
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        return b.op("Transpose", x, perm=perm)

    def d_a():
        a2, sa2, c2, sc2, g, go = prepared()
        ga = b.op("MatMul", g, t(c2, len(sc2)))
        ga = b.unbroadcast(ga, go[:-2] + sa2[-2:], sa2)
        return b.squeeze(ga, [0]) if len(sa) == 1 else ga

    def d_c():
        a2, sa2, c2, sc2, g, go = prepared()
        gc = b.op("MatMul", t(a2, len(sa2)), g)
        gc = b.unbroadcast(gc, go[:-2] + sc2[-2:], sc2)
        return b.squeeze(gc, [1]) if len(sc) == 1 else gc
    return (d_a, d_c)


_EINSUM = re.compile(r"^([a-zA-Z]*),([a-zA-Z]*)->([a-zA-Z]*)$")


@rule("Einsum")
def _einsum(b, n, gy):
    """Two operands without repeated or dropped letters: d/dA of 'ab,bc->ac' is einsum('ac,bc->ab', gy, B)."""
    eq = n.attrs["equation"]
    eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
    m = _EINSUM.match(eq)
    if len(n.inputs) != 2 or m is None:
        raise b.error(f"has equation {eq!r}; only explicit two-operand forms 'x,y->z' are supported")
    sa, sc, so = m.groups()
    for sub in (sa, sc, so):
        if len(set(sub)) != len(sub):
            raise b.error(f"has a repeated index in {eq!r} (diagonals are not supported)")
    a, c = n.inputs

    def grad(mine, other, other_t):
        if not set(mine) <= set(so) | set(other):
            raise b.error(f"sums an index of one operand alone in {eq!r}; not supported")
        return lambda: b.op("Einsum", gy[0], other_t, equation=f"{so},{other}->{mine}")
    return (grad(sa, sc, c), grad(sc, sa, a))
