"""`onnxcam explain` on a CTC text recognizer (onnxcam/tasks/run.py, task "ocr"): the decoded text, each character's
score and time steps in the JSON, the text line with each character's columns boxed, and one map for the whole string
plus one per character up to --top, each checked against float64 torch autograd.

The recognizer is tests/test_tasks_ocr.py's CRNN (smooth: tanh, average pooling, LSTM). The picture is the first
seeded random text line whose float64 decoding has three characters with every time step's best class ahead of the
next by a margin float32 keeps, so the CLI's float32 decoding is the float64 one by construction.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxcam
from onnxcam import image, preprocess
from onnxcam.cli import main
from onnxcam.pipeline import ImageFile
from onnxcam.tasks import ocr
from onnxcam.tasks.run import TaskRunner

torch = pytest.importorskip("torch")

from .test_tasks_ocr import _crnn, _reference

LINE_HW = (24, 48)  # the text line's own size (the model's input is 8 x 16): pictures are drawn at this size
NAMES = ["a", "b", "c", "d", "e"]  # the 5 characters of the 6 classes, without the blank (class 0)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _float64_scores(x: np.ndarray) -> np.ndarray:
    """The CRNN's float64 per-step scores of one input, (T, C)."""
    model, _, _ = _crnn()
    with torch.no_grad():
        scores = model.double()(torch.tensor(x, dtype=torch.float64)).numpy()[:, 0]
    model.float()
    return scores


def _raw_gradcam(x: np.ndarray, target) -> np.ndarray:
    """float64 Grad-CAM of a sequence target before ReLU at the CRNN's pooled strip (1, 16): the channels weighted
    by their spatially averaged gradients (torch autograd, a forward hook on the AvgPool)."""
    model, _, _ = _crnn()
    a, g = _reference(model, (x,), model.backbone[4], target.seed(_float64_scores(x))[:, None, :])
    return (g.mean(axis=(2, 3))[:, :, None, None] * a).sum(axis=1)[0]


TARGETS = [ocr.StringTarget()] + [ocr.CharacterTarget(k) for k in range(3)]


@functools.cache
def _line() -> tuple[bytes, np.ndarray]:
    """(PNG bytes of a text line, its model input (1, 1, 8, 16)) decoding to 3 characters away from ties, whose
    string's and characters' Grad-CAM maps are clearly positive somewhere (a map nowhere positive gets no picture)."""
    _, model_bytes, _ = _crnn()
    pre = preprocess.resolve(onnx.load_from_string(model_bytes))
    for seed in range(100):
        rgb = np.random.default_rng(seed).integers(0, 256, (*LINE_HW, 3), dtype=np.uint8)
        x = image.to_input(rgb, pre)[None]
        scores = _float64_scores(x)
        top2 = np.sort(scores, axis=1)[:, -2:]
        if len(ocr.greedy_decode(scores)) != 3 or (top2[:, 1] - top2[:, 0]).min() <= 1e-3:
            continue
        raws = [_raw_gradcam(x, t) for t in TARGETS]
        if all(r.max() > 0.05 * np.abs(r).max() > 0 for r in raws):
            return image.encode_png(rgb), x
    raise AssertionError("no seeded text line decodes to 3 characters away from ties with positive maps")


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    _, model_bytes, _ = _crnn()
    (tmp_path / "crnn.onnx").write_bytes(model_bytes)
    (tmp_path / "line.png").write_bytes(_line()[0])
    return tmp_path / "crnn.onnx", tmp_path / "line.png"


def test_cli_writes_text_characters_and_pictures(files, tmp_path):
    """Task read from the model (an LSTM before a 3-D score); the JSON's text, classes, time steps and scores are
    the float64 greedy decoding's; the string and the first --top characters get an overlay, the others none."""
    model, line = files
    (tmp_path / "chars.txt").write_text("\n".join(NAMES))
    result = run("explain", model, line, "--out", tmp_path / "o", "--top", "2", "--labels", tmp_path / "chars.txt")
    assert result.exit_code == 0, result.output
    scores = _float64_scores(_line()[1])
    chars = ocr.greedy_decode(scores)
    text = "".join(NAMES[c.category - 1] for c in chars)
    lines = result.output.splitlines()
    assert lines[0].startswith("Task ocr (decode ctc greedy") and "height collapsed to 1" in lines[0]
    assert lines[1].startswith(f"  line.png  ocr: {text!r} (") and lines[-1].startswith("Explained 1 of 1 images")
    record = json.loads((tmp_path / "o" / "line.json").read_text())
    assert (record["task"], record["text"], record["layout"], record["steps"]) == ("ocr", text, "TNC", 16)
    probs = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    got = record["characters"]
    assert [(c["class"], c["name"], c["steps"]) for c in got] == \
        [(c.category, NAMES[c.category - 1], list(c.steps)) for c in chars]
    for c, want in zip(got, chars):
        assert c["score"] == pytest.approx(probs[list(want.steps), want.category].mean(), abs=2e-6)
        assert c["box_image"] == [want.steps[0] * 3.0, 0.0, (want.steps[-1] + 1) * 3.0, 24.0]  # 48 px / 16 steps
    assert record["string"]["text"] == text and record["string"]["overlay"] == "line.gradcam.string.overlay.png"
    assert [c.get("overlay") for c in got] == ["line.gradcam.0.overlay.png", "line.gradcam.1.overlay.png", None]
    out = tmp_path / "o"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["line.json", "line.ocr.png", "line.gradcam.string.overlay.png", "line.gradcam.0.overlay.png",
         "line.gradcam.1.overlay.png"])
    for name in ("line.ocr.png", "line.gradcam.string.overlay.png", "line.gradcam.0.overlay.png"):
        picture = image.read_image(out / name)
        assert picture.shape[1:] == (48, 3) and picture.shape[0] > 24  # the line under a caption
    assert (out / "line.gradcam.0.overlay.png").read_bytes() != (out / "line.gradcam.1.overlay.png").read_bytes()


