"""`cvdeploy info`: what a bundle holds, as a table (or its manifest as JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, RenderableType

from cvdeploy.cli.app import app, console


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@app.command()
def info(
    bundle: Path = typer.Argument(..., help="A bundle directory or an Ultralytics .onnx file."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON on stdout (nothing else)."),
) -> None:
    """Show a bundle's task, classes, input, preprocessing, variants and build environment (hashes checked).

    The variants table fits the terminal: when it is narrower than the table, the columns are spread over several tables
    that each repeat the variant name. --json gives every field.
    """
    from cvdeploy.bundle import Bundle

    b = Bundle.load(bundle)
    m = b.manifest
    if as_json:
        print(json.dumps(m.model_dump(mode="json"), indent=2))
        return
    pre = m.preprocess
    console.print(f"[bold]{m.name}[/]  task={m.task}  schema={m.schema_version}  built {m.created_at} with cvdeploy {m.cvdeploy_version}",
                  soft_wrap=True)
    console.print(f"classes ({len(m.names)}): " + ", ".join(f"{i}:{n}" for i, n in m.names.items()), highlight=False, soft_wrap=True)
    console.print(f"input {m.input.name} {m.input.shape} {m.input.dtype}; outputs " + ", ".join(f"{o.name} {o.shape}" for o in m.outputs), highlight=False, soft_wrap=True)
    console.print(f"preprocess: letterbox to {pre.imgsz[0]}x{pre.imgsz[1]} (stride {pre.stride}, pad {pre.pad_value}, "
                  f"rect={pre.rect}), {pre.channel_order}, /{pre.scale:g}; postprocess: conf {m.postprocess.conf}, "
                  f"iou {m.postprocess.iou}, max_det {m.postprocess.max_det}", highlight=False, soft_wrap=True)
    console.print(variants_table(m, console))
    refs = {v.parity.reference for v in m.variants.values() if v.parity}
    if refs:
        console.print(f"parity measured against: {', '.join(sorted(refs))} on the golden inputs", highlight=False, soft_wrap=True)
    for h in m.runtime:
        inter = f", inter {h.inter_op_threads}" if h.execution_mode == "parallel" else ""
        what = (f"OpenVINO {(h.ov_hint or 'LATENCY').lower()}, threads {h.ov_threads or 'auto'}" if h.engine == "openvino"
                else f"intra {h.intra_op_threads or 'auto'}{inter}, {h.execution_mode}, opt {h.graph_optimization}")
        console.print(f"tuned engine settings for {h.variant}: {what} ({h.tuned_ms:.2f} ms against {h.default_ms:.2f} ms by default at batch "
                      f"{h.batch}, concurrency {h.concurrency}; measured on {h.cpu or '?'} {h.tuned_at})", highlight=False, soft_wrap=True)
    src = m.source
    console.print(f"source: {src.file} ({src.format}, sha256 {src.sha256[:12]}) exported by {src.exporter or '?'}; "
                  f"{len(m.golden)} golden case(s) from {src.golden_images or '-'}", highlight=False, soft_wrap=True)
    env = m.environment
    if env:
        cpu = env.get("cpu", {})
        pk = env.get("packages", {})
        console.print(f"built on: Python {env.get('python')}, {cpu.get('model')} (flags: {' '.join(cpu.get('flags', [])) or '-'}); "
                      + ", ".join(f"{k} {v}" for k, v in pk.items()), highlight=False, soft_wrap=True)


VARIANT_COLUMNS = ("variant", "engine", "size", "mAP50-95", "drop pts", "ms b1", "vs fp32", "max |Δ| scores", "sha256", "default")


def variants_table(m: Any, out: Console | None = None) -> RenderableType:
    """One row per variant: engine (and the precision it ran at when verified), size, accuracy on the controlled set,
    latency, parity with the source; split to fit `out`'s width (default: stdout's)."""
    from cvdeploy.cli.output import fit_table
    from cvdeploy.report.html import ran_at

    rows = []
    for name, v in m.variants.items():
        parity = "-"
        if v.parity:
            worst = v.parity.worst
            parity = f"{worst:.1e} {'ok' if v.parity.passed else 'FAIL'}"
        mt = v.metrics

        def fmt(key: str, spec: str, mt: dict = mt) -> str:
            return format(mt[key], spec) if key in mt else "-"

        rows.append((name, v.engine if ran_at(v) == "-" else f"{v.engine} ({ran_at(v)})", _size(v.size_bytes),
                     fmt("map50_95", ".4f"), fmt("map50_95_drop_points", ".2f"), fmt("latency_ms_b1", ".2f"),
                     fmt("speedup_vs_fp32", ".2f") + ("x" if "speedup_vs_fp32" in mt else ""),
                     parity, v.sha256[:12], "*" if name == m.default_variant else ""))
    columns = [(c, "left" if c in ("variant", "engine", "sha256") else "right") for c in VARIANT_COLUMNS]
    return fit_table(out or console, columns, rows, title="variants")
