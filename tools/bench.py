"""Benchmark: what an explanation costs, against a plain inference and against pytorch-grad-cam, in one run.

For each model and batch size, on the same machine, inputs and thread count, with interleaved repetitions and
medians (the modes in a new seeded order each repetition), it times:
  ort           plain onnxruntime inference of the original model (the baseline: ratio 1.00)
  last-gradcam  onnxcam Grad-CAM at the last stage (run + map), and last-hirescam likewise
  mid-gradcam   onnxcam Grad-CAM at the middle stage (the end of the second-to-last stage)
  top5          onnxcam gradients for each sample's top-5 classes in one call (last stage)
  export        plain onnxruntime inference of the model exported with its Grad-CAM map in the graph (last stage;
                onnxcam/export.py): logits and the scaled map at the input's size, no Python step
  pgc-gradcam   pytorch-grad-cam 1.5.7 GradCAM on the torch model (last stage), pgc-hirescam likewise
and reports the graph build time (cold, then cached) and peak memory (a subprocess per mode). Each repetition
takes the best of 3 back-to-back calls per mode; the table reports the median over repetitions.

    python tools/bench.py                          # all models, batch 1 and 8, writes bench-results.json
    python tools/bench.py --models resnet50 --batches 1 --reps 5
    python tools/bench.py --device cuda            # on a GPU: batch 1 and 64, onnxruntime CUDA vs torch on CUDA
    python tools/bench.py --models lite0 --modes ort,last-gradcam,export --idle 0.3   # the export row only
    python tools/bench.py --gradient-free --reps 3   # AblationCAM, ScoreCAM, ROAD vs pytorch-grad-cam (resnet50)
    python tools/bench.py --gradient-free --methods scorecam,road --reps 3   # a subset
    python tools/bench.py folder --reps 5          # whole processes on a folder of photos: tools/bench_folder.py

On CUDA every mode runs on the GPU (pytorch-grad-cam on the torch model moved there) and peak memory is not
measured. Models or pytorch-grad-cam that cannot be imported are skipped with a message, not an error.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# torch's OpenMP workers busy-wait after each op; they would steal the cores from the next mode's onnxruntime run.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Likewise onnxruntime's pool threads spin after a run; with several sessions alive (plain, last, middle, top-5)
# on 2 cores they slow each other down. Every session of the benchmark, plain ones included, runs without it.
NO_SPIN = {"session.intra_op.allow_spinning": "0"}
sys.path.insert(0, ROOT)

MODELS = ["resnet50", "mobilenet_v2", "efficientnet_b0", "lite0"]


def torch_model(name):
    import torch
    import torchvision
    if name == "lite0":
        from efficientnet_lite_pytorch import EfficientNet
        torch.manual_seed(0)
        model = EfficientNet.from_name("efficientnet-lite0")
    else:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None)
    model.eval()
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return model


def export(model, size):
    import torch
    f = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), f, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return f.getvalue()


def middle_layer(model_bytes, last_layer):
    """The end of the second-to-last stage: the last 4-D activation on the path with twice the last's size."""
    import onnx

    from onnxcam.graph.model import ModelGraph, _is_spatial_map
    mg = ModelGraph(onnx.load_from_string(model_bytes))
    h = mg.shape(mg.tensor(last_layer))[2]
    score = mg.default_score()
    nodes, on_path = mg.path_nodes([mg.tensor(mg.input_name)], mg.tensor(score))
    for node in reversed(nodes):
        for out in node.outputs:
            shape = mg.shape(out)
            if out.name in on_path and _is_spatial_map(shape) and shape[2] == 2 * h:
                return out.name
    raise SystemExit("no middle stage found")


