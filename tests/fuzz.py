"""A seeded, bounded fuzzer of onnxcam's entry points: hostile models, external data, images and inputs.

Every case is one attempt to make onnxcam misbehave. Its outcome is one of:
  ok          onnxcam answered, and the answer checks out (logits equal onnxruntime's on the same model, every
              array finite, maps in [0, 1], files complete);
  refused     an onnxcam exception (API) or one `Error:` line with exit status 1 (CLI);
and the failures the suite counts, all of which must stay at 0:
  unexpected  a foreign exception through the API, or a CLI traceback / message that is not one designed line;
  wrong       a silent wrong answer: NaN or out-of-range values, logits that differ from onnxruntime's, an answer
              where onnxruntime itself cannot run the model;
  outside     a file outside the model's folder was opened (a Python audit hook watches every open);
  partial     a half-written or invalid output file (a temporary file left, a PNG that does not decode, bad JSON);
  hang        no answer within the per-case time limit;
  crash       the worker process died (a signal, an abort).

Cases run in a worker process (`python -m tests.fuzz FAMILY SEED START COUNT`) that prints one JSON line per
case, so a crash or a hang costs that case only: the parent restarts the worker after it. tests/test_fuzz.py runs
every family; `python -m tests.fuzz --report [CASES]` runs them all and prints the counts.
"""

from __future__ import annotations

import io
import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

FAILURES = ("unexpected", "wrong", "outside", "partial", "hang", "crash")
CASE_SECONDS = 60.0
ROOT = Path(__file__).resolve().parents[1]


# ---- small models ----------------------------------------------------------------------------------------------
def tiny_model(classes: int = 4, hw: int = 8, *, weights=None, opset: int = 17, dynamic: bool = False):
    """Conv -> Relu -> MaxPool -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Softmax (NCHW)."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = weights or {
        "w1": rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * 0.5,
        "b1": rng.standard_normal(6).astype(np.float32) * 0.1,
        "w2": rng.standard_normal((8, 6, 3, 3)).astype(np.float32) * 0.3,
        "fc": rng.standard_normal((classes, 8)).astype(np.float32),
        "fcb": rng.standard_normal(classes).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1, name="fc"),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1, name="softmax"),
    ]
    side = "H" if dynamic else hw
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, side, side])],
        [helper.make_tensor_value_info("prob", onnx.TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def tiny_input(n: int = 2, hw: int = 8, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, hw, hw)).astype(np.float32)


# ---- checking one answer -----------------------------------------------------------------------------------------
class Outcome(Exception):
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def _plain_logits(model_bytes: bytes, x: np.ndarray, score: str, base_dir=None):
    """onnxruntime's own run of the model: the score tensor (exposed as an output) or None if it cannot run."""
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.ModelProto.FromString(model_bytes)
        if score not in [o.name for o in proto.graph.output]:
            proto.graph.output.add().name = score
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return sess.run([score], {sess.get_inputs()[0].name: x})[0]
    except Exception:  # noqa: BLE001 - onnxruntime refusing the model is an answer too
        return None


def check_explainer(model, x: np.ndarray, model_bytes: bytes | None = None, **kwargs) -> str:
    """Explain x with the model; 'ok' or 'refused', else raise Outcome(failure)."""
    import onnxcam
    from onnxcam import OnnxCamError

    try:
        ex = onnxcam.Explainer(model, device="cpu", **kwargs)
        r = ex.run(x)
        e = onnxcam.explain(ex, x, method="gradcam")
    except OnnxCamError:
        return "refused"
    except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
        raise Outcome("unexpected", f"{type(exc).__name__}: {str(exc)[:300]}") from None
    arrays = [r.logits, *r.activations.values(), *r.gradients.values(), e.maps]
    if not all(np.isfinite(a).all() for a in arrays):
        raise Outcome("wrong", "a non-finite value in an answer")
    if e.maps.min() < 0 or e.maps.max() > 1:
        raise Outcome("wrong", f"map outside [0, 1]: {e.maps.min()}..{e.maps.max()}")
    if model_bytes is not None:
        plain = _plain_logits(model_bytes, x, ex.score_name)
        if plain is None:
            raise Outcome("wrong", "onnxcam answered for a model onnxruntime cannot run")
        if plain.shape != r.logits.shape or not np.allclose(plain, r.logits, rtol=1e-5, atol=1e-5):
            raise Outcome("wrong", "logits differ from onnxruntime's on the same model")
    return "ok"


