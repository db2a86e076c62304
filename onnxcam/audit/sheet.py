"""A contact sheet of explanations (`onnxcam explain --report`): out_dir/report.html with one row per image (and per
class explained in it), one column per method and layer, each overlay labelled with its class name and score, the
overlays' colour bar, the images that failed, and optionally `onnxcam evaluate`'s table. Self-contained: the
pictures are linked relatively (they lie under out_dir), no network, and nothing on it needs JavaScript.
"""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path

from ..errors import InputError
from ..files import atomic_write
from . import page

log = logging.getLogger(__name__)
_NEEDED = ("image", "picture", "method", "layer", "class_name", "class_index", "score")


def write_contact_sheet(out_dir: Path, entries: list[dict], *, evaluation: dict | None = None,
                        title: str = "onnxcam explain") -> Path:
    """Write out_dir/report.html and return its path.

    entries: one per picture, {"image": source image path, "picture": PNG path relative to out_dir, "method",
    "layer", "class_name", "class_index" (None for a class-agnostic map), "score"}; an entry with an "error" is a
    failure (only "image" is needed then) and is listed, not drawn. evaluation: `onnxcam evaluate`'s record
    (Evaluation.as_dict()), shown as a method x metric table."""
    out_dir = Path(out_dir)
    done = [x for x in entries if not x.get("error")]
    failed = [x for x in entries if x.get("error")]
    for k, x in enumerate(done):
        missing = [key for key in _NEEDED if key not in x]
        if missing:
            raise InputError(f"contact sheet entry {k} ({x.get('image', '?')}) has no {', '.join(missing)}")
    columns = list(dict.fromkeys((x["method"], x["layer"]) for x in done))
    parts = [page.head(title), f"<h1>{html.escape(title)}</h1>", _summary(entries, done, failed, columns),
             page.colour_bar(), page.evaluation_table(evaluation) if evaluation else "",
             page.failure_list([(_what(x), str(x["error"])) for x in failed]), _grid(out_dir, done, columns),
             page.footer()]
    path = out_dir / "report.html"
    atomic_write(path, "\n".join(p for p in parts if p).encode("utf-8"))
    log.info("wrote %s: %d pictures, %d failures", path, len(done), len(failed))
    return path


def _summary(entries, done, failed, columns) -> str:
    images = len(dict.fromkeys(str(x.get("image")) for x in entries))
    methods = ", ".join(f"{m} @ {layer}" for m, layer in columns) or "none"
    return (f"<p id='summary'>{images} images, {len(done)} pictures, {len(failed)} failed; methods "
            f"{html.escape(methods)}. Each overlay is labelled with the class it explains and that class's "
            f"score.</p>")


def _what(x: dict) -> str:
    return " ".join(str(v) for v in (x.get("image", "?"), x.get("method"), x.get("class_name")) if v)


def _grid(out_dir: Path, done: list[dict], columns: list[tuple]) -> str:
    """The table: a header cell per (method, layer); per image one row per class, the image's name spanning them."""
    e = html.escape
    if not done:
        return "<p>No pictures.</p>"
    heads = "".join(f"<th>{e(m)}<br><small><code>{e(layer)}</code></small></th>" for m, layer in columns)
    rows = [f"<h2>Pictures</h2><table id='sheet'><thead><tr><th>image</th><th>class</th>{heads}</tr></thead><tbody>"]
    by_image: dict[str, list[dict]] = {}
    for x in done:
        by_image.setdefault(str(x["image"]), []).append(x)
    for name, group in by_image.items():
        classes = list(dict.fromkeys(x["class_index"] for x in group))
        for i, c in enumerate(classes):
            here = [x for x in group if x["class_index"] == c]
            first = (f"<th rowspan='{len(classes)}' title='{e(name)}'>{e(Path(name).name)}</th>" if i == 0 else "")
            cells = "".join("<td>" + "".join(_figure(out_dir, x) for x in here if (x["method"], x["layer"]) == col)
                            + "</td>" for col in columns)
            rows.append(f"<tr class='image-row' data-image='{e(name)}'>{first}<td>{e(_class_text(here[0]))}</td>"
                        f"{cells}</tr>")
    return "".join(rows) + "</tbody></table>"


def _class_text(x: dict) -> str:
    return "any class" if x["class_index"] is None else f"{x['class_name']} ({x['class_index']})"


def _figure(out_dir: Path, x: dict) -> str:
    e = html.escape
    rel = _relative(out_dir, x["picture"])
    label = "any class" if x["score"] is None else f"{x['class_name']} {float(x['score']):.2f}"  # class-agnostic
    return (f"<figure class='cam' data-method='{e(x['method'])}' data-class='{e(str(x['class_index']))}'>"
            f"<a href='{page.href(rel)}'><img src='{page.href(rel)}' alt='{e(x['method'])} for {e(label)}' "
            f"loading='eager'></a><figcaption><b>{e(label)}</b><br>{e(x['method'])} @ <code>{e(x['layer'])}</code>"
            "</figcaption></figure>")


def _relative(out_dir: Path, picture) -> str:
    """The picture's path relative to out_dir (an absolute path is made relative; the page links relatively)."""
    p = Path(picture)
    if p.is_absolute():
        p = Path(os.path.relpath(p, out_dir.resolve()))
    if not (out_dir / p).is_file():
        log.warning("contact sheet: picture %s is not in %s", p, out_dir)
    return p.as_posix()
