"""`cvdeploy doctor --out report.html`: the ranked findings and each step's figures, with plots.

Self-contained like the bundle report (inline SVG, no script, no network). Each step's section is drawn from the
report's `sections[step]` when the step ran; a step that did not run is listed with what it needs.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from cvdeploy.report.html import CSS

e = html.escape
SEVERITY_COLOURS = {"serious": "#b00", "warning": "#b66a00", "info": "#2a6fdb", "ok": "#2a7d2a"}
NEEDS = {
    "environment": "always runs",
    "integrity": "runs for a variant that fails golden parity here, or with --reference MODEL",
    "io-log": "--io-log DIR",
    "data": "--field DIR (and a baseline: the bundle's profile.json, --baseline or --data)",
    "preprocessing": "--field with --predictions, or --data",
    "controlled": "--data DATA.yaml",
    "speed": "runs unless --no-speed",
}


def bars_svg(rows: Sequence[tuple[str, float, str]], *, unit: str = "", lines: Sequence[tuple[float, str]] = (),
             width: int = 640, label_width: int = 190) -> str:
    """Horizontal bars: (label, value, colour) per row; optional vertical reference lines (value, label)."""
    if not rows:
        return ""
    bar_h, gap, top = 16, 6, 22
    height = top + len(rows) * (bar_h + gap) + 24
    finite = [v for _, v, _ in rows if math.isfinite(v)] + [v for v, _ in lines]
    vmax = max([*finite, 1e-12]) * 1.08
    span = width - label_width - 70

    def px(v: float) -> float:
        return label_width + min(max(v, 0.0), vmax) / vmax * span

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for i, (label, value, colour) in enumerate(rows):
        y = top + i * (bar_h + gap)
        shown = value if math.isfinite(value) else vmax
        text = "inf" if not math.isfinite(value) else f"{value:.3g}{unit}"
        parts.append(f'<text x="{label_width - 6}" y="{y + 12}" font-size="11" text-anchor="end">{e(label)}</text>'
                     f'<rect x="{label_width}" y="{y}" width="{px(shown) - label_width:.1f}" height="{bar_h}" fill="{colour}"/>'
                     f'<text x="{px(shown) + 4:.1f}" y="{y + 12}" font-size="11">{text}</text>')
    for value, label in lines:
        x = px(value)
        parts.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height - 20}" stroke="#555" stroke-dasharray="4 3"/>'
                     f'<text x="{x:.1f}" y="{top - 9}" font-size="10" text-anchor="middle">{e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def line_svg(values: Sequence[float], *, marker: int | None = None, threshold: float | None = None, width: int = 640,
             height: int = 220, ylabel: str = "") -> str:
    """A log-scale line of per-node errors in graph order; `marker` flags one index (the first diverging node)."""
    if not values:
        return ""
    m = {"l": 60, "r": 20, "t": 14, "b": 30}
    big = 1e6
    ys = [math.log10(min(max(v if math.isfinite(v) else big, 1e-9), big)) for v in values]
    y0, y1 = min(ys) - 0.5, max(ys) + 0.5
    if threshold is not None and threshold > 0:
        t = math.log10(threshold)
        y0, y1 = min(y0, t - 0.5), max(y1, t + 0.5)

    def px(i: int) -> float:
        return m["l"] + i / max(len(values) - 1, 1) * (width - m["l"] - m["r"])

    def py(y: float) -> float:
        return height - m["b"] - (y - y0) / (y1 - y0) * (height - m["t"] - m["b"])

    pts = " ".join(f"{px(i):.1f},{py(y):.1f}" for i, y in enumerate(ys))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<rect x="{m["l"]}" y="{m["t"]}" width="{width - m["l"] - m["r"]}" height="{height - m["t"] - m["b"]}" '
             'fill="none" stroke="#999"/>', f'<polyline points="{pts}" fill="none" stroke="#2a6fdb" stroke-width="1.5"/>']
    for k in range(math.ceil(y0), math.floor(y1) + 1):
        parts.append(f'<text x="{m["l"] - 6}" y="{py(k) + 4:.1f}" font-size="10" text-anchor="end">1e{k}</text>')
    if threshold is not None and threshold > 0:
        yt = py(math.log10(threshold))
        parts.append(f'<line x1="{m["l"]}" y1="{yt:.1f}" x2="{width - m["r"]}" y2="{yt:.1f}" stroke="#b00" '
                     'stroke-dasharray="4 3"/>')
    if marker is not None and 0 <= marker < len(values):
        parts.append(f'<circle cx="{px(marker):.1f}" cy="{py(ys[marker]):.1f}" r="5" fill="#b00"/>')
    parts.append(f'<text x="{(width + m["l"]) / 2}" y="{height - 6}" font-size="11" text-anchor="middle">node, in graph '
                 f'order</text><text x="12" y="{height / 2}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 12 {height / 2})">{e(ylabel)}</text></svg>')
    return "".join(parts)


def _findings(report: Any) -> str:
    rows = "".join(
        f'<tr><td style="color:{SEVERITY_COLOURS[f.severity]};font-weight:bold">{e(f.severity)}</td><td>{e(f.step)}</td>'
        f'<td style="text-align:left">{e(f.message)}</td><td style="text-align:left">{e(f.fix)}</td></tr>'
        for f in report.findings)
    return ("<table><tr><th>severity</th><th>step</th><th>finding</th><th>fix</th></tr>" + rows + "</table>")


def _environment(section: dict[str, Any]) -> str:
    rows = []
    for c in section.get("checks", []):
        rows.append(f"<tr><td>{e(c['variant'])}</td><td>{'yes' if c['ok'] else '<span class=bad>no</span>'}</td>"
                    f"<td>{_num(c.get('max_abs_scores'), '.1e')}</td><td>{_num(c.get('tolerance'), '.1e')}</td>"
                    f"<td>{e(str(c.get('provider') or '-'))}</td><td>{e(str(c.get('engine_precision') or '-'))}</td>"
                    f"<td style='text-align:left'>{e('; '.join(c.get('problems', []) + c.get('differences', [])))}</td></tr>")
    table = ("<table><tr><th>variant</th><th>verifies here</th><th>max |Δ| scores</th><th>tolerance</th><th>provider</th>"
             "<th>ran at</th><th>problems and differences</th></tr>" + "".join(rows) + "</table>")
    found = section.get("findings", [])
    if found:
        table += ("<table><tr><th>what</th><th>severity</th><th>likely to matter</th><th>finding</th></tr>"
                  + "".join(f"<tr><td>{e(str(d.get('topic', '')))}</td><td>{e(str(d.get('severity', '')))}</td>"
                            f"<td>{e(str(d.get('likelihood', '')))}</td><td style='text-align:left'>{e(str(d.get('message', '')))}"
                            "</td></tr>" for d in found) + "</table>")
    return table


def _data(section: dict[str, Any]) -> str:
    drifts = sorted(section.get("drifts", []), key=lambda d: -(d["value"] / d["serious_threshold"])
                    if d.get("serious_threshold") else 0)
    rows = [(d["statistic"], d["value"] / d["serious_threshold"], SEVERITY_COLOURS.get(d["severity"], "#999"))
            for d in drifts if d.get("serious_threshold") and d.get("test") != "none"]
    plot = bars_svg(rows, lines=[(1.0, "serious")])
    table = "".join(f"<tr><td>{e(d['statistic'])}</td><td>{e(d['test'])}</td><td>{_num(d['value'], '.3g')}</td>"
                    f"<td>{_num(d['warning_threshold'], '.3g')}</td><td>{_num(d['serious_threshold'], '.3g')}</td>"
                    f"<td>{e(d['severity'])}</td><td style='text-align:left'>{e(d['message'])}</td></tr>" for d in drifts)
    return (f"<p>Field: {section.get('field_images')} images against {e(str(section.get('baseline')))}. Bars: each test's "
            "statistic divided by its serious threshold (1 = serious).</p>" + plot
            + "<table><tr><th>statistic</th><th>test</th><th>value</th><th>warning</th><th>serious</th><th>severity</th>"
              "<th>message</th></tr>" + table + "</table>")


def _preprocessing(section: dict[str, Any]) -> str:
    out = []
    for key, title, what in (("with_predictions", "Against the field's answers", "agreement with the field (1 = reproduces it)"),
                             ("with_labels", "Against labels", "mAP with this pipeline")):
        r = section.get(key)
        if not r:
            continue
        cands = [r["baseline"], *r["findings"]]
        rows = [(c["mistake"], float(c["score"]), "#b00" if c["mistake"] in r["cause"] else "#2a6fdb") for c in cands]
        out.append(f"<h3>{title}</h3><p>{e(r['verdict'])}</p><p class=muted>Bars: {what}.</p>" + bars_svg(rows))
    return "".join(out)


def _controlled(section: dict[str, Any]) -> str:
    out = []
    text = section.get("table")
    if text:
        out.append(f"<pre>{e(text)}</pre>")
    for variant, v in (section.get("variants") or {}).items():
        deltas = (v.get("delta_points") or {}).get("per_class") or {}
        rows = [(name, abs(float(d)), "#b00" if d < 0 else "#2a7d2a") for name, d in deltas.items() if d is not None]
        if rows:
            out.append(f"<h3>{e(variant)}: per-class mAP50-95 change against the source (points; red: lost)</h3>"
                       + bars_svg(rows, unit=" pt"))
    return "".join(out)


def _integrity(section: dict[str, Any]) -> str:
    out = []
    for item in section.get("divergences", []):
        profile = item.get("profile") or []
        values = [math.inf if p.get("nonfinite") else float(p.get("error_out", 0.0)) for p in profile]
        node = (item.get("node") or {}).get("node")
        marker = next((i for i, p in enumerate(profile) if p.get("node") == node), None)
        out.append(f"<h3>{e(str(item.get('candidate', '')))} against {e(str(item.get('reference', '')))}</h3>"
                   f"<p>{e(str(item.get('message', '')))}</p><p class=muted>Relative RMS error of each node's outputs, in "
                   "graph order; dashed: the tolerance; red dot: the first diverging node.</p>"
                   + line_svg(values, marker=marker, threshold=item.get("tolerance"), ylabel="relative RMS error"))
    return "".join(out)


def _speed(section: dict[str, Any]) -> str:
    shares = section.get("stage_ms") or {}
    rows = [(stage, float(ms), "#2a6fdb") for stage, ms in shares.items() if ms is not None]
    figures = section.get("figures") or {}
    facts = "".join(f"<li>{e(str(k))}: {e(str(v))}</li>" for k, v in figures.items() if not isinstance(v, dict | list))
    return ("<p>Median milliseconds per stage after warm-up, one image:</p>" + bars_svg(rows, unit=" ms") if rows else "") + (
        f"<ul>{facts}</ul>" if facts else "")


RENDERERS = {"environment": _environment, "integrity": _integrity, "data": _data, "preprocessing": _preprocessing,
             "controlled": _controlled, "speed": _speed}
TITLES = {"environment": "Environment: the bundle on this machine", "integrity": "Export integrity: first diverging layer",
          "io-log": "Inference I/O log", "data": "Data consistency: drift from the baseline",
          "preprocessing": "Preprocessing audit", "controlled": "Controlled dataset: mAP per class and size",
          "speed": "Slow inference: where the time goes"}


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def doctor_report(report: Any) -> str:
    """The HTML page of a `DoctorReport`."""
    parts = []
    for step, title in TITLES.items():
        section = report.sections.get(step)
        if step not in report.steps_run:
            parts.append(f"<h2>{e(title)}</h2><p class=muted>Not run: {e(NEEDS[step])}.</p>")
            continue
        findings = [f for f in report.findings if f.step == step]
        listed = "".join(f'<li><b style="color:{SEVERITY_COLOURS[f.severity]}">{e(f.severity)}</b> {e(f.message)}'
                         + (f"<br><span class=muted>fix: {e(f.fix)}</span>" if f.fix else "") + "</li>" for f in findings)
        body = RENDERERS[step](section) if step in RENDERERS and section else ""
        parts.append(f"<h2>{e(title)}</h2><ul>{listed}</ul>{body}")
    verdict = (f"<span class=bad>{len(report.serious)} serious finding(s)</span>" if report.serious
               else "no serious finding") + f", {len(report.warnings)} warning(s)"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>cvdeploy doctor: {e(report.bundle)}</title>
<style>{CSS}</style></head><body>
<h1>cvdeploy doctor</h1>
<p>Bundle <code>{e(report.bundle)}</code>: {verdict}. Steps run: {e(', '.join(report.steps_run))}.</p>
<h2>Findings, most serious first</h2>
{_findings(report)}
{''.join(parts)}
</body></html>
"""
