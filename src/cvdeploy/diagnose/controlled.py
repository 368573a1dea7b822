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
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from cvdeploy.bundle.bundle import Bundle
from cvdeploy.errors import InputError, MissingDependencyError
from cvdeploy.evaluate.coco import LabelledImage, coco_dataset, coco_eval, load_yolo_split

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

# COCO's object sizes, in original-image pixels² of the labelled box; the upper bound of "large" is COCO's own 1e5².
COCO_AREAS: dict[str, tuple[float, float]] = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e10)}
DEFAULT_MAX_MAP_DROP = 1.0  # mAP50-95 points: the build's default budget (`cvdeploy build --max-map-drop`)
DEFAULT_MAX_SLICE_DROP = 3.0  # mAP50-95 points a class or size bucket may lose, whatever the overall figure says
MIN_SLICE_LABELS = 10  # a slice with fewer labels is too noisy for a serious verdict: its loss is a warning
WORST_NAMED = 3  # classes and buckets named per variant
NEGLIGIBLE = 0.05  # mAP points: a smaller loss is rounding (a box's score in the 6th digit), not a worst slice

# Validation thresholds, as `evaluate_detect` and Ultralytics' `val`: the mAP counts low-confidence detections too.
_VAL_CONF, _VAL_IOU, _VAL_MAX_DET = 0.001, 0.7, 300

Severity = Literal["serious", "warning", "info", "ok"]
_RANK = {"serious": 0, "warning": 1, "info": 2, "ok": 3}
Prediction = tuple[np.ndarray, np.ndarray, np.ndarray]  # (xyxy (n, 4) pixels, confidence (n,), class_id (n,))
_K = TypeVar("_K")


# -- the figures -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """COCO AP of one slice of the controlled set (all of it, one class, one size bucket).

    None when the slice holds no label: COCO leaves its AP undefined (-1), and it is no part of any mean.
    """

    map50_95: float | None
    map50: float | None
    labels: int

    def to_dict(self) -> dict[str, Any]:
        return {"map50_95": _r(self.map50_95), "map50": _r(self.map50), "labels": self.labels}


@dataclass(frozen=True)
class Breakdown:
    """One model's scores on one labelled split: overall, per class id and per size bucket."""

    overall: Score
    per_class: dict[int, Score]
    per_bucket: dict[str, Score]
    images: int

    def to_dict(self, names: Mapping[int, str]) -> dict[str, Any]:
        return {"images": self.images, "overall": self.overall.to_dict(),
                "per_class": {names.get(k, str(k)): s.to_dict() for k, s in self.per_class.items()},
                "per_bucket": {b: s.to_dict() for b, s in self.per_bucket.items()}}


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def _mean_valid(p: np.ndarray) -> float | None:
    valid = p[p > -1]
    return float(valid.mean()) if valid.size else None


def _check_buckets(area_ranges: Mapping[str, tuple[float, float]]) -> None:
    if not area_ranges:
        raise InputError("area_ranges needs at least one size bucket")
    for name, (lo, hi) in area_ranges.items():
        if not 0 <= lo < hi or name == "all":
            raise InputError(f"size bucket {name!r}: need a name other than 'all' and 0 <= low < high, got ({lo}, {hi})")


