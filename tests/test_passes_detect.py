"""passes.crop_seed_windows and passes.skip_zero_slabs on a two-scale detection head: the gradient of each scale's
slab of the seed runs only when that slab holds a nonzero, on the window of its map that the nonzeros reach, and the
gradients equal those built without either pass and float64 autograd, whichever anchors the seed touches (one
scale, both, the map's corners, none, a dense seed).

The model: f = SiLU(Conv(x)) feeds a stride-1 scale (Conv, SiLU, Conv -> 8x8 anchors) and a stride-2 scale (strided
Conv, 1x1 Conv -> 4x4 anchors); the scales' (N, C, A) maps are concatenated along the anchors and squashed by a
Sigmoid, as a YOLO head's class scores are. Gradients are taken at f (fed by both scales) and d (the stride-2
branch's map).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam.autodiff import builder
from onnxcam.graph.model import ModelGraph
from onnxcam.rewrite import SEED, build, grad_name
from onnxcam.runtime import cpu_session

torch = pytest.importorskip("torch")

rng = np.random.default_rng(5)
N, CLASSES, A0, A1 = 2, 5, 64, 16
WEIGHTS = {"wa": rng.standard_normal((4, 3, 3, 3)), "w0": rng.standard_normal((CLASSES, 4, 3, 3)),
           "w0a": rng.standard_normal((4, 4, 3, 3)),
           "wd": rng.standard_normal((4, 4, 3, 3)), "w1": rng.standard_normal((CLASSES, 4, 1, 1))}
WEIGHTS = {k: (0.3 * v).astype(np.float32) for k, v in WEIGHTS.items()}
X = rng.standard_normal((N, 3, 8, 8)).astype(np.float32)


def head_model(targets_at_head: bool = False) -> onnx.ModelProto:
    """The two-scale head; targets_at_head also outputs the scales' raw maps (c0, c1) to explain there."""
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["a"], ["sa"]), helper.make_node("Mul", ["a", "sa"], ["f"]),
             helper.make_node("Conv", ["f", "w0a"], ["e"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["e"], ["se"]), helper.make_node("Mul", ["e", "se"], ["g"]),
             helper.make_node("Conv", ["g", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c0", "s0"], ["r0"]),
             helper.make_node("Conv", ["f", "wd"], ["d"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["d", "w1"], ["c1"]),
             helper.make_node("Reshape", ["c1", "s1"], ["r1"]),
             helper.make_node("Concat", ["r0", "r1"], ["cat"], axis=2),
             helper.make_node("Sigmoid", ["cat"], ["y"])]
    inits = {**WEIGHTS, "s0": np.array([N, CLASSES, A0]), "s1": np.array([N, CLASSES, A1])}
    graph = helper.make_graph(nodes, "two_scales", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def gradients(layers: list[str], seed: np.ndarray, passes: tuple, monkeypatch) -> tuple[dict, onnx.ModelProto]:
    """{layer: d<seed, y>/d layer} from the explainable model built with `passes` only, and that model."""
    monkeypatch.setattr(builder, "PASSES", passes)
    mg = ModelGraph(head_model(), X.shape)
    rw = build(mg, layers, "y")
    sess = cpu_session(rw.model.SerializeToString(), rw.weights)
    values = sess.run([grad_name(t) for t in layers], {"x": X, SEED: seed[:, None].astype(np.float32)})
    return dict(zip(layers, values)), rw.model


def autograd(seed: np.ndarray) -> dict:
    """The same gradients in float64 torch."""
    w = {k: torch.tensor(v, dtype=torch.float64) for k, v in WEIGHTS.items()}
    a = torch.nn.functional.conv2d(torch.tensor(X, dtype=torch.float64), w["wa"], padding=1)
    f = (a * torch.sigmoid(a)).requires_grad_(True)
    d = torch.nn.functional.conv2d(f, w["wd"], padding=1, stride=2)
    d.retain_grad()
    e = torch.nn.functional.conv2d(f, w["w0a"], padding=1)
    c0 = torch.nn.functional.conv2d(e * torch.sigmoid(e), w["w0"], padding=1).reshape(N, CLASSES, A0)
    c1 = torch.nn.functional.conv2d(d, w["w1"]).reshape(N, CLASSES, A1)
    y = torch.sigmoid(torch.cat([c0, c1], 2))
    (y * torch.tensor(seed, dtype=torch.float64)).sum().backward()
    return {"f": f.grad.numpy(), "d": d.grad.numpy()}


def one_hot(anchors: list[int]) -> np.ndarray:
    """A seed on class 2 at one anchor per sample (anchors below A0 are in the stride-1 scale)."""
    seed = np.zeros((N, CLASSES, A0 + A1))
    for i, a in enumerate(anchors):
        seed[i, 2, a] = 1.0
    return seed


def ifs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "If"]


def crops(model: onnx.ModelProto) -> int:
    """How many boxes crop_seed_windows finds at run time: one ReduceMin (of the rows' and columns' starts) each."""
    branches = [a.g.node for n in ifs(model) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    return sum(m.op_type == "ReduceMin" for m in [*model.graph.node, *(m for g in branches for m in g)])


SEEDS = {"stride-1 scale only": one_hot([10, 37]), "stride-2 scale only": one_hot([A0 + 3, A0 + 15]),
         "one sample each": one_hot([10, A0 + 5]), "corners": one_hot([0, A0 - 1]),
         "dense": rng.standard_normal((N, CLASSES, A0 + A1)), "zero": np.zeros((N, CLASSES, A0 + A1))}
WITHOUT = {"every pass": (), "without the crops": ("crop_seed_windows",), "without the Ifs": ("skip_zero_slabs",),
           "without both": ("crop_seed_windows", "skip_zero_slabs")}


@pytest.mark.parametrize("case", list(SEEDS))
def test_seed_passes_match_the_graph_without_them_and_autograd(case, monkeypatch):
    """Each scale's head branch becomes an If on its slab of the seed (the Sum of both at f, which reads every
    slab, stays outside), and the stride-1 branch (two same-padded 3x3 Convs around a SiLU) runs on the window of
    its slab's nonzeros widened by 2. Whatever anchors the seed touches, the gradients at f and at d (a graph output
    leaving the stride-2 branch) are those of the graphs built without one pass or both, and of float64 autograd:
    a skipped branch gives exact zeros, a cropped one the whole map's values."""
    seed = SEEDS[case]
    got, models, every = {}, {}, builder.PASSES
    for name, left_out in WITHOUT.items():
        passes = tuple(p for p in every if p not in left_out)
        got[name], models[name] = gradients(["f", "d"], seed, passes, monkeypatch)
    assert [(len(ifs(m)), crops(m) > 0) for m in models.values()] == [(2, True), (2, False), (0, True), (0, False)]
    want = autograd(seed)
    for name, values in got.items():
        for t in ("f", "d"):
            # float32 alike up to the order of sums: onnxruntime's blocked (NCHWc) convolutions run outside an If only
            scale = 1e-6 * np.abs(want[t]).max()
            np.testing.assert_allclose(values[t], got["without both"][t], rtol=1e-6, atol=scale, err_msg=f"{name} {t}")
            np.testing.assert_allclose(values[t], want[t], rtol=1e-5, atol=1e-6, err_msg=f"{name} {t}")
    if case == "stride-1 scale only":
        assert not np.any(got["every pass"]["d"])  # its branch did not run: the else-branch's zeros
    if case != "zero":
        assert np.abs(got["every pass"]["f"]).max() > 0


def test_blocked_complements_and_the_ifs_declared_shapes(monkeypatch):
    """blocked_complements writes the SiLU factor's 1 - s of a forward map left in the main graph as a depthwise
    Conv (weight -1, bias 1), and leaves the one inside the stride-1 branch's If a Sub (no blocked layout in a
    branch); the Ifs' outputs carry their forward tensors' shapes (onnx infers none for an If's outputs, and
    onnxruntime then keeps no Mul of a gradient leaving an If blocked); the gradients are those of the build
    without the pass."""
    seed = SEEDS["one sample each"]
    every = builder.PASSES
    got, model = gradients(["a", "d"], seed, every, monkeypatch)  # at a: f's SiLU is differentiated, outside the Ifs
    plain, before = gradients(["a", "d"], seed, tuple(p for p in every if p != "blocked_complements"), monkeypatch)

    def main_ops(m: onnx.ModelProto, op: str) -> list:
        return [n for n in m.graph.node if n.op_type == op and n.name.rsplit("/", 1)[-1].startswith("Sub_")]

    def branch_subs(m: onnx.ModelProto) -> int:
        return sum(n.op_type == "Sub" for i in ifs(m) for a in i.attribute if a.type == onnx.AttributeProto.GRAPH
                   for n in a.g.node)

    complements = [n for n in main_ops(model, "Conv") if n.input[0] == "sa"]
    assert len(complements) == 1 and not [n for n in main_ops(model, "Sub") if "sa" in n.input]  # f's SiLU
    assert [n for n in main_ops(before, "Sub") if n.input[1] == "sa"]
    assert [n for n in main_ops(model, "Sub") if n.input[1] == "y"]  # (N, C, A) scores: no map, stays a Sub
    assert branch_subs(model) == branch_subs(before) > 0  # g's SiLU among them, in the stride-1 branch
    (conv,) = complements
    weight, bias = (numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == conv.input[k]))
                    for k in (1, 2))
    assert weight.shape == (4, 1, 1, 1) and np.all(weight == -1) and np.all(bias == 1)
    declared = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*model.graph.value_info, *model.graph.output]}
    shapes = {"f": [N, 4, 8, 8], "d": [N, 4, 4, 4], "a": [N, 4, 8, 8]}
    outs = [o for i in ifs(model) for o in i.output]
    assert outs and all(declared.get(o) in shapes.values() for o in outs), (outs, declared)
    for t in ("a", "d"):
        np.testing.assert_allclose(got[t], plain[t], rtol=1e-6, atol=1e-6 * np.abs(plain[t]).max())


