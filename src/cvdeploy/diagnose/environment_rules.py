"""The environment diff's rules: what one difference between the build machine and this one (the engine's version,
OpenCV, numpy, precision, execution provider, CPU flags) is likely to do to the model's results, given golden parity
here. Each rule returns its findings; `environment.compare_environment` gathers and ranks them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cvdeploy.bundle.environment import BF16_FLAGS, VNNI_FLAGS
from cvdeploy.diagnose.finding import Finding, Likelihood, Severity

if TYPE_CHECKING:
    from cvdeploy.bundle.manifest import Variant
    from cvdeploy.evaluate.verify import VariantCheck

__all__ = [
    "ENGINE_PACKAGE",
    "FP32_KERNEL_FLAGS",
    "OPENCV",
    "Verdicts",
    "cpu_findings",
    "engine_findings",
    "library_findings",
    "packages_of",
    "parity_findings",
    "precision_findings",
    "version_change",
]

OPENCV = ("opencv-python-headless", "opencv-python")
ENGINE_PACKAGE = {"onnxruntime": "onnxruntime", "openvino": "openvino"}  # variant engine -> the package that runs it
FP32_KERNEL_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "neon", "asimd"})


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


# -- the rules -------------------------------------------------------------------------------------


def packages_of(env: Mapping[str, Any]) -> dict[str, str]:
    """The package versions of an environment record; {} when it has none."""
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
class Verdicts:
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


def engine_findings(built: dict[str, str], here: dict[str, str], variants: Mapping[str, Variant], served: str | None,
                     verdicts: Verdicts) -> list[Finding]:
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


def library_findings(built: dict[str, str], here: dict[str, str], python: tuple[str | None, str | None],
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


def precision_findings(variants: Mapping[str, Variant], served: str | None, verdicts: Verdicts) -> list[Finding]:
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


def cpu_findings(built_env: Mapping[str, Any], here_env: Mapping[str, Any], variants: Mapping[str, Variant],
                  served: str | None, verdicts: Verdicts) -> list[Finding]:
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


def parity_findings(verdicts: Verdicts, causes: list[Finding], served: str | None) -> list[Finding]:
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
