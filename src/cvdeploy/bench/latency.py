"""Interleaved batch-1 latency of a bundle's variants on this machine: the record the Predictor chooses variants from."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cvdeploy.bundle.manifest import LatencyRecord
from cvdeploy.errors import BundleError, InputError

# label -> (model path or bytes, engine kind, variant precision)
Models = Mapping[str, tuple[Any, str, str]]
Timer = Callable[[str, Callable[[], object]], float]


def _wall_ms(_label: str, call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1000.0


def interleaved_latency(models: Models, tensor: np.ndarray, *, rounds: int = 6, per_round: int = 5, warmup: int = 3,
                        options: Mapping[str, Any] | None = None, timer: Timer = _wall_ms) -> dict[str, float]:
    """Median milliseconds per run of each model on `tensor`, timed in interleaved rounds so that machine noise hits
    all alike. `options` may give engine options per engine kind (e.g. the same thread count for every engine).
    `timer` measures one call (tests inject timings through it)."""
    from cvdeploy.runtime import open_engine

    if rounds < 1 or per_round < 1 or warmup < 0:
        raise InputError("latency needs rounds and per_round >= 1 and warmup >= 0")
    engines = {label: open_engine(model, kind, (options or {}).get(kind), precision=precision)
               for label, (model, kind, precision) in models.items()}
    try:
        feeds = {label: {e.inputs[0].name: tensor} for label, e in engines.items()}
        for label, e in engines.items():
            for _ in range(warmup):
                e.run(feeds[label])
        samples: dict[str, list[float]] = {label: [] for label in engines}
        for r in range(rounds):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))  # nobody always runs first
            for label in order:
                e, f = engines[label], feeds[label]
                samples[label].extend(timer(label, lambda e=e, f=f: e.run(f)) for _ in range(per_round))
    finally:
        for e in engines.values():
            e.close()
    return {label: float(np.median(v)) for label, v in samples.items()}


def variant_models(bundle: Any, names: Sequence[str]) -> dict[str, tuple[Any, str, str]]:
    m = bundle.manifest
    missing = [n for n in names if n not in m.variants]
    if missing:
        raise InputError(f"bundle {bundle.name!r} has no variant {', '.join(missing)} (it has {', '.join(m.variants)})")
    encrypted = [n for n in names if m.variants[n].encryption]
    if encrypted:
        raise InputError(f"variant(s) {', '.join(encrypted)} are encrypted: time the bundle before `cvdeploy protect`")
    return {n: (bundle.variant_path(n), m.variants[n].engine, m.variants[n].precision) for n in names}


def runnable_here(bundle: Any) -> list[str]:
    """The verified variants whose engine is installed here (FP16 and bf16 only where they have native support)."""
    from cvdeploy.bundle.environment import BF16_FLAGS, cpu_info

    flags = set(cpu_info().get("flags", []))  # type: ignore[arg-type]
    out = []
    for name, v in bundle.manifest.variants.items():
        if v.parity is not None and not v.parity.passed:
            continue
        if v.engine == "openvino" and not _has_openvino():
            continue
        if v.engine in ("ncnn", "litert"):
            from cvdeploy.edge.runner import engine_installed

            if not engine_installed(v.engine):
                continue
        if v.precision == "bf16" and not flags & BF16_FLAGS:
            continue
        out.append(name)
    return out


def _has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def measure_here(bundle: Any, names: Sequence[str] | None = None, *, tensor: np.ndarray | None = None, how: str = "",
                 rounds: int = 6, per_round: int = 5, timer: Timer = _wall_ms) -> LatencyRecord:
    """Time `names` (default: every verified variant runnable here) interleaved at batch 1 on this machine."""
    from cvdeploy.bundle.environment import cpu_info, machine_id

    names = list(names) if names is not None else runnable_here(bundle)
    if tensor is None:
        golden = next(bundle.golden(), None)
        if golden is None:
            raise BundleError(f"bundle {bundle.name!r} has no golden input to time the variants on")
        tensor = golden.input[:1]
    cpu = cpu_info()
    medians = interleaved_latency(variant_models(bundle, names), tensor, rounds=rounds, per_round=per_round, timer=timer)
    return LatencyRecord(machine=machine_id(cpu), cpu=str(cpu.get("model", "")), flags=list(cpu.get("flags", [])),  # type: ignore[call-overload]
                         variants={n: round(ms, 3) for n, ms in medians.items()}, input_shape=list(tensor.shape), how=how,
                         measured_at=datetime.now(UTC).isoformat(timespec="seconds"))


def store_record(manifest: Any, record: LatencyRecord) -> None:
    """Keep one record per machine: the newest replaces that machine's older one."""
    manifest.latencies = [r for r in manifest.latencies if r.machine != record.machine] + [record]

