"""onnxcam compare: agreement figures against hand-computed and scipy references, Lite0 fp32 against its fp16
build, a copy with its classes reordered (labels map them back), a damaged copy (caught by --fail-under), one
ResNet-18 through two exporters, bad input in one line each, and the HTML report in headless Chromium."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import onnxcam
from onnxcam import image, preprocess
from onnxcam.audit.compare import Comparison, map_figures, prediction_figures
from onnxcam.cli import COMPARE_BELOW, main
from tests.test_edge_formats import fp16

FP16_MIN = 0.99       # Lite0 fp16 vs fp32: measured Pearson >= 0.9999 on the bundled photos
DAMAGED_MAX = 0.9     # the damaged head: measured worst Pearson 0.61 (mean 0.79)


# ---- figures -----------------------------------------------------------------------------------------------------
def test_map_figures_by_hand():
    a = np.zeros((10, 10))
    a[2, 3] = 1.0
    b = np.zeros((10, 10))
    b[8, 9] = 1.0
    same = map_figures(a, a)
    assert same == {"pearson": 1.0, "spearman": 1.0, "iou15": 1.0, "peak_dist": 0.0}
    f = map_figures(a, b)
    assert f["peak_dist"] == pytest.approx(np.hypot(6, 6) / np.hypot(10, 10))
    assert f["pearson"] == pytest.approx(-1 / 99)  # two one-hot vectors of 100: cov -1/100^2, var 99/100^2
    ramp = np.arange(100, dtype=np.float64).reshape(10, 10)
    r = map_figures(ramp, ramp[::-1, ::-1].copy())  # the same values, order reversed
    assert r["spearman"] == pytest.approx(-1.0) and r["pearson"] == pytest.approx(-1.0)
    assert r["iou15"] == 0.0  # the top 15 pixels of one are the bottom 15 of the other
    shifted = map_figures(ramp, ramp + 5.0)
    assert shifted["pearson"] == pytest.approx(1.0) and shifted["iou15"] == 1.0
    assert map_figures(np.zeros((4, 4)), np.zeros((4, 4)))["pearson"] == 1.0  # a zero map agrees with itself only
    assert map_figures(np.zeros((4, 4)), ramp[:4, :4])["pearson"] == 0.0


def test_spearman_with_ties_is_scipys():
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(0)
    a = np.round(rng.random((16, 16)), 1)  # many ties
    b = np.round(a + 0.3 * rng.random((16, 16)), 1)
    f = map_figures(a, b)
    assert f["spearman"] == pytest.approx(spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)
    assert f["pearson"] == pytest.approx(pearsonr(a.ravel(), b.ravel())[0], abs=1e-12)


def test_prediction_figures_through_a_class_map():
    pa = np.array([0.5, 0.2, 0.1, 0.08, 0.07, 0.05])
    perm = np.array([5, 4, 3, 2, 1, 0])  # first model's class c is the other's perm[c]
    pb = pa[np.argsort(perm)]
    assert prediction_figures(pa, pb, perm) == {"top1": 1.0, "top5": 1.0, "prob_diff": 0.0}
    pc = pb.copy()
    pc[[5, 4]] = pc[[4, 5]]  # the other's top-1 flips to the first's second class
    f = prediction_figures(pa, pc, perm)
    assert f["top1"] == 0.0 and f["top5"] == 1.0 and f["prob_diff"] == pytest.approx(0.3)


def test_fail_under_checks_every_agreement_figure():
    rows = [{"top1": 1.0, "top5": 1.0, "pearson": 0.95, "spearman": 0.97, "iou15": 0.5},
            {"top1": 1.0, "top5": 1.0, "pearson": 0.85, "spearman": 0.99, "iou15": 0.95}]
    c = Comparison(models=[], methods=["gradcam"], rows=rows)
    assert [r["below"] for r in c.below(0.9)] == [["iou15"], ["pearson"]]
    assert c.below(0.5) == []


# ---- models ------------------------------------------------------------------------------------------------------
def _save(proto: onnx.ModelProto, path: Path) -> str:
    onnx.save(proto, str(path))
    return str(path)


def _set(proto: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    init = next(i for i in proto.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(init).dtype), name))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    lite0 = onnx.load(str(onnxcam.BUNDLED_MODEL))
    paths = {"fp32": str(onnxcam.BUNDLED_MODEL), "fp16": _save(fp16(lite0, keep_io_types=True), folder / "fp16.onnx")}
    # One layer's weights perturbed: the head convolution, seeded noise twice the weights' own spread.
    damaged = onnx.ModelProto()
    damaged.CopyFrom(lite0)
    head = [n for n in lite0.graph.node if n.op_type == "Conv"][-1].input[1]  # /_conv_head/Conv's weights
    w = numpy_helper.to_array(next(i for i in lite0.graph.initializer if i.name == head))
    _set(damaged, head, w + np.random.default_rng(1).normal(0, 2 * w.std(), w.shape))
    paths["damaged"] = _save(damaged, folder / "damaged.onnx")
    # The same model with its classes in reversed order, and its labels reversed with them.
    rev = onnx.ModelProto()
    rev.CopyFrom(lite0)
    for name in ("_fc.weight", "_fc.bias"):
        _set(rev, name, numpy_helper.to_array(next(i for i in lite0.graph.initializer if i.name == name))[::-1])
    labels = preprocess.labels_from_metadata(lite0)
    next(p for p in rev.metadata_props if p.key == preprocess.LABELS_KEY).value = json.dumps(labels[::-1])
    paths["reversed"] = _save(rev, folder / "reversed.onnx")
    # 500 classes and no class names.
    cut = onnx.ModelProto()
    cut.CopyFrom(lite0)
    for name in ("_fc.weight", "_fc.bias"):
        _set(cut, name, numpy_helper.to_array(next(i for i in lite0.graph.initializer if i.name == name))[:500])
    cut.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 500
    keep = [p for p in cut.metadata_props if p.key != preprocess.LABELS_KEY]
    del cut.metadata_props[:]
    cut.metadata_props.extend(keep)
    paths["500"] = _save(cut, folder / "classes500.onnx")
    return paths


def _compare(*args):
    return CliRunner().invoke(main, ["compare", *map(str, args)])


@pytest.fixture(scope="module")
def audit(models, tmp_path_factory):
    """fp32 vs fp16 vs damaged on the 4 bundled photos, gradcam and hirescam, --fail-under 0.9."""
    out = tmp_path_factory.mktemp("audit")
    result = _compare(models["fp32"], models["fp16"], models["damaged"], *onnxcam.SAMPLE_IMAGES, "--out", out,
                      "--method", "gradcam,hirescam", "--fail-under", DAMAGED_MAX, "--device", "cpu")
    return result, out, json.loads((out / "report.json").read_text())


# ---- the comparison ----------------------------------------------------------------------------------------------
def test_fp16_agrees_with_fp32(audit):
    _, _, report = audit
    rows = [r for r in report["rows"] if r["model"] == "fp16.onnx"]
    assert len(rows) == 4 * 2
    assert all(r["top1"] == 1.0 for r in rows)
    assert min(r["pearson"] for r in rows) >= FP16_MIN, rows


def test_damaged_copy_is_caught(audit):
    result, _, report = audit
    damaged = [r for r in report["rows"] if r["model"] == "damaged.onnx"]
    assert min(r["pearson"] for r in damaged) < DAMAGED_MAX
    assert result.exit_code == COMPARE_BELOW, result.output
    assert "below --fail-under" in result.output and "damaged.onnx" in result.output
    assert report["below"] > 0 and all(r["model"] == "damaged.onnx" for r in _below(report, DAMAGED_MAX))
    # the most divergent images first
    agreement = [im["agreement"] for im in report["images"]]
    assert agreement == sorted(agreement)


def _below(report, threshold):
    figures = report["agreement_figures"]
    return [r for r in report["rows"] if any(r[f] < threshold for f in figures)]


def test_outputs_are_written(audit):
    _, out, report = audit
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(report["rows"]) == 4 * 2 * 2  # images x methods x pairs
    assert [m["name"] for m in report["models"]] == ["efficientnet_lite0.onnx", "fp16.onnx", "damaged.onnx"]
    assert all(m["hash"] and m["opsets"] and m["layers"] for m in report["models"])
    for im in report["images"]:
        assert len(im["pictures"]) == 2
        h, w = image.read_image(im["image"]).shape[:2]
        for p in im["pictures"]:
            pic = image.read_image(out / p)
            assert pic.shape[1] == 6 * round(w * 224 / h)  # image, 3 overlays, 2 differences side by side
    html = (out / "report.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    assert html.count("class='image-row") == 4


def test_fp16_passes_fail_under(models, tmp_path):
    result = _compare(models["fp32"], models["fp16"], onnxcam.SAMPLE_IMAGES[0], "--out", tmp_path,
                      "--fail-under", FP16_MIN, "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_classes_are_mapped_through_labels(models, tmp_path):
    result = _compare(models["fp32"], models["reversed"], *onnxcam.SAMPLE_IMAGES[:2], "--out", tmp_path,
                      "--fail-under", 0.999, "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert all(r["class_in_model"] == 999 - r["class"] and r["top1"] == 1.0 for r in rows)
    assert min(r["pearson"] for r in rows) > 0.999


def test_a_given_target_is_explained_by_every_model(models, tmp_path):
    result = _compare(models["fp32"], models["reversed"], onnxcam.SAMPLE_IMAGES[1], "--out", tmp_path,
                      "--target", "espresso", "--device", "cpu")
    assert result.exit_code == 0, result.output
    (row,) = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert (row["class"], row["class_in_model"]) == (967, 999 - 967)


def test_two_exporters_agree(tmp_path):
    """The same seeded ResNet-18 through the TorchScript and the dynamo exporters: each graph with its own layer
    names and automatic layer; the same predictions and maps (Pearson >= 0.99) on every photo."""
    torch = pytest.importorskip("torch")
    from tests.torch_models import export, make_model

    model = make_model("resnet18", seed=0)
    scripted = tmp_path / "torchscript.onnx"
    scripted.write_bytes(export(model, torch.zeros(1, 3, 224, 224), "torchscript"))
    dynamo = export(model, torch.zeros(1, 3, 224, 224), "dynamo")
    # By construction, not by rounding luck: the top-1 margins (float64 torch) are far above float32 error.
    pre = preprocess.resolve(onnx.load(str(scripted)))
    x = np.stack([image.to_input(image.read_image(p), pre) for p in onnxcam.SAMPLE_IMAGES])
    with torch.no_grad():
        logits = model.double()(torch.from_numpy(x).double()).numpy()
    top2 = np.sort(logits, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, top2
    out = tmp_path / "out"
    result = _compare(scripted, dynamo, *onnxcam.SAMPLE_IMAGES, "--out", out, "--method", "gradcam,hirescam",
                      "--fail-under", 0.99, "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    layers = [m["layers"] for m in report["models"]]
    assert layers[0] != layers[1], layers  # each exporter's own name for the last ReLU
    assert len(report["rows"]) == 8 and all(r["top1"] == 1.0 and r["pearson"] >= 0.99 for r in report["rows"])


KERAS = Path(__file__).parent / "fixtures" / "keras"


def test_keras_exporters_agree(tmp_path):
    """custom_cnn (seeded weights) through tf2onnx and through Keras' model.export: the same predictions and maps
    (every agreement figure >= 0.99) on every photo, at the model's own 32x32 NHWC input. Each graph's automatic
    layer is its Transpose of c4's ReLU back to NHWC (its own name in each graph)."""
    models = [KERAS / "custom_cnn.onnx", KERAS / "custom_cnn_keras_export.onnx"]
    images = []
    for p in onnxcam.SAMPLE_IMAGES:  # images of the input's size: no resizing differences to speak of
        images.append(tmp_path / f"{p.stem}.png")
        images[-1].write_bytes(image.encode_png(cv2.resize(image.read_image(p), (32, 32), interpolation=cv2.INTER_AREA)))
    # By construction: the two graphs' probabilities agree to float32 error, and the top-2 margins are far above it.
    pre = preprocess.resolve(onnx.load(str(models[0])))
    x = np.stack([image.to_input(image.read_image(p), pre) for p in images])
    probs = [ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0] for m in models]
    assert np.abs(probs[0] - probs[1]).max() < 1e-6
    top2 = np.sort(probs[0], axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, top2
    out = tmp_path / "out"
    result = _compare(*models, *images, "--out", out, "--method", "gradcam,hirescam", "--fail-under", 0.99,
                      "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    for m, info in zip(models, report["models"]):
        (layer,) = info["layers"]
        node = next(n for n in onnx.load(str(m)).graph.node if layer in n.output)
        assert (node.op_type, list(node.input)) == ("Transpose", ["custom_cnn_1/c4_1/Relu:0"])
    rows = report["rows"]
    assert len(rows) == 4 * 2 and all(r["top1"] == 1.0 for r in rows)
    assert min(min(r["pearson"], r["spearman"], r["iou15"]) for r in rows) >= 0.99, rows
    # not agreement by default: the second graph explained at its first convolution's ReLU does not agree
    early = _compare(*models, *images, "--out", tmp_path / "early", "--layer", "2=custom_cnn_1/c1_1/Relu:0",
                     "--fail-under", 0.99, "--device", "cpu")
    assert early.exit_code == COMPARE_BELOW, early.output


# ---- a model that overflows float16 on one image -----------------------------------------------------------------
OVERFLOW = 10000.0  # 1x1 convolution weights: an output overflows float16 (65504) where |channel sum| > 6.55


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 1x1 convolution (filters +-OVERFLOW x the channel sum, and two channel differences), ReLU, global average
    pooling, a small linear head; its fp16 build; a dark picture and the same with a white square, whose channel
    sum (7.32 after the ImageNet normalization) overflows float16 at the convolution, where the dark one's stays
    below 3.7."""
    folder = tmp_path_factory.mktemp("tiny")
    w1 = np.zeros((4, 3, 1, 1), np.float32)
    w1[:, :, 0, 0] = OVERFLOW * np.array([[1, 1, 1], [-1, -1, -1], [1, -1, 0], [0, 1, -1]], np.float32)
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["pre"]), helper.make_node("Relu", ["pre"], ["act"]),
         helper.make_node("GlobalAveragePool", ["act"], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], transB=1)], "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(0, 1e-4, (10, 4)).astype(np.float32), "w2"),
         numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "b2")])
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    paths = {"fp32": _save(fp32, folder / "fp32.onnx"), "fp16": _save(fp16(fp32, keep_io_types=True),
                                                                        folder / "fp16.onnx")}
    yy, xx = np.mgrid[0:48, 0:64]
    dark = np.stack([40 + 60 * (xx / 63), 30 + 80 * (yy / 47), 60 + 50 * np.sin(xx / 7.0) ** 2], -1).astype(np.uint8)
    bright = dark.copy()
    bright[10:30, 20:44] = 255
    pre = preprocess.resolve(fp32)
    for name, rgb in (("dark", dark), ("bright", bright)):
        paths[name] = folder / f"{name}.png"
        paths[name].write_bytes(image.encode_png(rgb))
        top = np.abs(np.tensordot(w1[:, :, 0, 0], image.to_input(rgb, pre), 1)).max()  # the convolution's output
        assert (top > 65504) == (name == "bright"), (name, top)
    return paths


def test_an_image_one_model_cannot_explain_is_listed_and_the_rest_reported(tiny, tmp_path):
    out = tmp_path / "out"
    result = _compare(tiny["fp32"], tiny["fp16"], tiny["dark"], tiny["bright"], "--out", out, "--device", "cpu")
    assert result.exit_code == 1
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error")]
    assert line.startswith(f"Error: {tiny['bright']} with model fp16.onnx: the activation of layer 'act' holds Inf")
    assert "overflows" in line
    report = json.loads((out / "report.json").read_text())
    assert [im["image"] for im in report["images"]] == [str(tiny["dark"])]
    (failure,) = report["failures"]
    assert (failure["image"], failure["model"]) == (str(tiny["bright"]), "fp16.onnx") and "Inf" in failure["error"]
    (row,) = report["rows"]  # the dark image: the fp16 build agrees
    assert row["top1"] == 1.0 and row["pearson"] > 0.999
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["image"], r["model"], bool(r["error"])) for r in rows] == [
        (str(tiny["dark"]), "fp16.onnx", False), (str(tiny["bright"]), "fp16.onnx", True)]
    page = (out / "report.html").read_text()
    assert re.search(r"<ul id='failures'><li>[^<]*bright.png with fp16.onnx: the activation", page)
    assert page.count("class='image-row") == 1


def test_pictures_carry_their_labels_or_are_bare(tiny, tmp_path):
    """The labelled picture is the bare one under a caption band naming the image, method and class, and per model
    its prediction, the explained class's probability and the layer (drawn by image.caption: compared pixel for
    pixel with the band drawn from report.json's values)."""
    runs = {}
    for how in ("labelled", "bare"):
        out = tmp_path / how
        result = _compare(tiny["fp32"], tiny["fp16"], tiny["dark"], "--out", out, "--device", "cpu",
                          *(["--bare"] if how == "bare" else []))
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        (im,) = report["images"]
        runs[how] = image.read_image(out / im["pictures"][0])
    (row,) = report["rows"]
    models, preds = report["models"], im["predictions"]
    columns = [["dark.png", f"gradcam for {row['label']}"]]
    columns += [[m["name"], f"top-1 {p['label']} {p['score']:.2f}", f"explains {score:.2f}", f"@ {m['layers'][0]}"]
                for m, p, score in zip(models, preds, (row["score_first"], row["score_model"]))]
    columns.append(["|map - fp32.onnx|", "fp16.onnx"])
    assert runs["bare"].shape[0] == 224
    assert np.array_equal(runs["labelled"], image.caption(runs["bare"], columns))


def test_evaluations_are_shown_in_the_report(tiny, tmp_path):
    from onnxcam.evaluate import evaluate, write_json

    path = tmp_path / "evaluation.json"
    write_json(path, evaluate(tiny["fp32"], [tiny["dark"]], methods=("gradcam", "hirescam"),
                              metrics=("deletion", "insertion"), steps=4))
    out = tmp_path / "out"
    result = _compare(tiny["fp32"], tiny["fp16"], tiny["dark"], "--out", out, "--device", "cpu",
                      "--evaluate", path, "--evaluate", f"2={path}")  # found by its model's path; given for model 2
    assert result.exit_code == 0, result.output
    record = json.loads(path.read_text())
    report = json.loads((out / "report.json").read_text())
    assert report["evaluations"] == {"fp32.onnx": record, "fp16.onnx": record}
    page = (out / "report.html").read_text()
    assert "<h2>Evaluation of fp32.onnx</h2>" in page and "<h2>Evaluation of fp16.onnx</h2>" in page
    scores = record["scores"]["hirescam"]
    assert (f"<tr><td>hirescam</td><td class='num'>{scores['deletion']:.4f}</td><td class='num'>"
            f"{scores['insertion']:.4f}</td></tr>") in page
    assert "deletion (lower is better)" in page
    other = tmp_path / "other.json"
    other.write_text(path.read_text().replace(str(tiny["fp32"]), "/elsewhere/model.onnx"))
    for bad, message in ((other, "is of /elsewhere/model.onnx, which is none of the compared models"),
                         (tiny["dark"], f"cannot read the evaluation {tiny['dark']}")):
        result = _compare(tiny["fp32"], tiny["fp16"], tiny["dark"], "--out", out, "--evaluate", bad)
        assert result.exit_code == 1
        (line,) = [x for x in result.output.splitlines() if x.startswith("Error")]
        assert message in line


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_different_classes_without_names(models, tmp_path):
    result = _compare(models["fp32"], models["500"], onnxcam.SAMPLE_IMAGES[0], "--out", tmp_path)
    assert result.exit_code == 1
    assert "Error: model classes500.onnx has 500 classes and the first model 1000" in result.output


def test_a_model_that_cannot_be_explained(models, tmp_path):
    result = _compare(models["fp32"], models["fp16"], onnxcam.SAMPLE_IMAGES[0], "--out", tmp_path,
                      "--layer", "2=no_such_tensor")
    assert result.exit_code == 1
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error")]
    assert line.startswith(f"Error: model 2 ({models['fp16']}):") and "no_such_tensor" in line


def test_a_size_one_model_cannot_take(models, tmp_path):
    result = _compare(models["fp32"], models["fp16"], onnxcam.SAMPLE_IMAGES[0], "--out", tmp_path, "--size",
                      "2=300x300")
    assert result.exit_code == 1
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error")]
    assert line.startswith(f"Error: model 2 ({models['fp16']}):") and "300x300" in line and "224x224" in line


def test_an_unreadable_image_is_listed_and_the_rest_reported(models, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    out = tmp_path / "out"
    result = _compare(models["fp32"], models["fp16"], broken, onnxcam.SAMPLE_IMAGES[0], "--out", out)
    assert result.exit_code == 1
    assert any(x.startswith("Error:") and "broken.png" in x for x in result.output.splitlines())
    report = json.loads((out / "report.json").read_text())
    assert len(report["images"]) == 1 and report["failures"][0]["image"] == str(broken)
    assert "broken.png" in (out / "report.html").read_text()


def test_bad_options(models, tmp_path):
    result = _compare(models["fp32"], onnxcam.SAMPLE_IMAGES[0], "--out", tmp_path)
    assert result.exit_code == 2 and "at least two models" in result.output
    result = _compare(models["fp32"], models["fp16"], onnxcam.SAMPLE_IMAGES[0], "--out", tmp_path, "--layout",
                      "3=nhwc")
    assert result.exit_code == 2 and "there is no model 3" in result.output


# ---- the page in a browser ---------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def page_dom(browser: str, url: str) -> str:
    """The page's DOM after its scripts ran (and its images loaded), from headless Chromium."""
    return subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=5000",
                           "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian's chromium package; .ci/run "
                                             "installs it)")
def test_report_in_a_browser(audit, tmp_path):
    browser = CHROMIUM
    _, out, report = audit
    url = (out / "report.html").resolve().as_uri()
    for key in ("name", "-agreement", "agreement"):
        dom = page_dom(browser, f"{url}#sort={key}")
        body = re.search(r"<body([^>]*)>", dom).group(1)
        assert f'data-sorted="{key}"' in body, body
        n = len(report["images"]) * 2
        assert f'data-images-loaded="{n}"' in body and f'data-images="{n}"' in body, body
        names = re.findall(r'<tr class="image-row[^"]*" data-name="([^"]*)"', dom)
        agreement = [float(a) for a in re.findall(r'<tr class="image-row[^"]*" data-name="[^"]*" '
                                                   r'data-agreement="([^"]*)"', dom)]
        assert len(names) == len(agreement) == 4
        if key == "name":
            assert names == sorted(names)
        else:
            assert agreement == sorted(agreement, reverse=key.startswith("-"))
    assert_not_blank(screenshot(browser, url, tmp_path / "shot.png"))


def screenshot(browser: str, url: str, path: Path) -> np.ndarray:
    """The page as headless Chromium draws it (1200 x 1600), as uint8 RGB, once its scripts ran and its images
    loaded (the virtual time budget, as page_dom: without it the shot may come before the pictures are drawn)."""
    subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--window-size=1200,1600",
                    "--virtual-time-budget=5000", f"--screenshot={path}", url], capture_output=True, timeout=120,
                   check=True)
    return image.read_image(path)


def assert_not_blank(pixels: np.ndarray) -> None:
    # not blank: text, tables, pictures. The compare report's first screen (title, tables, plots; its pictures are
    # below the fold) has ~4.9% dark pixels, a blank page none, a title alone well under 1%.
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.02
