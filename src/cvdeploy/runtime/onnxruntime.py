"""ONNX Runtime engine: provider choice, threads and graph optimization, built apart from running."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.errors import EngineError, InputError, MissingDependencyError
from cvdeploy.runtime.base import EngineBase, TensorSpec, check_feeds

# Preferred order: the fastest provider present wins unless the caller names its own.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                     "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int32)": "int32", "tensor(int64)": "int64",
               "tensor(bool)": "bool"}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise MissingDependencyError("onnxruntime", "all", "running an ONNX model") from e
    global _telemetry_off
    if not _telemetry_off:  # models and their use stay on this machine (a no-op where the build has no telemetry)
        onnxruntime.disable_telemetry_events()
        _telemetry_off = True
    return onnxruntime


_telemetry_off = False


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def resolve_providers(requested: list[str] | str | None = None) -> list[str]:
    """The providers to ask for, best first, always ending with the CPU fallback."""
    available = available_providers()
    if requested is None or requested == "auto":
        chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    else:
        names = [requested] if isinstance(requested, str) else list(requested)
        chosen = []
        for name in names:
            full = _PROVIDER_ALIASES.get(name.lower(), name)
            if full not in available:
                raise InputError(f"execution provider {name!r} is not available here; available: {', '.join(available)}")
            chosen.append(full)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


@dataclass(frozen=True)
class OrtOptions:
    """How the session is built; what `bench tune` searches and stores in the bundle."""

    providers: tuple[str, ...] | None = None  # None: best available
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per physical core)
    inter_op_threads: int = 0
    graph_optimization: str = "all"
    execution_mode: str = "sequential"  # or "parallel"

    def __post_init__(self) -> None:
        if self.graph_optimization not in GRAPH_OPT_LEVELS:
            raise InputError(f"graph_optimization must be one of {', '.join(GRAPH_OPT_LEVELS)}, got {self.graph_optimization!r}")
        if self.execution_mode not in ("sequential", "parallel"):
            raise InputError(f"execution_mode must be sequential or parallel, got {self.execution_mode!r}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise InputError("thread counts must be >= 0 (0 lets ONNX Runtime choose)")


def session_options(options: OrtOptions) -> Any:
    ort = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[options.graph_optimization]
    so.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if options.execution_mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    return so


def _spec(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else None for d in node.shape)
    return TensorSpec(node.name, shape, _ORT_DTYPES.get(node.type, node.type))


class OrtEngine(EngineBase):
    """An ONNX Runtime session behind the Engine protocol."""

    def __init__(self, model: str | os.PathLike[str] | bytes, options: OrtOptions = OrtOptions()) -> None:
        ort = _ort()
        providers = resolve_providers(list(options.providers) if options.providers else None)
        if isinstance(model, str | os.PathLike) and not Path(model).is_file():
            raise InputError(f"model file not found: {model}")
        try:
            self._session = ort.InferenceSession(
                model if isinstance(model, bytes) else str(model), sess_options=session_options(options), providers=providers
            )
        except Exception as e:  # ORT raises its own untyped errors (InvalidProtobuf, Fail, ...)
            where = "model bytes" if isinstance(model, bytes) else str(model)
            raise EngineError(f"ONNX Runtime could not load {where}: {str(e).splitlines()[0]}") from e
        self.options = options
        # ONNX Runtime's CPU arena keeps the memory of its largest run for good; a run whose input has more elements
        # than this (0: never) asks it to shrink back afterwards (the server sets it: one huge input must not pin
        # gigabytes; a normal run keeps the arena, which is ~45 % faster than running without one).
        self.shrink_arena_above = 0
        self._shrink: Any = None
        self._inputs = [_spec(i) for i in self._session.get_inputs()]
        self._outputs = [_spec(o) for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self._outputs]

    @property
    def provider(self) -> str:
        return self._session.get_providers()[0]

    @property
    def precision(self) -> str:
        """ONNX Runtime computes in the types the graph holds (no implicit bf16 on CPU): "as stored"."""
        return "as stored"

    @property
    def metadata(self) -> dict[str, str]:
        """The model's custom metadata (Ultralytics writes names, imgsz, stride, task there)."""
        return dict(self._session.get_modelmeta().custom_metadata_map)

    @property
    def session(self) -> Any:
        """The underlying onnxruntime.InferenceSession, for tools that need it (profilers, benchmarks)."""
        return self._session

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self._inputs, feeds)
        run_options = None
        if self.shrink_arena_above and any(a.size > self.shrink_arena_above for a in feeds.values()):
            if self._shrink is None:
                self._shrink = _ort().RunOptions()
                self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
            run_options = self._shrink
        try:
            outs = self._session.run(self._output_names, feeds, run_options)
        except Exception as e:
            raise EngineError(f"ONNX Runtime failed to run the model: {str(e).splitlines()[0]}") from e
        return dict(zip(self._output_names, outs, strict=True))

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
