"""Numerical checks of the Sign rule (rules/elementwise.py) and the ScatterND rule (rules/select.py).

Sign is piecewise constant: its gradient is zero away from 0 (the gradcheck input keeps |x| >= 0.1). ScatterND is
checked as single-node gradcheck cases against onnx's float64 evaluator (slices and elements, negative indices,
every opset form, reduction 'add' with repeated indices), and against float64 torch autograd of the same write
(index_put, accumulate=False/True) with the indices a graph input, as an exporter's run-time indices are. A repeated
constant index without a reduction is refused where the updates need a gradient; at run time the rule follows
torch's index_put (every update gets the gradient at its index). Mul/max/min reductions are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxcam import rewrite
from onnxcam.errors import UnsupportedOpError
from onnxcam.graph.model import ModelGraph
from onnxcam.runtime import cpu_session

from .gradcheck import Case, away_from_zero, check_case, distinct

torch = pytest.importorskip("torch")

rng = np.random.default_rng(31)
DATA = distinct(rng, (4, 3, 2))


def scatter_nd(indices, opset, id, wrt=("x", "u"), **attrs):
    """ScatterND of updates shaped for `indices` into DATA (4, 3, 2)."""
    indices = np.asarray(indices, np.int64)
    updates = distinct(rng, indices.shape[:-1] + DATA.shape[indices.shape[-1]:])
    return Case("ScatterND", {"x": DATA, "i": indices, "u": updates}, list(wrt), attrs, opset,
                id=f"ScatterND-{opset}-{id}")


CASES = [
    Case("Sign", {"x": away_from_zero(rng, (2, 3, 4))}, ["x"], id="Sign-away-from-zero"),
    scatter_nd([[2], [0]], 11, "rows"),  # whole (3, 2) slices
    scatter_nd([[[1, 2, 0]], [[-1, 0, -1]], [[0, -3, 1]]], 13, "negative-elements"),
    scatter_nd([[[3, 1], [0, 0]], [[1, 2], [2, 1]]], 18, "pairs-none", reduction="none"),
    scatter_nd([[1, 2], [1, 2], [3, 0], [-3, 2]], 16, "add-repeated", reduction="add"),
    scatter_nd([[1], [1], [3]], 16, "repeated-data-only", wrt=("x",)),  # data's gradient is defined all the same
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case):
    check_case(case)


@pytest.mark.parametrize("reduction, opset", [("mul", 16), ("max", 18), ("min", 18)])
def test_other_reductions_are_a_clear_error(reduction, opset):
    case = scatter_nd([[1], [3]], opset, reduction, reduction=reduction)
    with pytest.raises(UnsupportedOpError, match=rf"ScatterND node .*reduction '{reduction}'"):
        check_case(case)


def test_repeated_constant_indices_without_a_reduction_are_a_clear_error():
    """[3, 0] and [-1, 0] name one element of the (4, 3) index space: which update lands there is undefined."""
    case = scatter_nd([[1, 2], [3, 0], [-1, 0]], 16, "repeated-none")
    with pytest.raises(UnsupportedOpError, match=r"ScatterND node .*indices 'i' twice .*updates 'u'"):
        check_case(case)


def test_gathernd_before_opset_16_counts_a_negative_index_as_its_repeat():
    """GatherND below opset 16 scatters its gradient without a reduction, so it takes only distinct indices:
    -1 and 2 name the same row of a size-3 axis (seen as distinct before, one of the two gradients was lost)."""
    case = Case("GatherND", {"x": DATA, "i": np.array([[-2], [2]], np.int64)}, ["x"], opset=13, id="GatherND-13")
    with pytest.raises(UnsupportedOpError, match=r"GatherND node .*opset 16"):
        check_case(case)


# ---- against torch autograd, the indices a graph input ---------------------------------------------------------

def _gradients(data, indices, updates, u, opset=18, **attrs):
    """onnxcam's d(sum(u * y))/d(data, updates) for y = ScatterND(data, indices, updates), all three graph inputs."""
    def info(name, a):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)

    node = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], **attrs)
    graph = helper.make_graph([node], "scatter", [info("x", data), info("i", indices), info("u", updates)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, data.shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    rw = rewrite.build(ModelGraph(model), ["x", "u"], "y")
    sess = cpu_session(rw.model.SerializeToString(), rw.initializer_arrays())
    feeds = {"x": data, "i": indices, "u": updates, rewrite.SEED: u[:, None]}
    if rw.has_ranking:
        feeds[rewrite.RANKED] = np.array(False)
    return sess.run([rewrite.grad_name("x"), rewrite.grad_name("u")], feeds)


def _torch_gradients(data, indices, updates, u, accumulate: bool):
    """The same write as torch's index_put in float64: indices (..., q) become q index tensors."""
    x = torch.tensor(data, dtype=torch.float64, requires_grad=True)
    v = torch.tensor(updates, dtype=torch.float64, requires_grad=True)
    index = tuple(torch.tensor(indices[..., k]) for k in range(indices.shape[-1]))
    y = x.index_put(index, v, accumulate=accumulate)
    gx, gv = torch.autograd.grad((y * torch.tensor(u, dtype=torch.float64)).sum(), (x, v))
    return gx.numpy(), gv.numpy()


TORCH_CASES = {  # id: (indices into a (2, 4, 3) tensor, reduction)
    "none-elements": ([[0, 1, 2], [1, 3, 0], [1, 0, 2]], "none"),
    "none-rows-negative": ([[1, -1], [0, 2], [-2, 0]], "none"),
    "add-repeated-rows": ([[[1, 2], [1, 2]], [[0, 0], [1, 2]]], "add"),
    # undefined in ONNX: the data's gradient is zero where written, each update gets gy at its index (as torch)
    "none-repeated-at-run-time": ([[0, 3], [1, 1], [0, -1]], "none"),
}


@pytest.mark.parametrize("id", list(TORCH_CASES))
def test_matches_torch_index_put(id):
    indices, reduction = TORCH_CASES[id]
    indices = np.asarray(indices, np.int64)
    data = distinct(rng, (2, 4, 3)).astype(np.float32)
    updates = distinct(rng, indices.shape[:-1] + data.shape[indices.shape[-1]:]).astype(np.float32)
    u = rng.standard_normal(data.shape)
    got = _gradients(data, indices, updates, u.astype(np.float32), reduction=reduction)
    want = _torch_gradients(data, indices, updates, u, accumulate=reduction == "add")
    for g, w, name in zip(got, want, ["data", "updates"]):
        assert np.any(w), name
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6, err_msg=f"{id}: gradient of the {name}")


def test_the_cases_indices_are_distinct_or_repeat_as_named():
    def positions(idx, dims=(2, 4, 3)):
        idx = np.asarray(idx).reshape(-1, np.shape(idx)[-1])
        return [tuple(int(i) % d for i, d in zip(row, dims)) for row in idx]
    for id, (indices, _) in TORCH_CASES.items():
        p = positions(indices)
        assert (len(set(p)) < len(p)) == ("repeated" in id), id
