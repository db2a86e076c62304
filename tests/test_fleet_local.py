"""`onnxcam explain` on a folder, on one machine (onnxcam/pipeline.py Runner.run): decoding, the model and writing
overlap in threads joined by bounded queues; results in input order; progress; --resume; labelled pictures and the
contact sheet (--report)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxcam
from onnxcam import image
from onnxcam.cli import main
from onnxcam.errors import InputError
from onnxcam.pipeline import ImageReport, Progress, Runner, find_images

LITE0 = str(onnxcam.BUNDLED_MODEL)
ROOT = Path(__file__).resolve().parent.parent
PROGRESS = re.compile(r"Progress: (\d+)/(\d+) images \((\d+) explained, (\d+) failed, (\d+) skipped\), "
                      r"(-|\d+\.\d) images/s, ETA (-:--|\d+:\d\d)")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def make_photos(folder: Path, n: int) -> Path:
    """n small photos (the bundled samples, every 4th pixel, every other one flipped), named p00, p01, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = [image.read_image(p) for p in onnxcam.SAMPLE_IMAGES]
    for k in range(n):
        small = sources[k % len(sources)][::4, ::4]
        (folder / f"p{k:02d}.png").write_bytes(image.encode_png(np.ascontiguousarray(small[:, ::-1] if k % 2
                                                                                     else small)))
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("photos"), 4)


def summary(result) -> str:
    return result.stdout.splitlines()[-1]


def onnxcam_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("onnxcam-")]


# ---- stages ----------------------------------------------------------------------------------------------------
class Watched(Runner):
    """Counts the images loaded; the first write waits until the loader has reached the third batch (it never
    would, were the stages not overlapped), then lets the loader run as far ahead as the queues allow."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loaded: list[str] = []
        self.third_batch = threading.Event()
        self.overlapped = self.ahead = None

    def _load_one(self, f):
        self.loaded.append(f.path.name)
        if f.path.name == "p04.png":  # batches of 2: the third batch
            self.third_batch.set()
        return super()._load_one(f)

    def write_report(self, rep, rgb, timings, target):
        if self.overlapped is None:
            self.overlapped = self.third_batch.wait(60)
            time.sleep(1.0)  # not a speed check: time for an unbounded loader to read everything
            self.ahead = len(self.loaded)
        super().write_report(rep, rgb, timings, target)


@pytest.mark.parametrize("model_workers", [1, 2])
def test_the_stages_overlap_and_hold_a_few_batches_at_most(tmp_path, model_workers):
    folder = make_photos(tmp_path / "in", 16)
    runner = Watched(LITE0, out=tmp_path / "out", device="cpu", model_workers=model_workers)
    batches = list(runner.run(find_images([folder]), batch_size=2))
    assert runner.overlapped  # the third batch was read while the first was being written
    # one batch being written, one queued, one at the model, one queued, one read and waiting: 5 batches of 16/2
    assert runner.ahead <= 10, runner.ahead
    names = [rep.image.path.name for batch in batches for rep in batch]
    assert names == [f"p{k:02d}.png" for k in range(16)]  # input order
    assert all(rep.ok and rep.json_path.exists() for batch in batches for rep in batch)
    assert [len(b) for b in batches] == [2] * 8
    assert onnxcam_threads() == []


class FailsAtThird(Runner):
    def write_report(self, rep, rgb, timings, target):
        if rep.image.path.name == "p02.png":
            raise InputError("cannot write p02")
        super().write_report(rep, rgb, timings, target)


@pytest.mark.parametrize("model_workers", [1, 2])
def test_an_error_in_a_stage_is_raised_to_the_caller_and_stops_the_others(tmp_path, model_workers):
    folder = make_photos(tmp_path / "in", 8)
    runner = FailsAtThird(LITE0, out=tmp_path / "out", device="cpu", model_workers=model_workers)
    got = []
    with pytest.raises(InputError, match="cannot write p02"):
        for batch in runner.run(find_images([folder]), batch_size=2):
            got += [rep.image.path.name for rep in batch]
    assert got == ["p00.png", "p01.png"]
    assert onnxcam_threads() == []
    assert not (tmp_path / "out" / "p04.json").exists()  # nothing after the failed batch


@pytest.mark.parametrize("model_workers", [1, 2])
def test_a_caller_that_stops_early_stops_the_stages(tmp_path, model_workers):
    folder = make_photos(tmp_path / "in", 12)
    runner = Runner(LITE0, out=tmp_path / "out", device="cpu", model_workers=model_workers)
    batches = runner.run(find_images([folder]), batch_size=2)
    first = next(batches)
    batches.close()
    assert [rep.image.path.name for rep in first] == ["p00.png", "p01.png"]
    assert onnxcam_threads() == []
    assert len(list((tmp_path / "out").glob("*.json"))) < 12


class Overlapping(Runner):
    """Records how many parts of a batch are at the model at once; the part holding p00 waits (up to 60 s) for a
    second part to arrive, which happens only when the parts really run at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inside, self.most, self.parts, self.lock = 0, 0, [], threading.Lock()
        self.second = threading.Event()

    def _explain_images(self, reports, images, timings, target):
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.parts.append(sorted(images))
            if self.inside == 2:
                self.second.set()
        if 0 in images and reports[0].image.path.name == "p00.png":
            self.second.wait(60)
        try:
            return super()._explain_images(reports, images, timings, target)
        finally:
            with self.lock:
                self.inside -= 1


