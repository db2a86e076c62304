"""Gradients of small multi-node graphs, where rules meet: one gradient tensor handed to several rules (Add, Sum,
Identity and Expand pass it on unchanged), fan-in Sums, Pad crops folded into the adjoint convolutions, targets
inside the path, an If-fed Gather. Plus the internal-error contract: a gradient graph that onnxruntime would reject
is reported as onnxcam's bug, naming the forward node and rule that emitted the bad node.

Each graph is built with onnx.helper, rewritten by onnxcam and run in onnxruntime (float32); the reference is the
central difference of <u, score> along random directions on the same graph in float64 (onnx's evaluator). A target
inside the graph is perturbed by cutting the graph there: its producer's output is renamed and the target becomes
an input, so everything else stays as the forward computed it. ReLU and MaxPool sit directly on the input, which
is drawn away from kinks and ties: no float32 mask can differ from the float64 one.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxcam import rewrite
from onnxcam.autodiff.rules import RULES, Rule, load_all
from onnxcam.errors import InternalError
from onnxcam.graph.model import ModelGraph
from onnxcam.runtime import cpu_session

from .gradcheck import away_from_zero, distinct

rng = np.random.default_rng(11)
X_SHAPE = (2, 3, 6, 6)
OPSET = 17


def weight(*shape):
    return rng.standard_normal(shape) * 0.3


def ints(*values):
    return np.array(values, np.int64)


def node(op, inputs, output, name=None, **attrs):
    return helper.make_node(op, inputs, [output], name=name or output, **attrs)


def head(src):
    """Conv(pads 1) -> GlobalAveragePool -> Flatten: a (N, 4) score whose gradient reaches `src` as an adjoint
    Conv, the producer that a Pad's crop may fold into."""
    return [node("Conv", [src, "w_head"], "h", pads=[1, 1, 1, 1]), node("GlobalAveragePool", ["h"], "gap"),
            node("Flatten", ["gap"], "y")], {"w_head": weight(4, 3, 3, 3)}


def model(nodes, inits: dict, dtype, inputs=None) -> onnx.ModelProto:
    """A model on input x (X_SHAPE) with score y; float initializers in `dtype`."""
    inputs = inputs or {"x": X_SHAPE}
    inits = [numpy_helper.from_array(v.astype(dtype) if v.dtype.kind == "f" else v, k) for k, v in inits.items()]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, "multinode", [helper.make_tensor_value_info(k, elem, s) for k, s in inputs.items()],
                              [helper.make_tensor_value_info("y", elem, None)], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    return m


def build(nodes, inits, targets) -> rewrite.Rewritten:
    return rewrite.build(ModelGraph(model(nodes, inits, np.float32)), list(targets), "y")


def onnxcam_gradients(nodes, inits, targets, x, u) -> tuple[dict, rewrite.Rewritten]:
    """({target: gradient of <u, y>} from onnxruntime, the rewrite)."""
    rw = build(nodes, inits, targets)
    sess = cpu_session(rw.model.SerializeToString(), rw.initializer_arrays())
    feeds = {"x": x.astype(np.float32), rewrite.SEED: u.astype(np.float32)[:, None], rewrite.RANKED: np.array(False)}
    return dict(zip(targets, sess.run([rewrite.grad_name(t) for t in targets], feeds))), rw


def cut_score(nodes, inits, target, x):
    """(y as a float64 function of `target`, everything else held at its forward value; the target's value)."""
    full = ReferenceEvaluator(model(nodes, inits, np.float64))
    if target == "x":
        return lambda t: full.run(["y"], {"x": t})[0], x
    value = full.run([target], {"x": x})[0]
    renamed = [helper.make_node(n.op_type, list(n.input), [o if o != target else f"{o}__forward" for o in n.output],
                                name=n.name, domain=n.domain) for n in nodes]
    for new, old in zip(renamed, nodes):
        new.attribute.extend(old.attribute)
    cut = ReferenceEvaluator(model(renamed, inits, np.float64, {"x": X_SHAPE, target: value.shape}))
    return lambda t: cut.run(["y"], {"x": x, target: t})[0], value


