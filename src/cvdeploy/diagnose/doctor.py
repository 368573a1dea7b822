"""The doctor: why is a deployed model less accurate, or slower, than it was validated to be? Every step, ranked.

`diagnose(bundle, ...)` runs each step whose inputs are given and returns a `DoctorReport`: findings ranked by
severity (serious, warning, info, ok) and, within a severity, by how directly the step names a cause (a diverging
layer or a preprocessing mistake that reproduces the field's answers before a drifted statistic, before an environment
difference). `cvdeploy doctor` prints it, writes it as JSON and as a self-contained HTML page (`report.doctor_html`).

Steps (the seed guide's troubleshooting sections, in its order):
  environment    the bundle on this machine (hashes, golden parity) and what differs from the build machine
  integrity      for a variant that fails golden parity here, or against a --reference model: the first diverging layer
  io-log         anomalies recorded by `serve --log-io`, whose images and answers then stand for the field
  data           drift of the field images (and of the model's predictions on them) from the bundle's baseline profile
  preprocessing  which preprocessing mistake reproduces the field's answers; with labels, what each mistake would cost
  controlled     mAP per class and per size bucket of every variant against the source, on a labelled controlled set
  speed          warm-up, stage shares, threads, variant and input size: where the time goes
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvdeploy.diagnose.finding import SEVERITY_ORDER, Severity
from cvdeploy.errors import InputError

# Within one severity: a step that names a cause outranks one that shows a symptom.
STEP_ORDER: dict[str, int] = {"integrity": 0, "preprocessing": 1, "data": 2, "environment": 3, "controlled": 4, "io-log": 5,
                              "speed": 6}
STEPS: tuple[str, ...] = tuple(STEP_ORDER)


@dataclass
class Finding:
    """One thing the doctor found: how bad, in which step, what, how to fix it, and the figures behind it."""

    severity: Severity
    step: str
    message: str
    fix: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "step": self.step, "message": self.message, "fix": self.fix}
        if self.evidence:
            out["evidence"] = self.evidence
        return out


@dataclass
class DoctorReport:
    """Ranked findings, and each step's full figures (for the HTML report and --json)."""

    bundle: str
    findings: list[Finding]
    sections: dict[str, Any] = field(default_factory=dict)
    steps_run: list[str] = field(default_factory=list)

    @property
    def serious(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "serious"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def top(self) -> Finding | None:
        return self.findings[0] if self.findings else None

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "steps": self.steps_run, "serious": len(self.serious), "warnings": len(self.warnings),
                "findings": [f.to_dict() for f in self.findings], "sections": self.sections}


def rank(findings: Sequence[Finding]) -> list[Finding]:
    """Serious first; within a severity, the steps that name causes first; otherwise the order each step gave."""
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], STEP_ORDER.get(f.step, len(STEP_ORDER))))


Progress = Callable[[str], Any]


def _quiet(_: str) -> None:
    return None


def _images(folder: Path) -> list[Path]:
    from cvdeploy.vision.image import collect_images

    return collect_images([folder])


# -- steps ------------------------------------------------------------------------------------------


def environment_step(bundle: Path) -> tuple[list[Finding], dict[str, Any]]:
    """`verify` on this machine (hashes, golden parity of every variant) and every recorded build-vs-here difference
    (package versions, engine, provider, precision, CPU flags, threads), ranked by how likely it is to matter."""
    from cvdeploy.diagnose.environment import diagnose_environment

    # No --data here: verify's mAP check compares with the figure recorded on the build's own controlled set; another
    # labelled set is the controlled step's, which compares every variant with the source on the same images.
    report = diagnose_environment(bundle)
    out = [Finding(f.severity, "environment", f.message, f.fix, {"likelihood": f.likelihood, "topic": f.topic, **f.evidence})
           for f in report.findings]
    return out, report.to_dict()


