"""Edge variants (NCNN for Arm CPUs, LiteRT for Android), exported from the bundle's source .pt and verified like the rest.

    ncnn-fp32     Ultralytics' NCNN export (PNNX), run by NCNN with fp16 and bf16 pinned off
    ncnn-fp16     the same with fp16 weights; NCNN computes in fp16 where the CPU can (Arm half-precision arithmetic)
    litert-fp32   Ultralytics' LiteRT export (litert-torch), run by ai-edge-litert (XNNPACK)
    litert-int8   the same, static INT8 (ai-edge-quantizer, calibrated on the same images as onnx-int8): int8 weights and
                  int8 activations in every op but the head's decoding, kept in float32 as in onnx-int8 (`LITERT_FLOAT_SCOPES`)

Unlike the ONNX and OpenVINO variants these are not derived from onnx-fp32: Ultralytics exports them from the torch
model (PNNX and litert-torch trace it), so the build needs the source .pt, and checks its sha256 against the one the
bundle recorded. Each variant is verified before it is written: golden parity (its own tolerance by precision), box
agreement, the mAP budget (1.0 point for fp32/fp16, 2.0 for INT8, against onnx-fp32 on the same
controlled set), then all are timed interleaved with onnx-fp32.

Both graphs take one fixed size (the export's imgsz; the head's anchor count is baked in), so the golden cases of
another size (minimal-padding rectangles) cannot run on them: those inputs are padded to the fixed size and compared
with onnx-fp32's outputs on the same padded tensors (onnx-fp32 itself was verified against torch on the originals);
the cases already at that size are compared with the source model's stored outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.build.variants import Outcome, accuracy_check, calibration_tensors, map_of
from cvdeploy.bundle.bundle import Bundle, set_bundle_modes, sha256_file
from cvdeploy.bundle.manifest import Variant
from cvdeploy.errors import BundleError, CvdeployError, InputError, MissingDependencyError
from cvdeploy.evaluate.fixed_size import edge_golden_check, fixed_size_cases

EDGE_VARIANTS = {"ncnn-fp32": "fp32", "ncnn-fp16": "fp16", "litert-fp32": "fp32", "litert-int8": "int8"}
ENGINE = {"ncnn": "ncnn", "litert": "litert"}  # variant prefix -> engine kind
# mAP50-95 budget (points against onnx-fp32): INT8 quantizes every activation but the head's decoding.
MAX_MAP_DROP = {"fp32": 1.0, "fp16": 1.0, "int8": 2.0}
# What Ultralytics' exporters check for (and would try to pip-install at run time): checked here first, so that a
# missing package is named with its extra instead of being fetched. PNNX is pinned by Ultralytics itself.
EXPORT_REQUIREMENTS = {
    "ncnn": ("ncnn", "pnnx==20260526"),
    "litert": ("litert-torch>=0.10.0", "ai-edge-litert>=2.3.0"),
    "litert-int8": ("litert-torch>=0.10.0", "ai-edge-litert>=2.3.0", "ai-edge-quantizer>=0.10.0"),
}
NCNN_FILES = ("model.ncnn.param", "model.ncnn.bin", "metadata.yaml")


def engine_of(name: str) -> str:
    return ENGINE[name.split("-", 1)[0]]


def variant_file(name: str) -> str:
    """The variant's main file, relative to the bundle root."""
    return f"variants/{name}/model.ncnn.param" if engine_of(name) == "ncnn" else f"variants/{name}.tflite"


def _remove(root: Path, name: str) -> None:
    target = root / "variants" / (name if engine_of(name) == "ncnn" else f"{name}.tflite")
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)


def check_export_requirements(name: str) -> None:
    """Raise MissingDependencyError naming the first package Ultralytics' exporter for `name` would want to install."""
    from packaging.requirements import Requirement  # with the build extra (Ultralytics -> matplotlib)

    key = "litert-int8" if name == "litert-int8" else engine_of(name)
    for spec in EXPORT_REQUIREMENTS[key]:
        req = Requirement(spec)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            version = None
        if version is None or (req.specifier and version not in req.specifier):
            found = f" (found {version})" if version else ""
            raise MissingDependencyError(f"{spec}{found}", "edge-build", f"building {name}")


# -- export --------------------------------------------------------------------------------------


