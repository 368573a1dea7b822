"""`cvdeploy verify`: is this bundle, on this machine, still what was built and measured?

Re-checks every hash, re-runs the golden parity of every variant with this machine's engine
(re-export integrity: another ONNX Runtime, another CPU, another provider) and, given the
controlled dataset, re-measures each variant's mAP against the figure recorded at build time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
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
    map50_95: float | None = None
    recorded_map50_95: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.name, "provider": self.provider, "ok": self.ok, "problems": self.problems,
                "max_abs_scores": self.max_abs_scores, "recorded_max_abs_scores": self.recorded_max_abs_scores,
                "tolerance": self.tolerance, "box_agreement": self.box_agreement,
                "map50_95": self.map50_95, "recorded_map50_95": self.recorded_map50_95}


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

    `map_tolerance` is in mAP50-95 points: a variant whose mAP is that much below its recorded
    figure has drifted.
    """
    from cvdeploy.runtime.onnxruntime import resolve_providers

    step = on_step or (lambda _v, _s: None)
    bundle = Bundle.load(path)  # schema and every sha256
    provider = resolve_providers(list(providers) if providers else None)[0]
    checks = []
    for name, v in bundle.manifest.variants.items():
        step(name, "golden parity")
        model: Any = bundle.variant_path(name)
        if v.encryption:  # a protected bundle: check the decrypted model, in memory
            from cvdeploy.security.protect import load_key, variant_bytes

            main, extra = variant_bytes(bundle, name, model_key if model_key is not None else load_key())
            model = main if v.engine == "onnxruntime" else (main, next(iter(extra.values()), b""))
        report, agreement, problem = golden_check(bundle, model, v.precision, providers or None, engine_kind=v.engine)
        worst = max((o.max_abs if o.max_abs_scores is None else o.max_abs_scores) for o in report.outputs.values())
        recorded = None
        if v.parity is not None:
            recorded = max((o.max_abs if o.max_abs_scores is None else o.max_abs_scores) for o in v.parity.outputs.values())
        check = VariantCheck(name, provider, worst, recorded, report.tolerance_scores, agreement)
        if problem:
            check.problems.append(f"golden parity on {provider}: {problem}")
        if data is not None:
            from cvdeploy.evaluate import evaluate_detect
            from cvdeploy.predict import Predictor

            step(name, "mAP")
            with Predictor(bundle, name, model_key=model_key) as p:
                check.map50_95 = round(evaluate_detect(p, data).map50_95, 5)
            check.recorded_map50_95 = v.metrics.get("map50_95")
            if check.recorded_map50_95 is not None:
                drift = 100.0 * (check.recorded_map50_95 - check.map50_95)
                if drift > map_tolerance:
                    check.problems.append(f"mAP50-95 {check.map50_95:.4f} is {drift:.2f} points below the "
                                          f"{check.recorded_map50_95:.4f} recorded at build time (tolerance {map_tolerance:g})")
        checks.append(check)
    return checks


