"""Live drift monitoring: rolling input and prediction statistics per model version, compared with the bundle's baseline.

Each served version whose bundle carries a baseline (`profile.json`, written by `cvdeploy build --data`) keeps a window of
its last `drift_window` requests. Every request gives its cheap statistics (image size and aspect, and the prediction:
boxes, confidences, box sizes, classes); a sampled share (`drift_sample`) also gives its pixel statistics
(`image_statistics`: brightness, contrast, saturation, sharpness, channels; 1-3 ms an image) and its header facts
(format, EXIF rotation, JPEG quality). Pixel statistics are read exactly as the baseline's were (the image at a longer
side of 640), not on a smaller copy: contrast and sharpness depend on the scale they are read at, and a cheaper reading
would drift from the baseline by itself; the cost is bounded by the sample instead. All of it runs on one thread of its
own behind a bounded queue: never on the event loop, never on a request's path; when the queue is full a request is
simply not monitored (counted).

Every `drift_every` requests the window becomes a `DataProfile` and is compared with the baseline by the doctor's own
tests (`cvdeploy.diagnose.profile.compare`: KS, PSI, Wasserstein with sample-size-aware thresholds). Gauges:
`cvdeploy_drift_score{model,version,statistic}` (test statistic over its serious threshold: above 1 is serious) and
`cvdeploy_drift_alert{model,version}` (1 once a statistic has been serious `drift_consecutive` evaluations in a row).
Only requests answered with the bundle's own postprocessing options are counted: a client's `conf=0.5` moves the
prediction statistics without any drift of the data.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cvdeploy.diagnose.profile import CONFIDENCE_BINS, N_QUANTILES, DataProfile, Drift, Sketch, compare, image_statistics

log = logging.getLogger("cvdeploy.serve")

# Statistics a finding may name that are not tests of the data: left out of scores and alerts.
NOT_TESTS = frozenset({"model", "predictions"})
_PERIOD_S = 0.05  # the monitor's thread wakes this often and takes every request queued meanwhile
_BURST_S = 0.05  # CPU seconds the monitor may spend at once beyond its budget (a window's first evaluations)
# The prediction statistics of `compare`: what a canary compares between incumbent and candidate.
PREDICTION_STATISTICS = ("boxes_per_image", "top_confidence", "confidence", "box_size", "class_mix")


def header_facts(data: bytes) -> tuple[str, str, float | None]:
    """(format, EXIF orientation or "none", JPEG quality or None) from an encoded image's header, exactly as the data
    profile reads them (a public wrapper of `cvdeploy.diagnose.profile.header_facts`)."""
    from cvdeploy.diagnose.profile import header_facts as _header_facts

    return _header_facts(data)


@dataclass(slots=True)
class Sample:
    """One request's statistics, as `Profiler` would record them for its image."""

    numeric: dict[str, float] = field(default_factory=dict)  # per image: sizes, pixel statistics, top_confidence
    format: str | None = None
    orientation: str | None = None
    boxes: int | None = None  # None: no prediction recorded
    confidence: np.ndarray | None = None  # per box
    box_size: np.ndarray | None = None
    classes: tuple[str, ...] = ()


def prediction_sample(result: Any, sample: Sample | None = None) -> Sample:
    """The prediction statistics of one `Result` (those `Profiler` keeps), added to `sample` (a new one by default).
    A result without detections (another task) adds nothing."""
    s = sample or Sample()
    dets = result.detections
    if dets is None:
        return s
    h, w = result.orig_shape
    conf = dets.confidence.astype(np.float64)
    s.boxes = len(dets)
    s.numeric["top_confidence"] = float(conf.max()) if len(dets) else 0.0
    s.confidence = conf
    s.box_size = np.sqrt(np.clip(dets.area, 0, None) / (h * w)).astype(np.float64)
    s.classes = tuple(result.names.get(int(c), str(c)) for c in dets.class_id.tolist())
    return s


def image_sample(shape: tuple[int, ...], data: bytes | None, image: np.ndarray | None) -> Sample:
    """The input statistics of one request: sizes from `shape`, header facts from `data`, pixels from `image` when given."""
    h, w = shape[:2]
    s = Sample(numeric={"width": float(w), "height": float(h), "size": float(np.sqrt(w * h)), "aspect": w / h})
    if image is not None:
        s.numeric.update(image_statistics(image))
    if data is not None:
        s.format, s.orientation, quality = header_facts(data)
        if quality is not None:
            s.numeric["jpeg_quality"] = quality
    return s