def test_maps_match_float64_torch(files, tmp_path):
    """Each map (the whole string, then each character) is Grad-CAM of that target's seed, at the automatic layer
    (the backbone's pooled strip), against float64 torch autograd with a forward hook."""
    model_path, line = files
    runner = TaskRunner(model_path, out=tmp_path / "o", top=5)
    result = runner.explain(ImageFile(line, Path("line")), write=False)
    assert not (tmp_path / "o").exists()
    x = _line()[1]
    layer = runner.layers[0]
    assert result.maps.shape == (4, 8, 16) and [i.get("position") for i in result.items] == [None, 0, 1, 2]
    for k, target in enumerate(TARGETS):
        want = _raw_gradcam(x, target)
        got = runner.cam.raw[layer][k]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert np.ptp(result.maps[k]) > 0.5  # a strip that varies along the text


def test_resume_skips_a_complete_line(files, tmp_path):
    model, line = files
    args = ("explain", model, line, "--out", tmp_path / "o", "--resume")
    assert "Explained 1 of 1 images" in run(*args).output
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()}
    again = run(*args)
    assert again.output.splitlines()[-1].startswith("Explained 0 of 1 images; 1 skipped (explained before)")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()} == stamps
    (tmp_path / "o" / "line.gradcam.1.overlay.png").unlink()  # a picture missing: explained again
    assert run(*args).output.splitlines()[-1].startswith("Explained 1 of 1 images")


def test_a_convolutional_ctc_head_needs_the_task(tmp_path):
    """A CTC head without a recurrent op is no recognizer the task rules can tell: one line naming task='ocr';
    --task ocr explains it."""
    from .test_tasks import ctc

    (tmp_path / "ctc.onnx").write_bytes(ctc())
    picture = tmp_path / "wide.png"
    picture.write_bytes(image.encode_png(np.random.default_rng(0).integers(0, 256, (32, 128, 3), dtype=np.uint8)))
    bad = run("explain", tmp_path / "ctc.onnx", picture, "--out", tmp_path / "b")
    assert bad.exit_code == 1 and len(bad.output.splitlines()) == 1
    assert bad.output.startswith("Error: cannot tell the task") and "'ocr'" in bad.output
    good = run("explain", tmp_path / "ctc.onnx", picture, "--out", tmp_path / "o", "--task", "ocr")
    assert good.exit_code == 0, good.output
    record = json.loads((tmp_path / "o" / "wide.json").read_text())
    assert (record["task"], record["layout"], record["steps"]) == ("ocr", "NTC", 32)


@pytest.mark.parametrize(("extra", "message"), [
    (("--labels", "{names}"), ("Error: 3 character names for a recognizer with 6 classes: give 6 names (the blank 0 "
                               "included) or 5 (the blank left out, as PaddleOCR's dictionaries do) (option --labels "
                               "FILE)")),
    (("--method", "gradcam,hirescam"), ("Error: task ocr explains with one method at a time (one picture per item); "
                                        "got gradcam, hirescam: run once per method (option --method)")),
    (("--method", "shapleycam"), ("Error: method shapleycam cannot explain a recognizer's sequence scores yet (its "
                                  "Hessian-vector product has no rule for the recurrent layer's loop); choose another "
                                  "method (option --method)")),
])
def test_bad_options_are_one_line(files, tmp_path, extra, message):
    model, line = files
    (tmp_path / "three.txt").write_text("a\nb\nc")
    extra = [e.format(names=tmp_path / "three.txt") for e in extra]
    result = run("explain", model, line, "--out", tmp_path / "o", *extra)
    assert result.exit_code == 1
    assert len(result.output.splitlines()) == 1 and result.output.startswith(message), result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_methods_with_runs_of_their_own_explain_the_decoded_string(files, tmp_path, method):
    """Methods that run the model on changed copies of the line (Score-CAM's masked inputs, Ablation-CAM's ablated
    layer) score the characters decoded from the line itself on every copy: the string's and each character's raw
    map (--save-raw) equal the API's on the same input with the same targets."""
    model, line = files
    result = run("explain", model, line, "--out", tmp_path / "o", "--method", method, "--save-raw", "--top", "2")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "o" / "line.json").read_text())
    x = _line()[1]
    cls = {"scorecam": onnxcam.ScoreCAM, "ablationcam": onnxcam.AblationCAM}[method]
    for target, item in zip(TARGETS[:3], [record["string"], *record["characters"][:2]]):
        cam = cls(str(model), device="cpu")
        cam(x, targets=[target])
        want = cam.raw[cam.target_layers[0]][0]
        got = np.load(tmp_path / "o" / item["raw"])["lowres_0"]
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
