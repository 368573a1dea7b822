"""onnx-int8 by measurement: every candidate recipe made and verified on this machine, the survivors timed interleaved
with onnx-fp32, the fastest kept; when none verifies, accuracy-aware repair (the worst-quantized tensors back to
float, round by round). Every candidate is recorded with its figures."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.build.variant_job import Checked, Outcome, VariantJob, file_of, verify_made
from cvdeploy.bundle.bundle import sha256_file
from cvdeploy.bundle.environment import cpu_info
from cvdeploy.bundle.manifest import Variant


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


def _repair_order(job: VariantJob, target: Path, float_nodes: Sequence[str]) -> list[str]:
    """Quantized nodes, worst quantization noise (lowest SQNR) first, not yet in float."""
    noise = _quantization_noise(job.fp32, target, job.calib("onnx-int8"), job.bundle.manifest.input.name)
    producer = _producer_map(job.fp32)
    ordered: list[str] = []
    for tensor, _ in sorted(noise.items(), key=lambda kv: kv[1]):
        node = producer.get(tensor)
        if node and node not in float_nodes and node not in ordered:
            ordered.append(node)
    return ordered


def onnx_int8_search(job: VariantJob, outcome: Outcome, recipes: Sequence[Any], repair_rounds: int, layers_per_round: int) -> Checked:
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
        checked: dict[str, Checked] = {}
        floats: dict[str, list[str]] = {}
        for recipe in recipes:
            target = stage / f"{recipe.name}.onnx"
            job.step(name, f"quantize · {recipe.name}")
            quantize_int8(job.fp32, target, calib, recipe, float_nodes=base_float)
            checked[recipe.name], floats[recipe.name] = verify_made(job, name, target), list(base_float)
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
            checked[first.name] = verify_made(job, name, target)
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
            return Checked(worst.variant, worst.problem)
        winner = min(survivors, key=lambda r: latencies[r.name])
        final = job.root / file_of(name)
        (stage / f"{winner.name}.onnx").replace(final)
        result = checked[winner.name].variant
        result.file, result.sha256 = file_of(name), sha256_file(final)
        why = (f"fastest of {len(survivors)} verified recipe(s) on this machine: {latencies[winner.name]:.2f} ms against "
               f"{latencies['onnx-fp32']:.2f} ms for onnx-fp32 ({latencies['onnx-fp32'] / latencies[winner.name]:.2f}x), "
               "interleaved at batch 1")
        cpu = cpu_info()
        result.quantization = {**winner.to_dict(), "recipe": winner.name, "why": why, "candidates": candidates,
                               "calib_images": len(calib), "head_in_float": not job.quantize_head,
                               "float_nodes": len(floats[winner.name]), "cpu": cpu.get("model"), "cpu_flags": cpu.get("flags")}
        return Checked(result, None)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _worst_scores(v: Variant) -> float | None:
    if v.parity is None:
        return None
    return round(v.parity.worst, 5)
