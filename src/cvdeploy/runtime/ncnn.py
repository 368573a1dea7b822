"""NCNN engine behind the Engine protocol: a .param/.bin pair (Ultralytics' `*_ncnn_model/`), float precision pinned.

NCNN stores and computes in fp16 by default wherever the CPU can (Arm with half-precision arithmetic): a model called
fp32 would silently run at fp16 on a Raspberry Pi 5 and at fp32 on the build machine. The precision is therefore set
from the variant's name on every path that opens it, as for OpenVINO (`runtime.open_engine(..., precision=)`).

The graph takes one image of a fixed size (Ultralytics traces it at its imgsz, and the head's anchor count is baked
into a Reshape); a batch runs image by image. Its tensors are named as in Ultralytics' ONNX exports (`images`,
`output0`), whatever the blobs are called in the .param (`in0`, `out0`), so a variant's outputs compare by name
with the bundle's golden outputs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.errors import EngineError, InputError, MissingDependencyError, ModelFormatError
from cvdeploy.runtime.base import EngineBase, TensorSpec, check_feeds

PARAM, WEIGHTS, METADATA = "model.ncnn.param", "model.ncnn.bin", "metadata.yaml"
PRECISIONS = ("f32", "f16")
# A variant's precision -> what NCNN may compute at. INT8 NCNN models keep their float layers in f32.
VARIANT_PRECISION = {"fp32": "f32", "fp16": "f16", "int8": "f32"}
INPUT_NAME = "images"


def _ncnn() -> Any:
    try:
        import ncnn
    except ImportError as e:
        raise MissingDependencyError("ncnn", "edge", "running an NCNN variant") from e
    return ncnn


def available() -> bool:
    try:
        import ncnn  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class NcnnOptions:
    num_threads: int = 0  # 0: NCNN's default (the physical big cores)
    precision: str = "f32"  # f32: fp16 and bf16 storage and arithmetic off; f16: on where the CPU has them
    input_hw: tuple[int, int] | None = None  # for a .param whose Input layer and folder do not say its size

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"NCNN precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.num_threads < 0:
            raise InputError("num_threads must be >= 0 (0 lets NCNN choose)")


def param_layers(text: str) -> list[tuple[str, str, list[str], list[str], dict[str, str]]]:
    """The layers of an NCNN .param text: (type, name, input blobs, output blobs, params)."""
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or lines[0] != ["7767517"]:
        raise ModelFormatError("not an NCNN text .param (its first line should be the magic number 7767517)")
    layers = []
    for parts in lines[2:]:
        kind, name, n_in, n_out = parts[0], parts[1], int(parts[2]), int(parts[3])
        ins, outs = parts[4 : 4 + n_in], parts[4 + n_in : 4 + n_in + n_out]
        params = dict(p.split("=", 1) for p in parts[4 + n_in + n_out :] if "=" in p)
        layers.append((kind, name, ins, outs, params))
    return layers


def set_input_shape(text: str, c: int, h: int, w: int) -> str:
    """The .param text with its Input layer's size written in (0=w 1=h 2=c, NCNN's own Input parameters), so that the
    file says what it takes without a metadata.yaml beside it."""
    out, done = [], False
    for ln in text.splitlines():
        parts = ln.split()
        if not done and parts and parts[0] == "Input":
            parts = [p for p in parts if not re.match(r"^[012]=", p)] + [f"0={w}", f"1={h}", f"2={c}"]
            ln, done = " ".join(parts), True
        out.append(ln)
    if not done:
        raise ModelFormatError("this NCNN .param has no Input layer")
    return "\n".join(out) + "\n"


def _input_hw(layers: list[Any], folder: Path | None, options: NcnnOptions) -> tuple[int, int]:
    inputs = [p for kind, _, _, _, p in layers if kind == "Input"]
    if inputs and "0" in inputs[0] and "1" in inputs[0]:
        return int(inputs[0]["1"]), int(inputs[0]["0"])
    if options.input_hw is not None:
        return options.input_hw
    if folder is not None and (folder / METADATA).is_file():  # an Ultralytics export folder
        import yaml

        meta = yaml.safe_load((folder / METADATA).read_text()) or {}
        size = meta.get("imgsz", [])
        size = [size, size] if isinstance(size, int) else list(size)
        if len(size) == 2:
            return int(size[0]), int(size[1])
    raise ModelFormatError("the NCNN model does not say its input size (no 0=/1= on its Input layer, no metadata.yaml "
                           "beside it): give NcnnOptions(input_hw=(h, w))")


class NcnnEngine(EngineBase):
    """An NCNN net. Thread-safe: every run makes its own extractor."""

    def __init__(self, model: str | os.PathLike[str] | tuple[bytes, bytes], options: NcnnOptions = NcnnOptions()) -> None:
        """`model`: the .param path (or the folder holding model.ncnn.param and model.ncnn.bin), or (param bytes, weights
        bytes) to load from memory only."""
        ncnn = _ncnn()
        net = ncnn.Net()
        self._weights: bytes | None = None
        fp16 = options.precision == "f16"
        # Every reduced-precision path is set explicitly: NCNN's defaults turn fp16 on where the CPU has it.
        net.opt.use_fp16_storage = net.opt.use_fp16_packed = net.opt.use_fp16_arithmetic = fp16
        net.opt.use_bf16_storage = False
        net.opt.use_vulkan_compute = False
        net.opt.num_threads = options.num_threads or ncnn.get_physical_big_cpu_count()
        folder: Path | None = None
        if isinstance(model, tuple):
            where = "model bytes"
            param_bytes, weights = model
            text = param_bytes.decode("utf-8", "replace")
            ok = net.load_param_mem(text) == 0
            if ok:
                self._weights = weights  # NCNN may reference the weights in place: they must outlive the net
                net.load_model_mem(weights)
        else:
            p = Path(model)
            if p.is_dir():
                p = p / PARAM
            weights_file = p.with_suffix(".bin")
            # NCNN crashes the process on a missing file instead of failing: check first.
            for f in (p, weights_file):
                if not f.is_file():
                    raise InputError(f"model file not found: {f}")
            folder, where, text = p.parent, str(p), p.read_text("utf-8", "replace")
            ok = net.load_param(str(p)) == 0 and net.load_model(str(weights_file)) == 0
        if not ok:
            raise EngineError(f"NCNN could not load {where}")
        try:
            layers = param_layers(text)
        except (ModelFormatError, ValueError, IndexError) as e:
            raise EngineError(f"NCNN could not read {where}: {e}") from e
        h, w = _input_hw(layers, folder, options)
        self._in_blob = net.input_names()[0]
        self._out_blobs = list(net.output_names())
        if not self._out_blobs:
            raise EngineError(f"NCNN model {where} declares no output")
        self._net, self.options = net, options
        self._inputs = [TensorSpec(INPUT_NAME, (None, 3, h, w), "float32")]
        self._outputs = [TensorSpec(f"output{i}", (None, None, None), "float32") for i in range(len(self._out_blobs))]
        self._fp16_here = fp16 and bool(ncnn.cpu_support_arm_asimdhp())

    @property
    def provider(self) -> str:
        return f"NCNN CPU ({self._net.opt.num_threads} threads)"

    @property
    def precision(self) -> str:
        """f16 only where asked for and the CPU computes it (Arm half-precision arithmetic); f32 elsewhere (an x86 CPU
        turns fp16 weights back into f32 at load)."""
        return "f16" if self._fp16_here else "f32"

    @property
    def settings(self) -> dict[str, object]:
        """NCNN's precision-relevant options as set on this net (what `precision` is derived from)."""
        o = self._net.opt
        return {"num_threads": o.num_threads, "use_fp16_storage": o.use_fp16_storage, "use_fp16_packed": o.use_fp16_packed,
                "use_fp16_arithmetic": o.use_fp16_arithmetic, "use_bf16_storage": o.use_bf16_storage,
                "use_vulkan_compute": o.use_vulkan_compute}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self._inputs, feeds)
        ncnn = _ncnn()
        batch = feeds[INPUT_NAME]
        rows: list[list[np.ndarray]] = [[] for _ in self._out_blobs]
        for image in batch:  # the graph takes one image; the batch runs image by image
            chw = np.ascontiguousarray(image)
            with self._net.create_extractor() as ex:
                if ex.input(self._in_blob, ncnn.Mat(chw)) != 0:
                    raise EngineError("NCNN refused the input")
                for i, blob in enumerate(self._out_blobs):
                    ret, out = ex.extract(blob)
                    if ret != 0:
                        raise EngineError(f"NCNN failed to compute output {blob!r} (error {ret})")
                    rows[i].append(np.array(out, dtype=np.float32, copy=True))
        return {spec.name: np.stack(r) for spec, r in zip(self._outputs, rows, strict=True)}

    def close(self) -> None:
        self._net.clear()
        self._weights = None


def open_ncnn(model: str | os.PathLike[str] | tuple[bytes, bytes], options: Any, precision: str) -> NcnnEngine:
    """`runtime.open_engine` for NCNN: the float precision comes from the variant's name, whatever `options` says."""
    from dataclasses import replace

    if precision not in VARIANT_PRECISION:
        raise ValueError(f"unknown variant precision {precision!r} for NCNN; known: {', '.join(VARIANT_PRECISION)}")
    base = options if isinstance(options, NcnnOptions) else NcnnOptions()
    return NcnnEngine(model, replace(base, precision=VARIANT_PRECISION[precision]))
