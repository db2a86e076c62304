"""onnxcam.ray on a real Ray cluster: a head and a second node, one CPU each, started on this machine by this module
(addressed as 127.0.0.1; Ray itself registers its nodes under the machine's own address).

The cluster explains the bundled Lite0's photos (and copies under other names, and one file that is not an image)
while one of its actor processes is killed; the result must be the files `onnxcam explain` writes locally for the
same images (same JSON content, same maps, same PNG bytes), each image's JSON written once, no temporary file left,
the unreadable file a row with its error. Workers record every completed atomic write in a log (a Ray worker setup
hook, `count_writes`), which is how "written once" is counted. The cluster's processes are stopped by the process
ids this module started.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
# One worker runs this module (.ci/run uses --dist loadgroup), so one cluster is started, not one per xdist worker.
pytestmark = pytest.mark.xdist_group("ray")
pq = pytest.importorskip("pyarrow.parquet")

import onnxcam
from onnxcam.cli import main
from onnxcam.errors import DeviceError, InputError, ModelError

REPO = Path(onnxcam.__file__).resolve().parent.parent  # the onnxcam the workers import: this one
WRITES_ENV = "ONNXCAM_TEST_WRITES"
METHODS = "gradcam,eigencam"  # a class map and a class-agnostic one
TARGET = "top2"


def count_writes() -> None:
    """Ray worker setup hook: append 'pid path' to the file named by ONNXCAM_TEST_WRITES after every completed
    onnxcam.files.atomic_write (the pictures, the .npz and the JSON all go through it)."""
    import onnxcam.files
    import onnxcam.pipeline

    real, log = onnxcam.files.atomic_write, os.environ[WRITES_ENV]

    def counted(path, data) -> None:
        real(path, data)
        with open(log, "a", encoding="utf-8") as f:  # one short line per O_APPEND write: lines never interleave
            f.write(f"{os.getpid()} {os.path.abspath(path)}\n")

    onnxcam.files.atomic_write = counted
    if getattr(onnxcam.pipeline, "atomic_write", None) is real:
        onnxcam.pipeline.atomic_write = counted


# ---- the cluster -----------------------------------------------------------------------------------------------
@dataclass
class Cluster:
    address: str
    procs: list
    temp: Path
    writes: Path

    def descendants(self) -> dict[int, str]:
        """pid -> command line of every process below the `ray start` processes this module started."""
        return _descendants({p.pid for p in self.procs})


def _descendants(ours: set[int]) -> dict[int, str]:
    parents, cmds = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmds[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = {}
    for pid in parents:
        p, seen = pid, set()
        while p in parents and p not in seen:
            seen.add(p)
            p = parents[p]
            if p in ours:
                found[pid] = cmds[pid]
                break
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else shutil.which("ray")


def _wait(condition, what: str, seconds: float = 90) -> None:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"waited {seconds} s for {what}")
        time.sleep(0.2)


def _exited(proc, log: Path) -> bool:
    """False while proc runs; raises with the end of its log when it has exited (a node that failed to start)."""
    if proc.poll() is None:
        return False
    raise RuntimeError(f"`ray start` exited with {proc.returncode}: {log.read_text()[-2000:]}")


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster():
    saved_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # read by ray.init in this process
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must stay under 108 bytes
    port = _free_port()
    # a loopback cluster of this test's own: no token (Ray turns token auth on when ~/.ray/auth_token exists)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus", "1", "--temp-dir", str(temp), "--block", "--disable-usage-stats"]
    procs = []
    writes = temp / "writes.log"
    writes.touch()

    def start(*args: str) -> None:
        log = open(temp / f"node{len(procs)}.log", "wb")  # noqa: SIM115 (kept open for the process's life)
        procs.append(subprocess.Popen([_ray_cli(), "start", *args, *common], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start("--head", "--port", str(port), "--include-dashboard=false")
        _wait(lambda: _port_open(port) or _exited(procs[0], temp / "node0.log"), "the head node's port")
        address = f"127.0.0.1:{port}"
        start("--address", address)
        ray.init(address=address, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": f"{__name__}.count_writes",
                              "env_vars": {WRITES_ENV: str(writes), "PYTHONPATH": env["PYTHONPATH"]}})
        _wait(lambda: sum(n["Alive"] for n in ray.nodes()) == 2, "the second node")
        yield Cluster(address, procs, temp, writes)
    finally:
        ray.shutdown()
        _stop(procs, temp)
        if saved_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_auth


def _stop(procs: list, temp: Path) -> None:
    """SIGTERM each `ray start --block` (it stops its node), then SIGKILL whatever is left of the processes below
    them or using this cluster's temp folder: only processes this module started."""
    below = set(_descendants({p.pid for p in procs}))
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(temp).encode() in (entry / "cmdline").read_bytes():
                below.add(int(entry.name))
        except OSError:
            pass
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(temp, ignore_errors=True)


