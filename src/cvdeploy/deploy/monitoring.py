"""Monitoring for a deployment: Prometheus alerting rules and a Grafana dashboard, sized from what the bundles record.

The alerts: a high share of failed requests, requests rejected for lack of capacity, p99 latency over a budget taken from
the bundle's own measured latency, drift (`cvdeploy_drift_score` over its threshold, `cvdeploy_drift_alert` raised),
replicas that are not ready, models that fail to load, a model no replica reports at all, a drift monitor that has to
skip requests. The dashboard: throughput, latency quantiles (request and per stage), errors, in-flight requests and queue
depth, drift scores per statistic and readiness, per model and version.

Only metric names the server exports are used (`SERVER_METRICS`, held against `cvdeploy.serve.metrics` by the tests).
Nothing here imports the server.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvdeploy.deploy import clear_output, dump_yaml
from cvdeploy.errors import InputError

# name -> labels, as cvdeploy.serve.metrics.ServerMetrics exports them (histograms by their base name). Drift: the score
# is cvdeploy.diagnose.profile.Drift.score of the server's rolling window (the test's value over its serious threshold:
# above 1 is serious), the alert 1 once a statistic has been serious for several evaluations (cvdeploy.serve.monitor).
SERVER_METRICS: dict[str, tuple[str, ...]] = {
    "cvdeploy_requests_total": ("model", "version", "outcome"),
    "cvdeploy_inference_count_total": ("model", "version"),
    "cvdeploy_request_duration_seconds": ("model", "version", "route"),
    "cvdeploy_stage_duration_seconds": ("model", "version", "stage"),
    "cvdeploy_requests_in_flight": (),
    "cvdeploy_queue_depth": ("model", "version"),
    "cvdeploy_model_ready": ("model", "version"),
    "cvdeploy_model_load_failures_total": ("model",),
    "cvdeploy_server_ready": (),
    "cvdeploy_http_responses_total": ("status_class",),
    "cvdeploy_drift_score": ("model", "version", "statistic"),
    "cvdeploy_drift_alert": ("model", "version"),
    "cvdeploy_drift_skipped_requests_total": (),
}
RULES_FILE = Path("prometheus") / "cvdeploy-alerts.yaml"
DASHBOARD_FILE = Path("grafana") / "cvdeploy-dashboard.json"
GRAFANA_SCHEMA_VERSION = 39  # the classic dashboard JSON model of Grafana 10 and 11 (imported as is by 12 and 13)
_DURATION = re.compile(r"^(?!$)(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")  # Prometheus' duration syntax


@dataclass(frozen=True)
class AlertOptions:
    """Thresholds of the alerts. The p99 budget is `budget_factor` times the bundle's recorded median engine latency at
    batch 1 (a request adds decoding, queueing and postprocessing, and p99 is not the median), unless `p99_budget_s`
    sets it. `drift_threshold` applies to `cvdeploy_drift_score` (1.0: the serious line of the drift test)."""

    error_ratio: float = 0.05
    rejected_ratio: float = 0.05
    p99_budget_s: float | None = None
    budget_factor: float = 5.0
    drift_threshold: float = 1.0
    window: str = "5m"  # rate() window
    for_: str = "10m"  # how long a condition must hold before it fires

    def __post_init__(self) -> None:
        for name in ("error_ratio", "rejected_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise InputError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.p99_budget_s is not None and not (math.isfinite(self.p99_budget_s) and self.p99_budget_s > 0):
            raise InputError(f"the p99 budget must be a positive number of seconds, got {self.p99_budget_s}")
        if not self.budget_factor > 0 or not self.drift_threshold > 0:
            raise InputError("budget_factor and drift_threshold must be positive")
        for name in ("window", "for_"):
            if not _DURATION.match(getattr(self, name)):
                raise InputError(f"{name.rstrip('_')} {getattr(self, name)!r} is not a Prometheus duration (e.g. 5m, 1h30m)")


@dataclass(frozen=True)
class LatencyBudget:
    """The p99 budget of one model and where it comes from."""

    seconds: float
    why: str


def latency_budget(bundle: Any, options: AlertOptions = AlertOptions()) -> LatencyBudget:
    """The p99 request latency budget for `bundle` (a `cvdeploy.bundle.Bundle`): the explicit one, or `budget_factor`
    times the slowest median latency its manifest records for its default variant (over the machines it was timed on:
    the server may run on the slowest of them)."""
    if options.p99_budget_s is not None:
        return LatencyBudget(options.p99_budget_s, "set explicitly")
    m = bundle.manifest
    v = m.default_variant
    records = [(r.variants[v], r.cpu or r.machine) for r in m.latencies if v in r.variants]
    if not records and "latency_ms_b1" in m.variants[v].metrics:
        records = [(m.variants[v].metrics["latency_ms_b1"], "the build machine")]
    if not records:
        raise InputError(f"bundle {m.name!r} records no latency for {v}: give the p99 budget (--p99-budget-ms), or measure it "
                         "with `cvdeploy bench tune`")
    ms, where = max(records)
    return LatencyBudget(round(options.budget_factor * ms / 1000.0, 4),
                         f"{options.budget_factor:g} x {ms:.1f} ms, the median batch-1 latency of {v} on {where}")


def _q(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _alert(name: str, expr: str, for_: str, severity: str, model: str, summary: str, description: str) -> dict[str, Any]:
    return {"alert": name, "expr": expr, "for": for_, "labels": {"severity": severity, "component": "cvdeploy", "model": model},
            "annotations": {"summary": summary, "description": description}}


def model_rules(model: str, budget: LatencyBudget, options: AlertOptions = AlertOptions()) -> dict[str, Any]:
    """One rule group: every alert of `model`, per version where the metric has one."""
    m, w, f = _q(model), options.window, options.for_
    rollback = f"If a new version caused it: `cvdeploy registry rollback {model} production`."
    requests = f"sum by (model, version) (rate(cvdeploy_requests_total{{model={m}}}[{w}]))"
    rules = [
        _alert("CvdeployHighErrorRate",
               f'sum by (model, version) (rate(cvdeploy_requests_total{{model={m}, outcome="failure"}}[{w}])) / {requests} '
               f"> {options.error_ratio:g}", f, "critical", model,
               "{{ $labels.model }} version {{ $labels.version }}: {{ $value | humanizePercentage }} of requests fail",
               f"More than {options.error_ratio:.0%} of inference requests end in a server error (outcome failure). "
               f"Check the server's log. {rollback}"),
        _alert("CvdeployRequestsRejected",
               f'sum by (model, version) (rate(cvdeploy_requests_total{{model={m}, outcome="rejected"}}[{w}])) / {requests} '
               f"> {options.rejected_ratio:g}", f, "warning", model,
               "{{ $labels.model }} version {{ $labels.version }}: {{ $value | humanizePercentage }} of requests rejected",
               f"More than {options.rejected_ratio:.0%} of requests are turned away (503 queue full or busy, 504 deadline): "
               "add replicas or instances, or raise the limits."),
        _alert("CvdeployLatencyP99OverBudget",
               f"histogram_quantile(0.99, sum by (le, model, version) (rate(cvdeploy_request_duration_seconds_bucket"
               f"{{model={m}}}[{w}]))) > {budget.seconds:g}", f, "warning", model,
               "{{ $labels.model }} version {{ $labels.version }}: p99 latency {{ $value | humanizeDuration }}",
               f"p99 of the end-to-end request time is over its budget of {budget.seconds * 1000:.0f} ms ({budget.why}). "
               "See the per-stage latency panel: queue (capacity), preprocess (large images), infer (CPU contention)."),
        _alert("CvdeployDriftScoreHigh",
               f"max by (model, version, statistic) (cvdeploy_drift_score{{model={m}}}) > {options.drift_threshold:g}",
               "15m", "warning", model,
               "{{ $labels.model }} version {{ $labels.version }}: drift in {{ $labels.statistic }} (score {{ $value }})",
               f"Live traffic differs from the bundle's baseline profile in this statistic (score over {options.drift_threshold:g}, "
               f"the drift test's serious line). Run `cvdeploy doctor` on recent inputs to see why."),
        _alert("CvdeployDriftAlert", f"max by (model, version) (cvdeploy_drift_alert{{model={m}}}) >= 1", "5m", "warning", model,
               "{{ $labels.model }} version {{ $labels.version }}: the server reports drift",
               "The server's drift monitor raised its alert for this model version. Run `cvdeploy doctor` on recent inputs."),
        _alert("CvdeployModelNotReady", f"cvdeploy_model_ready{{model={m}}} == 0", f, "critical", model,
               "{{ $labels.model }} version {{ $labels.version }} not ready on {{ $labels.instance }}",
               "A replica has this model version loaded but not warm, or not loaded: it answers 503. See its readiness body."),
        _alert("CvdeployModelLoadFailures", f"increase(cvdeploy_model_load_failures_total{{model={m}}}[15m]) > 0", "0m",
               "critical", model, "{{ $labels.model }} failed to load on {{ $labels.instance }}",
               f"A replica could not load the model (a bundle that fails its hashes, a missing key, an engine error). {rollback}"),
        _alert("CvdeployModelAbsent", f"absent(cvdeploy_model_ready{{model={m}}})", f, "critical", model,
               f"no replica reports {model}",
               "No scraped replica exports this model: every replica is down, or none is scraped."),
    ]
    return {"name": f"cvdeploy-{model}", "rules": rules}


def server_rules(options: AlertOptions = AlertOptions()) -> dict[str, Any]:
    """Alerts about replicas, whatever they serve."""
    return {"name": "cvdeploy-replicas", "rules": [
        {"alert": "CvdeployReplicaNotReady", "expr": "cvdeploy_server_ready == 0", "for": options.for_,
         "labels": {"severity": "critical", "component": "cvdeploy"},
         "annotations": {"summary": "replica {{ $labels.instance }} is not ready",
                         "description": "The replica's /v2/health/ready answers 503: a model is loading, failed, or none "
                                        "serves. Load balancers send it nothing meanwhile."}},
        {"alert": "CvdeployDriftMonitorSkipping", "expr": f"rate(cvdeploy_drift_skipped_requests_total[{options.window}]) > 0",
         "for": "15m", "labels": {"severity": "info", "component": "cvdeploy"},
         "annotations": {"summary": "replica {{ $labels.instance }} leaves requests out of its drift monitor",
                         "description": "The drift monitor's queue is full: drift scores describe a sample of the traffic, "
                                        "and drift shows later. Lower the server's drift sample share or add CPU."}},
    ]}


def alert_rules(models: Mapping[str, Any], options: AlertOptions = AlertOptions()) -> dict[str, Any]:
    """A Prometheus rule file (as a dict): a group per model (`models`: name -> the bundle its budget comes from) and a
    group for the replicas."""
    if not models:
        raise InputError("no model to write alerts for")
    return {"groups": [*(model_rules(name, latency_budget(b, options), options) for name, b in models.items()),
                       server_rules(options)]}


# -- the dashboard ---------------------------------------------------------------------------------

_SEL = 'model=~"$model", version=~"$version"'
_RI = "$__rate_interval"


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr, "legendFormat": legend, "refId": ref,
            "range": True}


def _panel(pid: int, title: str, kind: str, grid: tuple[int, int, int, int], targets: list[tuple[str, str]], unit: str,
           description: str, thresholds: Sequence[tuple[str, float | None]] = (("green", None),)) -> dict[str, Any]:
    x, y, w, h = grid
    custom = {"thresholdsStyle": {"mode": "line"}} if len(thresholds) > 1 and kind == "timeseries" else {}
    return {
        "id": pid, "type": kind, "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [_target(e, legend, chr(ord("A") + i)) for i, (e, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom,
                                     "thresholds": {"mode": "absolute",
                                                    "steps": [{"color": c, "value": v} for c, v in thresholds]}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries" else
                   {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "background"},
    }  # fmt: skip


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": f"{name}-values"}, "definition": query, "refresh": 2, "multi": True,
            "includeAll": True, "current": {"text": "All", "value": "$__all"}, "sort": 1}


def dashboard(models: Mapping[str, Any], options: AlertOptions = AlertOptions(), *, title: str | None = None) -> dict[str, Any]:
    """A Grafana dashboard (classic JSON model) for the models in `models` (name -> bundle, for the latency budgets),
    with `$model` and `$version` variables over what the replicas export."""
    if not models:
        raise InputError("no model to make a dashboard for")
    budgets = {name: latency_budget(b, options) for name, b in models.items()}
    worst = max(b.seconds for b in budgets.values())
    names = sorted(models)
    lat = f"cvdeploy_request_duration_seconds_bucket{{{_SEL}}}"
    stage = f"cvdeploy_stage_duration_seconds_bucket{{{_SEL}}}"
    req = f"cvdeploy_requests_total{{{_SEL}}}"
    panels = [
        _panel(1, "Throughput (images/s)", "timeseries", (0, 0, 12, 8),
               [(f"sum by (model, version) (rate(cvdeploy_inference_count_total{{{_SEL}}}[{_RI}]))", "{{model}} v{{version}}")],
               "reqps", "Images inferred per second (a batch of n counts n)."),
        _panel(2, "Requests by outcome (req/s)", "timeseries", (12, 0, 12, 8),
               [(f"sum by (model, version, outcome) (rate({req}[{_RI}]))", "{{model}} v{{version}} {{outcome}}")],
               "reqps", "success, client_error, rejected (503/504), client_abort, failure."),
        _panel(3, "Request latency quantiles", "timeseries", (0, 8, 12, 8),
               [(f"histogram_quantile({q}, sum by (le, model, version) (rate({lat}[{_RI}])))", f"p{round(q * 100)} {{{{model}}}} v{{{{version}}}}")
                for q in (0.5, 0.9, 0.99)],
               "s", "End-to-end request time. The line is the largest p99 budget of the alerts: "
                    + "; ".join(f"{n} {budgets[n].seconds * 1000:.0f} ms ({budgets[n].why})" for n in names) + ".",
               (("green", None), ("red", worst))),
        _panel(4, "p99 per stage", "timeseries", (12, 8, 12, 8),
               [(f"histogram_quantile(0.99, sum by (le, model, version, stage) (rate({stage}[{_RI}])))",
                 "{{stage}} {{model}} v{{version}}")],
               "s", "queue (waiting for a batch), preprocess (decode + letterbox), infer (the engine), postprocess."),
        _panel(5, "Error ratio", "timeseries", (0, 16, 12, 8),
               [(f'sum by (model, version) (rate(cvdeploy_requests_total{{{_SEL}, outcome="failure"}}[{_RI}])) / '
                 f"sum by (model, version) (rate({req}[{_RI}]))", "failures {{model}} v{{version}}"),
                (f'sum by (model, version) (rate(cvdeploy_requests_total{{{_SEL}, outcome="rejected"}}[{_RI}])) / '
                 f"sum by (model, version) (rate({req}[{_RI}]))", "rejected {{model}} v{{version}}")],
               "percentunit", "Share of requests that failed (server errors) or were rejected (capacity).",
               (("green", None), ("red", options.error_ratio))),
        _panel(6, "HTTP responses by status class (all models)", "timeseries", (12, 16, 12, 8),
               [(f"sum by (status_class) (rate(cvdeploy_http_responses_total[{_RI}]))", "{{status_class}}")],
               "reqps", "Every response but health probes and scrapes."),
        _panel(7, "In-flight requests and queue depth", "timeseries", (0, 24, 12, 8),
               [("sum by (instance) (cvdeploy_requests_in_flight)", "in flight {{instance}}"),
                (f"sum by (model, version) (cvdeploy_queue_depth{{{_SEL}}})", "queued {{model}} v{{version}}")],
               "short", "Requests being handled per replica, and waiting in each model's batch queue."),
        _panel(8, "Readiness", "stat", (12, 24, 12, 8),
               [("sum(cvdeploy_server_ready)", "replicas ready"), ("count(cvdeploy_server_ready)", "replicas scraped"),
                (f"sum by (model, version) (cvdeploy_model_ready{{{_SEL}}})", "{{model}} v{{version}} ready")],
               "short", "Replicas whose /v2/health/ready answers 200, and replicas with each model version warm."),
        _panel(9, "Drift score per statistic", "timeseries", (0, 32, 16, 9),
               [(f"max by (model, version, statistic) (cvdeploy_drift_score{{{_SEL}}})", "{{statistic}} {{model}} v{{version}}")],
               "short", "Live traffic against the bundle's baseline profile: 1.0 is the drift test's serious line.",
               (("green", None), ("red", options.drift_threshold))),
        _panel(10, "Drift alert", "stat", (16, 32, 8, 5),
               [(f"max by (model, version) (cvdeploy_drift_alert{{{_SEL}}})", "{{model}} v{{version}}")],
               "short", "1 while the server's drift monitor alerts for the model version.", (("green", None), ("red", 1.0))),
        _panel(11, "Requests left out of drift monitoring", "stat", (16, 37, 8, 4),
               [(f"sum(rate(cvdeploy_drift_skipped_requests_total[{_RI}]))", "req/s skipped")],
               "reqps", "Requests the drift monitor could not take (its queue was full), all replicas.",
               (("green", None), ("orange", 0.001))),
    ]
    uid = "cvd-" + hashlib.sha256("\0".join(names).encode()).hexdigest()[:16]
    return {
        "uid": uid, "title": title or f"cvdeploy: {', '.join(names)}", "tags": ["cvdeploy"], "timezone": "browser",
        "editable": True, "graphTooltip": 1, "schemaVersion": GRAFANA_SCHEMA_VERSION, "version": 1, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"}, "links": [], "annotations": {"list": []},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            _variable("model", "model", "label_values(cvdeploy_model_ready, model)"),
            _variable("version", "version", 'label_values(cvdeploy_model_ready{model=~"$model"}, version)'),
        ]},
        "panels": panels,
    }  # fmt: skip


# -- structural checks ---------------------------------------------------------------------------


def check_rules(doc: Any) -> list[str]:
    """What breaks the Prometheus rule-file format (docs: configuration/recording_rules and alerting_rules) in `doc`: a
    `groups` list of uniquely named groups, each a list of rules with either `alert` or `record`, a string `expr`,
    durations in Prometheus' syntax, string-to-string labels and annotations. PromQL itself is checked by promtool."""
    problems: list[str] = []
    if not isinstance(doc, dict) or set(doc) != {"groups"} or not isinstance(doc["groups"], list):
        return ["the file must be a mapping with one key, groups (a list)"]
    seen: set[str] = set()
    for i, g in enumerate(doc["groups"]):
        where = f"group {i}"
        if not isinstance(g, dict) or not isinstance(g.get("name"), str) or not g["name"]:
            problems.append(f"{where}: needs a name")
            continue
        where = f"group {g['name']!r}"
        if g["name"] in seen:
            problems.append(f"{where}: the name is used twice")
        seen.add(g["name"])
        if unknown := set(g) - {"name", "interval", "limit", "rules", "query_offset", "labels"}:
            problems.append(f"{where}: unknown keys {sorted(unknown)}")
        if "interval" in g and not _DURATION.match(str(g["interval"])):
            problems.append(f"{where}: interval {g['interval']!r} is not a duration")
        for j, r in enumerate(g.get("rules") or []):
            problems += [f"{where} rule {j}: {p}" for p in _rule_problems(r)]
    return problems


