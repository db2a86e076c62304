"""End to end on the bundled EfficientNet-Lite0: real predictions on real photos, class-discriminative Grad-CAM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxcam import Explainer, image, preprocess
from onnxcam.cam.api import explain
from onnxcam.cli import DEMO_MODEL, DEMO_SAMPLES, main

CAT, ESPRESSO = 285, 967


@pytest.fixture(scope="module")
def lite0():
    proto = onnx.load(str(DEMO_MODEL))
    return Explainer(proto, device="cpu"), preprocess.resolve(proto), preprocess.labels_from_metadata(proto)


def test_bundled_files_are_there():
    assert DEMO_MODEL.stat().st_size > 10e6
    assert sorted(p.name for p in DEMO_SAMPLES.iterdir()) == [
        "CREDITS.md", "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
    credits = (DEMO_SAMPLES / "CREDITS.md").read_text()
    assert all(name in credits for name in ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"))


def test_the_samples_are_classified_correctly(lite0):
    ex, pre, labels = lite0
    x = np.stack([image.to_input(image.read_image(DEMO_SAMPLES / n), pre) for n in ("chelsea.png", "coffee.png")])
    r = ex.run(x)
    z = np.exp(r.logits - r.logits.max(axis=1, keepdims=True))
    p = z / z.sum(axis=1, keepdims=True)
    assert r.targets.tolist() == [CAT, ESPRESSO]
    assert labels[CAT] == "Egyptian cat" and labels[ESPRESSO] == "espresso"
    assert p[0, CAT] == pytest.approx(0.78, abs=0.03) and p[1, ESPRESSO] == pytest.approx(0.90, abs=0.03)
    assert p[0, 281:286].sum() > 0.9  # the cat classes (tabby .. Egyptian cat) hold almost all the cat's mass


@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_each_class_map_lands_on_its_own_object(lite0, method):
    """The Grad-CAM paper's class-discrimination point: one picture, two objects, a map per class."""
    ex, pre, _ = lite0
    pair = image.side_by_side(image.read_image(DEMO_SAMPLES / "chelsea.png"),
                              image.read_image(DEMO_SAMPLES / "coffee.png"))  # cat left, espresso right
    x = image.to_input(pair, pre)[None]
    half = x.shape[-1] // 2
    for cls, own in ((CAT, slice(0, half)), (ESPRESSO, slice(half, None))):
        m = explain(ex, x, method, targets=cls).maps[0]
        other = slice(half, None) if own.start == 0 else slice(0, half)
        _, peak_x = np.unravel_index(np.argmax(m), m.shape)
        assert own.start <= peak_x < (own.stop or m.shape[1]), (cls, peak_x)
        assert m[:, own].mean() > 2 * m[:, other].mean(), (cls, m[:, own].mean(), m[:, other].mean())


def test_demo_command(tmp_path):
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path):
        result = runner.invoke(main, ["demo", "--method", "gradcam"])
        assert result.exit_code == 0, result.output + result.stderr
        out = result.output
        assert "chelsea.png      285 Egyptian cat (0.78) -> onnxcam-out/chelsea.gradcam.285.overlay.png" in out
        assert "coffee.png       967 espresso (0.91)" in out
        assert "map for 285 'Egyptian cat' peaks on the left (the cat)" in out
        assert "map for 967 'espresso' peaks on the right (the cup)" in out
        assert out.splitlines()[-1].startswith("Explained 5 pictures in ")
        assert out.splitlines()[-1].endswith("wrote 11 files to onnxcam-out")
        written = sorted(p.name for p in Path("onnxcam-out").iterdir())
        assert "chelsea.gradcam.285.overlay.png" in written and "cat_and_coffee.gradcam.967.overlay.png" in written
        assert len(written) == 11 and not [n for n in written if n.endswith(".heatmap.png")]  # heatmaps: opt-in
