"""Numerical check of gradient rules on single-node models.

A Case is one ONNX node with concrete inputs. check_case() builds the model, lets onnxcam attach the gradient
of sum(u * output) with respect to the inputs named in `wrt`, runs it in onnxruntime (float32), and compares
<gradient, d> with the central difference of <u, output> in a random direction d, computed in float64 by onnx's
reference evaluator. For a linear op this is the dot-product adjoint test; for a nonlinear one it is JAX's
check_vjp. Test modules put their Cases in a list named CASES; test_rule_coverage.py checks that every
registered rule has at least one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxcam import rewrite
from onnxcam.graph.model import ModelGraph
from onnxcam.runtime import cpu_session


@dataclass
class Case:
    op: str
    inputs: dict  # name -> np.ndarray (float inputs listed in wrt become graph inputs, the rest initializers)
    wrt: list
    attrs: dict = field(default_factory=dict)
    opset: int = 17
    n_outputs: int = 1
    score_output: int = 0  # which output is differentiated
    input_order: list | None = None  # node input names in order ("" for an omitted optional input)
    id: str = ""
    domain: str = ""  # e.g. "com.microsoft" (then a reference other than onnx's evaluator is needed)
    rtol: float = 1e-4
    h: float = 1e-6

    def __str__(self):
        return self.id or f"{self.op}-opset{self.opset}"


def _model(case: Case, dtype) -> onnx.ModelProto:
    order = case.input_order if case.input_order is not None else list(case.inputs)
    outs = [f"y{i}" for i in range(case.n_outputs)]
    node = helper.make_node(case.op, order, outs, domain=case.domain or None, **case.attrs)
    graph_inputs, inits = [], []
    for name, value in case.inputs.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(dtype)
        if name in case.wrt:
            graph_inputs.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))
        else:
            inits.append(numpy_helper.from_array(value, name))
    graph = helper.make_graph([node], "case", graph_inputs,
                              [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outs],
                              initializer=inits)
    opsets = [helper.make_opsetid("", case.opset)] + ([helper.make_opsetid(case.domain, 1)] if case.domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _reference(case: Case, feeds64: dict) -> np.ndarray:
    ev = ReferenceEvaluator(_model(case, np.float64))
    return np.asarray(ev.run([f"y{case.score_output}"], feeds64)[0], dtype=np.float64)


def onnxcam_gradients(case: Case, seed: np.ndarray) -> dict:
    """Gradients of sum(seed * y) from onnxcam's rewritten single-node model, run in onnxruntime."""
    model = _model(case, np.float32)
    mg = ModelGraph(model)
    rw = rewrite.build(mg, list(case.wrt), f"y{case.score_output}")
    sess = cpu_session(rw.model.SerializeToString(), rw.initializer_arrays())
    feeds = {k: np.asarray(v, np.float32) for k, v in case.inputs.items() if k in case.wrt}
    feeds[rewrite.SEED] = seed.astype(np.float32)[:, None]  # one seed per sample: (N, 1, ...)
    if rw.has_ranking:
        feeds[rewrite.RANKED] = np.array(False)
    names = [rewrite.grad_name(w) for w in case.wrt]
    return {w: g for w, g in zip(case.wrt, sess.run(names, feeds))}


def check_case(case: Case, directions: int = 3, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    feeds64 = {k: np.asarray(v, np.float64) for k, v in case.inputs.items() if k in case.wrt}
    y = _reference(case, feeds64)
    u = rng.standard_normal(y.shape)
    grads = onnxcam_gradients(case, u)
    for name in case.wrt:
        g = np.asarray(grads[name], np.float64)
        assert g.shape == feeds64[name].shape, f"{case}: gradient of {name} has shape {g.shape}, " \
                                               f"input has {feeds64[name].shape}"
        assert np.all(np.isfinite(g)), f"{case}: non-finite gradient for {name}"
        for _ in range(directions):
            d = rng.standard_normal(g.shape)
            plus, minus = dict(feeds64), dict(feeds64)
            plus[name] = feeds64[name] + case.h * d
            minus[name] = feeds64[name] - case.h * d
            numeric = float(np.sum(u * (_reference(case, plus) - _reference(case, minus))) / (2 * case.h))
            analytic = float(np.sum(g * d))
            scale = np.linalg.norm(g) * np.linalg.norm(d) + abs(numeric)
            assert abs(analytic - numeric) <= case.rtol * scale + 1e-9, (
                f"{case}: d/d{name} along a random direction: onnxcam {analytic:.8g}, "
                f"finite differences {numeric:.8g}")


def away_from_zero(rng, shape, margin=0.1):
    """Random values with |x| >= margin, so no ReLU-like kink sits within finite-difference reach."""
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < margin, np.sign(x + 1e-12) * margin + x, x)


def distinct(rng, shape):
    """A random permutation of well separated values: no ties for max/min-like ops."""
    n = int(np.prod(shape))
    return (rng.permutation(n).astype(np.float64) / n * 4.0 - 2.0).reshape(shape)
