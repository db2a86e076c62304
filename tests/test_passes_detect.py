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
    """How many branches crop_seed_windows cropped: each finds its window's bounds with 4 ArgMax nodes."""
    branches = [a.g.node for n in ifs(model) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    return sum(m.op_type == "ArgMax" for m in [*model.graph.node, *(m for g in branches for m in g)]) // 4


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
    assert [(len(ifs(m)), crops(m)) for m in models.values()] == [(2, 1), (2, 0), (0, 1), (0, 0)]
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
