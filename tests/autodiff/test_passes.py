"""The optimizations of autodiff/passes.py, each against the same graph built without it, in float64: a pass may
change how a gradient is computed, never its value. Each also checks its precondition: a fold never takes over a
tensor that another consumer reads or that is a target.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam.autodiff.builder import PASSES, Builder
from onnxcam.autodiff.engine import backward
from onnxcam.autodiff.passes import fold_crops, split_conv_channels, take_class_rows
from onnxcam.graph.model import ModelGraph
from onnxcam.runtime import cpu_session

rng = np.random.default_rng(3)
X_SHAPE = (2, 3, 5, 5)


def model(nodes, inits: dict | None = None) -> onnx.ModelProto:
    """A float64 model on input x (X_SHAPE) with score y."""
    graph = helper.make_graph(nodes, "passes", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, X_SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
                              [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def gradients64(proto: onnx.ModelProto, targets: list[str], passes, x, u) -> tuple[dict, Builder]:
    """{target: d<u, y>/d target} from the gradient graph built in float64 with only `passes` enabled. An integer
    `u` holds class indices: the seed is then the one-hot rows of a (N, K) score (Builder.one_hot)."""
    mg = ModelGraph(proto)
    b = Builder(mg, np.float64)
    b.passes = set(passes)
    seed = gs.Variable("seed", dtype=u.dtype, shape=list(u.shape))
    mg.graph.inputs.append(seed)
    if u.dtype.kind == "i":
        seed = b.one_hot(seed, mg.shape(mg.tensor("y"))[1])
    grads = backward(b, [mg.tensor(t) for t in targets], mg.tensor("y"), seed)
    for g in grads.values():
        g.dtype = np.float64
        mg.graph.outputs.append(g)
    take_class_rows(b)  # as rewrite.build runs them
    fold_crops(b)
    split_conv_channels(b)
    mg.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(mg.graph, do_type_check=False)
    sess = cpu_session(out.SerializeToString(), mg.weights)
    values = sess.run([grads[t].name for t in targets], {"x": x, "seed": u})
    return dict(zip(targets, values)), b


def rules_for(b: Builder, forward_op: str) -> set[str]:
    """The rules (or passes) that emitted gradient nodes for forward nodes of `forward_op`."""
    return {rule for _, op, rule in b.origins.values() if op == forward_op}


def with_and_without(nodes, targets, pass_name: str, inits=None, u=None) -> tuple[Builder, Builder]:
    """Build with every pass and with all but `pass_name`; assert equal float64 gradients; return both builders."""
    x, u = rng.standard_normal(X_SHAPE), rng.standard_normal((2, 3)) if u is None else u
    on, b_on = gradients64(model(nodes, inits), targets, PASSES, x, u)
    off, b_off = gradients64(model(nodes, inits), targets, set(PASSES) - {pass_name}, x, u)
    for t in targets:
        assert np.abs(on[t]).max() > 0
        np.testing.assert_allclose(on[t], off[t], rtol=1e-12, atol=1e-14, err_msg=t)
    return b_on, b_off


def head(src: str) -> list:
    """y = the spatial mean of `src`, (N, C): a score onnxruntime computes in float64 (its GlobalAveragePool
    has no float64 kernel)."""
    return [helper.make_node("ReduceMean", [src], ["y"], axes=[2, 3], keepdims=0)]


def silu(order: str) -> list:
    """x2 = x * x (so x2 is not a graph input); m = x2 * Sigmoid(x2), in either operand order."""
    operands = ["x2", "s"] if order == "x-first" else ["s", "x2"]
    return [helper.make_node("Mul", ["x", "x"], ["x2"]), helper.make_node("Sigmoid", ["x2"], ["s"]),
            helper.make_node("Mul", operands, ["m"])]


@pytest.mark.parametrize("order", ["x-first", "s-first"])
def test_fold_silu(order):
    """x * Sigmoid(x) becomes one formula: no gradient node for the Sigmoid, the same gradient as without."""
    b_on, b_off = with_and_without(silu(order) + head("m"), ["x"], "fold_silu")
    assert rules_for(b_on, "Sigmoid") == set() and rules_for(b_on, "Mul") >= {"passes.fold_silu"}
    assert rules_for(b_off, "Sigmoid") == {"activations._sigmoid"}
    assert "passes.fold_silu" not in rules_for(b_off, "Mul")


@pytest.mark.parametrize("variant", ["sigmoid-read-twice", "sigmoid-is-a-target", "x-is-a-target"])
def test_fold_silu_precondition(variant):
    """The fold applies only where the Sigmoid's output feeds that Mul alone and is no target; a target x is
    folded (its gradient is the fold's)."""
    nodes = silu("x-first")
    targets = ["x"]
    if variant == "sigmoid-read-twice":
        nodes += [helper.make_node("Add", ["m", "s"], ["m2"])] + head("m2")
    else:
        nodes += head("m")
        targets = ["x", "s"] if variant == "sigmoid-is-a-target" else ["x", "x2"]
    b_on, _ = with_and_without(nodes, targets, "fold_silu")
    folded = variant == "x-is-a-target"
    assert (rules_for(b_on, "Sigmoid") == set()) == folded
    assert ("passes.fold_silu" in rules_for(b_on, "Mul")) == folded


def emitted_ops(b: Builder, forward_op: str) -> list[str]:
    """The ops of the gradient nodes in the graph emitted for forward nodes of `forward_op`."""
    return [n.op for n in b.graph.nodes if n.name in b.origins and b.origins[n.name][1] == forward_op]


HEADS = {  # name -> (head node on f = the (2, 3) spatial mean of x, its weight)
    "gemm-transB": (helper.make_node("Gemm", ["f", "w"], ["y"], transB=1, alpha=0.5), rng.standard_normal((4, 3))),
    "gemm": (helper.make_node("Gemm", ["f", "w"], ["y"]), rng.standard_normal((3, 4))),
    "matmul": (helper.make_node("MatMul", ["f", "w"], ["y"]), rng.standard_normal((3, 4))),
}


@pytest.mark.parametrize("kind", HEADS)
def test_take_class_rows(kind):
    """onehot(classes) @ W becomes a Gather of W's class rows, with the same gradient as the product."""
    head_node, w = HEADS[kind]
    nodes = [helper.make_node("ReduceMean", ["x"], ["f"], axes=[2, 3], keepdims=0), head_node]
    b_on, b_off = with_and_without(nodes, ["f"], "take_class_rows", {"w": w}, u=np.array([3, 1], np.int64))
    product = head_node.op_type
    assert product not in emitted_ops(b_on, product) and "Gather" in emitted_ops(b_on, product)
    assert product in emitted_ops(b_off, product) and "Gather" not in emitted_ops(b_off, product)


def test_take_class_rows_needs_a_one_hot_seed():
    """A dense seed keeps the product: its rows are no selection."""
    head_node, w = HEADS["gemm-transB"]
    nodes = [helper.make_node("ReduceMean", ["x"], ["f"], axes=[2, 3], keepdims=0), head_node]
    b_on, _ = with_and_without(nodes, ["f"], "take_class_rows", {"w": w}, u=rng.standard_normal((2, 4)))
    assert "Gemm" in emitted_ops(b_on, "Gemm") and "Gather" not in emitted_ops(b_on, "Gemm")


def test_take_class_rows_keeps_a_transposed_seed_product():
    """The weight's own gradient is onehot^T @ f (the seed transposed): no selection of rows, the product stays."""
    head_node, w = HEADS["gemm-transB"]
    nodes = [helper.make_node("ReduceMean", ["x"], ["f"], axes=[2, 3], keepdims=0), head_node]
    b_on, _ = with_and_without(nodes, ["f", "w"], "take_class_rows", {"w": w}, u=np.array([3, 1], np.int64))
    assert emitted_ops(b_on, "Gemm").count("Gemm") == 1  # dw's product; df's became a Gather


POOLS = {  # MaxPool geometries on X_SHAPE: overlapping windows, padding, ceil_mode, dilation, auto_pad
    "resnet-stem": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    "overlapping": {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]},
    "ceil-dilated": {"kernel_shape": [2, 3], "strides": [2, 1], "pads": [1, 0, 0, 1], "dilations": [1, 2],
                     "ceil_mode": 1},
    "same-lower": {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_LOWER"},
    # large windows: positions from two 1-D MaxPools (passes._separable) from opset 16
    "spp-5": {"kernel_shape": [5, 5], "strides": [1, 1], "pads": [2, 2, 2, 2]},
    "spp-13": {"kernel_shape": [13, 13], "strides": [1, 1], "pads": [6, 6, 6, 6]},  # wider than the map
    "wide-strided": {"kernel_shape": [4, 5], "strides": [2, 3], "pads": [1, 2, 2, 1]},
}
SEPARABLE = {"spp-5", "spp-13", "wide-strided"}


def pool_model(opset: int, dtype, attrs: dict, indices: bool = False) -> onnx.ModelProto:
    """y = mean over space of MaxPool(x) * m (m random, so each window's gradient differs); with `indices` the
    model itself computes the MaxPool's Indices output (a graph output)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    pool = helper.make_node("MaxPool", ["x"], ["p", "i"] if indices else ["p"], **attrs)
    nodes = [pool, helper.make_node("Mul", ["p", "m"], ["pm"]),
             helper.make_node("ReduceMean", ["pm"], ["y"], axes=[2, 3], keepdims=0)]
    out_sz = _pool_out(attrs)
    outputs = [helper.make_tensor_value_info("y", elem, None)]
    if indices:
        outputs.append(helper.make_tensor_value_info("i", TensorProto.INT64, None))
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", elem, X_SHAPE)], outputs,
                              [numpy_helper.from_array(rng.standard_normal((1, 3) + out_sz).astype(dtype), "m")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _pool_out(attrs: dict) -> tuple:
    """The output size of a MaxPool on X_SHAPE, as onnxruntime computes it."""
    from onnxcam.graph.evaluate import run_node
    return tuple(run_node("MaxPool", [np.zeros(X_SHAPE, np.float32)], attrs, 17)[0].shape[2:])


def pool_gradient(proto: onnx.ModelProto, dtype, passes, x, u) -> tuple[np.ndarray, Builder, ModelGraph]:
    """d<u, y>/dx from the gradient graph built in `dtype` with only `passes` enabled."""
    mg = ModelGraph(proto)
    b = Builder(mg, dtype)
    b.passes = set(passes)
    seed = gs.Variable("seed", dtype=dtype, shape=list(u.shape))
    mg.graph.inputs.append(seed)
    g = backward(b, [mg.tensor("x")], mg.tensor("y"), seed)["x"]
    g.dtype = dtype
    mg.graph.outputs.append(g)
    mg.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    sess = cpu_session(gs.export_onnx(mg.graph, do_type_check=False).SerializeToString())
    return sess.run([g.name], {"x": x, "seed": u})[0], b, mg


def first_max_gradient(x, gp, attrs) -> np.ndarray:
    """numpy: gp (the gradient of the pool output) sent to each window's first maximum in scan order, padding
    excluded (onnxruntime's and torch's convention)."""
    out_sz = gp.shape[2:]
    kernel, strides = attrs["kernel_shape"], attrs["strides"]
    dilations = attrs.get("dilations", [1, 1])
    if attrs.get("auto_pad") == "SAME_LOWER":
        total = [max((out_sz[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - X_SHAPE[2 + i], 0)
                 for i in range(2)]
        begin = [t - t // 2 for t in total]
    else:
        begin = attrs["pads"][:2]
    g = np.zeros_like(x, dtype=np.float64)
    for n, c, oh, ow in np.ndindex(*gp.shape):
        taps = [(oh * strides[0] - begin[0] + kh * dilations[0], ow * strides[1] - begin[1] + kw * dilations[1])
                for kh in range(kernel[0]) for kw in range(kernel[1])]
        taps = [(h, w) for h, w in taps if 0 <= h < X_SHAPE[2] and 0 <= w < X_SHAPE[3]]
        h, w = max(taps, key=lambda t: (x[n, c, t[0], t[1]], -taps.index(t)))  # the first of equal maxima
        g[n, c, h, w] += gp[n, c, oh, ow]
    return g


def tied_input(dtype) -> np.ndarray:
    """Values in {-2, -1, 0}: ties in most windows, and windows of negatives only at the border, where a
    zero-padded maximum would wrongly win."""
    return rng.integers(-2, 1, X_SHAPE).astype(dtype)


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("geometry", POOLS)
def test_pool_indices(geometry, opset):
    """The gradient scattered to the forward MaxPool's Indices equals the rule's, which recomputes each window's
    first maximum from the input, on ties and next to padding; both match a numpy first-maximum reference. Only
    the pass alters the forward graph (the MaxPool gets its Indices output). Opset 17 runs in float64; opset 13
    in float32 (its rule's ConvTranspose has no float64 kernel in onnxruntime), where both forms share every node
    after the tap masks, so the gradients are equal bit for bit. Large windows at opset 17 leave the forward
    MaxPool as it is: their positions come from a MaxPool along the rows and one down the columns (the window's
    first maximum in row-major order is the first, down the rows, of each row's first maximum)."""
    attrs = POOLS[geometry]
    dtype = np.float64 if opset >= 16 else np.float32
    proto = pool_model(opset, dtype, attrs)
    x, u = tied_input(dtype), rng.standard_normal((2, 3)).astype(dtype)
    on, b_on, mg_on = pool_gradient(proto, dtype, PASSES, x, u)
    off, b_off, mg_off = pool_gradient(proto, dtype, set(PASSES) - {"pool_indices"}, x, u)
    np.testing.assert_allclose(on, off, rtol=1e-12, atol=0)
    m = numpy_helper.to_array(proto.graph.initializer[0]).astype(np.float64)
    gp = np.broadcast_to(u.astype(np.float64)[:, :, None, None] * m / np.prod(m.shape[2:]), (2, 3) + m.shape[2:])
    np.testing.assert_allclose(on, first_max_gradient(x, gp, attrs), rtol=1e-5 if dtype == np.float32 else 1e-12)
    assert rules_for(b_on, "MaxPool") == {"passes.pool_indices"}
    assert rules_for(b_off, "MaxPool") == {"conv_pool._max_pool_scatter" if opset >= 16 else "conv_pool._max_pool_taps"}
    pool_on, pool_off = (next(n for n in mg.graph.nodes if n.op == "MaxPool") for mg in (mg_on, mg_off))
    assert [o.name for o in pool_off.outputs] == ["p"]
    if geometry in SEPARABLE and opset >= 16:
        kernel = attrs["kernel_shape"]
        made = [n.attrs["kernel_shape"] for n in mg_on.graph.nodes if n.op == "MaxPool" and n is not pool_on]
        assert [o.name for o in pool_on.outputs] == ["p"] and made == [[1, kernel[1]], [kernel[0], 1]]
    else:
        assert len(pool_on.outputs) == 2


@pytest.mark.parametrize("variant", ["storage-order-1", "indices-computed-by-the-model"])
def test_pool_indices_precondition(variant):
    """Column-major Indices (storage_order=1) are not read: the rule's gradient, untouched forward node. Indices
    that the model computes itself are read as they are: no output added, the same gradient."""
    attrs = dict(POOLS["resnet-stem"], **({"storage_order": 1} if variant == "storage-order-1" else {}))
    proto = pool_model(17, np.float64, attrs, indices=variant != "storage-order-1")
    x, u = tied_input(np.float64), rng.standard_normal((2, 3))
    on, b_on, mg_on = pool_gradient(proto, np.float64, PASSES, x, u)
    off, _, _ = pool_gradient(proto, np.float64, set(PASSES) - {"pool_indices"}, x, u)
    np.testing.assert_allclose(on, off, rtol=1e-12, atol=0)
    pool = next(n for n in mg_on.graph.nodes if n.op == "MaxPool")
    if variant == "storage-order-1":
        assert rules_for(b_on, "MaxPool") == {"conv_pool._max_pool_scatter"} and [o.name for o in pool.outputs] == ["p"]
    else:
        assert rules_for(b_on, "MaxPool") == {"passes.pool_indices"} and [o.name for o in pool.outputs] == ["p", "i"]


def concat_conv(variant: str):
    """y = mean(Conv_c(Concat(Conv_a(x), x))): the gradient of the Concat is cut into the two slabs of Conv_c's
    adjoint. Variants break one precondition each: Conv_c grouped, or the Concat's output also a target."""
    group = 7 if variant == "grouped" else 1
    wa = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    wc = rng.standard_normal((7 if group == 7 else 5, 7 // group, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["a", "x"], ["cat"], axis=1),
             helper.make_node("Conv", ["cat", "wc"], ["c"], group=group), *head("c")]
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wc, "wc")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto, wa, wc, group


def gradients32(proto, targets, passes, x, u) -> tuple[dict, Builder]:
    """As gradients64, in float32: onnxruntime has no float64 Conv kernel."""
    mg = ModelGraph(proto)
    b = Builder(mg, np.float32)
    b.passes = set(passes)
    seed = gs.Variable("seed", dtype=np.float32, shape=list(u.shape))
    mg.graph.inputs.append(seed)
    grads = backward(b, [mg.tensor(t) for t in targets], mg.tensor("y"), seed)
    for g in grads.values():
        g.dtype = np.float32
        mg.graph.outputs.append(g)
    fold_crops(b)
    split_conv_channels(b)
    mg.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    sess = cpu_session(gs.export_onnx(mg.graph, do_type_check=False).SerializeToString(), mg.weights)
    return dict(zip(targets, sess.run([grads[t].name for t in targets], {"x": x, "seed": u}))), b


@pytest.mark.parametrize("variant", ["slabs", "grouped", "concat-is-a-target"])
def test_split_conv_channels(variant):
    """The adjoint of a Conv after a Concat, cut into the Concat's slabs, becomes one Conv per slab: the same
    gradient as without the pass, and as float64 torch autograd. A grouped Conv, or a Concat output that is a
    target (its gradient is a graph output), keeps the one Conv."""
    torch = pytest.importorskip("torch")
    proto, wa, wc, group = concat_conv(variant)
    targets = ["x", "cat"] if variant == "concat-is-a-target" else ["x"]
    x = rng.standard_normal(X_SHAPE).astype(np.float32)
    u = rng.standard_normal((2, wc.shape[0])).astype(np.float32)
    on, b_on = gradients32(proto, targets, PASSES, x, u)
    off, _ = gradients32(proto, targets, set(PASSES) - {"split_conv_channels"}, x, u)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    a = torch.nn.functional.conv2d(xt, torch.tensor(wa, dtype=torch.float64), padding=1)
    c = torch.nn.functional.conv2d(torch.cat([a, xt], 1), torch.tensor(wc, dtype=torch.float64), groups=group)
    (want,) = torch.autograd.grad((c.mean(dim=(2, 3)) * torch.tensor(u, dtype=torch.float64)).sum(), xt)
    np.testing.assert_allclose(on["x"], off["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(on["x"], want.numpy(), rtol=1e-5, atol=1e-5)
    split = "passes.split_conv_channels" in rules_for(b_on, "Conv")
    assert split == (variant == "slabs")
    slices = [n for n in b_on.graph.nodes if n.op == "Slice" and n.name in b_on.origins and n.outputs
              and b_on.origins[n.name][1] == "Concat"]
    assert (len(slices) == 0) == split  # the Concat rule's slabs are gone exactly where the Conv was split
