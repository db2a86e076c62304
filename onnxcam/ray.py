"""Explaining images on a Ray cluster with Ray Data: the files of a local `onnxcam explain`, plus a table.

Ray Data does the scheduling: `explain_dataset` maps batches of image paths through a pool of actors
(`map_batches` with a callable class), each holding one `pipeline.Runner` (one model, built once per actor),
on a GPU per actor when the cluster has GPUs, else on CPUs. Each actor writes the same per-image files as a local
run (PNG, JSON, .npz with save_raw; atomically, under the same names) and returns one table row per map
(`SCHEMA`); `write_table` streams the rows into one Parquet file.

Tasks: as a local `onnxcam explain --task`, an actor whose model reads as a detector, segmenter or text recognizer
(or that is given one) runs tasks/run.py's TaskRunner instead: the same `<name>.<task>.png`, overlays and JSON, and
one row per detection, class or character (`task`, `box`, `item` columns).

Faults: Ray Data restarts a killed actor and retries its batch. Files are written atomically under fixed names,
so a retry leaves no half-written or duplicate file, and an image whose JSON (written last) already records the
same model, target, layers and methods is not written again when it was written by this job (its mtime is not
older than the job's start, read from a probe on the output folder's own file system) or, with resume, by any
earlier run: its row is recomputed, its files are kept. Without resume, images explained by earlier runs are
explained and written again, as a local run does. An image that cannot be read or explained is a row with its
error, not a failure of the job.

`import ray` below is the Ray package (absolute imports), not this module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import errors, image
from .cam.api import REGISTRY
from .errors import DeviceError, InputError, ModelError, OnnxCamError
from .pipeline import ImageFile, Runner, find_images
from .tasks.choose import TASK_CHOICES
from .tasks.run import TaskRunner, record_items


class RayMissingError(DeviceError, ImportError):
    """Ray Data is not installed (an ImportError, and one line on the command line)."""


try:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import ray.data
except ImportError as exc:
    raise RayMissingError(f'onnxcam.ray needs Ray Data ({exc}): pip install "onnxcam[ray]"') from exc

log = logging.getLogger(__name__)
__all__ = ["SCHEMA", "TABLE_NAME", "TableSummary", "connect", "explain_dataset", "explain_files", "write_table"]

TABLE_NAME = "onnxcam-results.parquet"
CONNECT_TIMEOUT_S = 5.0
# One row per map (an image that failed: one row with `error`). Paths are as written on the worker nodes.
SCHEMA = pa.schema([
    ("image", pa.string()),             # the image path as given (as in the image's JSON)
    ("base", pa.string()),              # its output name without suffix, relative to out_dir
    ("model", pa.string()), ("model_hash", pa.string()), ("target", pa.string()),
    ("method", pa.string()), ("layers", pa.list_(pa.string())),
    ("class", pa.int64()), ("label", pa.string()), ("score", pa.float64()),  # class None: class-agnostic map
    ("top_class", pa.int64()), ("top_label", pa.string()), ("top_score", pa.float64()),
    ("map_mean", pa.float32()), ("map_std", pa.float32()), ("map_max", pa.float32()),
    ("peak_y", pa.float32()), ("peak_x", pa.float32()),  # the map's maximum, as fractions of height and width
    ("area_50", pa.float32()),          # share of the map at or above 0.5
    ("zero_map", pa.string()),          # why the map is zero everywhere (then no pictures)
    ("overlay", pa.string()), ("heatmap", pa.string()), ("raw", pa.string()), ("json", pa.string()),
    ("written", pa.bool_()),            # False: the files were already complete (a retried batch, a rerun)
    ("error", pa.string()),
    ("task", pa.string()),              # classify, detect, segment or ocr
    ("picture", pa.string()),           # detect/segment/ocr: the image's <name>.<task>.png
    ("box", pa.list_(pa.float64())),    # detect: the box, ocr: the character's columns (x1, y1, x2, y2 image pixels)
    ("item", pa.string()),              # detect/segment/ocr: the detection, class or character as in the JSON
])
TASK_OPTIONS = ("task", "conf", "top", "decode")  # TaskRunner's options beyond those it shares with Runner


# ---- connecting ------------------------------------------------------------------------------------------------
def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` ("host:port", "ray://host:port", "auto"; None: RAY_ADDRESS, else a
    running local cluster, else a new one on this machine). An address that does not answer raises DeviceError
    within CONNECT_TIMEOUT_S (Ray itself waits minutes). Already connected: nothing to do."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DeviceError(f"cannot join the Ray cluster at {address or 'this machine'}: {first}") from None


def _check_reachable(address: str) -> None:
    hostport = address.split("://", 1)[-1]
    if hostport in ("auto", "local") or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise DeviceError(f"cannot reach the Ray cluster at {address}: {reason} (is its head node started, "
                          "e.g. with `ray start --head`, and is the port open?)") from None


# ---- the job ---------------------------------------------------------------------------------------------------
def explain_dataset(data, model, *, methods=("gradcam",), layers=None, target: str | None = None,
                    out_dir: str | Path | None = None, save_raw: bool = False, resume: bool = False,
                    task: str = "classify", concurrency: int | tuple | None = None,
                    num_gpus: float | None = None, num_cpus: float = 1, batch_size: int = 8,
                    model_name: str | None = None, address: str | None = None, **runner_options) -> ray.data.Dataset:
    """A Ray Dataset of result rows (SCHEMA): `data` explained by `model` on the Ray cluster, lazily.

    data: image files and folders (searched as a local run searches them, so the output names are the same),
      pipeline.ImageFile objects, or a ray.data.Dataset with a "path" column (and "base", the output name, else
      the file's stem; an "image" column of (H, W, 3) uint8 RGB arrays, e.g. from
      `ray.data.read_images(..., mode="RGB", include_paths=True)`, is used instead of reading the path).
    model: bytes (sent to every actor) or a path that every node can read (checked on each node first).
    out_dir: where each actor writes the per-image files (a folder every node shares); None: no files are kept.
    resume: images whose files an earlier run completed alike are not written again (their rows are made); without
      it they are explained and written again (atomically). Either way a retried batch does not write again what
      this job completed.
    task: classify, auto, detect, segment or ocr, as `onnxcam explain --task` (with conf, top and decode among
      runner_options): auto reads it from the model's output on each actor.
    target: a classifier's (None: top1); for a task, the classes kept (None: all), as tasks/run.py's TaskRunner.
      batch_size is also a task's most items per run.
    concurrency: actors (an int, or (min, max) to autoscale) [default: one per GPU or per `num_cpus` CPUs].
    num_gpus: GPUs per actor [default: 1 when the cluster has GPUs, else 0].
    runner_options: the rest of pipeline.Runner's options (size, mean, std, layout, bgr, labels, device, output,
      max_pixels, caption; conf, top, decode for tasks). Raises ModelError / InputError / DeviceError before
      anything runs when a node cannot read the model or write out_dir, or the cluster cannot be reached.
    """
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown or not methods:  # said here, not by every actor failing to start
        raise InputError(f"unknown method {', '.join(unknown) or '(none)'}; choose from {', '.join(REGISTRY)}")
    if task not in TASK_CHOICES:
        raise InputError(f"unknown task {task!r}; choose from {', '.join(TASK_CHOICES)}")
    model, model_name = _model_source(model, model_name)
    connect(address)
    resources = ray.cluster_resources()
    if num_gpus is None:
        num_gpus = 1 if resources.get("GPU", 0) >= 1 else 0
    out = None if out_dir is None else os.path.abspath(out_dir)
    since = _check_nodes(model if isinstance(model, str) else None, out, num_cpus, num_gpus)
    ds = data if isinstance(data, ray.data.Dataset) else _paths_dataset(data, batch_size)
    size = concurrency or _pool_size(resources, num_cpus, num_gpus)
    if isinstance(size, int) and not isinstance(data, ray.data.Dataset):
        size = max(1, min(size, ds.num_blocks()))  # no idle actors for a few images
    pool = ray.data.ActorPoolStrategy(min_size=size[0], max_size=size[1]) if isinstance(size, tuple) else \
        ray.data.ActorPoolStrategy(size=size)
    options = dict(methods=tuple(methods), layers=layers, target=target, save_raw=save_raw, resume=resume, task=task,
                   batch_size=batch_size, **runner_options)
    # Ray Data starts the actors with max_restarts=-1 and max_task_retries=-1: a killed actor is restarted and its
    # batch retried, which is what makes a lost worker lose no image.
    return ds.map_batches(_Explain, batch_size=batch_size, compute=pool, num_cpus=num_cpus, num_gpus=num_gpus,
                          fn_constructor_args=(model, model_name, out, options, since), batch_format="numpy")


def explain_files(inputs, model, out_dir: str | Path, *, address: str | None = None, **options) -> TableSummary:
    """`onnxcam explain --ray`: explain the images (files, folders or ImageFile) on the cluster into out_dir, the
    table in out_dir/TABLE_NAME. options: those of explain_dataset. Ray Data's own logs are left out unless the
    onnxcam logger is at DEBUG."""
    start = time.perf_counter()
    if not logging.getLogger("onnxcam").isEnabledFor(logging.DEBUG):  # Ray Data's logs, unless debugging: its
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)        # errors come back as exceptions
        connect(address)
        ray.data.DataContext.get_current().enable_progress_bars = False
    ds = explain_dataset(inputs, model, out_dir=out_dir, address=address, **options)
    summary = write_table(ds, Path(out_dir) / TABLE_NAME)
    summary.seconds = time.perf_counter() - start
    return summary


def _model_source(model, name: str | None) -> tuple[str | bytes, str]:
    """(what the actors load: an absolute path or bytes, the name their JSON gives the model)."""
    if isinstance(model, (str, Path)):
        return os.path.abspath(model), name or str(model)
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model), name or "(bytes)"
    raise InputError(f"model: give bytes or a path every node can read, not {type(model).__name__}")


def _paths_dataset(data, batch_size: int) -> ray.data.Dataset:
    """Image files found as a local run finds them (same output names), read by path on the workers."""
    items = list(data) if not isinstance(data, (str, Path)) else [data]
    if not items:
        raise InputError("no images given")
    files = items if all(isinstance(f, ImageFile) for f in items) else find_images(items)
    rows = [{"path": str(f.path), "read": os.path.abspath(f.path), "base": f.base.as_posix()} for f in files]
    # one block per batch, so that every actor gets work and a retry redoes one batch
    return ray.data.from_items(rows, override_num_blocks=max(1, min(math.ceil(len(rows) / batch_size), 100_000)))


def _pool_size(resources: dict, num_cpus: float, num_gpus: float) -> int:
    if num_gpus:
        return max(1, int(resources.get("GPU", 0) // num_gpus))
    return max(1, int(resources.get("CPU", 1) // max(num_cpus, 1e-3)))


# ---- checks on every node, before anything is written ----------------------------------------------------------
@ray.remote(num_cpus=0)
def _node_problems(model_path: str | None, out: str | None) -> dict:
    """What this node lacks: {"model": the model file is missing, "out": why out cannot be written here, or None,
    "now": the output folder's file system's time (ns), or None}."""
    problem, now = (None, None) if out is None else _unwritable(Path(out))
    return {"model": model_path is not None and not os.path.isfile(model_path), "out": problem, "now": now}


def _unwritable(out: Path) -> tuple[str | None, int | None]:
    """(why out cannot be written here, or None; the probe's mtime in ns). A uniquely named probe folder is made and
    removed inside out, or inside its deepest existing parent while out does not exist: a refused job creates
    nothing, and nodes that share the folder never race. Its mtime is the file system's clock, the one the job's
    files are stamped with (a shared file system's server, not this node's clock)."""
    try:
        where = out
        while not where.exists() and where != where.parent:
            where = where.parent
        if not where.is_dir():
            return f"{where} is a file, not a folder", None
        probe = tempfile.mkdtemp(prefix=".onnxcam-probe-", dir=where)
        now = os.stat(probe).st_mtime_ns
        os.rmdir(probe)
    except OSError as exc:
        return exc.strerror or str(exc), None
    return None, now


def _check_nodes(model_path: str | None, out: str | None, num_cpus: float, num_gpus: float) -> int | None:
    """Run _node_problems on every node that can hold an actor; one error naming the nodes and the fix. Returns
    the job's start on the output folder's clock (the earliest probe; None without out)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= num_cpus
             and n["Resources"].get("GPU", 0) >= num_gpus]
    if not nodes:
        need = f"{num_gpus:g} GPU" if num_gpus else f"{num_cpus:g} CPU"
        raise DeviceError(f"no node of the Ray cluster has the {need} an explaining actor needs")
    refs = [_node_problems.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(model_path, out) for n in nodes]
    try:
        found = ray.get(refs)
    except ray.exceptions.RayError as exc:
        if "No module named 'onnxcam" in str(exc):
            raise DeviceError("onnxcam is not installed on the Ray cluster's nodes: install onnxcam[ray] in their "
                              "image (or pass runtime_env={'pip': ['onnxcam[ray]']} to ray.init)") from None
        raise
    lacking_model = [n["NodeManagerAddress"] for n, p in zip(nodes, found) if p["model"]]
    if lacking_model:
        raise ModelError(f"the model file {model_path} is missing on {_nodes(lacking_model, len(nodes))}: pass the "
                         "model as bytes, or put it at a path every node shares")
    for n, p in zip(nodes, found):
        if p["out"]:
            raise InputError(f"the output folder {out} cannot be written on node {n['NodeManagerAddress']}: "
                             f"{p['out']}; give a folder every node can write (a shared folder)")
    stamps = [p["now"] for p in found if p["now"] is not None]
    return min(stamps) if stamps else None


