"""Labelled pictures (image.caption) and explain's contact sheet (audit.sheet.write_contact_sheet): the caption
band leaves the picture's pixels alone and holds the text; the page has one labelled cell per picture in an
images x methods x classes grid, the colour bar of the overlays' colormap, the failures, an evaluation table, no
network links, and it loads in headless Chromium (every picture, names with '#' and spaces included)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import onnxcam
from onnxcam import image
from onnxcam.audit.sheet import write_contact_sheet
from onnxcam.errors import InputError
from onnxcam.files import atomic_write
from tests.test_compare import CHROMIUM, assert_not_blank, page_dom, screenshot

METHODS = (("gradcam", "/layer4/Relu"), ("hirescam", "/layer4/Relu"))
CLASSES = ((285, "Egyptian cat"), (281, "tabby cat"))


# ---- captions ----------------------------------------------------------------------------------------------------
def _picture(h: int = 120, w: int = 200) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_caption_adds_a_band_and_keeps_the_picture():
    pic = _picture()
    kept = pic.copy()
    out = image.caption(pic, ["tabby cat 0.83", "gradcam @ layer4"])
    assert out.dtype == np.uint8 and out.shape[1:] == pic.shape[1:]
    band = out.shape[0] - pic.shape[0]
    assert band > 0 and np.array_equal(out[band:], pic) and np.array_equal(pic, kept)  # map pixels untouched
    # two lines of text: dark pixels in each line's rows of the band, white margins around them
    strip = out[:band].min(axis=2)
    assert (strip[2:16] < 128).sum() > 40 and (strip[17:31] < 128).sum() > 40
    assert (strip[:, -3:] == 255).all()


def test_caption_cuts_a_line_to_the_width_and_takes_columns():
    pic = _picture(40, 90)
    out = image.caption(pic, ["WIDE WWWWWWWWWWWWWWWWW 0.99"])  # W: wider than the average letter
    assert (out[: out.shape[0] - 40, -4:] == 255).all()  # cut (ends in "~"), not drawn past the edge
    assert (out[: out.shape[0] - 40, -20:-4] < 128).any()  # ... and not cut much shorter either
    cols = image.caption(_picture(40, 300), [["left"], ["middle", "two"], []])
    assert cols.shape == (40 + 2 * 15 + 6, 300, 3)  # as high as the longest column
    strip = cols[:36].min(axis=2)
    assert (strip[:, :100] < 128).any() and (strip[:, 100:200] < 128).any() and not (strip[:, 200:] < 128).any()


def test_caption_refuses_what_is_not_an_rgb_picture():
    with pytest.raises(InputError, match="uint8 RGB"):
        image.caption(np.zeros((10, 10), np.uint8), ["x"])
    with pytest.raises(InputError, match="float32"):
        image.caption(np.zeros((10, 10, 3), np.float32), ["x"])


# ---- the contact sheet -------------------------------------------------------------------------------------------
def _entries(out) -> list[dict]:
    """3 images (one named with '#' and a space) x 2 methods x 2 classes, as labelled PNGs, and one failure."""
    rng = np.random.default_rng(1)
    entries = []
    for path in onnxcam.SAMPLE_IMAGES[:3]:
        rgb = image.read_image(path)[::4, ::4].copy()  # small pictures: the test is about the page
        for method, layer in METHODS:
            for c, name in CLASSES:
                score = float(rng.uniform(0.1, 0.9))
                pic = image.caption(image.overlay(rgb, rng.random((7, 7))), [f"{name} {score:.2f}",
                                                                          f"{method} @ {layer}"])
                rel = f"pictures/{path.stem}{' #2' if path.stem == 'coffee' else ''}.{method}.{c}.png"
                atomic_write(out / rel, image.encode_png(pic))
                entries.append({"image": str(path), "picture": rel, "method": method, "layer": layer,
                                "class_name": name, "class_index": c, "score": score})
    entries.append({"image": "broken.png", "error": "cannot decode image broken.png: not an image"})
    return entries


EVALUATION = {"model": "resnet.onnx", "images": ["a.png", "b.png"], "layers": ["/layer4/Relu"],
              "methods": ["gradcam", "hirescam"], "metrics": ["deletion", "insertion"],
              "lower_is_better": ["deletion"], "scores": {"gradcam": {"deletion": 0.125, "insertion": 0.5},
                                                          "hirescam": {"deletion": None, "insertion": 0.75}}}


@pytest.fixture(scope="module")
def sheet(tmp_path_factory):
    out = tmp_path_factory.mktemp("sheet")
    entries = _entries(out)
    return out, entries, write_contact_sheet(out, entries, evaluation=EVALUATION)


def test_one_labelled_cell_per_picture(sheet):
    out, entries, path = sheet
    assert path == out / "report.html"
    page = path.read_text()
    figures = re.findall(r"<figure class='cam'.*?</figure>", page)  # static HTML: no script builds them
    assert len(figures) == len(entries) - 1 == 12
    for x in entries[:-1]:  # each entry's own figure (found by its picture) carries its labels
        (fig,) = [f for f in figures if f"src='{x['picture'].replace(' #', '%20%23')}'" in f]
        assert f"<b>{x['class_name']} {x['score']:.2f}</b>" in fig and f"{x['method']} @ <code>{x['layer']}" in fig
    rows = re.findall(r"<tr class='image-row'.*?</tr>", page)
    assert len(rows) == 3 * 2  # one row per image and class
    assert all(len(re.findall(r"<td>", r)) == 1 + 2 for r in rows)  # the class, then one cell per method
    assert page.count("rowspan='2'") == 3
    assert "coffee%20%232.gradcam.285.png" in page  # a '#' in a file name is a file name, not a fragment


def test_colour_bar_failures_evaluation_and_no_network(sheet):
    _, _, path = sheet
    page = path.read_text()
    stops = re.findall(r"<stop offset='([0-9.]+)' stop-color='#([0-9a-f]{6})'/>", page)
    assert len(stops) > 10 and stops[0][0] == "0.0000" and stops[-1][0] == "1.0000"
    for offset, colour in stops:  # the overlays' own colormap at each stop
        assert colour == bytes(image.colorize(np.array([[float(offset)]]))[0, 0]).hex()
    assert stops[0][1].startswith("0000") and stops[-1][1].endswith("0000")  # JET: dark blue to dark red
    failures = re.search(r"<ul id='failures'>(.*?)</ul>", page).group(1)
    assert failures.count("<li>") == 1 and "broken.png: cannot decode image broken.png" in failures
    table = re.search(r"<table class='evaluation'>(.*?)</table>", page).group(1)
    assert "deletion (lower is better)" in table and "insertion (higher is better)" in table
    assert "<td>gradcam</td><td class='num'>0.1250</td><td class='num'>0.5000</td>" in table
    assert "<td>hirescam</td><td class='num'>-</td><td class='num'>0.7500</td>" in table
    assert "https://" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "src='/" not in page and "file:" not in page  # pictures linked relatively


def test_an_entry_without_its_fields_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"entry 0 \(a.png\) has no picture, score"):
        write_contact_sheet(tmp_path, [{"image": "a.png", "method": "gradcam", "layer": "l", "class_name": "cat",
                                        "class_index": 1}])
    assert not (tmp_path / "report.html").exists()


def test_only_failures_still_writes_the_page(tmp_path):
    path = write_contact_sheet(tmp_path, [{"image": "x.png", "error": "cannot read"}])
    page = path.read_text()
    assert "x.png: cannot read" in page and "<figure class='cam'" not in page and "id='colorbar'" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian's chromium package; .ci/run "
                                             "installs it)")
def test_contact_sheet_in_a_browser(sheet, tmp_path):
    _, entries, path = sheet
    url = path.resolve().as_uri()
    dom = page_dom(CHROMIUM, url)
    body = re.search(r"<body([^>]*)>", dom).group(1)
    n = len(entries) - 1
    assert f'data-images-loaded="{n}"' in body and f'data-images="{n}"' in body, body
    assert len(re.findall(r'<figure class="cam"', dom)) == n
    assert_not_blank(screenshot(CHROMIUM, url, tmp_path / "shot.png"))
