"""Checks of onnxcam/autodiff/rules/fused.py: onnxruntime's FusedConv and FusedGemm, and the refusal of NCHWc kernels.

Single nodes: gradcheck's directional check against the unfused graph (Conv [+ Z] or Gemm, then the activation)
evaluated in float64 by onnx's reference evaluator; onnxruntime's fused forward is checked against that same graph.
Real graphs: models that onnxruntime itself optimized and saved (ORT_ENABLE_EXTENDED) give the same gradients as
the models it started from: single Conv/Gemm + activation graphs for every activation it fuses, a torchvision
resnet18 (FusedConv with Relu) and the bundled EfficientNet-Lite0 (FusedConv with Clip = ReLU6).
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxcam
from onnxcam.autodiff.builder import Builder
from onnxcam.autodiff.rules import find_rule, load_all
from onnxcam.errors import UnsupportedOpError
from onnxcam.graph.model import ModelGraph

from .gradcheck import Case
from .test_conv_pool import check_against, check_forward

MS, NCHWC = "com.microsoft", "com.microsoft.nchwc"
rng = np.random.default_rng(5)

# activation -> (its ONNX attributes, FusedConv activation_params, FusedGemm activation_* attributes)
ACTIVATIONS = {
    "Relu": ({}, [], {}),
    "LeakyRelu": ({"alpha": 0.2}, [0.2], {"activation_alpha": 0.2}),
    "Sigmoid": ({}, [], {}),
    "Tanh": ({}, [], {}),
    "HardSigmoid": ({"alpha": 0.3, "beta": 0.4}, [0.3, 0.4], {"activation_alpha": 0.3, "activation_beta": 0.4}),
    "Clip": ({}, [-0.5, 0.7], None),  # Clip's bounds are inputs in ONNX; onnxruntime fuses it into Conv only
    "Elu": ({"alpha": 0.7}, None, {"activation_alpha": 0.7}),  # these four only into Gemm
    "Selu": ({"alpha": 1.5, "gamma": 1.2}, None, {"activation_alpha": 1.5, "activation_gamma": 1.2}),
    "Softplus": ({}, None, {}),
    "Softsign": ({}, None, {}),
}
CLIP_BOUNDS = (-0.5, 0.7)


def _activation_nodes(act: str, x: str, y: str):
    """The activation as standard ONNX: nodes and initializers."""
    if act == "Clip":
        lo, hi = (numpy_helper.from_array(np.asarray(v, np.float32), n) for v, n in zip(CLIP_BOUNDS, ("lo", "hi")))
        return [helper.make_node("Clip", [x, "lo", "hi"], [y])], [lo, hi]
    if act == "":
        return [helper.make_node("Identity", [x], [y])], []
    return [helper.make_node(act, [x], [y], **ACTIVATIONS[act][0])], []


def unfused_reference(case: Case):
    """The case's function as the unfused standard graph, run by onnx's reference evaluator in float64."""
    act = case.attrs.get("activation", "")
    float_op = "Conv" if case.op == "FusedConv" else "Gemm"
    attrs = {k: v for k, v in case.attrs.items() if not k.startswith("activation")}
    names = [n for n in ["x", "w", "b"] if n in case.inputs]
    nodes = [helper.make_node(float_op, names, ["pre"], **attrs)]
    pre = "pre"
    if "z" in case.inputs:
        nodes.append(helper.make_node("Add", ["pre", "z"], ["sum"]))
        pre = "sum"
    act_nodes, inits = _activation_nodes(act, pre, "y")
    graph = helper.make_graph(nodes + act_nodes, "unfused",
                              [helper.make_tensor_value_info(n, onnx.TensorProto.DOUBLE, None) for n in case.inputs],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, None)],
                              [numpy_helper.from_array(np.float64(numpy_helper.to_array(i)), i.name) for i in inits])
    evaluator = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    return lambda values: np.asarray(evaluator.run(None, {k: np.asarray(v, np.float64) for k, v in values.items()
                                                          if k in case.inputs})[0], np.float64)


def fused_conv(act: str, with_z: bool = False, attrs=None, id="") -> Case:
    group = (attrs or {}).get("group", 1)
    m = 4 if group == 1 else group
    inputs = {"x": rng.standard_normal((2, 3, 6, 6)), "w": rng.standard_normal((m, 3 // group, 3, 3)) * 0.4,
              "b": rng.standard_normal(m) * 0.2}
    if with_z:
        inputs["z"] = rng.standard_normal((2, m, 3, 3))
    attrs = dict(attrs or {"strides": [2, 2], "pads": [1, 1, 1, 1]})
    if act:
        attrs["activation"] = act
        if ACTIVATIONS[act][1]:
            attrs["activation_params"] = ACTIVATIONS[act][1]
    return Case("FusedConv", inputs, ["x", "z"] if with_z else ["x"], attrs, domain=MS,
                id=id or f"FusedConv-{act or 'no-activation'}{'-Z' if with_z else ''}")


def fused_gemm(act: str) -> Case:
    inputs = {"x": rng.standard_normal((3, 4)), "w": rng.standard_normal((5, 4)), "b": rng.standard_normal(5)}
    attrs = {"transB": 1, "alpha": 0.7, "beta": 0.5, "activation": act, **ACTIVATIONS[act][2]}
    return Case("FusedGemm", inputs, ["x", "w", "b"], attrs, domain=MS, id=f"FusedGemm-{act}")


CONV_ACTS = [a for a, spec in ACTIVATIONS.items() if spec[1] is not None]
GEMM_ACTS = [a for a, spec in ACTIVATIONS.items() if spec[2] is not None]
NUMERIC = ([fused_conv(a) for a in CONV_ACTS] + [fused_conv("Relu", with_z=True), fused_conv(""),
           fused_conv("Clip", attrs={"group": 3, "dilations": [2, 2]}, id="FusedConv-Clip-depthwise-dilated")] + [fused_gemm(a) for a in GEMM_ACTS])
NCHWC_OPS = ["Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReorderInput", "ReorderOutput",
             "Upsample"]
CASES = NUMERIC + [Case(op, {}, [], domain=NCHWC, id=f"nchwc-{op}") for op in NCHWC_OPS]


@pytest.mark.parametrize("case", NUMERIC, ids=str)
def test_fused_gradient(case):
    reference = unfused_reference(case)
    check_forward(case, reference, atol=1e-5)
    check_against(case, reference)


@pytest.mark.parametrize("case", [c for c in CASES if c.domain == NCHWC], ids=str)
def test_nchwc_kernels_are_refused_with_the_way_out(case):
    load_all()
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 4, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]))
    mg = ModelGraph(model)
    b = Builder(mg)
    b.node = mg.graph.nodes[0]
    with pytest.raises(UnsupportedOpError, match="ORT_ENABLE_EXTENDED"):
        find_rule(case.op, 17, NCHWC).fn(b, b.node, [mg.tensor("y")])


def test_unknown_activation_is_refused():
    case = fused_gemm("Relu")
    case.attrs.update(activation="ThresholdedRelu", activation_alpha=1.0)
    with pytest.raises(UnsupportedOpError, match="ThresholdedRelu"):
        check_against(case, lambda values: values["x"] @ values["w"].T)


# ---- graphs written by onnxruntime -------------------------------------------------------------------------------

def ort_optimized(model: onnx.ModelProto | bytes | str, tmp_path, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED):
    """The model as onnxruntime saves it after its CPU graph optimizations."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    return onnx.load(opts.optimized_model_filepath)


