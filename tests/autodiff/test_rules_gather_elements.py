"""Numerical checks of the GatherElements rule (rules/select.py).

Single-node gradcheck cases against onnx's float64 evaluator with constant indices: every axis, negative and
repeated indices, at opsets 11 to 18, so through each of the rule's three forms: ScatterElements with reduction
'add' (opset 16+), a plain ScatterElements for constant indices that read each position once (below 16), the one-hot
sum for any others below 16 (test_each_opset_takes_its_form checks which form each case gets). Then against float64
torch autograd of torch.gather, the indices constant or a graph input (as an exporter's run-time indices are), at
opsets 18 and 13; these also take a negative axis and indices shorter than the data on the other axes, which onnx's
evaluator refuses. The indices get no gradient (they are integers, never on the walk's path).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam import rewrite
from onnxcam.graph.model import ModelGraph
from onnxcam.runtime import cpu_session

from .gradcheck import Case, _model, check_case, distinct

torch = pytest.importorskip("torch")

rng = np.random.default_rng(37)
DATA = distinct(rng, (4, 3, 2))

# indices into DATA (4, 3, 2): id -> (axis, indices, whether some position is read twice)
INDICES = {
    "axis0-repeated": (0, [[[3, 0], [3, 1], [0, 2]], [[3, 1], [2, 2], [0, 2]]], True),
    "axis1-negative-repeated": (1, [[[-1, 0], [2, -3]], [[0, 1], [-3, 1]], [[1, -1], [1, 2]], [[-2, 0], [2, 0]]],
                                True),  # -1 and 2, -3 and 0 read the same row
    "axis2-distinct": (2, [[[1, 0], [0, 1], [1, 0]]] * 4, False),
    "axis2-negative-distinct": (2, [[[-1], [0], [-2]]] * 4, False),
    "axis0-negative-distinct": (0, [[[-1, 0], [1, -2], [2, 3]], [[0, 1], [-2, -1], [3, 0]],
                                    [[1, -2], [-1, 0], [0, 1]], [[2, -1], [0, 1], [1, 2]]], False),
}
# indices shorter than the data on the other axes (torch.gather's and onnxruntime's GatherElements take them; onnx's
# reference evaluator does not, nor a negative axis): checked against torch only
SHORTER = {
    "axis-1-shorter-repeated": (-1, [[[1, 0, -1], [0, 0, 1]], [[-2, 1, 1], [1, 0, 0]]], True),
    "axis0-shorter-repeated": (0, [[[0], [1]], [[-4], [2]], [[3], [3]], [[2], [-1]], [[1], [0]]], True),
    "axis1-shorter-distinct": (1, [[[2], [0]], [[1], [-1]], [[0], [1]]], False),
}


def gather_elements(id, opset):
    axis, indices, _ = INDICES[id]
    return Case("GatherElements", {"x": DATA, "i": np.asarray(indices, np.int64)}, ["x"], {"axis": axis}, opset,
                id=f"GatherElements-{opset}-{id}")


CASES = [gather_elements(id, opset) for opset in (11, 13, 16, 18) for id in INDICES]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case):
    check_case(case)


def _reads_twice(axis, indices, dims=DATA.shape) -> bool:
    indices = np.asarray(indices)
    coords = np.indices(indices.shape)
    coords[axis] = indices % dims[axis]
    flat = np.ravel_multi_index(tuple(coords), dims).ravel()
    return len(set(flat.tolist())) < flat.size


def test_the_cases_indices_repeat_as_named():
    for id, (axis, indices, repeated) in {**INDICES, **SHORTER}.items():
        assert _reads_twice(axis, indices) == repeated, id


def _gradient_ops(case: Case) -> list[str]:
    rw = rewrite.build(ModelGraph(_model(case, np.float32)), ["x"], "y0")
    return [n.op_type for n in rw.model.graph.node if n.name.startswith("onnxcam_grad/")]


@pytest.mark.parametrize("id", list(INDICES))
def test_each_opset_takes_its_form(id):
    """ScatterElements adds from opset 16; below it, only indices that read each position once scatter plainly
    (a plain scatter of repeated indices would keep one of their gradients), the others take the one-hot sum."""
    repeated = INDICES[id][2]
    ops = _gradient_ops(gather_elements(id, 16))
    assert "ScatterElements" in ops and "OneHot" not in ops
    ops = _gradient_ops(gather_elements(id, 13))
    assert ("OneHot" in ops) == repeated and ("ScatterElements" in ops) != repeated


# ---- against torch autograd -------------------------------------------------------------------------------------

def _gradient(data, indices, u, axis, opset, constant):
    """onnxcam's d(sum(u * y))/d(data) for y = GatherElements(data, indices); the indices a graph input (computed
    at run time, as an exporter's usually are) or a constant."""
    def info(name, a):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)

    node = helper.make_node("GatherElements", ["x", "i"], ["y"], axis=axis)
    graph = helper.make_graph([node], "gather", [info("x", data)] + ([] if constant else [info("i", indices)]),
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, indices.shape)],
                              initializer=[numpy_helper.from_array(indices, "i")] if constant else [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    rw = rewrite.build(ModelGraph(model), ["x"], "y")
    sess = cpu_session(rw.model.SerializeToString(), rw.initializer_arrays())
    feeds = {"x": data, rewrite.SEED: u.astype(np.float32)[:, None]} | ({} if constant else {"i": indices})
    if rw.has_ranking:
        feeds[rewrite.RANKED] = np.array(False)
    return sess.run([rewrite.grad_name("x")], feeds)[0]


def _torch_gradient(data, indices, u, axis):
    """torch.gather's in float64 (it takes no negative indices: they are wrapped first)."""
    x = torch.tensor(data, dtype=torch.float64, requires_grad=True)
    index = torch.tensor(indices % data.shape[axis])
    y = torch.gather(x, axis, index)
    return torch.autograd.grad((y * torch.tensor(u, dtype=torch.float64)).sum(), x)[0].numpy()


@pytest.mark.parametrize("constant", [False, True], ids=["run-time", "constant"])
@pytest.mark.parametrize("opset", [18, 13])
@pytest.mark.parametrize("id", list(INDICES) + list(SHORTER))
def test_matches_torch_gather(id, opset, constant):
    axis, indices, repeated = {**INDICES, **SHORTER}[id]
    indices = np.asarray(indices, np.int64)
    data = DATA.astype(np.float32)
    u = rng.standard_normal(indices.shape)
    got = _gradient(data, indices, u, axis, opset, constant)
    want = _torch_gradient(data, indices, u, axis)
    # where a position is read twice its gradient is the sum of both: a plain scatter would keep one of them
    assert _torch_gradient(data, indices, np.ones_like(u), axis).max() == (2 if repeated else 1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"{id} at opset {opset}")
