"""Inference engines behind one protocol."""

from __future__ import annotations

import os
from typing import Any

from cvdeploy.runtime.base import Engine, TensorSpec
from cvdeploy.runtime.onnxruntime import OrtEngine, OrtOptions, available_providers, resolve_providers

ENGINES = ("onnxruntime", "openvino")


def open_engine(model: str | os.PathLike[str] | bytes | tuple[bytes, bytes], engine: str = "onnxruntime", options: Any = None) -> Any:
    """Open `model` (a path, or bytes held in memory only) with the named engine; `options`: OrtOptions or OvOptions."""
    if engine == "onnxruntime":
        return OrtEngine(model, options if isinstance(options, OrtOptions) else OrtOptions())
    if engine == "openvino":
        from cvdeploy.runtime.openvino import OvEngine, OvOptions

        return OvEngine(model, options if isinstance(options, OvOptions) else OvOptions())
    raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "OrtEngine", "OrtOptions", "TensorSpec", "available_providers", "open_engine", "resolve_providers"]