def _reference_onnx(reference: Path, workdir: Path) -> Path:
    """--reference as an ONNX file: itself, another bundle's onnx-fp32, or a .pt exported now (needs the build extra)."""
    from cvdeploy.bundle.bundle import Bundle

    if reference.suffix.lower() == ".onnx":
        return reference
    if reference.suffix.lower() == ".pt":
        from cvdeploy.build import build_bundle

        out = workdir / "reference.cvd"
        build_bundle(reference, out, name="reference")
        reference = out
    other = Bundle.load(reference)
    if "onnx-fp32" not in other.manifest.variants:
        raise InputError(f"--reference {reference}: this bundle has no onnx-fp32 variant to compare with")
    return other.variant_path("onnx-fp32")


def integrity_step(bundle: Path, environment: dict[str, Any], reference: Path | None,
                   progress: Progress) -> tuple[list[Finding], dict[str, Any]]:
    """The first diverging layer: for each variant that fails golden parity here (against onnx-fp32), and for the
    bundle's onnx-fp32 against --reference (a re-export to compare with)."""
    import tempfile

    from cvdeploy.diagnose.bisect import bisect_variant
    from cvdeploy.errors import CvdeployError

    out: list[Finding] = []
    items: list[dict[str, Any]] = []

    def run(variant: str, ref: str, shown: str) -> None:
        progress(f"bisecting {variant} against {shown}")
        try:
            d = bisect_variant(bundle, variant, reference=ref)
        except CvdeployError as e:
            out.append(Finding("info", "integrity", f"{variant}: not bisected against {shown} ({e})"))
            return
        severity = d.severity if d.found else "ok"
        out.append(Finding(severity, "integrity", f"{variant} against {shown}: {d.message()}", d.fix if d.found else "",
                           {"variant": variant, "node": d.node.name if d.node else None,
                            "op": d.node.op_type if d.node else None, "keep_float": list(d.keep_float)}))
        items.append({**d.to_dict(profile=True), "candidate": variant, "reference": shown})

    failing = [c["variant"] for c in environment.get("checks", []) if not c.get("ok") and c.get("variant") != "onnx-fp32"]
    for name in failing:
        run(name, "onnx-fp32", "onnx-fp32")
    if reference is not None:
        with tempfile.TemporaryDirectory(prefix="cvdeploy-doctor-") as tmp:
            run("onnx-fp32", str(_reference_onnx(reference, Path(tmp))), str(reference))
    return out, {"divergences": items}


def io_log_step(root: Path) -> tuple[list[Finding], list[Path], list[Any]]:
    """An I/O log read back: its anomalies as findings, and its full images with the answers they got."""
    from cvdeploy.diagnose.iolog import read_iolog

    records = list(read_iolog(root))
    kinds = Counter(a.split(":")[0] for r in records for a in r.get("anomalies", []))
    out = [Finding("serious" if k.startswith(("NaN", "input")) else "warning", "io-log",
                   f"{n} of {len(records)} recorded request(s): {k}", "", {"count": n, "records": len(records)})
           for k, n in kinds.most_common()]
    full = [r for r in records if str(r.get("path", "")).endswith(".bin")]
    if not full:
        out.append(Finding("info", "io-log", f"{len(records)} record(s) without the images themselves (thumbnails or hashes): "
                                             "drift and the preprocessing audit need `serve --log-io-store image`"))
    return out, [Path(r["path"]) for r in full], [r["result"] for r in full]


def baseline_profile(bundle: Path, predictor: Any, baseline: Path | None, data: Path | None) -> tuple[Any, str] | None:
    """What the field is compared with: --baseline (images or a saved profile), the bundle's profile.json, or --data's val."""
    from cvdeploy.diagnose.profile import DataProfile, profile_images

    if baseline is not None and baseline.suffix.lower() == ".json":
        return DataProfile.load(baseline), f"the profile {baseline}"
    if baseline is not None:
        return profile_images(_images(baseline), predictor), f"the images of {baseline}"
    from cvdeploy.diagnose.profile import read_profile

    stored = read_profile(bundle)
    if stored is not None:
        return stored, f"the bundle's profile.json ({stored.images} validation images profiled at build time)"
    if data is not None:
        from cvdeploy.evaluate.coco import load_yolo_split

        images, _ = load_yolo_split(data, "val")
        return profile_images([im.path for im in images], predictor), f"the val split of {data}"
    return None


