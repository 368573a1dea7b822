"""Environment diff: the bundle's recorded build environment against this machine, each difference ranked by how likely it
is to move the model's results, with the golden-parity verdict of `cvdeploy verify` next to it.

    diagnose_environment(bundle_dir)                      -> EnvironmentReport (runs verify_bundle, reads this machine)
    compare_environment(manifest, here, checks, served)   -> [Finding], the pure ranking (tests inject every input)

What the ranking rests on (see docs/environment-diff.md):

- Golden parity re-runs each variant's engine on the stored golden tensors here. It covers the engine, its kernels and
  the CPU, not decoding or resizing (the golden inputs are tensors already letterboxed). So a difference parity covers
  is a warning while parity holds here and serious, named as the likely cause, when it fails; a difference in
  preprocessing libraries (OpenCV) stays a warning whatever parity says, because parity cannot see it.
- Likelihood ranks the differences: a minor or major version change of the engine that serves the model, a precision or
  execution-provider change, or VNNI lost under an INT8 variant are high; OpenCV (resize, JPEG decode), numpy 1 -> 2
  (type promotion), cvdeploy minor versions and engine changes under variants that are not served are medium;
  patch versions, Python, thread counts and fp32 kernels picked by other CPU flags are low.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cvdeploy.bundle.environment import BF16_FLAGS, VNNI_FLAGS

if TYPE_CHECKING:
    from cvdeploy.bundle.manifest import Manifest, Variant
    from cvdeploy.evaluate.verify import VariantCheck

__all__ = [
    "BUILD_ONLY",
    "LIKELIHOOD_ORDER",
    "SEVERITY_ORDER",
    "THREAD_VARIABLES",
    "Cores",
    "EnvironmentReport",
    "Finding",
    "Likelihood",
    "Severity",
    "ThreadSettings",
    "bundle_threads",
    "compare_environment",
    "cores_here",
    "diagnose_environment",
    "predictor_threads",
    "rank",
    "thread_settings",
    "version_change",
]

Severity = Literal["serious", "warning", "info", "ok"]
Likelihood = Literal["high", "medium", "low", "none"]
SEVERITY_ORDER: dict[str, int] = {"serious": 0, "warning": 1, "info": 2, "ok": 3}
LIKELIHOOD_ORDER: dict[str, int] = {"high": 0, "medium": 1, "low": 2, "none": 3}

# Used to make the bundle (export, golden outputs), never to run it: recorded, shown, not compared.
BUILD_ONLY = ("torch", "torchvision", "ultralytics", "onnx")
OPENCV = ("opencv-python-headless", "opencv-python")
ENGINE_PACKAGE = {"onnxruntime": "onnxruntime", "openvino": "openvino"}  # variant engine -> the package that runs it
# Read by OpenMP/BLAS runtimes, by ONNX Runtime builds that honour them, and by OpenVINO's threading.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_INTRA_OP_NUM_THREADS",
                    "ORT_INTER_OP_NUM_THREADS")
FP32_KERNEL_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "neon", "asimd"})


@dataclass(frozen=True)
class Finding:
    """One doctor finding: how bad (severity), how likely the difference moves results (likelihood), what and why
    (message, one line), what to do (fix) and the figures behind it (evidence)."""

    severity: Severity
    likelihood: Likelihood
    topic: str  # what differs or was checked: "onnxruntime", "opencv-python-headless", "cpu-flags", "parity", ...
    message: str
    fix: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "likelihood": self.likelihood, "topic": self.topic, "message": self.message,
                "fix": self.fix, "evidence": self.evidence}


def rank(findings: Iterable[Finding]) -> list[Finding]:
    """Serious first, then by likelihood; findings of equal rank keep the order they were made in (the served variant's
    first)."""
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], LIKELIHOOD_ORDER[f.likelihood]))


# -- versions --------------------------------------------------------------------------------------


_RELEASE = re.compile(r"^\s*v?(\d+(?:\.\d+)*)")


def _release(version: str) -> tuple[int, ...]:
    m = _RELEASE.match(version)
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def version_change(built: str | None, here: str | None) -> str | None:
    """How `built` -> `here` changed: "major", "minor", "patch" (any later release component, e.g. OpenCV's wheel
    build number), "build" (same release, other suffix: "+cu130", "rc1"), "added", "removed"; None when equal."""
    if built == here:
        return None
    if built is None:
        return "added"
    if here is None:
        return "removed"
    a, b = _release(built), _release(here)
    if not a or not b:
        return "major"  # an unparsable version: assume the worst
    a3, b3 = (*a, 0, 0)[:2], (*b, 0, 0)[:2]
    if a3[0] != b3[0]:
        return "major"
    if a3[1] != b3[1]:
        return "minor"
    pad = max(len(a), len(b))
    return "patch" if a + (0,) * (pad - len(a)) != b + (0,) * (pad - len(b)) else "build"


# -- cores and threads -----------------------------------------------------------------------------


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


# -- the comparison --------------------------------------------------------------------------------


def _packages(env: Mapping[str, Any]) -> dict[str, str]:
    p = env.get("packages", {})
    return {str(k): str(v) for k, v in p.items()} if isinstance(p, Mapping) else {}


def _flags(env: Mapping[str, Any]) -> set[str]:
    cpu = env.get("cpu", {})
    return {str(f) for f in cpu.get("flags", [])} if isinstance(cpu, Mapping) else set()


def _cpu_model(env: Mapping[str, Any]) -> str:
    cpu = env.get("cpu", {})
    return str(cpu.get("model", "")) if isinstance(cpu, Mapping) else ""


def _arrow(pkg: str, built: str | None, here: str | None) -> str:
    return f"{pkg} {built or '(absent)'} at build, {here or '(not installed)'} here"


@dataclass
class _Verdicts:
    """Golden parity per variant, as verify_bundle found it here (None: not run)."""

    checks: dict[str, VariantCheck]

    def failing(self, variants: Iterable[str]) -> list[str]:
        return [v for v in variants if v in self.checks and not self.checks[v].ok]

    def holding(self, variants: Iterable[str]) -> list[str]:
        return [v for v in variants if v in self.checks and self.checks[v].ok]

    def note(self, variants: Sequence[str]) -> str:
        """'golden parity holds here for a, b' / 'golden parity fails here for a' / '' when nothing was checked."""
        bad, good = self.failing(variants), self.holding(variants)
        if bad:
            worst = self.checks[bad[0]]
            return (f"golden parity fails here for {', '.join(bad)} (score difference {worst.max_abs_scores:.3g}, "
                    f"tolerance {worst.tolerance:g}): the likely cause")
        if good:
            return f"golden parity holds here for {', '.join(good)}, so the engine still agrees with the build on the golden set"
        return ""


def _severity(likelihood: Likelihood, covered: bool, failing: bool) -> Severity:
    """A difference golden parity covers is serious when parity fails on a variant it affects; otherwise likely
    differences warn and unlikely ones inform."""
    if covered and failing and likelihood in ("high", "medium"):
        return "serious"
    return "warning" if likelihood in ("high", "medium") else "info"


def _engine_findings(built: dict[str, str], here: dict[str, str], variants: Mapping[str, Variant], served: str | None,
                     verdicts: _Verdicts) -> list[Finding]:
    out = []
    for engine, pkg in ENGINE_PACKAGE.items():
        level = version_change(built.get(pkg), here.get(pkg))
        users = [n for n, v in variants.items() if v.engine == engine]
        if level is None or level == "added":
            continue
        if level == "removed":
            if users:
                out.append(Finding("info", "low", pkg, f"{pkg} {built[pkg]} at build is not installed here: variant(s) "
                                   f"{', '.join(users)} cannot run on this machine",
                                   f"install {pkg}=={built[pkg]} to serve them, or serve another variant",
                                   {"package": pkg, "built": built[pkg], "here": None, "variants": users}))
            continue
        likelihood: Likelihood
        if not users:
            likelihood = "none"
            why = "no variant of this bundle runs on it"
        elif served in users and level in ("major", "minor"):
            likelihood = "high"
            why = f"{level} version change of the engine that serves {served}: kernels and graph fusions change numerics"
        elif level in ("major", "minor"):
            likelihood = "medium"
            why = f"{level} version change of the engine of {', '.join(users)} (not the served variant)"
        else:
            likelihood = "low"
            why = f"{level}-level change of the engine of {', '.join(users)}: fixes, rarely numerics"
        note = verdicts.note(users)
        failing = bool(verdicts.failing(users))
        message = f"{_arrow(pkg, built[pkg], here[pkg])}: {why}" + (f"; {note}" if note and users else "")
        if failing:
            fix = (f"pin {pkg}=={built[pkg]} (the bundle's) where you serve, or rebuild the bundle with {pkg} {here[pkg]} "
                   "(`cvdeploy build`) and check it with `cvdeploy verify BUNDLE`")
        elif verdicts.holding(users):
            fix = (f"confirm the accuracy too with `cvdeploy verify BUNDLE --data data.yaml` (mAP through {pkg} {here[pkg]}), "
                   f"then pin {pkg} in the serving image so it cannot move unnoticed ({built[pkg]} is the bundle's)")
        else:
            fix = (f"run `cvdeploy verify BUNDLE` after every engine upgrade; pin {pkg}=={built[pkg]} (the bundle's) where "
                   "you serve")
        out.append(Finding(_severity(likelihood, True, failing), likelihood, pkg, message, fix if users else "",
                           {"what": _arrow(pkg, built[pkg], here[pkg]), "package": pkg, "built": built[pkg], "here": here[pkg],
                            "change": level, "variants": users,
                            "served": served, "parity_failing": verdicts.failing(users)}))
    return out


def _library_findings(built: dict[str, str], here: dict[str, str], python: tuple[str | None, str | None],
                      manifest_version: str | None) -> list[Finding]:
    out = []
    # One `cv2` is imported whichever wheel brings it (ultralytics pulls opencv-python next to the headless one): compare
    # the first OpenCV wheel present on each side, so that a wheel swapped for the other is compared by version.
    b_pkg, b_ver = next(((p, built[p]) for p in OPENCV if p in built), (None, None))
    h_pkg, h_ver = next(((p, here[p]) for p in OPENCV if p in here), (None, None))
    level = version_change(b_ver, h_ver)
    if level not in (None, "added"):
        pkg = h_pkg or b_pkg or OPENCV[0]
        name = pkg if b_pkg in (None, h_pkg) else f"{b_pkg} -> {pkg}"
        likelihood: Likelihood = "medium" if level in ("major", "minor", "removed") else "low"
        out.append(Finding(
            "warning" if likelihood == "medium" else "info", likelihood, pkg,
            f"{_arrow(name, b_ver, h_ver)}: {level} change of the library that decodes JPEGs and resizes "
            "(letterbox); golden parity starts from tensors and cannot see it",
            f"`cvdeploy verify BUNDLE --data data.yaml` re-measures mAP end to end here (decoding and resizing with this "
            f"OpenCV) against the build's figure; pin {b_pkg or pkg}=={b_ver} where you serve if it dropped",
            {"what": _arrow(name, b_ver, h_ver), "package": pkg, "built": b_ver, "here": h_ver, "change": level,
             "covered_by_parity": False}))
    level = version_change(built.get("numpy"), here.get("numpy"))
    if level not in (None, "added"):
        likelihood = "medium" if level == "major" else "low"
        why = ("major change: numpy 2 promotes scalars by the array's dtype (NEP 50), which can move float32 "
               "normalisation in the last bits" if level == "major" else f"{level} change: array code rarely changes results")
        out.append(Finding("warning" if likelihood == "medium" else "info", likelihood, "numpy",
                           f"{_arrow('numpy', built.get('numpy'), here.get('numpy'))}: {why}",
                           f"pin numpy=={built.get('numpy')} if results differ",
                           {"package": "numpy", "built": built.get("numpy"), "here": here.get("numpy"), "change": level}))
    built_cvd = manifest_version or built.get("cvdeploy")
    level = version_change(built_cvd, here.get("cvdeploy"))
    if level not in (None, "added", "removed"):
        likelihood = "medium" if level in ("major", "minor") else "low"
        out.append(Finding("warning" if likelihood == "medium" else "info", likelihood, "cvdeploy",
                           f"{_arrow('cvdeploy', built_cvd, here.get('cvdeploy'))}: {level} change of the code that "
                           "letterboxes and decodes boxes (the manifest pins the preprocessing settings, not the code)",
                           "read the changelog between the two versions; `cvdeploy verify BUNDLE --data data.yaml` "
                           "re-measures mAP through this version",
                           {"package": "cvdeploy", "built": built_cvd, "here": here.get("cvdeploy"), "change": level}))
    level = version_change(*python)
    if level not in (None, "added", "removed"):
        out.append(Finding("info", "low", "python", f"Python {python[0]} at build, {python[1]} here: {level} change "
                           "(the interpreter runs no numerics of the model)", "",
                           {"built": python[0], "here": python[1], "change": level}))
    return out


def _precision_findings(variants: Mapping[str, Variant], served: str | None, verdicts: _Verdicts) -> list[Finding]:
    out = []
    for name, check in verdicts.checks.items():
        v = variants.get(name)
        if v is None or v.parity is None:
            continue
        failing = not check.ok
        likelihood: Likelihood = "high" if name == served else "medium"
        recorded, now = v.parity.engine_precision, check.engine_precision
        if recorded is not None and now is not None and recorded != now:
            out.append(Finding(
                _severity("high", True, failing), "high", "precision",
                f"{name}: the engine runs it at {now} here, at {recorded} when it was verified at build: another precision "
                "is another model" + ("; golden parity fails here: the likely cause" if failing else
                                      "; golden parity still holds here"),
                "pin the precision (cvdeploy sets OpenVINO's INFERENCE_PRECISION_HINT from the variant name: upgrade "
                "cvdeploy if it did not), or serve a variant that verifies here (`cvdeploy verify BUNDLE`)",
                {"what": f"precision {recorded} at build, {now} here", "variant": name, "built": recorded, "here": now,
                 "parity_failing": failing}))
        built_provider = v.parity.provider
        # verify reports ONNX Runtime's provider for every variant; an OpenVINO variant's record names OpenVINO's device
        if v.engine == "onnxruntime" and built_provider is not None and check.provider and built_provider != check.provider:
            out.append(Finding(
                _severity(likelihood, True, failing), likelihood, "provider",
                f"{name}: verified on {built_provider} at build, runs on {check.provider} here: other kernels "
                "(GPU providers may use TF32 or fused kernels)" + ("; golden parity fails here: the likely cause"
                                                                   if failing else "; golden parity still holds here"),
                "choose the build's provider explicitly (`cvdeploy verify BUNDLE --provider ...` to compare), or re-verify "
                "and re-measure on this one",
                {"what": f"provider {built_provider} at build, {check.provider} here", "variant": name,
                 "built": built_provider, "here": check.provider, "parity_failing": failing}))
    return out


def _cpu_findings(built_env: Mapping[str, Any], here_env: Mapping[str, Any], variants: Mapping[str, Variant],
                  served: str | None, verdicts: _Verdicts) -> list[Finding]:
    built, here = _flags(built_env), _flags(here_env)
    out = []
    if not built and not here:
        return out
    lost, gained = sorted(built - here), sorted(here - built)
    for name, v in variants.items():
        failing = bool(verdicts.failing([name]))
        vnni_lost = sorted(set(lost) & VNNI_FLAGS)
        vnni_gained = sorted(set(gained) & VNNI_FLAGS)
        bf16_lost = sorted(set(lost) & BF16_FLAGS)
        ev = {"variant": name, "precision": v.precision, "engine": v.engine, "served": name == served,
              "parity_failing": failing}
        if v.precision == "int8" and vnni_lost:
            q = v.quantization or {}
            saturates = v.engine == "onnxruntime" and not q.get("reduce_range", True)
            why = (f"the {q.get('recipe', '8-bit weight')} recipe's u8*s8 pair sums can saturate int16 without VNNI"
                   if saturates else "INT8 runs on other kernels without VNNI (other rounding, other speed)")
            out.append(Finding(
                _severity("high", True, failing), "high", "cpu-flags",
                f"{name} (INT8): built on a CPU with {', '.join(vnni_lost)}, which this one lacks: {why}"
                + ("; golden parity fails here: the likely cause" if failing else "; golden parity still holds here"),
                f"serve an FP32 variant here, or rebuild the INT8 variant on this machine (`cvdeploy build ... --variants "
                f"{name}`: the u8s8-w7 recipe cannot saturate)",
                {**ev, "what": f"{', '.join(vnni_lost)} lost under an INT8 variant", "lost": vnni_lost}))
        elif v.precision == "int8" and vnni_gained:
            out.append(Finding(
                "warning", "medium", "cpu-flags",
                f"{name} (INT8): this CPU has {', '.join(vnni_gained)}, the build's did not: other INT8 kernels than the "
                "ones it was verified with" + ("; golden parity fails here" if failing else "; golden parity holds here"),
                "`cvdeploy verify BUNDLE --data data.yaml` re-measures its mAP here",
                {**ev, "gained": vnni_gained}))
        if v.precision == "bf16" and bf16_lost:
            out.append(Finding(
                _severity("high", True, failing), "high", "cpu-flags",
                f"{name} (bf16): built on a CPU with {', '.join(bf16_lost)}, which this one lacks: bf16 is emulated or "
                "the variant cannot run here", "serve an FP32 variant on this machine",
                {**ev, "what": f"{', '.join(bf16_lost)} lost under a bf16 variant", "lost": bf16_lost}))
    model_b, model_h = _cpu_model(built_env), _cpu_model(here_env)
    fp32_changed = sorted((set(lost) | set(gained)) & FP32_KERNEL_FLAGS)
    if lost or gained or model_b != model_h:
        out.append(Finding(
            "info", "low", "cpu",
            f"CPU {model_b or '?'} at build, {model_h or '?'} here"
            + (f"; flags lost: {', '.join(lost)}" if lost else "") + (f"; gained: {', '.join(gained)}" if gained else "")
            + (": float kernels differ in the last bits (golden parity covers it) and speed changes"
               if fp32_changed else ""),
            "`cvdeploy bench tune BUNDLE` re-times the variants on this CPU (the Predictor picks from this machine's times)",
            {"built": model_b, "here": model_h, "lost": lost, "gained": gained}))
    return out


_VERIFY_CAUSE = re.compile(r"\s*\(likely cause: .*\)$")  # verify's own guess, from the real CPU: this module names one


def _parity_findings(verdicts: _Verdicts, causes: list[Finding], served: str | None) -> list[Finding]:
    """Golden parity per variant: one serious finding per failing variant (naming the likely cause found among the
    differences), one "ok" line for those that hold."""
    out = []
    for name, c in verdicts.checks.items():
        if c.ok:
            continue
        cause = next((f for f in causes if f.severity == "serious" and name in (f.evidence.get("variants") or
                                                                               [f.evidence.get("variant")])), None)
        named = (f"likely cause: {cause.evidence.get('what', cause.topic)}" if cause is not None else
                 "no recorded difference of versions, precision, provider or CPU flags explains it")
        problem = _VERIFY_CAUSE.sub("", c.problems[0]) if c.problems else "golden parity: outputs differ"
        out.append(Finding(
            "serious", "high" if cause is not None or name == served else "medium", "parity",
            f"{name} fails on this machine: {problem}; {named}",
            "serve a variant that verifies here, or rebuild the variant on this machine (`cvdeploy verify BUNDLE` "
            "shows which hold)" if cause is None else cause.fix,
            {"variant": name, "max_abs_scores": c.max_abs_scores, "tolerance": c.tolerance,
             "box_agreement": c.box_agreement, "cause": cause.topic if cause is not None else None}))
    good = [n for n, c in verdicts.checks.items() if c.ok]
    if good:
        worst = max((verdicts.checks[n] for n in good), key=lambda c: c.max_abs_scores / max(c.tolerance, 1e-12))
        out.append(Finding(
            "ok", "none", "parity",
            f"golden parity holds on this machine for {', '.join(good)} (largest score difference {worst.max_abs_scores:.3g} "
            f"for {worst.name}, tolerance {worst.tolerance:g})", "",
            {"variants": good, "served": served}))
    return out


def compare_environment(manifest: Manifest, here: Mapping[str, Any], checks: Sequence[VariantCheck] = (), *,
                        served: str | None = None, threads: ThreadSettings | None = None) -> list[Finding]:
    """Rank what differs between the bundle's recorded build environment and `here` (an environment in the shape of
    `cvdeploy.bundle.environment.capture()`), given the golden-parity `checks` of `cvdeploy verify` on this machine and
    the variant that is `served`. Pure: every input is given, nothing is measured (tests inject CPU flags and
    versions). Returns the findings ranked, the most likely cause first; an "ok" finding says what matched."""
    built_env = manifest.environment or {}
    built, now = _packages(built_env), _packages(here)
    verdicts = _Verdicts({c.name: c for c in checks})
    variants = manifest.variants
    findings: list[Finding] = []
    findings += _precision_findings(variants, served, verdicts)
    findings += _engine_findings(built, now, variants, served, verdicts)
    findings += _cpu_findings(built_env, here, variants, served, verdicts)
    py = (str(built_env["python"]) if "python" in built_env else None, str(here["python"]) if "python" in here else None)
    findings += _library_findings(built, now, py, manifest.cvdeploy_version)
    findings += _parity_findings(verdicts, findings, served)
    if threads is not None:
        findings.append(Finding(
            "info", "low", "threads",
            f"threads: {threads.describe()} (a thread count changes only the summation order of float kernels; its "
            "cost in speed is the speed check's)", "" if not threads.oversubscribed else
            "give the engine at most the usable cores: `cvdeploy bench tune BUNDLE`, or `serve --threads N`",
            threads.to_dict()))
    build_side = {p: built[p] for p in BUILD_ONLY if p in built}
    if not built_env:
        findings.append(Finding("info", "none", "environment", "the bundle records no build environment (built by an "
                                "older cvdeploy, or from a plain .onnx): nothing to compare", "rebuild it to record one"))
    elif not any(f.severity in ("serious", "warning") for f in findings):
        findings.append(Finding(
            "ok", "none", "environment",
            "the engine, its provider and precision, OpenCV, numpy and the CPU's instruction sets match the build's"
            + (f" (build-side only, not used to serve: {', '.join(f'{k} {v}' for k, v in build_side.items())})"
               if build_side else ""), "", {"build_only": build_side}))
    return rank(findings)


@dataclass
class EnvironmentReport:
    """The environment step's result: ranked findings, and what was compared."""

    findings: list[Finding]
    served: str | None
    built: dict[str, Any]
    here: dict[str, Any]
    checks: list[Any] = field(default_factory=list)  # VariantCheck from verify_bundle

    @property
    def top(self) -> Finding | None:
        return self.findings[0] if self.findings else None

    def to_dict(self) -> dict[str, Any]:
        return {"served": self.served, "findings": [f.to_dict() for f in self.findings], "built": self.built,
                "here": self.here, "checks": [c.to_dict() for c in self.checks]}