# ---- the images and the local reference ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The four photos, copies of them in a second folder (same names: their outputs go to b/...), and a file
    that is not an image."""
    root = tmp_path_factory.mktemp("images")
    for sub in ("a", "b"):
        (root / sub).mkdir()
        for p in onnxcam.SAMPLE_IMAGES:
            shutil.copy(p, root / sub / p.name)
    (root / "a" / "broken.png").write_bytes(b"not a picture")
    return root


@pytest.fixture(scope="module")
def local(images, tmp_path_factory) -> Path:
    """What `onnxcam explain` writes on this machine, one image per run as on the cluster (the same arithmetic)."""
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("local") / "out"
    r = CliRunner().invoke(main, ["explain", str(onnxcam.BUNDLED_MODEL), str(images), "--method", METHODS,
                                  "--target", TARGET, "--save-raw", "--batch-size", "1", "--out", str(out)])
    assert r.exit_code == 1, r.output  # the broken file
    return out


def _outputs(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


def _json(path: Path) -> dict:
    record = json.loads(path.read_text())
    record.pop("timings")  # the only field that may differ: how long this run took
    return record


# ---- the job with a worker killed mid-run ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def faulted(cluster, images, local, tmp_path_factory):
    """The job on the cluster, one image per batch; one actor process SIGKILLed once the first image is done."""
    from onnxcam.ray import TABLE_NAME, explain_dataset, write_table

    out = tmp_path_factory.mktemp("ray") / "out"
    ds = explain_dataset([images], onnxcam.BUNDLED_MODEL, methods=METHODS.split(","), target=TARGET, out_dir=out,
                         save_raw=True, batch_size=1, caption=True)  # captioned overlays, as the command writes
    result: dict = {}

    def job() -> None:
        try:
            result["summary"] = write_table(ds, out / TABLE_NAME)
        except BaseException as exc:  # noqa: BLE001 (raised in the main thread below)
            result["error"] = exc

    thread = threading.Thread(target=job)
    thread.start()
    good = len(onnxcam.SAMPLE_IMAGES) * 2
    _wait(lambda: list(out.rglob("*.json")) or not thread.is_alive(), "a first image")
    done_at_kill = len(list(out.rglob("*.json")))
    actors = {pid: cmd for pid, cmd in cluster.descendants().items() if cmd.startswith("ray::MapWorker")}
    killed = min(actors) if actors else None
    if killed is not None:
        os.kill(killed, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the job did not end"
    if "error" in result:
        raise result["error"]
    writes = [line.split(" ", 1)[1] for line in cluster.writes.read_text().splitlines() if str(out) in line]
    return {"out": out, "summary": result["summary"], "table": pq.read_table(out / TABLE_NAME).to_pylist(),
            "killed": killed, "done_at_kill": done_at_kill, "good": good, "writes": writes}


def test_worker_killed_mid_run(faulted):
    """The kill hit a running job: an actor process died while images were still to do."""
    assert faulted["killed"] is not None, "no actor process found to kill"
    assert faulted["done_at_kill"] < faulted["good"], "the job was over before the kill"
    assert not _alive(faulted["killed"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_same_files_as_local(faulted, local):
    """Every file of the local run, with the same JSON content, the same maps (.npz) and the same PNG bytes;
    no temporary file."""
    ours, theirs = _outputs(faulted["out"]), _outputs(local)
    assert set(ours) - {"onnxcam-results.parquet"} == set(theirs)
    assert not [p for p in ours if p.endswith(".tmp")]
    for name, path in theirs.items():
        if name.endswith(".json"):
            assert _json(ours[name]) == _json(path), name
        elif name.endswith(".npz"):
            with np.load(ours[name]) as a, np.load(path) as b:
                assert sorted(a.files) == sorted(b.files), name
                for k in a.files:
                    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")
        else:
            assert ours[name].read_bytes() == path.read_bytes(), name


def test_each_image_written_once(faulted):
    """No image that was complete is written again: each JSON once; a picture twice only for the one image in
    flight when its actor died (the retry writes it again, atomically, under the same name)."""
    counts = collections.Counter(faulted["writes"])
    assert {p for p in counts} == {str(p) for p in faulted["out"].rglob("*") if p.suffix in (".json", ".png", ".npz")}
    assert {p: n for p, n in counts.items() if p.endswith(".json") and n != 1} == {}
    again = {(Path(p).parent, Path(p).name.split(".")[0]) for p, n in counts.items() if n > 1}  # (folder, image)
    assert len(again) <= 1, counts


def test_table(faulted, local):
    """One row per map with the local run's classes and scores and the statistics of its maps; the file that is not
    an image is a row with its error."""
    rows, summary = faulted["table"], faulted["summary"]
    assert summary.images == faulted["good"] + 1 and summary.rows == len(rows)
    failed = [r for r in rows if r["error"]]
    assert len(failed) == 1 and failed[0]["image"].endswith("broken.png") and "cannot decode" in failed[0]["error"]
    assert list(summary.failed) == [failed[0]["image"]]
    ok = [r for r in rows if not r["error"]]
    assert len(ok) == faulted["good"] * 3  # gradcam for the top 2 classes, eigencam once
    for r in ok:
        record = json.loads((local / Path(r["json"]).relative_to(faulted["out"])).read_text())
        entry = next(e for e in record["explanations"] if e["method"] == r["method"] and e["class"] == r["class"])
        assert r["image"] == record["image"] and r["model_hash"] == record["model_hash"]
        assert r["layers"] == record["layers"] and r["top_class"] == record["top"][0]["class"]
        assert r["score"] == (None if entry["score"] is None else pytest.approx(entry["score"], abs=1e-6))
        with np.load(local / Path(r["raw"]).relative_to(faulted["out"])) as z:
            m = z["map"]
        y, x = np.unravel_index(np.argmax(m), m.shape)
        assert (r["map_mean"], r["map_max"], r["area_50"]) == pytest.approx(
            (m.mean(), m.max(), (m >= 0.5).mean()), rel=1e-6)
        assert (r["peak_y"], r["peak_x"]) == pytest.approx(((y + 0.5) / m.shape[0], (x + 0.5) / m.shape[1]))
        assert Path(r["overlay"]).is_file() == (r["zero_map"] is None) and Path(r["raw"]).is_file()


def test_rerun_with_model_bytes_writes_nothing(cluster, images, faulted):
    """The model as bytes, into the same folder, resumed: every image is complete, so its rows are made again and no
    file is written; the rows equal the first run's."""
    from onnxcam.ray import explain_dataset, write_table

    before = cluster.writes.read_text()
    out = faulted["out"]
    ds = explain_dataset([images], onnxcam.BUNDLED_MODEL.read_bytes(), model_name=str(onnxcam.BUNDLED_MODEL),
                         methods=METHODS.split(","), target=TARGET, out_dir=out, save_raw=True, batch_size=4,
                         caption=True, resume=True)
    summary = write_table(ds, out.parent / "again.parquet")
    assert cluster.writes.read_text() == before and summary.written == 0 and summary.kept == summary.images - 1
    rows = pq.read_table(out.parent / "again.parquet").to_pylist()
    key = lambda r: (r["image"], r["method"] or "", r["class"] or -1)
    first = sorted(faulted["table"], key=key)
    assert [r["written"] for r in rows if not r["error"]] == [False] * (len(rows) - 1)
    assert [{**r, "written": None} for r in sorted(rows, key=key)] == [{**r, "written": None} for r in first]