def hard_swish_head() -> onnx.ModelProto:
    """head_model with HardSwish for SiLU (MobileNetV3's activation): f's is differentiated outside the Ifs (both
    scales read f), g's inside the stride-1 scale's branch."""
    proto = head_model()
    nodes = [n for n in proto.graph.node if n.op_type != "Mul" and n.output[0] not in ("sa", "se")]
    acts = [helper.make_node("HardSwish", ["a"], ["f"], name="hardswish_f"),
            helper.make_node("HardSwish", ["e"], ["g"], name="hardswish_g")]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes[:1] + acts[:1] + nodes[1:2] + acts[1:] + nodes[2:])
    proto.opset_import[0].version = 17
    return proto


def test_blocked_hard_swish_outside_the_branches(monkeypatch):
    """blocked_hard_swish writes the slope of f's HardSwish, whose gradient product stays in the main graph, with
    clipped depthwise Convs (no Where left for it), and leaves g's, whose product is in the stride-1 branch, to the
    rule's Wheres; the gradients (at a, before f's HardSwish, and at d) match float64 torch autograd and the build
    without the pass."""
    seed = SEEDS["one sample each"]
    every = builder.PASSES
    results = {}
    for name, passes in (("with", every), ("without", tuple(p for p in every if p != "blocked_hard_swish"))):
        monkeypatch.setattr(builder, "PASSES", passes)
        rw = build(ModelGraph(hard_swish_head(), X.shape), ["a", "d"], "y")
        sess = cpu_session(rw.model.SerializeToString(), rw.weights)
        values = sess.run([grad_name(t) for t in ("a", "d")], {"x": X, SEED: seed[:, None].astype(np.float32)})
        results[name] = (dict(zip(("a", "d"), values)), rw.model)
    (got, model), (plain, before) = results["with"], results["without"]
    origin = {n.name: n for n in model.graph.node}

    def wheres(m: onnx.ModelProto, of: str) -> list:
        branches = [n for i in ifs(m) for a in i.attribute if a.type == onnx.AttributeProto.GRAPH for n in a.g.node]
        return [n for n in [*m.graph.node, *branches] if n.op_type == "Where" and f"/{of}/" in n.name]
    assert wheres(before, "hardswish_f") and not wheres(model, "hardswish_f")
    assert any(n.op_type == "Clip" and "/hardswish_f/" in n.name for n in origin.values())
    assert wheres(model, "hardswish_g")  # g's slope: the rule's Wheres
    w = {k: torch.tensor(v, dtype=torch.float64) for k, v in WEIGHTS.items()}
    a = torch.nn.functional.conv2d(torch.tensor(X, dtype=torch.float64), w["wa"], padding=1).requires_grad_(True)
    f = torch.nn.functional.hardswish(a)
    d = torch.nn.functional.conv2d(f, w["wd"], padding=1, stride=2)
    d.retain_grad()
    e = torch.nn.functional.conv2d(f, w["w0a"], padding=1)
    c0 = torch.nn.functional.conv2d(torch.nn.functional.hardswish(e), w["w0"], padding=1).reshape(N, CLASSES, A0)
    c1 = torch.nn.functional.conv2d(d, w["w1"]).reshape(N, CLASSES, A1)
    (torch.sigmoid(torch.cat([c0, c1], 2)) * torch.tensor(seed, dtype=torch.float64)).sum().backward()
    for t, want in (("a", a.grad.numpy()), ("d", d.grad.numpy())):
        np.testing.assert_allclose(got[t], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        np.testing.assert_allclose(got[t], plain[t], rtol=1e-6, atol=1e-6 * np.abs(plain[t]).max())


def test_skip_zero_slabs_leaves_cheap_or_dense_gradients_alone(monkeypatch):
    """Preconditions: slabs that reach the targets through no convolution are not worth a test (no If), and a
    Concat whose gradient comes out of a convolution (dense, not the seed's), here through a Sigmoid, gives no
    slabs."""
    monkeypatch.setattr(builder, "PASSES", builder.PASSES)
    mg = ModelGraph(head_model(), X.shape)
    assert not ifs(build(mg, ["c0", "c1"], "y").model)  # the head's maps: only Reshapes between them and the seed
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "wa"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
             helper.make_node("Sigmoid", ["cat"], ["s"]),  # the Concat's gradient is no Conv's: its slabs stay
             helper.make_node("Conv", ["s", "wc"], ["c"]),
             helper.make_node("ReduceMean", ["c"], ["y"], axes=[2, 3], keepdims=0)]
    wc = rng.standard_normal((3, 8, 1, 1)).astype(np.float32)
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(WEIGHTS["wa"], "wa"), numpy_helper.from_array(wc, "wc")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    assert not ifs(build(ModelGraph(proto, X.shape), ["x"], "y").model)