def _rule_problems(r: Any) -> list[str]:
    if not isinstance(r, dict):
        return ["not a mapping"]
    out = []
    if ("alert" in r) == ("record" in r):
        out.append("needs exactly one of alert and record")
    allowed = {"expr", "labels"} | ({"alert", "for", "keep_firing_for", "annotations"} if "alert" in r else {"record"})
    if unknown := set(r) - allowed:
        out.append(f"unknown keys {sorted(unknown)}")
    if not isinstance(r.get("expr"), str) or not r["expr"].strip():
        out.append("expr must be a non-empty string")
    for key in ("for", "keep_firing_for"):
        if key in r and not _DURATION.match(str(r[key])):
            out.append(f"{key} {r[key]!r} is not a duration")
    for key in ("labels", "annotations"):
        if key in r and (not isinstance(r[key], dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in r[key].items())):
            out.append(f"{key} must map strings to strings")
    return out


def check_dashboard(doc: Any) -> list[str]:
    """What breaks Grafana's classic dashboard JSON model (docs: dashboards/build-dashboards/view-dashboard-json-model) in
    `doc`: uid (at most 40 characters) and title, an integer schemaVersion, templating.list of named variables, panels
    with unique ids, a type and a gridPos inside the 24-column grid that overlaps no other panel, and Prometheus targets
    with a unique refId and an expression."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        return ["a dashboard is a JSON object"]
    if not isinstance(doc.get("uid"), str) or not 0 < len(doc["uid"]) <= 40:
        problems.append("uid must be a string of 1 to 40 characters")
    if not isinstance(doc.get("title"), str) or not doc["title"]:
        problems.append("title must be a non-empty string")
    if not isinstance(doc.get("schemaVersion"), int):
        problems.append("schemaVersion must be an integer")
    variables = (doc.get("templating") or {}).get("list", [])
    names = [v.get("name") for v in variables if isinstance(v, dict)]
    if len(names) != len(variables) or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        problems.append("templating.list must hold variables with unique names")
    ids: set[int] = set()
    cells: dict[tuple[int, int], int] = {}
    for i, p in enumerate(doc.get("panels") or []):
        pid = p.get("id") if isinstance(p, dict) else None
        where = f"panel {pid if pid is not None else i}"
        if not isinstance(pid, int) or pid in ids:
            problems.append(f"{where}: needs a unique integer id")
        ids.add(pid)  # type: ignore[arg-type]
        if not isinstance(p.get("type"), str) or not p.get("title"):
            problems.append(f"{where}: needs a type and a title")
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in "xywh") or g["w"] < 1 or g["h"] < 1 or g["x"] < 0 or g["y"] < 0 \
                or g["x"] + g["w"] > 24:
            problems.append(f"{where}: gridPos must be integers x, y, w, h inside the 24 columns")
        else:
            for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
                if cell in cells:
                    problems.append(f"{where}: overlaps panel {cells[cell]}")
                    break
                cells[cell] = pid  # type: ignore[assignment]
        refs = [t.get("refId") for t in p.get("targets", [])]
        if len(set(refs)) != len(refs) or not all(isinstance(t.get("expr"), str) and t["expr"] for t in p.get("targets", [])):
            problems.append(f"{where}: targets need unique refIds and an expr")
    return problems


# -- writing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MonitoringFiles:
    root: Path
    rules: Path
    dashboard: Path
    budgets: dict[str, LatencyBudget]


def write_monitoring(models: Mapping[str, Any], out: str | os.PathLike[str], options: AlertOptions = AlertOptions(), *,
                     title: str | None = None, force: bool = False) -> MonitoringFiles:
    """Write OUT/prometheus/cvdeploy-alerts.yaml and OUT/grafana/cvdeploy-dashboard.json for `models` (name -> the
    bundle the thresholds come from, e.g. each model's newest version). Both are checked before they are written."""
    rules, board = alert_rules(models, options), dashboard(models, options, title=title)
    broken = [f"alert rules: {p}" for p in check_rules(rules)] + [f"dashboard: {p}" for p in check_dashboard(board)]
    if broken:  # a generator bug, said plainly rather than shipped
        raise InputError("the generated monitoring files are invalid: " + "; ".join(broken))
    root = clear_output(out, force, choose="another output")
    (root / RULES_FILE).parent.mkdir(parents=True)
    (root / DASHBOARD_FILE).parent.mkdir(parents=True)
    header = ("# Prometheus alerting rules for cvdeploy, written by cvdeploy.deploy.monitoring; check with\n"
              f"#   promtool check rules {RULES_FILE.name}\n")
    (root / RULES_FILE).write_text(header + dump_yaml(rules, sort_keys=False, width=1_000_000, allow_unicode=True))
    (root / DASHBOARD_FILE).write_text(json.dumps(board, indent=2) + "\n")
    return MonitoringFiles(root, root / RULES_FILE, root / DASHBOARD_FILE,
                           {name: latency_budget(b, options) for name, b in models.items()})


def models_of(source: Any) -> dict[str, Any]:
    """name -> newest version's bundle, from a `cvdeploy.deploy.ModelSource` (`load_source`: a bundle or a repository)."""
    return {name: list(versions.values())[-1] for name, versions in source.models.items()}