def _exporter(calib: Sequence[np.ndarray] | None) -> Any:
    """Ultralytics' Exporter, whose LiteRT INT8 export is quantized by `quantize_litert_int8` on `calib` (the bundle's
    own letterboxed images, as for onnx-int8) instead of by Ultralytics' plain `static_wi8_ai8` recipe."""
    from ultralytics.engine.exporter import Exporter

    class _CalibratedExporter(Exporter):
        def export_litert(self, prefix: str = "") -> str:
            if self.args.quantize != 8:
                return str(super().export_litert())
            from ultralytics.utils.export.litert import torch2litert

            # The float graph as Ultralytics' INT8 export traces it (coordinates normalized, end2end already disabled by
            # the Exporter for quantize=8), then quantized here; its metadata (args.quantize=8) is appended again.
            made = Path(torch2litert(self.model, self.im, self.file, metadata=self.metadata))
            out = made.with_name(f"{made.stem}_int8.tflite")
            quantize_litert_int8(made, out, calib or [])
            with zipfile.ZipFile(out, "a", zipfile.ZIP_DEFLATED) as zf:
                zf.writestr("metadata.json", json.dumps(self.metadata, default=str))
            return str(out)

    return _CalibratedExporter


# The head's decoding: DFL (softmax and expectation), the box arithmetic (anchors, strides), the scores' sigmoid, the
# coordinate normalization and the output's concat. Matched on ai-edge-quantizer's op scopes: the op's output tensor
# names, each followed by ";" (so a "$" anchor never matches). The head's own ops are named `...head.Detect_23;N`, its
# cv2/cv3 convolutions `...head.Detect_23/torch.nn...`: those stay int8, as in onnx-int8 (`quantize.head_float_nodes`).
# In int8 this chain costs ~10 points of mAP50-95 on the demo model: its pixel boxes (about -130..690 over all
# anchors) get a 2-pixel step, its grid-unit distances a 1.2-4.7-pixel one (docs/edge.md).
LITERT_FLOAT_SCOPES = r"(\.head\.\w+_\d+;|\.block\.DFL_|\._NormalizeCoords;|^serving_default_output)"


def quantize_litert_int8(float_tflite: Path, out: Path, calib: Sequence[np.ndarray]) -> int:
    """Static INT8 of a litert-torch graph (int8 weights per channel, int8 asymmetric activations per tensor, float
    graph input and output), the head's decoding kept in float32; return how many float32 tensors the decoding kept.

    Raises CvdeployError when `LITERT_FLOAT_SCOPES` matched nothing or the head's decoding came out quantized anyway:
    a pattern that silently matches nothing would bring the 10-point loss back.
    """
    from ai_edge_quantizer import qtyping, quantizer, recipe

    if not calib:
        raise InputError("litert-int8 needs calibration images")
    qt = quantizer.Quantizer(str(float_tflite))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    keep = recipe.AlgorithmName.NO_QUANTIZE
    for op in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):  # float I/O, as Ultralytics does
        qt.update_quantization_recipe(regex=".*", operation_name=op, algorithm_key=keep)
    qt.update_quantization_recipe(regex=LITERT_FLOAT_SCOPES, operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                  algorithm_key=keep)
    # Ultralytics' signature and input names for litert-torch graphs; batch-1 tensors, pixels / 255, NCHW RGB.
    result = qt.calibrate({"serving_default": [{"args_0": np.ascontiguousarray(x, np.float32)} for x in calib]},
                          num_threads=os.cpu_count() or 1)
    qt.quantize(calibration_result=result).export_model(str(out), overwrite=True)
    return float_head_tensors(out)


def float_head_tensors(tflite: Path) -> int:
    """How many of the graph's float32 tensors `LITERT_FLOAT_SCOPES` matches; none it matches may be int8/int16 (the
    int32 ones are shapes, slice bounds and indices)."""
    import re

    from cvdeploy.runtime.litert import _interpreter

    interp = _interpreter()(model_path=str(tflite))
    interp.allocate_tensors()
    matched = [d for d in interp.get_tensor_details()
               if re.search(LITERT_FLOAT_SCOPES, f"{d['name']};") and not d["name"].endswith(("_dequant", "_quantized"))]
    quantized = sorted(d["name"] for d in matched if d["dtype"] in (np.int8, np.uint8, np.int16))
    kept = sum(d["dtype"] == np.float32 for d in matched)
    if not kept or quantized:
        raise CvdeployError(f"litert-int8: the head's decoding was not kept in float ({len(matched)} tensors matched "
                            f"{LITERT_FLOAT_SCOPES!r}, quantized: {quantized[:3]}); litert-torch's op names may have changed")
    return kept


