"""Engine tuning: search ONNX Runtime's session settings for the fastest on this machine.

Every candidate (ONNX Runtime's default among them) is timed in interleaved rounds, so machine
noise falls on all of them alike; the winner is the lowest median per request (batch 1 latency
at concurrency 1, otherwise the lowest wall time per request with `concurrency` requests in flight).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cvdeploy.bundle.manifest import RuntimeHint
from cvdeploy.errors import InputError
from cvdeploy.runtime.onnxruntime import OrtEngine, OrtOptions


def candidates(cores: int | None = None) -> list[OrtOptions]:
    """The search space: intra-op threads (default, 1 .. cores), sequential or parallel execution,
    inter-op threads for parallel mode, and the graph optimization level. The default comes first."""
    cores = cores or os.cpu_count() or 1
    threads = sorted({1, cores, max(1, cores // 2)})
    out = [OrtOptions()]
    for opt in ("basic", "extended", "all"):
        for intra in threads:
            out.append(OrtOptions(intra_op_threads=intra, graph_optimization=opt))
            for inter in sorted({1, 2}):
                out.append(OrtOptions(intra_op_threads=intra, inter_op_threads=inter, execution_mode="parallel", graph_optimization=opt))
    seen, unique = set(), []
    for o in out:
        if o not in seen:
            seen.add(o)
            unique.append(o)
    return unique


def describe(o: OrtOptions) -> str:
    inter = f", inter {o.inter_op_threads}" if o.execution_mode == "parallel" else ""
    return f"intra {o.intra_op_threads or 'auto'}{inter}, {o.execution_mode}, opt {o.graph_optimization}"


@dataclass(frozen=True)
class Trial:
    options: OrtOptions
    median_ms: float  # per request
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"settings": describe(self.options), "median_ms": round(self.median_ms, 3), "samples": self.samples,
                "intra_op_threads": self.options.intra_op_threads, "inter_op_threads": self.options.inter_op_threads,
                "execution_mode": self.options.execution_mode, "graph_optimization": self.options.graph_optimization}


@dataclass(frozen=True)
class TuneResult:
    trials: list[Trial]  # fastest first
    default: Trial

    @property
    def best(self) -> Trial:
        return self.trials[0]

    @property
    def speedup(self) -> float:
        return self.default.median_ms / self.best.median_ms if self.best.median_ms > 0 else 1.0


def _time_once(engine: OrtEngine, feeds: dict[str, np.ndarray], concurrency: int, pool: ThreadPoolExecutor | None) -> float:
    """Milliseconds per request: one run, or `concurrency` runs in flight divided by their number."""
    t0 = time.perf_counter()
    if pool is None:
        engine.run(feeds)
        return (time.perf_counter() - t0) * 1000.0
    list(pool.map(lambda _: engine.run(feeds), range(concurrency)))
    return (time.perf_counter() - t0) * 1000.0 / concurrency


def tune(
    model: str | os.PathLike[str],
    tensor: np.ndarray,
    *,
    concurrency: int = 1,
    rounds: int = 5,
    per_round: int = 3,
    warmup: int = 2,
    space: list[OrtOptions] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> TuneResult:
    """Time every candidate on `tensor` (already preprocessed, with the batch to tune for)."""
    if concurrency < 1 or rounds < 1 or per_round < 1 or warmup < 0:
        raise InputError("tune needs concurrency, rounds and per_round >= 1 and warmup >= 0")
    space = space or candidates()
    if OrtOptions() not in space:
        space = [OrtOptions(), *space]
    engines = []
    for o in space:
        if on_step:
            on_step(f"load · {describe(o)}")
        engine = OrtEngine(model, o)
        engines.append(engine)
    feeds = {engines[0].inputs[0].name: tensor}
    samples: list[list[float]] = [[] for _ in space]
    with ThreadPoolExecutor(max_workers=concurrency) if concurrency > 1 else nullcontext() as pool:
        for engine in engines:
            for _ in range(warmup):
                _time_once(engine, feeds, concurrency, pool)
        for r in range(rounds):
            for k, engine in enumerate(engines):
                if on_step:
                    on_step(f"round {r + 1}/{rounds} · {describe(space[k])}")
                samples[k].extend(_time_once(engine, feeds, concurrency, pool) for _ in range(per_round))
    for e in engines:
        e.close()
    trials = [Trial(o, float(np.median(s)), len(s)) for o, s in zip(space, samples, strict=True)]
    default = next(t for t in trials if t.options == OrtOptions())
    return TuneResult(sorted(trials, key=lambda t: t.median_ms), default)


def hint_from(result: TuneResult, variant: str, *, batch: int, concurrency: int, cpu: str) -> RuntimeHint:
    o = result.best.options
    return RuntimeHint(
        variant=variant, intra_op_threads=o.intra_op_threads, inter_op_threads=o.inter_op_threads,
        execution_mode=o.execution_mode, graph_optimization=o.graph_optimization,  # type: ignore[arg-type]
        batch=batch, concurrency=concurrency, objective="latency" if concurrency == 1 and batch == 1 else "throughput",
        tuned_ms=round(result.best.median_ms, 3), default_ms=round(result.default.median_ms, 3), cpu=cpu,
        tuned_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