def run_bench(name, batch, reps, size=224, device="cpu", only=None, idle=0.0):
    import onnxruntime as ort
    import torch

    import onnxcam
    from onnxcam.cam.api import explain

    torch.set_num_threads(os.cpu_count())
    model = torch_model(name)
    model_bytes = export(model, size)
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)

    from onnxcam import runtime
    runtime.SESSION_CONFIG.update(NO_SPIN)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    plain = ort.InferenceSession(model_bytes, runtime._options(), providers=providers)
    if plain.get_providers()[0] != providers[0]:
        raise SystemExit(f"onnxruntime cannot run on {device}: providers {plain.get_providers()}")

    onnxcam.cache.clear()
    t0 = time.perf_counter()
    ex_last = onnxcam.Explainer(model_bytes, device=device)
    build_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    onnxcam.Explainer(model_bytes, device=device)
    build_cached = time.perf_counter() - t0
    ex_mid = onnxcam.Explainer(model_bytes, layers=[middle_layer(model_bytes, ex_last.layers[0])], device=device)
    ex_last.run(x, top_k=5)  # build the 5-seed graph outside the timed loop
    exported = ort.InferenceSession(ex_last.export(method="gradcam").SerializeToString(), runtime._options(),
                                    providers=providers)

    modes = {
        "ort": lambda: plain.run(None, {"input": x}),
        "last-gradcam": lambda: explain(ex_last, x, "gradcam"),
        "last-hirescam": lambda: explain(ex_last, x, "hirescam"),
        "mid-gradcam": lambda: explain(ex_mid, x, "gradcam"),
        "top5": lambda: ex_last.run(x, top_k=5),
        "export": lambda: exported.run(None, {"input": x}),
        **(_pgc_modes(model, name, x, device) if only is None or "pgc-gradcam" in only else {}),
    }
    if only is not None:
        modes = {k: fn for k, fn in modes.items() if k in only or k == "ort"}
    times = {k: [] for k in modes}
    for fn in modes.values():
        fn()  # warm-up
    order = list(modes)
    shuffle = np.random.default_rng(1).shuffle
    for _ in range(reps):  # interleaved: every mode sees the same machine state
        shuffle(order)  # in a new order each time: no mode always runs right after torch's threads
        for k in order:
            times[k].append(_best_of(modes[k], 3, idle))
    med = {k: statistics.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}
    return {"model": name, "batch": batch, "device": device, "median_s": med,
            "ratio_to_ort": {k: v / med["ort"] for k, v in med.items()},
            # On a shared VM interference only ever slows a call down: the fastest repetitions show the costs
            # themselves, and their ratios move far less between runs than the medians' do.
            "fastest_s": fastest, "fastest_ratio_to_ort": {k: v / fastest["ort"] for k, v in fastest.items()},
            # The exported model against ort within each repetition (the two ran seconds apart), then the median:
            # cancels the load's drift between repetitions, which a ratio of medians or of fastest calls carries.
            **({"export_paired_ratio": statistics.median(e / o for e, o in zip(times["export"], times["ort"]))}
               if "export" in times else {}),
            "pgc_over_onnxcam_gradcam": med["pgc-gradcam"] / med["last-gradcam"] if "pgc-gradcam" in med else None,
            "cpu_fallbacks": {"last": ex_last.cpu_fallbacks, "middle": ex_mid.cpu_fallbacks},
            "build_cold_s": build_cold, "build_cached_s": build_cached}


def _pgc_modes(model, name, x, device):
    """pytorch-grad-cam's GradCAM and HiResCAM on the torch model (on the same device), or none if not installed."""
    try:
        from pytorch_grad_cam import GradCAM, HiResCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as exc:
        print(f"pytorch-grad-cam skipped: {exc}", file=sys.stderr)
        return {}
    import torch
    model = model.to(device)
    xt = torch.from_numpy(x).to(device)
    layer = [_torch_layer_for(model, name)]
    pgc = {"gradcam": GradCAM(model=model, target_layers=layer), "hirescam": HiResCAM(model=model, target_layers=layer)}
    targets = [ClassifierOutputTarget(3)] * len(x)
    # Both return numpy maps, so each call ends with the GPU synchronised.
    return {"pgc-gradcam": lambda: pgc["gradcam"](input_tensor=xt, targets=targets),
            "pgc-hirescam": lambda: pgc["hirescam"](input_tensor=xt, targets=targets)}