def export_edge(source_pt: Path, name: str, imgsz: tuple[int, int], out_dir: Path, calib: Sequence[np.ndarray] | None = None) -> Path:
    """Export `source_pt` to the edge variant `name` with Ultralytics, in a scratch copy; return what it wrote."""
    from cvdeploy.build.export import _quiet_ultralytics, _require_build_deps

    check_export_requirements(name)
    _require_build_deps()
    from ultralytics import YOLO

    local = out_dir / source_pt.name  # Ultralytics writes next to the weights
    shutil.copyfile(source_pt, local)
    yolo = YOLO(str(local))
    # As `YOLO.export` builds them (training arguments, then the exporter's defaults), at a fixed size and batch 1.
    args = {**yolo.overrides, "imgsz": list(imgsz), "batch": 1, "data": None, "device": "cpu", "verbose": False,
            "mode": "export", "format": "ncnn" if engine_of(name) == "ncnn" else "litert"}
    if name == "ncnn-fp16":
        args["quantize"] = 16
    if name == "litert-int8":
        args["quantize"] = 8  # quantized by _exporter on the bundle's images, not on a dataset Ultralytics loads
    with _quiet_ultralytics():
        try:
            made = Path(_exporter(calib)(overrides=args)(model=yolo.model))
        except CvdeployError:
            raise
        except Exception as e:
            raise CvdeployError(f"Ultralytics could not export {source_pt.name} to {name}: {e}") from e
    return made


def _place(root: Path, name: str, made: Path, imgsz: tuple[int, int]) -> tuple[Path, dict[str, str]]:
    """Move the export into the bundle; return the main file and the companions (relative path -> sha256)."""
    from cvdeploy.runtime.ncnn import set_input_shape

    if engine_of(name) == "litert":
        target = root / variant_file(name)
        shutil.move(str(made), target)
        return target, {}
    folder = root / "variants" / name
    folder.mkdir(parents=True)
    for f in NCNN_FILES:  # the folder stays an Ultralytics NCNN model directory (model_ncnn.py, a demo script, is left out)
        shutil.move(str(made / f), folder / f)
    param = folder / NCNN_FILES[0]
    # The graph's size is written into its Input layer, so that the .param alone says what it takes.
    param.write_text(set_input_shape(param.read_text(), 3, *imgsz))
    return param, {str((folder / f).relative_to(root)): sha256_file(folder / f) for f in NCNN_FILES[1:]}


# -- verification --------------------------------------------------------------------------------


def _verify(bundle: Bundle, name: str, target: Path, companions: dict[str, str], data: Any, budget: float,
            step: Callable[[str, str], None]) -> tuple[Variant, str | None]:
    assert bundle.root is not None
    precision, kind = EDGE_VARIANTS[name], engine_of(name)
    step(name, "golden parity")
    parity, agreement, problem = edge_golden_check(bundle, target, kind, precision)
    size = target.stat().st_size + sum((bundle.root / c).stat().st_size for c in companions)
    variant = Variant(file=variant_file(name), format="ncnn" if kind == "ncnn" else "tflite", engine=kind,  # type: ignore[arg-type]
                      precision=precision, sha256=sha256_file(target), size_bytes=size,  # type: ignore[arg-type]
                      companions=companions, parity=parity, metrics={"box_agreement": round(agreement, 4)})
    if problem is None and data is not None:
        problem = accuracy_check(bundle, name, variant, data, budget, step)
    return variant, problem


