"""Numerical checks of onnxcam/autodiff/rules/linalg.py: Gemm in every transpose/alpha/beta/C form, MatMul with
1-D operands and broadcast batch dims, Einsum in explicit and implicit forms."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcam.errors import UnsupportedOpError

from . import gradcheck
from .gradcheck import Case, check_case, onnxcam_gradients

rng = np.random.default_rng(4)
M, K, N = 3, 4, 2
SCALAR = ":scalar"  # a node input named "x:scalar" is x, fed with shape (1,), squeezed to rank 0 (see below)


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
        Case("Gemm", {"a": r(M, K), "b": r(K, N), "c": r(1)}, ["a", "b", "c"], {"alpha": 2.0}, opset=11,
             input_order=["a", "b", "c" + SCALAR], id="Gemm-11-C-scalar"),
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


def with_rank0_io(make_model):
    """onnxcam explains batch-first tensors (rewrite.build needs an axis 0 on the score and on each target), so
    rank-0 operands and results are checked through a size-1 axis: Squeeze before, Unsqueeze after the node."""
    def model(case, dtype):
        proto = make_model(case, dtype)
        graph, node = proto.graph, proto.graph.node[0]
        for name in node.input:
            if name.endswith(SCALAR):
                graph.node.insert(0, _axis_op(case, graph, "Squeeze", name[:-len(SCALAR)], name))
        inferred = onnx.shape_inference.infer_shapes(proto).graph
        y = next(v for v in list(inferred.value_info) + list(inferred.output) if v.name == "y0")
        if len(y.type.tensor_type.shape.dim) == 0:
            node.output[0] = "y0" + SCALAR
            graph.node.append(_axis_op(case, graph, "Unsqueeze", node.output[0], "y0"))
        return proto
    return model


def _axis_op(case, graph, op, x, y):
    """Squeeze/Unsqueeze on axis 0, with the axes as attribute (before opset 13) or as an initializer input."""
    if case.opset < 13:
        return helper.make_node(op, [x], [y], axes=[0])
    graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), y + "/axes"))
    return helper.make_node(op, [x, y + "/axes"], [y])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case, monkeypatch):
    monkeypatch.setattr(gradcheck, "_model", with_rank0_io(gradcheck._model))
    check_case(case)


@pytest.mark.parametrize("eq, message", [("ii->i", "repeated"), ("...ij,jk->...ik", "'...'")])
def test_einsum_refused(eq, message):
    with pytest.raises(UnsupportedOpError, match=message):
        onnxcam_gradients(_einsum(eq, (K, K), (K, K)) if "," in eq else _einsum(eq, (K, K)), np.ones(K))
