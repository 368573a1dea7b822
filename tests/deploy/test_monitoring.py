"""Prometheus alert rules and the Grafana dashboard: every PromQL expression parses (promql-parser), names only metrics
and labels the server exports, passes `promtool check rules`, and fires (or not) on synthetic series in `promtool test
rules`; the dashboard passes the structural check of Grafana's classic JSON model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cvdeploy.bundle.bundle import Bundle
from cvdeploy.bundle.manifest import LatencyRecord
from cvdeploy.deploy.monitoring import (
    RULES_FILE,
    SERVER_METRICS,
    AlertOptions,
    alert_rules,
    check_dashboard,
    check_rules,
    dashboard,
    latency_budget,
    write_monitoring,
)
from cvdeploy.errors import InputError

MODEL = "yolo11n-shapes"
TARGET_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series
PROMTOOL = os.environ.get("PROMTOOL") or shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not found (Debian: apt-get install prometheus; or set "
                                                             "PROMTOOL to its path)")


@pytest.fixture(scope="module")
def timed_bundle(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The demo bundle with latencies recorded on two machines (the budget takes the slower)."""
    out = tmp_path_factory.mktemp("mon") / "timed.cvd"
    shutil.copytree(demo_bundle, out)
    b = Bundle.load(out)
    b.manifest.latencies = [LatencyRecord(machine="aaa", cpu="Fast CPU", variants={"onnx-fp32": 40.0}, how="build"),
                            LatencyRecord(machine="bbb", cpu="Slow CPU", variants={"onnx-fp32": 60.0}, how="bench tune")]
    b.save_manifest()
    return Bundle.load(out)


