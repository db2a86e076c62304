"""The onnxcam command line, through click's CliRunner: every command, every bad input, exact exit statuses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam.cli import DEMO_MODEL, DEMO_SAMPLES, main
from onnxcam.errors import ModelError

LITE0 = str(DEMO_MODEL)
DECODE_ERROR = "not an image, or a format OpenCV cannot read"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    for name in ("chelsea.png", "coffee.png"):
        shutil.copy(DEMO_SAMPLES / name, d / name)
    return d


def op_without_rule() -> str:
    """A standard op that onnxruntime runs and onnxcam cannot differentiate (its derivative is 0 almost everywhere)."""
    from onnxcam.autodiff.rules import find_rule, load_all

    load_all()
    for op in ("Round", "Floor", "Ceil", "Sign"):
        if find_rule(op, 17) is None:
            return op
    pytest.skip("every candidate op has a gradient rule now")


def tiny_model(path, shape=("N", 3, 8, 8), *, nhwc=False, unsupported=False, classes=3):
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> [an op without gradient rule] -> Gemm, built by hand."""
    rng = np.random.default_rng(0)
    c_in = shape[3] if nhwc else shape[1]
    inits = [numpy_helper.from_array(rng.standard_normal((4, c_in, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((classes, 4)).astype(np.float32), "fc")]
    nodes, x = [], "x"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]))
        x = "x_nchw"
    nodes += [helper.make_node("Conv", [x, "w"], ["conv"], pads=[1, 1, 1, 1], name="/features/conv/Conv"),
              helper.make_node("Relu", ["conv"], ["relu"], name="/features/relu/Relu"),
              helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
              helper.make_node("Flatten", ["pool"], ["flat"])]
    feat = "flat"
    if unsupported:
        nodes.append(helper.make_node(unsupported, ["flat"], ["odd"], name="odd"))
        feat = "odd"
    nodes.append(helper.make_node("Gemm", [feat, "fc"], ["logits"], transB=1))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxcam-tests")
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def one_line_error(result, code=1) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# ---- help --------------------------------------------------------------------------------------------------------
def test_every_command_has_help():
    assert run("--help").exit_code == 0
    assert set(main.commands) == {"demo", "explain", "layers", "info", "export", "evaluate", "compare"}
    for name, command in main.commands.items():
        result = run(name, "--help")
        assert result.exit_code == 0, name
        first = command.help.strip().splitlines()[0]
        assert len(first) > 20 and first in " ".join(result.output.split()), name
        assert "--debug" in result.output
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, (name, param.name)


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "onnxcam", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"onnxcam, version {onnxcam.__version__}"


def test_the_process_ends_with_the_commands_status_and_output(tmp_path, monkeypatch):
    """cli.run (the console script, python -m onnxcam) leaves by os._exit after the command: its status, its
    whole output through a pipe, the one-line error of a bad input, click's usage status, and the atexit handlers
    (logging's, Ray's shutdown) still run."""
    def onnxcam_cmd(*args):
        return subprocess.run([sys.executable, "-m", "onnxcam", *args], check=False, capture_output=True, text=True)

    done = onnxcam_cmd("explain", LITE0, str(tmp_path / "missing.png"), "--out", str(tmp_path / "out"))
    missing = f"Error: no such file or folder: {tmp_path / 'missing.png'}"
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [missing]
    assert onnxcam_cmd("explain").returncode == 2
    done = onnxcam_cmd("layers", LITE0)
    assert done.returncode == 0 and done.stdout.rstrip().endswith(")") and "candidate layers" in done.stdout
    code = ("import atexit, sys, threading, time; from concurrent.futures import ThreadPoolExecutor; "
            "from onnxcam import cli; atexit.register(lambda: print('atexit ran')); "
            "ThreadPoolExecutor(1).submit(time.sleep, 0.2); "  # an idle pool left open: let go, not waited on
            "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start(); "
            "sys.argv = ['onnxcam', '--version']; cli.run()")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.splitlines()[-2:] == ["thread done", "atexit ran"]