def test_a_batch_runs_on_the_model_in_two_parts_at_once_with_the_same_maps(tmp_path):
    folder = make_photos(tmp_path / "in", 10)
    files = find_images([folder])
    serial = Runner(LITE0, out=tmp_path / "one", device="cpu", save_raw=True, target="top2")
    together = Overlapping(LITE0, out=tmp_path / "two", device="cpu", save_raw=True, target="top2", model_workers=2)
    one = [rep for batch in serial.run(files, batch_size=4) for rep in batch]
    two = [rep for batch in together.run(files, batch_size=4) for rep in batch]
    assert together.most == 2  # two parts were at the model at the same time
    assert sorted(together.parts) == [[0], [0, 1], [0, 1], [1], [2, 3], [2, 3]]  # 4 + 4 + 2 images, halved
    assert [r.image.path.name for r in two] == [f"p{k:02d}.png" for k in range(10)]  # input order
    for a, b in zip(one, two):
        assert [(m.method, m.target) for m in a.maps] == [(m.method, m.target) for m in b.maps]
        for ma, mb in zip(a.maps, b.maps):
            np.testing.assert_allclose(np.load(mb.files["raw"])["map"], np.load(ma.files["raw"])["map"], atol=1e-6)
    assert onnxcam_threads() == []


class NoBarrier(Runner):
    """The part of the first batch holding p02 waits (up to 30 s) until the next batch's first part (p04) is at the
    model: it gets there only if the free model thread takes it while this part still runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.next_batch_started = threading.Event()
        self.overtaken = None

    def _explain_images(self, reports, images, timings, target):
        names = {reports[i].image.path.name for i in images}
        if "p04.png" in names:
            self.next_batch_started.set()
        if "p02.png" in names:
            self.overtaken = self.next_batch_started.wait(30)
        return super()._explain_images(reports, images, timings, target)


def test_the_next_batch_starts_on_a_free_model_thread_while_a_part_still_runs(tmp_path):
    """No barrier per batch: a part slowed down (by the writers sharing its core) leaves the other model thread free
    for the next batch, and results still come in input order."""
    folder = make_photos(tmp_path / "in", 8)
    runner = NoBarrier(LITE0, out=tmp_path / "out", device="cpu", model_workers=2)
    names = [rep.image.path.name for batch in runner.run(find_images([folder]), batch_size=4) for rep in batch]
    assert runner.overtaken
    assert names == [f"p{k:02d}.png" for k in range(8)]
    assert onnxcam_threads() == []


def test_split_makes_parts_of_consecutive_entries_differing_by_one_at_most():
    from onnxcam.pipeline import _split

    assert _split({k: k for k in range(5)}, 2) == [{0: 0, 1: 1}, {2: 2, 3: 3, 4: 4}]
    assert _split({7: "a"}, 2) == [{7: "a"}]  # never an empty part
    assert _split({}, 2) == [{}]
    assert [len(p) for p in _split({k: k for k in range(8)}, 3)] == [3, 2, 3]


def test_the_command_line_runs_batches_in_two_parts_each_on_half_the_cores(monkeypatch):
    from onnxcam import pipeline, runtime

    assert pipeline.model_workers(16, 8, cpus=2) == 2
    assert pipeline.model_workers(8, 8, cpus=2) == 1  # one batch keeps every core
    assert pipeline.model_workers(64, 8, cpus=1) == 1
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 8)
    restore = pipeline.configure_process()
    try:
        pipeline.share_cores(2)
        assert runtime._options().intra_op_num_threads == 4
        pipeline.share_cores(1)
        assert runtime._options().intra_op_num_threads == 0  # onnxruntime's default: every core
    finally:
        restore()
    assert runtime.INTRA_OP_THREADS not in runtime.SESSION_CONFIG


# ---- progress ----------------------------------------------------------------------------------------------------
def test_progress_counts_rate_and_eta():
    now = [100.0]
    p = Progress(64, clock=lambda: now[0])
    assert p.line() == "Progress: 0/64 images (0 explained, 0 failed, 0 skipped), - images/s, ETA -:--"
    assert p.bar(10) == "Explaining [----------]  0/64  - images/s  ETA -:--"
    reports = [ImageReport(None) for _ in range(20)]
    reports[3].error = "bad"
    for rep in reports[16:]:
        rep.skipped = True  # skipped images count as done, not in the rate
    now[0] = 105.0
    p.add(reports)
    assert p.line() == "Progress: 20/64 images (15 explained, 1 failed, 4 skipped), 3.2 images/s, ETA 0:14"
    assert p.bar(10) == "Explaining [###-------] 20/64  3.2 images/s  ETA 0:14"
    p.add([ImageReport(None)] * 44)
    assert p.line().endswith("ETA 0:00")


def test_a_folder_run_prints_each_image_in_order_and_a_progress_line_per_batch(tmp_path):
    folder = make_photos(tmp_path / "in", 5)
    result = run("explain", LITE0, folder, "--out", tmp_path / "out", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    # first feedback right after the model is loaded, then each batch's images and its progress line
    assert PROGRESS.fullmatch(lines[0]).groups()[:5] == ("0", "5", "0", "0", "0")
    shape = ["p", "p", 2, "p", "p", 4, "p", 5]
    assert len(lines) == len(shape) + 2 and lines[-1].startswith("Explained 5 of 5 images with gradcam in ")
    for line, want in zip(lines[1:-1], shape):
        if want == "p":
            assert re.match(r" +p\d\d\.png ", line), line
        else:
            m = PROGRESS.fullmatch(line)
            assert m and m.groups()[:5] == (str(want), "5", str(want), "0", "0"), line
    names = [line.split()[0] for line in lines if line.startswith("  ")]
    assert names == [f"p{k:02d}.png" for k in range(5)]
    assert result.stderr == ""


def test_on_a_terminal_a_bar_is_redrawn_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr("onnxcam.cli._stderr_is_terminal", lambda: True)
    folder = make_photos(tmp_path / "in", 5)
    result = run("explain", LITE0, folder, "--out", tmp_path / "out", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("Explained 5 of 5 images")
    assert len(result.stdout.splitlines()) == 1  # images explained well are not listed under the bar
    draws = [d for d in result.stderr.split("\r") if d.strip()]
    assert [d.split("]")[1].split()[0] for d in draws] == ["0/5", "2/5", "4/5", "5/5"]
    assert all(d.startswith("Explaining [") for d in draws)
    assert result.stderr.endswith("\r")  # the bar is wiped before the summary


# ---- resume ------------------------------------------------------------------------------------------------------
def outputs(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def test_resume_explains_only_what_is_missing_or_made_otherwise(photos, tmp_path):
    out = tmp_path / "out"
    args = ("explain", LITE0, photos, "--out", out, "--batch-size", "2", "--resume", "--heatmap")
    assert "Explained 4 of 4 images" in summary(run(*args))
    before = outputs(out)
    for p in out.glob("p01.*"):
        p.unlink()
    for p in out.glob("p02.*.heatmap.png"):  # a picture missing: its image is not done
        p.unlink()
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert re.match(r"Explained 2 of 4 images with gradcam in .*; 2 skipped \(explained before\); wrote 6 files",
                    summary(result)), summary(result)
    assert [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")] == ["p01.png", "p02.png"]
    after = outputs(out)
    assert sorted(after) == sorted(before)
    assert {k: v for k, v in after.items() if k.startswith(("p00", "p03"))} == \
        {k: v for k, v in before.items() if k.startswith(("p00", "p03"))}  # untouched
    assert "Explained 0 of 4 images" in summary(run(*args))


@pytest.mark.parametrize("change", ["method", "target", "model", "bare"])
def test_resume_explains_again_what_another_run_made(photos, tmp_path, change):
    out = tmp_path / "out"
    model = LITE0
    assert "Explained 4 of 4 images" in summary(run("explain", model, photos, "--out", out, "--resume"))
    extra = {"method": ("--method", "hirescam"), "target": ("--target", "top2"), "bare": ("--bare",)}.get(change, ())
    if change == "model":  # the same network, another file: another hash
        proto = onnx.load(LITE0)
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, "note": "other"})
        model = tmp_path / "other.onnx"
        onnx.save(proto, model)
    assert "Explained 4 of 4 images" in summary(run("explain", model, photos, "--out", out, "--resume", *extra))
    assert "Explained 0 of 4 images" in summary(run("explain", model, photos, "--out", out, "--resume", *extra))


def test_a_killed_run_picks_up_where_it_stopped(tmp_path):
    folder = make_photos(tmp_path / "in", 16)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "onnxcam", "explain", LITE0, str(folder), "--out", str(out), "--batch-size", "1",
           "--method", "gradcam,hirescam,xgradcam", "--target", "top3", "--resume"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)  # a no-op if it has ended
        _, err = proc.communicate()
    done = sorted(p.name for p in out.glob("*.json"))
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert 1 <= len(done) < 16, done
    for p in out.glob("*.png"):  # nothing half-written: every picture there is whole
        assert image.read_image(p).shape[2] == 3
    kept = {name: (out / name).read_bytes() for name in done}
    result = run(*cmd[3:])
    assert result.exit_code == 0, result.output
    assert f"Explained {16 - len(done)} of 16 images" in summary(result)
    assert f"; {len(done)} skipped (explained before)" in summary(result)
    assert {name: (out / name).read_bytes() for name in done} == kept
    assert len(list(out.glob("*.json"))) == 16


# ---- labelled pictures and the contact sheet -------------------------------------------------------------------
def test_overlays_carry_a_caption_unless_bare(tmp_path):
    chelsea = onnxcam.SAMPLE_IMAGES[1]
    assert run("explain", LITE0, chelsea, "--out", tmp_path / "c", "--heatmap").exit_code == 0
    assert run("explain", LITE0, chelsea, "--out", tmp_path / "b", "--bare", "--heatmap").exit_code == 0
    captioned = image.read_image(tmp_path / "c" / "chelsea.gradcam.285.overlay.png")
    bare = image.read_image(tmp_path / "b" / "chelsea.gradcam.285.overlay.png")
    assert bare.shape == (300, 451, 3)  # the image's own size
    assert captioned.shape[1:] == (451, 3) and captioned.shape[0] > 300  # a band of text above it
    band = captioned[:captioned.shape[0] - 300]
    assert (band < 128).any() and (band == 255).mean() > 0.5  # dark text on white
    np.testing.assert_array_equal(captioned[-300:], bare)
    assert (tmp_path / "c" / "chelsea.gradcam.285.heatmap.png").read_bytes() == \
        (tmp_path / "b" / "chelsea.gradcam.285.heatmap.png").read_bytes()
    assert json.loads((tmp_path / "c" / "chelsea.json").read_text())["captioned"] is True


def test_report_writes_a_contact_sheet_naming_every_picture(photos, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in photos.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a JPEG")
    out = tmp_path / "out"
    result = run("explain", LITE0, folder, "--out", out, "--method", "gradcam,eigencam", "--report")
    assert result.exit_code == 1  # the broken image
    page = (out / "report.html").read_text()
    pictures = sorted(p.name for p in out.glob("*.overlay.png"))
    assert len(pictures) == 8
    for name in pictures:
        assert f"src='{name}'" in page, name
    assert "broken.jpg" in page
    # resumed: the images skipped are on the sheet too
    (out / "report.html").unlink()
    (out / "p03.json").unlink()
    result = run("explain", LITE0, folder, "--out", out, "--method", "gradcam,eigencam", "--report", "--resume")
    assert "; 3 skipped (explained before)" in summary(result)
    page = (out / "report.html").read_text()
    for name in pictures:
        assert f"src='{name}'" in page, name


def test_a_resumed_run_reports_the_images_done_as_it_goes(photos, tmp_path, monkeypatch):
    """Images found done ride along with the next images to explain, but a batch holds a bounded number of them:
    a resumed run over many images done neither waits for the end nor holds them all."""
    runner = Runner(LITE0, out=tmp_path, device="cpu", resume=True)
    files = find_images([photos])
    assert [[r.skipped for r in b] for b in runner.run(files, batch_size=2)] == [[False] * 2] * 2
    monkeypatch.setattr("onnxcam.pipeline._SKIPPED_PER_BATCH", 3)
    assert [[r.skipped for r in b] for b in runner.run(files, batch_size=2)] == [[True] * 3, [True]]


def test_the_command_line_analyses_a_classifier_once(tmp_path, monkeypatch):
    """explain reads the task from the model's output (tasks/run.py) on a ModelGraph, then the classifier's Explainer
    builds on that same graph: one analysis per command, not two; and a graph handed over for another input shape
    is not used."""
    from onnxcam.graph import model as graph_model
    from onnxcam.graph.load import LoadedModel

    made = []
    real = graph_model.ModelGraph.__init__

    def counted(self, *args, **kwargs):
        made.append(args[1] if len(args) > 1 else kwargs.get("input_shape"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(graph_model.ModelGraph, "__init__", counted)
    onnxcam.cache.clear()
    result = run("explain", LITE0, onnxcam.SAMPLE_IMAGES[1], "--out", tmp_path / "o", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert made == [(1, 3, 224, 224)]
    loaded = LoadedModel.of(LITE0)
    loaded.hand_over(object(), (1, 3, 224, 224))
    assert loaded.take_graph((1, 3, 240, 240)) is None and loaded.take_graph((1, 3, 224, 224)) is None  # taken once
