"""Prometheus metrics of the server, on a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Vision latencies: from ~1 ms (a small model's postprocess) to seconds (a big image on a busy CPU).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        labels = ("model", "version")
        self.requests = Counter("cvdeploy_requests_total", "Inference requests by outcome", (*labels, "outcome"), registry=r)
        self.inferences = Counter("cvdeploy_inference_count_total", "Images inferred (a batch of n counts n)", labels, registry=r)
        self.executions = Counter("cvdeploy_execution_count_total", "Engine executions (batches)", labels, registry=r)
        self.stage = Histogram("cvdeploy_stage_duration_seconds", "Time per stage: queue, preprocess, infer, postprocess",
                               (*labels, "stage"), buckets=BUCKETS, registry=r)
        self.request_duration = Histogram("cvdeploy_request_duration_seconds", "End-to-end request time", (*labels, "route"),
                                          buckets=BUCKETS, registry=r)
        self.in_flight = Gauge("cvdeploy_requests_in_flight", "Requests being handled (the metrics scrape not counted)", registry=r)
        self.responses = Counter("cvdeploy_http_responses_total", "HTTP responses by status class (2xx, 4xx, 5xx) and client aborts",
                                 ("status_class",), registry=r)
        self.queue_depth = Gauge("cvdeploy_queue_depth", "Requests waiting in a model's batch queue", labels, registry=r)
        self.model_state = Gauge("cvdeploy_model_ready", "1 when the model version is loaded and warmed up", labels, registry=r)
