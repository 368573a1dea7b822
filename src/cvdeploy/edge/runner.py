"""What the edge runner runs: which variant this device can run, and the frames it reads (files, a folder, a video, a camera).

Kept to the standard library, NumPy and OpenCV: the engine itself is imported by `runtime.open_engine` when the
Predictor opens the chosen variant, and only that one.
"""

from __future__ import annotations

import importlib.util
import platform
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cvdeploy.bundle import Bundle
from cvdeploy.errors import InputError, MissingDependencyError

# Edge variants first (what the runner is for), then the ONNX ones as a fallback where only ONNX Runtime is installed.
EDGE_ORDER = ("ncnn-fp32", "ncnn-fp16", "litert-int8", "litert-fp32", "onnx-int8", "onnx-fp32")
_ENGINE_MODULES = {"ncnn": ("ncnn",), "litert": ("ai_edge_litert", "tflite_runtime"), "onnxruntime": ("onnxruntime",),
                   "openvino": ("openvino",)}
_EXTRA = {"ncnn": "ncnn", "litert": "ai-edge-litert", "onnxruntime": "onnxruntime", "openvino": "openvino"}
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
_ARM = ("aarch64", "arm64", "armv8l", "armv7l")


def engine_installed(kind: str) -> bool:
    """Whether the engine `kind` can be imported here (looked up, not imported)."""
    return any(importlib.util.find_spec(m) is not None for m in _ENGINE_MODULES.get(kind, ()))


def _order(machine: str) -> tuple[str, ...]:
    if machine.lower() in _ARM:  # Arm CPUs with half-precision arithmetic run NCNN's fp16 faster; elsewhere it is f32
        return ("ncnn-fp16", "ncnn-fp32", *EDGE_ORDER[2:])
    return EDGE_ORDER


def choose_edge_variant(bundle: Bundle, requested: str | None = None, *, machine: str | None = None) -> tuple[str, str]:
    """(variant, why): `requested`, checked; else the first verified variant of `EDGE_ORDER` whose engine is installed
    (on Arm, ncnn-fp16 before ncnn-fp32); else the bundle's default if its engine is installed."""
    variants = bundle.manifest.variants
    if requested is not None:
        if requested not in variants:
            raise InputError(f"bundle {bundle.name!r} has no variant {requested!r}; it has {', '.join(variants)}")
        kind = variants[requested].engine
        if not engine_installed(kind):
            raise MissingDependencyError(_EXTRA[kind], "edge", f"running {requested}")
        return requested, "asked for"
    usable = [n for n, v in variants.items() if (v.parity is None or v.parity.passed) and engine_installed(v.engine)]
    for name in _order(machine or platform.machine()):
        if name in usable:
            return name, f"the first of {', '.join(n for n in _order(machine or platform.machine()) if n in variants)} " \
                         f"whose engine is installed here"
    if bundle.manifest.default_variant in usable:
        return bundle.manifest.default_variant, "the bundle's default"
    engines = sorted({v.engine for v in variants.values()})
    raise MissingDependencyError(" or ".join(_EXTRA.get(e, e) for e in engines), "edge",
                                 f"running bundle {bundle.name!r} (variants {', '.join(variants)})")


def frames(source: str, *, max_frames: int | None = None) -> Iterator[tuple[str, str | np.ndarray]]:
    """(name, image) pairs from `source`: an image file or a folder of images (paths, decoded by the Predictor), a video
    file or a camera index such as "0" (decoded frames, BGR)."""
    from cvdeploy.vision.image import collect_images

    if source.isdigit() or Path(source).suffix.lower() in VIDEO_SUFFIXES:
        import cv2

        if not source.isdigit() and not Path(source).is_file():
            raise InputError(f"video not found: {source}")
        cap = cv2.VideoCapture(int(source) if source.isdigit() else source)
        if not cap.isOpened():
            raise InputError(f"cannot open {'camera ' if source.isdigit() else ''}{source}")
        try:
            n = 0
            while max_frames is None or n < max_frames:
                ok, frame = cap.read()
                if not ok:
                    break
                yield f"{source}#{n}", frame
                n += 1
        finally:
            cap.release()
        return
    for i, path in enumerate(collect_images([source])):
        if max_frames is not None and i >= max_frames:
            return
        yield str(path), str(path)
