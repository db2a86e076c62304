"""`onnxcam explain --task detect|segment|ocr` honours or refuses every option of explain, never ignores one
(onnxcam/tasks/run.py): --bare, --save-raw, --target, --batch-size, and one line for the options a task has no use
for (--conf and --decode outside detect, --target for ocr, --report, a classifier given task options).

The models are the small seeded ones of tests/test_tasks.py (TinyYolo, TinySeg) and tests/test_cli_ocr.py (the CRNN
and its text line). The maps are compared with TaskRunner.explain's: both are the same float32 computation, so they
are equal exactly; their correctness against float64 torch is tested in those modules.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import onnxcam
from onnxcam import image
from onnxcam.cli import main
from onnxcam.pipeline import ImageFile
from onnxcam.tasks.run import TaskRunner

torch = pytest.importorskip("torch")

from .test_cli_ocr import _line
from .test_tasks import TinySeg, _export, _write, yolo
from .test_tasks_ocr import _crnn

PHOTO = onnxcam.SAMPLE_IMAGES[0]
NAMES = ["cat", "dog", "cup"]
# per task: what a run is given besides the model and the picture (the detector explains its 2 best detections,
# the segmenter its 2 classes present: seed 2 gives classes 1 and 2 on the photo; the recognizer its whole string
# and its 3 characters)
ARGS = {"detect": ["--conf", "0", "--top", "2"], "segment": ["--top", "2"], "ocr": []}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@functools.cache
def _segmenter() -> bytes:
    torch.manual_seed(2)
    return _export(TinySeg(3).eval(), torch.randn(1, 3, 32, 32), "out", dynamic=False)


def _files(task: str, tmp_path: Path) -> tuple[Path, Path]:
    """(model, picture) of a task, written into tmp_path."""
    if task == "detect":
        return Path(_write(tmp_path, "yolo.onnx", yolo()[1], NAMES)), PHOTO
    if task == "segment":
        return Path(_write(tmp_path, "seg.onnx", _segmenter(), NAMES)), PHOTO
    (tmp_path / "crnn.onnx").write_bytes(_crnn()[1])
    (tmp_path / "line.png").write_bytes(_line()[0])
    return tmp_path / "crnn.onnx", tmp_path / "line.png"


def _record(out: Path, picture: Path) -> dict:
    return json.loads((out / f"{picture.stem}.json").read_text())


def _items(record: dict) -> list[dict]:
    from onnxcam.tasks.run import record_items

    return record_items(record)


def _last(result) -> str:
    return result.output.strip().splitlines()[-1]


# ---- --bare ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["detect", "segment", "ocr"])
def test_bare_pictures_are_the_captioned_ones_image_area(task, tmp_path):
    """Each item's overlay carries a caption band (what it explains, the method and layer) unless --bare, and the
    bare picture is the captioned one's image area pixel for pixel; a recognizer's text line loses its band too.
    --resume tells the two apart: a run that differs only in --bare explains the image again."""
    model, picture = _files(task, tmp_path)
    h, w = image.read_image(picture).shape[:2]
    for how in ("captioned", "bare"):
        result = run("explain", model, picture, "--out", tmp_path / how, *ARGS[task],
                     *(["--bare"] if how == "bare" else []))
        assert result.exit_code == 0, result.output
    records = {how: _record(tmp_path / how, picture) for how in ("captioned", "bare")}
    overlays = [i["overlay"] for i in _items(records["bare"]) if i.get("overlay")]
    assert len(overlays) == {"detect": 2, "segment": 2, "ocr": 4}[task]
    assert overlays == [i["overlay"] for i in _items(records["captioned"]) if i.get("overlay")]
    task_picture = records["bare"]["picture"]
    for name in overlays + ([task_picture] if task == "ocr" else []):
        captioned = image.read_image(tmp_path / "captioned" / name)
        bare = image.read_image(tmp_path / "bare" / name)
        assert bare.shape == (h, w, 3), name  # the image's own size
        assert captioned.shape[1:] == (w, 3) and captioned.shape[0] > h, name  # a band of text above it
        band = captioned[:captioned.shape[0] - h]
        assert (band < 128).any() and (band == 255).mean() > 0.5, name  # dark text on white
        np.testing.assert_array_equal(captioned[-h:], bare, err_msg=name)
    if task != "ocr":  # all boxes or outlines, drawn on the image: no band either way
        assert (tmp_path / "bare" / task_picture).read_bytes() == (tmp_path / "captioned" / task_picture).read_bytes()
    assert (records["captioned"]["captioned"], records["bare"]["captioned"]) == (True, False)
    again = [model, picture, "--out", tmp_path / "bare", *ARGS[task], "--resume"]
    assert _last(run("explain", *again, "--bare")).startswith("Explained 0 of 1 images; 1 skipped")
    assert _last(run("explain", *again)).startswith("Explained 1 of 1 images;")  # captioned now: not the same
    assert _record(tmp_path / "bare", picture)["captioned"] is True


# ---- --save-raw ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["detect", "segment", "ocr"])
def test_save_raw_writes_each_items_arrays(task, tmp_path):
    """--save-raw writes one .npz per item, named in the JSON: the map TaskRunner.explain returns, the method's
    low-resolution map of that run, the layer's activations and the item's gradients, the image's explained output,
    the class, the item's JSON and its box (detect, ocr) or mask (segment)."""
    model, picture = _files(task, tmp_path)
    result = run("explain", model, picture, "--out", tmp_path / "o", *ARGS[task], "--save-raw")
    assert result.exit_code == 0, result.output
    record = _record(tmp_path / "o", picture)
    items = _items(record)
    options = {"detect": {"conf": 0, "top": 2}, "segment": {"top": 2}, "ocr": {}}[task]
    runner = TaskRunner(model, out=tmp_path / "unused", **options)
    want = runner.explain(ImageFile(picture, Path(picture.stem)), write=False)
    layer = runner.layers[0]
    assert len(items) == len(want.maps) == {"detect": 2, "segment": 2, "ocr": 4}[task]
    grads = []
    for k, item in enumerate(items):
        number = k if task != "ocr" else "string" if k == 0 else k - 1  # a recognizer's string comes first
        assert item["raw"] == f"{picture.stem}.gradcam.{number}.npz"
        with np.load(tmp_path / "o" / item["raw"]) as npz:
            raw = dict(npz)
        np.testing.assert_array_equal(raw["map"], want.maps[k])
        np.testing.assert_array_equal(raw["lowres_0"], runner.cam.raw[layer][k])  # one run: batch_size 8
        np.testing.assert_array_equal(raw["activations_0"], runner.cam.result.activations[layer][k])
        np.testing.assert_array_equal(raw["gradients_0"], runner.cam.result.gradients[layer][k])
        grads.append(raw["gradients_0"])
        assert list(raw["layers"]) == runner.layers and json.loads(str(raw["item"])) == item
        assert int(raw["target"]) == item.get("label", item.get("class", -1))
        if task == "segment":
            assert raw["mask"].dtype == bool and raw["mask"].shape == raw["logits"].shape[1:] and raw["mask"].any()
            assert raw["logits"].shape == (3, 32, 32)
        else:  # a recognizer's whole string has no box
            assert list(raw.get("box", [])) == item.get("box_image", [])
    assert not np.array_equal(grads[0], grads[1])  # each item's own seed
    again = [model, picture, "--out", tmp_path / "o", *ARGS[task], "--resume"]
    assert _last(run("explain", *again, "--save-raw")).startswith("Explained 0 of 1 images; 1 skipped")
    (tmp_path / "o" / items[-1]["raw"]).unlink()  # an array file missing: explained again
    assert _last(run("explain", *again, "--save-raw")).startswith("Explained 1 of 1 images;")


