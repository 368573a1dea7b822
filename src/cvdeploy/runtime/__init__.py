"""Inference engines behind one protocol."""

from __future__ import annotations

import os
from typing import Any

from cvdeploy.runtime.base import Engine, TensorSpec
from cvdeploy.runtime.onnxruntime import OrtEngine, OrtOptions, available_providers, resolve_providers

ENGINES = ("onnxruntime", "openvino", "ncnn", "litert")


def open_engine(model: str | os.PathLike[str] | bytes | tuple[bytes, bytes], engine: str = "onnxruntime", options: Any = None,
                *, precision: str = "fp32") -> Any:
    """Open `model` (a path, or bytes held in memory only) with the named engine; `options`: OrtOptions or OvOptions.

    `precision` is the variant's (fp32, fp16, bf16, int8): an engine that could pick its own float
    precision (OpenVINO on a bf16 CPU) is pinned to it, whatever `options` says.
    """
    if engine == "onnxruntime":
        return OrtEngine(model, options if isinstance(options, OrtOptions) else OrtOptions())
    if engine == "openvino":
        from dataclasses import replace

        from cvdeploy.runtime.openvino import VARIANT_PRECISION, OvEngine, OvOptions

        if precision not in VARIANT_PRECISION:
            raise ValueError(f"unknown variant precision {precision!r}; known: {', '.join(VARIANT_PRECISION)}")
        base = options if isinstance(options, OvOptions) else OvOptions()
        return OvEngine(model, replace(base, precision=VARIANT_PRECISION[precision]))
    if engine == "ncnn":
        from cvdeploy.runtime.ncnn import open_ncnn

        return open_ncnn(model, options, precision)
    if engine == "litert":
        from cvdeploy.runtime.litert import open_litert

        return open_litert(model, options, precision)
    raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "OrtEngine", "OrtOptions", "TensorSpec", "available_providers", "open_engine", "resolve_providers"]