def check_cli(args: list[str], out: Path) -> str:
    """Run the CLI in-process; 'ok' or 'refused', else raise Outcome."""
    from click.testing import CliRunner

    from onnxcam.cli import main

    result = CliRunner().invoke(main, args)
    text = (result.stdout or "") + (result.stderr or "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise Outcome("unexpected", f"{type(result.exception).__name__}: {str(result.exception)[:300]}")
    if "Traceback" in text or "unexpected " in text.lower():
        raise Outcome("unexpected", text.strip().splitlines()[-1][:300])
    _check_files(out)
    if result.exit_code == 0:
        return "ok"
    if result.exit_code != 1:
        raise Outcome("unexpected", f"exit status {result.exit_code}: {text.strip()[-300:]}")
    errors = [line for line in (result.stderr or "").splitlines() if line.startswith("Error:")]
    if not errors:
        raise Outcome("unexpected", f"exit 1 without an 'Error:' line: {text.strip()[-300:]}")
    return "refused"


def _check_files(out: Path) -> None:
    """Every file written is complete: no temporary leftovers, PNGs decode, JSON parses strictly, .npz loads."""
    import cv2

    if not out.exists():
        return
    for path in out.rglob("*"):
        if path.is_dir():
            continue
        name = path.name
        if name.startswith(".") or ".tmp" in name or name.endswith("~"):
            raise Outcome("partial", f"temporary file left: {name}")
        data = path.read_bytes()
        if name.endswith(".png"):
            if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is None:
                raise Outcome("partial", f"{name} does not decode")
        elif name.endswith(".json"):
            try:
                json.loads(data, parse_constant=_no_constant)
            except ValueError as exc:
                raise Outcome("partial", f"{name}: {exc}") from None
        elif name.endswith(".npz"):
            try:
                with np.load(io.BytesIO(data)) as arrays:
                    for key in arrays.files:
                        arrays[key]
            except Exception as exc:  # noqa: BLE001
                raise Outcome("partial", f"{name}: {exc}") from None


def _no_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


# ---- watching file reads -------------------------------------------------------------------------------------------
_LABEL: list[str] = []  # the variant the current case drew, reported with its outcome
_FORBIDDEN: list[str] = []
_SEEN_FORBIDDEN: list[str] = []


def _audit(event: str, args) -> None:
    if event == "open" and _FORBIDDEN and args and isinstance(args[0], (str, bytes, os.PathLike)):
        try:
            path = os.path.realpath(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            return
        if any(path == f or path.startswith(f + os.sep) for f in _FORBIDDEN):
            _SEEN_FORBIDDEN.append(path)


# ---- the families ----------------------------------------------------------------------------------------------------
def case_model_bytes(rng: np.random.Generator, work: Path) -> str:
    """The tiny model's bytes truncated, bit-flipped or overwritten at random places."""
    data = bytearray(tiny_model().SerializeToString())
    kind = rng.integers(3)
    _LABEL[:] = [f"mutation {kind}"]
    if kind == 0:
        data = data[:int(rng.integers(0, len(data)))]
    elif kind == 1:
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 9))):
            data[pos] ^= 1 << int(rng.integers(8))
    else:
        start = int(rng.integers(0, len(data)))
        data[start:start + 8] = rng.integers(0, 256, size=len(data[start:start + 8]), dtype=np.uint8).tobytes()
    return check_explainer(bytes(data), tiny_input(), model_bytes=bytes(data))


