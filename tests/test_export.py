"""The explanation as a model (onnxcam/export.py): the exported graph's maps against the Python path's.

Every exportable method on five models (the bundled Lite0, a seeded torchvision ResNet-18, the Keras NHWC fixture
and Lite0 quantized as QDQ and as QOperator, whose layers are uint8): onnx.checker's full check passes, the original outputs are the original model's, and `cam`
is onnxcam.explain's maps within 1e-5 (max abs, before any 8-bit conversion). The resize against cv2 at sizes up
and down; top-k, chosen classes and several layers; refusals; the CLI; and the same model run by onnxruntime-node.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import onnxcam
from onnxcam import image, preprocess
from onnxcam.cam.api import explain
from onnxcam.cam.cams import GradCAM, HiResCAM
from onnxcam.cam.postprocess import scale_cam_image
from onnxcam.cli import DEMO_MODEL, DEMO_SAMPLES, main
from onnxcam.errors import InputError
from onnxcam.export import (
    EXPORTABLE,
    _bounding_rows,
    _inferred_shapes,
    _linear_weights,
    _Ops,
    _pooled_gradient,
    _resized,
    _scaled_before_resize,
    export,
)

NODE_DIR = Path(__file__).parent / "node"
KERAS = Path(__file__).parent / "fixtures" / "keras" / "custom_cnn.onnx"
TOL = 1e-5


# ---- models (built once per module) ---------------------------------------------------------------------------------

@functools.cache
def photos() -> np.ndarray:
    pre = preprocess.resolve(onnx.load(str(DEMO_MODEL)))
    return np.stack([image.to_input(image.read_image(DEMO_SAMPLES / n), pre) for n in ("chelsea.png", "coffee.png")])


@functools.cache
def resnet18() -> bytes:
    import torch

    from .torch_models import export as torch_export
    from .torch_models import make_model

    return torch_export(make_model("resnet18"), torch.zeros(1, 3, 64, 64), "torchscript")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict:
    """Lite0 quantized as tests/test_edge_formats.py does (uint8 activations, per-channel int8 weights): the QDQ
    build (float layers between DequantizeLinear and the op) and the QOperator one (its layers are uint8)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    folder = tmp_path_factory.mktemp("quantized")
    source = folder / "lite0.onnx"
    shutil.copyfile(DEMO_MODEL, source)

    class Photos(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input": x[None]} for x in photos()])

        def get_next(self):
            return next(self.feeds, None)

    paths = {}
    for name, fmt in (("qdq", QuantFormat.QDQ), ("qoperator", QuantFormat.QOperator)):
        paths[name] = str(folder / f"lite0-{name}.onnx")
        quantize_static(str(source), paths[name], Photos(), quant_format=fmt, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return paths


@pytest.fixture(scope="module")
def models(quantized) -> dict:
    """name -> (model, input batch of 2)."""
    rng = np.random.default_rng(0)
    with np.load(KERAS.with_suffix(".npz")) as f:
        keras_x = f["x"]
    return {
        "lite0": (str(DEMO_MODEL), photos()),
        "resnet18": (resnet18(), rng.standard_normal((2, 3, 64, 64)).astype(np.float32)),
        "keras-nhwc": (str(KERAS), keras_x),
        "lite0-qdq": (quantized["qdq"], photos()),
        "lite0-qoperator": (quantized["qoperator"], photos()),
    }


def session(model) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def run(model, x: np.ndarray, **feeds) -> dict:
    s = session(model)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {s.get_inputs()[0].name: x, **feeds})))


# ---- parity with the Python path -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(EXPORTABLE))
@pytest.mark.parametrize("name", ["lite0", "resnet18", "keras-nhwc", "lite0-qdq", "lite0-qoperator"])
def test_the_exported_cam_is_the_python_paths(models, name, method):
    """Counterfactual Grad-CAM of the top class is all zero at a last ReLU layer (nothing argues against it): it
    explains each sample's least likely class instead, through the class input."""
    model, x = models[name]
    original = run(model, x)
    chosen = method == "counterfactual_gradcam"
    exported = export(model, method, class_input=chosen)
    onnx.checker.check_model(exported, full_check=True)
    targets = np.argmin(next(iter(original.values())), axis=1) if chosen else None
    got = run(exported, x, **({"cam_target": targets[:, None]} if chosen else {}))
    for out, value in original.items():
        np.testing.assert_allclose(got[out], value, rtol=0, atol=TOL, err_msg=out)
    e = explain(model, x, method=method, targets=None if targets is None else targets.tolist(), device="cpu")
    assert got["cam"].shape == e.maps.shape
    assert got["cam"].dtype == np.float32
    np.testing.assert_array_equal(got["cam_class"], e.targets)
    np.testing.assert_allclose(got["cam"], e.maps, rtol=0, atol=TOL)
    raw = next(iter(e.raw.values()))
    np.testing.assert_allclose(got["cam_raw"], raw, rtol=0, atol=TOL * max(1.0, np.abs(raw).max()))
    assert e.maps.reshape(len(x), -1).max(axis=1) == pytest.approx(1, abs=1e-5), "degenerate maps prove little"