def test_hessian_builds_without_the_seed_passes(monkeypatch):
    """ShapleyCAM differentiates the gradient graph again, and the walk cannot see into an If's branches (it reads
    the activations from outside, not as inputs): the explainable model it starts from is built without the two
    passes, so its Hessian-vector products are those of a build where the passes do not exist."""
    from onnxcam import hessian

    def hvp(passes: tuple) -> np.ndarray:
        monkeypatch.setattr(builder, "PASSES", passes)
        m = hessian.build_hvp(head_model(), {}, X.shape, ["f"], "y")
        assert not ifs(m.model) and not crops(m.model)
        sess = cpu_session(m.model.SerializeToString(), m.weights)
        seed = SEEDS["one sample each"][:, None].astype(np.float32)
        return sess.run([hessian.hvp_name("f")], {"x": X, SEED: seed})[0]

    every = builder.PASSES
    without = hvp(tuple(p for p in every if p not in ("crop_seed_windows", "skip_zero_slabs")))
    assert np.abs(without).max() > 0
    np.testing.assert_allclose(hvp(every), without, rtol=1e-6, atol=1e-6 * np.abs(without).max())


# ---- a YOLO-like neck: the windows carried through nearest Upsamples, Concats and strided convolutions ----------
# x (64x48) -> c1 (32x24) -> c2 (16x12) -> c3 (8x6), strided 3x3 convs (maps not square: rows and columns apart); top-down: Resize x2 of c3, Concat with c2,
# conv -> n2; Resize x2 of n2, Concat with c1, conv -> p3 (32x24); bottom-up: strided conv of p3, Concat with n2,
# conv -> p4 (16x12); strided conv of p4, Concat with c3, conv -> p5 (8x6); a 3x3 + 1x1 class head per scale, the
# (N, K, A) maps concatenated along the anchors (768 + 192 + 48) and squashed by a Sigmoid, as YOLOv8's are.
NECK_X = rng.standard_normal((N, 3, 64, 48))
GRIDS = {2: (32, 24), 4: (16, 12), 8: (8, 6)}  # stride: grid's rows and columns
A3, A4, A5 = 32 * 24, 16 * 12, 8 * 6


