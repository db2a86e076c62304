"""A comparison's outputs: report.html (self-contained: inline CSS, SVG plots and script; pictures beside it,
linked relatively), report.json, report.csv, and pictures/<image>.<method>[.<class>].png side by side (the image,
each model's overlay labelled with its prediction, score and layer unless written bare, the absolute difference of
each model's map from the first's). Failures are listed in all three reports; `onnxcam evaluate`'s tables can join.

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
from ..errors import InputError
from ..files import atomic_write, write_json
from . import page
from .compare import AGREEMENT, DISTANCES, Comparison

log = logging.getLogger(__name__)
PICTURE_HEIGHT = 224  # each panel's height in the side-by-side pictures (small images scaled up: labels fit)
CSV_FIELDS = ("image", "method", "class", "label", "model", "class_in_model", "score_first", "score_model",
              *AGREEMENT, *DISTANCES, "zero_map", "error")


def write_picture(out: Path, f, group, big, models: list[dict], reps, labelled: bool = True) -> str:
    """Write one image's side-by-side picture for one method and class; return its path relative to `out`.

    labelled: a caption band above the panels names the image, method and class, and per model its name, top-1
    class and probability, the explained class's probability and the layer; False writes the panels bare."""
    m0 = group[0]
    h = PICTURE_HEIGHT
    panels = [f.rgb] + [image.overlay(f.rgb, m.mask) for m in group]
    panels += [image.heatmap(np.abs(big[0] - b), (f.rgb.shape[1], f.rgb.shape[0])) for b in big[1:]]
    row = reduce(lambda a, b: image.side_by_side(a, b, h), panels[1:], image.side_by_side(panels[0], panels[0], h))
    row = row[:, row.shape[1] // (len(panels) + 1):]  # the image was put in twice to scale it: drop one
    rel = Path("pictures") / (str(f.base) + f".{m0.method}" + ("" if m0.agnostic else f".{m0.target}") + ".png")
    if labelled:
        row = image.caption(row, _labels(f, group, models, reps))
    atomic_write(out / rel, image.encode_png(row))
    return rel.as_posix()


def _labels(f, group, models: list[dict], reps) -> list[list[str]]:
    """The caption's lines, one list per panel."""
    m0 = group[0]
    cols = [[f"{f.path.name}", m0.method if m0.agnostic else f"{m0.method} for {m0.label}"]]
    for info, rep, m in zip(models, reps, group):
        _c, label, p = rep.top[0]
        cols.append([info["name"], f"top-1 {label} {p:.2f}", "zero map" if m.zero else
                     ("" if m.agnostic else f"explains {m.score:.2f}"), f"@ {', '.join(info['layers'])}"])
    return cols + [[f"|map - {models[0]['name']}|", info["name"]] for info in models[1:]]


def write_reports(result: Comparison, out: Path, fail_under: float | None = None,
                  evaluations: dict[str, dict] | None = None) -> dict[str, Path]:
    """report.json, report.csv and report.html in `out`; returns their paths.

    Failures are listed in all three (in the CSV as rows with an error). evaluations: `onnxcam evaluate`'s records
    (page.read_evaluation) by model name, shown as method x metric tables."""
    out = Path(out)
    paths = {"json": out / "report.json", "csv": out / "report.csv", "html": out / "report.html"}
    summary = result.summary()
    below = result.below(fail_under) if fail_under is not None else []
    record = {"onnxcam": __version__, "models": result.models, "methods": result.methods,
              "agreement_figures": list(AGREEMENT), "distance_figures": list(DISTANCES),
              "fail_under": fail_under, "below": len(below), "summary": summary, "images": result.images,
              "rows": [_clean(r) for r in result.rows],
              "failures": [vars(f) for f in result.failures], "evaluations": evaluations or {},
              "timings": _rounded(result.timings)}
    write_json(paths["json"], record)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in result.rows:
        writer.writerow({**r, "zero_map": "; ".join(r["zero_map"] or [])})
    for f in result.failures:
        writer.writerow({"image": f.image, "model": f.model or "", "error": f.error})
    atomic_write(paths["csv"], buf.getvalue().encode("utf-8"))
    atomic_write(paths["html"], _html(result, summary, fail_under, below, evaluations or {}).encode("utf-8"))
    return paths


def read_evaluations(models: list[Path], files: list[tuple[int | None, Path]]) -> dict[int, dict]:
    """`onnxcam evaluate`'s JSON files by the index of the model each belongs to: the given index, or else the
    model whose path the file names (as given to evaluate, or the same file name when only one model has it)."""
    out = {}
    for k, path in files:
        record = page.read_evaluation(path)
        if k is None:
            k = _evaluated_model(models, Path(record["model"]), path)
        elif Path(record["model"]).name != Path(models[k]).name:
            log.warning("%s evaluates %s; shown for model %d (%s) as asked", path, record["model"], k + 1, models[k])
        out[k] = record
    return out


def _evaluated_model(models: list[Path], evaluated: Path, path: Path) -> int:
    same = [k for k, m in enumerate(models) if Path(m).resolve() == evaluated.resolve()]
    named = [k for k, m in enumerate(models) if Path(m).name == evaluated.name]
    if same or len(named) == 1:
        return (same or named)[0]
    raise InputError(f"the evaluation {path} is of {evaluated}, which is none of the compared models (or several "
                     "share its name): say which model it belongs to")


def _clean(r: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}


def _rounded(d):
    if isinstance(d, dict):
        return {k: _rounded(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_rounded(v) for v in d]
    return round(d, 4) if isinstance(d, float) else d


# ---- the page --------------------------------------------------------------------------------------------------
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
"""


def _html(result: Comparison, summary: list[dict], fail_under, below, evaluations: dict[str, dict]) -> str:
    e = html.escape
    parts = [page.head("onnxcam compare"),
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
    parts += [page.evaluation_table(record, f"Evaluation of {name}") for name, record in evaluations.items()]
    parts.append(page.failure_list([(f.image + (f" with {f.model}" if f.model else ""), f.error)
                                    for f in result.failures]))
    parts.append("<h2>Images</h2><p>Most divergent first; click a header to sort. Overlays and differences in the "
                 "colour scale below.</p>" + page.colour_bar() + "<table id='images'><thead><tr>"
                 "<th class='sort' data-key='name'>image</th><th class='sort' data-key='agreement'>agreement "
                 "(lowest Pearson)</th><th class='sort' data-key='top1'>same top-1</th>"
                 "<th class='sort' data-key='prob_diff'>largest probability difference</th><th>pictures</th>"
                 "</tr></thead><tbody>")
    for im in result.images:
        pics = "".join(f"<img class='pair' src='{page.href(p)}' alt='{e(p)}'>" for p in im["pictures"])
        preds = "<br>".join(f"{e(p['model'])}: {e(p['label'])} {p['score']:.3f}" for p in im["predictions"])
        bad = " bad" if fail_under is not None and im["agreement"] < fail_under else ""
        parts.append(f"<tr class='image-row{bad}' data-name='{e(im['name'])}' data-agreement='{im['agreement']:.6f}'"
                     f" data-top1='{im['top1']:.0f}' data-prob_diff='{im['prob_diff']:.6f}'><td>{e(im['name'])}"
                     f"<br><small>{preds}</small></td><td class='num'>{im['agreement']:.4f}</td>"
                     f"<td>{'yes' if im['top1'] == 1 else 'no'}</td><td class='num'>{im['prob_diff']:.4f}</td>"
                     f"<td>{pics}</td></tr>")
    parts.append("</tbody></table>" + page.footer(_SCRIPT))
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

