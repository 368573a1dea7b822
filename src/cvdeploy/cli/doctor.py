"""`cvdeploy doctor`: why is the deployed model less accurate (or slower)? Thin: parse, `cvdeploy.diagnose.doctor`, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from cvdeploy.cli.app import app, err_console, fail

COLOURS = {"serious": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}


@app.command()
def doctor(
    bundle: Path = typer.Argument(..., help="The bundle that is deployed."),
    field: Path | None = typer.Option(None, help="A directory of images the deployment saw (its inputs)."),
    baseline: Path | None = typer.Option(None, help="What the model was validated on: a directory of images, or a profile "
                                         "saved as .json (default: the bundle's profile.json, else the val split of --data)."),
    predictions: Path | None = typer.Option(None, help="JSON list: the deployment's answers for --field's images (sorted by "
                                            "path), one per image, as the image API returns them."),
    data: Path | None = typer.Option(None, help="data.yaml of a labelled controlled set: mAP per class and size for every "
                                     "variant, and the mAP each preprocessing mistake would cost."),
    io_log: Path | None = typer.Option(None, "--io-log", help="An I/O log directory (`serve --log-io`): its anomalies, and its "
                                       "recorded images and answers as the field (instead of --field and --predictions)."),
    reference: Path | None = typer.Option(None, help="A model to compare the bundle's onnx-fp32 with, layer by layer: an "
                                          ".onnx, another bundle, or a .pt (exported now; needs the build extra)."),
    as_json: Path | None = typer.Option(None, "--json", help="Also write the report as JSON to this file (- for stdout)."),
    out: Path | None = typer.Option(None, "--out", help="Also write the report as a self-contained HTML page."),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="Run the slow-inference check (a few seconds of timing)."),
    latency_budget: float | None = typer.Option(None, "--latency-budget", min=0.001, help="The deployment's latency budget "
                                                "(ms per image, end to end): the speed check says whether it holds."),
) -> None:
    """Find why a deployed model is less accurate or slow: environment, layers, data, preprocessing, speed; ranked."""
    from cvdeploy.cli.output import result_console, write_json
    from cvdeploy.diagnose.doctor import diagnose

    for flag, path in (("--field", field), ("--baseline", baseline), ("--predictions", predictions), ("--data", data),
                       ("--io-log", io_log), ("--reference", reference)):
        if path is not None and not path.exists():
            raise fail(f"{flag}: {path} not found")
    if predictions is not None and field is None:
        raise fail("--predictions needs --field (the images those answers are for)")
    if io_log is not None and (field is not None or predictions is not None):
        raise fail("--io-log gives the field images and answers: leave out --field and --predictions")
    answers: Any = None
    if predictions is not None:
        try:
            answers = json.loads(predictions.read_text())
        except (OSError, ValueError) as e:
            raise fail(f"--predictions: {predictions} is not a JSON file of answers ({e})") from None
    console = result_console(as_json)
    with err_console.status("doctor") as status:
        report = diagnose(bundle, field_dir=field, answers=answers, baseline=baseline, data=data, io_log=io_log, reference=reference, speed=speed,
                          latency_budget_ms=latency_budget, progress=lambda what: status.update(f"doctor: {what}"))
    for f in report.findings:
        console.print(f"[{COLOURS[f.severity]}]{f.severity:<8}[/] {f.step:<14} {f.message}"
                      + (f"\n{'':<24}fix: {f.fix}" if f.fix else ""), highlight=False, soft_wrap=True)
    console.print(f"{len(report.serious)} serious finding(s), {len(report.warnings)} warning(s)", highlight=False)
    if as_json is not None:
        write_json(as_json, report.to_dict())
    if out is not None:
        from cvdeploy.report.doctor_html import doctor_report

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(doctor_report(report), encoding="utf-8")
        console.print(f"report: {out}", highlight=False)
    if report.serious:
        raise typer.Exit(1)