def _single_layer(kind: str, act: str) -> onnx.ModelProto:
    """x -> Conv or Gemm -> activation -> y, float32, as an exporter would write it."""
    if kind == "Conv":
        shape, w, b = [2, 3, 6, 6], rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
        node = helper.make_node("Conv", ["x", "w", "b"], ["pre"], pads=[1, 1, 1, 1])
    else:
        shape, w, b = [2, 4], rng.standard_normal((5, 4)), rng.standard_normal(5)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["pre"], transB=1, alpha=0.7)
    act_nodes, inits = _activation_nodes(act, "pre", "y")
    inits += [numpy_helper.from_array(np.float32(w), "w"), numpy_helper.from_array(np.float32(b), "b")]
    graph = helper.make_graph([node] + act_nodes, "layer", [helper.make_tensor_value_info("x", 1, shape)],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _gradients(model, layers, x, seed):
    return onnxcam.Explainer(model, layers=layers, device="cpu").run(x, seed=seed).gradients


@pytest.mark.parametrize("kind,act", [("Conv", a) for a in CONV_ACTS] + [("Gemm", a) for a in GEMM_ACTS])
def test_what_onnxruntime_fuses(kind, act, tmp_path):
    model = _single_layer(kind, act)
    optimized = ort_optimized(model, tmp_path)
    assert [n.op_type for n in optimized.graph.node] == [f"Fused{kind}"], "onnxruntime no longer fuses this"
    x = np.float32(rng.standard_normal([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]))
    y_shape = (2, 4, 6, 6) if kind == "Conv" else (2, 5)
    seed = np.float32(rng.standard_normal(y_shape))
    want, got = _gradients(model, ["x"], x, seed)["x"], _gradients(optimized, ["x"], x, seed)["x"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def _same_gradients(original, optimized, layers, x, targets):
    """Explaining the saved model gives the original's logits and gradients.

    Measured on Lite0 over 40 random inputs x these 3 layers: 114 of 120 bit-identical, the worst relative L2
    difference 1.5e-3, the worst element 0.9% of the largest gradient. Those are ReLU6 masks that flip where a
    pre-activation lies within float32 rounding of 0 or 6 (the original's gradient reads the output of an
    unfused Conv, the saved model's a FusedConv, which round differently); one flip deep in the net moves many
    elements of an early layer a little. Asserted: relative L2 <= 1e-2, every element within 5% of the largest.
    """
    ra = onnxcam.Explainer(original, layers=layers, device="cpu").run(x, targets=targets)
    rb = onnxcam.Explainer(optimized, layers=layers, device="cpu").run(x, targets=targets)
    np.testing.assert_allclose(rb.logits, ra.logits, rtol=1e-5, atol=1e-5)
    for layer in layers:
        g, want = rb.gradients[layer], ra.gradients[layer]
        assert np.abs(want).max() > 0
        assert np.linalg.norm(g - want) <= 1e-2 * np.linalg.norm(want), layer
        assert np.abs(g - want).max() <= 5e-2 * np.abs(want).max(), layer


def test_resnet18_saved_by_onnxruntime(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.torch_models import make_model

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    f = io.BytesIO()
    torch.onnx.export(make_model("resnet18"), (x,), f, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"])
    original = onnx.load_from_string(f.getvalue())
    optimized = ort_optimized(original, tmp_path)
    fused = [n.output[0] for n in optimized.graph.node if n.op_type == "FusedConv"]
    assert len(fused) == 9  # the stem and each block's first conv: conv + Relu (the second Relu follows an Add)
    _same_gradients(original, optimized, [fused[0], fused[4], fused[-1]], x.numpy(), [3, 7])


def test_lite0_saved_by_onnxruntime(tmp_path):
    from onnxcam.cli import DEMO_MODEL

    original = onnx.load(str(DEMO_MODEL))
    optimized = ort_optimized(original, tmp_path)
    ops = [n.op_type for n in optimized.graph.node]
    assert ops.count("FusedConv") == 33 and "Clip" not in ops  # every conv + ReLU6
    layers = ["/_swish/Clip_output_0", "/_blocks.8/_swish/Clip_output_0", "/_swish_1/Clip_output_0"]
    x = np.float32(np.random.default_rng(0).standard_normal((2, 3, 224, 224)))
    _same_gradients(original, optimized, layers, x, [285, 967])


def test_model_saved_at_ort_enable_all_is_refused_clearly(tmp_path):
    from onnxcam.cli import DEMO_MODEL

    optimized = ort_optimized(str(DEMO_MODEL), tmp_path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if not any(n.domain == NCHWC for n in optimized.graph.node):
        pytest.skip("onnxruntime wrote no NCHWc kernels on this CPU")
    with pytest.raises(UnsupportedOpError, match="ORT_ENABLE_EXTENDED"):
        onnxcam.Explainer(optimized, device="cpu")


@pytest.mark.parametrize("case", [c for c in NUMERIC if c.attrs.get("activation")], ids=str)
def test_fused_activation_masks_by_multiplying(case):
    """The fused kernels use activations.py's derivations, which mask with Mul by a cast 0/1 (onnxruntime's Where
    is not vectorised): no Where in the gradient graph of any fused activation."""
    from onnxcam import rewrite

    from .gradcheck import _model
    rw = rewrite.build(ModelGraph(_model(case, np.float32)), list(case.wrt), "y0")
    mine = [n.name for n in rw.model.graph.node if n.name.startswith("onnxcam_grad/") and "/seed/" not in n.name]
    assert mine and [n for n in mine if "/Where_" in n] == []