def _nodes(addresses: list[str], total: int) -> str:
    if len(addresses) == total:
        return "every node" + (f" ({addresses[0]})" if total == 1 else f" ({total} nodes)")
    return f"{len(addresses)} of {total} nodes ({', '.join(sorted(set(addresses))[:5])})"


# ---- one actor: one Runner -------------------------------------------------------------------------------------
class _Runner(Runner):
    """A Runner that writes an image's files only while `writing` (Runner.write_report is its seam for this)."""

    writing = True

    def write_report(self, rep, rgb, timings, target) -> None:
        if self.writing:
            super().write_report(rep, rgb, timings, target)
        else:
            for m in rep.maps:
                m.source = None  # the batch's activations are no longer needed


class _Explain:
    """Holds one job (the model built once): called with batches of rows, returns their result rows.

    since: the job's start on the output folder's clock; an image's complete files are kept (not written again)
    when written since then (a retried batch), or with resume whenever they were written."""

    def __init__(self, model, model_name: str, out: str | None, options: dict, since: int | None = None):
        self.out = Path(out) if out is not None else None
        self.failure: OnnxCamError | None = None
        options = dict(options)
        self.resume, self.since = options.pop("resume", False), since
        try:
            self.job = _job(model, self.out, options)
        except OnnxCamError as exc:
            # raised by the first call instead: an error in a constructor reaches the driver only as the text of
            # an ActorDiedError, an error in a call as itself (write_table raises it as it is)
            self.failure = exc
            return
        self.job.runner.model_name = model_name  # bytes would otherwise be named by their repr

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self.failure is not None:
            raise self.failure
        paths = [str(p) for p in batch["path"]]
        reads = [str(p) for p in batch["read"]] if "read" in batch else paths
        bases = [str(b) for b in batch["base"]] if "base" in batch else [Path(p).stem for p in paths]
        pictures = batch.get("image")
        rows, todo, done = [], [], {}
        for i, path in enumerate(paths):
            try:
                # read here, not by the Runner: the JSON names the image as given, the worker reads it by its
                # absolute path (a worker's working folder is not the driver's)
                rgb = _picture(pictures[i]) if pictures is not None else \
                    image.read_image(reads[i], self.job.runner.max_pixels)
            except InputError as exc:
                rows.append(self.job.error_row(path, bases[i], str(exc)))
                continue
            f = ImageFile(Path(path), Path(bases[i]), rgb=rgb)
            record = self.job.complete(f) if self.out is not None else None
            if record is None or not self._kept(record["json"]):
                todo.append(f)
            else:
                done[f.path] = record
        rows += self.job.explain(todo, written=self.out is not None)
        # complete already (a retried batch, a resumed rerun): explained again for the rows, its files not written
        # again
        rows += self.job.explain([ImageFile(p, Path(r["base"]), rgb=r["rgb"]) for p, r in done.items()],
                                 written=False, records=done)
        return pa.Table.from_pylist(rows, schema=SCHEMA)

    def _kept(self, json_path: Path) -> bool:
        """Whether an image's complete files stay as they are: with resume always, else when this job wrote them."""
        if self.resume:
            return True
        try:
            return self.since is not None and json_path.stat().st_mtime_ns >= self.since
        except OSError:
            return False


