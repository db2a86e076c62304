"""Seeds given as class indices (issue 6): a linear head's backward selects the target classes' weight rows
(Gather) instead of multiplying a one-hot seed with the whole weight matrix. Checked against the closed form in
float64 and against the dense-seed graph, for every head form exporters write, and structurally (no product left).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxcam
from onnxcam import rewrite

RNG = np.random.default_rng(7)
C, K, H = 6, 9, 5
W = RNG.standard_normal((K, C))  # float64: the reference
BIAS = RNG.standard_normal(K)
X = RNG.standard_normal((4, C, H, H)).astype(np.float32)

# head form -> (nodes after Flatten, initializers); each computes logits = alpha * feat @ W^T + bias
HEADS = {
    "gemm_transB": lambda w: ([helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1)], {"w": w}),
    "gemm_plain": lambda w: ([helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])], {"w": w.T}),
    "gemm_alpha": lambda w: ([helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1, alpha=0.5)],
                             {"w": 2 * w}),
    "matmul_add": lambda w: ([helper.make_node("MatMul", ["flat", "w"], ["mm"]),
                              helper.make_node("Add", ["mm", "b"], ["logits"])], {"w": w.T}),
}


def head_model(head: str, dtype=np.float32) -> onnx.ModelProto:
    """x -> Relu -> GlobalAveragePool -> Flatten -> head: d logit_k / d relu = W[k] / (H*H) everywhere."""
    tensor_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    head_nodes, weights = HEADS[head](W)
    nodes = [helper.make_node("Relu", ["x"], ["relu"]), helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]), *head_nodes]
    inits = [numpy_helper.from_array(np.ascontiguousarray(v, dtype), k) for k, v in weights.items()]
    inits.append(numpy_helper.from_array(BIAS.astype(dtype), "b"))
    graph = helper.make_graph(nodes, head, [helper.make_tensor_value_info("x", tensor_type, ["N", C, H, H])],
                              [helper.make_tensor_value_info("logits", tensor_type, ["N", K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def closed_form(classes: np.ndarray) -> np.ndarray:
    """(N, S) classes -> (N, S, C, H, H) gradients at the Relu output, in float64."""
    return np.broadcast_to(W[classes][..., None, None] / (H * H), classes.shape + (C, H, H))


def gradient_ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node if n.name.startswith("onnxcam_grad/")}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_class_seeds_give_the_closed_form_and_the_dense_seed_gradient(head):
    ex = onnxcam.Explainer(head_model(head), layers=["relu"], device="cpu")
    classes = np.array([3, 0, 8, 3])
    r = ex.run(X, targets=classes)
    np.testing.assert_allclose(r.gradients["relu"], closed_form(classes[:, None])[:, 0], rtol=1e-5, atol=1e-7)
    dense = ex.run(X, seed=np.eye(K, dtype=np.float32)[classes])  # the dense-seed graph: a product with W
    np.testing.assert_allclose(r.gradients["relu"], dense.gradients["relu"], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(r.seed, dense.seed)
    ranked = ex.run(X, top_k=3)  # ranked in the graph, three seeds at once
    np.testing.assert_array_equal(ranked.targets, np.argsort(-ranked.logits, axis=1)[:, :3])
    np.testing.assert_allclose(ranked.gradients["relu"], closed_form(ranked.targets), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_the_class_graph_selects_rows_instead_of_multiplying(head):
    ex = onnxcam.Explainer(head_model(head), layers=["relu"], device="cpu")
    model = ex.explainable_model
    assert rewrite.CLASSES in {i.name for i in model.graph.input}
    ops = gradient_ops(model)
    assert "Gather" in ops and not {"Gemm", "MatMul"} & ops, ops
    ex.run(X, seed=np.ones((len(X), K), np.float32))  # custom seeds build the dense form, which multiplies
    dense = next(c.rewritten.model for c in _compiled_models() if not c.rewritten.by_class
                 and c.rewritten.model.graph.name == head)
    assert {"Gemm", "MatMul"} & gradient_ops(dense)


def test_fp16_heads_widen_only_the_selected_rows():
    ex = onnxcam.Explainer(head_model("gemm_transB", np.float16), layers=["relu"], device="cpu")
    classes = np.array([1, 2, 3, 4])
    r = ex.run(X.astype(np.float16), targets=classes)
    assert r.gradients["relu"].dtype == np.float32
    want = np.broadcast_to(W.astype(np.float16).astype(np.float64)[classes][..., None, None] / (H * H), (4, C, H, H))
    np.testing.assert_allclose(r.gradients["relu"], want, rtol=1e-6, atol=1e-8)
    casts = [n for n in ex.explainable_model.graph.node if n.op_type == "Cast" and n.input[0] == "w"]
    assert not casts, "the whole fp16 weight matrix is widened instead of the selected rows"


def _compiled_models():
    from onnxcam.cache import CACHE
    return CACHE.entries("sessions")
