"""The README's edge-build audit figures, reproducibly: fp32 against fp16, int8 QDQ and int8 QOperator builds.

    python tools/audit_figures.py                          # Lite0 and ResNet-18, in a temporary folder
    python tools/audit_figures.py --model resnet18 --out audit-figures --worst 3

For each model (the bundled EfficientNet-Lite0; a torchvision model with seeded weights, as tests/torch_models.py
builds them: no pretrained weights offline) it writes the fp32 ONNX graph, its fp16 build (onnxconverter-common's
converter when installed, else onnxruntime's copy of it, as tests/test_edge_formats.py) and two int8 builds
(onnxruntime's quantize_static, QDQ and QOperator, per-channel int8 weights and uint8 activations, calibrated on the
photos as the README's Lite0 example), then runs `onnxcam.audit.compare` on the photos (onnxcam.SAMPLE_IMAGES and,
when scikit-image is installed, its other photographs), prints the README's agreement table and the images where
int8 diverges most, and copies those images' side-by-side pictures into OUT/<model>/worst/.

The torchvision weights are random (seeded), not trained: their top-1 agreement measures how quantization moves the
near-uniform scores of an untrained net, not an accuracy loss.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/torch_models.py builds the seeded torchvision models
    sys.path.insert(0, str(ROOT))

import onnxcam
from onnxcam import image, preprocess
from onnxcam.audit import Comparison, ModelSpec, compare, write_reports

BUILDS = ("fp32", "fp16", "int8 QDQ", "int8 QOperator")
FILES = {"fp32": "fp32.onnx", "fp16": "fp16.onnx", "int8 QDQ": "int8-qdq.onnx", "int8 QOperator": "int8-qop.onnx"}
INT8 = ("int8 QDQ", "int8 QOperator")
TITLES = {"lite0": "Lite0", "resnet18": "ResNet-18", "mobilenet_v3_small": "MobileNetV3-S"}
# scikit-image's photographs beyond the bundled four (its textures, drawings and binary images left out)
SKIMAGE_PHOTOS = ("camera.png", "coins.png", "moon.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
                  "retina.jpg", "chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")


# ---- photos ----------------------------------------------------------------------------------------------------
def photos(with_skimage: bool = True) -> list[Path]:
    """The bundled sample photos, then scikit-image's photographs not among them (when it is installed)."""
    found = list(onnxcam.SAMPLE_IMAGES)
    if with_skimage:
        try:
            import skimage.data
        except ImportError:
            return found
        names = {p.name for p in found}
        found += [Path(skimage.data.data_dir) / n for n in SKIMAGE_PHOTOS
                  if n not in names and (Path(skimage.data.data_dir) / n).exists()]
    return found


# ---- builds ----------------------------------------------------------------------------------------------------
def lite0_fp32(path: Path) -> Path:
    """The bundled EfficientNet-Lite0 (real weights; preprocessing and labels in its metadata)."""
    shutil.copyfile(onnxcam.BUNDLED_MODEL, path)
    return path


def torch_fp32(model, path: Path, size: int = 224) -> Path:
    """A torch module exported with the TorchScript exporter (opset 17, dynamic batch) at size x size."""
    import torch

    from tests.torch_models import export

    path.write_bytes(export(model.eval(), torch.zeros(1, 3, size, size), "torchscript"))
    return path


def torchvision_fp32(name: str, path: Path, seed: int = 0) -> Path:
    """A torchvision classifier with seeded weights and random BatchNorm statistics (tests/torch_models.py)."""
    from tests.torch_models import make_model

    return torch_fp32(make_model(name, seed=seed), path)


def fp16_build(src: Path, dst: Path) -> Path:
    """The fp16 build, with float32 inputs and outputs."""
    try:
        from onnxconverter_common.float16 import convert_float_to_float16
    except ImportError:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return dst


def calibration_feeds(src: Path, images: list[Path]) -> list[dict[str, np.ndarray]]:
    """One feed per image, preprocessed as onnxcam preprocesses it for this model."""
    proto = onnx.load(str(src), load_external_data=False)
    pre = preprocess.resolve(proto)
    weights = {t.name for t in proto.graph.initializer}
    name = next(i.name for i in proto.graph.input if i.name not in weights)
    return [{name: image.to_input(image.read_image(p), pre)[None]} for p in images]