def test_a_zero_map_stays_zero():
    """Counterfactual Grad-CAM of Lite0's top classes is nowhere positive: the scaling's 1e-7 keeps the map 0, as in
    the Python path, where 0 / 0 would make it NaN."""
    x = photos()
    got = run(export(str(DEMO_MODEL), "counterfactual_gradcam"), x)
    e = explain(str(DEMO_MODEL), x, method="counterfactual_gradcam", device="cpu")
    assert e.degenerate.all()
    np.testing.assert_array_equal(got["cam"], e.maps)
    assert not got["cam"].any()


def test_top_k_chosen_classes_and_several_layers():
    """top_k=2 over two layers, ranked in-graph or chosen through cam_target: each rank is the Python path's."""
    x = photos()
    layers = ["/_blocks.14/Add_output_0", None]
    cam = HiResCAM(str(DEMO_MODEL), target_layers=[layers[0], onnxcam.Explainer(str(DEMO_MODEL)).layers[0]],
                   device="cpu")
    ranked = run(cam.export(top_k=2), x)
    chosen_model = cam.export(top_k=2, class_input=True)
    classes = np.array([[-1, 5], [7, -1]], np.int64)
    chosen = run(chosen_model, x, cam_target=classes)
    reference = cam.explainer.run(x, top_k=2)
    assert ranked["cam"].shape == (2, 2, 224, 224)
    np.testing.assert_array_equal(ranked["cam_class"], reference.targets)
    want_classes = np.where(classes < 0, reference.targets, classes)
    np.testing.assert_array_equal(chosen["cam_class"], want_classes)
    by_class = cam.explainer.run(x, targets=want_classes)
    for k in range(2):
        np.testing.assert_allclose(ranked["cam"][:, k], cam.maps_for(x, reference.rank(k)), rtol=0, atol=TOL)
        np.testing.assert_allclose(chosen["cam"][:, k], cam.maps_for(x, by_class.rank(k)), rtol=0, atol=TOL)
        for i, raw in enumerate(cam.raw.values()):
            assert chosen[f"cam_raw_{i}"][:, k].shape == raw.shape
    # one class row for the whole batch broadcasts
    every = run(chosen_model, x, cam_target=np.array([[281, -1]], np.int64))
    np.testing.assert_array_equal(every["cam_class"][:, 0], [281, 281])


def test_a_dynamic_size_model_is_exported_at_the_size_given():
    """A model whose spatial size is free is built, and exported, for the size given; without one it is refused."""
    model = onnx.load_from_string(resnet18())
    for axis, name in ((2, "H"), (3, "W")):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = name
    x = np.random.default_rng(2).standard_normal((2, 3, 96, 64)).astype(np.float32)
    with pytest.raises(InputError, match="dynamic size: give the size"):
        export(model, "hirescam")
    got = run(export(model, "hirescam", size=(96, 64)), x)
    np.testing.assert_allclose(got["cam"], explain(model, x, method="hirescam", device="cpu").maps, rtol=0, atol=TOL)
    assert got["cam"].shape == (2, 96, 64)


# cv2's INTER_LINEAR up, down (by 2, where cv2 switches to INTER_AREA, and by uneven ratios), to 1 pixel, unchanged
@pytest.mark.parametrize("source,size", [((7, 7), (224, 224)), ((14, 10), (5, 3)), ((9, 4), (4, 9)),
                                         ((10, 12), (5, 6)), ((224, 224), (7, 7)), ((3, 5), (1, 1)),
                                         ((13, 13), (13, 13)), ((2, 3), (31, 17))])
