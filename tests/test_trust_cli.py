"""The command line never lies: no silent NaN, no uniform picture for a zero map, strict JSON, one line for each bad
input (metadata, sizes, output folders, pipes, decompression bombs), and file names that never collide."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import threading
import zlib

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxcam.cli import DEMO_MODEL, DEMO_SAMPLES, main

LITE0 = str(DEMO_MODEL)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, code=1) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    if code == 1:
        assert result.stderr.splitlines() == lines, result.stderr
    return lines[0]


def strict_json(path):
    """json.loads that refuses NaN, Infinity and -Infinity (Python's json accepts them; JSON does not)."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}: not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def model(path, *, log_input=False, conv=None, fc=None, shape=("N", 3, 8, 8), metadata=None, avg_pool=None):
    """[Log ->] Conv -> Relu -> [AveragePool k x k | GlobalAveragePool] -> Flatten -> Gemm (3 classes), by hand."""
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) if conv is None else conv
    fc = rng.standard_normal((3, 4)).astype(np.float32) if fc is None else fc
    nodes, x = [], "x"
    if log_input:
        nodes.append(helper.make_node("Log", ["x"], ["logx"]))
        x = "logx"
    nodes += [helper.make_node("Conv", [x, "w"], ["conv"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["conv"], ["relu"])]
    if avg_pool:
        nodes.append(helper.make_node("AveragePool", ["relu"], ["pool"], kernel_shape=[avg_pool, avg_pool]))
    else:
        nodes.append(helper.make_node("GlobalAveragePool", ["relu"], ["pool"]))
    nodes += [helper.make_node("Flatten", ["pool"], ["flat"]), helper.make_node("Gemm", ["flat", "fc"], ["logits"],
                                                                                transB=1)]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(conv, "w"), numpy_helper.from_array(fc, "fc")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    return path


def picture(path, value=128, black=None):
    img = np.full((16, 16, 3), value, np.uint8)
    if black is not None:
        img[black] = 0
    assert cv2.imwrite(str(path), img)
    return path


# ---- 5. never a silent NaN, an empty map or a lie in the JSON ---------------------------------------------------
def test_an_image_with_non_finite_numbers_fails_alone_and_the_json_stays_strict(tmp_path):
    """x = pixel / 255 goes through Log: a black 2x2 block is -inf there; negative conv weights make it +inf after
    the Relu, so that image's activations and logits are not finite (by construction), the grey one's are."""
    path = model(tmp_path / "log.onnx", log_input=True, conv=-np.abs(np.random.default_rng(0).standard_normal(
        (4, 3, 3, 3))).astype(np.float32), metadata={"onnxcam.preprocess": json.dumps({"mean": [0], "std": [1]})})
    folder = tmp_path / "in"
    folder.mkdir()
    picture(folder / "grey.png")
    dark = picture(folder / "dark.png", black=(slice(4, 8), slice(4, 8)))  # 2x2 black after the 16 -> 8 shrink
    out = tmp_path / "out"
    result = run("explain", path, folder, "--out", out)
    line = one_line_error(result)
    assert line.startswith(f"Error: image {dark}: the activation of layer 'relu' holds Inf"), line
    assert "Explained 1 of 2 images" in result.output and "; 1 failed;" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["grey.gradcam.1.overlay.png", "grey.json"]
    record = strict_json(out / "grey.json")
    assert record["top"][0]["class"] == 1 and record["explanations"][0]["zero_map"] is None


@pytest.mark.parametrize("case", ["zero-weight head", "counterfactual of the top class"])
def test_a_zero_map_is_said_and_gets_no_picture(tmp_path, case):
    if case == "zero-weight head":  # every logit is 0: the gradient at the layer is 0 for every class
        path, args = model(tmp_path / "zero.onnx", fc=np.zeros((3, 4), np.float32)), ("--target", "1")
        image, cls, reason = picture(tmp_path / "grey.png"), 1, "the target's gradient at relu is zero"
        method = "gradcam"
    else:  # nothing in the cat photo argues against the cat: the raw map is negative everywhere
        path, args = LITE0, ("--method", "counterfactual_gradcam", "--save-raw")
        image, cls, method = DEMO_SAMPLES / "chelsea.png", 285, "counterfactual_gradcam"
        reason = "the counterfactual_gradcam map at /_swish_1/Clip_output_0 is nowhere positive (the map keeps " \
                 "only positive values)"
    out = tmp_path / "out"
    result = run("explain", path, image, "--out", out, "--method", method, *args)
    assert result.exit_code == 0 and result.stderr == "", result.stderr  # said once, next to the image
    assert re.search(rf"\n +{method} +{cls} .*: zero map: {re.escape(reason)} \(no picture written\)\n",
                     result.output), result.output
    stem = image.stem
    assert not list(out.glob("*.png"))  # no uniform picture that looks like an answer
    (entry,) = strict_json(out / f"{stem}.json")["explanations"]
    assert entry["class"] == cls and entry["zero_map"] == reason
    assert "overlay" not in entry and "heatmap" not in entry


# ---- 7. every bad input gets one designed line --------------------------------------------------------------------
@pytest.mark.parametrize("meta, message", [
    ({"mean": [0.5, 0.5]}, ("mean must be a list of 3 numbers (r, g, b) or 1 for all channels, in [0, 1] pixel "
                            "units; got [0.5, 0.5]")),
    ({"std": ["a", "b", "c"]}, "std must be a list of 3 numbers (r, g, b) or 1 for all channels"),
    ({"mean": 0.5}, "mean must be a list of 3 numbers (r, g, b) or 1 for all channels"),
    ({"size": [8]}, "size must be [H, W], two positive integers, not [8]"),
])
def test_bad_metadata_preprocessing_names_the_metadata(tmp_path, meta, message):
    path = model(tmp_path / "m.onnx", metadata={"onnxcam.preprocess": json.dumps(meta)})
    for args in (("info", path), ("layers", path), ("explain", path, picture(tmp_path / "grey.png"))):
        line = one_line_error(run(*args))
        assert line.startswith(f"Error: metadata 'onnxcam.preprocess': {message}"), (args[0], line)


@pytest.mark.parametrize("size, message", [
    ("4x4", "the AveragePool node 'pool' would output shape (N, 4, -2, -2)"),
    ("1x1", "the AveragePool node 'pool' would output shape (N, 4, -5, -5)"),
])
def test_a_too_small_size_is_one_line_and_onnxruntime_stays_quiet(tmp_path, size, message):
    """A 7x7 pooling cannot run on a 1x1 or 4x4 map: one line, and not onnxruntime's own coloured log line
    (checked at the file-descriptor level: onnxruntime logs from C++, past Python's sys.stderr)."""
    path = model(tmp_path / "avg.onnx", shape=("N", 3, "H", "W"), avg_pool=7)
    image = picture(tmp_path / "grey.png")
    for args in (("explain", path, image, "--out", tmp_path / "out"), ("info", path), ("layers", path)):
        done = subprocess.run([sys.executable, "-m", "onnxcam", *map(str, args), "--size", size],
                              check=False, capture_output=True, text=True)
        assert done.returncode == 1, done.stderr
        assert done.stderr.splitlines() == [f"Error: the input size {size} is too small for this model: {message}"]


def test_layers_says_when_there_is_no_candidate(tmp_path):
    """At 1x1 every activation of this model is 1x1: nothing to explain, said in one line (it was a TypeError)."""
    path = model(tmp_path / "dyn.onnx", shape=("N", 3, "H", "W"))
    result = run("layers", path, "--size", "1x1")
    assert result.exit_code == 0, result.output + result.stderr
    assert result.output == ("0 candidate layers: found no 4-D activation with a spatial size > 1 on the path to the "
                             "score; name a layer\n")


def test_output_folder_problems_are_usage_errors(tmp_path):
    image = picture(tmp_path / "img.png")
    line = one_line_error(run("explain", LITE0, image, "--out", image), 2)
    assert line == f"Error: Invalid value for '--out': {image} is a file, not a folder"
    folder = tmp_path / "photos"
    folder.mkdir()
    picture(folder / "a.png")
    line = one_line_error(run("explain", LITE0, folder, "--out", folder), 2)
    assert line == (f"Error: Invalid value for '--out': the input folder {folder} is also the output folder, which "
                    "is skipped when looking for images; choose another output folder")
    line = one_line_error(run("explain", LITE0, folder, "--out", tmp_path), 2)
    assert f"the input folder {folder} is inside the output folder" in line
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path):
        result = runner.invoke(main, ["explain", LITE0, str(image), "--out", ""])
        line = one_line_error(result, 2)
        assert line == "Error: Invalid value for '--out': the folder name is empty; give a folder (--out . for the " \
                       "current one)"
        assert os.listdir(".") == []


