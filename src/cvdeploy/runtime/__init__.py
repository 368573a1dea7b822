"""Inference engines behind one protocol."""

from cvdeploy.runtime.base import Engine, TensorSpec
from cvdeploy.runtime.onnxruntime import OrtEngine, OrtOptions, available_providers, resolve_providers

__all__ = ["Engine", "OrtEngine", "OrtOptions", "TensorSpec", "available_providers", "resolve_providers"]