def exported_metrics() -> dict[str, set[str]]:
    """Every series name the server's metrics module exports, with its labels (read from the real ServerMetrics)."""
    from prometheus_client.metrics import MetricWrapperBase

    from cvdeploy.serve.metrics import ServerMetrics

    out: dict[str, set[str]] = {}
    for metric in vars(ServerMetrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        # prometheus_client keeps the name without a counter's _total (`_name`) and the label names (`_labelnames`).
        name, labels = metric._name, set(metric._labelnames)
        if metric._type == "counter":
            out[name + "_total"] = labels
        elif metric._type == "histogram":
            out.update({name + "_bucket": labels | {"le"}, name + "_sum": labels, name + "_count": labels})
        else:
            out[name] = labels
    return out


def _selectors(node: Any, grouping: list[set[str]], found: list[tuple[str, set[str], list[set[str]]]]) -> None:
    """(metric name, matcher labels, enclosing `by` label sets) of every vector selector under `node`."""
    import promql_parser as pp

    if isinstance(node, pp.VectorSelector):
        found.append((node.name, {m.name for m in node.matchers.matchers}, grouping))
        return
    if isinstance(node, pp.AggregateExpr) and node.modifier is not None and node.modifier.type == pp.AggModifierType.By:
        grouping = [*grouping, set(node.modifier.labels)]
    for attr in ("lhs", "rhs", "expr", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, str | int | float):
            _selectors(child, grouping, found)
    for arg in getattr(node, "args", None) or []:
        _selectors(arg, grouping, found)


def check_promql(expr: str, known: dict[str, set[str]]) -> list[str]:
    """Problems of one expression: it must parse, name known metrics, and match or group only by labels they carry."""
    import promql_parser as pp

    try:
        tree = pp.parse(expr)
    except Exception as e:  # the parser raises its own error types
        return [f"{expr}: does not parse ({e})"]
    found: list[tuple[str, set[str], list[set[str]]]] = []
    _selectors(tree, [], found)
    problems = []
    for name, matched, groupings in found:
        if name not in known:
            problems.append(f"{expr}: unknown metric {name}")
            continue
        allowed = known[name] | TARGET_LABELS
        for label in matched | set().union(*groupings):
            if label not in allowed:
                problems.append(f"{expr}: {name} has no label {label!r}")
    return problems


def test_the_metric_names_relied_on_are_the_servers() -> None:
    exported = exported_metrics()
    for name, labels in SERVER_METRICS.items():
        series = name if name in exported else name + "_bucket"
        assert series in exported, f"{name} is not exported by cvdeploy.serve.metrics"
        assert set(labels) == exported[series] - {"le"}, name


def test_every_rule_parses_and_uses_only_exported_metrics_and_labels(timed_bundle: Bundle) -> None:
    rules = alert_rules({MODEL: timed_bundle})
    assert check_rules(rules) == []
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert len(exprs) == 10
    known = exported_metrics()
    assert [p for e in exprs for p in check_promql(e, known)] == []
    assert check_promql("sum by (stage) (rate(cvdeploy_requests_total[5m]))", known)  # the check can fail
    assert check_promql("rate(cvdeploy_request_latency_ms_bucket[5m])", known)


def test_the_dashboard_is_a_valid_classic_model_of_exported_metrics(timed_bundle: Bundle) -> None:
    board = dashboard({MODEL: timed_bundle, "other": timed_bundle})
    assert check_dashboard(board) == []
    assert board["uid"] == dashboard({"other": timed_bundle, MODEL: timed_bundle})["uid"]  # stable across runs and orders
    known = exported_metrics()
    variables = {"$__rate_interval": "5m", '"$model"': '".*"', '"$version"': '".*"', "${datasource}": "x"}
    problems, titles = [], []
    for panel in board["panels"]:
        titles.append(panel["title"])
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in variables.items():
                expr = expr.replace(var, value)
            problems += check_promql(expr, known)
    assert problems == []
    for needed in ("Throughput", "latency quantiles", "p99 per stage", "Error ratio", "In-flight", "Drift score", "Readiness"):
        assert any(needed in t for t in titles), needed
    broken = json.loads(json.dumps(board))
    broken["panels"][1]["gridPos"]["x"] = 6  # now overlaps panel 1
    broken["panels"][2]["targets"][1]["refId"] = "A"
    del broken["uid"]
    assert len(check_dashboard(broken)) == 3


def test_the_latency_budget_comes_from_the_bundle(timed_bundle: Bundle, demo_bundle: Path) -> None:
    budget = latency_budget(timed_bundle)
    assert budget.seconds == pytest.approx(5 * 0.060) and "Slow CPU" in budget.why
    assert latency_budget(timed_bundle, AlertOptions(budget_factor=3)).seconds == pytest.approx(0.18)
    assert latency_budget(timed_bundle, AlertOptions(p99_budget_s=0.25)).seconds == 0.25
    with pytest.raises(InputError, match="records no latency for onnx-fp32: give the p99 budget"):
        latency_budget(Bundle.load(demo_bundle))
    rule = next(r for r in alert_rules({MODEL: timed_bundle})["groups"][0]["rules"] if r["alert"] == "CvdeployLatencyP99OverBudget")
    assert rule["expr"].endswith("> 0.3") and "300 ms" in rule["annotations"]["description"]
    for bad in ({"error_ratio": 0}, {"window": "5 minutes"}, {"p99_budget_s": -1.0}):
        with pytest.raises(InputError):
            AlertOptions(**bad)


def test_structural_rule_check_can_fail() -> None:
    assert check_rules({"groups": [{"name": "a", "rules": [{"alert": "X", "record": "y", "expr": "1", "for": "ten minutes"}]},
                                   {"name": "a", "rules": [{"alert": "Y", "expr": "", "labels": {"a": 1}}]}]}) == [
        "group 'a' rule 0: needs exactly one of alert and record", "group 'a' rule 0: unknown keys ['record']",
        "group 'a' rule 0: for 'ten minutes' is not a duration",
        "group 'a': the name is used twice", "group 'a' rule 0: expr must be a non-empty string",
        "group 'a' rule 0: labels must map strings to strings"]
    assert check_rules([]) == ["the file must be a mapping with one key, groups (a list)"]


@needs_promtool
def test_promtool_accepts_the_written_rules(timed_bundle: Bundle, tmp_path: Path) -> None:
    files = write_monitoring({MODEL: timed_bundle}, tmp_path / "mon")
    assert files.rules == tmp_path / "mon" / RULES_FILE and json.loads(files.dashboard.read_text())["panels"]
    p = subprocess.run([PROMTOOL, "check", "rules", str(files.rules)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "SUCCESS: 10 rules found" in p.stdout, p.stdout + p.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(files.rules.read_text().replace("sum by (model, version)", "sum by (model, version", 1))
    assert subprocess.run([PROMTOOL, "check", "rules", str(broken)], capture_output=True, timeout=60).returncode != 0
    with pytest.raises(InputError, match="already exists"):
        write_monitoring({MODEL: timed_bundle}, tmp_path / "mon")


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _expected(*alerts: tuple[str, dict[str, str]]) -> list[dict[str, Any]]:
    return [{"exp_labels": {"component": "cvdeploy", **labels}} for _, labels in alerts]


@needs_promtool
def test_the_alerts_fire_on_what_they_watch_and_not_otherwise(timed_bundle: Bundle, tmp_path: Path) -> None:
    """Synthetic series for two versions (1 healthy, 2 failing in every way) and two replicas (a ready, b not)."""
    rules = alert_rules({MODEL: timed_bundle}, AlertOptions(p99_budget_s=0.3))
    for g in rules["groups"]:  # promtool compares annotations too: the label checks here need none
        for r in g["rules"]:
            r.pop("annotations")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    m = {"model": MODEL, "instance": "a"}
    v1, v2 = {**m, "version": "1"}, {**m, "version": "2"}
    series = [
        _series("cvdeploy_requests_total", {**v1, "outcome": "success"}, "0+60x40"),
        _series("cvdeploy_requests_total", {**v1, "outcome": "failure"}, "0x40"),
        _series("cvdeploy_requests_total", {**v2, "outcome": "success"}, "0+54x40"),
        _series("cvdeploy_requests_total", {**v2, "outcome": "failure"}, "0+6x40"),  # 10 % fail
        *(_series("cvdeploy_request_duration_seconds_bucket", {**v1, "route": "images", "le": le}, "0+60x40")
          for le in ("0.05", "0.25", "0.5", "1", "+Inf")),
        *(_series("cvdeploy_request_duration_seconds_bucket", {**v2, "route": "images", "le": le}, f"0+{n}x40")
          for le, n in (("0.05", 0), ("0.25", 30), ("0.5", 40), ("1", 60), ("+Inf", 60))),  # p99 ~ 1 s
        _series("cvdeploy_drift_score", {**v1, "statistic": "brightness"}, "0.4x40"),
        _series("cvdeploy_drift_score", {**v2, "statistic": "brightness"}, "1.6x40"),
        _series("cvdeploy_drift_score", {**v2, "statistic": "contrast"}, "0.9x40"),
        _series("cvdeploy_drift_alert", v1, "0x40"),
        _series("cvdeploy_drift_alert", v2, "1x40"),
        _series("cvdeploy_model_ready", v1, "1x40"),
        _series("cvdeploy_model_ready", v2, "0x40"),
        _series("cvdeploy_model_load_failures_total", m, "0x24 1x15"),  # one failure at 25 min
        _series("cvdeploy_server_ready", {"instance": "a"}, "1x40"),
        _series("cvdeploy_server_ready", {"instance": "b"}, "0x40"),
        _series("cvdeploy_drift_skipped_requests_total", {"instance": "a"}, "0x40"),
        _series("cvdeploy_drift_skipped_requests_total", {"instance": "b"}, "0+5x40"),
    ]
    crit, warn = {"severity": "critical", "model": MODEL}, {"severity": "warning", "model": MODEL}
    tests = {
        "CvdeployHighErrorRate": _expected(("", {**crit, "version": "2"})),
        "CvdeployRequestsRejected": [],
        "CvdeployLatencyP99OverBudget": _expected(("", {**warn, "version": "2"})),
        "CvdeployDriftScoreHigh": _expected(("", {**warn, "version": "2", "statistic": "brightness"})),
        "CvdeployDriftAlert": _expected(("", {**warn, "version": "2"})),
        "CvdeployModelNotReady": _expected(("", {**crit, "version": "2", "instance": "a"})),
        "CvdeployModelLoadFailures": _expected(("", {**crit, "instance": "a"})),
        "CvdeployModelAbsent": [],
        "CvdeployReplicaNotReady": [{"exp_labels": {"severity": "critical", "component": "cvdeploy", "instance": "b"}}],
        "CvdeployDriftMonitorSkipping": [{"exp_labels": {"severity": "info", "component": "cvdeploy", "instance": "b"}}],
    }
    absent = {"input_series": [_series("cvdeploy_server_ready", {"instance": "a"}, "1x40")],
              "interval": "1m", "alert_rule_test": [{"eval_time": "30m", "alertname": "CvdeployModelAbsent",
                                                     "exp_alerts": _expected(("", crit))}]}
    doc = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [
        {"interval": "1m", "input_series": series,
         "alert_rule_test": [{"eval_time": "30m", "alertname": a, "exp_alerts": exp} for a, exp in tests.items()]},
        absent]}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    p = subprocess.run([PROMTOOL, "test", "rules", "test.yaml"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    doc["tests"][0]["alert_rule_test"][0]["exp_alerts"] = []  # the same run must fail when an alert that fires is not expected
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    assert subprocess.run([PROMTOOL, "test", "rules", "test.yaml"], capture_output=True, timeout=120, cwd=tmp_path).returncode != 0


@needs_promtool
def test_an_alert_renders_its_annotations(timed_bundle: Bundle, tmp_path: Path) -> None:
    files = write_monitoring({MODEL: timed_bundle}, tmp_path / "mon")
    rule = next(r for g in yaml.safe_load(files.rules.read_text())["groups"] for r in g["rules"] if r["alert"] == "CvdeployDriftAlert")
    doc = {"rule_files": [str(files.rules)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": [_series("cvdeploy_drift_alert", {"model": MODEL, "version": "3"}, "1x30")],
        "alert_rule_test": [{"eval_time": "20m", "alertname": "CvdeployDriftAlert", "exp_alerts": [{
            "exp_labels": {"severity": "warning", "component": "cvdeploy", "model": MODEL, "version": "3"},
            "exp_annotations": {"summary": f"{MODEL} version 3: the server reports drift",
                                "description": rule["annotations"]["description"]}}]}]}]}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(doc))
    p = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "t.yaml")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
