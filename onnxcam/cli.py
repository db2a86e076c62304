"""The `onnxcam` command: demo, explain, layers, info, export. The only click importer.

Library errors become one "Error: ..." line (exit status 1) here, at the edge; --debug shows the traceback.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np

from . import __version__
from .errors import ImageTooLargeError, OnnxCamError
from .image import MAX_PIXELS, quiet_decoder_warnings

log = logging.getLogger(__name__)
DATA = Path(__file__).parent / "data"
DEMO_MODEL = DATA / "efficientnet_lite0.onnx"
DEMO_SAMPLES = DATA / "samples"


# ---- the process ------------------------------------------------------------------------------------------------
def run(prog_name: str = "onnxcam") -> None:
    """The console script and `python -m onnxcam`: the command, then the process ends at once.

    When a command returns, every file it wrote is synced and closed; what a normal exit adds is the interpreter's
    teardown, freeing the onnxruntime session and each array and module one by one: ~0.1 s of a folder run's
    4-5 s, paid again by every run of a script that explains folder after folder. First what a normal exit does
    first (threads that are not daemons joined, idle thread pools let go), then the atexit handlers (logging's
    flush, Ray's shutdown), then os._exit.
    Tests call `main` itself (click's CliRunner), which exits as usual."""
    try:
        main(prog_name=prog_name)
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter's exit does first (CPython)
    if shutdown is None:
        sys.exit(code)
    shutdown()  # wakes idle thread pools (their exit hooks), then joins the threads that are not daemons
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe (`| head`): nothing left to say
            pass
    os._exit(code or 0)


# ---- errors at the edge ----------------------------------------------------------------------------------------
class _Group(click.Group):
    """Turns every exception into one 'Error: ...' line and exit status 1, unless --debug was given."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, KeyboardInterrupt,
                SystemExit):
            raise
        except Exception as exc:
            if ctx.meta.get("onnxcam.debug"):
                raise
            raise click.ClickException(_message(exc)) from None


# The library names the parameter that fixes an error (OnnxCamError.option); the command line names its flag.
_FLAGS = {"size": "--size HxW", "layout": "--layout", "bgr": "--bgr", "out": "--out DIR", "method": "--method",
          "labels": "--labels FILE", "target": "--target", "conf": "--conf", "decode": "--decode", "report": "--report",
          "heatmap": "--heatmap"}


def _message(exc: Exception) -> str:
    if isinstance(exc, OnnxCamError):
        flag = _FLAGS.get(exc.option)
        return f"{exc} (option {flag})" if flag else str(exc)
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{':' + where if where else ''}"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"unexpected {type(exc).__name__}: {first} (run with --debug for the traceback)"


def _set_debug(ctx: click.Context, _param, value: bool):
    if value:
        ctx.meta["onnxcam.debug"] = True
        logging.getLogger("onnxcam").setLevel(logging.DEBUG)
    return value


def debug_option(f):
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="Show tracebacks and debug logs.")(f)


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record comes (click's test runner replaces it for each call)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging() -> None:
    logger = logging.getLogger("onnxcam")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)  # records still propagate: a host program's (or pytest's) handlers see them
    # Every call starts at WARNING: an earlier --debug in this process (tests call main repeatedly) does not stick.
    debug = click.get_current_context().meta.get("onnxcam.debug")
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    quiet_decoder_warnings()


# ---- option parsing (bad values are usage errors: exit status 2) ------------------------------------------------
def _parse_size(_ctx, _param, value):
    if value is None:
        return None
    parts = value.lower().replace(",", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not HxW, e.g. 224x224 (or one number for a square)") from None
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise click.BadParameter(f"{value!r} is not HxW with positive sizes, e.g. 224x224")
    return size


def _parse_floats(_ctx, param, value):
    if value is None:
        return None
    try:
        floats = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not comma-separated numbers, e.g. 0.485,0.456,0.406") from None
    if len(floats) not in (1, 3):
        raise click.BadParameter(f"{value!r}: give 3 values (r,g,b) or 1 for all channels")
    if any(not 0 <= v <= 1 for v in floats):
        raise click.BadParameter(f"{value!r}: values are in [0, 1] pixel units (e.g. 0.485), not 0..255")
    if param.name == "std" and any(v == 0 for v in floats):
        raise click.BadParameter(f"{value!r}: std must not be 0")
    return floats


def _parse_out(_ctx, _param, value: str) -> Path:
    if not value.strip():  # Path("") is the current folder: say so instead of writing there
        raise click.BadParameter("the folder name is empty; give a folder (--out . for the current one)")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise click.BadParameter(f"{value} is a file, not a folder")
    return path


def _parse_methods(_ctx, _param, value):
    from .cam.api import REGISTRY, canonical
    from .errors import InputError

    methods, unknown = [], []
    for m in (m.strip().lower() for m in value.split(",") if m.strip()):
        try:
            methods.append(canonical(m))  # an alias (gradcampp) names its method
        except InputError:
            unknown.append(m)
    if unknown or not methods:
        raise click.BadParameter(f"unknown method {', '.join(unknown) or repr(value)}; "
                                 f"choose from {', '.join(REGISTRY)}")
    return list(dict.fromkeys(methods))


def model_options(f):
    """The options that decide how images become model inputs (shared by explain, layers and info)."""
    for decorator in reversed([
        click.option("--size", callback=_parse_size, metavar="HxW",
                     help="Model input size; needed when the model's spatial size is dynamic."),
        click.option("--mean", callback=_parse_floats, metavar="R,G,B",
                     help="Per-channel mean in [0,1] units [default: model metadata, else ImageNet's]."),
        click.option("--std", callback=_parse_floats, metavar="R,G,B",
                     help="Per-channel std in [0,1] units [default: model metadata, else ImageNet's]."),
        click.option("--layout", type=click.Choice(["auto", "nchw", "nhwc"]), default="auto", show_default=True,
                     help="Input layout; auto reads the metadata or the input shape (NHWC: TensorFlow exports)."),
        click.option("--bgr", is_flag=True, help="Feed channels in BGR order (Caffe/OpenCV-trained models)."),
    ]):
        f = decorator(f)
    return f


# ---- the commands ----------------------------------------------------------------------------------------------
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxcam")
@debug_option
def main():
    """Grad-CAM, HiResCAM and friends for image classifiers exported to ONNX.

    \b
    onnxcam demo                                  explain the bundled photos with the bundled model
    onnxcam explain model.onnx photos/            heatmaps for your own model and images
    onnxcam layers model.onnx                     which layers can be explained
    onnxcam info model.onnx                       inputs, outputs, preprocessing, gradient support
    onnxcam export model.onnx -o model-cam.onnx   the model with its Grad-CAM map as an output
    """
    _setup_logging()


@main.command()
@click.option("--out", default="onnxcam-out", show_default=True, callback=_parse_out, metavar="DIR",
              help="Folder for the pictures and JSON files.")
@click.option("--method", "methods", default="gradcam,hirescam", show_default=True, callback=_parse_methods,
              help="CAM methods, comma-separated.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where onnxruntime runs; auto takes CUDA when it really works.")
@debug_option
def demo(out: Path, methods: list[str], device: str):
    """Explain the bundled sample photos with the bundled EfficientNet-Lite0.

    The model has real ImageNet weights; its preprocessing and class names are read from its own metadata.
    Also explains the cat and the espresso photos put side by side, once for each class, to show that
    each class's map lands on its own object.

    \b
    Example:
        onnxcam demo --out demo-out
    """
    from . import image
    from .pipeline import ImageFile, Runner, find_images, parse_target

    runner = Runner(DEMO_MODEL, methods=methods, device=device, out=out)
    files = find_images([DEMO_SAMPLES])
    click.echo(f"Model: {DEMO_MODEL.name} (EfficientNet-Lite0, ImageNet), layer {', '.join(runner.layers)}, "
               f"device {runner.explainer.providers[0].replace('ExecutionProvider', '')}")
    start, written, failed = time.perf_counter(), 0, 0
    for batch in runner.run(files, batch_size=len(files)):
        for rep in batch:
            failed += _echo_report(rep)
            written += _count_files(rep)
    # Class discrimination: one picture, two objects, one map per class.
    by_name = {f.path.name: f for f in files}
    pair = image.side_by_side(image.read_image(by_name["chelsea.png"].path),
                              image.read_image(by_name["coffee.png"].path))
    both = ImageFile(Path("cat_and_coffee (chelsea.png and coffee.png side by side)"), Path("cat_and_coffee"),
                     rgb=pair)
    rep = runner.explain_batch([both], parse_target("285,967"))[0]
    for m in rep.maps:
        if m.zero or m.agnostic:
            click.echo(f"  {'cat_and_coffee':14s} {_explained(m)}")
            continue
        half = "left (the cat)" if _peak_x(m.mask) < 0.5 else "right (the cup)"
        click.echo(f"  {'cat_and_coffee':14s} {m.method:9s} map for {m.target} {m.label!r} peaks on the {half}"
                   f" -> {_show(m.files['overlay'])}")
    written += _count_files(rep)
    click.echo(f"Explained {len(files) + 1} pictures in {time.perf_counter() - start:.1f} s; "
               f"wrote {written} files to {_show(out)}")
    if failed:
        sys.exit(1)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--method", "methods", default="gradcam", show_default=True, callback=_parse_methods,
              help="CAM methods, comma-separated, e.g. gradcam,hirescam.")
@click.option("--layer", "layers", multiple=True, metavar="NAME",
              help="Target layer (an ONNX tensor name, see `onnxcam layers`); repeat for several [default: the "
                   "last spatial activation before the score].")
@click.option("--target", default="top1", show_default=True, metavar="top1|topK|CLASS[,CLASS]",
              help="Which classes to explain: each image's best k, or class numbers or names (detect, segment: "
                   "the classes kept).")
@click.option("--output", "output", metavar="NAME",
              help="For models with several outputs: the output whose classes are explained [default: the first].")
@click.option("--out", default="onnxcam-out", show_default=True, callback=_parse_out, metavar="DIR",
              help="Output folder (skipped when looking for images in the input folders).")
@model_options
@click.option("--labels", metavar="FILE",
              help="Class names, one per line or a JSON list; 'imagenet' for the bundled ImageNet names "
                   "[default: the model's metadata].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where onnxruntime runs; auto takes CUDA when it really works.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images per onnxruntime run (detect, segment, ocr: one image's items per run).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=MAX_PIXELS, show_default=True, metavar="N",
              help="Images with more pixels are skipped, checked from the file header before decoding (a small "
                   "file can claim a huge picture).")
@click.option("--save-raw", is_flag=True,
              help="Also write an .npz per map: the map at input size, the low-resolution map, activations, "
                   "gradients and logits.")
@click.option("--resume", is_flag=True,
              help="Skip images whose JSON in the output folder records the same model (hash), methods, layers, "
                   "target and preprocessing, with all its pictures: a stopped run picks up where it stopped.")
@click.option("--bare", is_flag=True,
              help="Overlays without their caption (the class and its score, the method and layer above the image).")
@click.option("--report", is_flag=True, help="Also write DIR/report.html, a contact sheet of every overlay.")
@click.option("--heatmap", is_flag=True,
              help="Also write the heatmap alone, <name>.<method>.<class>.heatmap.png, at the image's resolution.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Explain on a Ray cluster (host:port or ray://host:port) [default: RAY_ADDRESS, else Ray on this "
                   "machine]; --out must be a folder every node shares. Also writes onnxcam-results.parquet there.")
@click.option("--task", type=click.Choice(["auto", "classify", "detect", "segment", "ocr"]), default="auto",
              show_default=True, help="What the output is; auto reads it from the output's shape (onnxcam/tasks); "
                                      "ocr: a CTC text recognizer.")
@click.option("--conf", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="Detections: the score above which a detection is drawn and explained.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, metavar="N",
              help="Detections / segmentation classes / characters: explain the N best (first) (one map each).")
@click.option("--decode", type=click.Choice(["yolov8", "yolov8t", "yolov5"]),
              help="Detection head layout: yolov8 (N, 4+C, A), yolov8t (N, A, 4+C), yolov5 (N, A, 5+C) [default: "
                   "read from the output's shape].")
@debug_option
def explain(model, inputs, methods, layers, target, output, out, size, mean, std, layout, bgr, labels, device,
            batch_size, max_pixels, save_raw, resume, bare, report, heatmap, ray_address, task="auto", conf=0.25, top=5,
            decode=None):
    """Explain MODEL's predictions on INPUTS (image files, or folders searched recursively).

    Writes, per image and method: an overlay PNG (the heatmap on the image, at its original resolution, with a
    caption above it unless --bare), with --heatmap the heatmap alone, and one JSON per image with the top
    classes, target, layer, method, model hash and timings. Reading, the model and writing overlap; results are printed in input
    order, with a progress bar on a terminal (else a progress line per batch) when there are several batches.
    Preprocessing comes from the model's metadata (onnxcam.preprocess) where present; options override it.
    With --layer, the file names carry the layer; class-agnostic methods (eigencam, kpca_cam) write one map.
    Images that cannot be read or explained (too large, not finite numbers) are reported and skipped; the others
    are explained and the exit status is 1. A map that is zero everywhere is reported, and gets no pictures.

    \b
    Examples:
        onnxcam explain resnet50.onnx cat.jpg --labels imagenet
        onnxcam explain model.onnx photos/ --method gradcam,hirescam --target top3 --out maps/
        onnxcam explain model.onnx photos/ --out maps/ --resume --report
        onnxcam explain tf_model.onnx dog.png --size 224x224 --mean 0.5 --std 0.5 --target 207
    """
    from .pipeline import Runner, configure_process, find_images, model_workers, share_cores

    _refuse_input_in_out(inputs, out)
    ctx = click.get_current_context()
    ctx.call_on_close(configure_process())  # onnxruntime and malloc settings (RSS, CPU)
    given = {name for name in ("target", "conf", "top", "decode")
             if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    # not given: None, so that a task that has no use for them can tell them from a choice (tasks/run.py)
    task_target, task_conf, task_top = (v if name in given else None for name, v in
                                        (("target", target), ("conf", conf), ("top", top)))
    if task != "classify" and ray_address is None:  # detectors and segmenters: onnxcam/tasks/run.py
        from .tasks.run import run_cli
        status = run_cli(model, inputs, out=out, echo=click.echo, task=task, method=methods, conf=task_conf,
                         top=task_top, decode=decode, layers=list(layers) or None, size=size, mean=mean, std=std,
                         layout=layout, bgr=bgr, labels=labels, device=device, output=output, max_pixels=max_pixels,
                         resume=resume, target=task_target, save_raw=save_raw, caption=not bare,
                         batch_size=batch_size, report=report, heatmap=heatmap)
        if status is not None:
            sys.exit(status)
    unused = sorted(given & {"conf", "top", "decode"})
    if unused and ray_address is None:  # the classifier's path has no detections, classes maps or characters
        raise click.UsageError(f"{', '.join('--' + u for u in unused)}: for --task detect, segment or ocr; "
                               f"{model} is explained as a classifier (--target chooses its classes)")
    files = find_images(inputs, exclude=[out])
    if ray_address is not None:  # the same files from actors on a Ray cluster, plus a table (onnxcam.ray)
        from .ray import TABLE_NAME, explain_files

        if report:
            raise click.UsageError("--report is not available with --ray (the table is onnxcam-results.parquet)")
        s = explain_files(files, model, out, address=ray_address or None, methods=methods, target=task_target,
                          layers=list(layers) or None, save_raw=save_raw, batch_size=batch_size, size=size, mean=mean,
                          std=std, layout=layout, bgr=bgr, labels=labels, device=device, output=output,
                          max_pixels=max_pixels, caption=not bare, resume=resume, task=task, conf=task_conf, top=task_top,
                          decode=decode, heatmap=heatmap)
        for error in s.failed.values():
            click.echo(f"Error: {error}", err=True)
        tasks = ", ".join(sorted(s.tasks - {"classify"}))
        kept = f"; {s.kept} skipped (explained before)" if s.kept else ""
        click.echo(f"Explained {s.images - len(s.failed) - s.kept} of {s.images} images with {', '.join(methods)}"
                   f"{f' (task {tasks})' if tasks else ''} on Ray in {s.seconds:.1f} s{kept}; wrote {s.written} "
                   f"files and {TABLE_NAME} to {_show(out)}")
        sys.exit(1 if s.failed else 0)
    workers = model_workers(len(files), batch_size)
    share_cores(workers)  # undone with configure_process's settings when the command ends
    runner = Runner(model, methods=methods, layers=list(layers) or None, target=target, size=size, mean=mean,
                    std=std, layout=layout, bgr=bgr, labels=labels, device=device, out=out, save_raw=save_raw,
                    output=output, max_pixels=max_pixels, resume=resume, caption=not bare, model_workers=workers,
                    heatmap=heatmap)
    if runner.quantized:
        click.echo(f"Note: {runner.differentiated_as}")
    start, failed, written, entries = time.perf_counter(), 0, 0, []
    shown = _Feedback(len(files), several=len(files) > batch_size)
    for batch in runner.run(files, batch_size):
        for rep in batch:
            failed += shown.report(rep)
            written += 0 if rep.skipped else _count_files(rep)
            entries += runner.sheet_entries(rep) if report else []
        shown.batch(batch)
    shown.close()
    if report:
        from .audit.sheet import write_contact_sheet

        write_contact_sheet(out, entries)
        written += 1
    skipped = shown.progress.skipped
    done = len(files) - failed - skipped
    took = time.perf_counter() - start
    status = (f"; {failed} failed" if failed else "") + (f"; {skipped} skipped (explained before)" if skipped else "")
    click.echo(f"Explained {done} of {len(files)} images with {', '.join(methods)} in {took:.1f} s "
               f"({took / max(done, 1):.2f} s/image){status}; wrote {written} files to {_show(out)}")
    if failed:
        sys.exit(1)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@model_options
@click.option("--all", "show_all", is_flag=True, help="Also list plumbing tensors (Pad, Reshape, Transpose, ...).")
@debug_option
def layers(model, size, mean, std, layout, bgr, show_all):
    """List MODEL's candidate target layers: 4-D activations on the way to the score.

    Columns: the ONNX tensor name (what --layer takes), the op that produces it, its shape, the module it
    belongs to where the exporter recorded one, and whether every op between it and the score has a gradient
    rule. '*' marks the automatic choice (the last spatial activation).

    \b
    Example:
        onnxcam layers model.onnx
        onnxcam explain model.onnx cat.jpg --layer "/layer3/layer3.5/relu_2/Relu_output_0"
    """
    from .modelinfo import candidate_layers, open_model

    m = open_model(model, size=size, mean=mean, std=std, layout=layout, bgr=bgr)
    rows = candidate_layers(m, show_all)
    if m.size_note:
        click.echo(m.size_note)
    if not rows:
        click.echo(f"0 candidate layers: {m.problems.get('layer', 'no 4-D activation on the path to the score')}")
        return
    headers = ("", "tensor", "op", "shape", "module", "gradient")
    table = [("*" if r.default else "", r.name, r.op, r.shape, r.module or "",
              f"no rule for {', '.join(r.missing)}" if r.missing else "ok") for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    for row in [headers] + table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    rule = getattr(m.graph, "layer_rule", None)  # which rule of onnxcam/tasks/choose.py picked it
    click.echo(f"{f'Rule: {rule}. ' if rule else ''}{len(rows)} candidate layers; * = the automatic choice "
               f"({m.default_layer})")
    scales = _scale_layers(m)
    if scales is not None:
        from .tasks.run import SCALE_METHODS

        click.echo(f"`onnxcam explain` ({', '.join(sorted(SCALE_METHODS))}) explains each detection at its own "
                   f"scale's layer instead: {', '.join(scales.names)} (rule: {scales.rule})")


def _scale_layers(m):
    """A raw multi-scale detection head's per-scale layers, which `onnxcam explain` takes (tasks/run.py), else
    None."""
    from .tasks.choose import scale_layers, selection_of, task_of

    if m.score is None or m.default_layer is None or task_of(m.graph, m.score) != "detect":
        return None
    selection = selection_of(m.graph)
    return None if selection is not None and selection.score == m.score else scale_layers(m.graph, m.score)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@model_options
@debug_option
def info(model, size, mean, std, layout, bgr):
    """Describe MODEL: inputs and outputs, opset, producer, the detected logits, the preprocessing found in its
    metadata, and whether every op on the path to the score has a gradient rule (unsupported ops listed).

    \b
    Example:
        onnxcam info model.onnx
    """
    from .modelinfo import describe, open_model

    m = open_model(model, size=size, mean=mean, std=std, layout=layout, bgr=bgr)
    for key, value in describe(m):
        lines = value.splitlines() or [""]
        click.echo(f"{key:12s}{lines[0]}")
        for line in lines[1:]:
            click.echo(f"{'':12s}{line}")


def _parse_export_method(_ctx, _param, value: str) -> str:
    from .export import exportable_method

    try:
        return exportable_method(value.strip().lower())
    except OnnxCamError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path, dir_okay=False), metavar="OUT.onnx",
              help="The model file to write.")
@click.option("--method", default="gradcam", show_default=True, callback=_parse_export_method,
              help="gradcam, hirescam, gradcam_elementwise, gradcam++, xgradcam, layercam or counterfactual_gradcam.")
@click.option("--layer", "layers", multiple=True, metavar="NAME",
              help="Target layer (tensor name or module path); repeat for several [default: the last spatial one].")
@click.option("--top-k", "top_k", type=click.IntRange(min=1), metavar="K",
              help="Explain each sample's K best classes: cam is then (N, K, H, W).")
@click.option("--class-input", is_flag=True,
              help="Add the input cam_target (N, K) int64 of classes to explain (-1: the class ranked there).")
@click.option("--size", callback=_parse_size, metavar="HxW",
              help="Input size to build for; needed when the model's spatial size is dynamic.")
@click.option("--output", "output", metavar="NAME", help="The model output whose classes are explained.")
@debug_option
def export(model, out, method, layers, top_k, class_input, size, output):
    """Write MODEL with its explanation in the graph: OUT.onnx runs wherever ONNX runs, no onnxcam needed.

    OUT.onnx keeps MODEL's inputs and outputs and adds `cam` (N, H, W) in [0, 1] at the input's size,
    `cam_class` (the explained class of each sample, by default its top class) and `cam_raw` (the map before
    ReLU and scaling, at the layer's size). Its metadata names the method, layers, score and onnxcam version.

    \b
    Example:
        onnxcam export model.onnx -o model-cam.onnx --method hirescam
        python -c "import onnxruntime as ort, numpy as np; s = ort.InferenceSession('model-cam.onnx'); ..."
    """
    from .export import export as export_model

    if out.exists() and out.is_dir():
        raise click.BadParameter(f"{out} is a folder, not a file", param_hint="'-o'")
    start = time.perf_counter()
    options = {"output": output} if output else {}
    exported = export_model(model, method, list(layers) or None, top_k=top_k, size=size, class_input=class_input,
                            path=out, **options)
    layers_used = json.loads(next(p.value for p in exported.metadata_props if p.key == "onnxcam.layers"))
    click.echo(f"wrote {out}: {method} of {', '.join(layers_used)}"
               f"{f' for the top {top_k} classes' if top_k else ''} ({time.perf_counter() - start:.1f} s)")


COMPARE_BELOW = 3  # onnxcam compare's exit status when an agreement figure is below --fail-under


def _per_model(values, n: int, option: str, parse=lambda v: v) -> list:
    """Values of a per-model option: 'K=VALUE' for the K-th model (1-based), a bare VALUE for every model."""
    out = [None] * n
    for value in values:
        k, sep, rest = value.partition("=")
        targets = range(n)
        if sep and k.isdigit():
            if not 1 <= int(k) <= n:
                raise click.BadParameter(f"{value!r}: there is no model {k} (models 1 to {n})", param_hint=option)
            targets, value = [int(k) - 1], rest
        parsed = parse(value)
        for t in targets:
            out[t] = parsed
    return out


def _model_number(value: str, n: int, option: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= n:
        raise click.BadParameter(f"{value!r} is not a model number (1 to {n}) or 'all'", param_hint=option)
    return int(value) - 1


def _evaluation_file(value: str, n: int) -> tuple[int | None, Path]:
    """'K=FILE' -> (K - 1, FILE); a bare FILE -> (None, FILE): the model the file names."""
    k, sep, rest = value.partition("=")
    return (_model_number(k, n, "'--evaluate'"), Path(rest)) if sep and k.isdigit() else (None, Path(value))


def _model_floats(name: str):
    def parse(value):
        return _parse_floats(None, type("P", (), {"name": name})(), value)
    return parse


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="MODEL_A MODEL_B "
                "[MODEL ...] IMAGES...")
@click.option("--out", default="onnxcam-compare", show_default=True, callback=_parse_out, metavar="DIR",
              help="Folder for report.html, report.json, report.csv and pictures/.")
@click.option("--method", "methods", default="gradcam", show_default=True, callback=_parse_methods,
              help="CAM methods, comma-separated.")
@click.option("--target", default="top1", show_default=True, metavar="top1|CLASS[,CLASS]",
              help="The classes every model explains: the first model's top-1, or class numbers or names of the "
                   "first model (mapped to each model's own by name when they order classes differently).")
@click.option("--fail-under", type=float, metavar="R",
              help=f"Exit with status {COMPARE_BELOW} when an agreement figure (top1, top5, pearson, spearman, "
                   "iou15) of any image is below R.")
@click.option("--layer", "layers", multiple=True, metavar="[K=]NAME",
              help="Target layer of model K (1-based), or of every model; repeat for several.")
@click.option("--size", "sizes", multiple=True, metavar="[K=]HxW", help="Input size of model K, or of every model.")
@click.option("--mean", "means", multiple=True, metavar="[K=]R,G,B", help="Mean of model K, or of every model.")
@click.option("--std", "stds", multiple=True, metavar="[K=]R,G,B", help="Std of model K, or of every model.")
@click.option("--layout", "layouts", multiple=True, metavar="[K=]auto|nchw|nhwc",
              help="Input layout of model K, or of every model.")
@click.option("--bgr", "bgrs", multiple=True, metavar="K|all", help="Feed model K (or all) BGR channels.")
@click.option("--labels", "labels", multiple=True, metavar="[K=]FILE",
              help="Class names of model K, or of every model ('imagenet' for the bundled list).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where onnxruntime runs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per run.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=MAX_PIXELS, show_default=True, metavar="N",
              help="Images with more pixels are skipped.")
@click.option("--evaluate", "evaluations", multiple=True, metavar="[K=]FILE",
              help="onnxcam evaluate's JSON of model K (bare: of the model the file names), shown in the report as "
                   "a method x metric table; repeat for several models.")
@click.option("--bare", is_flag=True, help="Write the side-by-side pictures without their labels (for composing "
                                           "your own figures).")
@debug_option
def compare(paths, out, methods, target, fail_under, layers, sizes, means, stds, layouts, bgrs, labels, device,
            batch_size, max_pixels, evaluations, bare):
    """Explain the same images with every model and compare each model with the first.

    Paths ending in .onnx are the models (at least two, the first is the reference); the others are images or
    folders. Each model keeps its own preprocessing, layer and class names (options prefixed K= apply to the
    K-th model only). Every model explains the same class: the first model's top-1 (a prediction flip is
    explained, not hidden) or --target's classes. Maps are compared at each image's resolution.

    \b
    Writes DIR/report.html (open it in a browser), report.json, report.csv and pictures/.
    Exit status: 0; 1 on errors (a model that cannot be opened or explained, images that fail: the report is
    still written and lists them); 3 when --fail-under is given and an agreement figure is below it.

    \b
    Examples:
        onnxcam compare model.onnx model-fp16.onnx model-int8.onnx photos/ --out audit/
        onnxcam compare torch.onnx keras.onnx cat.jpg --layout 2=nhwc --layer 2=conv5/out --fail-under 0.9
    """
    from .audit import ModelSpec, write_reports
    from .audit import compare as run_compare
    from .audit.report import page_text, read_evaluations

    models = [p for p in paths if p.suffix.lower() == ".onnx"]
    inputs = [p for p in paths if p.suffix.lower() != ".onnx"]
    if len(models) < 2 or not inputs:
        raise click.UsageError(f"give at least two models (.onnx) and one image or folder; got {len(models)} "
                               f"models and {len(inputs)} images")
    _refuse_input_in_out(inputs, out)
    n = len(models)
    layer_lists = [[] for _ in models]
    for value in layers:
        for k, name in enumerate(_per_model([value], n, "'--layer'")):
            if name is not None:
                layer_lists[k].append(name)
    bgr_set = {_model_number(b, n, "'--bgr'") for b in bgrs if b != "all"} | (set(range(n)) if "all" in bgrs else set())
    per = {"size": _per_model(sizes, n, "'--size'", lambda v: _parse_size(None, None, v)),
           "mean": _per_model(means, n, "'--mean'", _model_floats("mean")),
           "std": _per_model(stds, n, "'--std'", _model_floats("std")),
           "layout": [v or "auto" for v in _per_model(layouts, n, "'--layout'", _layout)],
           "labels": _per_model(labels, n, "'--labels'")}
    specs = [ModelSpec(m, layers=layer_lists[k] or None, bgr=k in bgr_set, **{key: v[k] for key, v in per.items()})
             for k, m in enumerate(models)]
    evaluated = read_evaluations(models, [_evaluation_file(v, n) for v in evaluations])
    start = time.perf_counter()
    result = run_compare(specs, inputs, out, methods=methods, target=target, device=device, batch_size=batch_size,
                         max_pixels=max_pixels, labelled=not bare)
    paths_written = write_reports(result, out, fail_under, {result.models[k]["name"]: r for k, r in evaluated.items()})
    click.echo(f"Compared {len(result.images)} images with {n} models ({', '.join(methods)}) in "
               f"{time.perf_counter() - start:.1f} s; against {result.models[0]['name']}:")
    click.echo(page_text(result))
    for f in result.failures:
        click.echo(f"Error: {f.image}{' with model ' + f.model if f.model else ''}: {f.error}", err=True)
    click.echo(f"Report: {_show(paths_written['html'])}")
    if result.failures or not result.images:
        sys.exit(1)
    if fail_under is not None:
        below = result.below(fail_under)
        if below:
            worst = min((r[f], f, r["model"], r["image"], r["method"]) for r in below for f in r["below"])
            click.echo(f"{len(below)} comparisons below --fail-under {fail_under}; the lowest: {worst[1]} "
                       f"{worst[0]:.4f} ({worst[2]} on {worst[3]}, {worst[4]})", err=True)
            sys.exit(COMPARE_BELOW)


def _layout(value: str) -> str:
    if value.lower() not in ("auto", "nchw", "nhwc"):
        raise click.BadParameter(f"{value!r} is not auto, nchw or nhwc", param_hint="'--layout'")
    return value.lower()


# ---- output helpers --------------------------------------------------------------------------------------------
def _parse_metrics(_ctx, _param, value: str) -> list[str]:
    from .evaluate import METRICS

    metrics = list(dict.fromkeys(m.strip().lower() for m in value.split(",") if m.strip()))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise click.BadParameter(f"unknown metric {', '.join(unknown) or repr(value)}; choose from {', '.join(METRICS)}")
    return metrics


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--method", "methods", default="gradcam,hirescam", show_default=True, callback=_parse_methods,
              help="CAM methods to compare, comma-separated.")
@click.option("--metric", "metrics", default="deletion,insertion,road", show_default=True, callback=_parse_metrics,
              help="Metrics, comma-separated: deletion, insertion, road, pointing, energy, sanity.")
@click.option("--boxes", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help='Objects for pointing/energy: JSON {"image name": [[x1, y1, x2, y2], ...]} in image pixels.')
@click.option("--layer", "layers", multiple=True, metavar="NAME", help="Target layer; repeat for several.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="Deletion/insertion perturbation steps.")
@click.option("--stages", type=click.IntRange(min=1), default=4, show_default=True,
              help="Randomization stages of the sanity check (top first, cumulative).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of ROAD's noise and the random weights.")
@click.option("--json", "json_path", default="onnxcam-evaluate.json", show_default=True, metavar="FILE",
              type=click.Path(path_type=Path, dir_okay=False), help="Where the JSON results are written.")
@model_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where onnxruntime runs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images per batch.")
@debug_option
def evaluate(model, inputs, methods, metrics, boxes, layers, steps, stages, seed, json_path, size, mean, std, layout,
             bgr, device, batch_size):
    """Which map to trust: score CAM methods on images with faithfulness metrics; a table and a JSON file.

    Each image is explained for its top class. Lower is better for deletion and sanity (the Spearman
    correlation of the maps with those of the randomized model), higher for the others.

    \b
    Example:
        onnxcam evaluate model.onnx photos/ --method gradcam,hirescam,scorecam --metric deletion,insertion,road
    """
    from .evaluate import BOX_METRICS
    from .evaluate import evaluate as run_evaluation
    from .evaluate import write_json as write_evaluation
    from .pipeline import find_images

    needing = [m for m in metrics if m in BOX_METRICS]
    if needing and boxes is None:
        raise click.UsageError(f"metric {', '.join(needing)} needs --boxes FILE")
    files = find_images(inputs)
    result = run_evaluation(model, [f.path for f in files], methods, metrics, boxes=boxes, layers=list(layers) or None,
                            steps=steps, batch_size=batch_size, stages=stages, seed=seed, device=device, size=size,
                            mean=mean, std=std, layout=layout, bgr=bgr)
    write_evaluation(json_path, result)
    click.echo(f"{len(files)} images, layer {', '.join(result.layers)}")
    click.echo(result.table())
    click.echo(f"wrote {json_path}")


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


class _Feedback:
    """explain's console while it runs. Over several batches: on a terminal a bar on stderr, redrawn in place,
    with only the images that failed or have a zero map printed; otherwise every image's line and a progress line
    per batch, on stdout (stderr carries only errors). Drawn once at the start: feedback as soon as the model is
    loaded. Images skipped by --resume are counted, not listed."""

    def __init__(self, total: int, several: bool):
        from .pipeline import Progress

        self.progress, self.several = Progress(total), several
        self.bar = several and _stderr_is_terminal()
        self._drawn = 0
        self._show()

    def report(self, rep) -> int:
        """Print one image's result as fits; return 1 if it failed."""
        if rep.skipped:
            return 0
        if self.bar and rep.ok and not any(m.zero for m in rep.maps):
            return 0
        self._wipe()
        return _echo_report(rep)

    def batch(self, reports) -> None:
        self.progress.add(reports)
        self._show()

    def close(self) -> None:
        self._wipe()

    def _show(self) -> None:
        if self.bar:
            text = self.progress.bar()
            click.echo("\r" + text.ljust(self._drawn), err=True, nl=False)
            self._drawn = len(text)
        elif self.several:
            click.echo(self.progress.line())

    def _wipe(self) -> None:
        if self._drawn:
            click.echo("\r" + " " * self._drawn + "\r", err=True, nl=False)
            self._drawn = 0


def _echo_report(rep) -> int:
    """Print one image's result (or its error on stderr); return 1 if it failed.

    The image's best class, and the file it points to when every map explains that class; else one line per map
    naming the class it explains (or that it is class-agnostic, or zero everywhere)."""
    if not rep.ok:
        hint = " (raise the limit with --max-pixels)" if isinstance(rep.exception, ImageTooLargeError) else ""
        click.echo(f"Error: {rep.error}{hint}", err=True)
        return 1
    c, label, p = rep.top[0]
    line = f"  {rep.image.path.name:14s} {c:>5} {label} ({p:.2f})"
    if rep.maps and all(m.target == c and m.zero is None for m in rep.maps):
        click.echo(f"{line} -> {_show(rep.maps[0].files['overlay'])}")
        return 0
    click.echo(line)
    for m in rep.maps:
        click.echo(f"      {_explained(m)}")
    return 0


def _explained(m) -> str:
    """One map: its method, the class it explains, and its picture or why it has none."""
    what = "class-agnostic" if m.agnostic else f"{m.target:>5} {m.label} ({m.score:.2f})"
    if m.zero:
        return f"{m.method:9s} {what}: zero map: {m.zero} (no picture written)"
    return f"{m.method:9s} {what} -> {_show(m.files['overlay'])}"


def _refuse_input_in_out(inputs, out: Path) -> None:
    """An input folder that is the output folder, or inside it, would yield no images: the output folder is
    skipped when folders are searched (so a second run does not explain the first run's pictures)."""
    where = out.resolve()
    for given in inputs:
        p = Path(given)
        if p.is_dir() and (p.resolve() == where or where in p.resolve().parents):
            relation = "is also" if p.resolve() == where else "is inside"
            raise click.BadParameter(f"the input folder {given} {relation} the output folder, which is skipped when "
                                     "looking for images; choose another output folder", param_hint="'--out'")


def _count_files(rep) -> int:
    return sum(len(m.files) for m in rep.maps) + (rep.json_path is not None)


def _peak_x(mask: np.ndarray) -> float:
    """Horizontal position of the map's maximum, as a fraction of its width."""
    _, x = np.unravel_index(int(np.argmax(mask)), mask.shape)
    return (x + 0.5) / mask.shape[1]


def _show(path: Path) -> str:
    """path as printed: relative to the working folder when inside it. Its folder is resolved once: explain prints
    a path per image, and resolving walks the path a syscall per part (each a wait for the GIL while the writer
    threads hold it)."""
    path = Path(path)
    try:
        return str((_resolved(path.parent) / path.name).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@functools.lru_cache(maxsize=16)
def _resolved(folder: Path) -> Path:
    return folder.resolve()