def _conv(name, x, w, stride=1, act=True) -> list:
    pads = [w.shape[2] // 2] * 4
    out = [helper.make_node("Conv", [x, f"w_{name}"], [f"{name}_c" if act else name], pads=pads,
                            strides=[stride, stride])]
    if act:
        out += [helper.make_node("Sigmoid", [f"{name}_c"], [f"{name}_s"]),
                helper.make_node("Mul", [f"{name}_c", f"{name}_s"], [name])]
    return out


def neck_model(opset: int = 17) -> tuple[onnx.ModelProto, dict]:
    """The YOLO-like model and its weights (float32, seeded)."""
    r = np.random.default_rng(11)
    shapes = {"c1": (4, 3, 3, 3), "c2": (4, 4, 3, 3), "c3": (4, 4, 3, 3), "n2": (4, 8, 3, 3), "p3": (4, 8, 3, 3),
              "d3": (4, 4, 3, 3), "p4": (4, 8, 3, 3), "d4": (4, 4, 3, 3), "p5": (4, 8, 3, 3)}
    for s in ("3", "4", "5"):
        shapes[f"h{s}"], shapes[f"k{s}"] = (4, 4, 3, 3), (CLASSES, 4, 1, 1)
    w = {f"w_{k}": (r.standard_normal(v) / np.sqrt(np.prod(v[1:]))).astype(np.float32) for k, v in shapes.items()}
    up = [helper.make_node("Resize", [src, "", "two"], [dst], mode="nearest") for src, dst in (("c3", "u3"),
                                                                                               ("n2", "u2"))]
    nodes = [*_conv("c1", "x", w["w_c1"], 2), *_conv("c2", "c1", w["w_c2"], 2), *_conv("c3", "c2", w["w_c3"], 2),
             up[0], helper.make_node("Concat", ["u3", "c2"], ["t2"], axis=1), *_conv("n2", "t2", w["w_n2"]),
             up[1], helper.make_node("Concat", ["u2", "c1"], ["t1"], axis=1), *_conv("p3", "t1", w["w_p3"]),
             *_conv("d3", "p3", w["w_d3"], 2), helper.make_node("Concat", ["d3", "n2"], ["t3"], axis=1),
             *_conv("p4", "t3", w["w_p4"]), *_conv("d4", "p4", w["w_d4"], 2),
             helper.make_node("Concat", ["d4", "c3"], ["t4"], axis=1), *_conv("p5", "t4", w["w_p5"])]
    for s, anchors in (("3", A3), ("4", A4), ("5", A5)):
        nodes += [*_conv(f"h{s}", f"p{s}", w[f"w_h{s}"]), *_conv(f"k{s}", f"h{s}", w[f"w_k{s}"], act=False),
                  helper.make_node("Reshape", [f"k{s}", f"shape{s}"], [f"r{s}"])]
        w[f"shape{s}"] = np.array([N, CLASSES, anchors])
    nodes += [helper.make_node("Concat", ["r3", "r4", "r5"], ["cat"], axis=2),
              helper.make_node("Sigmoid", ["cat"], ["y"])]
    w["two"] = np.array([1, 1, 2, 2], np.float32)
    graph = helper.make_graph(nodes, "neck", [helper.make_tensor_value_info("x", TensorProto.FLOAT, NECK_X.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return proto, w


def _float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model in float64, for onnx's reference evaluator (onnxruntime has no float64 Conv)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    f32, f64 = TensorProto.FLOAT, TensorProto.DOUBLE

    def tensor(t):
        if t.data_type == f32:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))

    def graph(g):
        del g.value_info[:]
        for vi in [*g.input, *g.output]:
            if vi.type.tensor_type.elem_type == f32:
                vi.type.tensor_type.elem_type = f64
        for t in g.initializer:
            tensor(t)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    tensor(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    graph(a.g)
                elif n.op_type == "Cast" and a.name == "to" and a.i == f32:
                    a.i = f64
    graph(model.graph)
    return model


@functools.cache
def neck_build(layers: tuple, passes: tuple, opset: int = 17, worth: float | None = None) -> tuple:
    """(the explainable neck model in float64 with its weights inside, what crop_seed_windows logged). worth: the
    pass's cost guard (passes._WORTH); None windows every node the table of op kinds allows, so that the windows
    cross the whole small neck (its maps are too small for the guard to let them)."""
    import logging

    from onnxcam.autodiff import passes as seed_passes

    every, guard = builder.PASSES, seed_passes._WORTH
    builder.PASSES, seed_passes._WORTH = passes, worth
    records = []
    handler = logging.Handler()
    handler.emit = lambda rec: records.append(rec.getMessage())
    log = logging.getLogger("onnxcam.autodiff.passes")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.DEBUG)
    try:
        proto, _ = neck_model(opset)
        rw = build(ModelGraph(proto, NECK_X.shape), list(layers), "y")
    finally:
        builder.PASSES, seed_passes._WORTH = every, guard
        log.removeHandler(handler)
        log.setLevel(level)
    model = rw.model
    for init in model.graph.initializer:
        if init.name in rw.weights:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(rw.weights[init.name]), init.name))
    return _float64(model), [m for m in records if m.startswith("crop_seed_windows")]


