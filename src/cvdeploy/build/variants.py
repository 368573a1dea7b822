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
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cvdeploy.bundle.bundle import Bundle, sha256_file
from cvdeploy.bundle.environment import cpu_info
from cvdeploy.bundle.manifest import Variant
from cvdeploy.errors import BundleError, InputError
from cvdeploy.evaluate.parity import golden_check
from cvdeploy.runtime.onnxruntime import OrtEngine

ONNX_VARIANTS = {"onnx-fp32": "fp32", "onnx-fp16": "fp16", "onnx-int8": "int8"}


def default_variants(have_data: bool) -> list[str]:
    """The sensible set for this machine: FP16 only where a GPU provider runs it; INT8 when there is data to check it."""
    from cvdeploy.runtime.onnxruntime import available_providers

    out = ["onnx-fp32"]
    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(available_providers()):
        out.append("onnx-fp16")
    if have_data:
        out.append("onnx-int8")
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


def median_latency_ms(model: Path, tensor: np.ndarray, iterations: int = 20, warmup: int = 3) -> float:
    from cvdeploy.bench.harness import measure

    engine = OrtEngine(model)
    feeds = {engine.inputs[0].name: tensor}
    _, samples, _, _, _ = measure(lambda i: engine.run(feeds), warmup=warmup, iterations=iterations)
    engine.close()
    return float(np.median(samples))


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
    head's decoding too (a bad idea, kept to show that the guard catches it).
    """
    from cvdeploy.build.quantize import convert_fp16, head_float_nodes, quantize_int8, recipe_for_cpu

    step = on_step or (lambda _v, _s: None)
    unknown = [n for n in names if n not in ONNX_VARIANTS]
    if unknown:
        raise InputError(f"unknown variant(s) {', '.join(unknown)}; this release builds {', '.join(ONNX_VARIANTS)} "
                         "(OpenVINO variants are not built yet)")
    if "onnx-int8" in names and data is None:
        raise InputError("onnx-int8 needs --data DATA.yaml: its images calibrate the quantization and its labels check the mAP")
    if max_map_drop < 0:
        raise InputError(f"max-map-drop must be >= 0 points, got {max_map_drop}")
    bundle = Bundle.load(bundle_path)
    if bundle.root is None:
        raise InputError(f"{bundle_path} is a plain .onnx file; variants are added to a bundle directory")
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
    step("onnx-fp32", "latency")
    base.metrics["latency_ms_b1"] = round(median_latency_ms(fp32, latency_input), 3)
    if data is not None:
        step("onnx-fp32", "mAP")
        base.metrics.update(map_of(bundle, "onnx-fp32", data))
    outcomes = [Outcome("onnx-fp32", True, "reference", base)]
    cpu = cpu_info()
    calib: list[np.ndarray] = []

    for name in names:
        if name == "onnx-fp32":
            continue
        precision = ONNX_VARIANTS[name]
        final = bundle.root / "variants" / f"{name}.onnx"
        tmp = bundle.root / "variants" / f".{name}.tmp.onnx"
        outcome = Outcome(name, False, "")
        try:
            if precision == "fp16":
                step(name, "convert")
                convert_fp16(fp32, tmp)
                float_nodes: list[str] = []
            else:
                if not calib:
                    step(name, "calibration images")
                    calib = calibration_tensors(bundle, data, calib_images)  # type: ignore[arg-type]
                import onnx

                recipe = recipe_for_cpu(cpu.get("flags", []), calib_method)
                float_nodes = [] if quantize_head else head_float_nodes(onnx.load(str(fp32), load_external_data=False))
                step(name, "quantize")
                quantize_int8(fp32, tmp, calib, recipe, float_nodes=float_nodes)
            for round_ in range(repair_rounds + 1):
                step(name, "golden parity")
                parity, agreement, problem = golden_check(bundle, tmp, precision)
                candidate = Variant(file=f"variants/{name}.onnx", format="onnx", precision=precision,  # type: ignore[arg-type]
                                    engine="onnxruntime", sha256=sha256_file(tmp), size_bytes=tmp.stat().st_size, parity=parity)
                metrics: dict[str, float] = {"box_agreement": round(agreement, 4)}
                drop = None
                if problem is None and data is not None:
                    step(name, "mAP")
                    shutil.copyfile(tmp, final)  # the Predictor opens variants by their final path
                    try:
                        metrics.update(map_of(_with_variant(bundle, name, candidate), name, data))
                    finally:
                        final.unlink(missing_ok=True)
                    drop = 100.0 * (base.metrics["map50_95"] - metrics["map50_95"])
                    metrics["map50_95_drop_points"] = round(drop, 3)
                    if drop > max_map_drop:
                        problem = f"mAP50-95 drops by {drop:.2f} points (budget {max_map_drop:g})"
                label = f"round {round_}: {len(float_nodes)} node(s) in float"
                outcome.tried.append(f"{label}: " + ("ok" if problem is None else problem))
                if problem is None or precision != "int8" or round_ == repair_rounds:
                    break
                # Accuracy-aware repair: the worst-quantized tensors go back to float.
                step(name, f"repair round {round_ + 1}: rank tensors by quantization noise")
                noise = _quantization_noise(fp32, tmp, calib, manifest.input.name)
                producer = _producer_map(fp32)
                ordered: list[str] = []
                for tensor, _ in sorted(noise.items(), key=lambda kv: kv[1]):  # lowest SQNR first
                    node = producer.get(tensor)
                    if node and node not in float_nodes and node not in ordered:
                        ordered.append(node)
                if not ordered:
                    break
                float_nodes = float_nodes + ordered[:layers_per_round]
                step(name, "quantize")
                quantize_int8(fp32, tmp, calib, recipe, float_nodes=float_nodes)
            if problem is not None:
                outcome.reason = problem
                continue
            step(name, "latency")
            metrics["latency_ms_b1"] = round(median_latency_ms(tmp, latency_input), 3)
            metrics["speedup_vs_fp32"] = round(base.metrics["latency_ms_b1"] / metrics["latency_ms_b1"], 3)
            candidate.metrics = metrics
            if precision == "int8":
                candidate.quantization = {**recipe.to_dict(), "calib_images": len(calib), "float_nodes": len(float_nodes),
                                          "head_in_float": not quantize_head}
            os.replace(tmp, final)
            manifest.variants[name] = candidate
            outcome.written, outcome.reason, outcome.variant = True, "verified", candidate
        finally:
            tmp.unlink(missing_ok=True)
            outcomes.append(outcome)
        bundle.save_manifest()
    bundle.save_manifest()
    return outcomes