def coco_breakdown(gt: Sequence[LabelledImage], preds: Sequence[Prediction], nc: int,
                   area_ranges: Mapping[str, tuple[float, float]] = COCO_AREAS) -> Breakdown:
    """COCO AP (mAP50-95 and mAP50, at most 100 detections per image) overall, per class and per size bucket.

    The overall figures are faster-coco-eval's own summary, the very numbers `evaluate.coco.coco_map` returns for the
    same predictions. Per class, AP is the mean of the accumulated precision over IoU thresholds and recall points for
    that category; COCO's overall AP is the mean of those entries over every category with labels, so it equals the mean
    of the per-class APs of the classes with labels (a class without labels is -1 in COCO, None here). A size bucket
    is evaluated COCO's way: labels and unmatched detections outside its area range are ignored.
    """
    _check_buckets(area_ranges)
    images, anns, dets = coco_dataset(gt, preds)  # as evaluate.coco.coco_map builds them, so that the overall figures agree
    areas = np.array([a["area"] for a in anns], dtype=np.float64)
    classes = np.array([a["category_id"] for a in anns], dtype=np.int64)
    # COCO keeps a label in a bucket when low <= area <= high: count them the same way.
    bucket_labels = {b: int(((areas >= lo) & (areas <= hi)).sum()) for b, (lo, hi) in area_ranges.items()}
    class_labels = {k: int((classes == k).sum()) for k in range(nc)}
    if not dets:  # nothing detected: AP 0 wherever there is something to detect
        def zero(n: int) -> Score:
            return Score(0.0, 0.0, n) if n else Score(None, None, 0)
        return Breakdown(zero(len(anns)), {k: zero(n) for k, n in class_labels.items()},
                         {b: zero(n) for b, n in bucket_labels.items()}, len(gt))
    ev = coco_eval(images, anns, dets, nc, ranges={k: list(v) for k, v in area_ranges.items()},
                   print_function=lambda *_a, **_k: None)
    precision = ev.eval["precision"]  # [IoU thresholds, recall points, categories, area ranges, maxDets]
    labels = ev.params.areaRngLbl  # "all", then the buckets in the order given
    last = len(ev.params.maxDets) - 1  # 100 detections per image: the figure COCO reports

    def score(k: int | slice, a: int, n: int) -> Score:
        p = precision[:, :, k, a, last]
        return Score(_mean_valid(p), _mean_valid(p[0]), n)

    ap, ap50 = (float(x) if x > -1 else None for x in ev.stats[:2])  # -1: a split without labels
    overall = Score(ap, ap50, len(anns))
    per_class = {k: score(k, 0, class_labels[k]) for k in range(nc)}
    per_bucket = {b: score(slice(None), labels.index(b), bucket_labels[b]) for b in area_ranges}
    return Breakdown(overall, per_class, per_bucket, len(gt))


# -- one variant against the source -------------------------------------------------------------------


def _points(variant: float | None, source: float | None) -> float | None:
    """variant - source in mAP points (100 x AP); None where either is undefined."""
    return None if variant is None or source is None else 100.0 * (variant - source)


@dataclass(frozen=True)
class VariantComparison:
    """A variant's breakdown and its mAP50-95 deltas against the source, in points (negative: the variant loses)."""

    name: str
    precision: str
    scores: Breakdown
    delta_overall: float
    delta_map50: float
    delta_class: dict[int, float | None]
    delta_bucket: dict[str, float | None]

    def worst_classes(self, n: int = WORST_NAMED) -> list[int]:
        """Up to `n` class ids that lost mAP50-95 (more than NEGLIGIBLE points), the largest loss first."""
        return _worst(self.delta_class, n)

    def worst_buckets(self, n: int = WORST_NAMED) -> list[str]:
        """Up to `n` size buckets that lost mAP50-95 (more than NEGLIGIBLE points), the largest loss first."""
        return _worst(self.delta_bucket, n)


def _worst(deltas: Mapping[_K, float | None], n: int) -> list[_K]:
    lost = [(d, k) for k, d in deltas.items() if d is not None and d < -NEGLIGIBLE]
    return [k for _, k in sorted(lost, key=lambda dk: dk[0])[:n]]


def compare_breakdowns(name: str, precision: str, variant: Breakdown, source: Breakdown) -> VariantComparison:
    """The deltas of `variant` against `source` (same split, same slices)."""
    return VariantComparison(
        name, precision, variant,
        delta_overall=_points(variant.overall.map50_95, source.overall.map50_95) or 0.0,
        delta_map50=_points(variant.overall.map50, source.overall.map50) or 0.0,
        delta_class={k: _points(s.map50_95, source.per_class[k].map50_95) for k, s in variant.per_class.items()},
        delta_bucket={b: _points(s.map50_95, source.per_bucket[b].map50_95) for b, s in variant.per_bucket.items()},
    )


# -- findings --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlledFinding:
    """One verdict on one variant; maps onto the doctor's `Finding(severity, step, message, fix)`."""

    severity: Severity
    variant: str
    message: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "variant": self.variant, "message": self.message, "fix": self.fix}


def _fix(v: VariantComparison, source: str, what: str) -> str:
    if v.precision == "int8":
        return (f"serve {source} (or a variant that holds) until {v.name} is rebuilt with calibration images that hold "
                f"{what} (`cvdeploy build --data` with a train split representative of it, more --calib-images), or with a "
                "lower --max-map-drop so that the accuracy-aware repair keeps more layers in float")
    if v.precision in ("fp16", "bf16"):
        return (f"serve {source}: {v.name} computes in {v.precision} and loses {what}; check its golden parity here "
                "(cvdeploy verify), or keep an fp32 variant")
    return f"serve {source}; {v.name} does not compute what the source computes on {what}: rebuild it and verify it"


