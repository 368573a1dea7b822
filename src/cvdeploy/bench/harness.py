"""Timing harness: warmup kept apart from steady state, percentiles, stage times, CPU and memory.

Three things can be measured on the same images and settings, so that their figures compare:

- ``engine``: the engine alone (``session.run`` on a tensor already preprocessed);
- ``sequential``: the Predictor end to end (JPEG bytes in, boxes out), one request after another;
- ``pipelined``: the same with ``concurrency`` requests in flight through the async Predictor,
  so that decoding, preprocessing and postprocessing of one request overlap engine work of another.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cvdeploy.errors import InputError
from cvdeploy.vision.result import STAGES

MODES = ("engine", "sequential", "pipelined")


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds: count, mean, p50/p90/p99, min, max."""

    n: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> LatencyStats:
        if not samples_ms:
            raise InputError("no samples to summarize")
        a = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(len(a), float(a.mean()), float(p50), float(p90), float(p99), float(a.min()), float(a.max()))

    def to_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Warmup:
    """The calls made before measuring: the first one pays for allocation, lazy init and cold caches."""

    samples_ms: list[float]

    @property
    def first_ms(self) -> float | None:
        return self.samples_ms[0] if self.samples_ms else None

    def to_dict(self, steady_p50: float) -> dict[str, Any]:
        first = self.first_ms
        return {"calls": len(self.samples_ms), "first_ms": None if first is None else round(first, 3),
                "samples_ms": [round(s, 3) for s in self.samples_ms],
                "first_over_steady_p50": None if first is None or steady_p50 <= 0 else round(first / steady_p50, 2)}


@dataclass(frozen=True)
class Resources:
    cpu_percent: float  # process CPU time / wall time (200 = two cores busy)
    cpu_cores: int
    peak_rss_mb: float  # the process's high-water mark so far

    def to_dict(self) -> dict[str, float | int]:
        return {"cpu_percent": round(self.cpu_percent, 1), "cpu_cores": self.cpu_cores, "peak_rss_mb": round(self.peak_rss_mb, 1)}


class _ResourceMeter:
    def __enter__(self) -> _ResourceMeter:
        self._r0 = resource.getrusage(resource.RUSAGE_SELF)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = max(time.perf_counter() - self._t0, 1e-9)
        cpu = (r1.ru_utime - self._r0.ru_utime) + (r1.ru_stime - self._r0.ru_stime)
        rss_kb = r1.ru_maxrss / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux
        self.result = Resources(100.0 * cpu / wall, os.cpu_count() or 1, rss_kb / 1024.0)


@dataclass
class BenchResult:
    """One measured configuration."""

    mode: str
    batch: int
    concurrency: int
    warmup: Warmup
    latency: LatencyStats  # per request (a request carries `batch` images)
    throughput: float  # images per second over the steady-state wall time
    wall_s: float
    resources: Resources
    stages: dict[str, LatencyStats] = field(default_factory=dict)  # per request, summed over its images

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "batch": self.batch, "concurrency": self.concurrency,
            "warmup": self.warmup.to_dict(self.latency.p50),
            "latency_ms": self.latency.to_dict(),
            "throughput_ips": round(self.throughput, 2), "wall_s": round(self.wall_s, 3),
            "stages_ms": {k: v.to_dict() for k, v in self.stages.items()},
            **self.resources.to_dict(),
        }


def _check_counts(warmup: int, iterations: int | None, duration: float | None) -> None:
    if warmup < 0:
        raise InputError(f"warmup must be >= 0, got {warmup}")
    if iterations is None and duration is None:
        raise InputError("give a number of iterations or a duration")
    if iterations is not None and iterations < 1:
        raise InputError(f"iterations must be >= 1, got {iterations}")
    if duration is not None and duration <= 0:
        raise InputError(f"duration must be > 0 seconds, got {duration}")


def measure(
    fn: Callable[[int], Any],
    *,
    warmup: int = 3,
    iterations: int | None = 50,
    duration: float | None = None,
    on_step: Callable[[], None] | None = None,
) -> tuple[Warmup, list[float], list[Any], float, Resources]:
    """Call ``fn(i)`` `warmup` times unmeasured, then `iterations` times (or for `duration` seconds).

    Returns the warmup timings, the steady-state timings (ms), what fn returned in steady state,
    the steady-state wall time and the resources used during it. Warmup calls are never in the
    steady-state samples.
    """
    _check_counts(warmup, iterations, duration)
    warm = []
    for i in range(warmup):
        t0 = time.perf_counter()
        fn(i)
        warm.append((time.perf_counter() - t0) * 1000.0)
    samples: list[float] = []
    outputs: list[Any] = []
    with _ResourceMeter() as meter:
        start = time.perf_counter()
        i = 0
        while (iterations is None or i < iterations) and (duration is None or time.perf_counter() - start < duration):
            t0 = time.perf_counter()
            outputs.append(fn(warmup + i))
            samples.append((time.perf_counter() - t0) * 1000.0)
            i += 1
            if on_step:
                on_step()
        wall = time.perf_counter() - start
    return Warmup(warm), samples, outputs, wall, meter.result


