"""Numerical checks of onnxcam/autodiff/rules/linalg.py: Gemm in every transpose/alpha/beta/C form, MatMul with
1-D operands and broadcast batch dims, Einsum in explicit and implicit forms."""

import numpy as np
import pytest

from onnxcam.errors import UnsupportedOpError

from .gradcheck import Case, check_case, onnxcam_gradients

rng = np.random.default_rng(4)
M, K, N = 3, 4, 2


def r(*shape):
    return rng.standard_normal(shape)


def _gemm_cases():
    cases = []
    for ta in (0, 1):
        for tb in (0, 1):
            a, bb = r(K, M) if ta else r(M, K), r(N, K) if tb else r(K, N)
            attrs = {"transA": ta, "transB": tb, "alpha": 0.7, "beta": 1.3}
            cases += [
                Case("Gemm", {"a": a, "b": bb, "c": r(M, N)}, ["a", "b", "c"], attrs, id=f"Gemm-tA{ta}-tB{tb}-full-C"),
                Case("Gemm", {"a": a, "b": bb}, ["a", "b"], {"transA": ta, "transB": tb}, opset=13,
                     id=f"Gemm-13-tA{ta}-tB{tb}-no-C"),
                Case("Gemm", {"a": a, "b": bb, "c": r(N)}, ["a", "b", "c"], attrs, opset=9,
                     id=f"Gemm-9-tA{ta}-tB{tb}-C-row"),
            ]
    return cases + [
        Case("Gemm", {"a": r(M, K), "b": r(K, N), "c": r(1, N)}, ["a", "b", "c"], {"beta": 0.5}, id="Gemm-C-1xN"),
        Case("Gemm", {"a": r(M, K), "b": r(K, N), "c": r(M, 1)}, ["a", "b", "c"], id="Gemm-C-Mx1"),
        Case("Gemm", {"a": r(M, K), "b": r(K, N), "c": np.float64(0.3)}, ["a", "b", "c"], {"alpha": 2.0},
             opset=11, id="Gemm-11-C-scalar"),
        Case("Gemm", {"a": r(M, K), "b": r(N, K), "c": r(N)}, ["a"], {"transB": 1}, opset=10, id="Gemm-10-C-row-a"),
    ]


def _matmul(a, c, id, opset=13):
    return Case("MatMul", {"a": a, "c": c}, ["a", "c"], opset=opset, id=f"MatMul-{id}")


def _einsum(eq, *shapes, opset=12):
    names = [f"x{i}" for i in range(len(shapes))]
    return Case("Einsum", {n: r(*s) for n, s in zip(names, shapes)}, names, {"equation": eq}, opset=opset,
                id=f"Einsum-{eq}")


CASES = [
    *_gemm_cases(),
    _matmul(r(M, K), r(K, N), "2d", opset=9),
    _matmul(r(2, M, K), r(2, K, N), "batched"),
    _matmul(r(2, 1, M, K), r(3, K, N), "broadcast-batch"),
    _matmul(r(M, K), r(2, K, N), "broadcast-first"),
    _matmul(r(K), r(K, N), "1d-2d"),
    _matmul(r(M, K), r(K), "2d-1d"),
    _matmul(r(K), r(K), "1d-1d"),
    _matmul(r(K), r(2, K, N), "1d-3d"),
    _matmul(r(2, M, K), r(K), "3d-1d"),
    _einsum("ij,jk->ik", (M, K), (K, N)),
    _einsum("bij,bjk->bik", (2, M, K), (2, K, N)),
    _einsum("bchw,ck->bkhw", (2, 3, 2, 2), (3, 4)),
    _einsum("ij,jk", (M, K), (K, N)),
    _einsum("ij->ji", (M, K)),
    _einsum("ij->i", (M, K)),
    _einsum("i,i->", (K,), (K,)),
    _einsum("ij,kl->ikjl", (2, 3), (3, 2)),
    _einsum("ij,jk,kl->il", (2, 3), (3, 4), (4, 2)),
    _einsum("bij,jk->bi", (2, M, K), (K, N), opset=17),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case):
    check_case(case)


@pytest.mark.parametrize("eq, message", [("ii->i", "repeated"), ("...ij,jk->...ik", "'...'")])
def test_einsum_refused(eq, message):
    with pytest.raises(UnsupportedOpError, match=message):
        onnxcam_gradients(_einsum(eq, (K, K), (K, K)) if "," in eq else _einsum(eq, (K, K)), np.ones(K))
