"""Which map to trust: the randomization sanity check, `onnxcam evaluate` (table + strict JSON, exact exit
statuses, one-line errors) and the closed form HiResCAM = CAM on a global-average-pooling + linear head."""

from __future__ import annotations

import functools
import json

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam.cli import main
from onnxcam.errors import InputError
from onnxcam.evaluate import evaluate
from onnxcam.metrics.sanity import randomization_check, spearman, weighted_nodes

SIZE, CLASSES = 16, 5


@functools.cache
def tiny_model(seed: int = 0) -> onnx.ModelProto:
    """conv(+bias)-relu x3 (16 -> 16 -> 8 -> 4 pixels), GlobalAveragePool, Flatten, Gemm: a seeded GAP + linear head."""
    rng = np.random.default_rng(seed)

    def w(name, *shape):
        return numpy_helper.from_array((rng.normal(0, 1, shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32),
                                       name)

    inits = [w("w1", 8, 3, 3, 3), w("w2", 8, 8, 3, 3), w("w3", 12, 8, 3, 3), w("fc", CLASSES, 12),
             numpy_helper.from_array(np.zeros(CLASSES, np.float32), "fcb"),
             *(numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), f"b{k}")
               for k, c in ((1, 8), (2, 8), (3, 12)))]  # biases: FullGrad reads the Convs' bias gradients
    conv = functools.partial(helper.make_node, "Conv", pads=[1, 1, 1, 1])
    nodes = [conv(["x", "w1", "b1"], ["c1"], name="conv1"), helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             conv(["r1", "w2", "b2"], ["c2"], name="conv2", strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             conv(["r2", "w3", "b3"], ["c3"], name="conv3", strides=[2, 2]),
             helper.make_node("Relu", ["c3"], ["feat"], name="relu3"),
             helper.make_node("GlobalAveragePool", ["feat"], ["pool"], name="gap"),
             helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def batch(n: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)


# ---- the randomization sanity check -----------------------------------------------------------------------------
def test_weighted_nodes_top_first_and_downstream_of_the_layer():
    assert [n for n, _ in weighted_nodes(tiny_model())] == ["fc", "conv3", "conv2", "conv1"]
    assert weighted_nodes(tiny_model(), after="feat") == [("fc", "fc")]
    assert [n for n, _ in weighted_nodes(tiny_model(), after="r1")] == ["fc", "conv3", "conv2"]


def test_a_method_whose_maps_do_not_change_fails_and_gradcam_passes():
    # Only the head (after the layer) is re-initialized: EigenCAM reads the activations alone, so its maps stay
    # exactly the same and it fails; Grad-CAM's weights are the head's, so its maps change and it passes.
    eigen = randomization_check(tiny_model(), batch(), "eigencam", below_layer=False)
    grad = randomization_check(tiny_model(), batch(), "gradcam", below_layer=False)
    assert [s.nodes for s in eigen.stages] == [["fc"]] == [s.nodes for s in grad.stages]
    assert eigen.final_spearman == 1.0 and eigen.final_ssim == pytest.approx(1.0) and not eigen.passed
    assert grad.passed and grad.final_spearman < 0.5 and grad.final_ssim < 0.5


def test_cascading_randomization_reports_every_stage_and_leaves_the_model_alone():
    model = tiny_model()
    before = model.SerializeToString()
    rep = randomization_check(model, batch(), "gradcam", stages=4, seed=3)
    assert [s.nodes for s in rep.stages] == [["fc"], ["conv3"], ["conv2"], ["conv1"]]
    assert all(s.spearman.shape == (3,) and s.ssim.shape == (3,) for s in rep.stages)
    assert rep.passed
    assert model.SerializeToString() == before  # the caller's model is not re-initialized
    json.dumps(rep.as_dict(), allow_nan=False)


def test_spearman_ties_and_constant_maps():
    a = np.array([[[0.0, 1.0], [1.0, 3.0]]])
    assert spearman(a, a * 2 + 1)[0] == pytest.approx(1.0)
    assert spearman(a, -a)[0] == pytest.approx(-1.0)
    assert spearman(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))[0] == 1.0  # a zero map that stays zero did not change
    assert spearman(np.zeros((1, 2, 2)), a)[0] == 0.0


def test_sanity_bad_input_one_line():
    with pytest.raises(InputError, match="stages must be a positive integer, not 0"):
        randomization_check(tiny_model(), batch(), "gradcam", stages=0)


# ---- HiResCAM = CAM on GAP + linear ----------------------------------------------------------------------------
def test_hirescam_equals_cam_on_a_gap_linear_head():
    """On GAP + linear, dy_c/dA_k = W[c, k] / (h w) at every position, so HiResCAM = sum_k W[c, k] A_k / (h w) =
    CAM / (h w): after min-max scaling the maps are the same. h w = 16 here, a power of two, so the scaling itself
    is exact in float32; only the order of the channel sum differs (matrix product vs. sum)."""
    x = batch()
    hires = onnxcam.explain(tiny_model(), x, "hirescam", device="cpu")
    cam = onnxcam.explain(tiny_model(), x, "cam", device="cpu")
    grad = onnxcam.explain(tiny_model(), x, "gradcam", device="cpu")
    assert hires.layers == ["feat"] and cam.layers == ["feat"]
    acts = hires.result.activations["feat"].astype(np.float64)  # (N, 12, 4, 4)
    w = numpy_helper.to_array(tiny_model().graph.initializer[3]).astype(np.float64)
    reference = np.einsum("nk,nkhw->nhw", w[hires.targets], acts)  # float64 CAM
    np.testing.assert_allclose(cam.raw["feat"], reference, rtol=0, atol=1e-6)
    np.testing.assert_allclose(hires.raw["feat"] * 16, reference, rtol=0, atol=1e-6)
    np.testing.assert_allclose(hires.maps, cam.maps, rtol=0, atol=1e-6)
    np.testing.assert_allclose(grad.maps, cam.maps, rtol=0, atol=1e-6)  # Grad-CAM too: its weight is W / (h w)
    # at a middle stage (8x8, conv3 and the head after it) Grad-CAM and HiResCAM differ
    mid_h = onnxcam.explain(tiny_model(), x, "hirescam", layers=["r2"], device="cpu").maps
    mid_g = onnxcam.explain(tiny_model(), x, "gradcam", layers=["r2"], device="cpu").maps
    assert np.abs(mid_h - mid_g).max() > 0.1


# ---- onnxcam evaluate -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    onnx.save(tiny_model(), d / "tiny.onnx")
    rng = np.random.default_rng(5)
    for name in ("a.png", "b.png", "c.png"):
        cv2.imwrite(str(d / "photos" / name) if (d / "photos").exists() else _mkdir(d / "photos", name),
                    rng.integers(0, 256, (32, 24, 3), dtype=np.uint8))
    (d / "boxes.json").write_text(json.dumps({"a.png": [[0, 0, 12, 16]], "b.png": [[12, 16, 24, 32]],
                                              "c.png": [[0, 0, 24, 32]]}))
    return d


def _mkdir(folder, name) -> str:
    folder.mkdir()
    return str(folder / name)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_evaluate_command_prints_the_table_and_writes_strict_json(files):
    out = files / "e.json"
    result = run("evaluate", files / "tiny.onnx", files / "photos", "--method", "gradcam,hirescam,eigencam",
                 "--metric", "deletion,insertion,road,pointing,energy,sanity", "--boxes", files / "boxes.json",
                 "--steps", "4", "--stages", "2", "--json", out)
    assert result.exit_code == 0, result.output
    # (ROAD warns on stderr about maps that are zero everywhere on these random pictures)
    lines = [line for line in result.output.splitlines() if not line.startswith("WARNING: ")]
    assert lines[0] == "3 images, layer feat"
    assert lines[1].split()[:3] == ["method", "deletion", "(lower"]
    assert [line.split()[0] for line in lines[2:5]] == ["gradcam", "hirescam", "eigencam"]
    assert lines[-1] == f"wrote {out}"
    record = _strict(out.read_text())
    assert record["methods"] == ["gradcam", "hirescam", "eigencam"]
    for method in record["methods"]:
        assert set(record["scores"][method]) == {"deletion", "insertion", "road", "pointing", "energy", "sanity"}
        assert all(len(v) == 3 for v in record["per_image"][method].values())
        assert 0 <= record["scores"][method]["pointing"] <= 1
    assert record["lower_is_better"] == ["deletion", "sanity"]
    assert len(record["sanity"]["gradcam"][0]["stages"]) == 2


def test_evaluate_matches_the_metrics_called_directly(files):
    """The runner's deletion AUC is torchcam's metric on the same maps (softmax probability of the top class)."""
    from onnxcam.metrics import DeletionInsertionMetric
    from onnxcam.metrics.classification import softmax

    photos = sorted((files / "photos").iterdir())
    got = evaluate(files / "tiny.onnx", photos, ["gradcam"], ["deletion", "insertion"], steps=4, batch_size=2)
    pre = onnxcam.preprocess.resolve(tiny_model())
    x = np.stack([onnxcam.image.to_input(onnxcam.image.read_image(p), pre) for p in photos])
    maps = onnxcam.explain(tiny_model(), x, "gradcam", device="cpu").maps
    metric = DeletionInsertionMetric(tiny_model(), softmax, steps=4)
    metric.update(x, maps)
    want = metric.summary()
    assert got.scores["gradcam"]["deletion"] == pytest.approx(want["deletion_auc"], abs=1e-6)
    assert got.scores["gradcam"]["insertion"] == pytest.approx(want["insertion_auc"], abs=1e-6)


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--metric", "pointing"], 2, "Error: metric pointing needs --boxes FILE"),
    (["--steps", "0"], 2, "Error: Invalid value for '--steps': 0 is not in the range x>=1."),
    (["--metric", "accuracy"], 2, ("Error: Invalid value for '--metric': unknown metric accuracy; choose from "
                                  "deletion, insertion, road, pointing, energy, sanity")),
    (["--method", "nocam"], 2, "Error: Invalid value for '--method': unknown method nocam; choose from "),
    (["--layer", "flat"], 1, ("Error: layer 'flat' has shape (3, 12); CAM methods need a 4-D (N, C, h, w) "
                             "activation (give a reshape_transform for token or 3-D layouts)")),
])
def test_evaluate_bad_input_one_line(files, args, code, message):
    result = run("evaluate", files / "tiny.onnx", files / "photos", "--json", files / "bad.json", *args)
    assert result.exit_code == code, result.output
    assert result.output.splitlines()[-1].startswith(message)
    if code == 1:
        assert len(result.output.splitlines()) == 1
    assert not (files / "bad.json").exists()


def test_evaluate_library_errors(files):
    photos = sorted((files / "photos").iterdir())
    with pytest.raises(InputError, match=r"^metric pointing needs the objects' boxes \(a boxes JSON file\)$"):
        evaluate(files / "tiny.onnx", photos, ["gradcam"], ["pointing"])
    with pytest.raises(InputError, match=r"^steps \(the deletion/insertion perturbation count\) must be a positive"):
        evaluate(files / "tiny.onnx", photos, ["gradcam"], steps=0)
    (files / "partial.json").write_text(json.dumps({"a.png": [[0, 0, 4, 4]]}))
    with pytest.raises(InputError, match="the boxes file has no entry for image .*b.png"):
        evaluate(files / "tiny.onnx", photos, ["gradcam"], ["pointing"], boxes=files / "partial.json")