def int8_builds(src: Path, folder: Path, images: list[Path]) -> dict[str, Path]:
    """quantize_static's QDQ and QOperator builds (per-channel int8 weights, uint8 activations)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    feeds = calibration_feeds(src, images)

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    out = {}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static logs its advice and every int64 tensor it skips at WARNING
    try:
        for build, fmt in (("int8 QDQ", QuantFormat.QDQ), ("int8 QOperator", QuantFormat.QOperator)):
            out[build] = folder / FILES[build]
            quantize_static(str(src), str(out[build]), Feeds(), quant_format=fmt, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return out


def build_all(fp32: Path, images: list[Path]) -> dict[str, Path]:
    """{build: path} of fp32 (given) and its fp16, int8 QDQ and int8 QOperator builds, beside it."""
    folder = fp32.parent
    return {"fp32": fp32, "fp16": fp16_build(fp32, folder / FILES["fp16"]), **int8_builds(fp32, folder, images)}


# ---- comparing and reporting -----------------------------------------------------------------------------------
def audit(builds: dict[str, Path], images: list[Path], out: Path, methods=("gradcam",)) -> Comparison:
    """onnxcam compare of every build against the first (fp32); writes out/report.* and out/pictures/."""
    specs = [ModelSpec(builds[b]) for b in BUILDS if b in builds]
    result = compare(specs, images, out, methods=list(methods), device="cpu")
    write_reports(result, out)
    return result


def figures(result: Comparison, builds: dict[str, Path]) -> dict[str, dict[str, float]]:
    """{build: {figure_mean, figure_worst, ...}} per non-reference build, over every image and method."""
    by_name = {p.name: b for b, p in builds.items()}
    out: dict[str, dict[str, float]] = {}
    for s in result.summary():
        build = by_name[Path(s["model"]).name]
        out.setdefault(build, {})
        # with several methods, the worst over them
        worse = min if s["figure"] not in ("prob_diff", "peak_dist") else max
        for key in ("mean", "worst"):
            k = f"{s['figure']}_{key}"
            out[build][k] = worse(out[build][k], s[key]) if k in out[build] else s[key]
    return out


HEADER = ("| against fp32 | top1 mean | top5 mean / worst | pearson mean / worst | spearman mean / worst "
          "| iou15 mean / worst | prob_diff worst | peak_dist worst |")


def table_rows(title: str, figs: dict[str, dict[str, float]]) -> list[str]:
    """The README table's rows, one per build: '| Lite0 fp16 | 1.00 | ... |'."""
    rows = []
    for build, f in figs.items():
        rows.append(f"| {title} {build} | {f['top1_mean']:.2f} | {f['top5_mean']:.2f} / {f['top5_worst']:.2f} "
                    f"| {_corr(f['pearson_mean'])} / {_corr(f['pearson_worst'])} "
                    f"| {_corr(f['spearman_mean'])} / {_corr(f['spearman_worst'])} "
                    f"| {f['iou15_mean']:.3f} / {f['iou15_worst']:.3f} | {f['prob_diff_worst']:.3f} "
                    f"| {f['peak_dist_worst']:.3f} |")
    return rows


def _corr(v: float) -> str:
    """A correlation with enough digits to tell 0.99999 from 1 (fp16 builds sit there)."""
    return f"{v:.6f}" if 0.999 < v < 1.0 else f"{v:.4f}" if v < 1.0 else "1"


def table(sections: list[tuple[str, dict[str, dict[str, float]]]]) -> str:
    """The whole markdown table: the header, then each model's rows."""
    lines = [HEADER, "|" + "|".join("---" for _ in HEADER.strip("|").split("|")) + "|"]
    for title, figs in sections:
        lines += table_rows(title, figs)
    return "\n".join(lines)