def case_crafted_model(rng: np.random.Generator, work: Path) -> str:
    """A valid model changed in one hostile way: shapes, types, attributes, structure."""
    import onnx
    from onnx import helper

    m = tiny_model()
    g = m.graph
    choice = int(rng.integers(16))
    _LABEL[:] = [f"variant {choice}"]
    x = tiny_input()
    if choice == 0:  # a huge declared dim
        g.input[0].type.tensor_type.shape.dim[2].dim_value = 1 << 40
    elif choice == 1:  # an integer model input
        g.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT64
    elif choice == 2:  # no declared shape
        g.input[0].type.tensor_type.ClearField("shape")
    elif choice == 3:  # zero or negative strides / pads
        g.node[2].attribute[1].ints[:] = [0, int(rng.integers(-3, 1))]
    elif choice == 4:  # a cycle
        g.node[0].input[0] = "r2"
    elif choice == 5:  # a node reading a tensor nobody makes
        g.node[3].input[0] = "nowhere"
    elif choice == 6:  # duplicate output names
        g.node[1].output[0] = "c1"
    elif choice == 7:  # no outputs
        del g.output[:]
    elif choice == 8:  # the output is the input
        g.output[0].name = "x"
    elif choice == 9:  # a weight of the wrong shape
        g.initializer[2].dims[1] = 7
    elif choice == 10:  # an unknown op on the path
        g.node[4].op_type = "NoSuchOp"
    elif choice == 11:  # an op from an unknown domain
        g.node[4].domain = "com.example"
    elif choice == 12:  # opset 0 / an absurd opset
        m.opset_import[0].version = int(rng.choice([0, 1, 99]))
    elif choice == 13:  # NaN weights
        w = onnx.numpy_helper.to_array(g.initializer[0]).copy()
        w.flat[int(rng.integers(w.size))] = np.nan
        g.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, g.initializer[0].name))
    elif choice == 14:  # an empty graph
        del g.node[:]
    else:  # a subgraph-carrying node on the path
        then = helper.make_graph([helper.make_node("Identity", ["r1"], ["t"])], "then", [],
                                 [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)])
        cond = helper.make_node("Constant", [], ["cond"], value=onnx.numpy_helper.from_array(np.array(True)))
        g.node.insert(2, cond)
        g.node.insert(3, helper.make_node("If", ["cond"], ["r1b"], then_branch=then, else_branch=then))
        g.node[4].input[0] = "r1b"
    data = m.SerializeToString()
    return check_explainer(data, x, model_bytes=data)