def neck_gradients(layers: tuple, seed: np.ndarray, passes: tuple, probe: bool = False, opset: int = 17) -> dict:
    """{name: value} of the layers' gradients (float64, onnx's reference evaluator); probe: also the input and
    output of every Slice that crops a forward map or a region's entering gradient to its box (run-time bounds,
    not a Pad's output), as (input shape, output shape) under the Slice's name."""
    from onnx.reference import ReferenceEvaluator

    model, _ = neck_build(layers, passes, opset)
    names = [grad_name(t) for t in layers]
    probes = {}
    if probe:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        padded = {o for n in model.graph.node if n.op_type == "Pad" for o in n.output}
        bounds = {o for n in model.graph.node for o in n.output}  # a crop's starts are computed, not constant
        for n in model.graph.node:
            if n.op_type == "Slice" and n.input[0] not in padded and n.input[1] in bounds:
                probes[n.name] = (n.input[0], n.output[0])
        model.graph.output.extend(helper.make_empty_tensor_value_info(t) for pair in probes.values() for t in pair)
    ev = ReferenceEvaluator(model)
    wanted = names + [t for pair in probes.values() for t in pair]
    values = dict(zip(wanted, ev.run(wanted, {"x": NECK_X, SEED: seed[:, None]})))
    out = {t: values[grad_name(t)] for t in layers}
    out.update({k: (values[i].shape, values[o].shape) for k, (i, o) in probes.items()})
    return out


def neck_seed(cells: list[tuple]) -> np.ndarray:
    """A seed on class 1 at one anchor per sample, given as (stride, row, column) of its scale's grid."""
    seed = np.zeros((N, CLASSES, A3 + A4 + A5))
    offsets = {2: 0, 4: A3, 8: A3 + A4}
    for i, (stride, row, col) in enumerate(cells):
        seed[i, 1, offsets[stride] + row * GRIDS[stride][1] + col] = 1.0
    return seed


NECK_SEEDS = {"stride 8 centre": [(8, 3, 4), (8, 5, 2)], "stride 8 corners": [(8, 0, 0), (8, 7, 5)],
              "stride 4 centre and edge": [(4, 8, 6), (4, 0, 9)], "stride 2 corners": [(2, 0, 23), (2, 31, 0)],
              "stride 2 edge and stride 8": [(2, 15, 0), (8, 7, 3)]}
WITHOUT_CROPS = tuple(p for p in builder.PASSES if p != "crop_seed_windows")
NECK_LAYERS = ("c1", "p3")  # the backbone's stride-2 map (every path reaches it) and the neck's


@pytest.mark.parametrize("case", list(NECK_SEEDS))
def test_windows_cross_the_neck_and_match_the_dense_gradients(case):
    """Wherever the anchors lie (each stride, the grids' corners and edges, two scales in one batch), the gradients
    at c1 and p3 with the windows carried through the Upsamples' gradients, the Concats' slabs and the strided
    convolutions' gradients are the dense graph's, in float64 within 1e-10; and the neck ran on windows (some
    map cropped in the main graph, outside the heads' Ifs: a scale without anchors gives 1x1 boxes)."""
    seed = neck_seed(NECK_SEEDS[case])
    got = neck_gradients(NECK_LAYERS, seed, builder.PASSES, probe=True)
    want = neck_gradients(NECK_LAYERS, seed, WITHOUT_CROPS)
    assert any(i != o for k, (i, o) in got.items() if k not in NECK_LAYERS)
    for t in NECK_LAYERS:
        assert np.abs(want[t]).max() > 1e-5  # not a degenerate map
        np.testing.assert_allclose(got[t], want[t], rtol=1e-10, atol=1e-10 * np.abs(want[t]).max(), err_msg=t)


