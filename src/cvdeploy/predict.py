"""Predictor: the inference pipeline as public, typed stages, composed by `predict`, the server and the benchmarks.

    decode(source) -> image          bytes, path, array or PIL image -> BGR uint8 (the decoding Ultralytics trains with)
    prepare(images) -> Prepared      letterbox (minimal rectangle when the images share a shape) -> NCHW float32 tensor
    infer(tensor) -> outputs         the engine alone
    finish(prepared, outputs) -> [Result]   decode boxes, NMS, scale back to each image

What is served is what is predicted: the server calls these same stages (it only adds a batcher between prepare
and infer, which batches tensors of the same shape), so its answers equal `predict`'s.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, overload

import numpy as np

from cvdeploy.bundle import Bundle
from cvdeploy.errors import InputError
from cvdeploy.runtime import open_engine
from cvdeploy.runtime.onnxruntime import OrtOptions
from cvdeploy.vision.image import DecodeLimits, ImageSource, load_image
from cvdeploy.vision.letterbox import LetterboxParams, LetterboxSpec, preprocess
from cvdeploy.vision.postprocess import DetectOptions, decode_detect_batch
from cvdeploy.vision.result import Result, Timings

SUPPORTED_TASKS = ("detect",)


def _ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1000.0


class Predictor:
    """Runs a bundle (or a plain Ultralytics .onnx) on images and returns `Result`s.

    >>> p = Predictor("yolo11n-shapes.cvd", conf=0.3)
    >>> result = p.predict("image.jpg")            # one image -> Result
    >>> results = p.predict(["a.jpg", "b.png"])    # a list -> list[Result], batched through the engine
    >>> result = await p.apredict(jpeg_bytes)      # from async code
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | Bundle,
        variant: str | None = None,
        *,
        conf: float | None = None,
        iou: float | None = None,
        max_det: int | None = None,
        classes: Sequence[int] | None = None,
        engine_options: Any = None,  # OrtOptions or, for an OpenVINO variant, OvOptions
        limits: DecodeLimits = DecodeLimits(),
        max_batch: int = 32,
        imgsz: int | None = None,
        model_key: bytes | None = None,  # for a protected bundle (else from $CVDEPLOY_MODEL_KEY_FILE, ...)
        threads: int | None = None,  # engine threads, over the bundle's tuned hint (the server splits cores among instances)
    ) -> None:
        self.bundle = model if isinstance(model, Bundle) else Bundle.load(model)
        m = self.bundle.manifest
        if m.task not in SUPPORTED_TASKS:
            raise InputError(f"the Predictor runs {', '.join(SUPPORTED_TASKS)} models; {self.bundle.name!r} is a {m.task} model")
        if variant is None:
            choice = variant_choice(self.bundle)
            self.variant, self.variant_reason = choice.name, choice.reason
        else:
            self.variant, self.variant_reason = variant, "asked for"
        if engine_options is None and (hint := self.bundle.runtime_hint(self.variant)) is not None:
            if hint.engine == "openvino":
                from cvdeploy.runtime.openvino import OvOptions

                engine_options = OvOptions(hint=hint.ov_hint or "LATENCY", num_threads=hint.ov_threads)
            else:
                engine_options = OrtOptions(intra_op_threads=hint.intra_op_threads, inter_op_threads=hint.inter_op_threads,
                                            execution_mode=hint.execution_mode, graph_optimization=hint.graph_optimization)
        path = self.bundle.variant_path(self.variant)  # refuses a variant the bundle does not have
        v = m.variants[self.variant]
        kind = v.engine
        if threads is not None:
            engine_options = _with_threads(engine_options, kind, threads)
        if v.encryption:  # a protected bundle: decrypted in memory, never written out
            from cvdeploy.security.protect import load_key, variant_bytes

            main, extra = variant_bytes(self.bundle, self.variant, model_key if model_key is not None else load_key())
            source: Any = main if kind == "onnxruntime" else (main, next(iter(extra.values()), b""))
            self.engine = open_engine(source, kind, engine_options, precision=v.precision)
        else:
            self.engine = open_engine(path, kind, engine_options, precision=v.precision)
        if max_batch < 1:
            raise InputError(f"max_batch must be at least 1, got {max_batch}")
        inp = self.engine.inputs[0]
        self._input_name = inp.name
        self.spec: LetterboxSpec = m.preprocess.letterbox()
        if len(inp.shape) != 4:
            raise InputError(f"model input {inp.name!r} has shape {list(inp.shape)}; expected an NCHW image tensor")
        fixed = isinstance(inp.shape[2], int) and isinstance(inp.shape[3], int)
        if fixed:
            # A fixed-size graph takes exactly its own size: no minimal-padding rectangles.
            self.spec = replace(self.spec, imgsz=(inp.shape[2], inp.shape[3]), rect=False)
        if imgsz is not None and (imgsz,) * 2 != tuple(self.spec.imgsz):
            if fixed:
                raise InputError(f"this model's input is fixed at {self.spec.imgsz[1]}x{self.spec.imgsz[0]}; it cannot run at imgsz {imgsz}")
            if imgsz < self.spec.stride or imgsz % self.spec.stride:
                raise InputError(f"imgsz must be a positive multiple of the stride ({self.spec.stride}), got {imgsz}")
            self.spec = replace(self.spec, imgsz=(imgsz, imgsz))
        self.max_batch = max_batch if not isinstance(inp.shape[0], int) else min(max_batch, inp.shape[0])
        defaults = m.postprocess
        self.options = DetectOptions(
            conf=defaults.conf if conf is None else conf,
            iou=defaults.iou if iou is None else iou,
            max_det=defaults.max_det if max_det is None else max_det,
            classes=None if classes is None else tuple(int(c) for c in classes),
        )
        self.limits = limits
        self._end2end = m.postprocess.end2end

    @property
    def names(self) -> dict[int, str]:
        return self.bundle.names

    def detect_options(self, **overrides: Any) -> DetectOptions:
        """The Predictor's options with per-call `conf`, `iou`, `max_det`, `classes` (None keeps the default; classes=None
        keeps every class). Unknown names are refused."""
        unknown = set(overrides) - {"conf", "iou", "max_det", "classes"}
        if unknown:
            raise InputError(f"unknown prediction option(s): {', '.join(sorted(unknown))}")
        if overrides.get("classes") is not None:
            overrides["classes"] = tuple(int(c) for c in overrides["classes"])
        return replace(self.options, **{k: v for k, v in overrides.items() if v is not None or k == "classes"})


    # -- the stages ------------------------------------------------------------------------------

    def decode(self, source: ImageSource) -> np.ndarray:
        """Stage 1: any image source -> HxWx3 BGR uint8, within this Predictor's decode limits."""
        return load_image(source, limits=self.limits)

    def prepare(self, images: list[np.ndarray]) -> Prepared:
        """Stage 2: the bundle's letterbox and normalisation -> one NCHW float32 tensor (minimal-padding rectangle when
        every image has the same shape, Ultralytics' rule; square otherwise) and each image's letterbox parameters."""
        if not images:
            raise InputError("no images to prepare")
        t0 = time.perf_counter()
        tensor, params = preprocess(images, self.spec)
        return Prepared(tensor, params, [im.shape[:2] for im in images], _ms(t0, time.perf_counter()) / len(images))

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        """Stage 3, the engine alone, on a prepared NCHW float32 tensor; returns the first output (`infer_all`: all)."""
        return next(iter(self.engine.run({self._input_name: tensor}).values()))

    def infer_all(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """Stage 3, the engine alone, on a prepared NCHW float32 tensor; returns every output by name."""
        return self.engine.run({self._input_name: tensor})

    def finish(self, prepared: Prepared, outputs: dict[str, np.ndarray] | np.ndarray, *, options: DetectOptions | None = None,
               timings: Sequence[Timings] | None = None, sources: Sequence[str | None] | None = None) -> list[Result]:
        """Stage 4: the raw outputs of `prepared` (all its rows) -> one Result per image, boxes in the image's pixels.

        `timings` (one per image) get this stage's time added; `sources` name the images in their results.
        """
        output = outputs if isinstance(outputs, np.ndarray) else next(iter(outputs.values()))
        n = len(prepared.params)
        if output.shape[0] != n:
            raise InputError(f"finish: {output.shape[0]} output rows for {n} prepared image(s)")
        t0 = time.perf_counter()
        dets = decode_detect_batch(output, prepared.params, options or self.options, end2end=self._end2end)
        post = _ms(t0, time.perf_counter()) / n
        timings = list(timings) if timings is not None else [Timings(preprocess=prepared.ms_per_image) for _ in range(n)]
        names = list(sources) if sources is not None else [None] * n
        results = []
        for d, shape, t, src in zip(dets, prepared.shapes, timings, names, strict=True):
            t.postprocess += post
            results.append(Result("detect", self.names, shape, detections=d, timings=t, source=src))
        return results

    # -- the stages composed -----------------------------------------------------------------------

    def _predict_many(self, sources: Sequence[ImageSource], options: DetectOptions) -> list[Result]:
        decoded: list[tuple[np.ndarray, float]] = []
        for src in sources:
            t0 = time.perf_counter()
            img = self.decode(src)
            decoded.append((img, _ms(t0, time.perf_counter())))
        results: list[Result] = []
        for start in range(0, len(decoded), self.max_batch):
            chunk = decoded[start : start + self.max_batch]
            prepared = self.prepare([im for im, _ in chunk])
            t0 = time.perf_counter()
            outputs = self.infer_all(prepared.tensor)
            infer = _ms(t0, time.perf_counter()) / len(chunk)
            timings = [Timings(decode=ms, preprocess=prepared.ms_per_image, infer=infer) for _, ms in chunk]
            results += self.finish(prepared, outputs, options=options, timings=timings,
                                   sources=[_source_name(s) for s in sources[start : start + self.max_batch]])
        return results

    @overload
    def predict(self, images: ImageSource, **overrides: Any) -> Result: ...
    @overload
    def predict(self, images: list[ImageSource] | tuple[ImageSource, ...], **overrides: Any) -> list[Result]: ...

    def predict(self, images: ImageSource | list[ImageSource] | tuple[ImageSource, ...], **overrides: Any) -> Result | list[Result]:
        """One image -> Result; a list or tuple -> list[Result] (batched). Overrides: conf, iou, max_det, classes."""
        options = self.detect_options(**overrides)
        if isinstance(images, list | tuple):
            if not images:
                raise InputError("no images given")
            return self._predict_many(images, options)
        return self._predict_many([images], options)[0]

    __call__ = predict

    async def apredict(self, image: ImageSource, **overrides: Any) -> Result:
        """The same as `predict` for one image, off the event loop (ONNX Runtime releases the GIL)."""
        return await asyncio.to_thread(self.predict, image, **overrides)

    def preprocess(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[LetterboxParams]]:
        """`prepare` as (tensor, letterbox parameters), for tools that feed the engine themselves."""
        prepared = self.prepare(images)
        return prepared.tensor, prepared.params

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Predictor(bundle={self.bundle.name!r}, variant={self.variant!r}, provider={self.engine.provider!r})"


@dataclass(frozen=True)
class Prepared:
    """What `Predictor.prepare` hands to the engine and on to `finish`."""

    tensor: np.ndarray  # NCHW float32, one row per image
    params: list[LetterboxParams]  # how each image was letterboxed (to scale boxes back)
    shapes: list[tuple[int, int]]  # each image's (height, width)
    ms_per_image: float = 0.0  # the time `prepare` took, shared out


@dataclass(frozen=True)
class VariantChoice:
    name: str
    reason: str


def variant_choice(bundle: Bundle, providers: Sequence[str] | None = None, *, machine: str | None = None,
                   cpu_flags: Sequence[str] | None = None, runnable: Sequence[str] | None = None) -> VariantChoice:
    """The fastest verified variant on this machine, with the reason; the bundle's default when nothing is clearly faster.

    FP16 runs fast only on a GPU provider. On a CPU the choice reads the latencies measured on this very machine
    (`manifest.latencies`, written by the build and by `cvdeploy bench tune`), across every engine installed here; a
    variant must be at least 10 % faster than the default to displace it (noise). Latencies measured on another machine
    are not used: another CPU can rank INT8 and FP32 the other way round. `machine`, `cpu_flags` and `runnable` default
    to this machine's (tests inject them).
    """
    from cvdeploy.bench.latency import runnable_here
    from cvdeploy.bundle.environment import BF16_FLAGS, cpu_info, machine_id
    from cvdeploy.runtime.onnxruntime import available_providers

    m = bundle.manifest
    default = m.default_variant
    gpu = bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(providers or available_providers()))
    fp16 = m.variants.get("onnx-fp16")
    if gpu and fp16 is not None and (fp16.parity is None or fp16.parity.passed):
        return VariantChoice("onnx-fp16", "a GPU execution provider is present and onnx-fp16 is verified")
    cpu = cpu_info() if machine is None or cpu_flags is None else {}
    machine = machine or machine_id(cpu)
    flags = set(cpu_flags if cpu_flags is not None else cpu.get("flags", []))  # type: ignore[arg-type]
    record = next((r for r in reversed(m.latencies) if r.machine == machine), None)
    if record is None:
        return VariantChoice(default, "no variant latencies measured on this machine (cvdeploy bench tune measures them)")
    base = record.variants.get(default)
    if base is None:
        return VariantChoice(default, f"the default {default} was not timed on this machine")
    ok = set(runnable if runnable is not None else runnable_here(bundle))  # imports OpenVINO only when it has variants
    timed = [(ms, n) for n, ms in record.variants.items()
             if n in ok and m.variants[n].precision != "fp16" and (m.variants[n].precision != "bf16" or flags & BF16_FLAGS)]
    if not timed:
        return VariantChoice(default, "no other verified variant runs here")
    best_ms, best = min(timed)
    if best != default and best_ms <= 0.9 * base:
        return VariantChoice(best, f"{best} ran {base / best_ms:.2f}x as fast as {default} on this machine "
                                   f"({best_ms:.2f} vs {base:.2f} ms, {record.how or 'measured'} {record.measured_at})")
    return VariantChoice(default, f"no verified variant is 10 % faster than {default} on this machine")


def choose_variant(bundle: Bundle, providers: Sequence[str] | None = None, **inject: Any) -> str:
    """The name `variant_choice` picks (see there)."""
    return variant_choice(bundle, providers, **inject).name


def _with_threads(options: Any, kind: str, threads: int) -> Any:
    """`options` (or the engine's defaults) with its thread count set to `threads`."""
    if threads < 0:
        raise InputError(f"threads must be >= 0 (0 lets the engine choose), got {threads}")
    if kind == "openvino":
        from cvdeploy.runtime.openvino import OvOptions

        return replace(options if isinstance(options, OvOptions) else OvOptions(), num_threads=threads)
    return replace(options if isinstance(options, OrtOptions) else OrtOptions(), intra_op_threads=threads)


def _source_name(src: ImageSource) -> str | None:
    return str(src) if isinstance(src, str | Path) else None
