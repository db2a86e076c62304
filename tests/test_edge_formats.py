"""Edge formats of the bundled EfficientNet-Lite0 (and a torchvision resnet18): fp16 conversions, int8 QDQ and
QOperator builds made here with onnxruntime's own tools, explained on the sample photos. Their Grad-CAM maps are
compared with the fp32 model's by Pearson correlation, and the explained forward with a plain onnxruntime run.

Quantized builds: quantize_static over the four bundled photos (MinMax calibration), per-channel int8 weights,
uint8 activations (U8S8, onnxruntime's classic CPU format); the QDQ build with int8 activations (quantize_static's
default) is checked for the forward only. A quantized layer is explained as real values: activations
(q - zero point) * scale and gradients d/dq / scale (graph/quant.quantization_of), since its Grad-CAM weights must not
see the zero point.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxcam
from onnxcam import image, preprocess
from onnxcam.cam import methods
from onnxcam.cam.api import explain
from onnxcam.cam.postprocess import aggregate_layers, layer_map
from onnxcam.cli import DEMO_MODEL, DEMO_SAMPLES
from onnxcam.graph.model import ModelGraph
from onnxcam.graph.quant import is_quantized, quantization_of

PHOTOS = ("chelsea.png", "coffee.png")
TARGETS = [285, 967]  # Egyptian cat, espresso: what the fp32 model predicts for them
CALIBRATION = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")
MID_LAYER = "/_blocks.14/Add_output_0"  # the last residual sum before the head: a middle-depth Grad-CAM layer


# ---- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite0():
    proto = onnx.load(str(DEMO_MODEL))
    pre = preprocess.resolve(proto)
    photos = {name: image.to_input(image.read_image(DEMO_SAMPLES / name), pre)[None] for name in CALIBRATION}
    x = np.concatenate([photos[name] for name in PHOTOS])
    return proto, x, photos


@pytest.fixture(scope="module")
def fp32(lite0):
    proto, x, _ = lite0
    return {layer: gradcam_maps(proto, x, layer) for layer in (None, MID_LAYER)}


@pytest.fixture(scope="module")
def quantized(lite0, tmp_path_factory):
    """{name: path} of quantize_static builds (a few seconds each)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    _, _, photos = lite0
    folder = tmp_path_factory.mktemp("quantized")

    class Photos(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input": x} for x in photos.values()])

        def get_next(self):
            return next(self.feeds, None)

    builds = {"qdq": (QuantFormat.QDQ, QuantType.QUInt8), "qoperator": (QuantFormat.QOperator, QuantType.QUInt8),
              "qdq-s8": (QuantFormat.QDQ, QuantType.QInt8)}
    # quantize_static writes a "-inferred" copy next to its input: a private copy keeps parallel workers apart
    source = folder / "lite0.onnx"
    shutil.copyfile(DEMO_MODEL, source)
    paths = {}
    for name, (fmt, activations) in builds.items():
        paths[name] = str(folder / f"lite0-{name}.onnx")
        quantize_static(str(source), paths[name], Photos(), quant_format=fmt, per_channel=True,
                        activation_type=activations, weight_type=QuantType.QInt8)
    return paths


# ---- helpers -------------------------------------------------------------------------------------------------------

def layer_in(model: onnx.ModelProto, float_name: str | None) -> str | None:
    """The tensor of a quantized build that holds the fp32 model's tensor `float_name` (real or quantized)."""
    if float_name is None:
        return None
    names = {o for n in model.graph.node for o in n.output}
    for candidate in (f"{float_name}_DequantizeLinear_Output", f"{float_name}_quantized", float_name):
        if candidate in names:
            return candidate
    raise KeyError(float_name)


def gradcam_maps(model, x: np.ndarray, layer: str | None = None, targets=TARGETS):
    """Grad-CAM maps (N, H, W) in [0, 1] the way onnxcam's GradCAM makes them, with quantized layers dequantized."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(model)
    ex = onnxcam.Explainer(proto, layers=None if layer is None else [layer_in(proto, layer)], device="cpu")
    r = ex.run(x, targets=targets)
    name = ex.layers[0]
    a, g = r.activations[name], r.gradients[name]
    if not np.issubdtype(a.dtype, np.floating):
        scale, zero_point = quantization_of(proto, name)
        a, g = (a.astype(np.float32) - np.float32(zero_point)) * scale, g / scale
    raw = methods.gradcam(np.float32(a), np.float32(g))
    return aggregate_layers([layer_map(raw, (x.shape[-1], x.shape[-2]))]), r


def correlations(maps, reference) -> list[float]:
    return [float(np.corrcoef(m.ravel(), ref.ravel())[0, 1]) for m, ref in zip(maps, reference)]


def plain_logits(path: str, x: np.ndarray) -> np.ndarray:
    """What the deployed model computes: a default onnxruntime session of the file as it is."""
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def needs_quantized_paths(path: str) -> None:
    """QOperator graphs pass integer tensors through Pad/Reshape and QGemm: the score must be reachable."""
    mg = ModelGraph(onnx.load(path))
    score = mg.default_score()
    assert score in mg.forward_reach([mg.tensor(mg.input_name)]), "gradients do not pass the integer tensors"


# ---- quantized builds ----------------------------------------------------------------------------------------------

def test_the_builds_are_what_quantize_static_writes(quantized):
    ops = {name: {n.op_type for n in onnx.load(path).graph.node} for name, path in quantized.items()}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops["qdq"]
    assert {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm"} <= ops["qoperator"]
    assert "Conv" not in ops["qoperator"] and "Clip" not in ops["qdq"] | ops["qoperator"]  # ReLU6 folded into ranges
    assert [is_quantized(onnx.load(quantized[k])) for k in ("qdq", "qoperator")] == ["qdq", "qoperator"]
    assert is_quantized(onnx.load(str(DEMO_MODEL))) is None


# Pearson correlation of the final Grad-CAM maps (224 x 224, in [0, 1]) with the fp32 model's, per photo
# (chelsea, coffee). Measured here: at the default (last) layer, QDQ 0.972 / 0.988 and QOperator 0.972 / 0.988;
# per-tensor weights give 0.981 / 0.991, int8 activations 0.973-0.999. Asserted at 0.93: quantization noise alone
# keeps them near 0.97, while a wrong gradient (a scale missing per channel, no saturation mask) is not a small
# perturbation of the map.
LAST_LAYER_MIN = 0.93


@pytest.mark.parametrize("build", ["qdq", "qoperator"])
def test_quantized_gradcam_follows_the_fp32_map(build, quantized, lite0, fp32):
    if build == "qoperator":
        needs_quantized_paths(quantized[build])
    _, x, _ = lite0
    maps, r = gradcam_maps(quantized[build], x)
    assert r.targets.tolist() == TARGETS  # the int8 model still sees a cat and an espresso
    corr = correlations(maps, fp32[None][0])
    assert min(corr) > LAST_LAYER_MIN, f"{build}: correlations with the fp32 maps {corr}"


@pytest.mark.parametrize("build", ["qdq", "qoperator", "qdq-s8"])
def test_the_explained_forward_is_the_deployed_forward(build, quantized, lite0):
    """r.logits equal a plain onnxruntime run of the same file: what onnxcam adds must not change what the
    model computes. Measured: identical (0.0) for the U8S8 QDQ and QOperator builds.

    With int8 activations (qdq-s8), onnxruntime fuses DQ -> Conv/Gemm/GlobalAveragePool -> Q into QLinearConv,
    QGemm, QLinearGlobalAveragePool; a second consumer of a tensor of such a unit (the gradient graph's Shape
    and Gemm reads, the layer exposed as a graph output) makes it run as float ops instead: the last layer's
    explanation loses the QGemm and QLinearGlobalAveragePool fusions and one QLinearConv (logits off by 0.058), a
    middle layer's many more (off by 1.1). Fixing that is the rewrite's job (issue 5 report); xfail until then.
    """
    if build == "qoperator":
        needs_quantized_paths(quantized[build])
    _, x, _ = lite0
    r = onnxcam.Explainer(quantized[build], device="cpu").run(x)
    diff = float(np.abs(r.logits - plain_logits(quantized[build], x)).max())
    if build == "qdq-s8" and diff > 1e-5:
        pytest.xfail(f"explaining breaks onnxruntime's int8 QDQ fusions: logits differ by {diff:.3g}")
    assert diff <= 1e-5, f"{build}: logits differ from onnxruntime's by {diff}"


def test_qdq_build_saved_by_onnxruntime(quantized, lite0, fp32, tmp_path):
    """The QDQ build as onnxruntime saves it after ORT_ENABLE_EXTENDED: QLinearConv, QLinearAdd, QGemm... with
    the leftover QuantizeLinear/DequantizeLinear. Measured: the same maps as the QOperator build (0.972 / 0.988),
    logits identical to onnxruntime's run of the saved file."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "saved.onnx")
    ort.InferenceSession(quantized["qdq"], opts, providers=["CPUExecutionProvider"])
    saved = opts.optimized_model_filepath
    assert {"QLinearConv", "QLinearAdd", "QGemm"} <= {n.op_type for n in onnx.load(saved).graph.node}
    needs_quantized_paths(saved)
    _, x, _ = lite0
    maps, r = gradcam_maps(saved, x)
    assert min(correlations(maps, fp32[None][0])) > LAST_LAYER_MIN
    assert float(np.abs(r.logits - plain_logits(saved, x)).max()) <= 1e-5


# At a middle layer the quantized model's own clamps matter: quantize_static folds every ReLU6 into the range of
# the op before it, and qlinear.py gives those saturated outputs zero gradient. Measured correlations at
# /_blocks.14/Add_output_0 (chelsea, coffee): QOperator 0.847 / 0.731 (per-tensor weights 0.871 / 0.658, int8
# activations 0.968 / 0.992); plain straight-through without the masks, as quantize.py does for QDQ today:
# -0.16 / 0.52. int8 noise keeps even the right gradient below the last layer's numbers. Asserted at 0.55.
MID_LAYER_MIN = 0.55


def test_qoperator_middle_layer_follows_the_fp32_map(quantized, lite0, fp32):
    needs_quantized_paths(quantized["qoperator"])
    _, x, _ = lite0
    maps, _ = gradcam_maps(quantized["qoperator"], x, MID_LAYER)
    corr = correlations(maps, fp32[MID_LAYER][0])
    assert min(corr) > MID_LAYER_MIN, f"correlations with the fp32 maps {corr}"


def test_qdq_middle_layer_follows_the_fp32_map(quantized, lite0, fp32):
    """Same check on the QDQ build: QuantizeLinear's rule (quantize.py) masks saturation of zero-based ranges as
    qlinear.py does, so it measures exactly the QOperator numbers (pure straight-through gave -0.16 / 0.52)."""
    _, x, _ = lite0
    maps, _ = gradcam_maps(quantized["qdq"], x, MID_LAYER)
    corr = correlations(maps, fp32[MID_LAYER][0])
    assert min(corr) > MID_LAYER_MIN, f"correlations with the fp32 maps {corr}"


# ---- fp16 ----------------------------------------------------------------------------------------------------------

def fp16(model: onnx.ModelProto, keep_io_types: bool) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return convert_float_to_float16(copy, keep_io_types=keep_io_types)


# Measured: Lite0 fp16 (float32 inputs/outputs) vs fp32, Grad-CAM correlation 0.999995 / 1.0 at the last layer;
# resnet18 (seeded random weights) >= 0.9999 at all four stages. Asserted at 0.999: an fp16 backward (no float32
# widening) would underflow and lose the map (see the tiny-seed test), not move it by 1e-3.
FP16_MIN = 0.999


def test_fp16_lite0_gradcam_follows_the_fp32_map(lite0, fp32):
    proto, x, _ = lite0
    half = fp16(proto, keep_io_types=True)
    maps, r = gradcam_maps(half, x)
    assert r.targets.tolist() == TARGETS
    layer = next(iter(r.activations))
    assert r.activations[layer].dtype == np.float16 and r.gradients[layer].dtype == np.float32
    corr = correlations(maps, fp32[None][0])
    assert min(corr) > FP16_MIN, corr


def test_fp16_backward_runs_in_float32(lite0):
    """A seed of 1e-6 gives gradients 1e-6 times the unit seed's (~1e-9 and below): float16 would flush them to
    zero (its smallest subnormal is 6e-8); the float32 backward keeps them, to rounding."""
    proto, x, _ = lite0
    ex = onnxcam.Explainer(fp16(proto, keep_io_types=True), device="cpu")
    seed = np.zeros((2, 1000), np.float32)
    seed[[0, 1], TARGETS] = 1.0
    layer = ex.layers[0]
    unit = ex.run(x, seed=seed).gradients[layer]
    tiny = ex.run(x, seed=seed * np.float32(1e-6)).gradients[layer]
    assert np.abs(unit).max() < 0.05 and np.count_nonzero(tiny) == np.count_nonzero(unit)
    np.testing.assert_allclose(tiny, unit * np.float32(1e-6), rtol=1e-4, atol=0)


def test_fp16_input_model(lite0, fp32):
    """keep_io_types=False: the model takes and returns float16; the Explainer feeds the input type the model
    declares. Measured: correlation 0.999995 / 1.0, logits within 0.025 of fp32."""
    proto, x, _ = lite0
    half = fp16(proto, keep_io_types=False)
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    maps, r = gradcam_maps(half, x)
    assert r.logits.dtype == np.float16 and r.targets.tolist() == TARGETS
    assert min(correlations(maps, fp32[None][0])) > FP16_MIN


def test_fp16_resnet18_at_every_stage():
    torch = pytest.importorskip("torch")
    from tests.torch_models import make_model

    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    f = io.BytesIO()
    torch.onnx.export(make_model("resnet18"), (x,), f, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"])
    model = onnx.load_from_string(f.getvalue())
    relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    layers = [relus[4], relus[8], relus[12], relus[-1]]  # the outputs of layer1 .. layer4
    x = x.numpy()
    r32 = onnxcam.Explainer(model, layers=layers, device="cpu").run(x)
    r16 = onnxcam.Explainer(fp16(model, keep_io_types=True), layers=layers, device="cpu").run(x, targets=r32.targets)
    for layer in layers:
        maps = [aggregate_layers([layer_map(methods.gradcam(np.float32(r.activations[layer]), r.gradients[layer]),
                                            (112, 112))]) for r in (r32, r16)]
        corr = correlations(maps[1], maps[0])
        assert min(corr) > FP16_MIN, (layer, corr)


def test_gradcam_maps_helper_is_onnxcams_gradcam(lite0, fp32):
    """The maps compared above are the ones explain(..., "gradcam") returns for float models."""
    proto, x, _ = lite0
    np.testing.assert_allclose(fp32[None][0], explain(proto, x, "gradcam", targets=TARGETS, device="cpu").maps,
                               atol=1e-6)


@pytest.mark.parametrize("build", ["qoperator", "qdq"])
def test_cli_says_a_quantized_model_was_differentiated_as_its_float_equivalent(quantized, build, tmp_path):
    """Issue 5: 'differentiate them as their dequantized float equivalents; say so in the output'."""
    import json

    from click.testing import CliRunner

    from onnxcam.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["explain", str(quantized[build]), str(DEMO_SAMPLES / "chelsea.png"),
                                       "--out", str(out), "--labels", "imagenet"])
    assert result.exit_code == 0, result.output
    assert f"Note: int8 {build} model, differentiated as its dequantized float equivalent" in result.output
    record = json.loads((out / "chelsea.json").read_text())
    assert record["quantized"] == build and "dequantized float equivalent" in record["differentiated_as"]
    assert record["top"][0]["class"] == 285
