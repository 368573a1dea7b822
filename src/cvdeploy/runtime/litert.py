"""LiteRT (TensorFlow Lite) engine behind the Engine protocol: a .tflite on the CPU (XNNPACK), with `ai-edge-litert`.

Ultralytics' LiteRT exports (litert-torch) write box coordinates divided by the input size, so that one INT8 scale
can hold boxes and class scores in the same tensor, and append their metadata to the .tflite as a zip entry
(`metadata.json`). This engine reads that metadata and gives boxes back in input pixels, as the ONNX graph does: the
same golden outputs and the same postprocessing hold for every engine. Legacy onnx2tf exports (NHWC input) and
full-integer files with int8/int16 input or output tensors are (de)quantized and transposed at the boundary, as
Ultralytics' own LiteRT backend does.

Tensors are named as in Ultralytics' ONNX exports (`images`, `output0`). The graph takes a fixed batch (1 for
Ultralytics' exports); a larger batch runs image by image.
"""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.errors import EngineError, InputError, MissingDependencyError
from cvdeploy.runtime.base import EngineBase, TensorSpec, check_feeds

INPUT_NAME = "images"
# Tasks whose coordinate channels Ultralytics' LiteRT export normalizes (unless the graph ends with NMS).
_NORMALIZED_TASKS = ("detect", "segment", "pose", "obb")


def _interpreter() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:  # the older runtime package, same API
            from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found, no-redef]
        except ImportError as e:
            raise MissingDependencyError("ai-edge-litert", "edge", "running a LiteRT variant") from e
    return Interpreter


def available() -> bool:
    try:
        _interpreter()
    except MissingDependencyError:
        return False
    return True


@dataclass(frozen=True)
class LiteRtOptions:
    num_threads: int = 0  # 0: one per CPU core (the interpreter's own default is a single thread)

    def __post_init__(self) -> None:
        if self.num_threads < 0:
            raise InputError("num_threads must be >= 0 (0: one per core)")


def read_metadata(model: bytes | Path) -> dict[str, Any]:
    """The metadata Ultralytics appends to a .tflite (a zip entry `metadata.json`); {} when there is none."""
    try:
        with zipfile.ZipFile(io.BytesIO(model) if isinstance(model, bytes) else model) as z:
            return dict(json.loads(z.read("metadata.json")))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        return {}


def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero = detail["quantization"]
    limits = np.iinfo(detail["dtype"])
    return np.clip(np.rint(x / scale + zero), limits.min, limits.max).astype(detail["dtype"])


class LiteRtEngine(EngineBase):
    """A LiteRT interpreter. Thread-safe: runs are serialized (an interpreter holds its tensors)."""

    def __init__(self, model: str | os.PathLike[str] | bytes | tuple[bytes, bytes], options: LiteRtOptions = LiteRtOptions()) -> None:
        """`model`: a .tflite path, or its bytes (alone or as the first of a pair) to load from memory only."""
        interpreter = _interpreter()
        threads = options.num_threads or os.cpu_count() or 1
        if isinstance(model, tuple):
            model = model[0]
        try:
            if isinstance(model, bytes):
                where, meta = "model bytes", read_metadata(model)
                self._interp = interpreter(model_content=model, num_threads=threads)
            else:
                p = Path(model)
                if not p.is_file():
                    raise InputError(f"model file not found: {p}")
                where, meta = str(p), read_metadata(p)
                self._interp = interpreter(model_path=str(p), num_threads=threads)
            self._interp.allocate_tensors()
        except InputError:
            raise
        except Exception as e:  # the interpreter raises ValueError/RuntimeError with native messages
            raise EngineError(f"LiteRT could not load {where}: {str(e).splitlines()[0]}") from e
        self.options, self.threads, self.model_metadata = options, threads, meta
        self._in = self._interp.get_input_details()[0]
        self._outs = self._interp.get_output_details()
        shape = [int(d) for d in self._in["shape"]]
        if len(shape) != 4:
            raise EngineError(f"LiteRT model {where} takes a {len(shape)}-d input; expected an image batch")
        channels = int(meta.get("channels", 3))
        self._nhwc = shape[3] == channels and shape[1] != channels  # legacy onnx2tf exports are NHWC
        b, h, w = (shape[0], shape[1], shape[2]) if self._nhwc else (shape[0], shape[2], shape[3])
        self._batch, self._hw = b, (h, w)
        denorm = (meta.get("task") in _NORMALIZED_TASKS and not meta.get("end2end", False)
                  and meta.get("head") != "RTDETRDecoder")
        self._denormalize = bool(denorm)
        self._inputs = [TensorSpec(INPUT_NAME, (None if b == 1 else b, channels, h, w), "float32")]
        self._outputs = [TensorSpec(f"output{k}", (None, *(int(d) for d in o["shape"][1:])), "float32")
                         for k, o in enumerate(self._outs)]
        self._lock = threading.Lock()

    @property
    def provider(self) -> str:
        return f"LiteRT CPU ({self.threads} threads)"

    @property
    def precision(self) -> str:
        """The interpreter computes in the types the graph holds (no implicit fp16 on CPU): "as stored"."""
        return "as stored"

    @property
    def metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.model_metadata.items()}

    def _one(self, x: np.ndarray) -> list[np.ndarray]:
        if self._nhwc:
            x = x.transpose(0, 2, 3, 1)
        if self._in["dtype"] in (np.int8, np.int16, np.uint8):
            x = _quantize(x, self._in)
        with self._lock:
            self._interp.set_tensor(self._in["index"], np.ascontiguousarray(x))
            self._interp.invoke()
            outs = [self._interp.get_tensor(o["index"]).copy() for o in self._outs]
        result = []
        h, w = self._hw
        for y, detail in zip(outs, self._outs, strict=True):
            if detail["dtype"] in (np.int8, np.int16, np.uint8):
                scale, zero = detail["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            y = y.astype(np.float32, copy=False)
            if self._denormalize and y.ndim == 3:
                y[:, [0, 2]] *= w
                y[:, [1, 3]] *= h
            result.append(y)
        return result

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self._inputs, feeds)
        batch = feeds[INPUT_NAME]
        try:
            if self._batch == 1:
                per_image = [self._one(batch[i : i + 1]) for i in range(len(batch))]
                outs = [np.concatenate(parts) for parts in zip(*per_image, strict=True)]
            else:
                outs = self._one(batch)
        except Exception as e:
            raise EngineError(f"LiteRT failed to run the model: {str(e).splitlines()[0]}") from e
        return {spec.name: y for spec, y in zip(self._outputs, outs, strict=True)}

    def close(self) -> None:
        self._interp = None


def open_litert(model: str | os.PathLike[str] | bytes | tuple[bytes, bytes], options: Any, precision: str) -> LiteRtEngine:
    """`runtime.open_engine` for LiteRT: a .tflite computes in the types it holds, whatever the variant's `precision`."""
    del precision
    return LiteRtEngine(model, options if isinstance(options, LiteRtOptions) else LiteRtOptions())
