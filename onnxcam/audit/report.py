"""A comparison's outputs: report.html (self-contained: inline CSS, SVG plots and script; pictures beside it,
linked relatively), report.json, report.csv, and pictures/<image>.<method>[.<class>].png side by side (the image,
each model's overlay labelled with its prediction, the absolute difference of each model's map from the first's).

The page works without JavaScript (rows come most divergent first); with it, column headers sort the rows, and
report.html#sort=KEY (agreement, -agreement, name, prob_diff) sorts on load.
"""

from __future__ import annotations

import csv
import html
import io
import logging
from functools import reduce
from pathlib import Path

import numpy as np

from .. import __version__, image
from ..files import atomic_write, write_json
from .compare import AGREEMENT, DISTANCES, Comparison

log = logging.getLogger(__name__)
PICTURE_HEIGHT = 224  # each panel's height in the side-by-side pictures (smaller images keep theirs)
CSV_FIELDS = ("image", "method", "class", "label", "model", "class_in_model", "score_first", "score_model",
              *AGREEMENT, *DISTANCES, "zero_map")


def write_picture(out: Path, f, group, big, models: list[dict], reps) -> str:
    """Write one image's side-by-side picture for one method and class; return its path relative to `out`."""
    m0 = group[0]
    h = min(PICTURE_HEIGHT, f.rgb.shape[0])
    panels = [f.rgb] + [image.overlay(f.rgb, m.mask) for m in group]
    panels += [image.heatmap(np.abs(big[0] - b), (f.rgb.shape[1], f.rgb.shape[0])) for b in big[1:]]
    row = reduce(lambda a, b: image.side_by_side(a, b, h), panels[1:], image.side_by_side(panels[0], panels[0], h))
    row = row[:, row.shape[1] // (len(panels) + 1):]  # the image was put in twice to scale it: drop one
    what = m0.method if m0.agnostic else f"{m0.method} for {m0.label}"
    cols = [[f"{f.path.name}", what]]
    for info, rep, m in zip(models, reps, group):
        _c, label, p = rep.top[0]
        cols.append([info["name"], f"top-1 {label} {p:.2f}", "zero map" if m.zero else
                     ("" if m.agnostic else f"explains {m.score:.2f}")])
    cols += [[f"|map - {models[0]['name']}|", info["name"]] for info in models[1:]]
    rel = Path("pictures") / (str(f.base) + f".{m0.method}" + ("" if m0.agnostic else f".{m0.target}") + ".png")
    atomic_write(out / rel, image.encode_png(image.caption(row, cols)))
    return rel.as_posix()


def write_reports(result: Comparison, out: Path, fail_under: float | None = None) -> dict[str, Path]:
    """report.json, report.csv and report.html in `out`; returns their paths."""
    out = Path(out)
    paths = {"json": out / "report.json", "csv": out / "report.csv", "html": out / "report.html"}
    summary = result.summary()
    below = result.below(fail_under) if fail_under is not None else []
    record = {"onnxcam": __version__, "models": result.models, "methods": result.methods,
              "agreement_figures": list(AGREEMENT), "distance_figures": list(DISTANCES),
              "fail_under": fail_under, "below": len(below), "summary": summary, "images": result.images,
              "rows": [_clean(r) for r in result.rows],
              "failures": [vars(f) for f in result.failures], "timings": _rounded(result.timings)}
    write_json(paths["json"], record)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in result.rows:
        writer.writerow({**r, "zero_map": "; ".join(r["zero_map"] or [])})
    atomic_write(paths["csv"], buf.getvalue().encode("utf-8"))
    atomic_write(paths["html"], _html(result, summary, fail_under, below).encode("utf-8"))
    return paths


def _clean(r: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}


def _rounded(d):
    if isinstance(d, dict):
        return {k: _rounded(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_rounded(v) for v in d]
    return round(d, 4) if isinstance(d, float) else d


# ---- the page --------------------------------------------------------------------------------------------------
_CSS = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}th{background:#f3f3f3}
th.sort{cursor:pointer;text-decoration:underline}.bad{background:#fdd}.num{text-align:right}
img.pair{max-width:100%;display:block;margin-bottom:4px}code{font-size:12px}svg{background:#fafafa;margin-right:1em}"""

_SCRIPT = """
function sortRows(key){
  var body=document.querySelector('#images tbody'); if(!body) return;
  var desc=key.charAt(0)==='-'; var k=desc?key.slice(1):key;
  var rows=Array.prototype.slice.call(body.querySelectorAll('tr.image-row'));
  rows.sort(function(a,b){
    var x=a.dataset[k], y=b.dataset[k];
    var nx=parseFloat(x), ny=parseFloat(y);
    var c=(isNaN(nx)||isNaN(ny))?x.localeCompare(y):nx-ny;
    return desc?-c:c;});
  rows.forEach(function(r){body.appendChild(r);});
  document.body.dataset.sorted=key;
}
document.querySelectorAll('th.sort').forEach(function(th){
  th.addEventListener('click',function(){
    var k=th.dataset.key; var now=document.body.dataset.sorted;
    sortRows(now===k?'-'+k:k);});});
var m=/sort=(-?[a-z_]+)/.exec(location.hash); if(m) sortRows(m[1]);
window.addEventListener('load',function(){
  var imgs=Array.prototype.slice.call(document.images);
  document.body.dataset.imagesLoaded=imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;
  document.body.dataset.images=imgs.length;});
"""


def _html(result: Comparison, summary: list[dict], fail_under, below) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>onnxcam compare</title>",
             f"<style>{_CSS}</style></head><body>",
             (f"<h1>onnxcam compare</h1><p>{len(result.images)} images compared, {len(result.failures)} failures; "
             f"methods {e(', '.join(result.methods))}; each model is compared with the first "
             f"({e(result.models[0]['name'])}). onnxcam {e(__version__)}.</p>")]
    if fail_under is not None:
        verdict = f"{len(below)} comparisons below it" if below else "every agreement figure at or above it"
        parts.append(f"<p id='verdict' class='{'bad' if below else ''}'>fail-under {fail_under}: {verdict}.</p>")
    parts.append("<h2>Models</h2><table id='models'><tr><th>#</th><th>model</th><th>hash</th><th>opsets</th>"
                 "<th>producer</th><th>layer</th><th>preprocessing</th><th>labels</th><th>classes</th></tr>")
    for k, m in enumerate(result.models, 1):
        pre = m["preprocess"]
        mean, std = (", ".join(f"{v:.3f}" for v in pre[k]) for k in ("mean", "std"))
        pre_text = (f"{pre['layout']} {pre['size'][0]}x{pre['size'][1]} mean {mean} std {std}"
                    f"{' BGR' if pre.get('bgr') else ''}")
        opsets = ", ".join(f"{d} {v}" for d, v in m["opsets"].items())
        parts.append(f"<tr><td>{k}</td><td>{e(m['name'])}</td><td><code>{e(m['hash'][:16])}</code></td>"
                     f"<td>{e(opsets)}</td><td>{e(m['producer'])}</td><td><code>{e(', '.join(m['layers']))}</code>"
                     f"</td><td>{e(pre_text)}</td><td>{e(m['labels'])}</td><td>{m['classes']}</td></tr>")
    parts.append("</table>")
    parts.append(_summary_table(summary))
    parts.append("<h2>Plots</h2>" + _histogram(result) + _scatter(result))
    if result.failures:
        parts.append("<h2>Failures</h2><ul id='failures'>")
        parts += [f"<li>{e(f.image)}{' with ' + e(f.model) if f.model else ''}: {e(f.error)}</li>"
                  for f in result.failures]
        parts.append("</ul>")
    parts.append("<h2>Images</h2><p>Most divergent first; click a header to sort.</p><table id='images'><thead><tr>"
                 "<th class='sort' data-key='name'>image</th><th class='sort' data-key='agreement'>agreement "
                 "(lowest Pearson)</th><th class='sort' data-key='top1'>same top-1</th>"
                 "<th class='sort' data-key='prob_diff'>largest probability difference</th><th>pictures</th>"
                 "</tr></thead><tbody>")
    for im in result.images:
        pics = "".join(f"<img class='pair' src='{e(p)}' alt='{e(p)}'>" for p in im["pictures"])
        preds = "<br>".join(f"{e(p['model'])}: {e(p['label'])} {p['score']:.3f}" for p in im["predictions"])
        bad = " bad" if fail_under is not None and im["agreement"] < fail_under else ""
        parts.append(f"<tr class='image-row{bad}' data-name='{e(im['name'])}' data-agreement='{im['agreement']:.6f}'"
                     f" data-top1='{im['top1']:.0f}' data-prob_diff='{im['prob_diff']:.6f}'><td>{e(im['name'])}"
                     f"<br><small>{preds}</small></td><td class='num'>{im['agreement']:.4f}</td>"
                     f"<td>{'yes' if im['top1'] == 1 else 'no'}</td><td class='num'>{im['prob_diff']:.4f}</td>"
                     f"<td>{pics}</td></tr>")
    parts.append(f"</tbody></table><script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def _summary_table(summary: list[dict]) -> str:
    e = html.escape
    rows = [("<h2>Agreement</h2><p>Per model (against the first) and method, over the images: the mean, the worst "
            "(minimum; maximum for distances) and the 5th percentile (95th for distances).</p>"
            "<table id='summary'><tr><th>model</th><th>method</th><th>figure</th><th>mean</th><th>worst</th>"
            "<th>p5 / p95</th></tr>")]
    for s in summary:
        rows.append(f"<tr><td>{e(s['model'])}</td><td>{e(s['method'])}</td><td>{e(s['figure'])}</td>"
                    f"<td class='num'>{s['mean']:.4f}</td><td class='num'>{s['worst']:.4f}</td>"
                    f"<td class='num'>{s['p5']:.4f}</td></tr>")
    return "".join(rows) + "</table>"


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _histogram(result: Comparison, width: int = 420, height: int = 200, bins: int = 20) -> str:
    """The distribution of map agreement (Pearson), one colour per model, over [min(0, lowest), 1]."""
    values = {m["name"]: [r["pearson"] for r in result.rows if r["model"] == m["name"]] for m in result.models[1:]}
    lo = min([0.0] + [v for vs in values.values() for v in vs])
    edges = np.linspace(lo, 1.0, bins + 1)
    counts = {k: np.histogram(v, edges)[0] for k, v in values.items()}
    top = max([1] + [int(c.max()) for c in counts.values()])
    pw, ph, x0, y0 = width - 50, height - 45, 40, 10
    bar = pw / bins / max(1, len(counts))
    out = [f"<svg id='hist' width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>",
           f"<text x='{x0}' y='{height - 5}' font-size='11'>map agreement (Pearson), {lo:.2f} .. 1</text>",
           f"<line x1='{x0}' y1='{y0 + ph}' x2='{x0 + pw}' y2='{y0 + ph}' stroke='#444'/>",
           f"<text x='2' y='{y0 + 10}' font-size='10'>{top}</text>"]
    for j, (name, c) in enumerate(counts.items()):
        color = _COLORS[j % len(_COLORS)]
        for b, n in enumerate(c):
            if n:
                hgt = ph * n / top
                out.append(f"<rect x='{x0 + b * pw / bins + j * bar:.1f}' y='{y0 + ph - hgt:.1f}' width='{bar:.1f}' "
                           f"height='{hgt:.1f}' fill='{color}'><title>{html.escape(name)}: {n}</title></rect>")
        out.append(f"<text x='{x0 + 5}' y='{y0 + 12 + 12 * j}' font-size='10' fill='{color}'>"
                   f"{html.escape(name)}</text>")
    return "".join(out) + "</svg>"


def _scatter(result: Comparison, width: int = 420, height: int = 200) -> str:
    """Map agreement (Pearson) against the largest probability difference, one point per image and method."""
    pw, ph, x0, y0 = width - 50, height - 45, 40, 10
    lo = min([0.0] + [r["pearson"] for r in result.rows])
    top = max([1e-6] + [r["prob_diff"] for r in result.rows])
    names = [m["name"] for m in result.models[1:]]
    out = [f"<svg id='scatter' width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>",
           (f"<text x='{x0}' y='{height - 5}' font-size='11'>largest probability difference, 0 .. {top:.3f} "
           f"(vertical: Pearson {lo:.2f} .. 1)</text>"),
           f"<rect x='{x0}' y='{y0}' width='{pw}' height='{ph}' fill='none' stroke='#444'/>"]
    for r in result.rows:
        x = x0 + pw * r["prob_diff"] / top
        y = y0 + ph * (1 - (r["pearson"] - lo) / max(1e-9, 1 - lo))
        color = _COLORS[names.index(r["model"]) % len(_COLORS)]
        out.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3' fill='{color}'><title>{html.escape(r['image'])} "
                   f"{html.escape(r['model'])} {r['method']}: {r['pearson']:.4f}, {r['prob_diff']:.4f}</title></circle>")
    return "".join(out) + "</svg>"


def page_text(result: Comparison) -> str:
    """The agreement summary as plain text lines (what the command prints)."""
    lines, width = [], max(len(m["name"]) for m in result.models)
    for s in result.summary():
        if s["figure"] in ("pearson", "top1", "iou15", "prob_diff"):
            lines.append(f"  {s['model']:{width}s} {s['method']:9s} {s['figure']:9s} mean {s['mean']:.4f}  "
                         f"worst {s['worst']:.4f}  p5/p95 {s['p5']:.4f}")
    return "\n".join(lines)

