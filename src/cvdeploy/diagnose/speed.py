"""Slow-inference check: where a request's time goes on this machine, measured in a few seconds, and what to do about it.

    diagnose_speed(bundle_dir)          -> SpeedReport: measure_speed (the figures) + speed_findings (the verdicts)
    speed_findings(figures)             -> [Finding], pure: tests inject the timings

What is measured is what is served: one request is the Predictor's own public stages (decode, prepare, infer, finish)
on encoded images, timed apart. The figures: the first call of a fresh Predictor against the steady median (warm-up),
each stage's share of end to end (the engine against what cvdeploy adds around it), the engine threads against the
cores this process may use, the variant served against the fastest verified variant timed on this machine
(`manifest.latencies`), the engine now against that record, and the input size against a `bench sweep`
recommendation when one sits next to the bundle. Each finding's fix names the `cvdeploy bench` command that measures
it properly (the doctor only samples; bench measures). See docs/environment-diff.md and docs/slow-inference.md.

This module measures; the verdicts are `speed_rules` (re-exported here).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvdeploy.diagnose.finding import Finding
from cvdeploy.diagnose.speed_rules import (
    ENGINE_BOUND,
    SLOWER_THAN_RECORDED,
    STAGE_INFO,
    STAGE_WARNING,
    STAGES,
    VARIANT_GAIN,
    WARMUP_MIN_EXTRA_MS,
    WARMUP_RATIO,
    SpeedFigures,
    speed_findings,
)
from cvdeploy.diagnose.threads import predictor_threads
from cvdeploy.errors import CvdeployError, InputError

__all__ = [
    "ENGINE_BOUND",
    "SLOWER_THAN_RECORDED",
    "STAGES",
    "STAGE_INFO",
    "STAGE_WARNING",
    "VARIANT_GAIN",
    "WARMUP_MIN_EXTRA_MS",
    "WARMUP_RATIO",
    "SpeedFigures",
    "SpeedReport",
    "diagnose_speed",
    "measure_speed",
    "speed_findings",
]


# -- the measurement -------------------------------------------------------------------------------


@dataclass
class SpeedReport:
    figures: SpeedFigures
    findings: list[Finding] = field(default_factory=list)

    @property
    def top(self) -> Finding | None:
        return self.findings[0] if self.findings else None

    def to_dict(self) -> dict[str, Any]:
        return {"figures": self.figures.to_dict(), "findings": [f.to_dict() for f in self.findings]}


def _default_images() -> list[bytes]:
    """One camera-like 640x480 JPEG scene: decode and letterbox costs as a deployment would see them."""
    import cv2

    from cvdeploy.demo.shapes import ShapesConfig, iter_scenes

    scene = next(iter_scenes(13, "test", 1, ShapesConfig(min_side=480, max_side=480, min_aspect=4 / 3, max_aspect=4 / 3)))
    ok, buf = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
        raise CvdeployError("speed check: could not encode the sample image")
    return [buf.tobytes()]


def _one_call(predictor: Any, source: Any, clock: Callable[[], float]) -> tuple[float, dict[str, float], Any]:
    """One request through the public stages, each timed: (end to end ms, stage ms, the prepared tensor)."""
    t0 = clock()
    image = predictor.decode(source)
    t1 = clock()
    prepared = predictor.prepare([image])
    t2 = clock()
    outputs = predictor.infer_all(prepared.tensor)
    t3 = clock()
    predictor.finish(prepared, outputs)
    t4 = clock()
    stages = {"decode": (t1 - t0) * 1e3, "prepare": (t2 - t1) * 1e3, "infer": (t3 - t2) * 1e3, "finish": (t4 - t3) * 1e3}
    return (t4 - t0) * 1e3, stages, (image.shape[:2], prepared.tensor.shape)


def _find_sweep(root: Path | None, sweep: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """A `bench sweep` result about this bundle: the given sweep.json, or the one `bench sweep` wrote next to it."""
    path = Path(sweep) if sweep is not None else (root.parent / "sweep.json" if root is not None else None)
    if path is None or not path.is_file():
        if sweep is not None:
            raise InputError(f"sweep result not found: {path}")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not a `cvdeploy bench sweep` result ({e})") from None
    if not isinstance(data, dict) or "points" not in data:
        raise InputError(f"{path} is not a `cvdeploy bench sweep` result (no points)")
    here = root.resolve() if root is not None else None

    def same(p: dict[str, Any]) -> bool:
        b = p.get("bundle")
        return here is not None and b is not None and Path(b).resolve() == here

    this = [p for p in data.get("points", []) if isinstance(p, dict) and same(p)]
    if sweep is None and not this:
        return None  # a sweep.json beside the bundle that is not about it
    return {"path": str(path), "recommendation": data.get("recommendation"), "budget_ms": data.get("budget_ms"),
            "this": this[0] if this else None}


def measure_speed(
    path: str | os.PathLike[str],
    *,
    variant: str | None = None,
    images: Sequence[Any] | None = None,
    threads: int | None = None,
    seconds: float = 2.0,
    min_calls: int = 5,
    max_calls: int = 200,
    sweep: str | os.PathLike[str] | None = None,
    budget_ms: float | None = None,
    model_key: bytes | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> SpeedFigures:
    """Measure a bundle on this machine for about `seconds` (at least `min_calls` steady calls, at most `max_calls`):
    a fresh Predictor (as it would serve: its own variant choice, the bundle's tuned threads, or `threads`), its first
    call, two warm-up calls, then steady calls through the public stages on `images` (paths, bytes or arrays; default:
    one generated 640x480 JPEG). `sweep`: a `bench sweep` sweep.json (default: one beside the bundle, if it covers it)."""
    from cvdeploy.bench.latency import runnable_here
    from cvdeploy.bundle import Bundle
    from cvdeploy.bundle.environment import cpu_info, machine_id
    from cvdeploy.predict import Predictor

    if seconds <= 0 or min_calls < 1 or max_calls < min_calls:
        raise InputError("speed check: needs seconds > 0 and 1 <= min_calls <= max_calls")
    if budget_ms is not None and budget_ms <= 0:
        raise InputError(f"latency budget must be > 0 ms, got {budget_ms:g}")
    bundle = Bundle.load(path)
    sweep_found = _find_sweep(bundle.root, sweep)  # a bad sweep path fails before anything is measured
    sources = list(images) if images else _default_images()
    t0 = clock()
    predictor = Predictor(bundle, variant, threads=threads, model_key=model_key)
    load_ms = (clock() - t0) * 1e3
    try:
        first_ms, first_stages, (image_shape, input_shape) = _one_call(predictor, sources[0], clock)
        for k in range(2):  # warm-up: kept out of the steady figures, as bench does
            _one_call(predictor, sources[(k + 1) % len(sources)], clock)
        totals: list[float] = []
        per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
        start = clock()
        while len(totals) < max_calls and (len(totals) < min_calls or clock() - start < seconds):
            ms, stages, _ = _one_call(predictor, sources[len(totals) % len(sources)], clock)
            totals.append(ms)
            for s, v in stages.items():
                per_stage[s].append(v)
        cpu = cpu_info()
        here = machine_id(cpu)
        m = bundle.manifest
        record = next((r for r in reversed(m.latencies) if r.machine == here), None)
        engine_record_ms = None
        golden = next(bundle.golden(), None)
        if record is not None and golden is not None and list(golden.input[:1].shape) == list(record.input_shape):
            x = golden.input[:1]
            try:
                predictor.infer(x)  # the golden shape may be new to this session: one untimed run
                runs = []
                for _ in range(5):
                    t = clock()
                    predictor.infer(x)
                    runs.append((clock() - t) * 1e3)
                engine_record_ms = statistics.median(runs)
            except InputError:  # a fixed-size graph that does not take the golden shape
                engine_record_ms = None
        threads_now = predictor_threads(predictor, asked=threads is not None)
        hint = bundle.runtime_hint(predictor.variant)
        figures = SpeedFigures(
            variant=predictor.variant, variant_reason=predictor.variant_reason,
            engine=m.variants[predictor.variant].engine, provider=predictor.engine.provider,
            image_shape=(int(image_shape[0]), int(image_shape[1])), input_shape=tuple(int(d) for d in input_shape),
            load_ms=load_ms, first_ms=first_ms, first_stages_ms=first_stages,
            steady_ms=statistics.median(totals), stages_ms={s: statistics.median(v) for s, v in per_stage.items()},
            calls=len(totals), threads=threads_now, conf=predictor.options.conf, variants=tuple(m.variants),
            runnable=tuple(runnable_here(bundle)),
            record=None if record is None else record.model_dump(mode="json", include={"variants", "input_shape", "how",
                                                                                       "measured_at", "cpu"}),
            other_machines=sum(r.machine != here for r in m.latencies), engine_record_ms=engine_record_ms,
            tuned=None if hint is None else hint.model_dump(mode="json", include={"cpu", "tuned_ms", "default_ms",
                                                                                 "intra_op_threads", "tuned_at"}),
            cpu=str(cpu.get("model", "")), sweep=sweep_found, budget_ms=budget_ms)
    finally:
        predictor.close()
    if not all(math.isfinite(v) and v >= 0 for v in (figures.first_ms, figures.steady_ms, *figures.stages_ms.values())):
        raise CvdeployError("speed check: the clock gave a negative or non-finite time")  # pragma: no cover
    return figures


def diagnose_speed(path: str | os.PathLike[str], **options: Any) -> SpeedReport:
    """The slow-inference step of `cvdeploy doctor`: `measure_speed(path, **options)` judged by `speed_findings`."""
    figures = measure_speed(path, **options)
    return SpeedReport(figures, speed_findings(figures))
