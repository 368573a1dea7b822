"""Controlled-dataset comparison: mAP overall, per class and per object size for every variant of a bundle, against its source.

One mAP figure hides where a variant loses: an INT8 variant can keep the overall mAP within its budget while one class
(the one the calibration images held few of) or the small objects lose ten points. This module scores every variant
of a bundle on a labelled split by the COCO protocol (faster-coco-eval, the protocol of `cvdeploy.evaluate.coco`) and
breaks the figure down:

    report = controlled_report("model.cvd", "data.yaml")           # the bundle's onnx-fp32 is the source
    report = controlled_report("model.cvd", "data.yaml", source_pt="model.pt")   # the .pt itself, through Ultralytics
    print(report.table()); report.findings; report.to_dict()

Slices: all labels; each class; each size bucket. The buckets are COCO's (box area in the original image's pixels:
small < 32², medium < 96², large); `area_ranges=` sets others (see docs/controlled-dataset.md). A variant is serious
when it loses more than `max_map_drop` mAP50-95 points overall (the build's budget), or when a class or a bucket with
at least MIN_SLICE_LABELS labels loses more than `max_slice_drop` points: the case a single mAP hides.

The figures are `controlled_scores`, the verdicts and the report `controlled_findings`; both are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.bundle.bundle import Bundle
from cvdeploy.diagnose.controlled_findings import MIN_SLICE_LABELS, ControlledFinding, ControlledReport, findings_of
from cvdeploy.diagnose.controlled_scores import (
    COCO_AREAS,
    Breakdown,
    Prediction,
    Score,
    VariantComparison,
    check_buckets,
    coco_breakdown,
    compare_breakdowns,
)
from cvdeploy.diagnose.controlled_scores import NEGLIGIBLE as NEGLIGIBLE
from cvdeploy.diagnose.controlled_scores import WORST_NAMED as WORST_NAMED
from cvdeploy.diagnose.finding import SEVERITY_ORDER
from cvdeploy.diagnose.finding import Severity as Severity
from cvdeploy.errors import InputError, MissingDependencyError
from cvdeploy.evaluate.coco import LabelledImage, load_yolo_split

__all__ = [
    "COCO_AREAS",
    "DEFAULT_MAX_MAP_DROP",
    "DEFAULT_MAX_SLICE_DROP",
    "MIN_SLICE_LABELS",
    "Breakdown",
    "ControlledFinding",
    "ControlledReport",
    "Score",
    "VariantComparison",
    "coco_breakdown",
    "compare_breakdowns",
    "controlled_report",
    "findings_of",
]

DEFAULT_MAX_MAP_DROP = 1.0  # mAP50-95 points: the build's default budget (`cvdeploy build --max-map-drop`)
DEFAULT_MAX_SLICE_DROP = 3.0  # mAP50-95 points a class or size bucket may lose, whatever the overall figure says

# Validation thresholds, as `evaluate_detect` and Ultralytics' `val`: the mAP counts low-confidence detections too.
_VAL_CONF, _VAL_IOU, _VAL_MAX_DET = 0.001, 0.7, 300


# -- predictions -------------------------------------------------------------------------------------


def _predictor_predictions(predictor: Any, gt: Sequence[LabelledImage], progress: Callable[[int], None] | None) -> list[Prediction]:
    """The Predictor over the split, one image at a time at validation thresholds: evaluate_detect's own loop."""
    out = []
    for g in gt:
        d = predictor.predict(g.path, conf=_VAL_CONF, iou=_VAL_IOU, max_det=_VAL_MAX_DET).detections
        out.append((d.xyxy, d.confidence, d.class_id))
        if progress:
            progress(1)
    return out


