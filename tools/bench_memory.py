"""Peak memory of `onnxcam explain` against a plain onnxruntime classification of the same photos.

Both are measured as separate processes with /usr/bin/time -v ("Maximum resident set size"), on the same model
and photos:
  plain    this script with --plain: reads the photos with OpenCV, resizes and normalizes them (ImageNet mean/std,
           224x224), classifies them with onnxruntime in batches of 8 and prints the top class of each
  library  this script with --library: the plain script's reading and preprocessing, then onnxcam.Explainer (the
           automatic layer, each image's top class) instead of the plain session: the library without the CLI's
           pipeline (decoding, overlays and writing in threads)
  onnxcam  `python -m onnxcam explain MODEL PHOTOS --out OUT` (Grad-CAM at the automatic layer, batch 8)

The model is torchvision's resnet50 with seeded random weights (nothing is downloaded), exported with
torch.onnx.export(dynamo=False, opset 17, weights inline, dynamic batch); the photos are onnxcam.SAMPLE_IMAGES
resized and flipped into --photos distinct files (scaled 0.5x to 0.5x + 0.1x per round of the samples: 64 photos
reach 1280x854, where the full-size pictures weigh; 32 stay under 620 px). Both are made once in --work and reused.
Each row also gives each process's wall and CPU (user + system) seconds, from the same /usr/bin/time -v.

    python tools/bench_memory.py                                   # this checkout
    python tools/bench_memory.py --pythonpath /tmp/onnxcam-before  # another checkout (e.g. a git worktree)
    python tools/bench_memory.py --reps 3 --json memory.json

Prints one row per repetition and the median ratio onnxcam / plain.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(Path(__file__).resolve())
MEAN, STD, SIZE, BATCH = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224, 8


def make_model(path: Path) -> None:
    import io

    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    f = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), f, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    path.write_bytes(f.getvalue())


def make_photos(folder: Path, count: int) -> None:
    import cv2

    sys.path.insert(0, str(ROOT))
    from onnxcam import SAMPLE_IMAGES

    folder.mkdir(parents=True, exist_ok=True)
    sources = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in SAMPLE_IMAGES]
    for i in range(count):
        img = sources[i % len(sources)]
        scale = 0.5 + 0.1 * (i // len(sources))
        img = cv2.resize(img, (max(32, int(img.shape[1] * scale)), max(32, int(img.shape[0] * scale))))
        if (i // len(sources)) % 2:
            img = cv2.flip(img, 1)
        cv2.imwrite(str(folder / f"photo{i:03d}.png"), img)


def plain(model: str, photos: str, library: bool = False) -> None:
    """The baseline: what any application classifying these photos with onnxruntime does (library: the same with
    an onnxcam Explainer in place of the session)."""
    import cv2
    import numpy as np
    import onnxruntime as ort

    if library:
        from onnxcam import Explainer

        ex = Explainer(model, device="cpu", input_shape=(1, 3, SIZE, SIZE))
        name = ex.input_name
    else:
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
    files = sorted(p for p in Path(photos).iterdir() if p.suffix == ".png")
    mean, std = np.float32(MEAN), np.float32(STD)
    for start in range(0, len(files), BATCH):
        batch = []
        for f in files[start:start + BATCH]:
            rgb = cv2.cvtColor(cv2.imread(str(f), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            x = (cv2.resize(rgb, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255 - mean) / std
            batch.append(x.transpose(2, 0, 1))
        x = np.stack(batch)
        logits = ex.run(x).logits if library else sess.run(None, {name: x})[0]
        for f, c in zip(files[start:start + BATCH], logits.argmax(1)):
            print(f.name, int(c))


def peak_rss_mb(cmd: list[str], env: dict, cwd: str) -> tuple[float, float, float]:
    """(maximum resident set size in MB, wall seconds, CPU seconds: user + system) of a command, from GNU time -v.
    Run in cwd: `python -m onnxcam` imports onnxcam from its working folder before PYTHONPATH."""
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], check=False, env=env, cwd=cwd, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", done.stderr).group(1))
              for kind in ("User", "System"))
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    wall = sum(float(part) * 60 ** k for k, part in enumerate(reversed(clock.split(":"))))
    return int(kb.group(1)) / 1024, wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plain", nargs=2, metavar=("MODEL", "PHOTOS"), help=argparse.SUPPRESS)
    ap.add_argument("--library", nargs=2, metavar=("MODEL", "PHOTOS"), help=argparse.SUPPRESS)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "onnxcam-bench-memory"),
                    help="where the model and photos are made once and kept")
    ap.add_argument("--photos", type=int, default=64, help="how many photos (64: up to 1280x854)")
    ap.add_argument("--pythonpath", default=str(ROOT), help="the onnxcam checkout to measure")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()
    if args.plain or args.library:
        plain(*(args.plain or args.library), library=bool(args.library))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, photos = work / "resnet50.onnx", work / f"photos{args.photos}"
    if not model.exists():
        make_model(model)
    if not photos.exists():
        make_photos(photos, args.photos)
    env = {**os.environ, "PYTHONPATH": args.pythonpath, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    rows = []
    for rep in range(args.reps):
        base, base_s, base_cpu = peak_rss_mb([sys.executable, SCRIPT, "--plain", str(model), str(photos)], env,
                                             args.pythonpath)
        lib, lib_s, lib_cpu = peak_rss_mb([sys.executable, SCRIPT, "--library", str(model), str(photos)], env,
                                          args.pythonpath)
        with tempfile.TemporaryDirectory() as out:
            cam, cam_s, cam_cpu = peak_rss_mb([sys.executable, "-m", "onnxcam", "explain", str(model), str(photos),
                                               "--out", out, "--device", "cpu"], env, args.pythonpath)
        rows.append({"plain_mb": round(base, 1), "library_mb": round(lib, 1), "onnxcam_mb": round(cam, 1),
                     "library_ratio": round(lib / base, 3), "ratio": round(cam / base, 3),
                     "wall_s": {"plain": round(base_s, 2), "library": round(lib_s, 2), "onnxcam": round(cam_s, 2)},
                     "cpu_s": {"plain": round(base_cpu, 2), "library": round(lib_cpu, 2),
                               "onnxcam": round(cam_cpu, 2)}})
        print(f"rep {rep}: plain {base:.1f} MB, library (Explainer) {lib:.1f} MB ({lib / base:.3f}x), onnxcam "
              f"explain {cam:.1f} MB ({cam / base:.3f}x); wall {base_s:.1f} / {lib_s:.1f} / {cam_s:.1f} s, CPU "
              f"{base_cpu:.1f} / {lib_cpu:.1f} / {cam_cpu:.1f} s", flush=True)
    median = statistics.median(r["ratio"] for r in rows)
    library = statistics.median(r["library_ratio"] for r in rows)
    print(f"median ratio onnxcam explain / plain: {median:.3f}, Explainer / plain: {library:.3f} ({args.photos} "
          f"photos, {args.pythonpath})")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkout": args.pythonpath, "photos": args.photos, "rows": rows,
                                               "median_ratio": median, "median_library_ratio": library},
                                              indent=1))


if __name__ == "__main__":
    main()
