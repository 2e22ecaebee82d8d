"""The HTML eval report: one self-contained page with inline SVG plots (no script, no CDN: the
service reaches no network, and a saved report must still open years later).

Plots: KPI bars for the model and its baseline; each KPI's difference with its 95% interval; the
training curve of the job that produced the model; data drift against its thresholds and each
KPI's history over the model family's reports.
"""

from __future__ import annotations

import html
from typing import Any

WIDTH, ROW = 640, 28
CANDIDATE, BASELINE, BAD, GOOD, GREY = "#3366cc", "#aaaaaa", "#cc3333", "#339955", "#666666"
VERDICT_COLOURS = {"pass": GOOD, "fail": BAD, "inconclusive": "#cc8800"}


def render(view: dict[str, Any], curve: list[tuple[int, float]], history: list[dict[str, Any]]) -> str:
    """`view` is read_eval_report's result as JSON; `curve` the training loss by step; `history` the
    family's reports on the suite, oldest first, each `{"id", "kpis": {name: value}}`."""
    e = html.escape
    kpis = [{**k, "baseline": None, "delta": None, "ci95": None, "p_value": None, **(k["gate"] or {}),
             "gate": (k["gate"] or {}).get("verdict")} for k in view["kpis"]]
    title = f"Eval report {view['html_url'].rsplit('/', 1)[-1].removesuffix('.html')}"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
        ("<style>body{font:14px sans-serif;margin:24px;max-width:760px}td,th{padding:3px 8px;text-align:left;"
        "border-bottom:1px solid #ddd;vertical-align:top}pre{white-space:pre-wrap;margin:0;font-size:12px}"
        "h2{margin-top:28px}</style></head><body>"),
        f"<h1>{e(title)}</h1>",
        (f"<p>Model <b>{e(view['model'])}</b>; baseline "
        f"{e(view['baseline'] or 'none')}. Verdict: "
        f"<b style='color:{VERDICT_COLOURS[view['verdict']]}'>{e(view['verdict'])}</b></p>"),
        _kpi_table(kpis),
        "<h2>KPIs against the baseline</h2>", kpi_bars(kpis),
        "<h2>Difference from the baseline (95% interval)</h2>", delta_plot(kpis),
        "<h2>Training curve</h2>", line_plot([(float(s), v) for s, v in curve], "step", "loss")
        if curve else "<p>No training curve: the model was not trained by this service.</p>",
        "<h2>Drift</h2>", drift_plot(view["drift"]), _history_plots(history),
        "<h2>Next steps</h2><ul>", *(f"<li>{e(step)}</li>" for step in view["next_steps"]), "</ul>",
        "<h2>Worst items</h2>", _items_table(view["items"]), "</body></html>"]
    return "\n".join(parts)


def kpi_bars(kpis: list[dict[str, Any]]) -> str:
    """Per KPI, the model's bar and the baseline's, each KPI on its own scale (rates and perplexities
    do not share an axis)."""
    height = ROW * 2 * len(kpis) + 20
    out = [_svg_open(height)]
    for row_index, kpi in enumerate(kpis):
        y = 10 + row_index * 2 * ROW
        values = [v for v in (kpi["value"], kpi["baseline"]) if v is not None]
        scale = (WIDTH - 260) / (max(abs(v) for v in values) or 1.0)
        out.append(_text(10, y + ROW - 8, kpi["name"]))
        for offset, (value, colour, label) in enumerate(((kpi["value"], CANDIDATE, "model"),
                                                         (kpi["baseline"], BASELINE, "baseline"))):
            if value is None:
                continue
            top = y + offset * (ROW - 6)
            out.append(f"<rect x='150' y='{top}' width='{max(abs(value) * scale, 1):.1f}' height='{ROW - 10}' "
                       f"fill='{colour}'/>")
            out.append(_text(155 + abs(value) * scale, top + ROW - 14, f"{label} {value:.3g}"))
    return "".join(out) + "</svg>"


def delta_plot(kpis: list[dict[str, Any]]) -> str:
    """A forest plot: each KPI's difference (model - baseline) with its interval, around zero."""
    gated = [k for k in kpis if k.get("ci95")]
    if not gated:
        return "<p>No baseline: no differences to show.</p>"
    span = max(max(abs(k["ci95"][0]), abs(k["ci95"][1]), abs(k["delta"])) for k in gated) or 1.0
    centre, half = 150 + (WIDTH - 170) / 2, (WIDTH - 190) / 2
    def x(v: float) -> float:
        return centre + v / span * half

    out = [_svg_open(ROW * len(gated) + 20),
           f"<line x1='{centre}' y1='0' x2='{centre}' y2='{ROW * len(gated) + 20}' stroke='{GREY}'/>"]
    for i, kpi in enumerate(gated):
        y = 14 + i * ROW
        colour = {"fail": BAD, "pass": GOOD}.get(kpi["gate"], "#cc8800")
        out.append(_text(10, y + 4, f"{kpi['name']} ({kpi['gate']})"))
        out.append(f"<line x1='{x(kpi['ci95'][0]):.1f}' y1='{y}' x2='{x(kpi['ci95'][1]):.1f}' y2='{y}' "
                   f"stroke='{colour}' stroke-width='3'/>")
        out.append(f"<circle cx='{x(kpi['delta']):.1f}' cy='{y}' r='5' fill='{colour}'/>")
    return "".join(out) + "</svg>"


