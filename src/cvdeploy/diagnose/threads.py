"""Cores and engine threads: the CPUs this process may use (affinity mask, cgroup quota) and the threads an engine runs
with there, for the environment diff and the speed check."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cvdeploy.bundle.manifest import Manifest

__all__ = ["THREAD_VARIABLES", "Cores", "ThreadSettings", "bundle_threads", "cores_here", "predictor_threads", "thread_settings"]

# Read by OpenMP/BLAS runtimes, by ONNX Runtime builds that honour them, and by OpenVINO's threading.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_INTRA_OP_NUM_THREADS",
                    "ORT_INTER_OP_NUM_THREADS")


@dataclass(frozen=True)
class Cores:
    """The CPUs this process can use: the machine's, its affinity mask and its cgroup quota (containers)."""

    logical: int  # os.cpu_count(): the machine's, even inside a container
    physical: int  # distinct cores in /proc/cpuinfo: ONNX Runtime's default thread pool size
    affinity: int  # CPUs this process may run on (taskset, cpuset)
    quota: float | None = None  # cgroup CPU limit in CPUs (docker --cpus, Kubernetes limits); None: none

    @property
    def usable(self) -> int:
        """Cores' worth of CPU this process can get: the affinity mask, capped by the quota."""
        cap = self.affinity if self.quota is None else min(self.affinity, max(1, math.ceil(self.quota - 1e-9)))
        return max(1, cap)

    def to_dict(self) -> dict[str, Any]:
        return {"logical": self.logical, "physical": self.physical, "affinity": self.affinity, "quota": self.quota,
                "usable": self.usable}


def _cgroup_quota() -> float | None:
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.is_file():
            parts = v2.read_text().split()  # "max 100000" or "200000 100000": quota and period in microseconds
            return None if not parts or parts[0] == "max" else int(parts[0]) / int(parts[1] if len(parts) > 1 else 100000)
        v1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        if v1.is_file():
            quota_us = int(v1.read_text())
            period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError, ZeroDivisionError):
        return None  # an unreadable or odd cgroup file: no quota known
    return None


def _physical_cores(logical: int) -> int:
    cores, phys = set(), "0"
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return logical
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or logical


def cores_here() -> Cores:
    """This process's view of the CPU (Linux reads affinity and cgroup limits; elsewhere the core count)."""
    logical = os.cpu_count() or 1
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return Cores(logical=logical, physical=_physical_cores(logical), affinity=affinity, quota=_cgroup_quota())


@dataclass(frozen=True)
class ThreadSettings:
    """The engine threads the Predictor runs with, against the cores it can use and the thread variables set."""

    engine: str  # onnxruntime or openvino
    configured: int  # what the session was asked for; 0: the engine's default
    source: str  # "tuned hint (bench tune)", "asked for", "engine default"
    effective: int  # what the engine runs with: `configured`, or the engine's default rule applied to this machine
    cores: Cores
    variables: dict[str, str] = field(default_factory=dict)  # THREAD_VARIABLES that are set

    @property
    def oversubscribed(self) -> bool:
        return self.effective > self.cores.usable

    def describe(self) -> str:
        asked = f"{self.configured}" if self.configured else "0 (the engine's default"
        rule = "" if self.configured else (
            f": one per physical core, {self.effective} here)" if self.engine == "onnxruntime"
            else f": about {self.effective} here)")
        env = ", ".join(f"{k}={v}" for k, v in self.variables.items()) or "no thread variable set"
        quota = "" if self.cores.quota is None else f", cgroup quota {self.cores.quota:g}"
        return (f"{self.engine} threads {asked}{rule}, {self.source}; {self.cores.usable} usable core(s) "
                f"({self.cores.logical} logical, affinity {self.cores.affinity}{quota}); {env}")

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "configured": self.configured, "source": self.source, "effective": self.effective,
                "oversubscribed": self.oversubscribed, "cores": self.cores.to_dict(), "variables": self.variables}


def thread_settings(engine: str, configured: int, source: str, *, cores: Cores | None = None,
                    environ: Mapping[str, str] | None = None) -> ThreadSettings:
    """Thread facts for an engine asked for `configured` threads (0: its default). ONNX Runtime's default is one thread
    per physical core of the machine, blind to affinity masks and cgroup quotas (a container limited to 2 CPUs on a
    64-core host gets a 32-thread pool); OpenVINO's follows the cores the process may run on. `cores` and `environ`
    default to this machine's (tests inject them)."""
    c = cores or cores_here()
    env = os.environ if environ is None else environ
    variables = {k: env[k] for k in THREAD_VARIABLES if env.get(k)}
    if configured:
        effective = configured
    elif engine == "onnxruntime":
        effective = c.physical
    else:
        effective = min(c.physical, c.affinity)
    return ThreadSettings(engine, configured, source, max(1, effective), c, variables)


def predictor_threads(predictor: Any, *, cores: Cores | None = None, environ: Mapping[str, str] | None = None,
                      asked: bool = False) -> ThreadSettings:
    """The thread settings of an open Predictor, read from its engine's public options."""
    variant = predictor.bundle.manifest.variants[predictor.variant]
    options = predictor.engine.options
    configured = int(getattr(options, "intra_op_threads", getattr(options, "num_threads", 0)) or 0)
    hint = predictor.bundle.runtime_hint(predictor.variant)
    if asked:
        source = "asked for"
    elif hint is not None:
        source = "tuned hint (bench tune)" if configured else "tuned hint (bench tune): the engine's default"
    else:
        source = "engine default"
    return thread_settings(variant.engine, configured, source, cores=cores, environ=environ)


def bundle_threads(manifest: Manifest, variant: str, threads: int | None = None, *, cores: Cores | None = None,
                   environ: Mapping[str, str] | None = None) -> ThreadSettings:
    """The thread settings a Predictor of `variant` would run with, from the bundle's tuned hint (or `threads`, as
    `serve --threads` passes it), without opening an engine."""
    v = manifest.variants[variant]
    hint = next((h for h in manifest.runtime if h.variant == variant), None)
    if threads is not None:
        return thread_settings(v.engine, threads, "asked for", cores=cores, environ=environ)
    if hint is not None:
        n = hint.ov_threads if v.engine == "openvino" else hint.intra_op_threads
        return thread_settings(v.engine, n, "tuned hint (bench tune)" if n else "tuned hint (bench tune): the engine's default",
                               cores=cores, environ=environ)
    return thread_settings(v.engine, 0, "engine default", cores=cores, environ=environ)
