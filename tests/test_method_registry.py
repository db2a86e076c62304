"""One method registry (onnxcam.cam.api.REGISTRY): every method is reachable from the command line, explain() and
its class, is documented in the README's method table, and the class-agnostic ones really are."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxcam
from onnxcam.cam.api import CLASS_AGNOSTIC, CLASSES, REGISTRY
from onnxcam.cli import _parse_methods, main

from .test_evaluate import batch, tiny_model

README = (Path(__file__).parent.parent / "README.md").read_text()


def _methods_section() -> str:
    return README.split("## CAM methods", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_method_from_the_api_and_its_class(name):
    info = REGISTRY[name]
    assert CLASSES[name] is info.cls and getattr(onnxcam, info.cls.__name__) is info.cls
    assert _parse_methods(None, None, name) == [name]
    e = onnxcam.explain(tiny_model(), batch(2), name, device="cpu")
    assert e.maps.shape[:3] == (2, 16, 16) and np.isfinite(e.maps).all()


def test_aliases_name_their_method():
    assert _parse_methods(None, None, "gradcampp,gradcam++") == ["gradcam++"]
    assert CLASSES["gradcampp"] is onnxcam.GradCAMPlusPlus


def test_every_method_from_the_command_line(tmp_path):
    onnx.save(tiny_model(), tmp_path / "tiny.onnx")
    cv2.imwrite(str(tmp_path / "a.png"), np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "tiny.onnx"), str(tmp_path / "a.png"), "--method",
                                       ",".join(REGISTRY), "--target", "top2", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    entries = json.loads((tmp_path / "out" / "a.json").read_text())["explanations"]
    for name in REGISTRY:
        classes = [e["class"] for e in entries if e["method"] == name]
        assert classes == [None] if name in CLASS_AGNOSTIC else len(set(classes)) == 2, (name, classes)


@pytest.mark.parametrize("name", sorted(CLASS_AGNOSTIC))
def test_class_agnostic_methods_do_not_depend_on_the_class(name):
    x = batch(2)
    maps = []
    for target in (0, 3):
        np.random.seed(7)  # RandomCAM draws its weights from numpy's global generator, as pytorch-grad-cam does
        maps.append(onnxcam.explain(tiny_model(), x, name, targets=target, device="cpu").maps)
    np.testing.assert_array_equal(maps[0], maps[1])


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_method_is_in_the_readme(name):
    section = _methods_section()
    table = [line for line in section.splitlines() if line.startswith("| `")]
    cls = re.escape(REGISTRY[name].cls.__name__)
    assert any(re.search(f"`{cls}[`(]", row.split(" | ")[0]) for row in table), f"no README table row for {name}"
    listed = re.search(r"Method names \(`--method`, `explain\(method=\)`\): (.*?)\. ", section, re.DOTALL)
    assert listed and f"`{name}`" in listed.group(1), f"{name} is not in the README's list of method names"
