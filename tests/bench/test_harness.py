"""The timing harness: warmup kept apart, exact request counts, stage times, a real ONNX Runtime profile."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cvdeploy.bench.harness import LatencyStats, bench_engine, bench_pipelined, bench_sequential, measure
from cvdeploy.bench.profile import parse_trace, profile_onnx
from cvdeploy.errors import InputError
from cvdeploy.predict import Predictor


def test_warmup_calls_are_reported_apart_and_never_in_the_percentiles() -> None:
    calls = []

    def fn(i: int) -> int:
        calls.append(i)
        if i == 0:
            time.sleep(0.2)  # a cold first call, as engines have
        return i

    warm, samples, outputs, wall, res = measure(fn, warmup=2, iterations=7)
    assert calls == list(range(9)) and outputs == list(range(2, 9))  # steady state starts after the warmup calls
    assert len(warm.samples_ms) == 2 and warm.first_ms >= 200
    assert len(samples) == 7 and max(samples) < warm.first_ms  # the slow first call is not in the steady samples
    stats = LatencyStats.of(samples)
    assert stats.p50 < warm.first_ms and stats.n == 7
    assert warm.to_dict(stats.p50)["first_over_steady_p50"] > 1
    assert wall > 0 and res.peak_rss_mb > 0 and res.cpu_cores >= 1


def test_duration_mode_and_bad_counts() -> None:
    _, samples, _, wall, _ = measure(lambda i: time.sleep(0.01), warmup=0, iterations=None, duration=0.1)
    assert 1 <= len(samples) <= 11 and wall >= 0.1
    for kw in ({"iterations": 0}, {"warmup": -1}, {"iterations": None, "duration": None}, {"iterations": None, "duration": 0}):
        with pytest.raises(InputError):
            measure(lambda i: None, **kw)


def test_percentiles() -> None:
    s = LatencyStats.of([float(x) for x in range(1, 101)])
    assert (s.min, s.max, s.n) == (1.0, 100.0, 100) and s.p50 == pytest.approx(50.5) and s.p99 == pytest.approx(99.01)
    with pytest.raises(InputError):
        LatencyStats.of([])


@pytest.fixture(scope="module")
def jpegs(shapes_data: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((shapes_data / "images" / "val").glob("*.jpg"))[:6]]


def test_engine_sequential_and_pipelined_on_a_real_bundle(demo_bundle: Path, jpegs: list[bytes]) -> None:
    with Predictor(demo_bundle) as p:
        eng = bench_engine(p, jpegs, warmup=1, iterations=4)
        seq = bench_sequential(p, jpegs, batch=2, warmup=1, iterations=4)
        pipe = bench_pipelined(p, jpegs, concurrency=3, warmup=1, iterations=5)
    assert eng.latency.n == 4 and set(eng.stages) == {"infer"}
    assert seq.latency.n == 4 and seq.batch == 2 and set(seq.stages) == {"decode", "preprocess", "infer", "postprocess"}
    assert pipe.latency.n == 5 and pipe.concurrency == 3 and "queue" in pipe.stages  # exactly the asked request count
    for r in (eng, seq, pipe):
        assert r.throughput > 0 and r.latency.p50 > 0 and len(r.warmup.samples_ms) == 1
        d = r.to_dict()
        assert json.loads(json.dumps(d)) == d
    # a request's stages add up to no more than its end-to-end latency (plus rounding)
    assert seq.stages["infer"].p50 <= seq.latency.p50 * 1.05
    with pytest.raises(InputError, match="concurrency"):
        bench_pipelined(p, jpegs, concurrency=0, iterations=1)


def test_op_profile_of_a_real_model(demo_bundle: Path, tmp_path: Path, jpegs: list[bytes]) -> None:
    from cvdeploy.vision.image import load_image

    with Predictor(demo_bundle) as p:
        tensor, _ = p.preprocess([load_image(jpegs[0])])
        feeds = {p.engine.inputs[0].name: tensor}
        path = p.bundle.variant_path()
    prof = profile_onnx(path, feeds, runs=3, warmup=1, trace_out=tmp_path / "t" / "trace.json")
    assert prof.runs == 3 and prof.nodes and prof.op_types[0].op_type == "Conv"  # convolutions dominate a YOLO
    assert sum(n.share for n in prof.nodes) == pytest.approx(1.0)
    assert sum(o.calls for o in prof.op_types) == len(prof.nodes)
    assert [n.ms_per_run for n in prof.nodes] == sorted((n.ms_per_run for n in prof.nodes), reverse=True)
    events = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert any(e.get("cat") == "Node" for e in events)
    assert len(prof.to_dict(k=4)["top_nodes"]) == 4


def test_parse_trace_leaves_out_warmup_runs() -> None:
    def run(ts: int) -> list[dict]:
        return [{"cat": "Session", "name": "model_run", "ts": ts, "dur": 100},
                {"cat": "Node", "name": "conv_kernel_time", "ts": ts + 1, "dur": 10 if ts else 1000, "args": {"op_name": "Conv"}}]

    runs, totals = parse_trace(run(0) + run(200) + run(400), skip_runs=1)
    assert runs == 2 and totals == {"conv": ("Conv", 20.0)}
    with pytest.raises(InputError, match="cannot skip"):
        parse_trace(run(0), skip_runs=1)


def test_compare_profiles_matches_fused_nodes_through_their_layers() -> None:
    from cvdeploy.bench.profile import NodeTime, OpProfile, category, compare_profiles, layer_of

    assert layer_of("/model.5/conv/Conv_token_75") == layer_of("/model.5/conv/Conv_output_0_nchwc") == "/model.5"
    assert layer_of("ReorderOutput_token_3") == "ReorderOutput"
    assert category("QLinearConv") == category("Convolution (jit_avx2_I8)") == "convolution"
    assert category("DequantizeLinear") == "quantize/dequantize" and category("NonMaxSuppression") == "other"

    def prof(*nodes: tuple[str, str, float]) -> OpProfile:
        rows = [NodeTime(n, op, ms, 0.0) for n, op, ms in nodes]
        return OpProfile(1, rows, [], sum(r.ms_per_run for r in rows), None)

    a = prof(("/model.0/conv/Conv_output_0_nchwc", "Conv", 2.0), ("/model.0/act/Mul/QuickGeluFusion/", "QuickGelu", 1.0))
    b = prof(("/model.0/conv/Conv_token_1", "QLinearConv", 1.0), ("/model.0/act/Sigmoid_token_2", "QLinearSigmoid", 0.5),
             ("/model.0/act/Mul_token_3", "QLinearMul", 0.5), ("/model.1/DequantizeLinear", "DequantizeLinear", 1.0))
    c = compare_profiles(a, b, ("fp32", "int8"))
    assert c.layers[0] == ("/model.0", 3.0, 2.0) and ("/model.1", 0.0, 1.0) in c.layers
    assert c.speedup("convolution") == 2.0 and c.categories["quantize/dequantize"] == (0.0, 1.0)
    assert c.speedup() == 1.0 and c.to_dict()["total_ms"] == [3.0, 3.0]


def test_median_profile_takes_each_nodes_median_over_rounds() -> None:
    from cvdeploy.bench.profile import NodeTime, OpProfile, median_profile

    def prof(**ms: float) -> OpProfile:
        rows = [NodeTime(n, "Conv", t, 0.0) for n, t in ms.items()]
        return OpProfile(10, rows, [], sum(ms.values()), None)

    m = median_profile([prof(a=1.0, b=5.0), prof(a=9.0, b=4.0), prof(a=2.0)])  # b missing once: counted as 0 there
    times = {n.name: n.ms_per_run for n in m.nodes}
    assert times == {"a": 2.0, "b": 4.0} and m.node_ms_per_run == 6.0 and m.runs == 30
    assert m.op_types[0].calls == 2 and m.op_types[0].ms_per_run == 6.0
