"""Prometheus metrics of the server, on a registry of its own (several apps can live in one process).

Names follow Prometheus' conventions (base units in the name, `_total` on counters); the list and what each means is
in docs/observability.md. The exposition leaves out the `_created` series that prometheus_client adds to counters and
histograms: they double the series count and say nothing a scrape's own timestamps do not. They are dropped here, at
exposition, rather than with `disable_created_metrics()`, which would change every other registry in the process too.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

# Vision latencies: from ~1 ms (a small model's postprocess) to seconds (a big image on a busy CPU).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
# Request bodies: a small JPEG (~4 KiB) to the default body limit (32 MiB), by factors of 4.
BODY_BUCKETS = (*(float(4096 * 4**i) for i in range(7)), 32.0 * 2**20)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # What a dashboard needs beside the server's own: CPU, memory, open files, GC (process_*, python_*).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        labels = ("model", "version")
        self.build_info = Gauge("cvdeploy_build_info", "Always 1; the labels say what runs", ("version", "python", "onnxruntime"),
                                registry=r)
        self.build_info.labels(*_versions()).set(1)
        self.requests = Counter("cvdeploy_requests_total", "Inference requests by outcome", (*labels, "outcome"), registry=r)
        self.inferences = Counter("cvdeploy_inference_count_total", "Images inferred (a batch of n counts n)", labels, registry=r)
        self.executions = Counter("cvdeploy_execution_count_total", "Engine executions (batches)", labels, registry=r)
        self.stage = Histogram("cvdeploy_stage_duration_seconds", "Time per stage: queue, preprocess, infer, postprocess",
                               (*labels, "stage"), buckets=BUCKETS, registry=r)
        self.request_duration = Histogram("cvdeploy_request_duration_seconds", "End-to-end request time", (*labels, "route"),
                                          buckets=BUCKETS, registry=r)
        self.request_body = Histogram("cvdeploy_request_body_bytes", "Inference request body size (after gzip or deflate "
                                      "decompression)", (*labels, "route"), buckets=BODY_BUCKETS, registry=r)
        self.in_flight = Gauge("cvdeploy_requests_in_flight", "Requests being handled (the metrics scrape not counted)", registry=r)
        self.responses = Counter("cvdeploy_http_responses_total", "HTTP responses by status class (2xx, 4xx, 5xx) and client "
                                 "aborts; health probes and scrapes not counted",
                                 ("status_class",), registry=r)
        self.queue_depth = Gauge("cvdeploy_queue_depth", "Requests waiting in a model's batch queue", labels, registry=r)
        self.model_state = Gauge("cvdeploy_model_ready", "1 when the model version is loaded and warmed up", labels, registry=r)
        self.load_failures = Counter("cvdeploy_model_load_failures_total", "Failed loads of a model (at start or on reload)",
                                     ("model",), registry=r)
        self.server_ready = Gauge("cvdeploy_server_ready", "1 when /v2/health/ready answers 200: every model loaded and warm",
                                  registry=r)
        self.startup = Gauge("cvdeploy_startup_duration_seconds", "Seconds the first load and warm-up of every model took "
                             "(0 while it runs)", registry=r)
        # Drift against the bundle's baseline profile, and canary releases (cvdeploy.serve.monitor, .canary).
        self.drift_score = Gauge("cvdeploy_drift_score", "Drift test statistic over its serious threshold, per statistic of "
                                 "the rolling window (above 1: serious)", (*labels, "statistic"), registry=r)
        self.drift_alert = Gauge("cvdeploy_drift_alert", "1 while a statistic has been serious for drift_consecutive "
                                 "evaluations in a row", labels, registry=r)
        self.drift_work = Counter("cvdeploy_drift_work_seconds_total", "CPU seconds the drift monitor's thread spent on "
                                  "statistics and comparisons (its cost, off the event loop)", registry=r)
        self.drift_dropped = Counter("cvdeploy_drift_skipped_requests_total", "Requests not monitored at all because the "
                                     "monitor's queue was full", registry=r)
        self.drift_pixels_skipped = Counter("cvdeploy_drift_pixels_skipped_total", "Requests drawn for pixel statistics that "
                                            "skipped them: the monitor was past its CPU budget (expected under full load)",
                                            registry=r)
        self.canary = Gauge("cvdeploy_canary_share", "Share of a model's requests routed (canary) or copied (shadow) to "
                            "its candidate version, while a release runs", ("model", "candidate", "mode"), registry=r)
        self.canary_decisions = Counter("cvdeploy_canary_decisions_total", "Candidate versions promoted or rolled back",
                                        ("model", "decision", "by"), registry=r)
        self.shadow_dropped = Counter("cvdeploy_shadow_skipped_requests_total", "Requests not copied to a shadow candidate "
                                      "because its queue was full", ("model",), registry=r)
        self.shadow_failures = Counter("cvdeploy_shadow_failures_total", "Shadow runs of a candidate that failed (never "
                                       "seen by clients)", ("model",), registry=r)

    def track_readiness(self, ready: Callable[[], bool]) -> None:
        """`cvdeploy_server_ready` is read from `ready` at each scrape, so that it can never disagree with the probe."""
        self.server_ready.set_function(lambda: float(ready()))

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric, without `_created` series."""
        from prometheus_client import generate_latest

        return generate_latest(_WithoutCreated(self.registry))  # type: ignore[arg-type]


class _WithoutCreated:
    """A registry's metric families with their `<name>_created` samples dropped (each collect builds fresh families)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Any]:
        for family in self.registry.collect():
            created = family.name + "_created"
            family.samples = [s for s in family.samples if s.name != created]
            yield family


def _versions() -> tuple[str, str, str]:
    from cvdeploy import __version__

    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:  # an OpenVINO-only install
        ort = "none"
    return __version__, platform.python_version(), ort
