"""Gemm, MatMul and Einsum: each gradient is again a product, with the other operand(s) transposed."""

from __future__ import annotations

from . import rule


def _product(b, x, y, alpha: float, trans_x: int, trans_y: int):
    """alpha * op(x) op(y) as a Gemm; before opset 11 Gemm's C input is required, so pass a zero there."""
    zero = b.const(0.0) if b.opset < 11 else None
    return b.op("Gemm", x, y, zero, alpha=alpha, transA=trans_x, transB=trans_y)


@rule("Gemm")
def _gemm(b, n, gy):
    """Y = alpha * A' B' + beta * C, with A' = A^T if transA, B' = B^T if transB; C broadcast to Y."""
    a, bb = n.inputs[0], n.inputs[1]
    alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
    ta, tb = int(n.attrs.get("transA", 0)), int(n.attrs.get("transB", 0))
    g = gy[0]

    def d_a():  # dA' = alpha gy B'^T; dA = dA'^T when transA
        return _product(b, bb, g, alpha, tb, 1) if ta else _product(b, g, bb, alpha, 0, 1 - tb)

    def d_b():  # dB' = alpha A'^T gy; dB = dB'^T when transB
        return _product(b, g, a, alpha, 1, ta) if tb else _product(b, a, g, alpha, 1 - ta, 0)

    def d_c():
        scaled = g if beta == 1.0 else b.op("Mul", g, beta)
        return b.broadcast_shaped(scaled, b.shape(n.outputs[0]))  # C broadcasts to Y
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
        _, sa2, c2, sc2, g, go = prepared()
        ga, shape = b.op("MatMul", g, t(c2, len(sc2))), go[:-2] + sa2[-2:]
        if len(sa) == 1:  # the promoted row axis goes: ga is then a broadcast of (K,)
            ga, shape = b.squeeze(ga, [len(shape) - 2]), shape[:-2] + shape[-1:]
        return b.broadcast_shaped(ga, shape)

    def d_c():
        a2, sa2, _, sc2, g, go = prepared()
        gc, shape = b.op("MatMul", t(a2, len(sa2)), g), go[:-2] + sc2[-2:]
        if len(sc) == 1:  # the promoted column axis goes: gc is then a broadcast of (K,)
            gc, shape = b.squeeze(gc, [len(shape) - 1]), shape[:-1]
        return b.broadcast_shaped(gc, shape)
    return (d_a, d_c)


def _einsum_terms(b, eq: str) -> tuple[list[str], str]:
    """The operands' subscripts and the output's, for explicit ('ij,jk->ik') and implicit ('ij,jk') equations."""
    if "..." in eq:
        raise b.error(f"has equation {eq!r}; broadcasting with '...' is not supported")
    lhs, arrow, out = eq.partition("->")
    ins = lhs.split(",")
    if not arrow:  # implicit form: the letters seen once, in alphabetical order
        letters = "".join(ins)
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    for sub in (*ins, out):
        if len(set(sub)) != len(sub):
            raise b.error(f"has a repeated index in {eq!r} (diagonals are not supported)")
    return ins, out


@rule("Einsum")
def _einsum(b, n, gy):
    """Operand k's gradient is the einsum of gy with the other operands, written to k's subscripts:
    for 'ab,bc->ac', dA = einsum('ac,bc->ab', gy, C). Letters of k seen nowhere else (summed over k alone) get
    gy broadcast along them."""
    eq = n.attrs["equation"]
    eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
    ins, out = _einsum_terms(b, eq)

    def grad(k):
        mine, others = ins[k], ins[:k] + ins[k + 1:]
        seen = set(out).union(*others)
        kept = "".join(c for c in mine if c in seen)
        alone = [i for i, c in enumerate(mine) if c not in seen]

        def make():
            tensors = [t for j, t in enumerate(n.inputs) if j != k]
            g = b.op("Einsum", gy[0], *tensors, equation=f"{','.join([out, *others])}->{kept}")
            return b.op("Expand", b.unsqueeze(g, alone), b.shape_of(n.inputs[k])) if alone else g
        return make
    return [grad(k) for k in range(len(ins))]