def _elsewhere(row: dict) -> dict:
    """The row's path moved to a folder that does not exist: only its decoded picture can be explained."""
    return {**row, "path": f"/nonexistent/{Path(row['path']).name}"}


def test_decoded_pictures_without_files(cluster, images, faulted):
    """A Dataset of pictures decoded by Ray (read_images; these decode to the same pixels as onnxcam's reader, and
    their paths lead nowhere) and no out_dir: rows only, nothing written, the same classes and map statistics as
    the run from paths."""
    from onnxcam.ray import explain_dataset

    before = cluster.writes.read_text()
    ds = ray.data.read_images([str(images / "a" / p.name) for p in onnxcam.SAMPLE_IMAGES[:2]], mode="RGB",
                              include_paths=True).map(_elsewhere)
    rows = explain_dataset(ds, onnxcam.BUNDLED_MODEL, methods=METHODS.split(","), target=TARGET, batch_size=2,
                           concurrency=1).take_all()
    assert cluster.writes.read_text() == before
    first = {(r["base"], r["method"], r["class"]): r for r in faulted["table"] if not r["error"]}
    assert len(rows) == 2 * 3
    stats = ("class", "score", "top_class", "map_mean", "map_std", "map_max", "peak_y", "peak_x", "area_50")
    for r in rows:
        assert r["json"] is None and r["overlay"] is None and r["written"] is False and r["error"] is None
        assert {k: r[k] for k in stats} == {k: first["a/" + r["base"], r["method"], r["class"]][k] for k in stats}


