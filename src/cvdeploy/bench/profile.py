"""Op-level profile with ONNX Runtime's profiler: the top nodes and op types by time, and the raw trace.

The trace is Chrome trace-event JSON: open it in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.errors import InputError
from cvdeploy.runtime.onnxruntime import OrtOptions, _ort, resolve_providers, session_options


@dataclass(frozen=True)
class NodeTime:
    name: str
    op_type: str
    ms_per_run: float
    share: float  # of all node time, 0-1
    calls: int = 1  # nodes of this op type (op-type rows)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op_type": self.op_type, "ms_per_run": round(self.ms_per_run, 4),
                "share": round(self.share, 4), "calls": self.calls}


@dataclass(frozen=True)
class OpProfile:
    runs: int
    nodes: list[NodeTime]  # every node, slowest first
    op_types: list[NodeTime]  # aggregated by op type, slowest first
    node_ms_per_run: float  # the sum over nodes (kernel time), per run
    trace: Path | None

    def top(self, k: int) -> tuple[list[NodeTime], list[NodeTime]]:
        return self.nodes[:k], self.op_types[:k]

    def to_dict(self, k: int = 10) -> dict[str, Any]:
        nodes, ops = self.top(k)
        return {"runs": self.runs, "node_ms_per_run": round(self.node_ms_per_run, 4),
                "top_nodes": [n.to_dict() for n in nodes], "top_op_types": [o.to_dict() for o in ops],
                "trace": None if self.trace is None else str(self.trace)}


def parse_trace(events: list[dict[str, Any]], skip_runs: int = 0) -> tuple[int, dict[str, tuple[str, float]]]:
    """Total kernel microseconds per node from an ONNX Runtime trace, leaving out the first `skip_runs` runs."""
    runs = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(runs) <= skip_runs:
        raise InputError(f"the trace has {len(runs)} run(s); cannot skip {skip_runs} warmup run(s)")
    kept_from = runs[skip_runs][0]
    totals: dict[str, list[Any]] = defaultdict(lambda: ["", 0.0])
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time") or e["ts"] < kept_from:
            continue
        name = e["name"][: -len("_kernel_time")]
        totals[name][0] = e.get("args", {}).get("op_name", "?")
        totals[name][1] += float(e.get("dur", 0))
    return len(runs) - skip_runs, {k: (v[0], v[1]) for k, v in totals.items()}


def profile_onnx(
    model: str | os.PathLike[str],
    feeds: dict[str, np.ndarray],
    *,
    runs: int = 20,
    warmup: int = 3,
    options: OrtOptions = OrtOptions(),
    trace_out: str | os.PathLike[str] | None = None,
) -> OpProfile:
    """Run `model` `warmup + runs` times with profiling on; summarize the measured runs."""
    if runs < 1 or warmup < 0:
        raise InputError(f"profile needs runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    ort = _ort()
    with tempfile.TemporaryDirectory(prefix="cvdeploy-profile-") as tmp:
        so = session_options(options)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(model), sess_options=so, providers=resolve_providers(
            list(options.providers) if options.providers else None))
        for _ in range(warmup + runs):
            session.run(None, feeds)
        raw = Path(session.end_profiling())
        events = json.loads(raw.read_text())
        trace = None
        if trace_out is not None:
            trace = Path(trace_out)
            trace.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(raw, trace)
    measured, totals = parse_trace(events, skip_runs=warmup)
    all_us = sum(us for _, us in totals.values()) or 1.0
    nodes = sorted((NodeTime(name, op, us / 1000.0 / measured, us / all_us) for name, (op, us) in totals.items()),
                   key=lambda n: -n.ms_per_run)
    by_op: dict[str, list[float]] = defaultdict(list)
    for _, (op, us) in totals.items():
        by_op[op].append(us)
    op_types = sorted((NodeTime(op, op, sum(v) / 1000.0 / measured, sum(v) / all_us, len(v)) for op, v in by_op.items()),
                      key=lambda n: -n.ms_per_run)
    return OpProfile(measured, nodes, op_types, all_us / 1000.0 / measured, trace)


def profile_openvino(model: str | os.PathLike[str], feeds: dict[str, np.ndarray], *, runs: int = 20, warmup: int = 3,
                     hint: str = "LATENCY", trace_out: str | os.PathLike[str] | None = None) -> OpProfile:
    """OpenVINO's per-layer performance counters (PERF_COUNT), summed over `runs` measured inferences.

    `trace_out` receives the counters as JSON (layer, type, execution type, microseconds per run).
    """
    if runs < 1 or warmup < 0:
        raise InputError(f"profile needs runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    from cvdeploy.runtime.openvino import _ov

    ov = _ov()
    compiled = ov.Core().compile_model(str(model), "CPU", {"PERFORMANCE_HINT": hint, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    for _ in range(warmup):
        request.infer(feeds)
    totals: dict[str, list[Any]] = defaultdict(lambda: ["", "", 0.0])
    for _ in range(runs):
        request.infer(feeds)
        for info in request.get_profiling_info():
            us = info.real_time.total_seconds() * 1e6
            if us <= 0:
                continue
            t = totals[info.node_name]
            t[0], t[1] = info.node_type, info.exec_type
            t[2] += us
    all_us = sum(v[2] for v in totals.values()) or 1.0
    nodes = sorted((NodeTime(name, f"{v[0]} ({v[1]})", v[2] / 1000.0 / runs, v[2] / all_us) for name, v in totals.items()),
                   key=lambda n: -n.ms_per_run)
    by_op: dict[str, list[float]] = defaultdict(list)
    for v in totals.values():
        by_op[v[0]].append(v[2])
    op_types = sorted((NodeTime(op, op, sum(v) / 1000.0 / runs, sum(v) / all_us, len(v)) for op, v in by_op.items()),
                      key=lambda n: -n.ms_per_run)
    trace = None
    if trace_out is not None:
        trace = Path(trace_out)
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text(json.dumps([{"layer": n.name, "type": n.op_type, "us_per_run": round(n.ms_per_run * 1000, 2)}
                                     for n in nodes], indent=1))
    return OpProfile(runs, nodes, op_types, all_us / 1000.0 / runs, trace)