def test_coarsest_anchor_runs_the_neck_on_windows():
    """The pass applies beyond the head: the neck's and backbone's gradients run on windows, those inside
    skip_zero_slabs' Ifs (reached from some scales) with their boxes found inside them (every If stays), and at
    run time a seed at anchors of the coarsest scale (stride 8
    here, YOLOv8's stride 32) near the grid's corner crops maps of every
    size (a Slice smaller than its input at 32x24, 16x12 and 8x6 in the main graph, outside the heads' Ifs)."""
    model, logged = neck_build(NECK_LAYERS, builder.PASSES)
    assert len(logged) == 1 and int(logged[0].split(":")[1].split()[0]) > 0
    assert len(ifs(model)) == len(ifs(neck_build(NECK_LAYERS, WITHOUT_CROPS)[0])) > 1  # no If lost to the boxes
    shapes = neck_gradients(NECK_LAYERS, neck_seed([(8, 0, 0), (8, 1, 0)]), builder.PASSES, probe=True)
    cropped = {i[2:] for k, (i, o) in shapes.items() if k not in NECK_LAYERS and o[2:] != i[2:]}
    assert {(32, 24), (16, 12), (8, 6)} <= cropped


def test_dense_seed_crops_nothing():
    """A dense seed (every anchor of every scale) reaches every row and column: every box is the whole map, and the
    gradients are the dense graph's."""
    seed = rng.standard_normal((N, CLASSES, A3 + A4 + A5))
    shapes = neck_gradients(NECK_LAYERS, seed, builder.PASSES, probe=True)
    probes = {k: v for k, v in shapes.items() if k not in NECK_LAYERS}
    assert probes and all(i == o for i, o in probes.values())
    want = neck_gradients(NECK_LAYERS, seed, WITHOUT_CROPS)
    for t in NECK_LAYERS:
        np.testing.assert_allclose(shapes[t], want[t], rtol=1e-10, atol=1e-10 * np.abs(want[t]).max(), err_msg=t)


@pytest.mark.parametrize("opset", [11, 12, 13, 18])
def test_windows_at_other_opsets(opset):
    """The boxes' arithmetic changes with the opset (reduction axes as attributes or inputs; Min and Max of int64
    from opset 12, so no windows before) and the Ifs with them: the gradients stay the dense graph's, no If is lost
    and the graph has no cycle (the boxes of a region inside an If are found inside it)."""
    seed = neck_seed(NECK_SEEDS["stride 2 edge and stride 8"])
    got = neck_gradients(NECK_LAYERS, seed, builder.PASSES, probe=True, opset=opset)
    want = neck_gradients(NECK_LAYERS, seed, WITHOUT_CROPS, opset=opset)
    assert any(i != o for k, (i, o) in got.items() if k not in NECK_LAYERS) == (opset >= 12)
    assert len(ifs(neck_build(NECK_LAYERS, builder.PASSES, opset)[0])) == \
        len(ifs(neck_build(NECK_LAYERS, WITHOUT_CROPS, opset)[0])) > 1
    for t in NECK_LAYERS:
        np.testing.assert_allclose(got[t], want[t], rtol=1e-10, atol=1e-10 * np.abs(want[t]).max(), err_msg=t)


def test_cost_guard_keeps_the_heads_windows_and_stops_the_wide_ones():
    """With the pass's cost guard (windows over 35% of their map for one anchor, or from gradients other than the
    seed's maps, are left dense), the small neck's heads still run on windows, fewer nodes than without the guard,
    and the gradients are the dense graph's."""
    from onnxcam.autodiff import passes as seed_passes

    guarded = neck_build(NECK_LAYERS, builder.PASSES, worth=seed_passes._WORTH)[1]
    everything = neck_build(NECK_LAYERS, builder.PASSES)[1]
    count = [int(m.split(":")[1].split()[0]) for m in (*guarded, *everything)]
    assert len(count) == 2 and 0 < count[0] < count[1]
    seed = neck_seed(NECK_SEEDS["stride 8 corners"])
    model, _ = neck_build(NECK_LAYERS, builder.PASSES, worth=seed_passes._WORTH)
    from onnx.reference import ReferenceEvaluator

    got = ReferenceEvaluator(model).run([grad_name(t) for t in NECK_LAYERS], {"x": NECK_X, SEED: seed[:, None]})
    want = neck_gradients(NECK_LAYERS, seed, WITHOUT_CROPS)
    for t, g in zip(NECK_LAYERS, got):
        np.testing.assert_allclose(g, want[t], rtol=1e-10, atol=1e-10 * np.abs(want[t]).max(), err_msg=t)


def _model(nodes: list, name: str, inits: dict) -> onnx.ModelProto:
    """A graph x -> y of these nodes and initializers, opset 17."""
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, X.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def _with_and_without_slabs(proto: onnx.ModelProto, seed: np.ndarray, monkeypatch) -> dict[int, np.ndarray]:
    """{number of Ifs: the gradient at f} built with every pass and without skip_zero_slabs."""
    got, every = {}, builder.PASSES
    for passes in (every, tuple(p for p in every if p != "skip_zero_slabs")):
        monkeypatch.setattr(builder, "PASSES", passes)
        rw = build(ModelGraph(proto, X.shape), ["f"], "y")
        sess = cpu_session(rw.model.SerializeToString(), rw.weights)
        got[len(ifs(rw.model))] = sess.run([grad_name("f")], {"x": X, SEED: seed[:, None].astype(np.float32)})[0]
    monkeypatch.setattr(builder, "PASSES", every)
    return got