# ---- explain -----------------------------------------------------------------------------------------------------
def test_explain_writes_overlays_heatmaps_json_and_raw(photos, tmp_path):
    out = tmp_path / "out"
    result = run("explain", LITE0, photos / "chelsea.png", "--method", "gradcam,hirescam", "--out", out, "--save-raw",
                 "--heatmap")
    assert result.exit_code == 0, result.output + result.stderr
    assert "285 Egyptian cat (0.78)" in result.output
    assert result.output.splitlines()[-1].startswith("Explained 1 of 1 images with gradcam, hirescam in ")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["chelsea.gradcam.285.heatmap.png", "chelsea.gradcam.285.npz", "chelsea.gradcam.285.overlay.png",
                     "chelsea.hirescam.285.heatmap.png", "chelsea.hirescam.285.npz",
                     "chelsea.hirescam.285.overlay.png", "chelsea.json"]
    from onnxcam import image
    assert image.read_image(out / "chelsea.gradcam.285.overlay.png").shape[1:] == (451, 3)  # + a caption band
    assert image.read_image(out / "chelsea.gradcam.285.heatmap.png").shape == (300, 451, 3)
    record = json.loads((out / "chelsea.json").read_text())
    assert record["top"][0] == {"class": 285, "label": "Egyptian cat", "score": pytest.approx(0.781, abs=0.01)}
    assert len(record["top"]) == 5 and record["target"] == "top1"
    assert record["layers"] == ["/_swish_1/Clip_output_0"]
    from onnxcam import Explainer
    assert record["model_hash"] == Explainer(LITE0).digest
    assert [(e["method"], e["class"], e["overlay"], e["heatmap"]) for e in record["explanations"]] == [
        ("gradcam", 285, "chelsea.gradcam.285.overlay.png", "chelsea.gradcam.285.heatmap.png"),
        ("hirescam", 285, "chelsea.hirescam.285.overlay.png", "chelsea.hirescam.285.heatmap.png")]
    assert set(record["timings"]) == {"read_s", "explain_s", "write_s"}
    assert set(record["timings"]["explain_s"]) == {"gradcam", "hirescam"}
    assert record["preprocess"]["size"] == [224, 224] and record["preprocess"]["sources"]["mean"] == "metadata"
    raw = np.load(out / "chelsea.gradcam.285.npz")
    assert raw["map"].shape == (224, 224) and raw["lowres_0"].shape == (7, 7)
    assert raw["activations_0"].shape == raw["gradients_0"].shape == (1280, 7, 7)
    assert raw["logits"].shape == (1000,) and int(raw["target"]) == 285
    assert not list(out.glob(".*"))  # no temp files left behind


def test_without_heatmap_the_overlay_and_json_alone_and_resume_tells_them_apart(photos, tmp_path):
    """The heatmap alone is opt-in: by default an overlay per map and the JSON. --resume takes an image as done only
    when its files were made with the same choice (with heatmaps or without)."""
    out = tmp_path / "out"
    assert run("explain", LITE0, photos / "chelsea.png", "--out", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["chelsea.gradcam.285.overlay.png", "chelsea.json"]
    assert "heatmap" not in json.loads((out / "chelsea.json").read_text())["explanations"][0]
    again = run("explain", LITE0, photos / "chelsea.png", "--out", out, "--resume", "--heatmap")
    assert again.exit_code == 0 and "skipped" not in again.output
    assert (out / "chelsea.gradcam.285.heatmap.png").exists()
    same = run("explain", LITE0, photos / "chelsea.png", "--out", out, "--resume", "--heatmap")
    assert "1 skipped (explained before)" in same.output
    without = run("explain", LITE0, photos / "chelsea.png", "--out", out, "--resume")
    assert "skipped" not in without.output


def test_explain_targets_by_rank_number_and_name(photos, tmp_path):
    result = run("explain", LITE0, photos / "chelsea.png", "--target", "top2", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "chelsea.gradcam.285.overlay.png").exists()
    assert (tmp_path / "chelsea.gradcam.282.overlay.png").exists()  # tiger cat, the runner-up
    result = run("explain", LITE0, photos / "chelsea.png", "--target", "egyptian cat,967", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "b" / "chelsea.json").read_text())
    assert [(e["class"], e["label"]) for e in record["explanations"]] == [(285, "Egyptian cat"), (967, "espresso")]