# ---- 8. files and folders behave ----------------------------------------------------------------------------------
def bomb_png(path, side=20000):
    """A valid 1-bit grey PNG of side x side pixels in about 50 kB: zlib of all-zero rows, built a row at a time."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte 0, then the packed bits
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_skipped_before_decoding(tmp_path):
    """400 megapixels in a small file beside a photo: the bomb is refused from its header (no 1.2 GB decode), the
    photo explained, exit status 1."""
    path = model(tmp_path / "m.onnx")
    folder = tmp_path / "in"
    folder.mkdir()
    bomb = bomb_png(folder / "bomb.png")
    assert bomb.stat().st_size < 1_000_000
    shutil.copy(DEMO_SAMPLES / "chelsea.png", folder / "chelsea.png")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = run("explain", path, folder, "--out", tmp_path / "out")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert one_line_error(result) == (f"Error: image {bomb} is 20000x20000 pixels (400 megapixels), above the limit "
                                      "of 100 megapixels: not decoded (raise the limit with --max-pixels)")
    assert "Explained 1 of 2 images" in result.output and (tmp_path / "out" / "chelsea.json").exists()
    assert grown_mib < 300, grown_mib  # decoding it would take 400 MiB grey, then 1.2 GiB as color
    # the limit is an option: set below the photo's 451 x 300 pixels, the photo is refused too
    line = one_line_error(run("explain", path, folder / "chelsea.png", "--max-pixels", 100000, "--out", tmp_path))
    assert line.endswith("is 451x300 pixels (0 megapixels), above the limit of 0.1 megapixels: not decoded (raise "
                         "the limit with --max-pixels)")


@pytest.fixture
def fifo(tmp_path):
    """A named pipe; should a read block on it, a writer opens and closes it after a while so the test fails
    instead of hanging."""
    path = tmp_path / "pipe.png"
    os.mkfifo(path)

    def unblock():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    timer = threading.Timer(30, unblock)
    timer.start()
    yield path
    timer.cancel()


def test_named_pipes_are_refused(tmp_path, fifo):
    path = model(tmp_path / "m.onnx")
    grey = picture(tmp_path / "grey.png")
    result = run("explain", path, fifo, grey, "--out", tmp_path / "out")
    assert one_line_error(result) == f"Error: image path is a named pipe (FIFO), not a regular file: {fifo}"
    assert "Explained 1 of 2 images" in result.output
    line = one_line_error(run("explain", path, grey, "--labels", fifo, "--out", tmp_path / "out"))
    assert line == f"Error: labels file {fifo} is not a regular file"


def test_runs_on_two_layers_into_one_folder_keep_both(tmp_path):
    path = model(tmp_path / "m.onnx")
    grey = picture(tmp_path / "grey.png")
    out = tmp_path / "out"
    for layer in ("conv", "relu"):
        assert run("explain", path, grey, "--layer", layer, "--out", out, "--target", "0").exit_code == 0
    assert run("explain", path, grey, "--out", out, "--target", "0").exit_code == 0  # the automatic layer: relu
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"grey{tag}.{kind}" for tag in (".conv", ".relu", "")
        for kind in ("gradcam.0.overlay.png", "json"))
    assert strict_json(out / "grey.conv.json")["layers"] == ["conv"]
    assert strict_json(out / "grey.relu.json")["layers"] == ["relu"]


def test_a_class_agnostic_map_is_written_once(tmp_path):
    path = model(tmp_path / "m.onnx")
    grey = picture(tmp_path / "grey.png")
    out = tmp_path / "out"
    result = run("explain", path, grey, "--method", "eigencam,gradcam", "--target", "top3", "--out", out)
    assert result.exit_code == 0, result.stderr
    names = sorted(p.name for p in out.glob("*.overlay.png"))
    assert names == ["grey.eigencam.overlay.png"] + [f"grey.gradcam.{c}.overlay.png" for c in range(3)]
    assert re.search(r"\n +eigencam +class-agnostic -> \S*grey\.eigencam\.overlay\.png\n", result.output)
    entries = strict_json(out / "grey.json")["explanations"]
    assert [(e["method"], e["class"], e["class_agnostic"]) for e in entries[:1]] == [("eigencam", None, True)]
    assert sorted((e["method"], e["class"], e["class_agnostic"]) for e in entries[1:]) == [
        ("gradcam", c, False) for c in range(3)]


def test_the_console_names_the_class_each_file_explains(tmp_path):
    result = run("explain", LITE0, DEMO_SAMPLES / "chelsea.png", "--target", "tabby", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    lines = result.output.splitlines()
    assert lines[0].split() == ["chelsea.png", "285", "Egyptian", "cat", "(0.78)"]  # the prediction, no file
    assert re.fullmatch(r" +gradcam +281 tabby \(0\.\d\d\) -> \S*chelsea\.gradcam\.281\.overlay\.png", lines[1])
