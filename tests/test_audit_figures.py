"""tools/audit_figures.py on a tiny seeded net: every build is made and compared, the table has a row per build
whose numbers are the comparison's own figures, and the most divergent images' pictures are copied.

(onnxcam compare's figures themselves are proven in tests/test_compare.py; this checks the tool that puts the
README's edge-build table together.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxcam

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime.quantization")

TOOL = Path(__file__).resolve().parents[1] / "tools" / "audit_figures.py"
IMAGES = list(onnxcam.SAMPLE_IMAGES[:2])


def _tool():
    spec = importlib.util.spec_from_file_location("audit_figures", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_net() -> torch.nn.Module:
    """Two Conv+BN+ReLU stages and a 10-class head, seeded, with random BN statistics (not the identity)."""
    from tests.torch_models import _randomize_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    _randomize_batchnorm(net)
    return net.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tool = _tool()
    folder = tmp_path_factory.mktemp("tiny")
    builds = tool.build_all(tool.torch_fp32(_tiny_net(), folder / "fp32.onnx", size=32), IMAGES)
    result = tool.audit(builds, IMAGES, folder / "audit")
    return tool, folder, builds, result


def test_every_build_is_made_and_quantized(tiny):
    tool, _, builds, _ = tiny
    assert list(builds) == list(tool.BUILDS)
    ops = {b: {n.op_type for n in onnx.load(str(p)).graph.node} for b, p in builds.items()}
    assert "QuantizeLinear" in ops["int8 QDQ"] and "QLinearConv" not in ops["int8 QDQ"]
    assert "QLinearConv" in ops["int8 QOperator"]
    fp16 = onnx.load(str(builds["fp16"]))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 in and out


def test_table_has_a_row_per_build_with_the_comparisons_figures(tiny):
    tool, _, builds, result = tiny
    figs = tool.figures(result, builds)
    assert list(figs) == ["fp16", "int8 QDQ", "int8 QOperator"]
    lines = tool.table([("Tiny", figs)]).splitlines()
    assert lines[0] == tool.HEADER and len(lines) == 2 + 3
    for line, (build, f) in zip(lines[2:], figs.items()):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == f"Tiny {build}" and len(cells) == 8
        numbers = [float(v) for c in cells[1:] for v in c.split(" / ")]
        want = [f[k] for k in ("top1_mean", "top5_mean", "top5_worst", "pearson_mean", "pearson_worst",
                               "spearman_mean", "spearman_worst", "iou15_mean", "iou15_worst", "prob_diff_worst",
                               "peak_dist_worst")]
        np.testing.assert_allclose(numbers, want, atol=0.006)  # printed to 2..6 decimals
        for k in ("top1", "top5", "iou15", "prob_diff", "peak_dist"):
            assert 0.0 <= f[f"{k}_worst"] <= 1.0 and 0.0 <= f[f"{k}_mean"] <= 1.0, (build, k, f)
        for k in ("pearson", "spearman"):
            assert -1.0 <= f[f"{k}_worst"] <= f[f"{k}_mean"] <= 1.0, (build, k, f)
    rows = {(r["model"], r["image"]) for r in result.rows}
    assert len(rows) == 3 * len(IMAGES)  # every build against fp32, on every image


def test_most_divergent_images_ranked_and_pictured(tiny):
    tool, folder, builds, result = tiny
    worst = tool.most_divergent(result, builds, count=5)
    assert sorted(Path(e["image"]).name for e in worst) == sorted(p.name for p in IMAGES)
    int8 = [r for r in result.rows if r["model"] in (builds["int8 QDQ"].name, builds["int8 QOperator"].name)]
    assert worst[0]["pearson"] == min(r["pearson"] for r in int8)
    assert [e["pearson"] for e in worst] == sorted(e["pearson"] for e in worst)
    copied = tool.copy_pictures(worst[:1], folder / "audit")
    assert copied and all(p.is_file() and p.name.startswith("1-") for p in copied)
    assert "int8 diverges most" in tool.describe({"title": "Tiny", "worst": worst, "result": result})[0]
