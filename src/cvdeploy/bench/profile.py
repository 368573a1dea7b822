"""Op-level profile with ONNX Runtime's profiler: the top nodes and op types by time, and the raw trace.

The trace is Chrome trace-event JSON: open it in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json
import os
import re
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
                     hint: str = "LATENCY", trace_out: str | os.PathLike[str] | None = None, precision: str = "fp32") -> OpProfile:
    """OpenVINO's per-layer performance counters (PERF_COUNT), summed over `runs` measured inferences.

    `precision` is the variant's: the float precision is pinned to it as when the variant is served.

    `trace_out` receives the counters as JSON (layer, type, execution type, microseconds per run).
    """
    if runs < 1 or warmup < 0:
        raise InputError(f"profile needs runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    from cvdeploy.runtime.openvino import VARIANT_PRECISION, _ov

    ov = _ov()
    compiled = ov.Core().compile_model(str(model), "CPU", {"PERFORMANCE_HINT": hint, "PERF_COUNT": True,
                                                           "INFERENCE_PRECISION_HINT": VARIANT_PRECISION[precision]})
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


def median_profile(profiles: list[OpProfile]) -> OpProfile:
    """One profile from several rounds of the same model: each node's median time per run over the rounds
    (profiles of two variants taken in alternating rounds then see the same machine noise)."""
    if not profiles:
        raise InputError("median_profile needs at least one profile")
    import statistics

    per_node: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for p in profiles:
        for n in p.nodes:
            per_node[n.name].append(n.ms_per_run)
            ops[n.name] = n.op_type
    rounds = len(profiles)
    med = {k: statistics.median(v + [0.0] * (rounds - len(v))) for k, v in per_node.items()}
    total = sum(med.values()) or 1.0
    nodes = sorted((NodeTime(k, ops[k], ms, ms / total) for k, ms in med.items()), key=lambda n: -n.ms_per_run)
    by_op: dict[str, list[float]] = defaultdict(list)
    for k, ms in med.items():
        by_op[ops[k]].append(ms)
    op_types = sorted((NodeTime(op, op, sum(v), sum(v) / total, len(v)) for op, v in by_op.items()), key=lambda n: -n.ms_per_run)
    return OpProfile(sum(p.runs for p in profiles), nodes, op_types, total, None)


# -- two variants side by side -----------------------------------------------------------------------

_BLOCK = re.compile(r"^(/model\.\d+)/")
# Suffixes ONNX Runtime's graph optimizations append to the node they fuse or rewrite.
_FUSION_SUFFIX = re.compile(r"(_token_\d+|_output_0_nchwc|_nchwc|/QuickGeluFusion/?|_quant)+$")
CATEGORIES = ("convolution", "activation", "elementwise", "quantize/dequantize", "layout", "other")
_CATEGORY_OF = {
    "convolution": {"Conv", "FusedConv", "QLinearConv", "ConvInteger", "NhwcFusedConv", "Convolution", "GroupConvolution",
                    "ConvolutionBackpropData"},
    "activation": {"Sigmoid", "QLinearSigmoid", "QuickGelu", "Swish", "Relu", "LeakyRelu", "QLinearLeakyRelu", "HardSwish",
                   "HardSigmoid", "Gelu", "Softmax", "QLinearSoftmax", "SoftMax"},
    "elementwise": {"Add", "Mul", "Sub", "Div", "QLinearAdd", "QLinearMul", "Eltwise", "Multiply"},
    "quantize/dequantize": {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "FakeQuantize"},
    "layout": {"ReorderInput", "ReorderOutput", "Reorder", "Transpose", "Reshape", "Concat", "QLinearConcat",
               "Concatenation", "Split", "Squeeze", "Unsqueeze"},
}


def category(op_type: str) -> str:
    """The kind of work an op does (ONNX Runtime op types and OpenVINO layer types)."""
    op = op_type.split(" (")[0]  # OpenVINO rows read "Convolution (jit_avx2_I8)"
    return next((c for c, ops in _CATEGORY_OF.items() if op in ops), "other")


def layer_of(node: str) -> str:
    """The source layer a profiled node belongs to: the Ultralytics block (/model.N) when the names carry it."""
    if m := _BLOCK.match(node):
        return m.group(1)
    return _FUSION_SUFFIX.sub("", node)


@dataclass(frozen=True)
class LayerComparison:
    """Kernel time per run of two profiles of the same model (A, then B), by layer and by kind of op."""

    labels: tuple[str, str]
    layers: list[tuple[str, float, float]]  # (layer, ms A, ms B), slowest in A first
    categories: dict[str, tuple[float, float]]
    totals: tuple[float, float]

    def speedup(self, what: str | None = None) -> float:
        """How many times faster B runs `what` (a category, or everything) than A; inf when B spends nothing."""
        a, b = self.totals if what is None else self.categories.get(what, (0.0, 0.0))
        return a / b if b > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.labels[0], "b": self.labels[1], "total_ms": [round(x, 4) for x in self.totals],
                "categories": {k: [round(a, 4), round(b, 4)] for k, (a, b) in self.categories.items()},
                "layers": [{"layer": n, "ms_a": round(a, 4), "ms_b": round(b, 4)} for n, a, b in self.layers]}


def compare_profiles(a: OpProfile, b: OpProfile, labels: tuple[str, str] = ("A", "B")) -> LayerComparison:
    """Match two profiles node by node through their source layers (fusions rename and merge nodes)."""
    per_layer: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    per_cat: dict[str, list[float]] = {c: [0.0, 0.0] for c in CATEGORIES}
    for k, prof in enumerate((a, b)):
        for n in prof.nodes:
            per_layer[layer_of(n.name)][k] += n.ms_per_run
            per_cat[category(n.op_type)][k] += n.ms_per_run
    layers = sorted(((name, t[0], t[1]) for name, t in per_layer.items()), key=lambda r: -max(r[1], r[2]))
    return LayerComparison(labels, layers, {c: (v[0], v[1]) for c, v in per_cat.items() if v[0] or v[1]},
                           (a.node_ms_per_run, b.node_ms_per_run))


def profile_variant(bundle: Any, variant: str, feeds: dict[str, np.ndarray], *, runs: int = 20, threads: int = 0,
                    trace_out: str | os.PathLike[str] | None = None) -> OpProfile:
    """Profile one variant of a bundle with its own engine's profiler (ONNX Runtime, or OpenVINO's counters)."""
    v = bundle.manifest.variants[variant]
    if v.encryption:
        raise InputError(f"variant {variant} is encrypted: profile the bundle before `cvdeploy protect`")
    path = bundle.variant_path(variant)
    if v.engine == "openvino":
        return profile_openvino(path, feeds, runs=runs, trace_out=trace_out, precision=v.precision)
    return profile_onnx(path, feeds, runs=runs, options=OrtOptions(intra_op_threads=threads), trace_out=trace_out)


def profile_pair(bundle: Any, a: str, b: str, feeds: dict[str, np.ndarray], *, rounds: int = 5, runs: int = 10, threads: int = 0,
                 on_step: Any = None) -> tuple[LayerComparison, list[float]]:
    """Variants `a` and `b` profiled in alternating rounds (a b, b a, ...) so that the machine's drift hits both alike;
    returns their comparison over per-node medians and the convolution speed-up of each round."""
    if rounds < 1:
        raise InputError(f"rounds must be >= 1, got {rounds}")
    got: dict[str, list[OpProfile]] = {a: [], b: []}
    for r in range(rounds):
        for v in (a, b) if r % 2 == 0 else (b, a):
            if on_step:
                on_step(f"round {r + 1}/{rounds} · {v} · {runs} runs")
            got[v].append(profile_variant(bundle, v, feeds, runs=runs, threads=threads))
    per_round = [compare_profiles(got[a][r], got[b][r]).speedup("convolution") for r in range(rounds)]
    return compare_profiles(median_profile(got[a]), median_profile(got[b]), labels=(a, b)), per_round
