"""Engine tuning: search ONNX Runtime's session settings for the fastest on this machine.

Every candidate (ONNX Runtime's default among them) is timed in interleaved rounds, so machine
noise falls on all of them alike; the search's winner is the lowest median per request (batch 1
latency at concurrency 1, otherwise the lowest wall time per request with `concurrency` requests
in flight). The minimum of many noisy medians is biased low, so the winner is then confirmed
against the default in fresh interleaved rounds: those figures are the ones stored, and a winner
that is not faster there is not chosen.
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
from cvdeploy.runtime.onnxruntime import OrtOptions


def ov_candidates(cores: int | None = None) -> list[Any]:
    """OpenVINO: performance hint (LATENCY, THROUGHPUT) x inference threads (default, 1, all cores); the default first."""
    from cvdeploy.runtime.openvino import OvOptions

    cores = cores or os.cpu_count() or 1
    out = [OvOptions()]
    for hint in ("LATENCY", "THROUGHPUT"):
        for t in sorted({0, 1, cores}):
            o = OvOptions(hint=hint, num_threads=t)
            if o not in out:
                out.append(o)
    return out


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


def describe(o: Any) -> str:
    if not isinstance(o, OrtOptions):
        return f"OpenVINO {o.hint.lower()}, threads {o.num_threads or 'auto'}"
    inter = f", inter {o.inter_op_threads}" if o.execution_mode == "parallel" else ""
    return f"intra {o.intra_op_threads or 'auto'}{inter}, {o.execution_mode}, opt {o.graph_optimization}"


@dataclass(frozen=True)
class Trial:
    options: OrtOptions
    median_ms: float  # per request
    samples: int

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"settings": describe(self.options), "median_ms": round(self.median_ms, 3), "samples": self.samples,
                **asdict(self.options)}


@dataclass(frozen=True)
class TuneResult:
    trials: list[Trial]  # the search, fastest first
    default: Trial
    chosen: Trial  # the search's winner if the confirmation rounds found it faster than the default, else the default
    confirmed_default_ms: float  # the default in the confirmation rounds
    confirmed_ms: float  # the chosen settings in the same rounds

    @property
    def best(self) -> Trial:
        """The search's fastest (biased low: it is the minimum of noisy medians); see `chosen` for what is stored."""
        return self.trials[0]

    @property
    def speedup(self) -> float:
        """The chosen settings against the default, in the confirmation rounds (fresh samples, not the search's)."""
        return self.confirmed_default_ms / self.confirmed_ms if self.confirmed_ms > 0 else 1.0


Timer = Callable[[Any, Callable[[], float]], float]  # (options, measure once) -> ms; tests inject timings


def _time_once(engine: Any, feeds: dict[str, np.ndarray], concurrency: int, pool: ThreadPoolExecutor | None) -> float:
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
    confirm_rounds: int = 4,
    space: list[Any] | None = None,
    on_step: Callable[[str], None] | None = None,
    engine_kind: str = "onnxruntime",
    precision: str = "fp32",
    timer: Timer | None = None,
) -> TuneResult:
    """Time every candidate on `tensor` (already preprocessed, with the batch to tune for), then confirm the winner.

    `precision` is the variant's (OpenVINO runs at it whatever the candidate). `timer(options, measure)` returns the
    milliseconds of one measurement; by default it is `measure()` itself.
    """
    from cvdeploy.runtime import open_engine

    if concurrency < 1 or rounds < 1 or per_round < 1 or warmup < 0 or confirm_rounds < 1:
        raise InputError("tune needs concurrency, rounds, per_round and confirm_rounds >= 1 and warmup >= 0")
    if engine_kind == "openvino":
        from cvdeploy.runtime.openvino import OvOptions

        default: Any = OvOptions()
        space = space or ov_candidates()
    else:
        default = OrtOptions()
        space = space or candidates()
    if default not in space:
        space = [default, *space]
    engines = []
    for o in space:
        if on_step:
            on_step(f"load · {describe(o)}")
        engines.append(open_engine(model, engine_kind, o, precision=precision))
    feeds = {engines[0].inputs[0].name: tensor}
    time_one = timer or (lambda _o, measure: measure())
    try:
        with ThreadPoolExecutor(max_workers=concurrency) if concurrency > 1 else nullcontext() as pool:

            def measure(k: int, n: int) -> list[float]:
                return [time_one(space[k], lambda: _time_once(engines[k], feeds, concurrency, pool)) for _ in range(n)]

            for engine in engines:
                for _ in range(warmup):
                    _time_once(engine, feeds, concurrency, pool)
            samples: list[list[float]] = [[] for _ in space]
            for r in range(rounds):
                for k in range(len(space)):
                    if on_step:
                        on_step(f"round {r + 1}/{rounds} · {describe(space[k])}")
                    samples[k].extend(measure(k, per_round))
            trials = [Trial(o, float(np.median(s)), len(s)) for o, s in zip(space, samples, strict=True)]
            ranked = sorted(trials, key=lambda t: t.median_ms)
            base_k, best_k = space.index(default), space.index(ranked[0].options)
            confirm: dict[int, list[float]] = {base_k: [], best_k: []}
            for r in range(confirm_rounds):  # fresh samples: the search's minimum is biased low
                for k in (base_k, best_k) if r % 2 == 0 else (best_k, base_k):
                    if on_step:
                        on_step(f"confirm {r + 1}/{confirm_rounds} · {describe(space[k])}")
                    confirm[k].extend(measure(k, per_round))
    finally:
        for e in engines:
            e.close()
    base_ms, best_ms = float(np.median(confirm[base_k])), float(np.median(confirm[best_k]))
    base = trials[base_k]
    if best_k != base_k and best_ms < base_ms:
        return TuneResult(ranked, base, ranked[0], base_ms, best_ms)
    return TuneResult(ranked, base, base, base_ms, base_ms)  # the search winner did not hold up: keep the default


def hint_from(result: TuneResult, variant: str, *, batch: int, concurrency: int, cpu: str) -> RuntimeHint:
    """The chosen settings with the confirmation rounds' figures (never the search's biased minimum)."""
    o = result.chosen.options
    tuned_ms, default_ms = round(result.confirmed_ms, 3), round(result.confirmed_default_ms, 3)
    if not isinstance(o, OrtOptions):
        return RuntimeHint(variant=variant, engine="openvino", ov_hint=o.hint, ov_threads=o.num_threads, batch=batch,  # type: ignore[arg-type]
                           concurrency=concurrency, objective="latency" if concurrency == 1 and batch == 1 else "throughput",
                           tuned_ms=tuned_ms, default_ms=default_ms, cpu=cpu, tuned_at=datetime.now(UTC).isoformat(timespec="seconds"))
    return RuntimeHint(
        variant=variant, intra_op_threads=o.intra_op_threads, inter_op_threads=o.inter_op_threads,
        execution_mode=o.execution_mode, graph_optimization=o.graph_optimization,  # type: ignore[arg-type]
        batch=batch, concurrency=concurrency, objective="latency" if concurrency == 1 and batch == 1 else "throughput",
        tuned_ms=tuned_ms, default_ms=default_ms, cpu=cpu, tuned_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