def _slice_findings(v: VariantComparison, kind: str, deltas: Mapping[Any, float | None], scores: Mapping[Any, Score],
                    source: Mapping[Any, Score], label: Callable[[Any], str], max_slice_drop: float, source_name: str,
                    max_map_drop: float) -> list[ControlledFinding]:
    out = []
    over = [k for k in _worst(deltas, len(deltas)) if -(deltas[k] or 0.0) > max_slice_drop]
    for k in over:
        d, n = deltas[k], scores[k].labels
        hidden = (f"while the overall mAP moves only {v.delta_overall:+.1f} points, within its budget of {max_map_drop:g}: "
                  "the overall figure hides it") if -v.delta_overall <= max_map_drop else f"(overall: {v.delta_overall:+.1f} points)"
        text = (f"{v.name} loses {-d:.1f} mAP50-95 points on {kind} {label(k)} ({scores[k].map50_95:.3f} vs "  # type: ignore[operator]
                f"{source[k].map50_95:.3f}, {n} labels) {hidden}")
        if n >= MIN_SLICE_LABELS:
            out.append(ControlledFinding("serious", v.name, text, _fix(v, source_name, f"{kind} {label(k)}")))
        else:
            out.append(ControlledFinding("warning", v.name, f"{text}; only {n} labels (fewer than {MIN_SLICE_LABELS}): "
                                         "may be noise, check it on more images"))
    return out


def findings_of(v: VariantComparison, source: Breakdown, names: Mapping[int, str], *, source_name: str,
                max_map_drop: float, max_slice_drop: float) -> list[ControlledFinding]:
    """Serious: the overall loss is over budget, or a class or bucket (with enough labels) loses over `max_slice_drop`
    points. ok otherwise, with the worst class and bucket named."""
    out: list[ControlledFinding] = []
    s, base = v.scores.overall.map50_95, source.overall.map50_95
    if -v.delta_overall > max_map_drop:
        worst = v.worst_classes(1)
        where = f"; most on class {names.get(worst[0], worst[0])!r}" if worst else ""
        out.append(ControlledFinding("serious", v.name, f"{v.name} loses {-v.delta_overall:.1f} mAP50-95 points overall "
                                     f"({s:.3f} vs {base:.3f} for {source_name}), over its budget of {max_map_drop:g}{where}",
                                     _fix(v, source_name, "the controlled set")))
    out += _slice_findings(v, "class", v.delta_class, v.scores.per_class, source.per_class, lambda k: repr(names.get(k, str(k))),
                           max_slice_drop, source_name, max_map_drop)
    out += _slice_findings(v, "size bucket", v.delta_bucket, v.scores.per_bucket, source.per_bucket, lambda b: repr(b),
                           max_slice_drop, source_name, max_map_drop)
    if not out:
        wc, wb = v.worst_classes(1), v.worst_buckets(1)
        worst = ", ".join([*(f"class {names.get(k, k)!r} {v.delta_class[k]:+.1f}" for k in wc),
                           *(f"size {b} {v.delta_bucket[b]:+.1f}" for b in wb)])
        out.append(ControlledFinding("ok", v.name, f"{v.name} holds on the controlled set: mAP50-95 {s:.3f} vs {base:.3f} "
                                     f"({v.delta_overall:+.1f} points, budget {max_map_drop:g}); no class or size bucket loses "
                                     f"more than {max_slice_drop:g}" + (f" (worst: {worst})" if worst else "")))
    return out


# -- the report ------------------------------------------------------------------------------------


