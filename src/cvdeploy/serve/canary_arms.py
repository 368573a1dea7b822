"""The evidence a canary or shadow release is judged on: each side's window of its last requests (failures, model time
per image by batch size, prediction statistics) and the comparisons of two windows (speed at equal batch sizes, the
doctor's tests on the prediction statistics). No event loop, no routing: `serve.canary` runs the releases."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from cvdeploy.serve.monitor import Sample, window_profile

if TYPE_CHECKING:
    from cvdeploy.serve.repository import LoadedModel


class Arm:
    """One side's window: failures, model time per image and prediction statistics of its last requests."""

    def __init__(self, window: int) -> None:
        self.failed: deque[bool] = deque(maxlen=window)
        self.latency: deque[float] = deque(maxlen=window)  # a request's time from its letterbox to its boxes
        self.per_image: deque[tuple[int, float]] = deque(maxlen=window)  # (batch rows, model time per image)
        self.samples: deque[Sample] = deque(maxlen=window)
        self.requests = 0
        self.failures = 0

    def ok(self, latency_s: float, sample: Sample, rows: int = 1, per_image_s: float | None = None) -> None:
        self.requests += 1
        self.failed.append(False)
        self.latency.append(latency_s)
        self.per_image.append((rows, latency_s if per_image_s is None else per_image_s))
        self.samples.append(sample)

    def fail(self) -> None:
        self.requests += 1
        self.failures += 1
        self.failed.append(True)

    @property
    def error_rate(self) -> float:
        return sum(self.failed) / len(self.failed) if self.failed else 0.0

    def copy(self) -> Arm:
        """A snapshot to judge in another thread while the event loop keeps appending to this one."""
        out = Arm(self.failed.maxlen or 1)
        out.failed, out.latency, out.per_image, out.samples = (deque(d, d.maxlen) for d in (self.failed, self.latency,
                                                                                              self.per_image, self.samples))
        out.requests, out.failures = self.requests, self.failures
        return out

    def by_batch(self) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for rows, t in self.per_image:
            out.setdefault(rows, []).append(t)
        return out

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latency) * 1000
        return {"requests": self.requests, "failures": self.failures, "window": len(self.failed),
                "error_rate": round(self.error_rate, 4),
                "latency_p50_ms": round(float(np.median(lat)), 2) if lat.size else None,
                "latency_p95_ms": round(float(np.quantile(lat, 0.95)), 2) if lat.size else None}


def model_info(m: LoadedModel) -> dict[str, Any]:
    """What the doctor's comparison names each side by (its bundle, variant and thresholds)."""
    p = m.predictor
    return {"bundle": p.bundle.name, "variant": p.variant, "conf": p.options.conf, "iou": p.options.iou, "max_det": p.options.max_det}


def speed_ratio(inc: Arm, cand: Arm, min_n: int = 5) -> float | None:
    """The candidate's model time per image over the incumbent's, compared at equal batch sizes (the median ratio over
    the sizes both sides have `min_n` samples of, weighted by those counts); None without such a size.

    Why not the request latency: it depends on the traffic share. A side with more requests forms fuller batches: its
    requests wait longer and run in longer batches, and its time per image is lower. An equal candidate at 30 % of the
    traffic read 2.6 times faster than the incumbent by request latency in the docs' session."""
    a, b = inc.by_batch(), cand.by_batch()
    pairs = [(float(np.median(b[r]) / np.median(a[r])), min(len(a[r]), len(b[r]))) for r in set(a) & set(b)
             if min(len(a[r]), len(b[r])) >= min_n and np.median(a[r]) > 0]
    if not pairs:
        return None
    pairs.sort()
    half, acc = sum(w for _, w in pairs) / 2, 0
    for ratio, w in pairs:
        acc += w
        if acc >= half:
            return ratio
    return pairs[-1][0]


def compare_windows(inc: list[Sample], cand: list[Sample], mi: dict[str, Any], mc: dict[str, Any]) -> list[Any]:
    """The doctor's profile comparison of the two windows' prediction statistics (its findings, not yet tested)."""
    from cvdeploy.diagnose.profile import compare

    return compare(window_profile(inc, mi), window_profile(cand, mc))