def _job(model, out: Path | None, options: dict):
    """The actor's job: a task's (TaskRunner) when the task is given or the model reads as a detector, segmenter or
    recognizer, else the classifier's (Runner), as the command line chooses locally."""
    task_options = {k: options.pop(k) for k in TASK_OPTIONS if k in options}
    task = task_options.get("task", "classify")
    batch_size = options.pop("batch_size", 8)  # the actor's batch is Ray Data's; a task's items per run
    if task != "classify":
        heatmap = options.pop("heatmap", False)
        shared = {k: v for k, v in options.items() if k in ("layers", "size", "mean", "std", "layout", "bgr",
                                                            "labels", "device", "output", "max_pixels", "target",
                                                            "save_raw", "caption")}
        runner = TaskRunner(model, method=list(options["methods"]), out=out or ".", batch_size=batch_size, **shared,
                            **task_options)
        if runner.task != "classify":
            if heatmap:  # as locally (tasks/run.py run_cli)
                raise InputError(f"heatmap writes a classifier's maps alone; task {runner.task} writes its own "
                                 "pictures", option="heatmap")
            return _TaskJob(runner, out)
        options["heatmap"] = heatmap
    unused = [k for k in ("conf", "top", "decode") if task_options.get(k) is not None]
    if unused:  # as locally: a classifier has no detections, class maps or characters
        raise InputError(f"{', '.join(unused)}: for task detect, segment or ocr; the model is explained as a "
                         "classifier (target chooses its classes)", option=unused[0])
    options["target"] = options.get("target") or "top1"
    runner = _Runner(model, out=out or ".", **options)
    runner.writing = out is not None
    return _ClassifyJob(runner, out)


