"""Optimized variants added to a bundle, each verified against its source before it is written.

A variant enters the bundle only when (a) its outputs on the golden inputs are finite and agree
with the source model's (raw error per output and box-level agreement after decoding), and
(b) with a controlled dataset, its mAP50-95 is within the budget of the FP32 variant's. Its
figures (parity, mAP, median latency at batch 1 on this machine) go into the manifest.

INT8 is accuracy-aware: when the drop is over budget, the tensors with the worst quantization
noise (signal-to-quantization-noise ratio of float against quantized activations) are moved back
to float a few layers at a time, until the budget holds or the rounds run out; then the variant
is refused with what was tried.
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

import numpy as np

from cvdeploy.bundle.bundle import Bundle, sha256_file
from cvdeploy.bundle.environment import cpu_info
from cvdeploy.bundle.manifest import Variant
from cvdeploy.errors import BundleError, InputError
from cvdeploy.evaluate.parity import golden_check

ONNX_VARIANTS = {"onnx-fp32": "fp32", "onnx-fp16": "fp16", "onnx-int8": "int8"}
OPENVINO_VARIANTS = {"openvino-fp32": "fp32", "openvino-int8": "int8"}
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


@dataclass
class Outcome:
    """What happened to one requested variant."""

    name: str
    written: bool
    reason: str
    variant: Variant | None = None
    tried: list[str] = field(default_factory=list)  # INT8 repair rounds


# -- measurements ----------------------------------------------------------------------------------


def _with_variant(bundle: Bundle, name: str, variant: Variant) -> Bundle:
    manifest = bundle.manifest.model_copy(update={"variants": {**bundle.manifest.variants, name: variant}})
    return Bundle(manifest, bundle.root)


def map_of(bundle: Bundle, name: str, data: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> dict[str, float]:
    from cvdeploy.evaluate import evaluate_detect
    from cvdeploy.predict import Predictor

    with Predictor(bundle, name) as p:
        m = evaluate_detect(p, data, progress=progress)
    return {"map50_95": round(m.map50_95, 5), "map50": round(m.map50, 5)}


# -- calibration and conversion -------------------------------------------------------------------


def calibration_tensors(bundle: Bundle, data: str | os.PathLike[str], n: int) -> list[np.ndarray]:
    """`n` training images (val if the set has no train split) through the bundle's own preprocessing, square."""
    from dataclasses import replace

    from cvdeploy.evaluate.coco import load_yolo_split
    from cvdeploy.vision.image import load_image
    from cvdeploy.vision.letterbox import preprocess

    if n < 1:
        raise InputError(f"calibration needs at least 1 image, got {n}")
    try:
        images, _ = load_yolo_split(data, "train")
    except InputError:
        images, _ = load_yolo_split(data, "val")
    if not images:
        raise InputError(f"{data}: no images to calibrate on")
    spec = replace(bundle.manifest.preprocess.letterbox(), rect=False)
    step = max(1, len(images) // n)
    return [preprocess([load_image(im.path)], spec)[0] for im in images[::step][:n]]


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


# -- the public entry point -----------------------------------------------------------------------


def _file_of(name: str) -> str:
    return f"variants/{name}/model.xml" if name in OPENVINO_VARIANTS else f"variants/{name}.onnx"


def _remove(root: Path, name: str) -> None:
    target = root / "variants" / (name if name in OPENVINO_VARIANTS else f"{name}.onnx")
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)