def window_profile(samples: Iterable[Sample], model: dict[str, Any] | None) -> DataProfile:
    """A `DataProfile` of `samples` (what `Profiler.profile` would make of the same images); with `model` (the bundle,
    variant and options the predictions were made with) it holds prediction statistics too."""
    numeric: dict[str, list[float]] = {}
    per_box: dict[str, list[np.ndarray]] = {"confidence": [], "box_size": []}
    cat: dict[str, Counter[str]] = {"format": Counter(), "exif_orientation": Counter()}
    if model is not None:
        cat |= {"boxes_per_image": Counter(), "class_mix": Counter()}
    n = 0
    for s in samples:
        n += 1
        for k, v in s.numeric.items():
            numeric.setdefault(k, []).append(v)
        if s.format is not None:
            cat["format"][s.format] += 1
            cat["exif_orientation"][s.orientation or "none"] += 1
        if model is not None and s.boxes is not None:
            cat["boxes_per_image"][str(s.boxes)] += 1
            cat["class_mix"].update(s.classes)
            per_box["confidence"].append(s.confidence if s.confidence is not None else np.empty(0))
            per_box["box_size"].append(s.box_size if s.box_size is not None else np.empty(0))
    if model is not None:
        numeric |= {k: np.concatenate(parts) if parts else [] for k, parts in per_box.items()}  # type: ignore[misc]
    sketches = sketches_of(numeric)
    sketches.setdefault("jpeg_quality", Sketch(0))
    hist = None
    if model is not None:
        conf = np.concatenate(per_box["confidence"]) if per_box["confidence"] else np.empty(0)
        hist = np.histogram(np.clip(conf, 0, 1), CONFIDENCE_BINS, (0.0, 1.0))[0].tolist()
    return DataProfile(images=n, numeric=sketches, categorical={k: dict(v) for k, v in cat.items()}, model=model,
                       confidence_histogram=hist, created=datetime.now(UTC).isoformat(timespec="seconds"))


_LEVELS = np.linspace(0.0, 1.0, N_QUANTILES)


def sketches_of(columns: dict[str, Any]) -> dict[str, Sketch]:
    """`Sketch.of` of every column, the columns of one length in one numpy call: the window is summarised every
    `drift_every` requests, and one `Sketch.of` per statistic was most of the monitor's cost. The values are not rounded
    to six digits as a saved profile's are (nothing is saved; the tests read far coarser than that)."""
    out: dict[str, Sketch] = {}
    by_len: dict[int, list[tuple[str, np.ndarray]]] = {}
    for k, v in columns.items():
        a = np.asarray(v, dtype=np.float64)
        if a.size == 0:
            out[k] = Sketch(0)
        elif not np.isfinite(a).all():
            out[k] = Sketch.of(a)  # drops the non-finite values, as the profiler does
        else:
            by_len.setdefault(a.size, []).append((k, a))
    for group in by_len.values():
        m = np.stack([a for _, a in group])
        q = np.quantile(m, _LEVELS, axis=1).T
        means, stds = m.mean(axis=1), m.std(axis=1)
        for i, (k, a) in enumerate(group):
            out[k] = Sketch(int(a.size), float(means[i]), float(stds[i]), tuple(q[i].tolist()))
    return out


def tested(findings: Sequence[Drift], only: Iterable[str] | None = None) -> list[Drift]:
    """The findings that are tests of the data (the settings notes left out), optionally of `only` these statistics."""
    keep = set(only) if only is not None else None
    return [d for d in findings if d.statistic not in NOT_TESTS and d.test != "none" and (keep is None or d.statistic in keep)]


