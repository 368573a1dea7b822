"""`cvdeploy doctor`: why is the deployed model less accurate? The environment, the data and the preprocessing, checked.

What it runs (each step when its inputs are given): the bundle on this machine (hashes, golden parity, what differs
from the build machine); data drift of the field images against a baseline (`cvdeploy.diagnose.profile`); the
preprocessing audit against the field's own answers, or against labels (`cvdeploy.diagnose.preprocess_audit`).
Findings are ranked, serious first; the exit status is 1 when anything serious was found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from cvdeploy.cli.app import app, err_console, fail

SEVERITY_ORDER = {"serious": 0, "warning": 1, "info": 2, "ok": 3}


@dataclass
class Finding:
    severity: str  # serious, warning, info, ok
    step: str  # environment, io-log, data, preprocessing
    message: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "step": self.step, "message": self.message, "fix": self.fix}


def _environment(bundle: Path) -> list[Finding]:
    from cvdeploy.evaluate.verify import verify_bundle

    out = []
    for c in verify_bundle(bundle):
        for p in c.problems:
            out.append(Finding("serious", "environment", f"{c.name}: {p}",
                               "rebuild the variant on this machine, or serve one that verifies here (cvdeploy verify)"))
        for d in c.differences:
            out.append(Finding("warning" if not c.ok else "info", "environment", f"{c.name}: {d}"))
    if not out:
        out.append(Finding("ok", "environment", "every variant verifies on this machine (hashes and golden parity)"))
    return out


def _images(folder: Path) -> list[Path]:
    from cvdeploy.cli.predict import collect_images

    return collect_images([folder])


def _data(predictor: Any, field: list[Path], baseline: Path | None, data: Path | None) -> list[Finding]:
    from cvdeploy.diagnose.profile import DataProfile, compare, profile_images

    if baseline is not None and baseline.suffix.lower() == ".json":
        base = DataProfile.load(baseline)
    elif baseline is not None:
        base = profile_images(_images(baseline), predictor)
    elif data is not None:
        from cvdeploy.evaluate.coco import load_yolo_split

        images, _ = load_yolo_split(data, "val")
        base = profile_images([im.path for im in images], predictor)
    else:
        return [Finding("info", "data", "no baseline: give --baseline (reference images or a saved profile) or --data to "
                                         "compare the field images with")]
    drifts = compare(base, profile_images(field, predictor))
    out = [Finding(d.severity, "data", d.message) for d in drifts if d.severity != "ok"]
    return out or [Finding("ok", "data", f"no statistic of the {len(field)} field images drifted from the baseline")]


def _io_log(root: Path) -> tuple[list[Finding], list[Path], list[Any]]:
    """An I/O log read back: its anomalies as findings, and its full images with the answers they got."""
    from collections import Counter

    from cvdeploy.diagnose.iolog import read_iolog

    records = list(read_iolog(root))
    kinds = Counter(a.split(":")[0] for r in records for a in r.get("anomalies", []))
    out = [Finding("serious" if k.startswith(("NaN", "input")) else "warning", "io-log",
                   f"{n} of {len(records)} recorded request(s): {k}") for k, n in kinds.most_common()]
    full = [r for r in records if str(r.get("path", "")).endswith(".bin")]
    if not full:
        out.append(Finding("info", "io-log", f"{len(records)} record(s) without the images themselves (thumbnails or hashes): "
                                             "drift and the preprocessing audit need `serve --log-io-store image`"))
    return out, [Path(r["path"]) for r in full], [r["result"] for r in full]


def _preprocessing(predictor: Any, field: list[Path], answers: Any, data: Path | None) -> list[Finding]:
    from cvdeploy.diagnose.preprocess_audit import audit_with_labels, audit_with_predictions

    out = []
    if answers is not None:
        report = audit_with_predictions(predictor, field, answers)
        if report.cause:
            f = report.finding(report.cause[0])
            out.append(Finding("serious", "preprocessing", f"{', '.join(report.cause)} reproduces the field's answers: {report.verdict}",
                               f.fix))
        else:
            out.append(Finding("ok" if report.looks_right else "warning", "preprocessing", report.verdict))
    if data is not None:
        report = audit_with_labels(predictor, data)
        worst = report.findings[0] if report.findings else None
        if worst is not None:
            out.append(Finding("info", "preprocessing", f"with labels: {report.verdict}"))
    return out


@app.command()
def doctor(
    bundle: Path = typer.Argument(..., help="The bundle that is deployed."),
    field: Path | None = typer.Option(None, help="A directory of images the deployment saw (its inputs)."),
    baseline: Path | None = typer.Option(None, help="What the model was validated on: a directory of images, or a profile "
                                         "saved as .json (default: the val split of --data)."),
    predictions: Path | None = typer.Option(None, help="JSON list: the deployment's answers for --field's images (sorted by "
                                            "path), one per image, as the image API returns them."),
    data: Path | None = typer.Option(None, help="data.yaml of a labelled controlled set: the baseline for drift and the mAP "
                                     "each preprocessing mistake would cost."),
    io_log: Path | None = typer.Option(None, "--io-log", help="An I/O log directory (`serve --log-io`): its anomalies, and its "
                                       "recorded images and answers as the field (instead of --field and --predictions)."),
    as_json: Path | None = typer.Option(None, "--json", help="Also write the findings as JSON to this file (- for stdout)."),
) -> None:
    """Find why a deployed model is less accurate: environment, data drift and preprocessing, ranked."""
    from cvdeploy.cli.output import result_console, write_json
    from cvdeploy.predict import Predictor

    for flag, path in (("--field", field), ("--baseline", baseline), ("--predictions", predictions), ("--data", data),
                       ("--io-log", io_log)):
        if path is not None and not path.exists():
            raise fail(f"{flag}: {path} not found")
    if predictions is not None and field is None:
        raise fail("--predictions needs --field (the images those answers are for)")
    if io_log is not None and (field is not None or predictions is not None):
        raise fail("--io-log gives the field images and answers: leave out --field and --predictions")
    answers: Any = None
    if predictions is not None:
        import json

        try:
            answers = json.loads(predictions.read_text())
        except (OSError, ValueError) as e:
            raise fail(f"--predictions: {predictions} is not a JSON file of answers ({e})") from None
    out = result_console(as_json)
    findings: list[Finding] = []
    with err_console.status("doctor: the bundle on this machine"):
        findings += _environment(bundle)
    predictor = Predictor(bundle)
    field_images = _images(field) if field is not None else []
    if io_log is not None:
        logged, field_images, logged_answers = _io_log(io_log)
        findings += logged
        answers = logged_answers or None
    if field_images:
        with err_console.status(f"doctor: profiling {len(field_images)} field image(s) against the baseline"):
            findings += _data(predictor, field_images, baseline, data)
    if answers is not None or data is not None:
        with err_console.status("doctor: re-running the model with candidate preprocessing mistakes"):
            findings += _preprocessing(predictor, field_images, answers, data)
    findings.sort(key=lambda f: SEVERITY_ORDER[f.severity])
    for f in findings:
        colour = {"serious": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}[f.severity]
        out.print(f"[{colour}]{f.severity:<8}[/] {f.step:<14} {f.message}" + (f"\n{'':<24}fix: {f.fix}" if f.fix else ""),
                  highlight=False, soft_wrap=True)
    serious = [f for f in findings if f.severity == "serious"]
    out.print(f"{len(serious)} serious finding(s), {sum(f.severity == 'warning' for f in findings)} warning(s)", highlight=False)
    if as_json is not None:
        write_json(as_json, {"bundle": str(bundle), "findings": [f.to_dict() for f in findings], "serious": len(serious)})
    if serious:
        raise typer.Exit(1)
