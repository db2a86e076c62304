"""Numerical checks of onnxcam/autodiff/rules/select.py: TopK, GatherND, and Slice with bounds computed at run time.

TopK and GatherND are single-node gradcheck cases (onnx's evaluator in float64; TopK's inputs distinct, so no order
flips within finite-difference reach). A run-time Slice needs its bounds as graph inputs, which gradcheck's cases
make initializers; its gradient is linear and exact, so it is compared with numpy's adjoint: zeros with u written
back through the same Python slice (numpy and ONNX clamp bounds alike). ShuffleNetV2 blocks exported by TorchScript
with a dynamic batch (chunk's Slice at an offset computed from Shape) are compared with the same weights exported
at a fixed batch, whose constant Slices take the constant-bound path.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcam import rewrite
from onnxcam.errors import UnsupportedOpError
from onnxcam.graph.model import ModelGraph
from onnxcam.runtime import cpu_session

from .gradcheck import Case, check_case, distinct

rng = np.random.default_rng(13)
X = distinct(rng, (2, 3, 5))


def ints(*v):
    return np.array(v, np.int64)


def topk(opset, k, id, **attrs):
    inputs = {"x": X} if opset < 10 else {"x": X, "k": ints(k)}
    if opset < 10:
        attrs["k"] = k
    return Case("TopK", inputs, ["x"], attrs, opset, n_outputs=2, id=f"TopK-{opset}-{id}")


def gather_nd(idx, opset=17, data=X, id="", **attrs):
    return Case("GatherND", {"x": data, "i": np.asarray(idx, np.int64)}, ["x"], attrs, opset,
                id=f"GatherND-{opset}-{id}")


CASES = [
    topk(9, 2, "attr-k-last-axis"),
    topk(11, 3, "axis1-smallest", axis=1, largest=0),  # (sorted=0 leaves the order to the runtime: not comparable)
    topk(17, 5, "whole-axis-negative", axis=-1),
    gather_nd([[0, 2], [1, 0], [0, 2]], id="repeated-slices"),  # (2, 2)-indices pick rows; one picked twice
    gather_nd([[[1, -1, 4]], [[0, 0, -5]]], id="negative-elements"),  # full-depth indices, negative ones
    gather_nd([[[2], [0], [2]], [[1], [1], [0]]], id="batch_dims1-repeated-rows", batch_dims=1),
    gather_nd(np.array([[[0, 4], [2, 1]], [[1, 1], [1, 1]]]), id="batch_dims1-elements", batch_dims=1),
    gather_nd(np.array([[[1], [3], [-1]], [[0], [0], [2]]]), data=distinct(rng, (2, 3, 4, 2)), id="batch_dims2",
              batch_dims=2),
    gather_nd([[1, 2], [0, 1]], opset=13, id="distinct-constant-opset13"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case):
    check_case(case)


def test_repeated_indices_before_opset_16_are_a_clear_error():
    case = gather_nd([[1, 2], [1, 2]], opset=13, id="repeated-opset13")
    with pytest.raises(UnsupportedOpError, match=r"GatherND node .*opset 16"):
        check_case(case)


# ---- Slice with run-time bounds ------------------------------------------------------------------------------------

def _runtime_slice(x_shape, starts, ends, axes=None, steps=None, dtype=np.int64, opset=17):
    """onnxcam's d(sum(u * y))/dx for a Slice whose bounds are computed at run time, with numpy's adjoint.

    The bounds are the given values plus 0 * the batch size (symbolic), so no constant folding sees them, while
    shape inference still finds the output's shape."""
    names = ["x", "s", "e"] + (["a"] if axes is not None else []) + (["t"] if steps is not None else [])
    inits = [onnx.numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in
             (("a", axes), ("t", steps), ("s0", starts), ("e0", ends), ("zero", [0]), ("first", 0)) if v is not None]
    tt = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "first"], ["n"]),
             helper.make_node("Mul", ["n", "zero"], ["nothing"])]
    for name in ("s", "e"):
        nodes += [helper.make_node("Add", [name + "0", "nothing"], [name + "64"]),
                  helper.make_node("Cast", [name + "64"], [name], to=tt)]
    nodes.append(helper.make_node("Slice", names, ["y"], name="cut"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          ["N", *x_shape[1:]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    rw = rewrite.build(ModelGraph(model), ["x"], "y")
    x = rng.standard_normal(x_shape).astype(np.float32)
    index = [slice(None)] * len(x_shape)
    for k, a in enumerate(range(len(starts)) if axes is None else axes):
        index[a] = slice(starts[k], ends[k], 1 if steps is None else steps[k])
    y = x[tuple(index)]
    u = rng.standard_normal(y.shape).astype(np.float32)
    want = np.zeros(x_shape, np.float32)
    want[tuple(index)] = u
    feeds = {"x": x, rewrite.SEED: u[:, None]}
    if rw.has_ranking:
        feeds[rewrite.RANKED] = np.array(False)
    got = cpu_session(rw.model.SerializeToString()).run([rewrite.grad_name("x")], feeds)[0]
    return got, want


RUNTIME_SLICES = {
    "unit-one-axis": ((2, 6, 3), [1], [4], [1], None),
    "negative-and-clamped": ((2, 6, 3), [-4, 0], [100, -1], [1, 2], None),
    "empty": ((2, 6, 3), [4], [2], [1], None),
    "axes-omitted-int32": ((3, 4, 5), [0, -3], [2**31 - 1, 3], None, None),
    "step2-and-unit": ((2, 7, 5), [1, 3], [7, 0], [1, 2], [2, -1]),
    "reverse-whole-axis": ((2, 5), [-1], [-(2**62)], [1], [-1]),
}


@pytest.mark.parametrize("key", RUNTIME_SLICES)
def test_slice_with_run_time_bounds(key):
    shape, starts, ends, axes, steps = RUNTIME_SLICES[key]
    got, want = _runtime_slice(shape, starts, ends, axes, steps, np.int32 if "int32" in key else np.int64)
    np.testing.assert_array_equal(got, want)


def test_run_time_slice_before_opset_11_is_a_clear_error():
    with pytest.raises(UnsupportedOpError, match=r"Slice node 'cut'.*run-time bounds.*opset 11"):
        _runtime_slice((2, 6), [1], [4], [1], opset=10)


def test_chunk_offset_from_shape_with_dynamic_batch():
    """torch.chunk in a TorchScript export with a dynamic batch: the second half starts at Shape(x)[1] / 2."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["c"], axis=0),
             helper.make_node("Div", ["c", "two"], ["half"]),
             helper.make_node("Mul", ["half", "two"], ["end"]),
             helper.make_node("Slice", ["x", "half", "end", "one"], ["y"], name="chunk1")]
    consts = [onnx.numpy_helper.from_array(ints(1), "one"), onnx.numpy_helper.from_array(ints(2), "two")]
    graph = helper.make_graph(nodes, "chunk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    rw = rewrite.build(ModelGraph(model), ["x"], "y")
    x = rng.standard_normal((3, 6, 2)).astype(np.float32)
    u = rng.standard_normal((3, 3, 2)).astype(np.float32)
    got = cpu_session(rw.model.SerializeToString()).run([rewrite.grad_name("x")], {"x": x, rewrite.SEED: u[:, None]})
    want = np.concatenate([np.zeros_like(u), u], axis=1)
    np.testing.assert_array_equal(got[0], want)


@functools.cache
def _shuffle_blocks(dynamic: bool) -> onnx.ModelProto:
    """Two of torchvision's ShuffleNetV2 stride-1 blocks (chunk, branch, concat, channel shuffle) behind a stem
    conv, seeded, exported by the TorchScript exporter with a dynamic or a fixed batch."""
    import io

    import torch
    from torchvision.models.shufflenetv2 import InvertedResidual

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), InvertedResidual(8, 8, 1),
                                InvertedResidual(8, 8, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 5)).eval()
    buf = io.BytesIO()
    axes = {"x": {0: "N"}, "y": {0: "N"}} if dynamic else None
    torch.onnx.export(model, (torch.zeros(2, 3, 12, 12),), buf, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


def _layer_gradient(model: onnx.ModelProto, x: np.ndarray, layer: str, u: np.ndarray):
    mg = ModelGraph(model)
    rw = rewrite.build(mg, [layer], "y")
    feeds = {"x": x, rewrite.SEED: u[:, None], rewrite.RANKED: np.array(False)}
    return cpu_session(rw.model.SerializeToString(), rw.initializer_arrays()).run([rewrite.grad_name(layer)],
                                                                                   feeds)[0]


def test_shufflenet_blocks_with_dynamic_batch_build_and_match_the_fixed_batch_export():
    """The TorchScript shufflenet_v2 export with a dynamic batch slices chunk's halves at offsets computed from
    Shape (UnsupportedOpError before); its gradient equals that of the same weights exported at a fixed batch,
    whose Slices have constant bounds."""
    dynamic, fixed = _shuffle_blocks(True), _shuffle_blocks(False)
    consts = {i.name for i in dynamic.graph.initializer} | {o for n in dynamic.graph.node if n.op_type == "Constant"
                                                             for o in n.output}
    assert any(n.op_type == "Slice" and n.input[1] not in consts for n in dynamic.graph.node)
    layer = "/0/Conv_output_0"
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    u = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)
    got, want = _layer_gradient(dynamic, x, layer, u), _layer_gradient(fixed, x, layer, u)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