def line_plot(points: list[tuple[float, float]], x_label: str, y_label: str, band: tuple[float, float] | None = None,
              height: int = 180) -> str:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    y_values = ys + (list(band) if band else [])
    x_low, x_high = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_low, y_high = min(y_values), max(y_values) if max(y_values) > min(y_values) else min(y_values) + 1

    def at(px: float, py: float) -> str:
        return (f"{60 + (px - x_low) / (x_high - x_low) * (WIDTH - 80):.1f},"
                f"{height - 30 - (py - y_low) / (y_high - y_low) * (height - 50):.1f}")

    out = [_svg_open(height),
           f"<line x1='60' y1='{height - 30}' x2='{WIDTH - 20}' y2='{height - 30}' stroke='{GREY}'/>",
           f"<line x1='60' y1='20' x2='60' y2='{height - 30}' stroke='{GREY}'/>",
           _text(WIDTH / 2, height - 8, x_label), _text(4, 16, f"{y_label} {y_high:.3g}"),
           _text(4, height - 34, f"{y_low:.3g}")]
    if band:
        for level in band:
            out.append(f"<polyline points='{at(x_low, level)} {at(x_high, level)}' stroke='{BAD}' "
                       "stroke-dasharray='4' fill='none'/>")
    out.append(f"<polyline points='{' '.join(at(px, py) for px, py in points)}' stroke='{CANDIDATE}' "
               "stroke-width='2' fill='none'/>")
    out += [f"<circle cx='{at(px, py).split(',')[0]}' cy='{at(px, py).split(',')[1]}' r='3' fill='{CANDIDATE}'/>"
            for px, py in points[-50:]]
    return "".join(out) + "</svg>"


def drift_plot(found: dict[str, Any]) -> str:
    data = found.get("data")
    if not data:
        return "<p>No data drift measured: the model has no training data on record.</p>"
    bars = [("JS distance", data["js_distance"], 0.1)]
    if data.get("domain_auc") is not None:  # None: too few records in one set alone to train the classifier
        bars.append(("domain AUC", data["domain_auc"], 0.55))
    out = [_svg_open(ROW * len(bars) + 20)]
    for i, (label, value, threshold) in enumerate(bars):
        y = 10 + i * ROW
        colour = BAD if value > threshold else GOOD
        out.append(_text(10, y + 14, f"{label} {value:.3f}"))
        out.append(f"<rect x='150' y='{y}' width='{value * (WIDTH - 200):.1f}' height='{ROW - 10}' fill='{colour}'/>")
        out.append(f"<line x1='{150 + threshold * (WIDTH - 200):.1f}' y1='{y - 2}' "
                   f"x2='{150 + threshold * (WIDTH - 200):.1f}' y2='{y + ROW - 6}' stroke='black' stroke-width='2'/>")
    verdict = "drift found" if data["drifted"] else "no drift"
    reading = f" {html.escape(data['auc_reading'])}" if data.get("auc_reading") else ""
    return "".join(out) + (f"</svg><p>Suite data against training data: {verdict} (black marks: thresholds)."
                           f"{reading}</p>")


def _history_plots(history: list[dict[str, Any]]) -> str:
    if len(history) < 2:
        return "<p>KPI history: fewer than two reports in this model family on this suite.</p>"
    out = []
    for name in list(history[-1]["kpis"])[:4]:
        points = [(float(i), h["kpis"][name]) for i, h in enumerate(history) if name in h["kpis"]]
        out.append(f"<h3>{html.escape(name)} over the family's reports</h3>" + line_plot(points, "report", name,
                                                                                           height=140))
    return "".join(out)


def _kpi_table(kpis: list[dict[str, Any]]) -> str:
    e = html.escape
    rows = [("<table><tr><th>KPI</th><th>value</th><th>threshold</th><th>baseline</th><th>delta [95% CI]</th>"
            "<th>p</th><th>gate</th></tr>")]
    for k in kpis:
        ci = f"{k['delta']:+.3g} [{k['ci95'][0]:+.3g}, {k['ci95'][1]:+.3g}]" if k.get("ci95") else ""
        cells = [e(k["name"]), _number(k["value"]), _number(k["threshold"]), _number(k["baseline"]), ci,
                 _number(k["p_value"]), e(k["gate"] or "")]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return "".join(rows) + "</table>"


def _items_table(items: list[dict[str, Any]]) -> str:
    e = html.escape
    rows = ["<table><tr><th>#</th><th>output</th><th>reference</th><th>scores</th></tr>"]
    for item in items:
        scores = ", ".join(f"{k}={v:.3g}" for k, v in item["scores"].items())
        rows.append(f"<tr><td>{item['index']}</td><td><pre>{e(item['output'])}</pre></td>"
                    f"<td><pre>{e(item['reference'])}</pre></td><td>{e(scores)}</td></tr>")
    return "".join(rows) + "</table>"


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _svg_open(height: float) -> str:
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{height:.0f}' "
            f"viewBox='0 0 {WIDTH} {height:.0f}' style='background:#fafafa'>")


def _text(x: float, y: float, text: str) -> str:
    return f"<text x='{x:.1f}' y='{y:.1f}' font-size='12' fill='#222'>{html.escape(text)}</text>"