def test_explain_a_chosen_layer(photos, tmp_path):
    layer = "/_conv_head/Conv_output_0"
    result = run("explain", LITE0, photos / "coffee.png", "--layer", layer, "--out", tmp_path, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    # a layer chosen by name is in the file names (sanitized, with a hash of the real name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"coffee.conv_head_Conv_output_0-3e674f.{kind}" for kind in ("gradcam.967.overlay.png", "json")]
    record = json.loads((tmp_path / "coffee.conv_head_Conv_output_0-3e674f.json").read_text())
    assert record["layers"] == [layer] and record["top"][0]["class"] == 967


def test_output_names_stay_unique(tmp_path):
    from onnxcam.pipeline import find_images

    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/x.png", "a/x.jpg", "a/deep/x.png", "a/.hidden.png", "a/readme.txt"):
        (tmp_path / name).write_bytes(b"")
    found = find_images([tmp_path / "a", tmp_path / "a" / "x.png"])  # x.png given twice: explained once
    assert [(f.path.relative_to(tmp_path).as_posix(), f.base.as_posix()) for f in found] == [
        ("a/deep/x.png", "deep/x"), ("a/x.jpg", "x"), ("a/x.png", "x_png")]


def test_folder_run_reports_and_skips_unreadable_images(photos, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(photos / "chelsea.png", folder / "chelsea.png")
    shutil.copy(photos / "coffee.png", folder / "sub" / "coffee.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (folder / "notes.txt").write_text("not an image, and not picked up")
    out = tmp_path / "out"
    result = run("explain", LITE0, folder, "--out", out, "--batch-size", "2")
    line = one_line_error(result, 1)
    assert line == f"Error: cannot decode image {folder / 'broken.jpg'}: {DECODE_ERROR}"
    assert "Explained 2 of 3 images with gradcam" in result.output and "; 1 failed;" in result.output
    assert (out / "chelsea.json").exists() and (out / "sub" / "coffee.json").exists()
    assert (out / "sub" / "coffee.gradcam.967.overlay.png").exists()
    assert not (out / "broken.json").exists()


def test_never_writes_over_an_input_and_skips_its_own_output_folder(photos, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photos / "chelsea.png", folder / "chelsea.png")
    for _ in range(2):  # the second run must not pick up the first run's pictures as inputs
        result = run("explain", LITE0, folder, "--out", folder / "maps")
        assert result.exit_code == 0 and "Explained 1 of 1 images" in result.output
    # An input that has the name of an output, in the output folder: refused, and left as it was.
    victim = folder / "chelsea.gradcam.285.overlay.png"
    shutil.copy(photos / "coffee.png", victim)
    before = victim.read_bytes()
    result = run("explain", LITE0, folder / "chelsea.png", victim, "--out", folder)
    assert one_line_error(result) == (f"Error: refusing to write over the input file {victim}: "
                                      "choose another output folder (option --out DIR)")
    assert victim.read_bytes() == before


# ---- bad input: one line, exit status 1; usage errors 2 ----------------------------------------------------------
def test_missing_model(photos):
    assert one_line_error(run("explain", "missing.onnx", photos)) == "Error: model file not found: missing.onnx"


@pytest.mark.parametrize("content", [b"this is a text file, not a model\n", "truncated"])
def test_not_a_model_and_truncated_model(photos, tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(Path(LITE0).read_bytes()[:1_000_000] if content == "truncated" else content)
    for command in ("explain", "info", "layers"):
        args = (command, path, photos) if command == "explain" else (command, path)
        line = one_line_error(run(*args))
        assert line.startswith(f"Error: {path} is not a valid ONNX model (protobuf parse failed: "), line


def test_missing_image_and_undecodable_image(tmp_path):
    assert one_line_error(run("explain", LITE0, tmp_path / "nope.png")) == \
        f"Error: no such file or folder: {tmp_path / 'nope.png'}"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    result = run("explain", LITE0, bad, "--out", tmp_path / "out")
    assert one_line_error(result) == f"Error: cannot decode image {bad}: {DECODE_ERROR}"
    assert "Explained 0 of 1 images" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert one_line_error(run("explain", LITE0, empty)) == f"Error: no images found in folder {empty}"


def test_unsupported_op(photos, tmp_path):
    op = op_without_rule()
    model = tiny_model(tmp_path / "odd.onnx", unsupported=op)
    line = one_line_error(run("explain", model, photos / "chelsea.png", "--out", tmp_path / "out"))
    assert line.startswith("Error: no gradient rule for 1 op type(s)") and f"{op} (node 'odd'" in line, line
    result = run("info", model)
    assert result.exit_code == 0, result.stderr
    assert f"no gradient rule for: {op} (1 node)" in result.output
    assert "the automatic layer is affected" in result.output


def test_wrong_size_and_dynamic_size(photos, tmp_path):
    assert one_line_error(run("explain", LITE0, photos, "--size", "300x300")) == (
        "Error: size 300x300 does not match the model's input size 224x224 (input 'input', shape (?, 3, 224, 224)) "
        "(option --size HxW)")
    dynamic = tiny_model(tmp_path / "dyn.onnx", shape=("N", 3, "H", "W"))
    assert one_line_error(run("explain", dynamic, photos / "chelsea.png")) == (
        "Error: input 'x' has a dynamic spatial size (?, 3, ?, ?): give the size (H, W) (option --size HxW)")
    result = run("explain", dynamic, photos / "chelsea.png", "--size", "16x12", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "out" / "chelsea.json").read_text())
    assert record["preprocess"]["size"] == [16, 12] and record["top"][0]["label"].startswith("class ")


@pytest.mark.parametrize("option, value, message", [
    ("--size", "abc", "Invalid value for '--size': 'abc' is not HxW, e.g. 224x224 (or one number for a square)"),
    ("--method", "gradcam,nope", "Invalid value for '--method': unknown method nope; choose from "),
    ("--mean", "0.5,120,0.5", "Invalid value for '--mean': '0.5,120,0.5': values are in [0, 1] pixel units"),
    ("--std", "0.5,0.5", "Invalid value for '--std': '0.5,0.5': give 3 values (r,g,b) or 1 for all channels"),
    ("--batch-size", "0", "Invalid value for '--batch-size': 0 is not in the range x>=1."),
    ("--layout", "hwc", "Invalid value for '--layout': 'hwc' is not one of 'auto', 'nchw', 'nhwc'."),
])
def test_usage_errors_exit_2(photos, option, value, message):
    result = run("explain", LITE0, photos, option, value)
    assert result.exit_code == 2, result.output
    assert f"Error: {message}" in result.stderr and "Traceback" not in result.stderr


def test_labels_problems(photos, tmp_path):
    model = tiny_model(tmp_path / "tiny.onnx")
    assert one_line_error(run("explain", model, photos / "chelsea.png", "--labels", tmp_path / "none.txt")) == \
        f"Error: labels file not found: {tmp_path / 'none.txt'}"
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    line = one_line_error(run("explain", model, photos / "chelsea.png", "--labels", labels, "--out", tmp_path / "o"))
    assert line == f"Error: 2 class names (file {labels}) for a model with 3 classes"
    assert one_line_error(run("explain", model, photos / "chelsea.png", "--target", "zebra")) == (
        "Error: target 'zebra' is neither topK, a class number nor a class name "
        "(the model has no class names: give class numbers)")


def test_debug_shows_the_exception(photos):
    for args in (("--debug", "explain", "missing.onnx", photos), ("explain", "missing.onnx", photos, "--debug")):
        result = run(*args)
        assert result.exit_code == 1 and isinstance(result.exception, ModelError), args


# ---- other models: NHWC, dynamic, gray -------------------------------------------------------------------------
def test_nhwc_and_gray_models(photos, tmp_path):
    nhwc = tiny_model(tmp_path / "nhwc.onnx", shape=("N", 8, 8, 3), nhwc=True)
    result = run("explain", nhwc, photos / "coffee.png", "--out", tmp_path / "a", "--target", "2")
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "a" / "coffee.json").read_text())
    assert record["preprocess"]["layout"] == "nhwc" and record["preprocess"]["sources"]["layout"] == "model"
    assert "layout nhwc (model)" in run("info", nhwc).output
    gray = tiny_model(tmp_path / "gray.onnx", shape=("N", 1, 8, 8))
    result = run("explain", gray, photos / "coffee.png", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "b" / "coffee.json").read_text())["preprocess"]["color"] == "gray"