def _ultralytics_predictions(pt: Path, gt: Sequence[LabelledImage], imgsz: int,
                             progress: Callable[[int], None] | None) -> list[Prediction]:
    """The .pt through Ultralytics' own predictor (its letterbox, its NMS), at the same validation thresholds."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        from ultralytics import YOLO
    except ImportError as e:
        raise MissingDependencyError("ultralytics", "build", "scoring the source .pt") from e
    if not pt.is_file():
        raise InputError(f"source model not found: {pt}")
    try:
        model = YOLO(str(pt))
    except Exception as e:  # Ultralytics raises bare exceptions for foreign files
        raise InputError(f"{pt} is not an Ultralytics model ({type(e).__name__}: {e})") from e
    out = []
    for g in gt:
        boxes = model.predict(str(g.path), imgsz=imgsz, conf=_VAL_CONF, iou=_VAL_IOU, max_det=_VAL_MAX_DET, device="cpu",
                              verbose=False)[0].boxes
        out.append((boxes.xyxy.numpy().astype(np.float64), boxes.conf.numpy().astype(np.float64),
                    boxes.cls.numpy().astype(np.int64)))
        if progress:
            progress(1)
    return out


def _not_here(bundle: Bundle, name: str) -> str | None:
    """Why variant `name` cannot be scored faithfully on this machine, or None."""
    from cvdeploy.bundle.environment import BF16_FLAGS, cpu_info

    v = bundle.manifest.variants[name]
    if v.engine == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "OpenVINO is not installed here (pip install 'cvdeploy[openvino]')"
    if v.precision == "bf16" and not set(cpu_info().get("flags", [])) & BF16_FLAGS:  # type: ignore[arg-type]
        return "this CPU has no native bfloat16: the engine would emulate it or fall back to f32, not score the variant"
    return None


def controlled_report(
    bundle: str | os.PathLike[str] | Bundle,
    data: str | os.PathLike[str],
    *,
    split: str = "val",
    variants: Sequence[str] | None = None,
    source_pt: str | os.PathLike[str] | None = None,
    max_map_drop: float = DEFAULT_MAX_MAP_DROP,
    max_slice_drop: float = DEFAULT_MAX_SLICE_DROP,
    area_ranges: Mapping[str, tuple[float, float]] = COCO_AREAS,
    model_key: bytes | None = None,
    on_step: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ControlledReport:
    """Score every variant of `bundle` (or those named) on the `split` of the data.yaml `data`, against the source.

    The source is the bundle's onnx-fp32 (equal to the .pt within the build's parity tolerance), or `source_pt` scored
    through Ultralytics (needs the build extra; onnx-fp32 is then compared like any variant). Budgets are in mAP50-95
    points. A variant that cannot run faithfully here (OpenVINO not installed, bf16 without native support) is listed
    in `skipped` with the reason. `on_step(name)` announces each model scored, `progress(1)` follows each image.
    """
    from cvdeploy.predict import Predictor

    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    m = b.manifest
    if m.task != "detect":
        raise InputError(f"the controlled comparison scores detect models; {b.name!r} is a {m.task} model")
    if max_map_drop < 0 or max_slice_drop < 0:
        raise InputError(f"budgets must be >= 0 points, got max_map_drop={max_map_drop}, max_slice_drop={max_slice_drop}")
    check_buckets(area_ranges)  # before the first variant is scored, not after
    wanted = list(dict.fromkeys(variants if variants is not None else m.variants))
    unknown = [n for n in wanted if n not in m.variants]
    if unknown:
        raise InputError(f"bundle {b.name!r} has no variant {', '.join(unknown)}; it has {', '.join(m.variants)}")
    if source_pt is None and "onnx-fp32" not in m.variants:
        raise InputError(f"bundle {b.name!r} has no onnx-fp32 variant to serve as the source: give the source .pt")
    gt, data_names = load_yolo_split(data, split)
    nc = len(m.names)
    if not any(len(g.class_id) for g in gt):
        raise InputError(f"{data}: the {split} split holds no labels; the controlled comparison needs labelled images")
    stray = sorted({int(c) for g in gt for c in g.class_id if not 0 <= int(c) < nc})
    if stray:
        raise InputError(f"{data}: labels of class id(s) {', '.join(map(str, stray))}, but {b.name!r} knows {nc} classes")
    mismatched = [f"{k}: {v!r} vs {m.names[k]!r}" for k, v in data_names.items() if k in m.names and v != m.names[k]]
    if mismatched:
        raise InputError(f"{data} names its classes otherwise than the bundle ({'; '.join(mismatched[:3])}): "
                         "the labels would be scored against the wrong classes")
    step = on_step or (lambda _n: None)

    def score_variant(name: str) -> Breakdown:
        step(name)
        with Predictor(b, name, model_key=model_key) as p:
            return coco_breakdown(gt, _predictor_predictions(p, gt, progress), nc, area_ranges)

    skipped: dict[str, str] = {}
    if source_pt is not None:
        pt = Path(source_pt)
        source_name = f"torch ({pt.name})"
        step(source_name)
        source = coco_breakdown(gt, _ultralytics_predictions(pt, gt, m.preprocess.imgsz[0], progress), nc, area_ranges)
    else:
        source_name = "onnx-fp32"
        source = score_variant("onnx-fp32")
    comparisons = []
    for name in wanted:
        if name == source_name:
            continue
        if (why := _not_here(b, name)) is not None:
            skipped[name] = why
            continue
        try:
            scores = score_variant(name)
        except MissingDependencyError as e:
            skipped[name] = str(e)
            continue
        comparisons.append(compare_breakdowns(name, m.variants[name].precision, scores, source))
    findings = [f for v in comparisons for f in findings_of(v, source, m.names, source_name=source_name,
                                                            max_map_drop=max_map_drop, max_slice_drop=max_slice_drop)]
    findings += [ControlledFinding("info", n, f"{n} not scored on the controlled set: {why}") for n, why in skipped.items()]
    findings.sort(key=lambda f: SEVERITY_ORDER[f.severity])
    return ControlledReport(b.name, str(data), split, source_name, dict(m.names),
                            {k: (float(lo), float(hi)) for k, (lo, hi) in area_ranges.items()},
                            max_map_drop, max_slice_drop, source, comparisons, skipped, findings)
