"""Preprocessing audit: re-run a bundle under candidate preprocessing mistakes and name the one that reproduces a field symptom.

A deployment that gets preprocessing wrong (BGR fed to an RGB model, a stretch instead of a letterbox, no /255, ...)
keeps running and keeps answering; only its accuracy drops. Each mistake leaves its own signature on the predictions,
so the audit reproduces every candidate with the bundle's own engine and postprocessing (only preprocessing changes)
and compares:

    audit_with_predictions(predictor, images, field_predictions)   field answers on known images -> which pipeline agrees
    audit_with_labels(predictor, data_yaml, field_map=0.31)        labelled images -> the mAP each mistake gives

See docs/preprocessing-audit.md for the candidates, the scoring and how to read a report.

The audits are here; the images are `preprocess_samples`, the candidates `preprocess_mistakes`, the field's answers and
the agreement `preprocess_field`, the runs `preprocess_run`, the result `preprocess_report` (all re-exported here).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from cvdeploy.diagnose.preprocess_field import IOU_MATCH as IOU_MATCH
from cvdeploy.diagnose.preprocess_field import FieldPrediction, agreement, parse_field_predictions
from cvdeploy.diagnose.preprocess_mistakes import ALIASES, ALL, CORRECT, MISTAKES, Mistake, resolve_mistakes
from cvdeploy.diagnose.preprocess_mistakes import PrepareFn as PrepareFn
from cvdeploy.diagnose.preprocess_report import AuditReport, Finding
from cvdeploy.diagnose.preprocess_run import run_all, run_candidate, runnable_candidates, simulate_deployment
from cvdeploy.diagnose.preprocess_samples import Sample, check_images, load_samples
from cvdeploy.errors import InputError
from cvdeploy.evaluate.coco import LabelledImage, coco_map, load_yolo_split
from cvdeploy.vision.image import ImageSource
from cvdeploy.vision.result import Result

if TYPE_CHECKING:
    from cvdeploy.predict import Predictor

__all__ = [
    "ALIASES",
    "ALL",
    "CORRECT",
    "MISTAKES",
    "AuditReport",
    "FieldPrediction",
    "Finding",
    "Mistake",
    "Sample",
    "audit_with_labels",
    "audit_with_predictions",
    "load_samples",
    "parse_field_predictions",
    "resolve_mistakes",
    "run_candidate",
    "simulate_deployment",
]

CLEAR_MARGIN = 0.02  # a mistake must agree this much better than the correct pipeline (absolute) ...
CLEAR_RATIO = 0.5  # ... and leave at most this share of the correct pipeline's disagreement, to be named
TIE = 0.01  # mistakes this close to the best one are named with it: these images cannot tell them apart
GOOD_AGREEMENT = 0.9  # below this, even the best candidate reproduces the field only in part
MAP_MATCH = 0.02  # labels mode: mAP differences smaller than this are noise on a small set


# -- the audits ------------------------------------------------------------------------------------


def audit_with_predictions(
    predictor: Predictor, images: Sequence[ImageSource], field_predictions: Any, *,
    mistakes: Iterable[str | Mistake] = ALL, conf: float | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> AuditReport:
    """Which preprocessing reproduces `field_predictions`, the answers a deployment gave on `images`?

    The correct pipeline and each candidate mistake are re-run on the same images; each is scored by its agreement
    with the field (see docs/preprocessing-audit.md): box F1 (same class, IoU >= 0.5) x (1 - mean |Δconf|) x mean IoU.
    A mistake is named when it agrees clearly better than the correct pipeline; mistakes these images cannot tell
    apart from it are named with it. `conf` is the threshold the field ran with (default: the bundle's).
    `on_progress(label, done, total)` is called as images are run.
    """
    check_images(images)
    fields = parse_field_predictions(field_predictions, len(images))

    def check(offset: int, window: list[Sample]) -> None:
        for i, s in enumerate(window, offset):
            f = fields[i]
            if f.shape is None:
                continue
            shapes = {tuple(s.image.shape[:2])}
            if s.orientation != 1 and s.data is not None:
                shapes.add(tuple(s.unoriented().shape[:2]))
            if f.shape not in shapes:
                h, w = s.image.shape[:2]
                raise InputError(f"field prediction {i} is for a {f.shape[1]}x{f.shape[0]} image but image {i} is {w}x{h}: "
                                 "are the predictions in the same order as the images?")

    threshold = predictor.options.conf if conf is None else conf
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"conf must be within (0, 1], got {threshold}")
    options = replace(predictor.options, conf=threshold / 2)  # see agreement: near-threshold boxes still match
    candidates, skipped = runnable_candidates(predictor, mistakes)
    base, runs = run_all(predictor, images, candidates, options, skipped, on_progress, check)
    field_dets = [f.detections for f in fields]
    spec = predictor.spec

    def finding(m: Mistake, results: list[Result], changed: int | None) -> Finding:
        ev = agreement(field_dets, [r.detections for r in results], threshold)  # type: ignore[misc]
        if changed is not None:
            ev["images_changed"] = changed
        explanation, fix = m.describe(spec)
        return Finding(m.name, ev["agreement"], ev, explanation, fix)

    baseline = finding(CORRECT, base, None)
    by_name = {m.name: m for m in candidates}
    order = {m.name: i for i, m in enumerate(candidates)}
    findings = sorted((finding(by_name[n], r, c) for n, (r, c) in runs.items()), key=lambda f: (-f.score, order[f.mistake]))
    n_field = sum(len(d) for d in field_dets)
    confs = np.concatenate([d.confidence for d in field_dets]) if n_field else np.zeros(0)
    observed: dict[str, Any] = {
        "field_boxes": n_field, "dets_per_image": round(n_field / len(images), 3),
        "mean_conf": round(float(confs.mean()), 4) if n_field else None,
        "min_conf": round(float(confs.min()), 4) if n_field else None, "conf_threshold": threshold,
    }
    cause, explains, verdict = _name_by_agreement(baseline, findings)
    observed["correct_explains"] = explains
    truncated = any(len(d) >= predictor.options.max_det for d in field_dets)  # max_det, not conf, set the lowest one
    if n_field and not truncated and observed["min_conf"] > threshold + 0.1:
        verdict += (f" Note: the field's lowest confidence is {observed['min_conf']:.2f}, well above the threshold "
                    f"{threshold:g} the audit assumed; pass conf= the field's threshold.")
    return AuditReport("predictions", len(images), baseline, findings, cause, verdict, observed, skipped)


def _name_by_agreement(baseline: Finding, findings: list[Finding]) -> tuple[list[str], bool, str]:
    """(the mistakes named, whether the correct pipeline explains the field, the verdict)."""
    b = baseline.score
    if not findings:
        return [], b >= GOOD_AGREEMENT, f"no candidate mistake could be run on these images; the correct pipeline agrees at {b:.3f}."

    def clear(f: Finding) -> bool:
        return f.score >= b + CLEAR_MARGIN and (1 - f.score) <= CLEAR_RATIO * (1 - b)

    best = findings[0]
    if not clear(best):
        if best.score > b + TIE:
            return [], False, (f"no mistake clearly explains the field predictions: {best.mistake} agrees slightly better "
                               f"({best.score:.3f} against {b:.3f} for the correct pipeline), within what another engine or "
                               "precision can explain; if it is the cause, it changes little on these images.")
        if b >= GOOD_AGREEMENT:
            return [], True, (f"the preprocessing looks right: the bundle's own pipeline reproduces the field predictions "
                              f"(agreement {b:.3f}); no mistake does better (the closest, {best.mistake}, {best.score:.3f}).")
        return [], False, (f"no candidate explains the field predictions: the correct pipeline agrees best but only at "
                           f"{b:.3f}; the difference lies elsewhere (engine, precision, other images, a postprocessing "
                           "change, or mistakes combined).")
    cause = [f.mistake for f in findings if f.score >= best.score - TIE and clear(f)]
    what = cause[0] if len(cause) == 1 else " or ".join(cause)
    verdict = (f"the field predictions are reproduced by {what}: agreement {best.score:.3f} against {b:.3f} for the "
               f"correct pipeline. {best.explanation[0].upper()}{best.explanation[1:]}. Fix: {best.fix}.")
    if len(cause) > 1:
        verdict += " These images cannot tell the named mistakes apart; more (or more varied) images can."
    if best.score < GOOD_AGREEMENT:
        verdict += (f" It explains the field only in part (agreement {best.score:.3f} < {GOOD_AGREEMENT}): another "
                    "difference remains (engine, precision, or a second mistake).")
    return cause, False, verdict


def audit_with_labels(
    predictor: Predictor, data: str | os.PathLike[str] | Sequence[LabelledImage], *,
    mistakes: Iterable[str | Mistake] = ALL, field_map: float | None = None, metric: str = "map50_95",
    split: str = "val", conf: float = 0.001, iou: float = 0.7, max_det: int = 300,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> AuditReport:
    """mAP (COCO protocol) of the correct pipeline and of each candidate mistake on labelled images.

    `data` is a data.yaml (its `split` is used) or labelled images from `load_yolo_split`. With `field_map` (the mAP
    measured on the field deployment, `metric` "map50_95" or "map50"), candidates are ranked by how closely they
    reproduce it and the close ones are named; without it, by how much mAP each one costs this model.
    Thresholds default to validation ones, as `evaluate_detect`.
    """
    if metric not in ("map50_95", "map50"):
        raise InputError(f"metric must be 'map50_95' or 'map50', got {metric!r}")
    if field_map is not None and not 0.0 <= field_map <= 1.0:
        raise InputError(f"field_map must be within 0..1, got {field_map}")
    if isinstance(data, str | os.PathLike):
        gt, _ = load_yolo_split(data, split)
    else:
        gt = list(data)
        if not gt:
            raise InputError("no labelled images to audit")
    paths = [g.path for g in gt]

    def check(offset: int, window: list[Sample]) -> None:
        for g, s in zip(gt[offset:], window, strict=False):
            if (g.height, g.width) != s.image.shape[:2]:
                raise InputError(f"{g.path}: labels are for a {g.width}x{g.height} image, it decodes to "
                                 f"{s.image.shape[1]}x{s.image.shape[0]}")

    options = predictor.detect_options(conf=conf, iou=iou, max_det=max_det)
    candidates, skipped = runnable_candidates(predictor, mistakes)
    base, runs = run_all(predictor, paths, candidates, options, skipped, on_progress, check)
    nc = len(predictor.names)
    spec = predictor.spec
    shown = predictor.options.conf

    def finding(m: Mistake, results: list[Result], changed: int | None) -> Finding:
        dets = [r.detections for r in results]
        metrics = coco_map(gt, [(d.xyxy, d.confidence, d.class_id) for d in dets], nc)  # type: ignore[union-attr]
        kept = [d.confidence[d.confidence >= shown] for d in dets]  # type: ignore[union-attr]
        n = sum(len(k) for k in kept)
        ev: dict[str, Any] = {**metrics.to_dict(), "dets_per_image": round(n / len(dets), 3),
                              "mean_conf": round(float(np.concatenate(kept).mean()), 4) if n else None}
        if changed is not None:
            ev["images_changed"] = changed
        explanation, fix = m.describe(spec)
        return Finding(m.name, float(getattr(metrics, metric)), ev, explanation, fix)

    baseline = finding(CORRECT, base, None)
    baseline.evidence["drop"] = 0.0
    order = {m.name: i for i, m in enumerate(candidates)}
    by_name = {m.name: m for m in candidates}
    findings = [finding(by_name[n], r, c) for n, (r, c) in runs.items()]
    for f in findings:
        f.evidence["drop"] = round(baseline.score - f.score, 4)
    label = "mAP50-95" if metric == "map50_95" else "mAP50"
    observed: dict[str, Any] = {"metric": metric, "field_map": field_map, "correct_map": round(baseline.score, 4),
                                "instances": baseline.evidence.get("instances")}
    if field_map is None:
        findings.sort(key=lambda f: (f.score, order[f.mistake]))
        harmful = [f for f in findings if baseline.score - f.score >= MAP_MATCH]
        worst = ", ".join(f"{f.mistake} (-{baseline.score - f.score:.3f})" for f in harmful[:3])
        verdict = (f"no field mAP given, so nothing is named; the correct pipeline scores {label} {baseline.score:.3f}. "
                   + (f"The mistakes that hurt this model most: {worst}." if harmful else
                      f"No candidate costs this model more than {MAP_MATCH} mAP on these images."))
        better = [f for f in findings if f.score - baseline.score >= MAP_MATCH]
        harmless = [f.mistake for f in findings if abs(baseline.score - f.score) < MAP_MATCH]
        if harmless:
            verdict += f" Harmless here (within {MAP_MATCH} mAP): {', '.join(harmless)}."
        if better:
            verdict += (" Scoring higher than the bundle's own preprocessing: "
                        + ", ".join(f"{f.mistake} (+{f.score - baseline.score:.3f})" for f in better)
                        + " (on these images; worth a look at the bundle's settings).")
        return AuditReport("labels", len(gt), baseline, findings, [], verdict, observed, skipped)
    findings.sort(key=lambda f: (abs(f.score - field_map), order[f.mistake]))
    for f in [baseline, *findings]:
        f.evidence["gap_to_field"] = round(f.score - field_map, 4)
    drop = baseline.score - field_map
    observed["field_drop"] = round(drop, 4)
    if abs(drop) <= MAP_MATCH:
        observed["correct_explains"] = True
        verdict = (f"the preprocessing looks right: the correct pipeline's {label} ({baseline.score:.3f}) matches the "
                   f"field's ({field_map:.3f}); a preprocessing mistake is not needed to explain it.")
        return AuditReport("labels", len(gt), baseline, findings, [], verdict, observed, skipped)
    tol = max(MAP_MATCH, 0.15 * abs(drop))
    cause = [f.mistake for f in findings if abs(f.score - field_map) <= tol]
    if not cause:
        closest = findings[0] if findings else None
        verdict = (f"no single candidate reproduces the field {label} {field_map:.3f} (correct pipeline "
                   f"{baseline.score:.3f}" + (f", closest {closest.mistake} {closest.score:.3f}" if closest else "") +
                   "): look beyond preprocessing (data drift, engine, precision) or at mistakes combined.")
        return AuditReport("labels", len(gt), baseline, findings, [], verdict, observed, skipped)
    best = findings[0]
    verdict = (f"{' or '.join(cause)} reproduce{'s' if len(cause) == 1 else ''} the field {label}: "
               f"{best.mistake} gives {best.score:.3f} against {field_map:.3f} observed and {baseline.score:.3f} for the "
               f"correct pipeline. {best.explanation[0].upper()}{best.explanation[1:]}. Fix: {best.fix}.")
    if len(cause) > 1:
        verdict += " mAP alone cannot tell these apart: confirm with audit_with_predictions on recorded field answers."
    return AuditReport("labels", len(gt), baseline, findings, cause, verdict, observed, skipped)
