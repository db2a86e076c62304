"""Folder benchmark: `onnxcam explain` on a folder of photos, as whole processes, against classifying them.

Three programs on the same JPEG photos (320-640 px), each a fresh process timed from start to exit:
  classify   a plain script: read, preprocess and classify every photo with onnxruntime, batches of 8, writing
             nothing (the baseline: ratio 1.00)
  onnxcam    `python -m onnxcam explain resnet50.onnx photos/ --out DIR` (Grad-CAM of each top class: overlay and
             heatmap PNGs and a JSON per photo)
  pgc        a pytorch-grad-cam 1.5.7 script: the same photos, GradCAM of the top class at layer4[-1], an overlay
             PNG per photo at its own size (skipped with a message when torch, torchvision or grad-cam is missing)
The model is torchvision's resnet50 with seeded random weights (no download), exported once by tools/bench.py's
exporter; the pytorch-grad-cam script loads the same weights. The photos are made from onnxcam.SAMPLE_IMAGES
(crops, flips, sizes). Each repetition runs the programs in a new seeded order, each after --idle seconds of rest;
the table gives medians and the fastest repetitions as ratios to the classify script, and peak RSS (ru_maxrss of
the process, from wait4) of onnxcam on --photos and on --more photos.

    python tools/bench_folder.py                         # 64 photos, 5 repetitions, RSS on 64 vs 256 photos
    python tools/bench_folder.py --photos 64 --reps 7 --more 256 --out bench-folder.json
    python tools/bench.py folder --reps 7                # the same, from the benchmark driver
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
BATCH = 8

CLASSIFY = r'''
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

model, folder = sys.argv[1:3]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
paths = sorted(Path(folder).glob("*.jpg"))
for i in range(0, len(paths), 8):
    xs = []
    for p in paths[i:i + 8]:
        rgb = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        img = cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_AREA)
        xs.append(((img.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1))
    logits = session.run(None, {"input": np.stack(xs)})[0]
    top = logits.argmax(axis=1)
'''

PGC = r'''
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image

weights, folder, out = sys.argv[1:4]
Path(out).mkdir(parents=True, exist_ok=True)
model = torchvision.models.resnet50(weights=None)
model.load_state_dict(torch.load(weights))
model.eval()
cam = GradCAM(model=model, target_layers=[model.layer4[-1]])
mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
paths = sorted(Path(folder).glob("*.jpg"))
for i in range(0, len(paths), 8):
    rgbs = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths[i:i + 8]]
    xs = [((cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255 - mean) / std)
          .transpose(2, 0, 1) for rgb in rgbs]
    maps = cam(input_tensor=torch.from_numpy(np.stack(xs)), targets=None)  # each photo's top class
    for p, rgb, m in zip(paths[i:i + 8], rgbs, maps):
        h, w = rgb.shape[:2]
        picture = show_cam_on_image(rgb.astype(np.float32) / 255, cv2.resize(m, (w, h)), use_rgb=True)
        cv2.imwrite(str(Path(out) / f"{p.stem}.gradcam.png"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
'''


# ---- inputs ----------------------------------------------------------------------------------------------------
def make_model(work: Path) -> tuple[Path, Path]:
    """resnet50 with seeded weights: the ONNX file and the torch state dict (for the pytorch-grad-cam script)."""
    onnx_path, state_path = work / "resnet50.onnx", work / "resnet50.pt"
    if not onnx_path.exists():
        import torch
        from bench import export, torch_model

        model = torch_model("resnet50")
        onnx_path.write_bytes(export(model, 224))
        torch.save(model.state_dict(), state_path)
    return onnx_path, state_path


def make_photos(folder: Path, n: int) -> Path:
    """n JPEGs from the bundled sample photos: seeded crops of 60-100% of each side, every other one flipped,
    the longer side scaled to 320-640 px."""
    import cv2

    import onnxcam

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == n:
        return folder
    sources = [cv2.imread(str(p)) for p in onnxcam.SAMPLE_IMAGES]
    rng = np.random.default_rng(0)
    for k in range(n):
        img = sources[k % len(sources)]
        h, w = img.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = img[y:y + ch, x:x + cw]
        if k % 2:
            crop = crop[:, ::-1]
        scale = rng.integers(320, 641) / max(ch, cw)
        size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        photo = cv2.resize(np.ascontiguousarray(crop), size, interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"photo{k:04d}.jpg"), photo, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


# Every program imports compiled modules, as after a pip install (which writes the .pyc files): where
# PYTHONDONTWRITEBYTECODE is set, each run of `python -m onnxcam` from the source tree would compile onnxcam's
# sources again (0.2 s of a run), which no installed copy does. The warm-up round writes them.
_AS_INSTALLED = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


# ---- timing whole processes ------------------------------------------------------------------------------------
def timed(cmd: list[str], cwd: Path = ROOT) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MiB, CPU seconds) of one process, from start to exit; from wait4, its own, not the
    largest of every child so far (what getrusage(RUSAGE_CHILDREN) would give). `python -m onnxcam` imports
    onnxcam from cwd."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd, env=_AS_INSTALLED)
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return took, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss: KiB on Linux


def programs(work: Path, onnx_path: Path, state_path: Path, photos: Path, baseline: Path | None = None,
             skip_pgc: bool = False) -> dict[str, tuple[list[str], Path]]:
    """The command lines of the programs and the folder each runs in (pgc left out when its packages are
    missing; "baseline": onnxcam imported from another source tree, e.g. an older commit)."""
    (work / "classify.py").write_text(CLASSIFY)
    (work / "pgc.py").write_text(PGC)
    explain = [sys.executable, "-m", "onnxcam", "explain", str(onnx_path), str(photos), "--out",
               str(work / "onnxcam-out"), "--device", "cpu"]
    progs = {"classify": ([sys.executable, str(work / "classify.py"), str(onnx_path), str(photos)], ROOT),
             "onnxcam": (explain, ROOT)}
    if baseline is not None:
        progs["baseline"] = (explain, baseline.resolve())
    missing = [m for m in ("torch", "torchvision", "pytorch_grad_cam") if importlib.util.find_spec(m) is None]
    if missing and not skip_pgc:
        print(f"pytorch-grad-cam script skipped: {', '.join(missing)} not installed", file=sys.stderr)
    elif not skip_pgc:
        progs["pgc"] = ([sys.executable, str(work / "pgc.py"), str(state_path), str(photos), str(work / "pgc-out")],
                        ROOT)
    return progs


def measure(progs: dict[str, tuple[list[str], Path]], work: Path, reps: int, idle: float) -> dict[str, list[tuple]]:
    """reps interleaved repetitions (a new seeded order each) of every program, after a warm-up of each (page
    cache, .pyc files); the output folders emptied outside the timed part. Each run: (wall s, peak RSS MiB, CPU s)."""
    runs = {k: [] for k in progs}
    order = list(progs)
    shuffle = np.random.default_rng(1).shuffle
    for rep in range(reps + 1):
        shuffle(order)
        for k in order:
            for d in ("onnxcam-out", "pgc-out"):
                shutil.rmtree(work / d, ignore_errors=True)
            time.sleep(idle)
            took, rss, cpu = timed(*progs[k])
            if rep:  # the first round warms up
                runs[k].append((took, rss, cpu))
                print(f"  rep {rep} {k:9s} {took:6.2f} s  {rss:6.0f} MiB  cpu {cpu:6.2f} s", flush=True)
    return runs


def summary(runs: dict, n: int, rss_more: tuple[int, float] | None) -> dict:
    med = {k: statistics.median(t for t, _, _ in v) for k, v in runs.items()}
    fast = {k: min(t for t, _, _ in v) for k, v in runs.items()}
    rss = {k: max(r for _, r, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, _, c in v) for k, v in runs.items()}
    out = {"photos": n, "reps": len(runs["classify"]), "median_s": med, "fastest_s": fast, "peak_rss_mib": rss,
           "median_ratio": {k: v / med["classify"] for k, v in med.items()},
           "fastest_ratio": {k: v / fast["classify"] for k, v in fast.items()},
           # user + system time: the work done, which contention for the cores does not inflate
           "cpu_s": cpu, "cpu_ratio": {k: v / cpu["classify"] for k, v in cpu.items()}}
    if "pgc" in med:
        out["onnxcam_speedup_vs_pgc"] = {"median": med["pgc"] / med["onnxcam"],
                                         "fastest": fast["pgc"] / fast["onnxcam"], "cpu": cpu["pgc"] / cpu["onnxcam"]}
    if rss_more:
        m, mib = rss_more
        out["rss_more"] = {"photos": m, "peak_rss_mib": mib, "ratio": mib / rss["onnxcam"]}
    return out


def table(s: dict) -> str:
    names = {"classify": "classify only (onnxruntime, writes nothing)", "onnxcam": "`onnxcam explain` (gradcam)",
             "baseline": "`onnxcam explain`, --baseline tree", "pgc": "pytorch-grad-cam script (GradCAM + overlays)"}
    lines = [(f"| program ({s['photos']} photos) | median | ratio (median) | fastest | ratio (fastest) | CPU time "
             "(median) | ratio (CPU) | peak RSS |"), "|---|---|---|---|---|---|---|---|"]
    for k in s["median_s"]:
        lines.append(f"| {names[k]} | {s['median_s'][k]:.2f} s | x{s['median_ratio'][k]:.2f} | "
                     f"{s['fastest_s'][k]:.2f} s | x{s['fastest_ratio'][k]:.2f} | {s['cpu_s'][k]:.2f} s | "
                     f"x{s['cpu_ratio'][k]:.2f} | {s['peak_rss_mib'][k]:.0f} MiB |")
    extra = []
    if "onnxcam_speedup_vs_pgc" in s:
        sp = s["onnxcam_speedup_vs_pgc"]
        extra.append(f"onnxcam vs pytorch-grad-cam: {sp['median']:.1f}x faster (median), {sp['fastest']:.1f}x "
                     f"(fastest), {sp['cpu']:.1f}x less CPU time")
    if "rss_more" in s:
        r = s["rss_more"]
        extra.append(f"onnxcam peak RSS: {s['peak_rss_mib']['onnxcam']:.0f} MiB on {s['photos']} photos, "
                     f"{r['peak_rss_mib']:.0f} MiB on {r['photos']} photos (x{r['ratio']:.2f})")
    return "\n".join(lines + [""] + extra)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--more", type=int, default=256, help="photos of the second peak-RSS run (0: none)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--idle", type=float, default=0.3, help="seconds to rest before each timed process")
    ap.add_argument("--work", type=Path, help="folder for the model and photos (kept; default: a temp folder)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--baseline", type=Path, metavar="DIR",
                    help="also time `onnxcam explain` imported from this source tree (a checkout of another commit)")
    ap.add_argument("--no-pgc", action="store_true", help="leave out the pytorch-grad-cam script")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prepare:  # in a child process: see below
        args.work.mkdir(parents=True, exist_ok=True)
        make_model(args.work)
        for n in (args.photos, args.more):
            if n:
                make_photos(args.work / f"photos{n}", n)
        return {}
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's idle threads would steal the next run's cores
    work = args.work or Path(tempfile.mkdtemp(prefix="onnxcam-bench-folder-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        # The model and photos are made in a child: this process stays small, for a forked child's peak RSS
        # (ru_maxrss) starts from its parent's at the fork and would hide the programs' own below it.
        subprocess.run([sys.executable, __file__, "--prepare", "--work", str(work), "--photos", str(args.photos),
                        "--more", str(args.more)], check=True)
        onnx_path, state_path = work / "resnet50.onnx", work / "resnet50.pt"
        photos = work / f"photos{args.photos}"
        progs = programs(work, onnx_path, state_path, photos, args.baseline, args.no_pgc)
        print(f"{args.photos} photos, {args.reps} repetitions, in {work}", flush=True)
        runs = measure(progs, work, args.reps, args.idle)
        more = None
        if args.more:
            big = work / f"photos{args.more}"
            cmd = [str(big) if a == str(photos) else a for a in progs["onnxcam"][0]]
            shutil.rmtree(work / "onnxcam-out", ignore_errors=True)
            more = (args.more, timed(cmd)[1])
        result = summary(runs, args.photos, more)
        result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                             "python": platform.python_version()}
        print(table(result))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.out}")
        return result
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