def check_graph(nodes, inits, targets, x, rtol=1e-4, h=1e-6) -> rewrite.Rewritten:
    """onnxcam's gradients of <u, y> for every target against float64 central differences; returns the rewrite."""
    y = ReferenceEvaluator(model(nodes, inits, np.float64)).run(["y"], {"x": x})[0]
    u = rng.standard_normal(y.shape)
    grads, rw = onnxcam_gradients(nodes, inits, targets, x, u)
    for target in targets:
        score, at = cut_score(nodes, inits, target, x)
        g = np.asarray(grads[target], np.float64)
        assert g.shape == at.shape, f"gradient of {target} has shape {g.shape}, the tensor {at.shape}"
        for _ in range(3):
            d = rng.standard_normal(at.shape)
            numeric = float(np.sum(u * (score(at + h * d) - score(at - h * d))) / (2 * h))
            analytic = float(np.sum(g * d))
            scale = np.linalg.norm(g) * np.linalg.norm(d) + abs(numeric)
            assert abs(analytic - numeric) <= rtol * scale, \
                f"d/d{target}: onnxcam {analytic:.8g}, finite differences {numeric:.8g}"
    return rw


def crops(rw) -> list[str]:
    """The gradient's crops: step-less Slices (a kernel flip is a Slice with steps)."""
    return [n.name for n in rw.model.graph.node
            if n.name.startswith("onnxcam_grad/") and n.op_type == "Slice" and len(n.input) == 4]


# ---- one gradient, several readers: the Pad crop must not fold into a Conv that another branch reads --------------

PAD1 = ints(0, 0, 1, 1, 0, 0, 1, 1)


def pad_and_conv(join: str):
    """x -> Relu -> {Pad(1), Conv(pads 2)} -> join -> head: the join hands one gradient to the Pad and the Conv."""
    nodes = [node("Relu", ["x"], "r"), node("Pad", ["r", "pads"], "p"),
             node("Conv", ["r", "w1"], "c1", pads=[2, 2, 2, 2])]
    if join == "Add":
        nodes.append(node("Add", ["p", "c1"], "s"))
    elif join == "Sum":
        nodes.append(node("Sum", ["p", "c1"], "s"))
    elif join == "Identity+Add":
        nodes += [node("Identity", ["p"], "pi"), node("Add", ["pi", "c1"], "s")]
    elif join == "Expand+Add":
        nodes += [node("Expand", ["p", "same"], "pe"), node("Add", ["pe", "c1"], "s")]
    tail, inits = head("s")
    return nodes + tail, {**inits, "pads": PAD1, "w1": weight(3, 3, 3, 3), "same": ints(1, 1, 1, 1)}


@pytest.mark.parametrize("join", ["Add", "Sum", "Identity+Add", "Expand+Add"])
def test_pad_crop_of_a_shared_gradient(join):
    """The issue's graph (Add), and the same fan-out through Sum, Identity and Expand: it loads, and is right."""
    nodes, inits = pad_and_conv(join)
    rw = check_graph(nodes, inits, ["x"], away_from_zero(rng, X_SHAPE))
    assert len(crops(rw)) == 1  # the Slice stays: its input is the other branch's gradient too


@pytest.mark.parametrize("target", ["x", "r"])
def test_pad_crop_of_a_private_gradient_folds(target):
    """Where the adjoint Conv's output is read by the crop alone, the crop folds into its pads (no Slice), also
    when the crop's result is a target's gradient (the Pad's input r)."""
    nodes = [node("Relu", ["x"], "r"), node("Pad", ["r", "pads"], "p"),
             node("Conv", ["p", "w1"], "c1", pads=[1, 1, 1, 1])]
    tail, inits = head("c1")
    rw = check_graph(nodes + tail, {**inits, "pads": PAD1, "w1": weight(3, 3, 3, 3)}, [target],
                     away_from_zero(rng, X_SHAPE))
    assert crops(rw) == []