class DriftMonitor:
    """One model version's window, its last comparison with the baseline, and its alert. `add` and `evaluate` run on
    the hub's thread; `report` anywhere (a lock guards the shared state)."""

    def __init__(self, name: str, version: str, baseline: DataProfile | None, settings: Any, metrics: Any, *,
                 model: dict[str, Any] | None = None, off: str | None = None) -> None:
        self.name, self.version, self.baseline, self.model = name, version, baseline, model
        self.settings, self.metrics = settings, metrics
        self.off = off if baseline is None else None  # why monitoring is off for this version
        self.samples: deque[Sample] = deque(maxlen=settings.drift_window)
        self.seen = 0  # samples ever added
        self.evaluations = 0
        self.streak: dict[str, int] = {}
        self.findings: list[Drift] = []
        self.alert_since: int | None = None  # `seen` when the alert was raised
        self.evaluated_at: str | None = None
        self._lock = threading.Lock()
        self._closed = True  # until the version is served (`activate`): a version failing to load touches no series

    def activate(self) -> None:
        with self._lock:
            self._closed = False
        if self.enabled:
            self.metrics.drift_alert.labels(self.name, self.version).set(0)

    @property
    def enabled(self) -> bool:
        return self.baseline is not None

    @property
    def alert(self) -> bool:
        return self.alert_since is not None

    def add(self, sample: Sample) -> None:
        with self._lock:
            self.samples.append(sample)
            self.seen += 1
            due = len(self.samples) >= self.settings.drift_min_requests and self.seen % self.settings.drift_every == 0
        if due:
            self.evaluate()

    def evaluate(self) -> list[Drift]:
        """Compare the window with the baseline now; update the streaks, the alert and the gauges."""
        if self.baseline is None:
            return []
        with self._lock:
            window = list(self.samples)
        profile = window_profile(window, self.model if self.baseline.has_predictions else None)
        findings = compare(self.baseline, profile)
        with self._lock:
            if self._closed:
                return findings
            self.findings, self.evaluations = findings, self.evaluations + 1
            self.evaluated_at = datetime.now(UTC).isoformat(timespec="seconds")
            for d in tested(findings):
                self.streak[d.statistic] = self.streak.get(d.statistic, 0) + 1 if d.severity == "serious" else 0
                self.metrics.drift_score.labels(self.name, self.version, d.statistic).set(round(d.score, 4))
            worst = max(self.streak.values(), default=0)
            was = self.alert
            if worst >= self.settings.drift_consecutive and not was:
                self.alert_since = self.seen
            elif worst == 0 and was:  # cleared only when nothing is serious any more
                self.alert_since = None
            self.metrics.drift_alert.labels(self.name, self.version).set(1 if self.alert else 0)
        if self.alert != was:
            top = next((d for d in findings if d.severity == "serious"), None)
            log.warning("drift alert %s for %s@%s%s", "raised" if self.alert else "cleared", self.name, self.version,
                        f": {top}" if top else "", extra={"model": self.name, "version": self.version})
        return findings

    def report(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {"model": self.name, "version": self.version, "monitoring": self.enabled}
            if not self.enabled:
                return out | {"reason": self.off}
            serious = [s for s, n in self.streak.items() if n >= self.settings.drift_consecutive]
            return out | {
                "alert": self.alert, "alert_since": self.alert_since, "alert_statistics": sorted(serious),
                "window": len(self.samples), "pixel_samples": sum("brightness" in x.numeric for x in self.samples),
                "requests_seen": self.seen,
                "evaluations": self.evaluations, "evaluated_at": self.evaluated_at,
                "baseline_images": self.baseline.images if self.baseline is not None else 0,
                "streaks": {k: v for k, v in self.streak.items() if v},
                "findings": [d.to_dict() for d in self.findings if d.statistic not in NOT_TESTS or d.severity != "ok"],
            }

    def close(self) -> None:
        """The version is gone: its series leave /metrics with it."""
        with self._lock:
            self._closed = True
            statistics = list(self.streak)
        for s in statistics:
            _remove(self.metrics.drift_score, self.name, self.version, s)
        if self.enabled:
            _remove(self.metrics.drift_alert, self.name, self.version)


def _remove(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set
        metric.remove(*labels)


class MonitorHub:
    """The monitors of a server and the one thread that feeds them. `submit` is called on the event loop and costs a
    random draw and a deque append (no lock, no wake-up: the thread wakes every `_PERIOD_S` and takes what came, so a
    busy server does not pay a thread switch per request); the thread does the statistics and the comparisons."""

    def __init__(self, settings: Any, metrics: Any) -> None:
        self.settings, self.metrics = settings, metrics
        self.monitors: dict[tuple[str, str], DriftMonitor] = {}
        self._pending: deque[tuple[Any, ...]] = deque()
        self._busy = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def open(self, name: str, version: str, predictor: Any) -> DriftMonitor:
        """The monitor of a version being loaded (called from the loading thread): on when its bundle has a baseline."""
        from cvdeploy.diagnose.profile import read_profile

        baseline, off = None, None
        if not self.settings.drift_monitor:
            off = "drift monitoring is off on this server (drift_monitor = false)"
        else:
            try:
                baseline = read_profile(predictor.bundle)
            except Exception as e:  # an unreadable baseline turns monitoring off for the version, never its serving
                off = f"the bundle's profile.json cannot be read: {str(e).splitlines()[0][:200]}"
            else:
                if baseline is None:
                    off = "the bundle has no baseline profile (profile.json: build it with `cvdeploy build --data DATA.yaml`)"
        if off is not None and self.settings.drift_monitor:
            log.info("drift monitoring off for %s@%s: %s", name, version, off, extra={"model": name, "version": version})
        p = predictor
        model = {"bundle": p.bundle.name, "variant": p.variant, "conf": p.options.conf, "iou": p.options.iou,
                 "max_det": p.options.max_det}
        m = DriftMonitor(name, version, baseline, self.settings, self.metrics, model=model, off=off)
        return m

    def register(self, monitor: DriftMonitor) -> None:
        with self._lock:
            old = self.monitors.get((monitor.name, monitor.version))
            self.monitors[(monitor.name, monitor.version)] = monitor
        if old is monitor:
            return
        if old is not None:  # a reload of the same version: the old one's series go first, then the new one's start
            old.close()
        monitor.activate()

    def retire(self, monitor: DriftMonitor) -> None:
        with self._lock:
            if self.monitors.get((monitor.name, monitor.version)) is monitor:
                del self.monitors[(monitor.name, monitor.version)]
        monitor.close()

    def submit(self, monitor: DriftMonitor | None, image: np.ndarray, data: bytes | None, result: Any) -> None:
        """Queue one answered request for its monitor (`result` is only read, later, on the monitor's thread)."""
        if monitor is None or monitor._closed or not monitor.enabled:
            return
        if len(self._pending) >= self.settings.drift_queue:
            self.metrics.drift_dropped.inc()
            return
        # The drawn requests give their pixels and their header (format, EXIF, JPEG quality: a PIL parse); every request
        # its size and its prediction, which cost nothing more to read.
        if random.random() < self.settings.drift_sample:
            self._pending.append((monitor, result, image.shape, data, image))
        else:
            self._pending.append((monitor, result, image.shape, None, None))
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="cvdeploy-drift", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        from cvdeploy.serve.batcher import os_thread_namer

        os_thread_namer("cvd-drift")()  # `top -H` and the benchmark tell its CPU from the engine's
        # A token bucket of busy seconds, filled at drift_cpu_budget per second: the pixel statistics, the costly part, are
        # computed only while it holds some, so the monitor's share stays bounded whatever the request rate. It is charged
        # the wall time of the work, not this thread's CPU time: OpenCV spreads a resize over its own threads (which this
        # thread's clock does not see), and under load the wall time grows, so the monitor yields exactly when cores are
        # scarce.
        budget = self.settings.drift_cpu_budget
        tokens, last = _BURST_S, time.monotonic()
        while not self._stop.wait(_PERIOD_S) or self._pending:
            while self._pending:
                self._busy = True
                monitor, result, shape, data, pixels = self._pending.popleft()
                now = time.monotonic()
                tokens, last = min(_BURST_S, tokens + (now - last) * budget), now
                t0, w0 = time.thread_time(), time.perf_counter()
                if pixels is not None and tokens <= 0:
                    data = pixels = None
                    self.metrics.drift_pixels_skipped.inc()
                try:
                    sample = prediction_sample(result, image_sample(shape, data, pixels))
                    monitor.add(sample)
                except Exception:  # monitoring never fails a request nor stops: the failure is logged with its traceback
                    log.exception("drift monitoring failed on a request of %s@%s", monitor.name, monitor.version)
                tokens -= time.perf_counter() - w0
                self.metrics.drift_work.inc(time.thread_time() - t0)
            self._busy = False

    def drain(self, timeout: float = 10.0) -> None:
        """Wait (at most `timeout` s) until every queued request has been added: `/admin/drift?sync=true`, tests."""
        deadline = time.monotonic() + timeout
        while (self._pending or self._busy) and self._thread is not None and time.monotonic() < deadline:
            time.sleep(0.005)

    def report(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            mons = sorted(self.monitors.values(), key=lambda m: (m.name, m.version))
        return [m.report() for m in mons if name is None or m.name == name]

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            mons, self.monitors = list(self.monitors.values()), {}
        for m in mons:
            m.close()
