"""OpenVINO engine behind the Engine protocol: IR models (.xml + .bin) on the CPU, with performance hints."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.errors import EngineError, InputError, MissingDependencyError
from cvdeploy.runtime.base import EngineBase, TensorSpec, check_feeds

HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
# OpenVINO's CPU plugin computes in bf16 by default on CPUs that have it (AVX512_BF16, AMX): a model
# called fp32 would silently run at another precision. The inference precision is always set.
PRECISIONS = ("f32", "bf16", "f16")
# A variant's precision -> the float precision OpenVINO runs it at (INT8 keeps its float parts in f32).
VARIANT_PRECISION = {"fp32": "f32", "int8": "f32", "bf16": "bf16", "fp16": "f16"}
_OV_DTYPES = {"f32": "float32", "f16": "float16", "u8": "uint8", "i8": "int8", "i32": "int32", "i64": "int64", "boolean": "bool"}


def _ov() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise MissingDependencyError("openvino", "openvino", "running an OpenVINO variant") from e
    return openvino


@dataclass(frozen=True)
class OvOptions:
    device: str = "CPU"
    hint: str = "LATENCY"  # LATENCY: one request fast; THROUGHPUT: many requests in parallel streams
    num_threads: int = 0  # 0: OpenVINO's default
    precision: str = "f32"  # INFERENCE_PRECISION_HINT: never left to the CPU plugin's default

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"OpenVINO inference precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.hint not in HINTS:
            raise InputError(f"OpenVINO performance hint must be one of {', '.join(HINTS)}, got {self.hint!r}")
        if self.num_threads < 0:
            raise InputError("num_threads must be >= 0 (0 lets OpenVINO choose)")


def _spec(port: Any, fallback: str) -> TensorSpec:
    """`fallback` names a port that has no name (Ultralytics' OpenVINO exports leave the output unnamed)."""
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    name = port.get_any_name() if port.get_names() else fallback
    return TensorSpec(name, shape, _OV_DTYPES.get(port.get_element_type().get_type_name(), "float32"))


def _specs(ports: Any, kind: str) -> list[TensorSpec]:
    return [_spec(p, f"{kind}{i}") for i, p in enumerate(ports)]


def read_io(xml: str | os.PathLike[str]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs of an IR model, read without compiling it."""
    p = Path(xml)
    ov = _ov()
    try:
        model = ov.Core().read_model(str(p))
    except Exception as e:
        raise EngineError(f"OpenVINO could not read {p}: {str(e).splitlines()[0]}") from e
    return _specs(model.inputs, "input"), _specs(model.outputs, "output")


class OvEngine(EngineBase):
    """An OpenVINO compiled model. Thread-safe: each thread gets its own infer request."""

    def __init__(self, model: str | os.PathLike[str] | tuple[bytes, bytes], options: OvOptions = OvOptions()) -> None:
        """`model`: an IR .xml path, or (xml bytes, weights bytes) to load from memory only."""
        ov = _ov()
        config: dict[str, Any] = {"PERFORMANCE_HINT": options.hint, "INFERENCE_PRECISION_HINT": options.precision}
        if options.num_threads:
            config["INFERENCE_NUM_THREADS"] = options.num_threads
        core = ov.Core()
        if isinstance(model, tuple):
            where = "model bytes"
            try:
                xml, weights = model
                source = core.read_model(model=xml.decode(), weights=ov.Tensor(np.frombuffer(weights, np.uint8).copy()))
            except Exception as e:
                raise EngineError(f"OpenVINO could not read the model from memory: {str(e).splitlines()[0]}") from e
        else:
            p = Path(model)
            if not p.is_file():
                raise InputError(f"model file not found: {p}")
            source, where = str(p), str(p)
        try:
            self._compiled = core.compile_model(source, options.device, config)
        except Exception as e:
            raise EngineError(f"OpenVINO could not load {where}: {str(e).splitlines()[0]}") from e
        self.options = options
        self._inputs = _specs(self._compiled.inputs, "input")
        self._outputs = _specs(self._compiled.outputs, "output")
        self._local = threading.local()

    @property
    def provider(self) -> str:
        return f"OpenVINO {self.options.device} ({self.options.hint.lower()})"

    @property
    def precision(self) -> str:
        """The float precision the compiled model actually runs at, as OpenVINO reports it (f32, bf16, f16)."""
        try:
            value = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        except Exception:  # a plugin without the property computes in f32
            return "f32"
        return str(value.get_type_name() if hasattr(value, "get_type_name") else value).lower()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self._inputs, feeds)
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        try:  # fed by port index: a port's name may be one this engine made up (see _spec)
            result = request.infer({i: feeds[spec.name] for i, spec in enumerate(self._inputs)})
        except Exception as e:
            raise EngineError(f"OpenVINO failed to run the model: {str(e).splitlines()[0]}") from e
        return {o.name: np.array(result[k], copy=True) for o, k in zip(self._outputs, self._compiled.outputs, strict=True)}

    def close(self) -> None:
        self._compiled = None
