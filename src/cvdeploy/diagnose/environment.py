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

The finding and its scales are in `finding`, cores and threads in `threads`, the rules per difference in
`environment_rules`; all their public names are importable from here too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cvdeploy.diagnose.environment_rules import ENGINE_PACKAGE as ENGINE_PACKAGE
from cvdeploy.diagnose.environment_rules import FP32_KERNEL_FLAGS as FP32_KERNEL_FLAGS
from cvdeploy.diagnose.environment_rules import OPENCV as OPENCV
from cvdeploy.diagnose.environment_rules import (
    Verdicts,
    cpu_findings,
    engine_findings,
    library_findings,
    packages_of,
    parity_findings,
    precision_findings,
    version_change,
)
from cvdeploy.diagnose.finding import LIKELIHOOD_ORDER, SEVERITY_ORDER, Finding, Likelihood, Severity, rank
from cvdeploy.diagnose.threads import (
    THREAD_VARIABLES,
    Cores,
    ThreadSettings,
    bundle_threads,
    cores_here,
    predictor_threads,
    thread_settings,
)

if TYPE_CHECKING:
    from cvdeploy.bundle.manifest import Manifest
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

# Used to make the bundle (export, golden outputs), never to run it: recorded, shown, not compared.
BUILD_ONLY = ("torch", "torchvision", "ultralytics", "onnx")


def compare_environment(manifest: Manifest, here: Mapping[str, Any], checks: Sequence[VariantCheck] = (), *,
                        served: str | None = None, threads: ThreadSettings | None = None) -> list[Finding]:
    """Rank what differs between the bundle's recorded build environment and `here` (an environment in the shape of
    `cvdeploy.bundle.environment.capture()`), given the golden-parity `checks` of `cvdeploy verify` on this machine and
    the variant that is `served`. Pure: every input is given, nothing is measured (tests inject CPU flags and
    versions). Returns the findings ranked, the most likely cause first; an "ok" finding says what matched."""
    built_env = manifest.environment or {}
    built, now = packages_of(built_env), packages_of(here)
    verdicts = Verdicts({c.name: c for c in checks})
    variants = manifest.variants
    findings: list[Finding] = []
    findings += precision_findings(variants, served, verdicts)
    findings += engine_findings(built, now, variants, served, verdicts)
    findings += cpu_findings(built_env, here, variants, served, verdicts)
    py = (str(built_env["python"]) if "python" in built_env else None, str(here["python"]) if "python" in here else None)
    findings += library_findings(built, now, py, manifest.cvdeploy_version)
    findings += parity_findings(verdicts, findings, served)
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
