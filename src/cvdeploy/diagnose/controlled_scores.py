"""The controlled comparison's figures: COCO AP overall, per class and per size bucket of one model (`Breakdown`), and
a variant's deltas against the source (`VariantComparison`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from cvdeploy.errors import InputError
from cvdeploy.evaluate.coco import LabelledImage, coco_dataset, coco_eval

__all__ = [
    "COCO_AREAS",
    "NEGLIGIBLE",
    "WORST_NAMED",
    "Breakdown",
    "Prediction",
    "Score",
    "VariantComparison",
    "check_buckets",
    "coco_breakdown",
    "compare_breakdowns",
    "round_or_none",
    "worst_keys",
]

# COCO's object sizes, in original-image pixels² of the labelled box; the upper bound of "large" is COCO's own 1e5².
COCO_AREAS: dict[str, tuple[float, float]] = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e10)}
WORST_NAMED = 3  # classes and buckets named per variant
NEGLIGIBLE = 0.05  # mAP points: a smaller loss is rounding (a box's score in the 6th digit), not a worst slice
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
        return {"map50_95": round_or_none(self.map50_95), "map50": round_or_none(self.map50), "labels": self.labels}


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


def round_or_none(x: float | None, nd: int = 4) -> float | None:
    """`round`, letting None (an undefined AP) through."""
    return None if x is None else round(x, nd)


def _mean_valid(p: np.ndarray) -> float | None:
    valid = p[p > -1]
    return float(valid.mean()) if valid.size else None


def check_buckets(area_ranges: Mapping[str, tuple[float, float]]) -> None:
    """InputError unless every size bucket is named (not "all") and spans 0 <= low < high."""
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
    check_buckets(area_ranges)
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
        return worst_keys(self.delta_class, n)

    def worst_buckets(self, n: int = WORST_NAMED) -> list[str]:
        """Up to `n` size buckets that lost mAP50-95 (more than NEGLIGIBLE points), the largest loss first."""
        return worst_keys(self.delta_bucket, n)


def worst_keys(deltas: Mapping[_K, float | None], n: int) -> list[_K]:
    """Up to `n` keys whose delta is a loss of more than NEGLIGIBLE points, the largest loss first."""
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