@dataclass
class ControlledReport:
    """Every variant of a bundle scored on a labelled split, overall, per class and per size bucket, against the source."""

    bundle: str
    data: str
    split: str
    source: str  # the variant name, or "torch (NAME.pt)"
    names: dict[int, str]
    area_ranges: dict[str, tuple[float, float]]
    max_map_drop: float
    max_slice_drop: float
    source_scores: Breakdown
    variants: list[VariantComparison]
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why it was not evaluated here
    findings: list[ControlledFinding] = field(default_factory=list)  # serious first

    @property
    def serious(self) -> list[ControlledFinding]:
        return [f for f in self.findings if f.severity == "serious"]

    def variant(self, name: str) -> VariantComparison:
        for v in self.variants:
            if v.name == name:
                return v
        raise InputError(f"variant {name!r} was not evaluated; evaluated: {', '.join(v.name for v in self.variants)}")

    def worst_class(self, variant: str) -> str | None:
        """The name of the class `variant` loses most on (None when it loses on none)."""
        w = self.variant(variant).worst_classes(1)
        return self.names.get(w[0], str(w[0])) if w else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle, "data": self.data, "split": self.split, "source": self.source,
            "images": self.source_scores.images, "labels": self.source_scores.overall.labels,
            "area_ranges": {b: list(r) for b, r in self.area_ranges.items()},
            "max_map_drop_points": self.max_map_drop, "max_slice_drop_points": self.max_slice_drop,
            "min_slice_labels": MIN_SLICE_LABELS,
            "source_scores": self.source_scores.to_dict(self.names),
            "variants": {v.name: {
                "precision": v.precision, **v.scores.to_dict(self.names),
                "delta_points": {"map50_95": _r(v.delta_overall, 3), "map50": _r(v.delta_map50, 3),
                                 "per_class": {self.names.get(k, str(k)): _r(d, 3) for k, d in v.delta_class.items()},
                                 "per_bucket": {b: _r(d, 3) for b, d in v.delta_bucket.items()}},
                "worst_classes": [self.names.get(k, str(k)) for k in v.worst_classes()],
                "worst_buckets": v.worst_buckets(),
            } for v in self.variants},
            "skipped": dict(self.skipped),
            "findings": [f.to_dict() for f in self.findings],
        }  # fmt: skip

    def table(self) -> str:
        """Plain text: one row per slice (all, each class, each bucket), the source's mAP50-95 and each variant's with its
        delta in points; then the worst slices per variant and the findings."""
        src = self.source_scores
        rows: list[tuple[str, Score, Callable[[VariantComparison], tuple[Score, float | None]]]] = [
            ("all", src.overall, lambda v: (v.scores.overall, v.delta_overall))]
        rows += [(f"class {self.names.get(k, str(k))}", s, lambda v, k=k: (v.scores.per_class[k], v.delta_class[k]))
                 for k, s in src.per_class.items()]
        rows += [(f"size {b}", s, lambda v, b=b: (v.scores.per_bucket[b], v.delta_bucket[b])) for b, s in src.per_bucket.items()]

        def cell(s: Score, d: float | None = None, with_delta: bool = False) -> str:
            if s.map50_95 is None:
                return "-"
            return f"{s.map50_95:.3f}" + (f" ({d:+.1f})" if with_delta and d is not None else "")

        header = ["slice", "labels", self.source, *(v.name for v in self.variants)]
        body = [[name, str(s.labels), cell(s), *(cell(*get(v), with_delta=True) for v in self.variants)] for name, s, get in rows]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = [f"controlled set {self.data} ({self.split}: {src.images} images, {src.overall.labels} labels) · "
                 f"mAP50-95 (Δ points vs {self.source}) · sizes: " +
                 ", ".join(f"{b} {_side(lo)}-{_side(hi)} px" for b, (lo, hi) in self.area_ranges.items())]
        for r in [header, *body]:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        for v in self.variants:
            worst = [f"class {self.names.get(k, str(k))} {v.delta_class[k]:+.1f}" for k in v.worst_classes()]
            worst += [f"size {b} {v.delta_bucket[b]:+.1f}" for b in v.worst_buckets()]
            lines.append(f"worst for {v.name}: " + (", ".join(worst) if worst else "no slice loses"))
        lines += [f"not evaluated: {n}: {why}" for n, why in self.skipped.items()]
        lines += [f"{f.severity}: {f.message}" for f in self.findings]
        return "\n".join(lines)


def _side(area: float) -> str:
    """An area as the side of its square, as COCO states its buckets (32², 96²)."""
    return "∞" if area >= 1e9 else f"{math.sqrt(area):.4g}²"


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
    _check_buckets(area_ranges)  # before the first variant is scored, not after
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
    findings.sort(key=lambda f: _RANK[f.severity])
    return ControlledReport(b.name, str(data), split, source_name, dict(m.names),
                            {k: (float(lo), float(hi)) for k, (lo, hi) in area_ranges.items()},
                            max_map_drop, max_slice_drop, source, comparisons, skipped, findings)
