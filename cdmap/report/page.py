"""The self-contained ``report.html``: pictures embedded as data URIs, no scripts, no network."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

EVALUATION_MARK = "<!-- cdmap:evaluation -->"
"""Where :func:`evaluation_section` is inserted by ``cdmap evaluate --scene``."""

SIZE_CLASSES_M2 = (0.0, 10.0, 100.0, 1_000.0, 10_000.0, float("inf"))

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1020px;
color:#222;padding:0 1em}
h1{font-size:1.4em;margin-bottom:0.2em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:0.9em}td,th{padding:0.2em 0.8em;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto}.muted{color:#777;font-size:0.85em}.warn{color:#a00}
.row{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    cells = []
    for k, v in rows:
        num = isinstance(v, int | float) and not isinstance(v, bool)
        cells.append(f"<tr><th>{html.escape(k)}</th><td{' class=n' if num else ''}>{html.escape(_fmt(v))}</td></tr>")
    return "<table>" + "".join(cells) + "</table>"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.1f}"
    return str(v)


def size_classes(areas_m2: Sequence[float]) -> list[dict[str, Any]]:
    """Polygon count and changed area per size class (``<10``, ``10-100``, ... ``>=10,000`` m²)."""
    import numpy as np

    a = np.asarray(areas_m2, dtype=np.float64)
    out = []
    for lo, hi in zip(SIZE_CLASSES_M2[:-1], SIZE_CLASSES_M2[1:], strict=True):
        sel = (a >= lo) & (a < hi)
        label = f"< {hi:,.0f}" if lo == 0 else (f">= {lo:,.0f}" if hi == float("inf") else f"{lo:,.0f}-{hi:,.0f}")
        out.append({"label": label, "min_m2": lo, "max_m2": hi if hi != float("inf") else None,
                    "polygons": int(sel.sum()), "area_m2": float(a[sel].sum())})
    return out


def summary_rows(s: dict[str, Any]) -> list[tuple[str, Any]]:
    """The report's run table from run.json's content."""
    inp, opts, t = s["inputs"], s["options"], s["timings"]
    model = s["model"]
    rows: list[tuple[str, Any]] = [
        ("before", inp["before"]), ("after", inp["after"]),
        ("scene", f"{inp['width']:,} x {inp['height']:,} px, {inp['bands']} band(s)"),
        ("CRS", inp.get("crs") or "none (pixel grid)"),
        ("alignment", s.get("alignment", {}).get("mode")),
        ("checkpoint", f"{model.get('checkpoint') or '(in memory)'} (sha256 {model['sha256'][:12]})"),
        ("window tile / overlap / margin", "{tile} / {overlap} / {margin} px".format(**s["window"])
         if "window" in s else None),
        ("threshold", s.get("threshold", opts.get("threshold"))),
        ("device, precision", f"{s['device']}, {s['precision']}"),
        ("windows", f"{s['windows']['computed']:,} computed of {s['windows']['total']:,} "
                    f"({s['windows']['skipped_nodata']:,} all nodata)"),
        ("wall time", f"{t.get('total_s', 0):.1f} s"),
        ("throughput", f"{s['mpix_per_s'] * 1000:.3g} kPix/s" if s.get("mpix_per_s") else None),
        ("peak memory", f"{s['peak_rss_mib']:,.0f} MiB RSS"
         + (f", {s['peak_gpu_mib']:,.0f} MiB GPU" if s.get("peak_gpu_mib") else "")),
        ("valid pixels", s["valid_pixels"]), ("changed pixels", s["changed_pixels"]),
        ("changed area", f"{s['changed_area_m2']:,.1f} m² ({s.get('changed_area_ha', s['changed_area_m2'] / 1e4):,.3f}"
                         " ha)"),
        ("changed share of the valid scene", f"{100 * s['changed_share']:.3f} %"
         if s.get("changed_share") is not None else None),
        ("polygons", s.get("polygons")),
    ]
    return rows


def seam_rows(s: dict[str, Any]) -> list[tuple[str, Any]]:
    """The seam figures of run.json."""
    return [("seam ratio (1.0: no seams; above about 1.1 the window grid can show)", s.get("seam_ratio")),
            ("overlap disagreement (mean |P| difference where windows overlap)", s.get("overlap_disagreement"))]


def page(s: dict[str, Any], *, preview: bytes | None, histogram: bytes | None, classes: list[dict[str, Any]] | None,
         classes_png: bytes | None) -> str:
    """The whole HTML document of a predict run."""
    inp = s["inputs"]
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>cdmap report: "
             f"{html.escape(_name(inp['before']))} -> {html.escape(_name(inp['after']))}</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Change between {html.escape(_name(inp['before']))} and {html.escape(_name(inp['after']))}</h1>",
             f"<p class=muted>cdmap {html.escape(s['cdmap_version'])}; every figure below is from run.json.</p>"]
    if preview is not None:
        parts.append(_img(preview, "before, after and change overlay"))
    warnings = s.get("warnings") or []
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li class=warn>{html.escape(str(w))}</li>"
                                                        for w in warnings) + "</ul>")
    parts.append(EVALUATION_MARK)
    parts.append("<h2>Run</h2>" + _table(summary_rows(s)))
    if histogram is not None:
        parts.append("<h2>Probability of change</h2><p class=muted>valid pixels per P(change) bin, log scale</p>"
                     + _img(histogram, "histogram of P(change)"))
    if classes is not None:
        rows = "".join(f"<tr><td>{html.escape(c['label'])}</td><td class=n>{c['polygons']:,}</td>"
                       f"<td class=n>{c['area_m2']:,.1f}</td><td class=n>{c['area_m2'] / 1e4:,.4f}</td></tr>"
                       for c in classes)
        parts.append("<h2>Changed area by polygon size</h2><div class=row><table><tr><th>size (m²)</th>"
                     f"<th>polygons</th><th>area (m²)</th><th>area (ha)</th></tr>{rows}</table>"
                     + (_img(classes_png, "changed area by polygon size") if classes_png else "") + "</div>")
    parts.append("<h2>Seams</h2>" + _table(seam_rows(s)))
    outputs = s.get("outputs", {})
    parts.append("<h2>Outputs</h2><ul>" + "".join(
        f'<li><a href="{html.escape(_name(p))}">{html.escape(_name(p))}</a></li>' for p in outputs.values())
        + "</ul></body></html>\n")
    return "\n".join(parts)


def evaluation_section(metrics: dict[str, Any], labels: str, error_map: bytes | None,
                       error_map_name: str | None) -> str:
    """The evaluation block that ``cdmap evaluate --scene`` inserts at :data:`EVALUATION_MARK`."""
    keys = ("precision", "recall", "f1", "iou", "oa", "kappa", "tp", "fp", "fn", "tn")
    names = {"f1": "F1", "iou": "IoU", "oa": "OA (overall accuracy)", "tp": "TP", "fp": "FP", "fn": "FN", "tn": "TN"}
    rows = [(names.get(k, k), metrics[k]) for k in keys if k in metrics]
    out = f"<h2>Evaluation against {html.escape(_name(labels))}</h2><div class=row>{_table(rows)}"
    if error_map is not None:
        out += "<div>" + _img(error_map, "error map: TP white, FP red, FN green, TN black")
        if error_map_name:
            out += f"<p class=muted>georeferenced GeoTIFF: {html.escape(error_map_name)}</p>"
        out += "</div>"
    return out + "</div>\n" + EVALUATION_MARK


def _name(path: Any) -> str:
    text = str(path).rstrip("/")
    return text.rsplit("/", 1)[-1]
