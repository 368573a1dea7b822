"""The scales the doctor's steps rank by (severity, likelihood), and the likelihood-ranked finding of the environment
diff and the speed check: one definition, so that every step orders what it found the same way."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["LIKELIHOOD_ORDER", "SEVERITY_ORDER", "Finding", "Likelihood", "Severity", "rank"]

Severity = Literal["serious", "warning", "info", "ok"]
Likelihood = Literal["high", "medium", "low", "none"]
SEVERITY_ORDER: dict[str, int] = {"serious": 0, "warning": 1, "info": 2, "ok": 3}
LIKELIHOOD_ORDER: dict[str, int] = {"high": 0, "medium": 1, "low": 2, "none": 3}


@dataclass(frozen=True)
class Finding:
    """One doctor finding: how bad (severity), how likely the difference moves results (likelihood), what and why
    (message, one line), what to do (fix) and the figures behind it (evidence)."""

    severity: Severity
    likelihood: Likelihood
    topic: str  # what differs or was checked: "onnxruntime", "opencv-python-headless", "cpu-flags", "parity", ...
    message: str
    fix: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "likelihood": self.likelihood, "topic": self.topic, "message": self.message,
                "fix": self.fix, "evidence": self.evidence}


def rank(findings: Iterable[Finding]) -> list[Finding]:
    """Serious first, then by likelihood; findings of equal rank keep the order they were made in (the served variant's
    first)."""
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], LIKELIHOOD_ORDER[f.likelihood]))
