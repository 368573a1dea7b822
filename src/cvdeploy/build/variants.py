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
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.bundle.bundle import Bundle, set_bundle_modes, sha256_file
from cvdeploy.bundle.card import write_card
from cvdeploy.bundle.environment import BF16_FLAGS, cpu_info
from cvdeploy.bundle.manifest import Variant
from cvdeploy.errors import BundleError, InputError
from cvdeploy.evaluate.parity import golden_check

ONNX_VARIANTS = {"onnx-fp32": "fp32", "onnx-fp16": "fp16", "onnx-int8": "int8"}
OPENVINO_VARIANTS = {"openvino-fp32": "fp32", "openvino-bf16": "bf16", "openvino-int8": "int8"}
ALL_VARIANTS = {**ONNX_VARIANTS, **OPENVINO_VARIANTS}


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


@dataclass
class Outcome:
    """What happened to one requested variant."""

    name: str
    written: bool
    reason: str
    variant: Variant | None = None
    tried: list[str] = field(default_factory=list)  # INT8 candidates and repair rounds


# -- measurements ----------------------------------------------------------------------------------


def with_variant(bundle: Bundle, name: str, variant: Variant) -> Bundle:
    """The bundle as if `variant` were recorded under `name` (in memory; nothing is written)."""
    manifest = bundle.manifest.model_copy(update={"variants": {**bundle.manifest.variants, name: variant}})
    return Bundle(manifest, bundle.root)