def most_divergent(result: Comparison, builds: dict[str, Path], count: int = 3) -> list[dict]:
    """The images where an int8 build diverges most from fp32: lowest Pearson over the int8 rows, then lowest
    IoU; each with its worst int8 figures and the fp32 / int8 predictions."""
    int8 = {builds[b].name for b in INT8 if b in builds}
    per_image: dict[str, dict] = {}
    for r in result.rows:
        if Path(r["model"]).name not in int8:
            continue
        e = per_image.setdefault(r["image"], {"image": r["image"], "pearson": 1.0, "iou15": 1.0, "top1": 1.0,
                                              "prob_diff": 0.0, "peak_dist": 0.0})
        for f in ("pearson", "iou15", "top1"):
            e[f] = min(e[f], r[f])
        for f in ("prob_diff", "peak_dist"):
            e[f] = max(e[f], r[f])
    ranked = sorted(per_image.values(), key=lambda e: (e["pearson"], e["iou15"], e["image"]))[:count]
    entries = {e["image"]: e for e in result.images}
    for e in ranked:
        info = entries[e["image"]]
        e["predictions"] = {p["model"]: f"{p['label']} {p['score']:.3f}" for p in info["predictions"]}
        e["pictures"] = info["pictures"]
    return ranked


def copy_pictures(worst: list[dict], out: Path) -> list[Path]:
    """The worst images' side-by-side pictures, copied to out/worst/ with their rank first."""
    (out / "worst").mkdir(parents=True, exist_ok=True)
    copied = []
    for rank, e in enumerate(worst, start=1):
        for rel in e["pictures"]:
            dst = out / "worst" / f"{rank}-{Path(rel).name}"
            shutil.copyfile(out / rel, dst)
            copied.append(dst)
    return copied


def run_model(name: str, work: Path, images: list[Path], worst: int = 3, methods=("gradcam",)) -> dict:
    """Build, compare and rank one model's builds: {title, figures, worst, pictures, result}."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / FILES["fp32"]
    if name == "lite0":
        lite0_fp32(fp32)
    else:
        torchvision_fp32(name, fp32)
    builds = build_all(fp32, images)
    result = audit(builds, images, folder / "audit", methods)
    ranked = most_divergent(result, builds, worst)
    return {"title": TITLES.get(name, name), "figures": figures(result, builds), "worst": ranked,
            "pictures": copy_pictures(ranked, folder / "audit"), "result": result}


def describe(run: dict) -> list[str]:
    """Lines naming the most divergent images and the failures."""
    lines = [f"{run['title']}: images where int8 diverges most (worst over QDQ and QOperator):"]
    for e in run["worst"]:
        preds = ", ".join(f"{m} {p}" for m, p in e["predictions"].items())
        lines.append(f"  {Path(e['image']).name}: pearson {e['pearson']:.3f} iou15 {e['iou15']:.3f} "
                     f"top1 {e['top1']:.0f} peak_dist {e['peak_dist']:.3f}  ({preds})")
    lines += [f"  failure: {f.image} with {f.model}: {f.error}" for f in run["result"].failures]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", choices=["lite0", "resnet18", "mobilenet_v3_small"],
                    help="lite0 and/or a torchvision model (repeatable; default: lite0 and resnet18)")
    ap.add_argument("--out", type=Path, help="folder for the builds, reports and pictures (default: a temporary one)")
    ap.add_argument("--bundled-only", action="store_true", help="only onnxcam's four sample photos")
    ap.add_argument("--method", default="gradcam", help="comma-separated CAM methods (default gradcam)")
    ap.add_argument("--worst", type=int, default=3, help="how many most divergent images to show (default 3)")
    args = ap.parse_args(argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="onnxcam-audit-"))
    images = photos(with_skimage=not args.bundled_only)
    print(f"{len(images)} photos: {', '.join(p.name for p in images)}")
    runs = [run_model(m, work, images, args.worst, args.method.split(","))
            for m in args.model or ["lite0", "resnet18"]]
    print(table([(r["title"], r["figures"]) for r in runs]))
    for r in runs:
        print("\n".join(describe(r)))
    print(f"builds, reports and pictures in {work} (the worst images' pictures in <model>/audit/worst/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
