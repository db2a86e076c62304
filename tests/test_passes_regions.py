"""passes_regions.region_rows and roi_rows on a small per-region head in float64: the head's gradient runs on the
seeded regions' rows only, RoiAlign's on the regions that carry a gradient, and the gradient at the layer equals
(within 1e-10) the ones built without either pass and float64 torch autograd (torchvision's roi_align), for one
region, every region, repeated and out-of-range regions, and none.

The model: f = x * w0 (the layer) is pooled by RoiAlign at R = 6 fixed regions (2x2 crops), then a head that acts
on each region's row alone (Flatten, Gemm, Relu, MatMul, Add, Mul by a per-region constant, Softmax over classes)
scores (R, C). Variants: a node that mixes the regions (the mean over them, added back) stops the rows above it;
a Softmax over the regions leaves nothing row-wise.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

from onnxcam import rewrite
from onnxcam.autodiff.builder import PASSES, Builder
from onnxcam.autodiff.engine import backward
from onnxcam.autodiff.passes_regions import ROI_RULE, RULE
from onnxcam.graph.model import ModelGraph
from onnxcam.runtime import cpu_session

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

rng = np.random.default_rng(7)
R, C = 6, 3
X = rng.standard_normal((1, 4, 8, 8))
ROIS = np.array([[0.5, 0.5, 4.0, 5.0], [2.0, 1.0, 7.5, 6.0], [1.0, 3.0, 3.0, 7.0], [4.0, 4.0, 7.9, 7.9],
                 [0.0, 0.0, 7.9, 7.9], [3.0, 0.5, 6.0, 2.5]])
W = {"w0": rng.standard_normal((1, 4, 1, 1)), "w1": rng.standard_normal((16, 12)), "b1": rng.standard_normal(12),
     "w2": rng.standard_normal((12, C)), "b2": rng.standard_normal(C), "scale": rng.uniform(0.5, 2, (R, C)),
     "wc": rng.standard_normal((4, 4, 1, 1)), "shape": np.array([0, -1])}
HEAD = ["Flatten", "Gemm", "Relu", "MatMul", "Add", "Mul", "Softmax"]  # the row-wise nodes, named by their op


def head_model(variant: str = "row-wise"):
    """The per-region head, in float64 (float32 for 'conv head': onnxruntime has no float64 Conv); `variant`
    'mixing' adds the mean over the regions after the Relu, 'softmax over regions' normalizes over the regions
    instead of the classes, 'conv head' convolves each region's crop (a 1x1 Conv and a Relu) and flattens it as
    (R, H, W, C) by a Transpose and a Reshape."""
    mixing, conv = variant == "mixing", variant == "conv head"
    dtype = np.float32 if conv else np.float64
    flatten = [helper.make_node("Conv", ["crops", "wc"], ["cc"], name="Conv"),
               helper.make_node("Relu", ["cc"], ["cr"], name="ConvRelu"),
               helper.make_node("Transpose", ["cr"], ["ct"], perm=[0, 2, 3, 1], name="Transpose"),
               helper.make_node("Reshape", ["ct", "shape"], ["flat"], name="Reshape")] if conv else \
        [helper.make_node("Flatten", ["crops"], ["flat"], name="Flatten")]
    nodes = [helper.make_node("Mul", ["x", "w0"], ["f"], name="Layer"),
             helper.make_node("RoiAlign", ["f", "rois", "idx"], ["crops"], output_height=2, output_width=2,
                              sampling_ratio=2, name="RoiAlign"),
             *flatten,
             helper.make_node("Gemm", ["flat", "w1", "b1"], ["fc"], name="Gemm"),
             helper.make_node("Relu", ["fc"], ["h"], name="Relu"),
             *([helper.make_node("ReduceMean", ["h"], ["m"], axes=[0], name="ReduceMean"),
                helper.make_node("Add", ["h", "m"], ["hm"], name="Mix")] if mixing else []),
             helper.make_node("MatMul", ["hm" if mixing else "h", "w2"], ["mm"], name="MatMul"),
             helper.make_node("Add", ["mm", "b2"], ["logits"], name="Add"),
             helper.make_node("Mul", ["logits", "scale"], ["scaled"], name="Mul"),
             helper.make_node("Softmax", ["scaled"], ["probs"], axis=0 if variant == "softmax over regions" else -1,
                              name="Softmax")]
    inits = [numpy_helper.from_array(v if k == "shape" else v.astype(dtype), k) for k, v in W.items()] + [
        numpy_helper.from_array(ROIS.astype(dtype), "rois"), numpy_helper.from_array(np.zeros(R, np.int64), "idx")]
    kind = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, "regions", [helper.make_tensor_value_info("x", kind, X.shape)],
                              [helper.make_tensor_value_info("probs", kind, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def gradient(variant: str, regions: np.ndarray, rows: np.ndarray, passes) -> tuple[np.ndarray, set, int]:
    """(d<seed, probs>/df for the seed given as rows at regions, built in the model's float type with `passes`;
    the forward nodes whose tensors region_rows gathered; how many nodes roi_rows emitted)."""
    mg = ModelGraph(head_model(variant), X.shape)
    dtype = np.dtype(mg.tensor("x").dtype)
    b = Builder(mg, dtype)
    b.passes = set(passes)
    score = mg.tensor("probs")
    seed = rewrite._region_seeds(b, score, C, 1)[0]
    grad = backward(b, [mg.tensor("f")], score, seed)["f"]
    mg.graph.outputs.append(rewrite._renamed(grad, "df", dtype, X.shape))
    mg.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(mg.graph, do_type_check=False)
    sess = cpu_session(model.SerializeToString(), mg.weights)
    got = sess.run(["df"], {"x": X.astype(dtype), rewrite.REGIONS: regions[None],
                            rewrite.ROWS: rows[None].astype(dtype)})[0]
    rules = [origin[2] for origin in b.origins.values()]
    return got, {origin[0] for origin in b.origins.values() if origin[2] == RULE}, rules.count(ROI_RULE)


def autograd(variant: str, regions: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float64 torch: the same model (its values in the model's type) through torchvision's roi_align, seeded as
    rewrite._region_seeds lays the rows out (each region its first row; regions outside 0..R-1 none)."""
    seed = np.zeros((R, C))
    for k in reversed(range(len(regions))):  # reversed: the first of equal regions wins
        if 0 <= regions[k] < R:
            seed[regions[k]] = rows[k]
    typed = np.float32 if variant == "conv head" else np.float64
    t = {k: torch.tensor(np.float64(typed(v))) for k, v in W.items()}
    f = (torch.tensor(np.float64(typed(X))) * t["w0"]).requires_grad_(True)
    boxes = torch.cat([torch.zeros(R, 1, dtype=torch.float64), torch.tensor(np.float64(typed(ROIS)))], 1)
    crops = torchvision.ops.roi_align(f, boxes, 2, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    if variant == "conv head":
        crops = torch.relu(torch.nn.functional.conv2d(crops, t["wc"])).permute(0, 2, 3, 1)
    h = torch.relu(crops.flatten(1) @ t["w1"] + t["b1"])
    if variant == "mixing":
        h = h + h.mean(0, keepdim=True)
    scaled = (h @ t["w2"] + t["b2"]) * t["scale"]
    probs = torch.softmax(scaled, 0 if variant == "softmax over regions" else -1)
    (probs * torch.tensor(seed)).sum().backward()
    return f.grad.numpy()


SEEDS = {"one region": ([2], np.eye(C)[[1]]),
         "every region": (list(range(R)), rng.standard_normal((R, C))),
         "repeated and outside": ([4, 1, 4, R + 3], rng.standard_normal((4, C))),
         "none": ([], np.zeros((0, C)))}
# the nodes region_rows runs on rows (those whose tensors it gathers, and the score's producer for the seed's rows)
SEGMENTS = {"row-wise": set(HEAD), "mixing": {"Mix", "MatMul", "Add", "Mul", "Softmax"}, "softmax over regions": set(),
            "conv head": {"Conv", "ConvRelu", "Transpose", "Reshape", *HEAD[1:]}}


WITHOUT = {"every pass": (), "without region_rows": ("region_rows",), "without roi_rows": ("roi_rows",),
           "without both": ("region_rows", "roi_rows")}


@pytest.mark.parametrize("variant", list(SEGMENTS))
@pytest.mark.parametrize("case", list(SEEDS))
def test_region_rows_match_the_graph_without_it_and_autograd(variant, case):
    """The head's nodes from the score down to RoiAlign's crops (or to the node mixing the regions) run on the
    seeded rows, and RoiAlign's gradient on the regions whose crops' gradient is nonzero (roi_rows); the gradient
    at f equals the graph's without either pass and float64 autograd within 1e-10 (float32, the conv head: within
    1e-6 and 1e-5), whatever rows the seed gives: one, all, repeated regions (the first row counts) and a region
    beyond R (none), none."""
    regions, rows = np.array(SEEDS[case][0], np.int64), np.asarray(SEEDS[case][1], np.float64)
    want = autograd(variant, regions, rows)
    scale = max(np.abs(want).max(), 1e-300)
    assert (np.abs(want).max() > 0) == (case != "none")
    tol, tol_autograd = (1e-6, 1e-5) if variant == "conv head" else (1e-10, 1e-10)
    got = {}
    for name, left_out in reversed(WITHOUT.items()):
        got[name], segment, roi = gradient(variant, regions, rows, [p for p in PASSES if p not in left_out])
        assert segment == (set() if "region_rows" in left_out else SEGMENTS[variant]), name
        assert (roi > 0) == ("roi_rows" not in left_out), name
        assert np.abs(got[name] - got["without both"]).max() <= tol * scale, name
        assert np.abs(got[name] - want).max() <= tol_autograd * scale, name
