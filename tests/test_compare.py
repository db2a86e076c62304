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

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

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
            assert pic.shape[1] == 6 * round(w * min(h, 224) / h)  # image, 3 overlays, 2 differences side by side
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


def _dom(browser: str, url: str) -> str:
    return subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=5000",
                           "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian's chromium package; .ci/run "
                                             "installs it)")
def test_report_in_a_browser(audit, tmp_path):
    browser = CHROMIUM
    _, out, report = audit
    url = (out / "report.html").resolve().as_uri()
    for key in ("name", "-agreement", "agreement"):
        dom = _dom(browser, f"{url}#sort={key}")
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
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--window-size=1200,1600",
                    f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    pixels = image.read_image(shot)
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.05  # not blank: text, tables, pictures
