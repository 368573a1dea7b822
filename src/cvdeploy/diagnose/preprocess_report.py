"""The preprocessing audit's result: a `Finding` per pipeline and the `AuditReport` (verdict, JSON, a plain-text table)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cvdeploy.errors import InputError

__all__ = ["AuditReport", "Finding"]

# -- the report ------------------------------------------------------------------------------------


@dataclass
class Finding:
    """One pipeline's result: a candidate mistake, or the correct pipeline (the baseline)."""

    mistake: str
    score: float  # predictions mode: agreement with the field (0..1, 1 = reproduces it); labels mode: mAP
    evidence: dict[str, Any]
    explanation: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return {"mistake": self.mistake, "score": round(self.score, 4), "evidence": self.evidence,
                "explanation": self.explanation, "fix": self.fix}


@dataclass
class AuditReport:
    """What the audit found: the ranked candidates, the one(s) named as the cause (if any) and why."""

    mode: str  # "predictions" or "labels"
    images: int
    baseline: Finding  # the bundle's own preprocessing
    findings: list[Finding]  # the candidate mistakes, best explanation (or most harmful) first
    cause: list[str]  # the mistakes named as the cause; empty: none (see verdict)
    verdict: str
    observed: dict[str, Any] = field(default_factory=dict)  # the field symptom: prediction statistics or mAP
    skipped: dict[str, str] = field(default_factory=dict)  # candidates not run, and why

    @property
    def looks_right(self) -> bool:
        """True when the correct pipeline explains the field best (or, with labels, matches the field mAP)."""
        return not self.cause and self.observed.get("correct_explains", False)

    def finding(self, name: str) -> Finding:
        for f in [self.baseline, *self.findings]:
            if f.mistake == name:
                return f
        raise InputError(f"the report has no finding {name!r}" + (f" ({self.skipped[name]})" if name in self.skipped else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "images": self.images, "verdict": self.verdict, "cause": list(self.cause),
                "looks_right": self.looks_right, "observed": self.observed, "baseline": self.baseline.to_dict(),
                "findings": [f.to_dict() for f in self.findings], "skipped": dict(self.skipped)}

    def to_text(self) -> str:
        """A plain-text table for a terminal or a log."""
        if self.mode == "predictions":
            first = "agreement"
            cols = (("box F1", "box_f1"), ("IoU", "mean_iou"), ("|Δconf|", "mean_abs_dconf"), ("dets/img", "dets_per_image"))
        else:
            first = "mAP50-95" if self.observed.get("metric", "map50_95") == "map50_95" else "mAP50"
            other = ("mAP50", "map50") if first == "mAP50-95" else ("mAP50-95", "map50_95")
            cols = (other, ("drop", "drop"), ("dets/img", "dets_per_image"))
        o = self.observed
        if self.mode == "predictions":
            seen = (f"field: {self.images} images, {o.get('field_boxes')} boxes ({o.get('dets_per_image')} per image), "
                    f"mean confidence {_fmt(o.get('mean_conf'))}, threshold {o.get('conf_threshold')}")
        else:
            fm = o.get("field_map")
            seen = f"field {first}: {'not given' if fm is None else f'{fm:.4f}'} ({self.images} labelled images, {o.get('instances')} objects)"
        lines = [self.verdict, "", seen, f"  {'pipeline':<22} {first:>9} " + " ".join(f"{h:>8}" for h, _ in cols)]
        for f in [self.baseline, *self.findings]:
            mark = "*" if f.mistake in self.cause else " "
            lines.append(f"{mark} {f.mistake:<22} {f.score:>9.4f} " + " ".join(f"{_fmt(f.evidence.get(k)):>8}" for _, k in cols))
        for name, why in self.skipped.items():
            lines.append(f"  {name:<22} skipped: {why}")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)