def test_maxpool_feeding_two_branches():
    """The issue's graph behind a MaxPool: MaxPool -> {Pad, Conv(pads 2)} -> Add -> head. The MaxPool's output
    gradient is a fan-in Sum of both branches, the Pad's crop stays a Slice."""
    nodes = [node("MaxPool", ["x"], "m", kernel_shape=[2, 2], strides=[1, 1]), node("Pad", ["m", "pads"], "p"),
             node("Conv", ["m", "w1"], "c1", pads=[2, 2, 2, 2]), node("Add", ["p", "c1"], "s")]
    tail, inits = head("s")
    rw = check_graph(nodes + tail, {**inits, "pads": PAD1, "w1": weight(3, 3, 3, 3)}, ["x"], distinct(rng, X_SHAPE))
    assert len(crops(rw)) == 1


def test_two_targets_on_one_path():
    """Targets r and p = Pad(r) on one path: p's gradient is a graph output, so the crop must not fold into the
    Conv that makes it (that would crop the gradient handed out for p)."""
    nodes = [node("Relu", ["x"], "r"), node("Pad", ["r", "pads"], "p"),
             node("Conv", ["p", "w1"], "c1", pads=[1, 1, 1, 1])]
    tail, inits = head("c1")
    rw = check_graph(nodes + tail, {**inits, "pads": PAD1, "w1": weight(3, 3, 3, 3)}, ["r", "p"],
                     away_from_zero(rng, X_SHAPE))
    assert len(crops(rw)) == 1


# ---- Gather with indices from an If (torchvision's detectors) ------------------------------------------------

def if_gather(variant: str):
    """x -> Gather(axis 1, indices = If(Shape(x)[1] == 3)) -> head. The then-branch is a constant (`constant`), or
    computes [2, 0, 1] from outer tensors that depend on shapes only (`shapes`), or reads x: the channels ranked by
    their means, TopK on data (`data`); `untaken` reads x in the branch the condition skips."""
    def branch(name, nodes, out):
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.INT64, [3])])

    then = {"constant": [helper.make_node("Constant", [], ["then_idx"], value=numpy_helper.from_array(
                ints(2, 0, 1)))],
            "shapes": [helper.make_node("Concat", ["last", "zero", "one_1d"], ["then_idx"], axis=0)],
            "data": [helper.make_node("ReduceMean", ["x"], ["means"], axes=[0, 2, 3], keepdims=0),
                     helper.make_node("TopK", ["means", "k"], ["top", "then_idx"], axis=0)]}
    other = [helper.make_node("Constant", [], ["else_idx"], value=numpy_helper.from_array(ints(1, 2, 0)))]
    nodes = [node("Shape", ["x"], "shape"), node("Gather", ["shape", "one"], "channels", axis=0),
             node("Sub", ["channels", "one"], "last_0d"), node("Unsqueeze", ["last_0d", "zero"], "last"),
             node("Equal", ["channels", "three"], "cond"), node("Equal", ["channels", "four"], "no_channels"),
             helper.make_node("If", ["no_channels" if variant == "untaken" else "cond"], ["idx"], name="if",
                              then_branch=branch("then", then.get(variant, then["data"]), "then_idx"),
                              else_branch=branch("else", other, "else_idx")),
             node("Gather", ["x", "idx"], "g", axis=1)]
    tail, inits = head("g")
    return nodes + tail, {**inits, "one": np.array(1, np.int64), "three": np.array(3, np.int64),
                          "four": np.array(4, np.int64), "k": ints(3), "zero": ints(0), "one_1d": ints(1)}