def _exporters_version() -> str:
    versions = []
    for pkg in ("ultralytics", "pnnx", "ncnn", "litert-torch", "ai-edge-quantizer"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{pkg} {metadata.version(pkg)}")
    return ", ".join(versions)


# -- the public entry point -----------------------------------------------------------------------


def add_edge_variants(
    bundle_path: str | os.PathLike[str],
    names: Sequence[str],
    *,
    source: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    calib_images: int = 64,
    max_map_drop: dict[str, float] | None = None,
    on_step: Callable[[str, str], None] | None = None,
    timer: Any = None,
) -> list[Outcome]:
    """Export, verify and add the edge variants `names` to the bundle at `bundle_path`; return what happened to each.

    `source` is the bundle's source .pt (its sha256 must be the one the bundle recorded). `max_map_drop` overrides the
    budget per precision (`MAX_MAP_DROP`, points of mAP50-95). The written variants are timed at batch 1, interleaved
    with onnx-fp32, at their fixed input size; `timer(label, call) -> ms` replaces the wall clock (tests). A variant
    already in the bundle is rebuilt. A refused variant leaves no file.
    """
    from cvdeploy.bench.latency import interleaved_latency

    step = on_step or (lambda _v, _s: None)
    unknown = [n for n in names if n not in EDGE_VARIANTS]
    if unknown:
        raise InputError(f"unknown edge variant(s) {', '.join(unknown)}; choose from {', '.join(EDGE_VARIANTS)}")
    if "litert-int8" in names and data is None:
        raise InputError("litert-int8 needs --data DATA.yaml: its images calibrate the quantization and its labels check the mAP")
    budgets = {**MAX_MAP_DROP, **(max_map_drop or {})}
    if any(b < 0 for b in budgets.values()):
        raise InputError(f"max-map-drop must be >= 0 points, got {budgets}")
    for n in names:  # before any slow step
        check_export_requirements(n)
    src = Path(source)
    if not src.is_file():
        raise InputError(f"source model not found: {src}")
    bundle = Bundle.load(bundle_path)
    if bundle.root is None:
        raise InputError(f"{bundle_path} is a plain .onnx file; variants are added to a bundle directory")
    manifest, root = bundle.manifest, bundle.root
    if manifest.source.format != "pt" or sha256_file(src) != manifest.source.sha256:
        raise InputError(f"{src} is not this bundle's source model (the bundle was built from {manifest.source.file}, sha256 "
                         f"{manifest.source.sha256[:12]}...): edge variants are exported from the very .pt the bundle was built from")
    if "onnx-fp32" not in manifest.variants:
        raise BundleError(f"bundle {bundle.name!r} has no onnx-fp32 variant to compare the edge variants with")
    imgsz = tuple(manifest.preprocess.imgsz)
    base = manifest.variants["onnx-fp32"]
    if data is not None:
        step("onnx-fp32", "mAP")
        base.metrics.update(map_of(bundle, "onnx-fp32", data))
        bundle.save_manifest()
    calib: list[np.ndarray] | None = None
    outcomes = [Outcome("onnx-fp32", True, "reference", base)]
    written: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cvdeploy-edge-") as tmp:
        for name in dict.fromkeys(names):
            if name in manifest.variants:  # rebuild: the old entry goes first, so the bundle never lists a missing file
                del manifest.variants[name]
                bundle.save_manifest()
            _remove(root, name)
            outcome = Outcome(name, False, "")
            outcomes.append(outcome)
            if name == "litert-int8" and calib is None:
                step(name, "calibration images")
                calib = calibration_tensors(bundle, data, calib_images)  # type: ignore[arg-type]
            work = Path(tmp) / name
            work.mkdir()
            t0 = time.perf_counter()
            step(name, "export")
            try:
                made = export_edge(src, name, imgsz, work, calib if name == "litert-int8" else None)  # type: ignore[arg-type]
                target, companions = _place(root, name, made, imgsz)  # type: ignore[arg-type]
                variant, problem = _verify(bundle, name, target, companions, data, budgets[EDGE_VARIANTS[name]], step)
            except BaseException:
                _remove(root, name)
                raise
            if problem is not None:
                outcome.reason = problem
                outcome.variant = variant
                _remove(root, name)
                continue
            variant.quantization = _recipe(name, calib)
            variant.metrics["build_s"] = round(time.perf_counter() - t0, 2)
            manifest.variants[name] = variant
            bundle.save_manifest()
            outcome.written, outcome.reason, outcome.variant = True, "verified", variant
            written.append(name)
    if written:
        step("edge variants", "latency against onnx-fp32, interleaved")
        x = next((x for x, _, r in fixed_size_cases(bundle, imgsz) if r == "source"), None)  # type: ignore[arg-type]
        tensor = x[:1] if x is not None else np.full((1, 3, *imgsz), 0.5, np.float32)
        models = {n: (bundle.variant_path(n), manifest.variants[n].engine, manifest.variants[n].precision)
                  for n in ["onnx-fp32", *written]}
        ms = interleaved_latency(models, tensor, **({"timer": timer} if timer else {}))
        for n in written:
            manifest.variants[n].metrics["latency_ms_b1"] = round(ms[n], 3)
            manifest.variants[n].metrics["speedup_vs_fp32"] = round(ms["onnx-fp32"] / ms[n], 3)
        bundle.save_manifest()
    set_bundle_modes(root)
    return outcomes


def _recipe(name: str, calib: Sequence[np.ndarray] | None) -> dict[str, Any] | None:
    """What the conversion did, for the manifest (`quantization`)."""
    common = {"exporter": _exporters_version()}
    if name == "ncnn-fp16":
        return {**common, "weights": "fp16", "compute": "fp16 where the CPU has half-precision arithmetic (Arm), else fp32"}
    if name == "litert-int8":
        return {**common, "tool": "ai-edge-quantizer", "recipe": "static_wi8_ai8, head decoding float",
                "weights": "int8 (per channel)", "activations": "int8 (per tensor, asymmetric)",
                "float_ops": "the head's decoding: DFL, box arithmetic, score sigmoid, output concat (LITERT_FLOAT_SCOPES)",
                "io": "float32 (quantized and dequantized at the graph's edges)", "calib_images": len(calib or []),
                "box_coordinates": "divided by the input size in the graph"}
    return common