def _openvino(fp32: Path, out_xml: Path, calib: Sequence[np.ndarray] | None, float_head: bool) -> None:
    """Convert the ONNX FP32 model to OpenVINO IR; with `calib`, quantize it to INT8 with NNCF."""
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
    on_step: Callable[[str, str], None] | None = None,
) -> list[Outcome]:
    """Make, verify and add the variants `names` to the bundle at `bundle_path`; return what happened to each.

    `max_map_drop` is in mAP50-95 points (1.0 = 0.01). `quantize_head=True` quantizes the YOLO
    head's decoding too (a bad idea, kept to show that the guard catches it). A variant already
    in the bundle is rebuilt.
    """
    from cvdeploy.build.quantize import convert_fp16, head_float_nodes, quantize_int8, recipe_for_cpu

    t_start = time.perf_counter()
    step = on_step or (lambda _v, _s: None)
    unknown = [n for n in names if n not in ALL_VARIANTS]
    if unknown:
        raise InputError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(ALL_VARIANTS)}")
    needs_data = [n for n in names if ALL_VARIANTS[n] == "int8"]
    if needs_data and data is None:
        raise InputError(f"{', '.join(needs_data)} needs --data DATA.yaml: its images calibrate the quantization and its labels "
                         "check the mAP")
    if max_map_drop < 0:
        raise InputError(f"max-map-drop must be >= 0 points, got {max_map_drop}")
    bundle = Bundle.load(bundle_path)
    if bundle.root is None:
        raise InputError(f"{bundle_path} is a plain .onnx file; variants are added to a bundle directory")
    root = bundle.root
    if "onnx-fp32" not in bundle.manifest.variants:
        raise BundleError(f"bundle {bundle.name!r} has no onnx-fp32 variant to derive variants from")
    fp32 = bundle.variant_path("onnx-fp32")
    golden = next(bundle.golden(), None)
    if golden is None:
        raise BundleError(f"bundle {bundle.name!r} has no golden cases to verify variants against")
    latency_input = golden.input[:1]
    manifest = bundle.manifest

    # The reference figures: the FP32 variant on this machine and the controlled set.
    base = manifest.variants["onnx-fp32"]
    if data is not None:
        step("onnx-fp32", "mAP")
        base.metrics.update(map_of(bundle, "onnx-fp32", data))
    bundle.save_manifest()
    outcomes = [Outcome("onnx-fp32", True, "reference", base)]
    recipe = recipe_for_cpu(cpu_info().get("flags", []), calib_method)
    calib: list[np.ndarray] = []
    head_nodes: list[str] | None = None

    for name in dict.fromkeys(names):  # keep the order, drop repeats
        if name == "onnx-fp32":
            continue
        precision = ALL_VARIANTS[name]
        kind = "openvino" if name in OPENVINO_VARIANTS else "onnxruntime"
        if name in manifest.variants:  # rebuild: the old entry goes first, so that the bundle never lists a missing file
            del manifest.variants[name]
            manifest.runtime = [h for h in manifest.runtime if h.variant != name]
            bundle.save_manifest()
        _remove(root, name)
        target = root / _file_of(name)
        outcome = Outcome(name, False, "")
        outcomes.append(outcome)
        if precision == "int8" and not calib:
            step(name, "calibration images")
            calib = calibration_tensors(bundle, data, calib_images)  # type: ignore[arg-type]
        if head_nodes is None:
            import onnx

            head_nodes = head_float_nodes(onnx.load(str(fp32), load_external_data=False))
        float_nodes: list[str] = [] if quantize_head or precision != "int8" else list(head_nodes)
        try:
            problem: str | None = None
            for round_ in range(repair_rounds + 1):
                step(name, {"fp16": "convert", "fp32": "convert"}.get(precision, "quantize"))
                if name == "onnx-fp16":
                    convert_fp16(fp32, target)
                elif name == "onnx-int8":
                    quantize_int8(fp32, target, calib, recipe, float_nodes=float_nodes)
                else:
                    _openvino(fp32, target, calib if precision == "int8" else None, float_head=not quantize_head)
                step(name, "golden parity")
                parity, agreement, problem = golden_check(bundle, target, precision, engine_kind=kind)
                companions = {} if kind == "onnxruntime" else {
                    str(target.with_suffix(".bin").relative_to(root)): sha256_file(target.with_suffix(".bin"))}
                candidate = Variant(file=_file_of(name), format="openvino" if kind == "openvino" else "onnx",  # type: ignore[arg-type]
                                    precision=precision, engine=kind, sha256=sha256_file(target),  # type: ignore[arg-type]
                                    size_bytes=sum(f.stat().st_size for f in [target, *(root / c for c in companions)]),
                                    companions=companions, parity=parity)
                metrics: dict[str, float] = {"box_agreement": round(agreement, 4)}
                if problem is None and data is not None:
                    step(name, "mAP")
                    metrics.update(map_of(_with_variant(bundle, name, candidate), name, data))
                    drop = 100.0 * (base.metrics["map50_95"] - metrics["map50_95"])
                    metrics["map50_95_drop_points"] = round(drop, 3)
                    if drop > max_map_drop:
                        problem = f"mAP50-95 drops by {drop:.2f} points (budget {max_map_drop:g})"
                if precision == "int8":
                    where = f"{len(float_nodes)} node(s) in float" if kind == "onnxruntime" else \
                        ("head decoding in float" if not quantize_head else "head quantized too")
                    outcome.tried.append(f"round {round_}: {where}: " + ("ok" if problem is None else problem))
                if problem is None or name != "onnx-int8" or round_ == repair_rounds:
                    break
                # Accuracy-aware repair: the worst-quantized tensors go back to float.
                step(name, f"repair {round_ + 1}/{repair_rounds}: rank tensors by quantization noise")
                noise = _quantization_noise(fp32, target, calib, manifest.input.name)
                producer = _producer_map(fp32)
                ordered: list[str] = []
                for tensor, _ in sorted(noise.items(), key=lambda kv: kv[1]):  # lowest SQNR first
                    node = producer.get(tensor)
                    if node and node not in float_nodes and node not in ordered:
                        ordered.append(node)
                if not ordered:
                    break
                float_nodes = float_nodes + ordered[:layers_per_round]
            if problem is not None:
                outcome.reason = problem
                _remove(root, name)
                continue
            candidate.metrics = metrics
            if precision == "int8":
                candidate.quantization = {
                    **(recipe.to_dict() if kind == "onnxruntime" else {"tool": "nncf", "preset": "mixed"}),
                    "calib_images": len(calib), "head_in_float": not quantize_head,
                    **({"float_nodes": len(float_nodes)} if kind == "onnxruntime" else {}),
                }
            manifest.variants[name] = candidate
            bundle.save_manifest()
            outcome.written, outcome.reason, outcome.variant = True, "verified", candidate
        except BaseException:
            _remove(root, name)
            raise
    step("all variants", "latency, interleaved")
    latencies = interleaved_latency(bundle, list(manifest.variants), latency_input)
    for n, ms in latencies.items():
        manifest.variants[n].metrics["latency_ms_b1"] = round(ms, 3)
        if n != "onnx-fp32":
            manifest.variants[n].metrics["speedup_vs_fp32"] = round(latencies["onnx-fp32"] / ms, 3)
    bundle.save_manifest()
    write_report(bundle, outcomes, time.perf_counter() - t_start)
    return outcomes