def data_step(bundle: Path, predictor: Any, field_images: list[Path], baseline: Path | None,
              data: Path | None) -> tuple[list[Finding], dict[str, Any]]:
    from cvdeploy.diagnose.profile import compare, profile_images

    base = baseline_profile(bundle, predictor, baseline, data)
    if base is None:
        return [Finding("info", "data", "no baseline: this bundle has no profile.json; give --baseline (reference images or "
                                        "a saved profile) or --data to compare the field images with")], {}
    profile, what = base
    variant = (profile.model or {}).get("variant")
    if variant and variant != predictor.variant:  # profile the field with the model the baseline's predictions came from
        from cvdeploy.predict import Predictor

        predictor = Predictor(bundle, variant)
    drifts = compare(profile, profile_images(field_images, predictor))
    out = [Finding(d.severity, "data", d.message, "", {"statistic": d.statistic, "test": d.test, "value": d.to_dict()["value"],
                                                        "threshold": d.to_dict()["threshold"]})
           for d in drifts if d.severity != "ok"]
    out = out or [Finding("ok", "data", f"no statistic of the {len(field_images)} field images drifted from {what}")]
    return out, {"baseline": what, "field_images": len(field_images), "drifts": [d.to_dict() for d in drifts]}


def preprocessing_step(predictor: Any, field_images: list[Path], answers: Any,
                       data: Path | None) -> tuple[list[Finding], dict[str, Any]]:
    from cvdeploy.diagnose.preprocess_audit import audit_with_labels, audit_with_predictions

    out, section = [], {}
    if answers is not None:
        report = audit_with_predictions(predictor, field_images, answers)
        section["with_predictions"] = report.to_dict()
        if report.cause:
            f = report.finding(report.cause[0])
            out.append(Finding("serious", "preprocessing", f"{', '.join(report.cause)} reproduces the field's answers: "
                                                           f"{report.verdict}", f.fix, {"cause": list(report.cause)}))
        else:
            out.append(Finding("ok" if report.looks_right else "warning", "preprocessing", report.verdict))
    if data is not None:
        report = audit_with_labels(predictor, data)
        section["with_labels"] = report.to_dict()
        if report.findings:
            out.append(Finding("info", "preprocessing", f"with labels: {report.verdict}"))
    return out, section


def controlled_step(bundle: Path, data: Path, progress: Progress) -> tuple[list[Finding], dict[str, Any]]:
    """mAP overall, per class and per size bucket of every variant against the source, on the labelled set."""
    from cvdeploy.diagnose.controlled import controlled_report

    report = controlled_report(bundle, data, on_step=lambda what: progress(f"controlled set: {what}"))
    out = [Finding(f.severity, "controlled", f.message, f.fix, {"variant": f.variant}) for f in report.findings]
    out += [Finding("info", "controlled", f"{name}: not scored here ({why})") for name, why in report.skipped.items()]
    section = report.to_dict()
    section["table"] = report.table()
    return out, section


def speed_step(bundle: Path, field_images: list[Path], budget_ms: float | None) -> tuple[list[Finding], dict[str, Any]]:
    """Where the time goes (warm-up, stage shares, threads, variant and input size); never worse than a warning."""
    from cvdeploy.diagnose.speed import diagnose_speed

    report = diagnose_speed(bundle, images=field_images[:8] or None, budget_ms=budget_ms)
    out = [Finding(f.severity, "speed", f.message, f.fix, {"likelihood": f.likelihood, "topic": f.topic}) for f in report.findings]
    section = report.to_dict()
    section["stage_ms"] = dict(report.figures.stages_ms)
    return out, section