def _here() -> dict[str, Any]:
    """This machine, as `capture()` records a build; ONNX Runtime from the module when its wheel has another name
    (onnxruntime-gpu, onnxruntime-openvino)."""
    from cvdeploy.bundle.environment import capture

    env = capture()
    packages = dict(env["packages"])  # type: ignore[call-overload]
    if "onnxruntime" not in packages:
        try:
            import onnxruntime

            packages["onnxruntime"] = onnxruntime.__version__
        except ImportError:
            pass
    env["packages"] = packages
    return env


def diagnose_environment(path: str | os.PathLike[str], *, data: str | os.PathLike[str] | None = None,
                         served: str | None = None, threads: int | None = None, model_key: bytes | None = None,
                         here: Mapping[str, Any] | None = None, checks: Sequence[VariantCheck] | None = None) -> EnvironmentReport:
    """The environment step of `cvdeploy doctor`: re-run golden parity here (`verify_bundle`: hashes, every variant;
    mAP too with `data`), read this machine, and rank the differences from the bundle's build record.

    `served`: the variant the deployment runs (default: the one the Predictor chooses here); `threads`: the engine
    threads it was given (`serve --threads`; default: the bundle's tuned hint). Raises BundleError when a file's hash
    does not hold (the bundle is not what was built). `here` and `checks` are for tests.
    """
    from cvdeploy.bundle.bundle import Bundle
    from cvdeploy.evaluate.verify import verify_bundle

    if checks is None:
        checks = verify_bundle(path, data=data, model_key=model_key)  # checks every hash: no need to hash twice
        bundle = Bundle.load(path, check_hashes=False)
    else:
        bundle = Bundle.load(path)
    if served is None:
        from cvdeploy.predict import variant_choice

        served = variant_choice(bundle).name
    now = dict(here) if here is not None else _here()
    settings = bundle_threads(bundle.manifest, served, threads)
    findings = compare_environment(bundle.manifest, now, checks, served=served, threads=settings)
    return EnvironmentReport(findings, served, dict(bundle.manifest.environment), now, list(checks))
