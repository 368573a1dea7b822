"""`report.html` of a bundle: what was built, measured and refused, with an accuracy-against-latency plot.

Self-contained (inline SVG, no script, no network), so that it opens anywhere and can be archived.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:72em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}.bad{color:#b00}.muted{color:#777}
code{background:#f4f4f4;padding:0 .2em}"""


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def scatter_svg(points: Sequence[tuple[str, float, float]], width: int = 560, height: int = 340) -> str:
    """Inline SVG: x = latency (ms, batch 1), y = mAP50-95; one labelled point per variant."""
    if not points:
        return "<p class=muted>No variant has both a latency and an mAP figure (build with --data).</p>"
    m = {"l": 60, "r": 130, "t": 20, "b": 45}
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x0, x1 = min(xs) * 0.9, max(xs) * 1.1
    y0, y1 = min(ys) - 0.02, max(ys) + 0.02
    x1, y1 = (x0 + 1, y1) if x1 == x0 else (x1, y1)

    def px(x: float) -> float:
        return m["l"] + (x - x0) / (x1 - x0) * (width - m["l"] - m["r"])

    def py(y: float) -> float:
        return height - m["b"] - (y - y0) / (y1 - y0) * (height - m["t"] - m["b"])

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="mAP50-95 against latency">',
             f'<rect x="{m["l"]}" y="{m["t"]}" width="{width - m["l"] - m["r"]}" height="{height - m["t"] - m["b"]}" '
             'fill="none" stroke="#999"/>']
    for k in range(5):
        xv, yv = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        parts.append(f'<text x="{px(xv):.1f}" y="{height - m["b"] + 16}" font-size="11" text-anchor="middle">{xv:.1f}</text>')
        parts.append(f'<text x="{m["l"] - 6}" y="{py(yv) + 4:.1f}" font-size="11" text-anchor="end">{yv:.3f}</text>')
    parts.append(f'<text x="{(width - m["r"] + m["l"]) / 2}" y="{height - 8}" font-size="12" text-anchor="middle">'
                 "median latency, batch 1 (ms): lower is better</text>")
    parts.append(f'<text x="14" y="{height / 2}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {height / 2})">'
                 "mAP50-95</text>")
    for name, x, y in points:
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="#2a6fdb"/>')
        parts.append(f'<text x="{px(x) + 8:.1f}" y="{py(y) + 4:.1f}" font-size="12">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bundle_report(manifest: Any, outcomes: Sequence[Any] = (), wall_s: float | None = None) -> str:
    """The report's HTML for a manifest (and, when given, what the last build tried and refused)."""
    e = html.escape
    rows, points = [], []
    for name, v in manifest.variants.items():
        mt = v.metrics
        worst = None
        if v.parity:
            worst = v.parity.worst
        rows.append(
            f"<tr><td>{e(name)}{' (default)' if name == manifest.default_variant else ''}</td><td>{e(v.engine)}</td>"
            f"<td>{e(v.precision)}</td><td>{v.size_bytes / 1e6:.2f} MB</td><td>{_fmt(mt.get('map50_95'), '.4f')}</td>"
            f"<td>{_fmt(mt.get('map50'), '.4f')}</td><td>{_fmt(mt.get('map50_95_drop_points'), '.2f')}</td>"
            f"<td>{_fmt(worst, '.1e')}</td><td>{_fmt(mt.get('box_agreement'), '.0%')}</td>"
            f"<td>{_fmt(mt.get('latency_ms_b1'), '.2f')}</td><td>{_fmt(mt.get('speedup_vs_fp32'), '.2f')}</td>"
            f"<td>{e(ran_at(v))}</td></tr>")
        if "latency_ms_b1" in mt and "map50_95" in mt:
            points.append((name, mt["latency_ms_b1"], mt["map50_95"]))
    tried = "".join(
        f"<li><b>{e(o.name)}</b>: {'written' if o.written else '<span class=bad>not written</span>'} ({e(o.reason)})"
        + ("<ul>" + "".join(f"<li>{e(t)}</li>" for t in o.tried) + "</ul>" if o.tried else "") + "</li>"
        for o in outcomes)
    env = manifest.environment or {}
    cpu = env.get("cpu", {}) if isinstance(env, dict) else {}
    int8 = _int8_candidates(manifest)
    trained = _training_records(manifest)
    packages = ", ".join(f"{k} {v}" for k, v in (env.get("packages", {}) if isinstance(env, dict) else {}).items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(manifest.name)}: build report</title>
<style>{CSS}</style></head><body>
<h1>{e(manifest.name)}</h1>
<p>{e(manifest.task)} model, {len(manifest.names)} classes, input {e(str(manifest.input.shape))}, letterbox to
{manifest.preprocess.imgsz[0]}x{manifest.preprocess.imgsz[1]}; built {e(manifest.created_at)} with cvdeploy {e(manifest.cvdeploy_version)}
{'' if wall_s is None else f'(variants step: {wall_s:.1f} s)'}.</p>
<h2>Variants</h2>
<table><tr><th>variant</th><th>engine</th><th>precision</th><th>size</th><th>mAP50-95</th><th>mAP50</th><th>drop (points)</th>
<th>max |Δ| scores vs source</th><th>box agreement</th><th>latency b1 (ms)</th><th>vs onnx-fp32</th>
<th>ran at</th></tr>
{''.join(rows)}</table>
<p class=muted>mAP: COCO protocol (faster-coco-eval) on the controlled set's val split, through cvdeploy's Predictor.
Parity: raw outputs on the bundle's golden inputs against the source model's. Latency: median of interleaved runs,
batch 1, on the build machine ({e(str(cpu.get('model', '?')))}, flags {e(' '.join(cpu.get('flags', [])))}).</p>
<h2>Accuracy against latency</h2>
{scatter_svg(points)}
{int8}
{trained}
{'<h2>What the build tried</h2><ul>' + tried + '</ul>' if tried else ''}
<h2>Environment</h2><p class=muted>Python {e(str(env.get('python', '?')))}; {e(packages)}</p>
</body></html>
"""


def ran_at(v: Any) -> str:
    """The precision the engine reported while verifying the variant (OpenVINO's inference precision), or '-'."""
    if v.parity is None or v.parity.engine_precision is None:
        return "-"
    return v.precision if v.parity.engine_precision == "as stored" else v.parity.engine_precision


def _training_records(manifest: Any) -> str:
    """Compressed variants (cvdeploy compress): how each was trained."""
    e = html.escape
    keys = ("method", "data", "epochs", "seed", "imgsz", "wall_time_s", "macs_ratio", "params_ratio", "teacher", "student")
    rows = "".join(f"<tr><td>{e(n)}</td>" + "".join(f"<td>{e(str(v.training.get(k, '-')))}</td>" for k in keys) + "</tr>"
                   for n, v in manifest.variants.items() if getattr(v, "training", None))
    if not rows:
        return ""
    return ("<h2>Compressed variants: training</h2><table><tr><th>variant</th>"
            + "".join(f"<th>{k}</th>" for k in keys) + f"</tr>{rows}</table>")


def _int8_candidates(manifest: Any) -> str:
    """The onnx-int8 recipe search: every candidate with its figures, and why the winner won."""
    v = manifest.variants.get("onnx-int8")
    q = (v.quantization or {}) if v is not None else {}
    if not q.get("candidates"):
        return ""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(c['recipe'])}{' (chosen)' if c['recipe'] == q.get('recipe') else ''}</td>"
        f"<td>{'yes' if c['verified'] else '<span class=bad>no</span>'}</td><td>{_fmt(c.get('max_abs_scores'), '.3f')}</td>"
        f"<td>{_fmt(c.get('box_agreement'), '.0%')}</td><td>{_fmt(c.get('map50_95_drop_points'), '.2f')}</td>"
        f"<td>{_fmt(c.get('latency_ms_b1'), '.2f')}</td><td>{_fmt(c.get('speedup_vs_fp32'), '.2f')}</td>"
        f"<td>{e(c.get('problem') or '')}</td></tr>" for c in q["candidates"])
    return (f"<h2>INT8 recipes tried on this machine</h2><p>{e(str(q.get('why', '')))}.</p>"
            "<table><tr><th>recipe</th><th>verified</th><th>max |Δ| scores</th><th>box agreement</th><th>drop (points)</th>"
            f"<th>latency b1 (ms)</th><th>vs onnx-fp32</th><th>problem</th></tr>{rows}</table>"
            f"<p class=muted>CPU: {e(str(q.get('cpu', '?')))}, flags {e(' '.join(q.get('cpu_flags') or []))}. "
            "Each recipe is quantized, verified (golden parity, box agreement, mAP budget), and the verified ones are timed "
            "interleaved with onnx-fp32; the fastest is kept.</p>")