class _ClassifyJob:
    """A classifier's images: pipeline.Runner's files, one row per map."""

    def __init__(self, runner: _Runner, out: Path | None):
        self.runner, self.out = runner, out

    def explain(self, files: list[ImageFile], written: bool, records: dict | None = None) -> list[dict]:
        if not files:
            return []
        self.runner.writing = written
        try:
            reports = self.runner.explain_batch(files)
        except OnnxCamError as exc:
            if len(files) > 1:  # tell the images that fail from the others
                return [r for f in files for r in self.explain([f], written, records)]
            return [self.error_row(str(files[0].path), files[0].base.as_posix(), str(exc))]
        finally:
            self.runner.writing = self.out is not None
        if records is not None:  # the files of the earlier run, named by its JSON
            for rep in reports:
                _name_files(rep, records[rep.image.path])
        return [row for rep in reports for row in _rows(self.runner, rep, written)]

    def error_row(self, path: str, base: str, error: str) -> dict:
        r = self.runner
        return {"image": path, "base": base, "model": r.model_name, "model_hash": r.explainer.digest,
                "target": str(r.target), "layers": r.layers, "written": False, "error": error, "task": "classify"}

    def complete(self, f: ImageFile) -> dict | None:
        """The image's JSON (written last) when it records this model, target, layers, methods and preprocessing,
        with every file it names present: {"base", "rgb", "json", "entries"}; else None."""
        r = self.runner
        base = self.out / f.base
        if r.tag:
            base = base.with_name(f"{base.name}.{r.tag}")
        path = base.with_name(f"{base.name}.json")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            entries = record["explanations"]
            same = (record["image"] == str(f.path) and record["model_hash"] == r.explainer.digest
                    and record["target"] == str(r.target) and record["layers"] == r.layers
                    and record["preprocess"] == json.loads(json.dumps(r.pre.describe()))
                    and record.get("captioned", False) == getattr(r, "caption", False)
                    and all(bool(e.get("heatmap")) == getattr(r, "heatmap", False) for e in entries if e.get("overlay"))
                    and sorted({e["method"] for e in entries}) == sorted(r.methods)
                    and all(("raw" in e) == r.save_raw for e in entries))
            files = [path.parent / e[k] for e in entries for k in ("overlay", "heatmap", "raw") if e.get(k)]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not same or not all(p.is_file() for p in files):
            return None
        return {"base": f.base, "rgb": f.rgb, "json": path, "entries": entries}