def test_output_picks_the_head_of_a_two_output_model(photos, tmp_path):
    """A model with a 3-class and a 5-class head: --output chooses which one's classes are explained."""
    path = tiny_model(tmp_path / "two.onnx")
    model = onnx.load(str(path))
    rng = np.random.default_rng(1)
    model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc2"))
    model.graph.node.append(helper.make_node("Gemm", ["flat", "fc2"], ["aux"], transB=1))
    model.graph.output.append(helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 5]))
    onnx.save(model, str(path))
    result = run("explain", path, photos / "coffee.png", "--out", tmp_path / "o", "--output", "aux", "--target", "4")
    assert result.exit_code == 0, result.stderr
    assert len(json.loads((tmp_path / "o" / "coffee.json").read_text())["top"]) == 5
    bad = run("explain", path, photos / "coffee.png", "--out", tmp_path / "o", "--output", "nope")
    assert "no output named 'nope'" in one_line_error(bad)
    assert onnxcam.Explainer(str(path), output="aux", device="cpu").score_name == "aux"


# ---- layers and info ---------------------------------------------------------------------------------------------
def test_layers_marks_the_automatic_choice():
    result = run("layers", LITE0)
    assert result.exit_code == 0, result.stderr
    lines = result.output.splitlines()
    assert lines[0].split() == ["tensor", "op", "shape", "module", "gradient"]
    chosen = [line for line in lines if line.startswith("*")]
    assert len(chosen) == 1 and chosen[0].split()[1:5] == ["/_swish_1/Clip_output_0", "Clip", "(N,", "1280,"]
    assert ["/_blocks.15/_project_conv/Conv_output_0", "Conv", "(N,", "320,", "7,", "7)",
            "_blocks.15._project_conv", "ok"] in [line.split() for line in lines]
    assert lines[-1].endswith("candidate layers; * = the automatic choice (/_swish_1/Clip_output_0)")


