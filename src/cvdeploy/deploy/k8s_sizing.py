"""A pod's resources and probe budgets, sized from what the bundles record (`size_for`; docs/deploy.md shows the
figures for the demo bundle):

    memory  = baseline 192 MiB (Python, NumPy, OpenCV, ONNX Runtime, the server: 160-200 MiB measured idle)
              + per model version: 2 x its largest ONNX variant (the file, and the session's copy of the weights)
              + per instance and version: max_batch x the input tensor's bytes x 8 (activations, measured with YOLO11n)
              + the request budget (`--max-inflight-mb`, given to the server so that it answers 503 before the pod
                would be killed for memory)
              rounded up to 64 MiB; requests = limits (Guaranteed QoS: evicted last; whole CPUs can be pinned).
    cpu     = the engine threads the recorded latency was measured with (the `bench tune` hint, else the build
              machine's cores), at most 4; requests = limits, and the server gets `--threads` to match: ONNX Runtime
              otherwise starts one thread per core of the node, not of the pod, and is throttled.
    startup = 20 s + 1 s per 20 MiB of weights (hash check, session) + warm-up (2 runs at batch 1 and at max_batch per
              instance, at 3 x the recorded latency: the node may be slower), at least 30 s: the startup probe's budget.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cvdeploy.deploy import ModelSource
from cvdeploy.errors import InputError

BASELINE_MIB = 192
ACTIVATION_FACTOR = 8
MAX_CPU = 4


class Sizing(BaseModel):
    """Pod resources and probe budgets derived from the bundles; `notes` say where each figure came from."""

    model_config = ConfigDict(extra="forbid")

    cpu: int = Field(ge=1)
    memory_mib: int = Field(ge=64)
    inflight_mib: int = Field(ge=1)
    startup_s: int = Field(ge=1)
    latency_ms: float | None = None  # the first model's default variant, batch 1, as recorded
    expected_rps: float | None = None  # per pod at batch 1 on a machine like the one that measured
    notes: list[str] = Field(default_factory=list)

    @property
    def threads(self) -> int:
        return self.cpu

    def resources(self) -> dict[str, Any]:
        both = {"cpu": str(self.cpu), "memory": f"{self.memory_mib}Mi"}
        return {"requests": dict(both), "limits": dict(both)}


def size_for(source: ModelSource, *, cpu: int | None = None, memory_mib: int | None = None, inflight_mib: int = 256,
             max_batch: int = 8, instances: int = 1, warmup_runs: int = 2) -> Sizing:
    """The pod's resources for serving `source` (see the module's docstring for the formulas)."""
    notes: list[str] = []
    weights = 0
    activations = 0
    for b in source.bundles:
        m = b.manifest
        onnx = [v for v in m.variants.values() if v.format == "onnx"]
        biggest = max((v.size_bytes + _companion_bytes(b, v) for v in onnx), default=0)
        h, w = m.preprocess.imgsz
        weights += biggest
        activations += instances * max_batch * 3 * h * w * 4 * ACTIVATION_FACTOR
    model_mib = math.ceil((2 * weights + activations) / 2**20)
    needed = BASELINE_MIB + model_mib + inflight_mib
    notes.append(f"memory: {BASELINE_MIB} MiB baseline + {model_mib} MiB for the models (2 x {weights / 2**20:.1f} MiB of "
                 f"weights, activations for batches of {max_batch} x {instances} instance(s)) + {inflight_mib} MiB of "
                 "requests in flight")
    mem = memory_mib if memory_mib is not None else 64 * math.ceil(needed / 64)
    if memory_mib is not None:
        notes.append(f"memory: {memory_mib} MiB as given (the estimate was {needed} MiB)")
    if mem < needed:
        raise InputError(f"--memory-mb {mem} is below what the models need ({needed} MiB with {inflight_mib} MiB of requests "
                         "in flight): raise it, or lower --max-inflight-mb or --max-batch")

    first = source.bundles[0]
    latency_ms, measured_threads, how = _recorded_latency(first)
    if cpu is None:
        if measured_threads:
            cpu = min(MAX_CPU, measured_threads)
            notes.append(f"cpu: {cpu}, the threads {first.name}'s latency was measured with ({how}; at most {MAX_CPU})")
        else:
            cpu = 2
            notes.append("cpu: 2, a default: the bundle records no latency measurement to size from (`cvdeploy bench tune`)")
    else:
        notes.append(f"cpu: {cpu} as given")
    if cpu % instances:
        raise InputError(f"--cpu {cpu} does not split evenly among {instances} instances")
    load_s = weights / 2**20 / 20
    warm_s = 0.0
    expected = None
    if latency_ms is not None:
        warm_s = len(source.bundles) * instances * warmup_runs * (1 + max_batch) * latency_ms * 3 / 1000
        expected = round(instances * 1000 / latency_ms, 1)
        notes.append(f"latency: {latency_ms:.2f} ms at batch 1 ({how}); about {expected} requests/s per pod at batch 1 on "
                     "such a machine")
    else:
        notes.append("latency: none recorded in the bundle (`cvdeploy bench tune` records it); the startup budget assumes "
                     "a quick warm-up")
        warm_s = 10.0
    startup = max(30, math.ceil(20 + load_s + warm_s))
    notes.append(f"startup: {startup} s for the startup probe (20 s + {load_s:.1f} s loading + {warm_s:.1f} s warming up)")
    return Sizing(cpu=cpu, memory_mib=mem, inflight_mib=inflight_mib, startup_s=startup, latency_ms=latency_ms,
                  expected_rps=expected, notes=notes)


def _companion_bytes(bundle: Any, variant: Any) -> int:
    if not variant.companions or bundle.root is None:
        return 0
    base = (bundle.root / variant.file).parent
    return sum((base / name).stat().st_size for name in variant.companions if (base / name).is_file())


def _recorded_latency(bundle: Any) -> tuple[float | None, int | None, str]:
    """(ms at batch 1 of the default variant, the engine threads it ran with, how it was measured), newest first:
    the tuned hint, else the newest latency record (measured with the engine's default: one thread per core)."""
    m = bundle.manifest
    hint = bundle.runtime_hint(m.default_variant)
    if hint is not None and hint.intra_op_threads > 0:
        return hint.tuned_ms, hint.intra_op_threads, f"`bench tune` on {hint.cpu or 'the tuning machine'}"
    record = next((r for r in reversed(m.latencies) if m.default_variant in r.variants), None)
    if record is None:
        return None, None, "nothing recorded"
    cpu = m.environment.get("cpu")
    cores = cpu.get("logical_cpus") if isinstance(cpu, dict) else None
    cores = cores if isinstance(cores, int) and cores > 0 else None
    return record.variants[m.default_variant], cores, f"{record.how or 'measured'} on {record.cpu or 'the build machine'}, " \
        f"{cores or 'an unknown number of'} cores, the engine's default threads"