# ---- --target --------------------------------------------------------------------------------------------------
def test_detect_target_keeps_the_classes_given(tmp_path):
    """--target cat: the 2 best detections of class cat (0), those of the unrestricted decoding of that class
    (the photo's best detections are cups: ignoring the option would explain cups)."""
    model, picture = _files("detect", tmp_path)
    every = TaskRunner(model, conf=0, top=100, out=tmp_path / "unused")
    found = every.explain(ImageFile(picture, Path(picture.stem)), write=False).items
    assert found[0]["label"] == 2 and any(d["label"] == 0 for d in found)
    result = run("explain", model, picture, "--out", tmp_path / "o", *ARGS["detect"], "--target", "cat")
    assert result.exit_code == 0, result.output
    record = _record(tmp_path / "o", picture)
    got = [(d["label"], d["anchor"], d["score"]) for d in record["detections"]]
    assert got == [(d["label"], d["anchor"], d["score"]) for d in found if d["label"] == 0][:2]
    assert record["target"] == "0" and "; target cat; layer" in result.output.splitlines()[0]


def test_segment_target_explains_the_classes_given(tmp_path):
    """--target cup: the class cup alone, with the pixels it wins (the largest class, dog, is left out: ignoring the
    option would explain it first)."""
    model, picture = _files("segment", tmp_path)
    assert run("explain", model, picture, "--out", tmp_path / "every", "--top", "5").exit_code == 0
    every = _record(tmp_path / "every", picture)["classes"]
    assert [c["class"] for c in every] == [1, 2]  # dog, then cup (fewer pixels)
    result = run("explain", model, picture, "--out", tmp_path / "o", "--target", "cup")
    assert result.exit_code == 0, result.output
    record = _record(tmp_path / "o", picture)
    assert [(c["class"], c["name"], c["pixels"]) for c in record["classes"]] == [(2, "cup", every[1]["pixels"])]
    assert record["target"] == "2"


