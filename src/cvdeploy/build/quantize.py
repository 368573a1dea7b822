"""Reduced-precision variants of an ONNX FP32 model: FP16 and static INT8 (QDQ) for ONNX Runtime.

Neither function decides whether its result is good enough: `cvdeploy.build.variants` verifies
every variant (parity on the golden inputs, mAP on the controlled set) before it enters a bundle.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.errors import InputError, MissingDependencyError, ModelFormatError

CALIB_METHODS = ("minmax", "entropy", "percentile")


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise MissingDependencyError("onnx", "build", "making FP16 or INT8 variants") from e
    return onnx


# -- which nodes stay in float ------------------------------------------------------------------

_MODULE = re.compile(r"^/model\.(\d+)/")


def head_float_nodes(model: Any) -> list[str]:
    """The YOLO detect head's decoding: DFL, box arithmetic, sigmoid and the final concat.

    Its pixel-valued boxes and 0-1 scores end in one tensor; one INT8 scale for both would wipe
    the scores out. The head's convolutions (cv2/cv3 branches) are left to be quantized: they
    hold most of its compute and quantize well.
    """
    indices = [int(m.group(1)) for n in model.graph.node if (m := _MODULE.match(n.name))]
    if not indices:
        raise ModelFormatError("this ONNX graph has no Ultralytics node names (/model.N/...); cannot find its head")
    head = f"/model.{max(indices)}/"
    return [n.name for n in model.graph.node
            if n.name.startswith(head) and not re.match(re.escape(head) + r"(cv2|cv3|one2one_cv2|one2one_cv3)\.", n.name)]


# -- INT8 recipes: candidates tried on this machine -----------------------------------------------


@dataclass(frozen=True)
class Int8Recipe:
    """Types and options of a static INT8 (QDQ) quantization for ONNX Runtime."""

    name: str
    activation_type: str  # "uint8" or "int8"
    weight_type: str  # "int8"
    reduce_range: bool  # 7-bit weights
    per_channel: bool
    calib_method: str
    activation_symmetric: bool
    note: str  # what the recipe is for, and where it may not hold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_RECIPES = {
    "u8s8-w7": ("uint8", True, False, "U8S8, 7-bit weights: no int16 saturation in AVX2's u8*s8 pair sums (vpmaddubsw); "
                                      "exact on every x86-64 CPU"),
    "u8s8-w8": ("uint8", False, False, "U8S8, full 8-bit weights: exact with VNNI, AMX or Arm dot products; on an x86 CPU "
                                       "without VNNI its pair sums can saturate int16 (cvdeploy verify there tells)"),
    "s8s8-asym": ("int8", False, False, "S8S8, asymmetric activations: ONNX Runtime's suggestion for VNNI CPUs"),
}
INT8_RECIPES = tuple(_RECIPES)


def int8_recipe(name: str, calib_method: str = "minmax", per_channel: bool = True) -> Int8Recipe:
    if name not in _RECIPES:
        raise InputError(f"unknown INT8 recipe {name!r}; choose from {', '.join(INT8_RECIPES)}")
    if calib_method not in CALIB_METHODS:
        raise InputError(f"calibration method must be one of {', '.join(CALIB_METHODS)}, got {calib_method!r}")
    act, reduce, symmetric, note = _RECIPES[name]
    return Int8Recipe(name, act, "int8", reduce, per_channel, calib_method, symmetric, note)


def recipe_candidates(cpu_flags: Iterable[str], calib_method: str = "minmax", names: Sequence[str] | None = None,
                      per_channel: bool = True) -> list[Int8Recipe]:
    """The recipes to try, in the order a CPU-flag table suggests (it only orders them: the build measures and verifies
    every one on this machine and keeps the fastest that verifies; the first is the one the repair starts from).

    `names` restricts (and orders) the candidates.
    """
    flags = set(cpu_flags)
    if names is not None:
        order = list(dict.fromkeys(names))
        if not order:
            raise InputError(f"give at least one INT8 recipe ({', '.join(INT8_RECIPES)})")
    elif flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "asimd", "neon"}:
        order = ["u8s8-w8", "u8s8-w7", "s8s8-asym"]  # dot-product instructions: 8-bit weights cannot saturate
    else:
        order = ["u8s8-w7", "s8s8-asym", "u8s8-w8"]
    return [int8_recipe(n, calib_method, per_channel) for n in order]


# -- conversions ---------------------------------------------------------------------------------


class _Calibration:
    """ONNX Runtime CalibrationDataReader over tensors already preprocessed by the bundle's spec."""

    def __init__(self, input_name: str, tensors: Sequence[np.ndarray]) -> None:
        self.input_name = input_name
        self._tensors = tensors
        self._it: Iterator[np.ndarray] = iter(tensors)

    def get_next(self) -> dict[str, np.ndarray] | None:
        t = next(self._it, None)
        return None if t is None else {self.input_name: t}

    def rewind(self) -> None:
        self._it = iter(self._tensors)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for t in self._tensors:
            yield {self.input_name: t}


def quantize_int8(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calibration: Sequence[np.ndarray],
    recipe: Int8Recipe,
    *,
    float_nodes: Sequence[str] = (),
    ranges: dict[str, tuple[float, float]] | None = None,
) -> None:
    """Static QDQ quantization of `src` to `dst`, calibrated on `calibration` (NCHW float32, one image each).

    `float_nodes` are kept in float (no QDQ pair around them). `ranges` replaces the calibrated (min, max) of the named
    activation tensors (QAT's learned ranges): ONNX Runtime derives their scale and zero point from them.
    """
    onnx = _onnx()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise InputError("INT8 calibration needs at least one image")
    model = onnx.load(str(src))
    input_name = model.graph.input[0].name
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[recipe.calib_method]
    # ONNX Runtime's histogram calibrators print their progress: to stderr, so that `--json -` keeps stdout clean.
    with tempfile.TemporaryDirectory(prefix="cvdeploy-int8-") as tmp, contextlib.redirect_stdout(sys.stderr):
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(dst), _Calibration(input_name, calibration),
            quant_format=QuantFormat.QDQ, per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
            activation_type=types[recipe.activation_type], weight_type=types[recipe.weight_type],
            calibrate_method=method, nodes_to_exclude=list(float_nodes),
            extra_options={"ActivationSymmetric": recipe.activation_symmetric, "WeightSymmetric": True,
                           "TensorQuantOverrides": {t: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                                    for t, (lo, hi) in (ranges or {}).items()}},
        )


def convert_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Weights and activations in FP16; the graph's inputs and outputs stay FP32."""
    onnx = _onnx()
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    # Resize's scales and Range's arguments must stay float: ONNX Runtime has no fp16 kernels for them on CPU.
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=["Resize", "Range"])
    onnx.save(half, str(dst))