def case_external_data(rng: np.random.Generator, work: Path) -> str:
    """A model folder whose external data points somewhere hostile; a secret folder beside it must stay unread."""
    import onnx

    model_dir, secret_dir = work / "model", work / "secret"
    model_dir.mkdir()
    secret_dir.mkdir()
    m = tiny_model()
    target = m.graph.initializer[2]  # w2: 8*6*3*3 floats
    raw = onnx.numpy_helper.to_array(target).astype("<f4").tobytes()
    (secret_dir / "w.bin").write_bytes(raw)
    (model_dir / "w.bin").write_bytes(raw)
    choice = int(rng.integers(10))
    _LABEL[:] = [f"variant {choice}"]
    offset, length = 0, len(raw)
    if choice == 0:
        location = "../secret/w.bin"
    elif choice == 1:
        location = str(secret_dir / "w.bin")
    elif choice == 2:
        os.symlink(secret_dir, model_dir / "link")
        location = "link/w.bin"
    elif choice == 3:
        os.symlink(secret_dir / "w.bin", model_dir / "wl.bin")
        location = "wl.bin"
    elif choice == 4:
        location, offset = "w.bin", len(raw) * 4
    elif choice == 5:
        location, length = "w.bin", len(raw) // 2
    elif choice == 6:
        os.mkfifo(model_dir / "fifo.bin")
        location = "fifo.bin"
    elif choice == 7:
        location = "sub/../../secret/w.bin"
    elif choice == 8:
        location = "w.bin\x00../secret/w.bin"
    else:
        location = "w.bin"  # the honest case: must load, from any working directory
    target.ClearField("raw_data")
    del target.float_data[:]
    target.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = target.external_data.add()
        entry.key, entry.value = key, value
    path = model_dir / "model.onnx"
    path.write_bytes(m.SerializeToString())
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "w.bin").write_bytes(np.zeros(len(raw) // 4, "<f4").tobytes())  # a decoy in the CWD
    os.chdir(elsewhere)
    _FORBIDDEN[:] = [str(secret_dir.resolve()), str(elsewhere.resolve())]
    outcome = check_explainer(str(path), tiny_input())
    if outcome == "ok":
        import onnxcam

        want = onnxcam.Explainer(tiny_model(), device="cpu").run(tiny_input()).logits
        got = onnxcam.Explainer(str(path), device="cpu").run(tiny_input()).logits
        if choice != 9 or not np.allclose(want, got, rtol=1e-5, atol=1e-6):
            raise Outcome("wrong", f"external data case {choice} ({location!r}) was accepted")
    return outcome


def _png(w: int, h: int, rows: bytes | None = None, depth: int = 8, color: int = 2) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    if rows is None:  # all-zero rows, compressed without building the image
        comp, row = zlib.compressobj(9), b"\x00" * (1 + w * 3 * depth // 8)
        rows = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def case_image(rng: np.random.Generator, work: Path) -> str:
    """A folder with one good photo and one hostile file, explained by the CLI with the tiny model."""
    import cv2
    import onnx

    from onnxcam import SAMPLE_IMAGES

    images, out = work / "images", work / "out"
    images.mkdir()
    model = tiny_model(hw=32)
    model.metadata_props.add(key="onnxcam.preprocess", value=json.dumps({"size": [32, 32]}))
    model_path = work / "model.onnx"
    onnx.save(model, str(model_path))
    good = cv2.imencode(".png", cv2.resize(cv2.imread(str(SAMPLE_IMAGES[0])), (40, 30)))[1].tobytes()
    (images / "good.png").write_bytes(good)
    choice = int(rng.integers(12))
    _LABEL[:] = [f"variant {choice}"]
    bad = images / "bad.png"
    if choice == 0:
        bad.write_bytes(good[:int(rng.integers(1, len(good)))])
    elif choice == 1:
        data = bytearray(good)
        for pos in rng.integers(8, len(data), size=8):
            data[pos] ^= 0xFF
        bad.write_bytes(bytes(data))
    elif choice == 2:
        bad.write_bytes(_png(20000, 20000))  # a decompression bomb
    elif choice == 3:
        bad.write_bytes(b"")
    elif choice == 4:
        bad.write_bytes(_png(1, 1, zlib.compress(b"\x00\x10\x20\x30")))
    elif choice == 5:
        bad.write_bytes(_png(60000, 1))
    elif choice == 6:
        os.mkfifo(bad)
    elif choice == 7:
        bad.write_text("not an image at all")
    elif choice == 8:
        bad.mkdir()
    elif choice == 9:
        os.symlink(bad, bad)  # a symlink loop
    elif choice == 10:
        img = (rng.random((9, 7)) * 65535).astype(np.uint16)
        bad.write_bytes(cv2.imencode(".png", img)[1].tobytes())
    else:
        jpg = cv2.imencode(".jpg", cv2.imread(str(images / "good.png")))[1].tobytes()
        (images / "bad.jpg").write_bytes(jpg[:len(jpg) // 2])
    outcome = check_cli(["explain", str(model_path), str(images), "--out", str(out)], out)
    if not (out / "good.json").exists():
        raise Outcome("wrong", f"the good photo beside hostile file {choice} was not explained")
    return outcome


def case_array(rng: np.random.Generator, work: Path) -> str:
    """Non-finite, huge, or oddly typed inputs through the API: refused, never a NaN answer."""
    import onnxcam

    x = tiny_input()
    choice = int(rng.integers(8))
    _LABEL[:] = [f"variant {choice}"]
    if choice == 0:
        x.flat[int(rng.integers(x.size))] = np.nan
    elif choice == 1:
        x.flat[int(rng.integers(x.size))] = np.inf * (1 if rng.random() < 0.5 else -1)
    elif choice == 2:
        x[:] = np.float32(1e38) * np.sign(x)
    elif choice == 3:
        x = x.astype(np.float64) * 1e300
    elif choice == 4:
        x = (x * 1000).astype(np.int64)
    elif choice == 5:
        x = x.astype(np.complex64)
    elif choice == 6:
        x = x[:, :, :4]
    else:
        x = np.full_like(x, np.float32(1e-45))  # subnormal everywhere
    if choice in (5, 6):  # shapes and types the explainer must refuse itself
        try:
            onnxcam.Explainer(tiny_model(), device="cpu").run(x)
        except onnxcam.OnnxCamError:
            return "refused"
        except Exception as exc:  # noqa: BLE001
            raise Outcome("unexpected", f"{type(exc).__name__}: {exc}") from None
        raise Outcome("wrong", "an input of the wrong shape or type was accepted")
    return check_explainer(tiny_model(), x)


FAMILIES = {
    "model_bytes": (case_model_bytes, 40),
    "crafted_model": (case_crafted_model, 32),
    "external_data": (case_external_data, 20),
    "image": (case_image, 24),
    "array": (case_array, 16),
}


# ---- the worker and its parent ----------------------------------------------------------------------------------------
def _worker(family: str, seed: int, start: int, count: int) -> None:
    results = os.fdopen(os.dup(1), "w")  # answers on the real stdout; stray prints (of anyone) go to stderr
    os.dup2(2, 1)
    sys.addaudithook(_audit)
    import logging

    logging.disable(logging.CRITICAL)
    fn = FAMILIES[family][0]
    home = os.getcwd()
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, i])
        _FORBIDDEN.clear()
        _SEEN_FORBIDDEN.clear()
        _LABEL.clear()
        with tempfile.TemporaryDirectory(prefix="onnxcam-fuzz-") as folder:
            try:
                kind, detail = fn(rng, Path(folder)), ""
            except Outcome as o:
                kind, detail = o.kind, o.detail
            except Exception:  # noqa: BLE001 - a bug of the fuzzer itself is reported, not hidden
                kind, detail = "unexpected", "fuzzer: " + traceback.format_exc(limit=3)[-400:]
            finally:
                os.chdir(home)
            if _SEEN_FORBIDDEN:
                kind, detail = "outside", f"opened {_SEEN_FORBIDDEN[0]}"
        detail = f"[{_LABEL[0]}] {detail}" if _LABEL else detail
        print(json.dumps({"case": i, "kind": kind, "detail": detail}), file=results, flush=True)


def run_family(family: str, seed: int = 0, count: int | None = None) -> list[dict]:
    """Run `count` cases of one family in worker processes; one dict per case (case, kind, detail)."""
    count = FAMILIES[family][1] if count is None else count
    results, start = [], 0
    while start < count:
        proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz", family, str(seed), str(start),
                                 str(count - start)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + CASE_SECONDS + 30  # the first case also pays the imports
        while start < count:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = proc.stdout.readline() if ready else None
            if line:
                results.append(json.loads(line))
                start += 1
                deadline = time.monotonic() + CASE_SECONDS
                continue
            if line is None:  # the time ran out
                proc.kill()
                kind = "hang"
            else:
                kind = "crash"
            proc.wait()
            err = proc.stderr.read()[-300:] if kind == "crash" else ""
            results.append({"case": start, "kind": kind, "detail": f"exit {proc.returncode} {err}".strip()})
            start += 1
            break
        else:
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return results


def report(results: dict[str, list[dict]]) -> str:
    lines = []
    for family, rows in results.items():
        counts = Counter(r["kind"] for r in rows)
        lines.append(f"{family:14s} cases {len(rows):3d}  " + "  ".join(
            f"{k} {counts.get(k, 0)}" for k in ("ok", "refused", *FAILURES)))
        lines += [f"    case {r['case']}: {r['kind']}: {r['detail']}" for r in rows if r["kind"] in FAILURES]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--report":
        scale = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
        print(report({f: run_family(f, count=int(n * scale)) for f, (_, n) in FAMILIES.items()}))
    else:
        _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