def map_of(bundle: Bundle, name: str, data: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """The variant's accuracy figures on the controlled set, by the bundle's task (`cvdeploy.evaluate.evaluate`):
    detect {map50_95, map50}; segment, pose and obb also their box/mask/pose keys, `map50_95` being the task's own
    figure; classify {top1, top5}."""
    from cvdeploy.evaluate import evaluate
    from cvdeploy.predict import Predictor

    with Predictor(bundle, name) as p:
        m = evaluate(p, data, progress=progress)
    return {k: round(v, 5) for k, v in m.values.items()}


def accuracy_key(task: str) -> str:
    """The metrics key the budget holds for `task`: `map50_95` (each box task's own mAP) or `top1` (classify)."""
    from cvdeploy.evaluate.accuracy import primary_key

    return primary_key(task)


def drop_key(task: str) -> str:
    """Where a variant's drop against onnx-fp32 is recorded: `map50_95_drop_points` or `top1_drop_points`."""
    return f"{accuracy_key(task)}_drop_points"


# -- calibration and conversion -------------------------------------------------------------------


def calibration_tensors(bundle: Bundle, data: str | os.PathLike[str], n: int) -> list[np.ndarray]:
    """`n` training images (val if the set has no train split) through the bundle's own preprocessing, square.

    Any task's layout: a YOLO data.yaml (images/train) or a classify dataset (train/<class>/), whose crops go through
    the classify center crop the manifest records."""
    from dataclasses import replace

    from cvdeploy.evaluate.labels import split_images
    from cvdeploy.vision.image import load_image
    from cvdeploy.vision.letterbox import preprocess

    if n < 1:
        raise InputError(f"calibration needs at least 1 image, got {n}")
    try:
        images = split_images(data, "train")
    except InputError:
        images = split_images(data, "val")
    spec = replace(bundle.manifest.preprocess.letterbox(), rect=False)
    step = max(1, len(images) // n)
    return [preprocess([load_image(path)], spec)[0] for path in images[::step][:n]]


def _quantization_noise(fp32: Path, int8: Path, tensors: Sequence[np.ndarray], input_name: str) -> dict[str, float]:
    """SQNR (dB) of each quantized activation: low means the INT8 grid loses much of that tensor."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    from cvdeploy.build.quantize import _Calibration

    with tempfile.TemporaryDirectory(prefix="cvdeploy-qerr-") as tmp:
        f_aug, q_aug = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        modify_model_output_intermediate_tensors(str(fp32), str(f_aug))
        modify_model_output_intermediate_tensors(str(int8), str(q_aug))
        sample = list(tensors[:4])
        f_act = collect_activations(str(f_aug), _Calibration(input_name, sample))
        q_act = collect_activations(str(q_aug), _Calibration(input_name, sample))
    matching = create_activation_matching(q_act, f_act)
    errors = compute_activation_error(matching)
    return {name: float(e.get("qdq_err", np.inf)) for name, e in errors.items() if "qdq_err" in e}


def _producer_map(model_path: Path) -> dict[str, str]:
    """Tensor name -> the name of the node that produces it."""
    import onnx

    return {out: n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node for out in n.output}


# -- making, verifying and repairing one variant -----------------------------------------------------


def _file_of(name: str) -> str:
    return f"variants/{name}/model.xml" if name in OPENVINO_VARIANTS else f"variants/{name}.onnx"


def _remove(root: Path, name: str) -> None:
    target = root / "variants" / (name if name in OPENVINO_VARIANTS else f"{name}.onnx")
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)


def _openvino(fp32: Path, out_xml: Path, calib: Sequence[np.ndarray] | None, float_head: bool) -> None:
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


@dataclass
class _Job:
    """What every variant of one `add_variants` call shares."""

    bundle: Bundle
    data: str | os.PathLike[str] | None
    calib_images: int
    max_map_drop: float
    quantize_head: bool
    step: Callable[[str, str], None]
    timer: Any = None  # bench.latency's timer; tests inject timings through it
    _calib: list[np.ndarray] = field(default_factory=list)
    _head: list[str] | None = None

    @property
    def root(self) -> Path:
        assert self.bundle.root is not None
        return self.bundle.root

    @property
    def fp32(self) -> Path:
        return self.bundle.variant_path("onnx-fp32")

    def calib(self, name: str) -> list[np.ndarray]:
        if not self._calib:
            self.step(name, "calibration images")
            self._calib = calibration_tensors(self.bundle, self.data, self.calib_images)  # type: ignore[arg-type]
        return self._calib

    def head_nodes(self) -> list[str]:
        if self._head is None:
            import onnx

            from cvdeploy.build.quantize import head_float_nodes

            self._head = head_float_nodes(onnx.load(str(self.fp32), load_external_data=False))
        return self._head


@dataclass
class _Checked:
    """A made variant file and what its verification found."""

    variant: Variant
    problem: str | None


def _verify(job: _Job, name: str, target: Path) -> _Checked:
    """Golden parity (raw outputs and boxes) and, with data, the mAP budget; the variant's record either way."""
    precision = ALL_VARIANTS[name]
    kind = "openvino" if name in OPENVINO_VARIANTS else "onnxruntime"
    job.step(name, "golden parity")
    parity, agreement, problem = golden_check(job.bundle, target, precision, engine_kind=kind)
    companions = {} if kind == "onnxruntime" else {
        str(target.with_suffix(".bin").relative_to(job.root)): sha256_file(target.with_suffix(".bin"))}
    variant = Variant(file=str(target.relative_to(job.root)), format="openvino" if kind == "openvino" else "onnx",  # type: ignore[arg-type]
                      precision=precision, engine=kind, sha256=sha256_file(target),  # type: ignore[arg-type]
                      size_bytes=sum(f.stat().st_size for f in [target, *(job.root / c for c in companions)]),
                      companions=companions, parity=parity, metrics={"box_agreement": round(agreement, 4)})
    if problem is None and job.data is not None:
        problem = _accuracy_check(job, name, variant)
    return _Checked(variant, problem)


def _accuracy_check(job: _Job, name: str, variant: Variant) -> str | None:
    return accuracy_check(job.bundle, name, variant, job.data, job.max_map_drop, job.step)  # type: ignore[arg-type]


def accuracy_check(bundle: Bundle, name: str, variant: Variant, data: str | os.PathLike[str], budget: float,
                   step: Callable[[str, str], None] | None = None) -> str | None:
    """The variant's accuracy on the controlled set, recorded in `variant.metrics`; the problem when it drops more than
    `budget` points against the bundle's onnx-fp32, in the task's own figure (mask, keypoint or rotated-box
    mAP50-95, top-1: 1 point = 0.01). Every kind of variant (ONNX, OpenVINO, edge, compressed) is held to it."""
    from cvdeploy.evaluate.accuracy import LABELS

    task = bundle.manifest.task
    key = accuracy_key(task)
    if step is not None:
        step(name, LABELS.get(task, "accuracy"))
    variant.metrics.update(map_of(with_variant(bundle, name, variant), name, data))
    drop = 100.0 * (bundle.manifest.variants["onnx-fp32"].metrics[key] - variant.metrics[key])
    variant.metrics[drop_key(task)] = round(drop, 3)
    if drop > budget:
        return f"{LABELS.get(task, key)} drops by {drop:.2f} points (budget {budget:g})"
    return None


def _repair_order(job: _Job, target: Path, float_nodes: Sequence[str]) -> list[str]:
    """Quantized nodes, worst quantization noise (lowest SQNR) first, not yet in float."""
    noise = _quantization_noise(job.fp32, target, job.calib("onnx-int8"), job.bundle.manifest.input.name)
    producer = _producer_map(job.fp32)
    ordered: list[str] = []
    for tensor, _ in sorted(noise.items(), key=lambda kv: kv[1]):
        node = producer.get(tensor)
        if node and node not in float_nodes and node not in ordered:
            ordered.append(node)
    return ordered


def _onnx_int8(job: _Job, outcome: Outcome, recipes: Sequence[Any], repair_rounds: int, layers_per_round: int) -> _Checked:
    """Every recipe made and verified; the survivors timed interleaved with onnx-fp32; the fastest kept.

    When none survives, the first recipe is repaired (worst-quantized tensors back to float, round by round).
    """
    from cvdeploy.bench.latency import interleaved_latency
    from cvdeploy.build.quantize import quantize_int8

    name = "onnx-int8"
    calib = job.calib(name)
    base_float = [] if job.quantize_head else list(job.head_nodes())
    stage = Path(tempfile.mkdtemp(prefix=".int8-", dir=job.root / "variants"))
    try:
        checked: dict[str, _Checked] = {}
        floats: dict[str, list[str]] = {}
        for recipe in recipes:
            target = stage / f"{recipe.name}.onnx"
            job.step(name, f"quantize · {recipe.name}")
            quantize_int8(job.fp32, target, calib, recipe, float_nodes=base_float)
            checked[recipe.name], floats[recipe.name] = _verify(job, name, target), list(base_float)
            outcome.tried.append(f"{recipe.name}: {len(base_float)} node(s) in float: " + (checked[recipe.name].problem or "ok"))
        first = recipes[0]
        for round_ in range(1, repair_rounds + 1):
            if any(c.problem is None for c in checked.values()):
                break
            # Accuracy-aware repair of the first candidate: the worst-quantized tensors go back to float.
            job.step(name, f"repair {round_}/{repair_rounds} · {first.name}: rank tensors by quantization noise")
            target = stage / f"{first.name}.onnx"
            ordered = _repair_order(job, target, floats[first.name])
            if not ordered:
                break
            floats[first.name] = floats[first.name] + ordered[:layers_per_round]
            quantize_int8(job.fp32, target, calib, first, float_nodes=floats[first.name])
            checked[first.name] = _verify(job, name, target)
            outcome.tried.append(f"{first.name} repair round {round_}: {len(floats[first.name])} node(s) in float: "
                                 + (checked[first.name].problem or "ok"))
        survivors = [r for r in recipes if checked[r.name].problem is None]
        latencies: dict[str, float] = {}
        if survivors:
            job.step(name, f"time {len(survivors)} verified recipe(s) against onnx-fp32, interleaved")
            golden = next(job.bundle.golden())
            models = {"onnx-fp32": (job.fp32, "onnxruntime", "fp32"),
                      **{r.name: (stage / f"{r.name}.onnx", "onnxruntime", "int8") for r in survivors}}
            latencies = interleaved_latency(models, golden.input[:1], **({"timer": job.timer} if job.timer else {}))
        candidates = [{"recipe": r.name, "verified": checked[r.name].problem is None, "problem": checked[r.name].problem,
                       "float_nodes": len(floats[r.name]),
                       "max_abs_scores": _worst_scores(checked[r.name].variant),
                       **{k: checked[r.name].variant.metrics[k] for k in ("box_agreement", "map50_95", "map50_95_drop_points",
                                                                          "top1", "top1_drop_points")
                          if k in checked[r.name].variant.metrics},
                       **({"latency_ms_b1": round(latencies[r.name], 3),
                           "speedup_vs_fp32": round(latencies["onnx-fp32"] / latencies[r.name], 3)} if r.name in latencies else {})}
                      for r in recipes]
        if not survivors:
            worst = checked[first.name]
            return _Checked(worst.variant, worst.problem)
        winner = min(survivors, key=lambda r: latencies[r.name])
        final = job.root / _file_of(name)
        (stage / f"{winner.name}.onnx").replace(final)
        result = checked[winner.name].variant
        result.file, result.sha256 = _file_of(name), sha256_file(final)
        why = (f"fastest of {len(survivors)} verified recipe(s) on this machine: {latencies[winner.name]:.2f} ms against "
               f"{latencies['onnx-fp32']:.2f} ms for onnx-fp32 ({latencies['onnx-fp32'] / latencies[winner.name]:.2f}x), "
               "interleaved at batch 1")
        cpu = cpu_info()
        result.quantization = {**winner.to_dict(), "recipe": winner.name, "why": why, "candidates": candidates,
                               "calib_images": len(calib), "head_in_float": not job.quantize_head,
                               "float_nodes": len(floats[winner.name]), "cpu": cpu.get("model"), "cpu_flags": cpu.get("flags")}
        return _Checked(result, None)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _worst_scores(v: Variant) -> float | None:
    if v.parity is None:
        return None
    return round(v.parity.worst, 5)


def _one(job: _Job, name: str) -> _Checked:
    """onnx-fp16 and the OpenVINO variants: made once, verified."""
    from cvdeploy.build.quantize import convert_fp16

    precision = ALL_VARIANTS[name]
    target = job.root / _file_of(name)
    job.step(name, "convert" if precision != "int8" else "quantize")
    if name == "onnx-fp16":
        convert_fp16(job.fp32, target)
    else:
        _openvino(job.fp32, target, job.calib(name) if precision == "int8" else None, float_head=not job.quantize_head)
    checked = _verify(job, name, target)
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
    job = _Job(bundle, data, calib_images, max_map_drop, quantize_head, step, timer)

    for name in dict.fromkeys(names):  # keep the order, drop repeats
        if name == "onnx-fp32":
            continue
        if name in manifest.variants:  # rebuild: the old entry goes first, so that the bundle never lists a missing file
            del manifest.variants[name]
            manifest.runtime = [h for h in manifest.runtime if h.variant != name]
            bundle.save_manifest()
        _remove(root, name)
        outcome = Outcome(name, False, "")
        outcomes.append(outcome)
        try:
            checked = (_onnx_int8(job, outcome, recipes, repair_rounds, layers_per_round) if name == "onnx-int8"
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