@pytest.mark.parametrize("opset", [11, 13, 18])
def test_the_resize_is_cv2s_inter_linear(source, size, opset):
    o = _Ops(opset)
    out = _resized(o, "maps", source, size)
    graph = onnx.helper.make_graph(o.nodes, "resize", [onnx.helper.make_tensor_value_info("maps", 1, [2, 3, *source])],
                                   [onnx.helper.make_tensor_value_info(out, 1, None)], o.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=8)
    maps = np.random.default_rng(1).random((2, 3, *source), dtype=np.float32)
    got = session(model).run(None, {"maps": maps})[0]
    want = image.resize_maps(maps.reshape(6, *source), (size[1], size[0])).reshape(2, 3, *size)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


RESIZES = [((7, 7), (224, 224)), ((14, 10), (5, 3)), ((9, 4), (4, 9)), ((10, 12), (5, 6)), ((224, 224), (7, 7)),
           ((3, 5), (1, 1)), ((13, 13), (13, 13)), ((2, 3), (31, 17)), ((7, 7), (7, 300)), ((1, 1), (5, 4))]


@pytest.mark.parametrize("source,size", RESIZES)
def test_the_resized_maps_extremes_lie_on_the_bounding_rows(source, size):
    """The export scales the single-layer map before its resize, reading the resized map's min and max off the grid
    of _bounding_rows only: for any map they are those of the whole resized map. Float64, exact: the grid is picked
    out of the full resize, not recomputed. Maps with one spike at each pixel (at 64 of them for large maps: the
    extreme of each segment moves with it), a checkerboard, random maps."""
    rows, columns = _linear_weights(source[0], size[0]), _linear_weights(source[1], size[1])
    picked = np.ix_(_bounding_rows(rows), _bounding_rows(columns))
    assert picked[0].size <= min(2 * source[0], size[0]) and picked[1].size <= min(2 * source[1], size[1])
    rng = np.random.default_rng(3)
    pixels = source[0] * source[1]
    at = np.arange(pixels) if pixels <= 400 else rng.choice(pixels, 64, replace=False)
    spikes = np.zeros((len(at), pixels))
    spikes[np.arange(len(at)), at] = 1
    spikes = spikes.reshape(-1, *source)
    checker = np.indices(source).sum(axis=0)[None] % 2 - 0.5
    maps = np.concatenate([spikes, -spikes, checker, rng.standard_normal((20, *source))])
    full = rows.astype(np.float64) @ (maps @ columns.T.astype(np.float64))
    grid = full[:, picked[0], picked[1]].reshape(len(maps), -1)
    np.testing.assert_array_equal(grid.min(axis=1), full.min(axis=(1, 2)))
    np.testing.assert_array_equal(grid.max(axis=1), full.max(axis=(1, 2)))