# -- the whole run ----------------------------------------------------------------------------------


def _exists(flag: str, path: Path | None) -> None:
    if path is not None and not Path(path).exists():
        raise InputError(f"{flag}: {path} not found")


def diagnose(
    bundle: str | os.PathLike[str],
    *,
    field_dir: str | os.PathLike[str] | None = None,
    answers: Any = None,
    baseline: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    io_log: str | os.PathLike[str] | None = None,
    reference: str | os.PathLike[str] | None = None,
    speed: bool = True,
    latency_budget_ms: float | None = None,
    progress: Progress = _quiet,
) -> DoctorReport:
    """Run every step whose inputs are given on `bundle`; see the module docstring for the steps.

    field_dir: images the deployment saw; answers: the deployment's answers for them (one per image, path order, as the
    image API returns them); baseline: what the model was validated on (images or a saved profile; default: the bundle's
    profile.json, else --data's val split); data: a labelled controlled set (data.yaml); io_log: a `serve --log-io` store;
    reference: a model to compare the bundle's onnx-fp32 with layer by layer (.onnx, another bundle, or a .pt exported now);
    speed: run the slow-inference check (a few seconds), against `latency_budget_ms` when given.
    """
    from cvdeploy.predict import Predictor

    bundle = Path(bundle)
    field_path = None if field_dir is None else Path(field_dir)
    baseline_path = None if baseline is None else Path(baseline)
    data_path = None if data is None else Path(data)
    io_path = None if io_log is None else Path(io_log)
    reference_path = None if reference is None else Path(reference)
    for flag, p in (("bundle", bundle), ("field", field_path), ("baseline", baseline_path), ("data", data_path),
                    ("io-log", io_path), ("reference", reference_path)):
        _exists(flag, p)
    if answers is not None and field_path is None:
        raise InputError("answers need the field images they are for")
    if io_path is not None and (field_path is not None or answers is not None):
        raise InputError("an I/O log gives the field images and answers: leave out the field images and answers")

    findings: list[Finding] = []
    sections: dict[str, Any] = {}
    steps: list[str] = []

    progress("the bundle on this machine")
    env, sections["environment"] = environment_step(bundle)
    findings += env
    steps.append("environment")
    env_failed = any(not c.get("ok") and c.get("variant") != "onnx-fp32" for c in sections["environment"].get("checks", []))
    if env_failed or reference_path is not None:
        got, sections["integrity"] = integrity_step(bundle, sections["environment"], reference_path, progress)
        findings += got
        steps.append("integrity")

    field_images = _images(field_path) if field_path is not None else []
    if speed:  # first: before the other steps warm this process's decoders, so that the first call is a first call
        progress("where the time goes")
        got, sections["speed"] = speed_step(bundle, field_images, latency_budget_ms)
        findings += got
        steps.append("speed")
    predictor = Predictor(bundle)
    if io_path is not None:
        progress("reading the I/O log")
        logged, field_images, logged_answers = io_log_step(io_path)
        findings += logged
        answers = logged_answers or None
        steps.append("io-log")
    if field_images:
        progress(f"profiling {len(field_images)} field image(s) against the baseline")
        got, sections["data"] = data_step(bundle, predictor, field_images, baseline_path, data_path)
        findings += got
        steps.append("data")
    if answers is not None or data_path is not None:
        progress("re-running the model with candidate preprocessing mistakes")
        got, sections["preprocessing"] = preprocessing_step(predictor, field_images, answers, data_path)
        findings += got
        steps.append("preprocessing")
    if data_path is not None:
        progress("scoring every variant on the controlled set")
        got, sections["controlled"] = controlled_step(bundle, data_path, progress)
        findings += got
        steps.append("controlled")
    return DoctorReport(str(bundle), rank(findings), sections, steps)