def test_layers_on_a_hand_built_model(tmp_path):
    result = run("layers", tiny_model(tmp_path / "t.onnx"))
    assert result.exit_code == 0, result.stderr
    rows = result.output.splitlines()[1:-1]
    assert [r.split()[:3] for r in rows] == [["conv", "Conv", "(N,"], ["*", "relu", "Relu"]]
    assert "features.relu" in rows[1] and rows[1].rstrip().endswith("ok")


def test_info_reports_io_preprocessing_labels_and_gradients():
    result = run("info", LITE0)
    assert result.exit_code == 0, result.stderr
    out = result.output
    for expected in ("Inputs      input: float32 (N, 3, 224, 224)", "Outputs     logits: float32 (N, 1000)",
                     "Producer    pytorch", "opsets: ai.onnx 17", "Logits      logits (N, 1000), from Gemm",
                     "Layer       /_swish_1/Clip_output_0 (N, 1280, 7, 7), from Clip",
                     "Preprocess  from the metadata (onnxcam.preprocess)",
                     "mean 0.498,0.498,0.498 (metadata), std 0.502,0.502,0.502 (metadata)",
                     "Labels      1000 class names in the metadata (onnxcam.labels)", "Gradients   "):
        assert expected in out, expected


def test_ranks_and_methods_share_one_run_and_match_separate_explanations(photos, tmp_path, monkeypatch):
    """--method gradcam,hirescam --target top3: one onnxruntime run per batch (3 seeds), maps equal to explaining
    each rank with each method on its own."""
    from onnxcam import Explainer
    from onnxcam.cam.api import explain
    from onnxcam.pipeline import Runner, find_images

    runner = Runner(LITE0, methods=("gradcam", "hirescam"), target="top3", out=tmp_path)
    calls = []
    real_run = Explainer.run
    monkeypatch.setattr(Explainer, "run", lambda self, *a, **k: calls.append(k) or real_run(self, *a, **k))
    files = find_images([photos / "chelsea.png", photos / "coffee.png"])
    (reports,) = list(runner.run(files, batch_size=2))
    assert calls == [{"top_k": 3}]
    monkeypatch.setattr(Explainer, "run", real_run)

    x = np.stack([onnxcam.image.to_input(onnxcam.image.read_image(f.path), runner.pre) for f in files])
    order = np.argsort(-runner.explainer.run(x).logits, axis=1)
    for j, rep in enumerate(reports):
        assert [(m.method, m.target) for m in rep.maps] == \
            [(method, int(order[j, r])) for method in ("gradcam", "hirescam") for r in range(3)]
        for m in rep.maps:
            r = [int(c) for c in order[j, :3]].index(m.target)
            alone = explain(runner.explainer, x, m.method, order[:, r].tolist())
            np.testing.assert_allclose(m.mask, alone.maps[j], atol=1e-5)