@pytest.mark.parametrize(("task", "extra", "message"), [
    ("detect", ("--target", "top2"), ("Error: target 'top2' ranks a classifier's classes; task detect explains its "
                                      "`top` best detections: give top=2, or class numbers or names to keep (option "
                                      "--target)")),
    ("detect", ("--target", "7"), ("Error: target class 7 is out of range: output 'output0' has 3 classes (0 to 2) "
                                   "(option --target)")),
    ("segment", ("--target", "zebra"), ("Error: target 'zebra' is neither topK, a class number nor a class name "
                                        "(option --target)")),
    ("ocr", ("--target", "1"), ("Error: target '1' chooses classes; a recognizer explains the whole string and its "
                                "first `top` characters: task ocr does not use it; leave it out (option --target)")),
    ("segment", ("--conf", "0.5"), ("Error: conf 0.5 is a detection's score threshold: task segment does not use it; "
                                    "leave it out (option --conf)")),
    ("ocr", ("--task", "ocr", "--decode", "yolov8"), ("Error: decode 'yolov8' is a detection head's layout: task ocr "
                                                      "does not use it; leave it out (option --decode)")),
    ("detect", ("--report",), ("Error: report draws a classifier's maps per class; task detect has none (its pictures "
                               "are <name>.detect.png and one overlay per item) (option --report)")),
    ("segment", ("--heatmap",), ("Error: heatmap writes a classifier's maps alone; task segment writes "
                                 "<name>.segment.png and one overlay per item (save_raw keeps each item's map values) "
                                 "(option --heatmap)")),
])
def test_options_a_task_has_no_use_for_are_one_line(task, extra, message, tmp_path):
    model, picture = _files(task, tmp_path)
    result = run("explain", model, picture, "--out", tmp_path / "o", *extra)
    assert result.exit_code == 1, result.output
    assert result.output.strip() == message
    assert not (tmp_path / "o").exists()


def test_a_classifier_refuses_task_options(tmp_path):
    result = run("explain", onnxcam.BUNDLED_MODEL, PHOTO, "--out", tmp_path / "o", "--task", "classify", "--conf",
                 "0.5", "--top", "2")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"Error: --conf, --top: for --task detect, segment or ocr; {onnxcam.BUNDLED_MODEL} is explained as a "
        "classifier (--target chooses its classes)")


def test_not_a_classifier_names_the_shape_readably(tmp_path):
    model, picture = _files("ocr", tmp_path)
    result = run("explain", model, picture, "--out", tmp_path / "o", "--task", "classify")
    assert result.exit_code == 1
    assert "Error: the explained score has shape (16, N, 6); onnxcam explain needs a classifier's" in result.output


# ---- --batch-size ----------------------------------------------------------------------------------------------
def test_batch_size_splits_an_images_items_into_runs(tmp_path):
    """batch_size 1: one run per detection (3) after the reading run (a plain inference, Explainer.forward), the
    same maps as one run of 3."""
    model, picture = _files("detect", tmp_path)
    maps, runs = {}, {}
    for size in (1, 8):
        runner = TaskRunner(model, conf=0, top=3, batch_size=size, out=tmp_path / "unused")
        calls = []
        original = runner.explainer.run
        runner.explainer.run = lambda x, *a, _run=original, _calls=calls, **k: _calls.append(len(x)) or _run(x, *a, **k)
        reads = []
        forward = runner.explainer.forward
        runner.explainer.forward = lambda x, *a, _run=forward, _reads=reads, **k: _reads.append(len(x)) or _run(x, *a, **k)
        maps[size] = runner.explain(ImageFile(picture, Path(picture.stem)), write=False).maps
        runs[size] = calls
        assert reads == [1]
    assert runs == {1: [1, 1, 1], 8: [3]}
    np.testing.assert_allclose(maps[1], maps[8], atol=1e-6)


# ---- on Ray: the same options reach the task's runner ----------------------------------------------------------
def test_ray_actor_honours_target_save_raw_and_bare(tmp_path):
    """The Ray actor's task job (in this process, no cluster) gets target, save_raw, caption and batch_size:
    rows of class cat only, each with its .npz (a zero map's too), bare overlays (the third cat's map is not zero)."""
    pytest.importorskip("ray")
    from onnxcam.ray import _Explain

    model, picture = _files("detect", tmp_path)
    options = {"methods": ("gradcam",), "layers": None, "target": "cat", "save_raw": True, "caption": False,
               "task": "auto", "conf": 0.0, "top": 3, "batch_size": 1, "resume": False}
    actor = _Explain(str(model), "yolo.onnx", str(tmp_path / "o"), options, None)
    assert actor.job.runner.batch_size == 1
    rows = actor({"path": np.array([str(picture)]), "base": np.array([picture.stem])}).to_pylist()
    assert [r["class"] for r in rows] == [0, 0, 0] and all(r["error"] is None for r in rows)
    assert all(Path(r["raw"]).is_file() for r in rows)
    h, w = image.read_image(picture).shape[:2]
    overlays = [r["overlay"] for r in rows if r["overlay"]]
    assert overlays and all(image.read_image(o).shape == (h, w, 3) for o in overlays)