@pytest.mark.parametrize("variant", ["constant", "shapes", "data", "untaken"])
def test_gather_with_indices_from_an_if(variant):
    nodes, inits = if_gather(variant)
    mg = ModelGraph(model(nodes, inits, np.float32))
    idx = mg.value(mg.tensor("idx"))
    if variant == "data":
        assert idx is None  # a branch that reads data is no constant
    else:
        np.testing.assert_array_equal(idx, ints(1, 2, 0) if variant == "untaken" else ints(2, 0, 1))
    # Channel means 1.5 apart: the data branch's ranking cannot change within finite-difference reach.
    x = rng.standard_normal(X_SHAPE) * 0.2 + np.array([0.0, 3.0, 1.5])[None, :, None, None]
    check_graph(nodes, inits, ["x"], x)


# ---- a gradient graph onnxruntime would reject is onnxcam's bug ------------------------------------------------

def broken_relu(b, n, gy):
    """A Relu rule with a type error: float gradient times an int64 constant."""
    return (lambda: b.op("Mul", gy[0], b.ints(2)),)


@pytest.fixture
def broken_rule(monkeypatch):
    load_all()
    monkeypatch.setitem(RULES, "Relu", [Rule("Relu", broken_relu, False, 1, 10_000)])


def small_relu_net():
    nodes = [node("Relu", ["x"], "r", name="the_relu"), node("Conv", ["r", "w1"], "c1", pads=[1, 1, 1, 1])]
    tail, inits = head("c1")
    return nodes + tail, {**inits, "w1": weight(3, 3, 3, 3)}


def test_broken_rule_is_an_internal_error_naming_node_and_rule(broken_rule):
    nodes, inits = small_relu_net()
    with pytest.raises(InternalError) as info:
        build(nodes, inits, ["x"])
    e = info.value
    assert (e.node, e.op) == ("the_relu", "Relu") and e.rule.endswith("broken_relu"), str(e)
    assert "onnxcam bug" in str(e) and "'the_relu'" in str(e) and "broken_relu" in str(e), str(e)


def test_onnxruntime_refusal_of_an_emitted_node_is_an_internal_error(broken_rule, monkeypatch):
    """Past the build's own check (disabled here), onnxruntime's refusal at load names the same node and rule."""
    monkeypatch.setattr(rewrite, "check_gradient", lambda *_: None)
    nodes, inits = small_relu_net()
    rw = build(nodes, inits, ["x"])
    with pytest.raises(InternalError) as info:
        cpu_session(rw.model.SerializeToString(), rw.initializer_arrays())
    e = info.value
    assert (e.node, e.op) == ("the_relu", "Relu") and e.rule.endswith("broken_relu"), str(e)
    assert "cannot load the model" not in str(e)


def test_fan_in_sums_are_named_after_the_node_they_serve():
    """In the issue's graph the Relu output has two readers (Pad, Conv): their gradients' Sum belongs to the Relu,
    by name and by the origin written into its doc_string."""
    nodes, inits = pad_and_conv("Add")
    rw = build(nodes, inits, ["x"])
    sums = [n for n in rw.model.graph.node if n.name.startswith("onnxcam_grad/") and n.op_type == "Sum"]
    assert [n.name.split("/")[1] for n in sums] == ["r"], [n.name for n in sums]
    assert json.loads(sums[0].doc_string)[rewrite.ORIGIN]["node"] == "r"


def test_fan_in_sum_of_a_graph_input_target_is_named_after_it():
    nodes = [node("Conv", ["x", "w1"], "c1", pads=[1, 1, 1, 1]), node("Conv", ["x", "w2"], "c2", pads=[1, 1, 1, 1]),
             node("Add", ["c1", "c2"], "s")]
    tail, inits = head("s")
    rw = check_graph(nodes + tail, {**inits, "w1": weight(3, 3, 3, 3), "w2": weight(3, 3, 3, 3)}, ["x"],
                     rng.standard_normal(X_SHAPE))
    sums = [n.name for n in rw.model.graph.node if n.name.startswith("onnxcam_grad/") and n.op_type == "Sum"]
    assert [name.split("/")[1] for name in sums] == ["x"], sums
