"""The controlled comparison's verdicts (`findings_of`: serious when a variant loses more than its budget overall, or on
a class or size bucket with enough labels) and its report (`ControlledReport`: JSON and a plain-text table)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cvdeploy.diagnose.controlled_scores import Breakdown, Score, VariantComparison, round_or_none, worst_keys
from cvdeploy.diagnose.finding import Severity
from cvdeploy.errors import InputError

__all__ = ["MIN_SLICE_LABELS", "ControlledFinding", "ControlledReport", "findings_of"]

MIN_SLICE_LABELS = 10  # a slice with fewer labels is too noisy for a serious verdict: its loss is a warning


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
    over = [k for k in worst_keys(deltas, len(deltas)) if -(deltas[k] or 0.0) > max_slice_drop]
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
                "delta_points": {"map50_95": round_or_none(v.delta_overall, 3), "map50": round_or_none(v.delta_map50, 3),
                                 "per_class": {self.names.get(k, str(k)): round_or_none(d, 3) for k, d in v.delta_class.items()},
                                 "per_bucket": {b: round_or_none(d, 3) for b, d in v.delta_bucket.items()}},
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
