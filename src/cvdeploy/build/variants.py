"""Optimized variants added to a bundle, each verified against its source before it is written.

A variant enters the bundle only when (a) its outputs on the golden inputs are finite and agree
with the source model's (raw error per output and box-level agreement after decoding), and
(b) with a controlled dataset, its accuracy in the task's own figure (`cvdeploy.evaluate.accuracy`: box mAP50-95
for detect, mask mAP50-95 for segment, keypoint OKS mAP50-95 for pose, rotated-box mAP50-95 for obb, top-1 for
classify) is within the budget of the FP32 variant's. Its figures (parity, accuracy, median latency at batch 1 on this
machine) go into the manifest.

Hardware-dependent choices are measured here, never read from a table. onnx-int8 tries every
candidate recipe (`quantize.recipe_candidates`), verifies each, times the survivors interleaved
with onnx-fp32 and keeps the fastest; every candidate is recorded with its figures. OpenVINO runs
each variant at the precision its name says (openvino-bf16 only where the CPU computes bf16 natively).

INT8 is accuracy-aware: when no candidate holds the budget, the tensors with the worst quantization
noise (signal-to-quantization-noise ratio of float against quantized activations) of the first
candidate are moved back to float a few layers at a time, until the budget holds or the rounds run
out; then the variant is refused with what was tried.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.build.int8_search import onnx_int8_search
from cvdeploy.build.variant_checks import accuracy_check, accuracy_key, calibration_tensors, drop_key, map_of, with_variant
from cvdeploy.build.variant_job import (
    ALL_VARIANTS,
    ONNX_VARIANTS,
    OPENVINO_VARIANTS,
    Checked,
    Outcome,
    VariantJob,
    file_of,
    forget_variant,
    verify_made,
)
from cvdeploy.bundle.bundle import Bundle, set_bundle_modes
from cvdeploy.bundle.card import write_card
from cvdeploy.bundle.environment import BF16_FLAGS, cpu_info
from cvdeploy.errors import BundleError, InputError

__all__ = ["ALL_VARIANTS", "ONNX_VARIANTS", "OPENVINO_VARIANTS", "Outcome", "accuracy_check", "accuracy_key",
           "add_variants", "calibration_tensors", "default_variants", "drop_key", "map_of", "not_offered",
           "with_variant", "write_report"]


def default_variants(have_data: bool) -> list[str]:
    """The sensible set for this machine: FP16 only where a GPU provider runs it; INT8 when there is data to check it."""
    from cvdeploy.runtime.onnxruntime import available_providers

    out = ["onnx-fp32"]
    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(available_providers()):
        out.append("onnx-fp16")
    if have_data:
        out.append("onnx-int8")
        try:
            import nncf  # noqa: F401
            import openvino  # noqa: F401
        except ImportError:
            pass
        else:
            out.append("openvino-int8")
    return out


def not_offered(name: str, cpu_flags: Sequence[str]) -> str | None:
    """Why `name` is not offered on a CPU with `cpu_flags`, or None."""
    if ALL_VARIANTS.get(name) == "bf16" and not set(cpu_flags) & BF16_FLAGS:
        return (f"{name} needs a CPU that computes bfloat16 natively ({' or '.join(sorted(BF16_FLAGS))}); this one would "
                "emulate or silently fall back to f32")
    return None


# -- making one variant ---------------------------------------------------------------------------


def _remove(root: Path, name: str) -> None:
    target = root / "variants" / (name if name in OPENVINO_VARIANTS else f"{name}.onnx")
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)


def openvino_ir(fp32: Path, out_xml: Path, calib: Sequence[np.ndarray] | None, float_head: bool) -> None:
    """Convert the ONNX FP32 model to OpenVINO IR (f32 weights); with `calib`, quantize it to INT8 with NNCF."""
    try:
        import openvino as ov
    except ImportError as e:
        from cvdeploy.errors import MissingDependencyError

        raise MissingDependencyError("openvino", "openvino", "building OpenVINO variants") from e
    model = ov.convert_model(str(fp32))
    if calib is not None:
        try:
            import nncf
        except ImportError as e:
            from cvdeploy.errors import MissingDependencyError

            raise MissingDependencyError("nncf", "openvino", "building the openvino-int8 variant") from e
        import onnx

        from cvdeploy.build.quantize import head_float_nodes

        # The same float scope as for ONNX Runtime: the head's decoding (every /model.N/ node outside its conv branches).
        head = head_float_nodes(onnx.load(str(fp32), load_external_data=False)) if float_head else []
        scope = nncf.IgnoredScope(patterns=[f"^{re.escape(n)}($|/)" for n in head],
                                  types=["Sigmoid"] if float_head else [], validate=False)
        model = nncf.quantize(model, nncf.Dataset(list(calib)), subset_size=len(calib), ignored_scope=scope,
                              preset=nncf.QuantizationPreset.MIXED)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out_xml), compress_to_fp16=False)


def _one(job: VariantJob, name: str) -> Checked:
    """onnx-fp16 and the OpenVINO variants: made once, verified."""
    from cvdeploy.build.quantize import convert_fp16

    precision = ALL_VARIANTS[name]
    target = job.root / file_of(name)
    job.step(name, "convert" if precision != "int8" else "quantize")
    if name == "onnx-fp16":
        convert_fp16(job.fp32, target)
    else:
        openvino_ir(job.fp32, target, job.calib(name) if precision == "int8" else None, float_head=not job.quantize_head)
    checked = verify_made(job, name, target)
    if precision == "int8" and checked.problem is None:
        checked.variant.quantization = {"tool": "nncf", "preset": "mixed", "calib_images": len(job.calib(name)),
                                        "head_in_float": not job.quantize_head}
    return checked


# -- the public entry point -----------------------------------------------------------------------


def add_variants(
    bundle_path: str | os.PathLike[str],
    names: Sequence[str],
    *,
    data: str | os.PathLike[str] | None = None,
    calib_images: int = 64,
    calib_method: str = "minmax",
    max_map_drop: float = 1.0,
    repair_rounds: int = 4,
    layers_per_round: int = 4,
    quantize_head: bool = False,
    int8_recipes: Sequence[str] | None = None,
    cpu_flags: Sequence[str] | None = None,
    on_step: Callable[[str, str], None] | None = None,
    timer: Any = None,
) -> list[Outcome]:
    """Make, verify and add the variants `names` to the bundle at `bundle_path`; return what happened to each.

    `max_map_drop` is in points (1.0 = 0.01) of the task's figure: box mAP50-95 (detect), mask mAP50-95 (segment),
    keypoint OKS mAP50-95 (pose), rotated-box mAP50-95 (obb), top-1 (classify). `quantize_head=True` quantizes the YOLO
    head's decoding too (a bad idea, kept to show that the guard catches it). `int8_recipes`
    restricts the INT8 recipes tried (default: all, in the order this CPU's flags suggest;
    `cpu_flags` defaults to this CPU's). `timer(label, call) -> ms` replaces the wall clock for every latency
    (tests inject timings). A variant already in the bundle is rebuilt.
    """
    from cvdeploy.bench.latency import measure_here, store_record
    from cvdeploy.build.profile_step import profile_note, write_profile
    from cvdeploy.build.quantize import recipe_candidates

    t_start = time.perf_counter()
    step = on_step or (lambda _v, _s: None)
    unknown = [n for n in names if n not in ALL_VARIANTS]
    if unknown:
        raise InputError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(ALL_VARIANTS)}")
    flags = list(cpu_flags if cpu_flags is not None else cpu_info().get("flags", []))  # type: ignore[call-overload]
    for n in names:
        if (why := not_offered(n, flags)) is not None:
            raise InputError(why)
    needs_data = [n for n in names if ALL_VARIANTS[n] == "int8"]
    if needs_data and data is None:
        raise InputError(f"{', '.join(needs_data)} needs --data DATA.yaml: its images calibrate the quantization and its labels "
                         "check the accuracy (mAP, or top-1 for a classifier: pass its dataset directory)")
    if max_map_drop < 0:
        raise InputError(f"max-map-drop must be >= 0 points, got {max_map_drop}")
    recipes = recipe_candidates(flags, calib_method, int8_recipes)
    bundle = Bundle.load(bundle_path)
    if bundle.root is None:
        raise InputError(f"{bundle_path} is a plain .onnx file; variants are added to a bundle directory")
    root = bundle.root
    if "onnx-fp32" not in bundle.manifest.variants:
        raise BundleError(f"bundle {bundle.name!r} has no onnx-fp32 variant to derive variants from")
    if next(bundle.golden(), None) is None:
        raise BundleError(f"bundle {bundle.name!r} has no golden cases to verify variants against")
    manifest = bundle.manifest

    # The reference figures: the FP32 variant on this machine and the controlled set.
    base = manifest.variants["onnx-fp32"]
    if data is not None:
        from cvdeploy.evaluate.accuracy import LABELS

        step("onnx-fp32", LABELS.get(manifest.task, "accuracy"))
        base.metrics.update(map_of(bundle, "onnx-fp32", data))
        if profile_note(manifest.task) is None:
            step("onnx-fp32", "data profile")  # the drift baseline: profile.json, listed in the manifest
            write_profile(bundle, data)
        else:
            step("onnx-fp32", f"no data profile: {profile_note(manifest.task)}")
    bundle.save_manifest()
    outcomes = [Outcome("onnx-fp32", True, "reference", base)]
    job = VariantJob(bundle, data, calib_images, max_map_drop, quantize_head, step, timer)

    for name in dict.fromkeys(names):  # keep the order, drop repeats
        if name == "onnx-fp32":
            continue
        forget_variant(bundle, name)
        _remove(root, name)
        outcome = Outcome(name, False, "")
        outcomes.append(outcome)
        try:
            checked = (onnx_int8_search(job, outcome, recipes, repair_rounds, layers_per_round) if name == "onnx-int8"
                       else _one(job, name))
        except BaseException:
            _remove(root, name)
            raise
        if checked.problem is not None:
            outcome.reason = checked.problem
            _remove(root, name)
            continue
        manifest.variants[name] = checked.variant
        bundle.save_manifest()
        outcome.written, outcome.reason, outcome.variant = True, "verified", checked.variant
    step("all variants", "latency, interleaved")
    record = measure_here(bundle, list(manifest.variants), how="build", **({"timer": timer} if timer else {}))
    store_record(manifest, record)
    for n, ms in record.variants.items():
        manifest.variants[n].metrics["latency_ms_b1"] = ms
        if n != "onnx-fp32":
            manifest.variants[n].metrics["speedup_vs_fp32"] = round(record.variants["onnx-fp32"] / ms, 3)
    bundle.save_manifest()
    write_report(bundle, outcomes, time.perf_counter() - t_start)
    write_card(bundle, refused={o.name: o.reason for o in outcomes if not o.written})  # MODEL_CARD.md, not hashed
    set_bundle_modes(root)  # new files (mkdtemp staging, OpenVINO directories) as open or closed as the bundle
    return outcomes


def write_report(bundle: Bundle, outcomes: Sequence[Outcome] = (), wall_s: float | None = None) -> Path:
    from cvdeploy.report import bundle_report

    assert bundle.root is not None
    out = bundle.root / "report.html"
    out.write_text(bundle_report(bundle.manifest, outcomes, wall_s))
    return out