class _TaskJob:
    """A detector's, segmenter's or recognizer's images: tasks/run.py's files, one row per item explained (an image
    with none: one row without a map)."""

    def __init__(self, runner: TaskRunner, out: Path | None):
        self.runner, self.out = runner, out

    def explain(self, files: list[ImageFile], written: bool, records: dict | None = None) -> list[dict]:
        rows = []
        for f in files:
            try:
                result = self.runner.explain(f, write=written)
            except OnnxCamError as exc:
                rows.append(self.error_row(str(f.path), f.base.as_posix(), str(exc)))
                continue
            rows += self._rows(f, result, written)
        return rows

    def _rows(self, f: ImageFile, result, written: bool) -> list[dict]:
        r = self.runner
        files = self.out is not None
        common = {"image": str(f.path), "base": f.base.as_posix(), "model": r.model_name,
                  "model_hash": r.explainer.digest, "task": r.task, "method": r.method, "layers": r.layers,
                  "json": str(result.json_path) if files else None,
                  "picture": str(result.json_path.with_name(result.record["picture"])) if files else None,
                  "written": written, "error": None}
        rows = []
        for k, (item, mask) in enumerate(zip(result.items, result.maps)):
            public = {key: v for key, v in item.items() if not key.startswith("_")}
            rows.append({**common, **_statistics(mask), "class": item.get("label", item.get("class")),
                         "label": item["name"], "score": item.get("score"), "zero_map": item["zero_map"],
                         "overlay": str(result.files[k]) if files and k in result.files else None,
                         "raw": str(result.raw[k]) if files and k in result.raw else None,
                         "box": item.get("box_image"), "item": json.dumps(public, ensure_ascii=False)})
        return rows or [common]

    def error_row(self, path: str, base: str, error: str) -> dict:
        r = self.runner
        return {"image": path, "base": base, "model": r.model_name, "model_hash": r.explainer.digest,
                "layers": r.layers, "written": False, "error": error, "task": r.task, "method": r.method}

    def complete(self, f: ImageFile) -> dict | None:
        record = self.runner.done_before(f)
        if record is None:
            return None
        return {"base": f.base, "rgb": f.rgb, "json": self.runner.json_path(f), "items": record_items(record)}