def ssd_head(softmax_axis: int) -> onnx.ModelProto:
    """An SSD-style head on the same f: per level a Conv to (N, anchors * classes, H, W), Reshape, Transpose and
    Reshape to (N, H * W * anchors, classes) (torchvision's layout), the levels concatenated along the anchors and a
    Softmax over `softmax_axis` (2: the classes, as SSD; 1: the anchors)."""
    per = 2  # anchors per cell
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["a"], ["sa"]), helper.make_node("Mul", ["a", "sa"], ["f"]),
             helper.make_node("Conv", ["f", "wd"], ["d"], pads=[1, 1, 1, 1], strides=[2, 2])]
    inits = {"wa": WEIGHTS["wa"], "wd": WEIGHTS["wd"]}
    for level, (src, side) in enumerate((("f", 8), ("d", 4))):
        inits[f"k{level}"] = (0.3 * rng.standard_normal((per * CLASSES, 4, 3, 3))).astype(np.float32)
        inits[f"v{level}"] = np.array([N, per, CLASSES, side, side])
        inits[f"o{level}"] = np.array([N, side * side * per, CLASSES])
        nodes += [helper.make_node("Conv", [src, f"k{level}"], [f"h{level}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Reshape", [f"h{level}", f"v{level}"], [f"r{level}"]),
                  helper.make_node("Transpose", [f"r{level}"], [f"t{level}"], perm=[0, 3, 4, 1, 2]),
                  helper.make_node("Reshape", [f"t{level}", f"o{level}"], [f"l{level}"])]
    nodes += [helper.make_node("Concat", ["l0", "l1"], ["cat"], axis=1),
              helper.make_node("Softmax", ["cat"], ["y"], axis=softmax_axis)]
    return _model(nodes, "ssd", inits), inits


@pytest.mark.parametrize("where", ["first level", "second level", "dense"])
def test_skip_zero_slabs_follows_a_softmax_over_the_classes(where, monkeypatch):
    """SSD's class scores: the Softmax over the classes sums each anchor's gradient along the classes only, so a
    seed at one anchor still leaves the other level's slab zero: each level's branch becomes an If (a Softmax over
    the anchors mixes them: no If). Gradients at f equal the build without the pass and float64 autograd."""
    a0 = 8 * 8 * 2
    seed = np.zeros((N, a0 + 4 * 4 * 2, CLASSES))
    if where == "dense":
        seed = rng.standard_normal(seed.shape)
    else:
        seed[:, 5 if where == "first level" else a0 + 7, 1] = 1.0
    proto, inits = ssd_head(2)
    got = _with_and_without_slabs(proto, seed, monkeypatch)
    assert sorted(got) == [0, 2]  # two Ifs with the pass, none without
    w = {k: torch.tensor(np.asarray(v, np.float64)) for k, v in inits.items() if k[0] in "wk"}
    a = torch.nn.functional.conv2d(torch.tensor(X, dtype=torch.float64), w["wa"], padding=1)
    f = (a * torch.sigmoid(a)).requires_grad_(True)
    d = torch.nn.functional.conv2d(f, w["wd"], padding=1, stride=2)
    levels = [torch.nn.functional.conv2d(m, w[f"k{i}"], padding=1).reshape(N, 2, CLASSES, *m.shape[2:])
              .permute(0, 3, 4, 1, 2).reshape(N, -1, CLASSES) for i, m in enumerate((f, d))]
    y = torch.softmax(torch.cat(levels, 1), 2)
    (y * torch.tensor(seed)).sum().backward()
    np.testing.assert_allclose(got[2], got[0], rtol=1e-6, atol=1e-6 * np.abs(got[0]).max())
    np.testing.assert_allclose(got[2], f.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(got[2]).max() > 0
    assert not ifs(build(ModelGraph(ssd_head(1)[0], X.shape), ["f"], "y").model)


def yolox_head() -> tuple[onnx.ModelProto, dict]:
    """A YOLOX-style head on f: per scale a stem Conv, a box tower (Conv, then a 4-channel Conv) and a class tower
    (Conv, then a CLASSES-channel Conv), concatenated [box | classes] along the channels, flattened, the scales
    concatenated along the anchors and transposed to (N, A, 4 + CLASSES)."""
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["a"], ["sa"]), helper.make_node("Mul", ["a", "sa"], ["f"]),
             helper.make_node("Conv", ["f", "wd"], ["d"], pads=[1, 1, 1, 1], strides=[2, 2])]
    inits = {"wa": WEIGHTS["wa"], "wd": WEIGHTS["wd"]}
    for s, (src, side) in enumerate((("f", 8), ("d", 4))):
        for name, shape in (("stem", (4, 4, 1, 1)), ("boxt", (4, 4, 3, 3)), ("box", (4, 4, 1, 1)),
                            ("clst", (4, 4, 3, 3)), ("cls", (CLASSES, 4, 1, 1))):
            inits[f"{name}{s}"] = (0.4 * rng.standard_normal(shape)).astype(np.float32)
        inits[f"flat{s}"] = np.array([N, 4 + CLASSES, side * side])
        nodes += [helper.make_node("Conv", [src, f"stem{s}"], [f"h{s}"]),
                  helper.make_node("Conv", [f"h{s}", f"boxt{s}"], [f"bt{s}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Conv", [f"bt{s}", f"box{s}"], [f"b{s}"]),
                  helper.make_node("Conv", [f"h{s}", f"clst{s}"], [f"ct{s}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Conv", [f"ct{s}", f"cls{s}"], [f"c{s}"]),
                  helper.make_node("Concat", [f"b{s}", f"c{s}"], [f"bc{s}"], axis=1),
                  helper.make_node("Reshape", [f"bc{s}", f"flat{s}"], [f"r{s}"])]
    nodes += [helper.make_node("Concat", ["r0", "r1"], ["cat"], axis=2),
              helper.make_node("Transpose", ["cat"], ["y"], perm=[0, 2, 1])]
    return _model(nodes, "yolox", inits), inits


def _yolox_autograd(inits: dict, seed: np.ndarray) -> np.ndarray:
    w = {k: torch.tensor(np.asarray(v, np.float64)) for k, v in inits.items() if not k.startswith("flat")}
    conv = torch.nn.functional.conv2d
    a = conv(torch.tensor(X, dtype=torch.float64), w["wa"], padding=1)
    f = (a * torch.sigmoid(a)).requires_grad_(True)
    d = conv(f, w["wd"], padding=1, stride=2)
    scales = []
    for s, m in enumerate((f, d)):
        h = conv(m, w[f"stem{s}"])
        box = conv(conv(h, w[f"boxt{s}"], padding=1), w[f"box{s}"])
        cls = conv(conv(h, w[f"clst{s}"], padding=1), w[f"cls{s}"])
        scales.append(torch.cat([box, cls], 1).flatten(2))
    y = torch.cat(scales, 2).transpose(1, 2)
    (y * torch.tensor(seed)).sum().backward()
    return f.grad.numpy()


@pytest.mark.parametrize("where", ["a class", "a box", "both scales", "dense", "zero"])
def test_skip_zero_slabs_splits_a_scales_box_and_class_branches(where, monkeypatch):
    """A seed on one class score of one anchor is zero on that scale's box rows too: the box tower gets an If of its
    own (on the box slab), the class tower another, and the scale's stem a third (after the two meet; on the
    scale's slab), besides the other scale's. Whatever the seed touches, the gradients at f equal the build
    without the pass and float64 autograd; a class seed leaves the box tower's If unrun (its gradient is exactly
    what the class tower alone gives)."""
    a0, a1 = 8 * 8, 4 * 4
    seed = np.zeros((N, a0 + a1, 4 + CLASSES))
    if where == "a class":
        seed[:, 9, 4 + 2] = 1.0
    elif where == "a box":
        seed[:, 9, 1] = 1.0
    elif where == "both scales":
        seed[0, 9, 4 + 1], seed[1, a0 + 3, 2] = 1.0, 1.0
    elif where == "dense":
        seed = rng.standard_normal(seed.shape)
    proto, inits = yolox_head()
    got = _with_and_without_slabs(proto, seed, monkeypatch)
    assert sorted(got) == [0, 6]  # per scale: the box tower, the class tower, the stem
    want = _yolox_autograd(inits, seed)
    np.testing.assert_allclose(got[6], got[0], rtol=1e-6, atol=1e-6 * max(np.abs(got[0]).max(), 1e-30))
    np.testing.assert_allclose(got[6], want, rtol=1e-5, atol=1e-6)
    assert (np.abs(got[6]).max() > 0) == (where != "zero")


def test_windows_crop_an_anchors_first_head(caplog):
    """YOLOX's (N, A, 4 + C) output reaches each scale's map through a Transpose, a slab and a Reshape: a class seed
    at one anchor of the 8x8 scale runs that scale's towers on windows (with the cost guard: a 3x3 window is 14% of
    the map) - before, the pass took the slabs' (Concat, tensor) pairs for tensors and cropped nothing of such a
    head - and the gradient at f is float64 autograd's."""
    import logging

    seed = np.zeros((N, 8 * 8 + 4 * 4, 4 + CLASSES))
    seed[:, 27, 4 + 2] = 1.0
    proto, inits = yolox_head()
    caplog.set_level(logging.DEBUG, logger="onnxcam.autodiff.passes")
    rw = build(ModelGraph(proto, X.shape), ["f"], "y")
    cropped = [int(m.split(":")[1].split()[0]) for m in caplog.messages if m.startswith("crop_seed_windows")]
    assert cropped and cropped[0] > 0, caplog.messages
    sess = cpu_session(rw.model.SerializeToString(), rw.weights)
    got = sess.run([grad_name("f")], {"x": X, SEED: seed[:, None].astype(np.float32)})[0]
    want = _yolox_autograd(inits, seed)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
