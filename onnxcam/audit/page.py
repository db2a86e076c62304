"""The pieces every onnxcam HTML page shares (compare's report, explain's contact sheet): the style sheet, the head,
relative links, the colour bar, the failure list, the evaluation table and the script that counts loaded images.

Pages are single self-contained files: inline CSS, SVG and script, pictures beside them by relative links; nothing
is fetched from the network. The static parts read the same with JavaScript off.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import numpy as np

from .. import __version__, image
from ..errors import InputError

CSS = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}th{background:#f3f3f3}
th.sort{cursor:pointer;text-decoration:underline}.bad{background:#fdd}.num{text-align:right}
img.pair{max-width:100%;display:block;margin-bottom:4px}code{font-size:12px}svg{background:#fafafa;margin-right:1em}
figure.cam{display:inline-block;margin:2px;vertical-align:top}figure.cam img{max-width:260px;height:auto;display:block}
figure.cam figcaption{font-size:12px;max-width:260px}"""

# Counts the images that loaded (body data-images / data-images-loaded): what a browser test reads back.
LOAD_SCRIPT = """
window.addEventListener('load',function(){
  var imgs=Array.prototype.slice.call(document.images);
  document.body.dataset.imagesLoaded=imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;
  document.body.dataset.images=imgs.length;});
"""


def head(title: str) -> str:
    """The page up to and including <body>."""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>")


def href(relative: str) -> str:
    """A relative file path as an attribute value: URL-quoted (a '#' or '?' in a file name is a file name) and
    HTML-escaped."""
    return html.escape(quote(PurePosixPath(relative).as_posix()), quote=True)


def colour_bar(width: int = 320, height: int = 46) -> str:
    """The overlays' colormap (JET, image.colorize) from 0 to 1 as an inline SVG gradient with ticks."""
    stops = np.linspace(0.0, 1.0, 33)
    rgb = image.colorize(stops[None, :])[0]
    grad = "".join(f"<stop offset='{s:.4f}' stop-color='#{r:02x}{g:02x}{b:02x}'/>" for s, (r, g, b) in zip(stops, rgb))
    x0, bar_w, bar_h = 10, width - 20, 16
    ticks = "".join(f"<line x1='{x0 + t * bar_w:.1f}' y1='{4 + bar_h}' x2='{x0 + t * bar_w:.1f}' y2='{8 + bar_h}' "
                    f"stroke='#222'/><text x='{x0 + t * bar_w:.1f}' y='{20 + bar_h}' font-size='11' "
                    f"text-anchor='middle'>{t:g}</text>" for t in (0, 0.25, 0.5, 0.75, 1))
    return (f"<figure id='colorbar'><svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg' "
            f"role='img' aria-label='colour scale of the maps, 0 to 1'><defs><linearGradient id='jet'>{grad}"
            f"</linearGradient></defs><rect x='{x0}' y='4' width='{bar_w}' height='{bar_h}' fill='url(#jet)'/>"
            f"{ticks}</svg><figcaption>map value (each map scaled to 0..1)</figcaption></figure>")


def failure_list(failures: list[tuple[str, str]]) -> str:
    """<h2>Failures</h2> and a list of (what, why) lines; empty when there are none."""
    if not failures:
        return ""
    items = "".join(f"<li>{html.escape(what)}: {html.escape(why)}</li>" for what, why in failures)
    return f"<h2>Failures</h2><ul id='failures'>{items}</ul>"


def read_evaluation(path) -> dict:
    """`onnxcam evaluate`'s JSON file (evaluate.write_json), checked for what evaluation_table reads."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the evaluation {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in _EVALUATION_FIELDS):
        raise InputError(f"{path} is not onnxcam evaluate's JSON: it needs "
                         f"{', '.join(f'{k!r} ({t.__name__})' for k, t in _EVALUATION_FIELDS)}")
    return record


_EVALUATION_FIELDS = (("model", str), ("methods", list), ("metrics", list), ("scores", dict))


def evaluation_table(record: dict, title: str = "Evaluation") -> str:
    """`onnxcam evaluate`'s JSON (Evaluation.as_dict) as a table, one row per method, one column per metric."""
    e = html.escape
    metrics, lower = list(record.get("metrics", [])), set(record.get("lower_is_better", []))
    scores = record.get("scores", {})
    heads = "".join(f"<th>{e(m)} ({'lower' if m in lower else 'higher'} is better)</th>" for m in metrics)
    rows = "".join(f"<tr><td>{e(method)}</td>"
                   + "".join(f"<td class='num'>{_number(scores.get(method, {}).get(m))}</td>" for m in metrics)
                   + "</tr>" for method in record.get("methods", []))
    about = (f"{e(str(record.get('model', '?')))}, {len(record.get('images', []))} images, layer "
             f"<code>{e(', '.join(record.get('layers', [])))}</code>")
    return (f"<h2>{e(title)}</h2><p>onnxcam evaluate on {about}: the mean over the images.</p>"
            f"<table class='evaluation'><tr><th>method</th>{heads}</tr>{rows}</table>")


def _number(v) -> str:
    return "-" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.4f}"


def footer(script: str = "") -> str:
    """The scripts (the image counter first) and the end of the page."""
    return f"<p><small>onnxcam {html.escape(__version__)}</small></p><script>{LOAD_SCRIPT}{script}</script></body></html>"