def _name_files(rep, record: dict) -> None:
    """Point the report at the files an earlier run wrote for it (matched by method and class)."""
    rep.json_path = record["json"]
    named = {(e["method"], e["class"]): e for e in record["entries"]}
    for m in rep.maps:
        e = named.get((m.method, m.target), {})
        m.files = {k: record["json"].parent / e[k] for k in ("overlay", "heatmap", "raw") if e.get(k)}


def _picture(value) -> np.ndarray:
    rgb = np.asarray(value)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError(f"column 'image' holds a {rgb.dtype} array of shape {rgb.shape}; RGB images are "
                         "(H, W, 3) uint8 (read_images(..., mode='RGB'))")
    return rgb


def _statistics(mask: np.ndarray) -> dict:
    """The table's figures of one map (H, W) in [0, 1] at the model's input size."""
    mask = np.asarray(mask, np.float32)
    y, x = np.unravel_index(int(np.argmax(mask)), mask.shape)
    return {"map_mean": float(mask.mean()), "map_std": float(mask.std()), "map_max": float(mask.max()),
            "peak_y": (y + 0.5) / mask.shape[0], "peak_x": (x + 0.5) / mask.shape[1],
            "area_50": float((mask >= 0.5).mean())}


def _rows(runner: Runner, rep, written: bool) -> list[dict]:
    """One row per map of the report (one error row for a failed image)."""
    path, base = str(rep.image.path), rep.image.base.as_posix()
    if not rep.ok:
        return [_ClassifyJob(runner, None).error_row(path, base, rep.error)]
    top_class, top_label, top_score = rep.top[0]
    return [{
        "image": path, "base": base, "model": runner.model_name, "model_hash": runner.explainer.digest,
        "target": str(runner.target), "method": m.method, "layers": runner.layers,
        "class": m.target, "label": m.label, "score": m.score,
        "top_class": top_class, "top_label": top_label, "top_score": top_score, **_statistics(m.mask),
        "zero_map": m.zero, **{k: str(m.files[k]) if k in m.files else None for k in ("overlay", "heatmap", "raw")},
        "json": None if rep.json_path is None else str(rep.json_path), "written": written, "error": None,
        "task": "classify",
    } for m in rep.maps]


