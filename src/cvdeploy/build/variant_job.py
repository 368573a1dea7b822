"""One `add_variants` call's shared state (`VariantJob`), the names and files of the ONNX and OpenVINO variants,
and the check every made variant goes through (`verify_made`: golden parity, box agreement, accuracy budget)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.build.variant_checks import accuracy_check, calibration_tensors
from cvdeploy.bundle.bundle import Bundle, sha256_file
from cvdeploy.bundle.manifest import Variant
from cvdeploy.evaluate.parity import golden_check

ONNX_VARIANTS = {"onnx-fp32": "fp32", "onnx-fp16": "fp16", "onnx-int8": "int8"}
OPENVINO_VARIANTS = {"openvino-fp32": "fp32", "openvino-bf16": "bf16", "openvino-int8": "int8"}
ALL_VARIANTS = {**ONNX_VARIANTS, **OPENVINO_VARIANTS}


@dataclass
class Outcome:
    """What happened to one requested variant."""

    name: str
    written: bool
    reason: str
    variant: Variant | None = None
    tried: list[str] = field(default_factory=list)  # INT8 candidates and repair rounds


def file_of(name: str) -> str:
    return f"variants/{name}/model.xml" if name in OPENVINO_VARIANTS else f"variants/{name}.onnx"


@dataclass
class VariantJob:
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
class Checked:
    """A made variant file and what its verification found."""

    variant: Variant
    problem: str | None


def verify_made(job: VariantJob, name: str, target: Path) -> Checked:
    """Golden parity (raw outputs and boxes) and, with data, the mAP budget; the variant's record either way."""
    precision = ALL_VARIANTS[name]
    kind = "openvino" if name in OPENVINO_VARIANTS else "onnxruntime"
    job.step(name, "golden parity")
    parity, agreement, problem = golden_check(job.bundle, target, precision, engine_kind=kind)
    companions = weight_companions(job.root, target, kind)
    variant = Variant(file=str(target.relative_to(job.root)), format="openvino" if kind == "openvino" else "onnx",  # type: ignore[arg-type]
                      precision=precision, engine=kind, sha256=sha256_file(target),  # type: ignore[arg-type]
                      size_bytes=sum(f.stat().st_size for f in [target, *(job.root / c for c in companions)]),
                      companions=companions, parity=parity, metrics={"box_agreement": round(agreement, 4)})
    if problem is None and job.data is not None:
        problem = accuracy_check_of(job, name, variant)
    return Checked(variant, problem)


def accuracy_check_of(job: VariantJob, name: str, variant: Variant) -> str | None:
    return accuracy_check(job.bundle, name, variant, job.data, job.max_map_drop, job.step)  # type: ignore[arg-type]


def forget_variant(bundle: Bundle, name: str) -> None:
    """Drop `name`'s manifest entry (and its latency records) before it is rebuilt, saved at once: the manifest never
    lists a file that is being replaced."""
    manifest = bundle.manifest
    if name in manifest.variants:
        del manifest.variants[name]
        manifest.runtime = [h for h in manifest.runtime if h.variant != name]
        bundle.save_manifest()


def weight_companions(root: Path, target: Path, kind: str) -> dict[str, str]:
    """The files a model file needs beside it (OpenVINO IR: its `.bin` weights), relative to `root`, -> sha256."""
    if kind != "openvino":
        return {}
    weights = target.with_suffix(".bin")
    return {str(weights.relative_to(root)): sha256_file(weights)}
