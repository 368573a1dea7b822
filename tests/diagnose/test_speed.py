"""Slow-inference check: injected timings give the expected findings and fixes; a real measurement gives sane figures."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from cvdeploy.diagnose.environment import Cores, thread_settings
from cvdeploy.diagnose.speed import STAGES, SpeedFigures, diagnose_speed, measure_speed, speed_findings
from cvdeploy.errors import InputError

TWO_CORES = Cores(logical=2, physical=2, affinity=2)


def figures(**changes: object) -> SpeedFigures:
    """A healthy deployment: warm start, engine-bound, threads within the cores, tuned here."""
    base = SpeedFigures(
        variant="onnx-fp32", variant_reason="no variant is 10 % faster", engine="onnxruntime",
        provider="CPUExecutionProvider", image_shape=(480, 640), input_shape=(1, 3, 480, 640), load_ms=120.0,
        first_ms=24.0, first_stages_ms={"decode": 1.5, "prepare": 1.0, "infer": 19.0, "finish": 2.5}, steady_ms=20.0,
        stages_ms={"decode": 1.0, "prepare": 1.0, "infer": 16.0, "finish": 2.0}, calls=50,
        threads=thread_settings("onnxruntime", 2, "tuned hint (bench tune)", cores=TWO_CORES, environ={}),
        variants=("onnx-fp32",), runnable=("onnx-fp32",), tuned={"cpu": "Test CPU", "tuned_ms": 15.0}, cpu="Test CPU")
    return replace(base, **changes)  # type: ignore[arg-type]


def warnings_of(f: SpeedFigures) -> list[str]:
    return [x.topic for x in speed_findings(f) if x.severity in ("serious", "warning")]


def test_healthy_figures_give_ok() -> None:
    out = speed_findings(figures())
    assert warnings_of(figures()) == []
    assert out[-1].severity == "ok" and out[-1].topic == "speed"
    assert next(f for f in out if f.topic == "infer").severity == "info"  # 80 % engine: a note on where to look


def test_cold_first_call_says_warm_up() -> None:
    f = figures(first_ms=800.0, first_stages_ms={"decode": 1.0, "prepare": 1.0, "infer": 796.0, "finish": 2.0})
    top = speed_findings(f)[0]
    assert top.topic == "warm-up" and top.severity == "warning" and top.likelihood == "high"
    assert "40.0x" in top.message and "infer" in top.message
    assert top.fix.startswith("warm up before serving")
    # a cold decoder is not covered by the server's engine warm-up: the fix says so
    cold_decode = figures(first_ms=200.0, first_stages_ms={"decode": 181.0, "prepare": 1.0, "infer": 16.0, "finish": 2.0})
    top = speed_findings(cold_decode)[0]
    assert top.topic == "warm-up" and "first request still pays for decode" in top.fix
    # 3x of a 2 ms request is no reason to warn
    tiny = figures(first_ms=6.0, steady_ms=2.0, stages_ms={"decode": 0.2, "prepare": 0.2, "infer": 1.4, "finish": 0.2})
    assert "warm-up" not in warnings_of(tiny)


def test_preprocessing_share_names_prepare() -> None:
    f = figures(steady_ms=20.0, stages_ms={"decode": 1.0, "prepare": 12.0, "infer": 6.0, "finish": 1.0},
                image_shape=(3000, 4000))
    top = speed_findings(f)[0]
    assert top.topic == "prepare" and top.severity == "warning" and top.likelihood == "high"
    assert "60%" in top.message and "4000x3000" in top.message and "640x480" in top.fix
    assert warnings_of(f) == ["prepare"]


def test_decode_and_nms_shares() -> None:
    f = figures(stages_ms={"decode": 8.0, "prepare": 1.0, "infer": 9.0, "finish": 2.0})
    assert warnings_of(f) == ["decode"]
    f = figures(stages_ms={"decode": 1.0, "prepare": 1.0, "infer": 10.0, "finish": 8.0}, conf=0.01)
    top = speed_findings(f)[0]
    assert top.topic == "finish" and "--conf" in top.fix and "0.01" in top.fix


def test_threads_over_cores() -> None:
    container = Cores(logical=64, physical=32, affinity=64, quota=2.0)
    f = figures(threads=thread_settings("onnxruntime", 0, "engine default", cores=container, environ={}))
    top = speed_findings(f)[0]
    assert top.topic == "threads" and top.severity == "warning" and top.likelihood == "high"
    assert "32 intra-op threads on 2 usable core(s)" in top.message and "quota" in top.message
    assert "--threads 2" in top.fix and "bench tune" in top.fix
    env = figures(threads=thread_settings("onnxruntime", 2, "asked for", cores=TWO_CORES, environ={"OMP_NUM_THREADS": "16"}))
    assert any(x.topic == "threads" and "OMP_NUM_THREADS=16" in x.message for x in speed_findings(env))
    assert warnings_of(env) == []


def test_a_faster_verified_variant_is_named() -> None:
    record = {"variants": {"onnx-fp32": 20.0, "onnx-int8": 9.0}, "how": "bench tune", "measured_at": "2026-01-01"}
    f = figures(variant_reason="asked for", variants=("onnx-fp32", "onnx-int8"), runnable=("onnx-fp32", "onnx-int8"),
                record=record)
    top = speed_findings(f)[0]
    assert top.topic == "variant" and "onnx-int8 ran 2.22x" in top.message and top.likelihood == "high"
    assert "asked for" in top.message
    unverified = replace(f, runnable=("onnx-fp32",))  # failed its parity (or no engine here): never proposed
    assert "variant" not in warnings_of(unverified)
    slower = replace(f, record={**record, "variants": {"onnx-fp32": 20.0}}, engine_record_ms=50.0)
    assert warnings_of(slower) == ["machine"]
    assert "2.5x" in next(x for x in speed_findings(slower) if x.topic == "machine").message
    nothing_here = figures(variants=("onnx-fp32", "onnx-int8"), other_machines=2)
    note = next(x for x in speed_findings(nothing_here) if x.topic == "variant")
    assert note.severity == "info" and "2 other machine(s)" in note.message


def test_input_size_against_sweep_and_budget() -> None:
    rec = {"model": "yolo11n", "imgsz": 480, "variant": "onnx-fp32", "map50_95": 0.61, "latency_ms": 11.0,
           "bundle": "out/yolo11n-480.cvd", "label": "yolo11n@480 onnx-fp32"}
    this = {"model": "yolo11n", "imgsz": 640, "variant": "onnx-fp32", "map50_95": 0.63, "latency_ms": 19.0,
            "bundle": "out/yolo11n-640.cvd", "label": "yolo11n@640 onnx-fp32"}
    f = figures(sweep={"path": "out/sweep.json", "recommendation": rec, "budget_ms": 15.0, "this": this})
    top = speed_findings(f)[0]
    assert top.topic == "input-size" and "yolo11n@480" in top.message and "out/yolo11n-480.cvd" in top.fix
    over = figures(budget_ms=10.0)
    finding = next(x for x in speed_findings(over) if x.topic == "input-size")
    assert finding.severity == "warning" and "--latency-budget 10ms" in finding.fix


def test_fixes_name_real_bench_commands() -> None:
    from cvdeploy.cli.bench import bench_app

    real = {c.name for c in bench_app.registered_commands}
    cases = [figures(), figures(first_ms=800.0), figures(threads=thread_settings("onnxruntime", 0, "engine default",
             cores=Cores(64, 32, 2), environ={})), figures(budget_ms=1.0), figures(tuned=None),
             figures(stages_ms={"decode": 1.0, "prepare": 12.0, "infer": 6.0, "finish": 1.0})]
    named = {m for f in cases for x in speed_findings(f) for m in re.findall(r"`cvdeploy bench ([^\s`]+)", x.fix)}
    assert named, "the fixes should point at bench subcommands"
    assert named <= real | {"BUNDLE"}, named - real


# -- the real measurement --------------------------------------------------------------------------


def test_measure_with_an_injected_clock_times_each_stage(demo_bundle: Path) -> None:
    ticks = itertools.count(0.0, 0.001)  # every clock reading is 1 ms after the previous one
    f = measure_speed(demo_bundle, seconds=0.005, min_calls=3, clock=lambda: next(ticks))
    assert f.calls >= 3
    assert all(f.stages_ms[s] == pytest.approx(1.0) for s in STAGES)
    assert f.first_ms == pytest.approx(4.0) and f.steady_ms == pytest.approx(4.0)


def test_real_measurement_on_the_demo_bundle(demo_bundle: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"budget_ms": 50.0, "points": [{"bundle": str(demo_bundle), "imgsz": 256}],
                                 "recommendation": {"bundle": str(demo_bundle), "imgsz": 256, "variant": "onnx-fp32"}}))
    report = diagnose_speed(demo_bundle, seconds=0.5, min_calls=3, sweep=sweep)
    f = report.figures
    values = [f.load_ms, f.first_ms, f.steady_ms, *f.stages_ms.values(), *f.first_stages_ms.values()]
    assert all(math.isfinite(v) and v > 0 for v in values), values
    assert set(f.stages_ms) == set(STAGES) and f.calls >= 3
    assert 0 < f.share("infer") < 1 and f.end_to_end_ms > 0
    assert f.image_shape == (480, 640) and len(f.input_shape) == 4
    assert f.threads.effective >= 1 and f.threads.cores.usable >= 1
    assert f.sweep is not None and f.sweep["this"] is not None
    assert report.findings and {x.severity for x in report.findings} <= {"serious", "warning", "info", "ok"}
    json.dumps(report.to_dict())


def test_bad_arguments_are_input_errors(demo_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError):
        measure_speed(demo_bundle, seconds=0)
    with pytest.raises(InputError):
        measure_speed(demo_bundle, sweep=tmp_path / "missing.json")