def _stage_stats(per_request: list[dict[str, float]]) -> dict[str, LatencyStats]:
    keys = [k for k in ("queue", *(s for s in STAGES if s != "queue")) if any(k in r for r in per_request)]
    return {k: LatencyStats.of([r.get(k, 0.0) for r in per_request]) for k in keys}


def _request_stages(results: Sequence[Any]) -> dict[str, float]:
    """Per-request stage times: per-image timings summed (batched stages were shared out per image). The Predictor
    waits in no queue; the pipelined mode measures its own queue wait, which this must not overwrite."""
    return {s: sum(getattr(r.timings, s) for r in results) for s in STAGES if s != "queue"}


def bench_engine(predictor: Any, images: Sequence[bytes], *, batch: int = 1, warmup: int = 3,
                 iterations: int | None = 50, duration: float | None = None,
                 on_step: Callable[[], None] | None = None) -> BenchResult:
    """The engine alone on tensors the Predictor preprocessed beforehand (the raw figure)."""
    from cvdeploy.vision.image import load_image

    tensors = []
    for k in range(max(1, min(len(images) // batch, 8))):
        chunk = [load_image(b) for b in _take(images, k * batch, batch)]
        tensors.append(predictor.preprocess(chunk)[0])
    warm, samples, _, wall, res = measure(lambda i: predictor.infer(tensors[i % len(tensors)]), warmup=warmup,
                                          iterations=iterations, duration=duration, on_step=on_step)
    return BenchResult("engine", batch, 1, warm, LatencyStats.of(samples), batch * len(samples) / wall, wall, res,
                       {"infer": LatencyStats.of(samples)})


def bench_sequential(predictor: Any, images: Sequence[bytes], *, batch: int = 1, warmup: int = 3,
                     iterations: int | None = 50, duration: float | None = None,
                     on_step: Callable[[], None] | None = None) -> BenchResult:
    """The Predictor end to end, one request (of `batch` encoded images) after another."""

    def call(i: int) -> Any:
        chunk = list(_take(images, i * batch, batch))
        return predictor.predict(chunk)

    warm, samples, outputs, wall, res = measure(call, warmup=warmup, iterations=iterations, duration=duration, on_step=on_step)
    stages = _stage_stats([_request_stages(r) for r in outputs])
    return BenchResult("sequential", batch, 1, warm, LatencyStats.of(samples), batch * len(samples) / wall, wall, res, stages)


def bench_pipelined(predictor: Any, images: Sequence[bytes], *, batch: int = 1, concurrency: int = 4, warmup: int = 3,
                    iterations: int | None = 50, duration: float | None = None,
                    on_step: Callable[[], None] | None = None) -> BenchResult:
    """`concurrency` requests in flight through worker threads (ONNX Runtime releases the GIL while it runs).

    Latency is per request, from submission to result, so it includes the time a request waits
    for a free worker (reported as the ``queue`` stage).
    """
    if concurrency < 1:
        raise InputError(f"concurrency must be >= 1, got {concurrency}")
    _check_counts(warmup, iterations, duration)
    return asyncio.run(_pipelined(predictor, images, batch, concurrency, warmup, iterations, duration, on_step))


async def _pipelined(predictor: Any, images: Sequence[bytes], batch: int, concurrency: int, warmup: int,
                     iterations: int | None, duration: float | None, on_step: Callable[[], None] | None) -> BenchResult:
    from concurrent.futures import ThreadPoolExecutor

    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="cvdeploy-bench")

    def work(i: int) -> tuple[float, Any]:
        started = time.perf_counter()
        return started, predictor.predict(list(_take(images, i * batch, batch)))

    async def one(i: int) -> tuple[float, float, Any]:
        submitted = time.perf_counter()
        started, results = await loop.run_in_executor(pool, work, i)
        return submitted, started, results

    try:
        warm = []
        for i in range(warmup):  # warm every worker's path once, sequentially, and time it
            s, _, _ = await one(i)
            warm.append((time.perf_counter() - s) * 1000.0)
        records: list[tuple[float, float, float, Any]] = []
        counter = iter(range(warmup, sys.maxsize))
        issued = 0
        with _ResourceMeter() as meter:
            start = time.perf_counter()

            async def worker() -> None:
                nonlocal issued
                while True:
                    if iterations is not None and issued >= iterations:
                        return
                    if duration is not None and time.perf_counter() - start >= duration:
                        return
                    issued += 1
                    i = next(counter)
                    submitted, started, results = await one(i)
                    records.append((submitted, started, time.perf_counter(), results))
                    if on_step:
                        on_step()

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall = time.perf_counter() - start
    finally:
        pool.shutdown(wait=True)
    samples = [(done - sub) * 1000.0 for sub, _, done, _ in records]
    stages = _stage_stats([{"queue": (st - sub) * 1000.0, **_request_stages(r)} for sub, st, _, r in records])
    return BenchResult("pipelined", batch, concurrency, Warmup(warm), LatencyStats.of(samples),
                       batch * len(records) / wall, wall, meter.result, stages)


def _take(items: Sequence[Any], start: int, n: int) -> list[Any]:
    return [items[(start + k) % len(items)] for k in range(n)]