# ---- tasks, and resume or not -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> tuple[Path, list[Path]]:
    """tests/test_tasks.py's YOLOv8-style detector (seeded, with class names) and two photos to explain."""
    from .test_tasks import _write, yolo

    root = tmp_path_factory.mktemp("detector")
    model = Path(_write(root, "yolo.onnx", yolo()[1], ["cat", "dog", "cup"]))
    photos = [Path(shutil.copy(p, root / p.name)) for p in onnxcam.SAMPLE_IMAGES[:2]]
    return model, photos


def _task_json(path: Path) -> dict:
    record = json.loads(path.read_text())
    record.pop("seconds")  # how long this run took
    return record


def test_detector_on_the_cluster_as_locally_then_again_without_resume(cluster, detector, tmp_path):
    """`--ray` with a detector (task read from the model, as locally): the local `--task` run's files (JSON equal
    but for its time, PNG bytes equal) and one row per detection with its box, class, score and map figures. Run
    again without --resume, every image is explained and written again (atomically), as a local run does."""
    from onnxcam.pipeline import ImageFile
    from onnxcam.tasks.run import TaskRunner

    model, photos = detector
    args = [str(model), *map(str, photos), "--conf", "0", "--top", "2"]
    local = _cli(*args, "--out", str(tmp_path / "local"))
    assert local.exit_code == 0 and "Task detect (decode yolov8" in local.output, local.output
    out = tmp_path / "ray"
    first = _cli(*args, "--out", str(out), "--ray", cluster.address)
    assert first.exit_code == 0, first.output
    assert re.fullmatch(r"Explained 2 of 2 images with gradcam \(task detect\) on Ray in \S+ s; wrote 8 files and "
                        r"onnxcam-results.parquet to \S+", first.output.strip()), first.output
    ours, theirs = _outputs(out), _outputs(tmp_path / "local")
    assert set(ours) - {"onnxcam-results.parquet"} == set(theirs)
    for name, path in theirs.items():
        if name.endswith(".json"):
            assert _task_json(ours[name]) == _task_json(path), name
        else:
            assert ours[name].read_bytes() == path.read_bytes(), name
    rows = pq.read_table(out / "onnxcam-results.parquet").to_pylist()
    runner = TaskRunner(model, conf=0, top=2, out=tmp_path / "unused")
    assert len(rows) == 4
    for photo in photos:
        record = json.loads((out / f"{photo.stem}.json").read_text())
        mine = [r for r in rows if r["image"] == str(photo)]
        maps = runner.explain(ImageFile(photo, Path(photo.stem)), write=False).maps
        assert [json.loads(r["item"]) for r in mine] == record["detections"]
        for r, d, m in zip(mine, record["detections"], maps):
            assert (r["task"], r["class"], r["label"], r["score"], r["box"]) == \
                ("detect", d["label"], d["name"], d["score"], d["box_image"])
            assert r["overlay"] == str(out / d["overlay"]) and r["picture"] == str(out / f"{photo.stem}.detect.png")
            assert r["json"] == str(out / f"{photo.stem}.json") and r["written"] and r["error"] is None
            y, x = np.unravel_index(np.argmax(m), m.shape)
            want = {"map_mean": m.mean(), "map_max": m.max(), "area_50": (m >= 0.5).mean(),
                    "peak_y": (y + 0.5) / m.shape[0], "peak_x": (x + 0.5) / m.shape[1]}
            assert {k: r[k] for k in want} == pytest.approx(want, rel=1e-6, abs=1e-7)
    stamps = {name: p.stat().st_mtime_ns for name, p in _outputs(out).items()}
    again = _cli(*args, "--out", str(out), "--ray", cluster.address)
    assert again.exit_code == 0 and "Explained 2 of 2 images" in again.output, again.output
    writes = collections.Counter(line.split(" ", 1)[1] for line in cluster.writes.read_text().splitlines()
                                 if str(out) in line)
    assert set(writes.values()) == {2} and len(writes) == 8  # every picture and JSON, once per run
    assert all(p.stat().st_mtime_ns != stamps[name] for name, p in _outputs(out).items())
    assert [r["written"] for r in pq.read_table(out / "onnxcam-results.parquet").to_pylist()] == [True] * 4