def _best_of(fn, n, idle=0.0):
    """The fastest of n back-to-back calls: the first may pay for the previous mode's threads still spinning.
    idle: seconds to sleep before each timed call (lets other processes' bursts on a shared machine pass)."""
    best = float("inf")
    for _ in range(n):
        time.sleep(idle)
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _torch_layer_for(model, name):
    if name.startswith("resnet"):
        return model.layer4[-1]
    if name == "lite0":
        return _lite0_last(model)
    return model.features[-1]


def _lite0_last(model):
    """The module whose output is Lite0's final 4-D activation (the ReLU6 after the head conv)."""
    mods = [m for m in model.modules() if isinstance(m, __import__("torch").nn.ReLU6)]
    return mods[-1]


def peak_memory(model_bytes: bytes, batch: int, mode: str, size: int = 224) -> float:
    """Peak RSS growth (MiB) of a fresh process that loads the ONNX model and runs `mode` 3 times.

    Both modes import the same modules and read the same file before the baseline is taken, so the difference is
    what the session (plain, or onnxcam's rewritten one) and its runs add.
    """
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False) as f:
        f.write(model_bytes)
    if mode == "export":
        import onnxcam
        with open(f.name + ".cam", "wb") as cam:
            cam.write(onnxcam.Explainer(model_bytes, device="cpu").export().SerializeToString())
    code = f"""
import sys, numpy as np, onnxruntime as ort
sys.path.insert(0, {ROOT!r})
import onnxcam
b = open({f.name!r} + ('.cam' if {mode!r} == 'export' else ''), 'rb').read()  # read before the baseline
x = np.zeros(({batch}, 3, {size}, {size}), np.float32)
def hwm():  # peak RSS of this address space in MiB (ru_maxrss would carry the forking parent's peak)
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024
base = hwm()
if {mode!r} == 'ort':
    s = ort.InferenceSession(b, providers=['CPUExecutionProvider'])
    for _ in range(3): s.run(None, {{'input': x}})
elif {mode!r} == 'export':  # exported outside the measured process: only the session and its runs count
    s = ort.InferenceSession(b, providers=['CPUExecutionProvider'])
    for _ in range(3): s.run(None, {{'input': x}})
else:
    ex = onnxcam.Explainer(b, device='cpu')
    for _ in range(3): ex.run(x)
print(hwm() - base)
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
        if mode == "export":
            os.unlink(f.name + ".cam")
    return float(out.stdout.strip().splitlines()[-1])


# ---- gradient-free methods and ROAD against pytorch-grad-cam (resnet50's last stage) --------------------------------
GRADIENT_FREE_TARGETS = {"ablationcam": 10, "scorecam": 2, "road": 5}  # the speed-ups issue 16 asks for
ROAD_PERCENTILES = [20, 40, 60, 80]


def run_gradient_free(reps: int, idle: float = 0.3, batch: int = 1, size: int = 224,
                      methods: tuple = tuple(GRADIENT_FREE_TARGETS)) -> dict:
    """onnxcam's AblationCAM, ScoreCAM and ROAD Combined (4 percentiles, on Grad-CAM's maps) against pytorch-grad-cam
    1.5.7's on resnet50 at its last stage (layer4), the same input and target, each method's default batch size.

    Interleaved repetitions in a new seeded order each time, one call per mode and repetition (a ScoreCAM call is
    2048 forwards), `idle` seconds of sleep before each; medians and fastest repetitions. `methods` times a subset
    (pytorch-grad-cam's AblationCAM alone takes minutes per call)."""
    import torch
    from pytorch_grad_cam import AblationCAM, ScoreCAM
    from pytorch_grad_cam.metrics.road import ROADCombined as PgcROAD
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as PgcTarget

    import onnxcam
    from onnxcam import runtime
    from onnxcam.metrics import ROADCombined
    from onnxcam.utils.model_targets import ClassifierOutputTarget

    torch.set_num_threads(os.cpu_count())
    runtime.SESSION_CONFIG.update(NO_SPIN)
    model = torch_model("resnet50")
    model_bytes = export(model, size)
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    xt = torch.from_numpy(x)
    ex = onnxcam.Explainer(model_bytes, device="cpu")  # the automatic layer: layer4's output
    layer = [model.layer4[-1]]
    ablation, score = onnxcam.AblationCAM(ex), onnxcam.ScoreCAM(ex)
    pgc_ablation, pgc_score = AblationCAM(model, layer), ScoreCAM(model, layer)
    top = [int(k) for k in ex.run(x).targets]  # each image's top class: its Grad-CAM map is not all zero
    cams = onnxcam.explain(ex, x, "gradcam", targets=top).maps
    road, pgc_road = ROADCombined(ROAD_PERCENTILES, rng=0), PgcROAD(ROAD_PERCENTILES)
    targets, pgc_targets = [ClassifierOutputTarget(k) for k in top], [PgcTarget(k) for k in top]
    modes = {
        "ablationcam": lambda: ablation(x, targets),
        "pgc-ablationcam": lambda: pgc_ablation(xt, pgc_targets),
        "scorecam": lambda: score(x, targets),
        "pgc-scorecam": lambda: pgc_score(xt, pgc_targets),
        "road": lambda: road(x, cams, targets, model_bytes),
        "pgc-road": lambda: pgc_road(xt, cams, pgc_targets, model),
    }
    modes = {k: f for k, f in modes.items() if k.removeprefix("pgc-") in methods}
    # warm-up: sessions, the cut tail and torch's first calls; ScoreCAM's session without its 2048 forwards
    for k in ("ablationcam", "road", "pgc-road"):
        if k in modes:
            modes[k]()
    if "scorecam" in modes:
        score._whole([ex.score_name, *score.target_layers])
    with torch.no_grad():
        model(xt)
    times = {k: [] for k in modes}
    order = list(modes)
    shuffle = np.random.default_rng(1).shuffle
    for rep in range(reps):
        shuffle(order)
        for k in order:
            times[k].append(_best_of(modes[k], 1, idle))
            print(f"  rep {rep} {k:16s} {times[k][-1]:8.2f} s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}
    return {"model": "resnet50", "layer": ex.layers[0], "batch": batch, "size": size, "reps": reps, "idle_s": idle,
            "times_s": times, "median_s": med, "fastest_s": fastest, "scorecam_forwards": score.forwards,
            "speedup_median": {k: med[f"pgc-{k}"] / med[k] for k in methods},
            "speedup_fastest": {k: fastest[f"pgc-{k}"] / fastest[k] for k in methods}}


def gradient_free_table(row: dict) -> str:
    """pytorch-grad-cam's time over onnxcam's, per method: medians and fastest repetitions, and the target."""
    names = {"ablationcam": "AblationCAM", "scorecam": "ScoreCAM", "road": "ROAD Combined (4 percentiles)"}
    lines = ["| method | onnxcam, median | pytorch-grad-cam, median | speed-up, median | speed-up, fastest | target |",
             "|---|---|---|---|---|---|"]
    for k, target in GRADIENT_FREE_TARGETS.items():
        if k not in row["speedup_median"]:
            continue
        med = row["median_s"]
        lines.append(f"| {names[k]} | {med[k]:.2f} s | {med['pgc-' + k]:.2f} s | {row['speedup_median'][k]:.1f}x | "
                     f"{row['speedup_fastest'][k]:.1f}x | >= {target}x |")
    return "\n".join(lines)


def main():
    if sys.argv[1:2] == ["folder"]:  # the folder benchmark (whole processes) has its own script and options
        import bench_folder
        return bench_folder.main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default=None, help="default: 1,8 on the CPU, 1,64 on CUDA")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-runs", type=int, default=1,
                    help="fresh processes per peak-memory figure, the median kept (session creation alone moves a "
                         "process's peak by +-3.5 MiB)")
    ap.add_argument("--modes", default=None, help="comma-separated modes to time (ort always): e.g. ort,export")
    ap.add_argument("--idle", type=float, default=0.0, help="seconds to sleep before each timed call")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results.json"))
    ap.add_argument("--gradient-free", action="store_true",
                    help="only AblationCAM, ScoreCAM and ROAD against pytorch-grad-cam's (resnet50, last stage)")
    ap.add_argument("--methods", default=",".join(GRADIENT_FREE_TARGETS),
                    help="with --gradient-free: the methods to time, e.g. scorecam,road")
    args = ap.parse_args()
    if args.gradient_free:
        methods = tuple(m for m in args.methods.split(",") if m)
        unknown = set(methods) - set(GRADIENT_FREE_TARGETS)
        if unknown:
            ap.error(f"--methods: unknown {sorted(unknown)}; choose from {list(GRADIENT_FREE_TARGETS)}")
        row = run_gradient_free(args.reps, args.idle if args.idle else 0.3, methods=methods)
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "python": platform.python_version(), "device": "cpu"}
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "rows": [row]}, f, indent=2)
        print(gradient_free_table(row))
        return
    batches = args.batches or ("1,64" if args.device == "cuda" else "1,8")
    rows = []
    for name in args.models.split(","):
        try:
            torch_model(name)
        except ImportError as exc:
            print(f"{name} skipped: {exc}", file=sys.stderr)
            continue
        for batch in [int(b) for b in batches.split(",")]:
            only = None if args.modes is None else set(args.modes.split(","))
            row = run_bench(name, batch, args.reps, device=args.device, only=only, idle=args.idle)
            if not args.no_memory and args.device == "cpu":
                model_bytes = export(torch_model(name), 224)
                ort_mb, cam_mb, export_mb = (
                    statistics.median(peak_memory(model_bytes, batch, mode) for _ in range(args.memory_runs))
                    for mode in ("ort", "onnxcam", "export"))
                row["peak_mib"] = {"ort": ort_mb, "onnxcam": cam_mb, "ratio": cam_mb / max(ort_mb, 1e-9),
                                   "export": export_mb, "export_ratio_to_onnxcam": export_mb / max(cam_mb, 1e-9),
                                   "export_ratio_to_ort": export_mb / max(ort_mb, 1e-9)}
            rows.append(row)
            print(_line(row) if only is None else _export_line(row), flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version(), "device": args.device}
    if args.device == "cuda":
        import torch
        machine["gpu"] = torch.cuda.get_device_name(0)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    if args.modes is None:
        print(markdown_table({"machine": machine, "rows": rows}))
        print(fastest_table({"machine": machine, "rows": rows}))
    print(export_table({"machine": machine, "rows": rows}))


