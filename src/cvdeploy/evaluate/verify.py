"""`cvdeploy verify`: is this bundle, on this machine, still what was built and measured?

Re-checks every hash, re-runs the golden parity of every variant with this machine's engine
(re-export integrity: another ONNX Runtime, another CPU, another provider) and, given the
controlled dataset, re-measures each variant's accuracy against the figure recorded at build time, in the task's own
figure (box, mask, keypoint or rotated-box mAP50-95, or top-1: `cvdeploy.evaluate.accuracy`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cvdeploy.bundle.bundle import Bundle
from cvdeploy.evaluate.parity import golden_check


@dataclass
class VariantCheck:
    name: str
    provider: str
    max_abs_scores: float
    recorded_max_abs_scores: float | None
    tolerance: float
    box_agreement: float
    accuracy: float | None = None  # the task's figure measured here (`metric` names it)
    recorded_accuracy: float | None = None  # the same figure recorded at build
    metric: str | None = None  # e.g. "mask mAP50-95", "top-1"
    engine_precision: str | None = None  # what the engine reported here
    recorded_engine_precision: str | None = None  # what it reported when the variant was verified at build
    problems: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)  # what differs from the build machine and can move results

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.name, "provider": self.provider, "ok": self.ok, "problems": self.problems,
                "max_abs_scores": self.max_abs_scores, "recorded_max_abs_scores": self.recorded_max_abs_scores,
                "tolerance": self.tolerance, "box_agreement": self.box_agreement,
                "metric": self.metric, "accuracy": self.accuracy, "recorded_accuracy": self.recorded_accuracy,
                # the names of before every task had its figure: the same values, for readers of those keys
                "map50_95": self.accuracy if self.metric != "top-1" else None,
                "recorded_map50_95": self.recorded_accuracy if self.metric != "top-1" else None,
                "engine_precision": self.engine_precision, "recorded_engine_precision": self.recorded_engine_precision,
                "differences": self.differences}


def differences(variant: Any, engine_precision: str | None, here_flags: Sequence[str], build_flags: Sequence[str]) -> list[str]:
    """What differs between the build machine and this one that can change `variant`'s results, most likely first."""
    from cvdeploy.bundle.environment import VNNI_FLAGS

    out = []
    recorded = variant.parity.engine_precision if variant.parity is not None else None
    if recorded is not None and engine_precision is not None and recorded != engine_precision:
        out.append(f"precision change: the engine runs this variant at {engine_precision} here, at {recorded} when it was "
                   "verified at build")
    if variant.precision == "int8" and variant.engine == "onnxruntime":
        lost = sorted(set(build_flags) & VNNI_FLAGS - set(here_flags))
        q = variant.quantization or {}
        if lost and not q.get("reduce_range", True):
            out.append(f"INT8 kernels: built on a CPU with {', '.join(lost)}; without VNNI the {q.get('recipe', '8-bit weight')} "
                       "recipe's u8*s8 pair sums can saturate int16 (rebuild here: the u8s8-w7 recipe cannot)")
        elif lost:
            out.append(f"INT8 kernels: built on a CPU with {', '.join(lost)}, which this one lacks: other kernels, other speed")
    return out


def verify_bundle(
    path: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    map_tolerance: float = 0.5,
    providers: tuple[str, ...] | None = None,
    on_step: Callable[[str, str], None] | None = None,
    model_key: bytes | None = None,
) -> list[VariantCheck]:
    """Check every variant; raise BundleError (naming the file) when a hash does not hold.

    `map_tolerance` is in points (0.01) of the task's figure: a variant whose accuracy is that much below its
    recorded figure has drifted.
    """
    from cvdeploy.bundle.environment import cpu_info
    from cvdeploy.runtime.onnxruntime import resolve_providers

    step = on_step or (lambda _v, _s: None)
    bundle = Bundle.load(path)  # schema and every sha256
    here_flags = list(cpu_info().get("flags", []))  # type: ignore[call-overload]
    build_cpu = bundle.manifest.environment.get("cpu", {})
    build_flags = list(build_cpu.get("flags", [])) if isinstance(build_cpu, dict) else []
    provider = resolve_providers(list(providers) if providers else None)[0]
    checks = []
    for name, v in bundle.manifest.variants.items():
        step(name, "golden parity")
        model: Any = bundle.variant_path(name)
        if v.encryption:  # a protected bundle: check the decrypted model, in memory
            from cvdeploy.security.protect import load_key, variant_bytes

            main, extra = variant_bytes(bundle, name, model_key if model_key is not None else load_key())
            model = main if v.engine == "onnxruntime" else (main, next(iter(extra.values()), b""))
        if v.engine in ("ncnn", "litert"):  # fixed-size edge engines: golden inputs at their size
            from cvdeploy.evaluate.fixed_size import edge_golden_check

            report, agreement, problem = edge_golden_check(bundle, model, v.engine, v.precision)
        else:
            from cvdeploy.build.compress.common import own_golden  # compressed variants: their own torch model's outputs

            report, agreement, problem = golden_check(own_golden(bundle, name), model, v.precision, providers or None,
                                                      engine_kind=v.engine)
        worst = report.worst
        recorded = None
        if v.parity is not None:
            recorded = v.parity.worst
        check = VariantCheck(name, provider, worst, recorded, report.tolerance_scores, agreement,
                             engine_precision=report.engine_precision,
                             recorded_engine_precision=v.parity.engine_precision if v.parity is not None else None)
        check.differences = differences(v, report.engine_precision, here_flags, build_flags)
        if problem:
            check.problems.append(f"golden parity on {provider}: {problem}")
        if data is not None:
            _accuracy(check, bundle, name, v, data, map_tolerance, model_key, step)
        if check.problems and check.differences:  # name the likely cause with the symptom
            check.problems = [f"{p} (likely cause: {check.differences[0]})" for p in check.problems]
        checks.append(check)
    return checks




def _accuracy(check: VariantCheck, bundle: Bundle, name: str, v: Any, data: str | os.PathLike[str], tolerance: float,
              model_key: bytes | None, step: Callable[[str, str], None]) -> None:
    """Re-measure the variant's task figure on `data`; a problem when it is `tolerance` points below the recorded one."""
    from cvdeploy.evaluate import evaluate
    from cvdeploy.evaluate.accuracy import LABELS, primary_key
    from cvdeploy.predict import Predictor

    task = bundle.manifest.task
    check.metric = LABELS.get(task, "accuracy")
    step(name, check.metric)
    with Predictor(bundle, name, model_key=model_key) as p:
        check.accuracy = round(evaluate(p, data).score, 5)
    check.recorded_accuracy = v.metrics.get(primary_key(task))
    if check.recorded_accuracy is not None:
        drift = 100.0 * (check.recorded_accuracy - check.accuracy)
        if drift > tolerance:
            check.problems.append(f"{check.metric} {check.accuracy:.4f} is {drift:.2f} points below the "
                                  f"{check.recorded_accuracy:.4f} recorded at build time (tolerance {tolerance:g})")