# ---- the table -------------------------------------------------------------------------------------------------
@dataclass
class TableSummary:
    rows: int = 0
    images: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # image -> error
    written: int = 0                                      # files written by this job (pictures, npz, JSON)
    kept: int = 0                                         # images whose files were complete already (not written)
    tasks: set[str] = field(default_factory=set)          # what the actors explained: classify, detect, ...
    seconds: float = 0.0


def write_table(ds: ray.data.Dataset, path: str | Path) -> TableSummary:
    """Run the job, streaming its rows into one Parquet file at `path` (written atomically: a temp file next to
    it, renamed when complete; nothing is created before the first rows arrive). An onnxcam error raised in an
    actor (a model that cannot be read, a layer that does not exist, ...) is raised here as itself."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    summary, images, writer = TableSummary(), set(), None
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if writer is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                writer = pq.ParquetWriter(tmp, SCHEMA)
            batch = batch.select(SCHEMA.names).cast(SCHEMA)
            writer.write_table(batch)
            summary.rows += batch.num_rows
            _count(summary, images, batch.to_pylist())
        if writer is None:  # no rows at all: an empty table
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = pq.ParquetWriter(tmp, SCHEMA)
        writer.close()
        os.replace(tmp, path)
    except BaseException as exc:
        if writer is not None:
            writer.close()
            tmp.unlink(missing_ok=True)
        cause = _onnxcam_cause(exc)
        if cause is not None:
            raise cause from None
        raise
    summary.images = len(images)
    return summary


def _count(summary: TableSummary, images: set, rows: list[dict]) -> None:
    """Add one batch's rows (an actor's call: an image's rows are all in one batch) to the summary."""
    for row in rows:
        images.add(row["image"])
        summary.tasks.add(row["task"])
        if row["error"]:
            summary.failed[row["image"]] = row["error"]
        elif row["written"]:
            summary.written += sum(row[k] is not None for k in ("overlay", "heatmap", "raw"))
    summary.written += sum(len({r[k] for r in rows if r["written"] and r[k]}) for k in ("json", "picture"))
    summary.kept += len({r["image"] for r in rows if not r["written"] and not r["error"] and r["json"]})


def _onnxcam_cause(exc: BaseException) -> OnnxCamError | None:
    """The OnnxCamError an actor raised, if any. Ray wraps it (RayTaskError, Ray Data's UserCodeException) and the
    wrapper that reaches the driver has lost the original object but carries the worker's traceback text: the
    error is found in the chain, else rebuilt from the last 'onnxcam.errors.<Class>: <message>' line of it."""
    seen, current = set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OnnxCamError):
            return current
        current = getattr(current, "cause", None) or current.__cause__
    found = re.findall(r"^onnxcam\.errors\.(\w+): (.+)$", str(exc), re.MULTILINE)
    if not found:
        return None
    name, message = found[-1]
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, OnnxCamError)) or cls is errors.InternalError:
        cls = OnnxCamError
    return cls(message)