def markdown_table(results: dict) -> str:
    """The README/docs table: times relative to a plain onnxruntime inference of the same model and batch."""
    head = ("| model | batch | ORT inference | last stage Grad-CAM | last stage HiResCAM | middle stage | top-5 in one "
            "call | pytorch-grad-cam GradCAM | onnxcam speed-up vs pytorch-grad-cam | build (cold) | peak memory |")
    lines = [head, "|" + "---|" * 11]
    for r in results["rows"]:
        x = r["ratio_to_ort"]
        mem = f"x{r['peak_mib']['ratio']:.2f} ({r['peak_mib']['onnxcam']:.0f} MiB)" if "peak_mib" in r else "-"
        pgc, speedup = (f"x{x['pgc-gradcam']:.2f}", f"{r['pgc_over_onnxcam_gradcam']:.1f}x") if "pgc-gradcam" in x \
            else ("-", "-")
        lines.append(f"| {r['model']} | {r['batch']} | {r['median_s']['ort'] * 1e3:.1f} ms | x{x['last-gradcam']:.2f} | "
                     f"x{x['last-hirescam']:.2f} | x{x['mid-gradcam']:.2f} | x{x['top5']:.2f} | "
                     f"{pgc} | {speedup} | {r['build_cold_s']:.2f} s | {mem} |")
    return "\n".join(lines)