def test_without_resume_a_retried_batch_keeps_only_what_this_job_wrote(detector, tmp_path):
    """The actor's rule for an image already complete (in this process, no cluster): a retry of this job's batch
    keeps the files it wrote; a later job rewrites them unless resumed."""
    from onnxcam.ray import _Explain

    model, photos = detector
    batch = {"path": np.array([str(photos[0])]), "base": np.array([photos[0].stem])}
    options = {"methods": ("gradcam",), "layers": None, "target": None, "save_raw": False, "task": "auto",
               "conf": 0.0, "top": 1}
    record = tmp_path / f"{photos[0].stem}.json"

    def run(resume: bool, since: int | None) -> list[bool]:
        actor = _Explain(str(model), "yolo.onnx", str(tmp_path), {**options, "resume": resume}, since)
        return [r["written"] for r in actor(batch).to_pylist()]

    assert run(False, None) == [True]
    stamp = record.stat().st_mtime_ns
    assert run(False, stamp) == [False]  # the same job's retry: written since it started
    assert record.stat().st_mtime_ns == stamp
    assert run(True, stamp + 1) == [False]  # a later job, resumed
    assert record.stat().st_mtime_ns == stamp
    assert run(False, stamp + 1) == [True]  # a later job: explained and written again
    assert record.stat().st_mtime_ns != stamp


# ---- bad input: one line each, nothing written -----------------------------------------------------------------
def _cli(*args: str):
    from click.testing import CliRunner

    return CliRunner().invoke(main, ["explain", *args])


def test_unreachable_address(tmp_path):
    from onnxcam.ray import connect

    port = _free_port()
    with pytest.raises(DeviceError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused"):
        connect(f"127.0.0.1:{port}")
    r = _cli(str(onnxcam.BUNDLED_MODEL), str(onnxcam.SAMPLE_IMAGES[0]), "--out", str(tmp_path / "out"),
             "--ray", f"127.0.0.1:{port}")
    assert r.exit_code == 1
    assert r.output.splitlines() == [(f"Error: cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused "
                                     "(is its head node started, e.g. with `ray start --head`, and is the port open?)")]
    assert not (tmp_path / "out").exists()


def test_model_missing_on_nodes(cluster, tmp_path):
    from onnxcam.ray import explain_dataset

    missing = tmp_path / "nowhere" / "model.onnx"
    with pytest.raises(ModelError, match="pass the model as bytes, or put it at a path every node shares"):
        explain_dataset(list(onnxcam.SAMPLE_IMAGES), missing, out_dir=tmp_path / "out")
    r = _cli(str(missing), str(onnxcam.SAMPLE_IMAGES[0]), "--out", str(tmp_path / "out"), "--ray", cluster.address)
    assert r.exit_code == 1
    assert r.output.splitlines() == [(f"Error: the model file {missing} is missing on every node (2 nodes): pass the "
                                     "model as bytes, or put it at a path every node shares")]
    assert not (tmp_path / "out").exists()


def test_output_folder_not_writable(cluster, tmp_path):
    from onnxcam.ray import explain_dataset

    (tmp_path / "file").write_text("a file, not a folder")
    out = tmp_path / "file" / "out"
    with pytest.raises(InputError, match=rf"the output folder {re.escape(str(out))} cannot be written on node \S+: "
                                         rf"{re.escape(str(tmp_path / 'file'))} is a file, not a folder; give a "
                                         "folder every node can write"):
        explain_dataset(list(onnxcam.SAMPLE_IMAGES), onnxcam.BUNDLED_MODEL, out_dir=out)
    r = _cli(str(onnxcam.BUNDLED_MODEL), str(onnxcam.SAMPLE_IMAGES[0]), "--out", str(out), "--ray", cluster.address)
    assert r.exit_code == 1 and len(r.output.splitlines()) == 1 and "cannot be written on node" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_model_unreadable(cluster, tmp_path):
    """A model every actor fails to read: the actors' ModelError, as one line, and nothing written."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    r = _cli(str(bad), str(onnxcam.SAMPLE_IMAGES[0]), "--out", str(tmp_path / "out"), "--ray", cluster.address)
    assert r.exit_code == 1
    assert len(r.output.splitlines()) == 1
    assert r.output.startswith(f"Error: {bad} is not a valid ONNX model (protobuf parse failed"), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]