def write_report(bundle: Bundle, outcomes: Sequence[Outcome] = (), wall_s: float | None = None) -> Path:
    from cvdeploy.report import bundle_report

    assert bundle.root is not None
    out = bundle.root / "report.html"
    out.write_text(bundle_report(bundle.manifest, outcomes, wall_s))
    return out


def interleaved_latency(bundle: Bundle, names: Sequence[str], tensor: np.ndarray, rounds: int = 6, per_round: int = 5,
                        warmup: int = 3) -> dict[str, float]:
    """Median batch-1 latency of each variant, timed in interleaved rounds so that machine noise hits all alike."""
    from cvdeploy.runtime import open_engine

    engines = {n: open_engine(bundle.variant_path(n), bundle.manifest.variants[n].engine) for n in names}
    feeds = {n: {e.inputs[0].name: tensor} for n, e in engines.items()}
    samples: dict[str, list[float]] = {n: [] for n in names}
    for n, e in engines.items():
        for _ in range(warmup):
            e.run(feeds[n])
    for _ in range(rounds):
        for n, e in engines.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                e.run(feeds[n])
                samples[n].append((time.perf_counter() - t0) * 1000.0)
    for e in engines.values():
        e.close()
    return {n: float(np.median(v)) for n, v in samples.items()}