@pytest.mark.parametrize("source,size", RESIZES)
def test_scaling_before_the_resize_is_scaling_after_it(source, size):
    """_resized(_scaled_before_resize(x)) is the Python path's resize then per-image min-max scaling (cv2, then
    postprocess), to float32 rounding: for maps of any sign, a constant one, an all-zero one (which stays 0)."""
    o = _Ops(17)
    out = _resized(o, _scaled_before_resize(o, "maps", source, size), source, size)
    graph = onnx.helper.make_graph(o.nodes, "scaled", [onnx.helper.make_tensor_value_info("maps", 1, [None, *source])],
                                   [onnx.helper.make_tensor_value_info(out, 1, None)], o.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    rng = np.random.default_rng(4)
    maps = np.concatenate([rng.random((3, *source), dtype=np.float32), rng.standard_normal((3, *source), np.float32),
                           np.full((1, *source), 0.25, np.float32), np.zeros((1, *source), np.float32)])
    got = session(model).run(None, {"maps": maps})[0]
    want = scale_cam_image(image.resize_maps(maps, (size[1], size[0])))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert not got[-1].any()


@pytest.mark.parametrize("source,size", [((7, 7), (224, 224)), ((14, 10), (5, 3)), ((3, 17), (17, 3)), ((6, 4), (4, 6)),
                                         ((1000, 5), (999, 1))])
def test_the_resize_weights_are_cv2s(source, size):
    """The weight matrices the export multiplies by are those cv2 itself gives (read off an identity), per axis."""
    for s, d in zip(source, size):
        np.testing.assert_allclose(_linear_weights(s, d), image._linear_weights(s, d), rtol=0, atol=1e-7)


# ---- the cost of the appended graph -----------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [None, 2])
def test_nothing_added_is_as_large_as_the_layer(top_k):
    """Grad-CAM in the graph runs on every inference, so next to Lite0 it must cost little: the weighted channel sum
    is one MatMul (no (N, S, C, h, w) product to reduce), the global average pool's gradient is read as its one value
    per channel (not broadcast to (N, C, h, w) and averaged back), the resize is two small MatMuls (no Resize, no
    run-time sizes), the map is scaled before its resize (_scaled_before_resize), and no Squeeze copies a full-size
    map. So no node the export adds writes a tensor as large as the layer's activation (Reshape and Cast aside:
    onnxruntime runs them in place or drops them), and the only one at the input's size is the resize that writes
    `cam`. The static shapes leave the batch free: batch 1 and 3 give the Python path's maps."""
    model = export(str(DEMO_MODEL), "gradcam", top_k=top_k)
    layer = onnxcam.Explainer(str(DEMO_MODEL)).layers[0]
    original = {n.name for n in onnx.load(str(DEMO_MODEL)).graph.node}
    dims = _inferred_shapes(model)
    assert dims[layer][0] == "N" and "Resize" not in {n.op_type for n in model.graph.node}
    layer_size = np.prod(dims[layer][1:])
    full_size = []
    for node in model.graph.node:
        if node.name in original or node.op_type in ("Reshape", "Cast"):
            continue
        for out in node.output:
            shape = dims[out][1:]  # past the batch axis
            assert all(isinstance(d, int) for d in shape), (node.name, out, dims[out])
            if shape[-2:] == [224, 224]:
                full_size.append((node.op_type, out))
            else:
                assert np.prod(shape) < layer_size, (node.op_type, node.name, dims[out])
    assert full_size == [("MatMul", "cam")]
    x = photos()
    for batch in (x[:1], np.concatenate([x, x[:1, :, :, ::-1]])):
        got = run(model, np.ascontiguousarray(batch))
        want = GradCAM(str(DEMO_MODEL), device="cpu").explainer.run(batch, top_k=top_k or 1)
        assert got["cam"].shape[0] == len(batch)
        np.testing.assert_array_equal(got["cam_class"], want.targets if top_k else want.targets[:, 0])
        for k in range(top_k or 1):
            maps = GradCAM(str(DEMO_MODEL), device="cpu").maps_for(batch, want.rank(k))
            np.testing.assert_allclose(got["cam"][:, k] if top_k else got["cam"], maps, rtol=0, atol=TOL)


def _gradient_model(p_shape, c: np.ndarray, g_shape, seeds: int = 1) -> onnx.ModelProto:
    """g = p * c, or with several seeds the rewrite's Concat of each seed's p_i * c unsqueezed at axis 1."""
    make = onnx.helper
    nodes = [make.make_node("Mul", [f"p{i}", "c"], [f"g{i}"]) for i in range(seeds)]
    if seeds > 1:
        nodes += [make.make_node("Unsqueeze", [f"g{i}", "axis"], [f"u{i}"]) for i in range(seeds)]
        nodes.append(make.make_node("Concat", [f"u{i}" for i in range(seeds)], ["g"], axis=1))
        g_shape = [g_shape[0], seeds, *g_shape[1:]]
    else:
        nodes[0].output[0] = "g"
    graph = make.make_graph(nodes, "pooled", [make.make_tensor_value_info(f"p{i}", 1, p_shape) for i in range(seeds)],
                            [make.make_tensor_value_info("g", 1, g_shape)],
                            [onnx.numpy_helper.from_array(c.astype(np.float32), "c"),
                             onnx.numpy_helper.from_array(np.array([1]), "axis")])
    return make.make_model(graph, opset_imports=[make.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("seeds", [1, 3])
@pytest.mark.parametrize("p_shape,c,g_shape,channels_last,pooled", [
    (["N", 4, 1, 1], np.full((1, 1, 3, 3), 1 / 9), ["N", 4, 3, 3], False, True),  # a global average pool's
    (["N", 1, 1, 4], np.full((1, 3, 3, 1), 1 / 9), ["N", 3, 3, 4], True, True),  # the same, channels-last
    (["N", 1, 1, 4], np.full((1, 3, 3, 1), 1 / 9), ["N", 3, 3, 4], False, False),  # read as NCHW: not 1 x 1
    (["N", 4, 1, 1], np.arange(9.0).reshape(1, 1, 3, 3), ["N", 4, 3, 3], False, False),  # not equal everywhere
    (["N", 4, 3, 3], np.full((1, 1, 1, 1), 0.5), ["N", 4, 3, 3], False, False),  # p varies in space
    (["N", 1, 1, 1], np.full((1, 4, 3, 3), 1 / 9), ["N", 4, 3, 3], False, False),  # p broadcast over channels
])
def test_a_pooled_gradient_is_read_off_only_where_it_is_one(p_shape, c, g_shape, channels_last, pooled, seeds):
    """Grad-CAM's weights are p * c only when each seed's gradient is p * c with p one value per sample and channel
    and c the same at every position; otherwise the export takes the spatial mean of the gradients themselves."""
    model = _gradient_model(p_shape, c, g_shape, seeds)
    found = _pooled_gradient(model, "g", channels_last, seeds, _inferred_shapes(model))
    assert found == (([f"p{i}" for i in range(seeds)], float(np.float32(c.flat[0]))) if pooled else None)


# ---- what the model says about itself, refusals, the command ---------------------------------------------------

def test_metadata_and_declared_outputs():
    exported = GradCAM(str(DEMO_MODEL), device="cpu").export()
    meta = {p.key: p.value for p in exported.metadata_props}
    assert meta["onnxcam.version"] == onnxcam.__version__
    assert meta["onnxcam.method"] == "gradcam"
    assert json.loads(meta["onnxcam.layers"]) == onnxcam.Explainer(str(DEMO_MODEL)).layers
    assert meta["onnxcam.score"] == "logits"
    assert set(json.loads(meta["onnxcam.outputs"])) == {"cam", "cam_class", "cam_raw"}
    assert json.loads(meta["onnxcam.inputs"]) == {}
    original = onnx.load(str(DEMO_MODEL))
    assert [i.name for i in exported.graph.input if i.name not in {t.name for t in exported.graph.initializer}] == \
        [i.name for i in original.graph.input]
    assert [o.name for o in exported.graph.output] == [o.name for o in original.graph.output] + \
        ["cam", "cam_class", "cam_raw"]


@pytest.mark.parametrize("method", ["eigencam", "kpca_cam", "eigengradcam", "guided_backprop", "nonsense"])
def test_methods_without_a_graph_form_are_refused(method):
    with pytest.raises(InputError, match=r"cannot be exported.*exportable: gradcam, hirescam"):
        export(str(DEMO_MODEL), method)


def test_the_command_writes_the_model(tmp_path):
    out = tmp_path / "lite0-cam.onnx"
    result = CliRunner().invoke(main, ["export", str(DEMO_MODEL), "-o", str(out), "--method", "gradcam++",
                                       "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    got = run(onnx.load(str(out)), photos())
    assert got["cam"].shape == (2, 2, 224, 224)
    refused = CliRunner().invoke(main, ["export", str(DEMO_MODEL), "-o", str(out), "--method", "eigencam"])
    assert refused.exit_code == 2
    assert "exportable: gradcam, hirescam" in refused.output


# ---- outside Python ---------------------------------------------------------------------------------------------

def test_onnxruntime_node_gives_the_same_cam(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (.ci/run installs it)")
    if not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir():
        pytest.skip("onnxruntime-node is not installed: run `npm ci` in tests/node (.ci/run does)")
    x = photos()
    model = tmp_path / "lite0-cam.onnx"
    export(str(DEMO_MODEL), "gradcam", top_k=2, class_input=True, path=model)
    x.tofile(tmp_path / "x.f32")
    classes = np.array([[-1, 5], [7, -1]], np.int64)
    classes.tofile(tmp_path / "classes.i64")
    proc = subprocess.run([node, str(NODE_DIR / "explain.js"), str(model), str(tmp_path / "x.f32"),
                           ",".join(map(str, x.shape)), str(tmp_path), str(tmp_path / "classes.i64"), "2,2"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    described = json.loads((tmp_path / "outputs.json").read_text())
    got = {name: np.fromfile(tmp_path / d["file"], np.int64 if d["type"] == "int64" else np.float32).reshape(d["dims"])
           for name, d in described.items()}
    cam = GradCAM(str(DEMO_MODEL), device="cpu")
    want_classes = np.where(classes < 0, cam.explainer.run(x, top_k=2).targets, classes)
    np.testing.assert_array_equal(got["cam_class"], want_classes)
    r = cam.explainer.run(x, targets=want_classes)
    for k in range(2):
        np.testing.assert_allclose(got["cam"][:, k], cam.maps_for(x, r.rank(k)), rtol=0, atol=TOL)