def fastest_table(results: dict) -> str:
    """The same run's ratios of the fastest repetitions (last stage, middle stage, top-5)."""
    lines = ["| model | batch | last stage Grad-CAM | last stage HiResCAM | middle stage | top-5 in one call |",
             "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        x = r.get("fastest_ratio_to_ort")
        if x:
            lines.append(f"| {r['model']} | {r['batch']} | x{x['last-gradcam']:.2f} | x{x['last-hirescam']:.2f} | "
                         f"x{x['mid-gradcam']:.2f} | x{x['top5']:.2f} |")
    return "\n".join(lines)


def export_table(results: dict) -> str:
    """The exported model (Grad-CAM in the graph) against a plain inference and onnxcam's Python path, median and
    fastest repetitions; peak memory against a plain inference's and onnxcam's explain run's."""
    head = ("| model | batch | ORT inference | export, median | export, fastest | export, paired | "
            "export / last-gradcam (median) | peak memory vs ORT | vs onnxcam |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        x, f = r["ratio_to_ort"], r["fastest_ratio_to_ort"]
        if "export" not in x:
            continue
        vs = f"x{r['median_s']['export'] / r['median_s']['last-gradcam']:.2f}" if "last-gradcam" in x else "-"
        mem = (f"x{r['peak_mib']['export_ratio_to_ort']:.2f} ({r['peak_mib']['export']:.0f} MiB) | "
               f"x{r['peak_mib']['export_ratio_to_onnxcam']:.2f}" if "peak_mib" in r else "- | -")
        lines.append(f"| {r['model']} | {r['batch']} | {r['median_s']['ort'] * 1e3:.1f} ms | x{x['export']:.2f} | "
                     f"x{f['export']:.2f} | x{r['export_paired_ratio']:.2f} | {vs} | {mem} |")
    return "\n".join(lines)


def _export_line(row):
    r, f = row["ratio_to_ort"], row["fastest_ratio_to_ort"]
    paired = f" | export paired x{row['export_paired_ratio']:.3f}" if "export_paired_ratio" in row else ""
    return (f"{row['model']:>15} b{row['batch']:<2} ort {row['median_s']['ort'] * 1e3:7.1f} ms | " +
            " ".join(f"{k} x{r[k]:.2f} (fastest x{f[k]:.2f})" for k in r if k != "ort") + paired)


def _line(row):
    r = row["ratio_to_ort"]
    mem = f" mem x{row['peak_mib']['ratio']:.2f}" if "peak_mib" in row else ""
    pgc = (f"pgc x{r['pgc-gradcam']:.2f} (onnxcam {row['pgc_over_onnxcam_gradcam']:.1f}x faster)"
           if "pgc-gradcam" in r else "pgc skipped")
    fallbacks = [f for found in row.get("cpu_fallbacks", {}).values() for f in (found or [])]
    return (f"{row['model']:>15} b{row['batch']:<2} ort {row['median_s']['ort'] * 1e3:7.1f} ms | "
            f"last-gradcam x{r['last-gradcam']:.2f} last-hirescam x{r['last-hirescam']:.2f} "
            f"mid x{r['mid-gradcam']:.2f} top5 x{r['top5']:.2f} | {pgc} | build {row['build_cold_s']:.2f}s "
            f"cached {row['build_cached_s'] * 1e3:.0f}ms{mem}" + (f" | CPU fallbacks: {fallbacks}" if fallbacks else ""))


if __name__ == "__main__":
    main()
