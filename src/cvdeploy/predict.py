"""Predictor: the inference pipeline as public, typed stages, composed by `predict`, the server and the benchmarks.

    decode(source) -> image          bytes, path, array or PIL image -> BGR uint8 (the decoding Ultralytics trains with)
    prepare(images) -> Prepared      letterbox (minimal rectangle when the images share a shape; classify: center crop)
                                     -> NCHW float32 tensor
    infer(tensor) -> outputs         the engine alone
    finish(prepared, outputs) -> [Result]   the task's decoder (`cvdeploy.vision.tasks`): boxes, NMS, masks, keypoints,
                                     oriented boxes or class probabilities, scaled back to each image

What is served is what is predicted: the server calls these same stages (it only adds a batcher between prepare
and infer, which batches tensors of the same shape), so its answers equal `predict`'s.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from cvdeploy.bundle import Bundle
from cvdeploy.errors import InputError
from cvdeploy.runtime import open_engine
from cvdeploy.runtime.exports import OpenVinoExport, is_openvino_export, openvino_export
from cvdeploy.runtime.onnxruntime import OrtOptions
from cvdeploy.vision.image import DecodeLimits, ImageSource, load_image
from cvdeploy.vision.letterbox import LetterboxParams, LetterboxSpec, preprocess
from cvdeploy.vision.postprocess import DetectOptions, decode_classify
from cvdeploy.vision.result import Result, Timings
from cvdeploy.vision.tasks import TASKS, TaskHead, decode_batch

SUPPORTED_TASKS = TASKS
# Ultralytics' predict arguments that mean something here (`predict`, `__call__`); any other is refused, naming these.
PREDICT_OPTIONS = ("conf", "iou", "classes", "max_det", "agnostic_nms", "retina_masks", "imgsz", "half", "save", "project",
                   "name", "verbose", "stream")
_DETECT_OPTIONS = ("conf", "iou", "max_det", "classes", "agnostic_nms", "retina_masks")
# Ultralytics arguments people pass out of habit, with what to do instead.
_OPTION_HINTS = {
    "device": "the device is chosen when the Predictor is made: Predictor(model, engine_options=OrtOptions(providers=('cuda',)))",
    "batch": "images are batched up to max_batch: Predictor(model, max_batch=8), then predict a list",
    "source": "pass the images as the first argument",
}


def _ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1000.0


class Predictor:
    """Runs a bundle (or a plain Ultralytics .onnx) on images and returns `Result`s.

    `model` is a bundle directory, a plain Ultralytics .onnx (nms=True exports included), an Ultralytics OpenVINO export
    (the `*_openvino_model/` directory or its .xml), or a loaded Bundle.

    >>> p = Predictor("yolo11n-shapes.cvd", conf=0.3)
    >>> result = p.predict("image.jpg")            # one image -> Result
    >>> results = p.predict(["a.jpg", "b.png"])    # a list -> list[Result], batched through the engine
    >>> r = p("image.jpg")[0]                      # Ultralytics' model(source): always a list
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
        self.bundle = open_model(model)
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
        self._fixed = fixed = isinstance(inp.shape[2], int) and isinstance(inp.shape[3], int)
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
        self.head = TaskHead(m.task, len(m.names), m.postprocess.end2end,
                             _kpt_shape(m, getattr(self.engine, "metadata", None)) if m.task == "pose" else None)
        if m.task == "pose" and self.head.kpt_shape is None:
            raise InputError(f"{self.bundle.name!r} is a pose model whose keypoint shape (kpt_shape) neither the bundle nor "
                             "the model's metadata gives: export it with Ultralytics, or build a bundle (cvdeploy build)")

    @property
    def names(self) -> dict[int, str]:
        return self.bundle.names

    @property
    def task(self) -> str:
        """detect, segment, pose, obb or classify."""
        return self.head.task

    def detect_options(self, **overrides: Any) -> DetectOptions:
        """The Predictor's options with per-call `conf`, `iou`, `max_det`, `classes`, `agnostic_nms`, `retina_masks` (None
        keeps the default; classes=None keeps every class). Unknown names are refused. A classify model ignores them,
        as Ultralytics does."""
        unknown = set(overrides) - set(_DETECT_OPTIONS)
        if unknown:
            raise InputError(f"unknown prediction option(s): {', '.join(sorted(unknown))}")
        if overrides.get("classes") is not None:
            overrides["classes"] = tuple(int(c) for c in overrides["classes"])
        if "agnostic_nms" in overrides:
            overrides["agnostic"] = bool(overrides.pop("agnostic_nms"))
        return replace(self.options, **{k: v for k, v in overrides.items() if v is not None or k == "classes"})

    def call_options(self, **options: Any) -> CallOptions:
        """Every option of `predict` and `__call__` checked at once (Ultralytics' names, `PREDICT_OPTIONS`), before any
        image is read: thresholds, imgsz, half, save, verbose, stream."""
        unknown = sorted(set(options) - set(PREDICT_OPTIONS))
        if unknown:
            hints = "; ".join(f"{k}: {_OPTION_HINTS[k]}" for k in unknown if k in _OPTION_HINTS)
            raise InputError(f"unknown prediction option(s): {', '.join(unknown)}; supported: {', '.join(PREDICT_OPTIONS)}"
                             + (f" ({hints})" if hints else ""))
        detect = self.detect_options(**{k: options[k] for k in _DETECT_OPTIONS if k in options})
        if options.get("half"):
            self._check_half()
        save = options.get("save", False)
        if not isinstance(save, bool):
            raise InputError(f"save must be True or False, got {save!r} (the folder is project/name, default runs/{self.task}/predict)")
        save_dir = Path(options.get("project") or f"runs/{self.task}") / str(options.get("name") or "predict") if save else None
        return CallOptions(detect, self._spec_for(options.get("imgsz")), save_dir, bool(options.get("verbose", False)),
                           bool(options.get("stream", False)))

    def _spec_for(self, imgsz: Any) -> LetterboxSpec:
        """The letterbox for a per-call imgsz (an int or (height, width)): the Predictor's own when it is the same size;
        another only for a model whose graph takes any size."""
        if imgsz is None:
            return self.spec
        hw: tuple[int, ...] = ()
        if isinstance(imgsz, int | np.integer) and not isinstance(imgsz, bool):
            hw = (int(imgsz), int(imgsz))
        elif isinstance(imgsz, list | tuple) and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in imgsz):
            hw = tuple(int(v) for v in imgsz)
        if len(hw) != 2:
            raise InputError(f"imgsz must be an integer or (height, width), got {imgsz!r}")
        if hw == tuple(self.spec.imgsz):
            return self.spec
        h, w = self.spec.imgsz
        if self._fixed:
            raise InputError(f"imgsz {imgsz} refused: this model's input is fixed at {h}x{w} (height x width) in its graph; "
                             f"leave imgsz out, or export the model with dynamic=True (or build the bundle at that size)")
        if min(hw) < self.spec.stride or any(v % self.spec.stride for v in hw):
            raise InputError(f"imgsz must be a positive multiple of the stride ({self.spec.stride}), got {imgsz}")
        return replace(self.spec, imgsz=hw)

    def _check_half(self) -> None:
        variants = self.bundle.manifest.variants
        if variants[self.variant].precision == "fp16":
            return
        fp16 = [n for n, v in variants.items() if v.precision == "fp16"]
        if fp16:
            raise InputError(f"half=True: this Predictor runs {self.variant}; open the fp16 variant to run in half precision: "
                             f"Predictor(model, variant={fp16[0]!r})")
        raise InputError(f"half=True: {self.bundle.name!r} has no fp16 variant to run (half precision pays off on a GPU): "
                         "build one with `cvdeploy build MODEL.pt -o OUT.cvd --variants onnx-fp32,onnx-fp16`")

    # -- the stages ------------------------------------------------------------------------------

    def decode(self, source: ImageSource) -> np.ndarray:
        """Stage 1: any image source -> HxWx3 BGR uint8, within this Predictor's decode limits."""
        return load_image(source, limits=self.limits)

    def prepare(self, images: list[np.ndarray], *, spec: LetterboxSpec | None = None) -> Prepared:
        """Stage 2: the bundle's letterbox and normalisation -> one NCHW float32 tensor (minimal-padding rectangle when
        every image has the same shape, Ultralytics' rule; square otherwise) and each image's letterbox parameters.
        `spec` replaces the Predictor's letterbox for this call (a per-call imgsz)."""
        if not images:
            raise InputError("no images to prepare")
        t0 = time.perf_counter()
        tensor, params = preprocess(images, spec or self.spec)
        return Prepared(tensor, params, [im.shape[:2] for im in images], _ms(t0, time.perf_counter()) / len(images))

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        """Stage 3, the engine alone, on a prepared NCHW float32 tensor; returns the first output (`infer_all`: all)."""
        return next(iter(self.engine.run({self._input_name: tensor}).values()))

    def infer_all(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """Stage 3, the engine alone, on a prepared NCHW float32 tensor; returns every output by name."""
        return self.engine.run({self._input_name: tensor})

    def finish(self, prepared: Prepared, outputs: dict[str, np.ndarray] | np.ndarray, *, options: DetectOptions | None = None,
               timings: Sequence[Timings] | None = None, sources: Sequence[str | None] | None = None) -> list[Result]:
        """Stage 4: the raw outputs of `prepared` (all its rows) -> one Result per image, in the image's pixels.

        `outputs` is `infer_all`'s dict (a segment model needs both of its outputs) or, for the other tasks, the one
        array `infer` returns. `timings` (one per image) get this stage's time added; `sources` name the images.
        """
        n = len(prepared.params)
        for name, arr in ({"output": outputs} if isinstance(outputs, np.ndarray) else outputs).items():
            if arr.shape[0] != n:
                raise InputError(f"finish: {arr.shape[0]} rows in output {name!r} for {n} prepared image(s)")
        t0 = time.perf_counter()
        decoded = decode_batch(self.head, outputs, prepared.params, options or self.options)
        post = _ms(t0, time.perf_counter()) / n
        timings = list(timings) if timings is not None else [Timings(preprocess=prepared.ms_per_image) for _ in range(n)]
        names = list(sources) if sources is not None else [None] * n
        results = []
        for d, shape, t, src in zip(decoded, prepared.shapes, timings, names, strict=True):
            t.postprocess += post
            if d.probs is not None:
                results.append(Result(self.task, self.names, shape, classes=decode_classify(d.probs), probabilities=d.probs,
                                      timings=t, source=src))
            else:
                results.append(Result(self.task, self.names, shape, detections=d.detections, timings=t, source=src))
        return results

    # -- the stages composed -----------------------------------------------------------------------

    def _decode_timed(self, src: ImageSource) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        img = self.decode(src)
        return img, _ms(t0, time.perf_counter())

    def _run(self, chunk: list[tuple[ImageSource, np.ndarray, float]], call: CallOptions) -> list[Result]:
        """One engine run over decoded images: prepare, infer, finish; the Results keep their images (for plot)."""
        prepared = self.prepare([im for _, im, _ in chunk], spec=call.spec)
        t0 = time.perf_counter()
        outputs = self.infer_all(prepared.tensor)
        infer = _ms(t0, time.perf_counter()) / len(chunk)
        timings = [Timings(decode=ms, preprocess=prepared.ms_per_image, infer=infer) for _, _, ms in chunk]
        results = self.finish(prepared, outputs, options=call.detect, timings=timings,
                              sources=[_source_name(src) for src, _, _ in chunk])
        for r, (_, im, _) in zip(results, chunk, strict=True):
            r.orig_img = im
        if call.verbose or call.save_dir is not None:
            call.report(results, prepared.tensor.shape)
        return results

    def _predict_many(self, sources: Sequence[ImageSource], call: CallOptions) -> list[Result]:
        # Every image is decoded before the engine runs: a bad one refuses the call before any work is spent.
        decoded = [(src, *self._decode_timed(src)) for src in sources]
        results: list[Result] = []
        for start in range(0, len(decoded), self.max_batch):
            results += self._run(decoded[start : start + self.max_batch], call)
        call.done()
        return results

    def _predict_stream(self, sources: Iterable[ImageSource], call: CallOptions) -> Iterator[Result]:
        # Lazily, max_batch images at a time: a long list (or a generator) is never held decoded all at once.
        chunk: list[tuple[ImageSource, np.ndarray, float]] = []
        for src in sources:
            chunk.append((src, *self._decode_timed(src)))
            if len(chunk) == self.max_batch:
                yield from self._run(chunk, call)
                chunk = []
        if chunk:
            yield from self._run(chunk, call)
        call.done()

    @overload
    def predict(self, images: ImageSource, *, stream: Literal[False] = ..., **options: Any) -> Result: ...
    @overload
    def predict(self, images: list[ImageSource] | tuple[ImageSource, ...], *, stream: Literal[False] = ...,
                **options: Any) -> list[Result]: ...
    @overload
    def predict(self, images: ImageSource | Iterable[ImageSource], *, stream: Literal[True], **options: Any) -> Iterator[Result]: ...

    def predict(self, images: ImageSource | Iterable[ImageSource], **options: Any) -> Result | list[Result] | Iterator[Result]:
        """One image -> Result; a list or tuple -> list[Result] (batched); stream=True -> a generator of Results, read
        and run max_batch images at a time (the images may then come from any iterator).

        Options, Ultralytics' names (`PREDICT_OPTIONS`): conf, iou, classes, max_det, agnostic_nms; imgsz (the model's
        own size, or any multiple of the stride for a dynamic-shape model); half (only when running an fp16 variant);
        save (annotated images into project/name, default runs/detect/predict); verbose (a line per image on stderr).
        Every option is checked before any image is read; any other name is refused.
        """
        call = self.call_options(**options)
        many = isinstance(images, list | tuple) or (call.stream and isinstance(images, Iterator))
        if isinstance(images, list | tuple) and not images:
            raise InputError("no images given")
        if call.stream:
            return self._predict_stream(images if many else [images], call)  # type: ignore[list-item, arg-type]
        results = self._predict_many(images if many else [images], call)  # type: ignore[arg-type, list-item]
        return results if many else results[0]

    def __call__(self, source: ImageSource | Iterable[ImageSource], **options: Any) -> list[Result] | Iterator[Result]:
        """Ultralytics' `model(source)`: always a list of Results, one per image (a generator with stream=True), so that
        `predictor(image)[0].boxes.xyxy` reads as it does with Ultralytics. Options as `predict`."""
        if options.get("stream"):
            return self.predict(source if isinstance(source, list | tuple | Iterator) else [source], **options)  # type: ignore[arg-type, list-item]
        return self.predict(list(source) if isinstance(source, list | tuple | Iterator) else [source], **options)  # type: ignore[arg-type, list-item]

    def stream(self, source: Any, **options: Any) -> Iterator[Any]:
        """Predict every frame of a video, stream, webcam, directory or glob as it arrives: `cvdeploy.sources.stream`
        (see docs/sources.md) with this Predictor; yields one FrameResult per frame."""
        from cvdeploy.sources import stream

        return stream(self, source, **options)

    async def apredict(self, image: ImageSource, **options: Any) -> Result:
        """The same as `predict` for one image, off the event loop (ONNX Runtime releases the GIL)."""
        if options.get("stream"):
            raise InputError("apredict does not stream: call it once per image, or iterate predict(images, stream=True) in a thread")
        return await asyncio.to_thread(self.predict, image, **options)

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


@dataclass
class CallOptions:
    """One `predict` call's settings, checked up front (`Predictor.call_options`), and what it reports as it goes:
    `verbose` lines on stderr (stdout is for results) and annotated images written under `save_dir`."""

    detect: DetectOptions
    spec: LetterboxSpec
    save_dir: Path | None = None
    verbose: bool = False
    stream: bool = False
    _seen: int = 0
    _ms: tuple[float, float, float] = (0.0, 0.0, 0.0)
    _shape: tuple[int, ...] = ()

    def report(self, results: list[Result], input_shape: tuple[int, ...]) -> None:
        h, w = input_shape[2:]
        for r in results:
            self._seen += 1
            if self.save_dir is not None:
                r.save(self.save_dir / (Path(r.source).name if r.source else f"image{self._seen - 1}.jpg"))
            if self.verbose:
                where = f" {r.source}" if r.source else ""
                print(f"image {self._seen}{where}: {h}x{w} {r.verbose()}{r.timings.infer:.1f}ms", file=sys.stderr)
            t = r.timings
            self._ms = (self._ms[0] + t.preprocess, self._ms[1] + t.infer, self._ms[2] + t.postprocess)
        self._shape = (1, *input_shape[1:])

    def done(self) -> None:
        if self.verbose and self._seen:
            pre, inf, post = (v / self._seen for v in self._ms)
            print(f"Speed: {pre:.1f}ms preprocess, {inf:.1f}ms inference, {post:.1f}ms postprocess per image at shape "
                  f"{self._shape}", file=sys.stderr)
        if self.verbose and self.save_dir is not None:
            print(f"Results saved to {self.save_dir}", file=sys.stderr)


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


def open_model(model: str | os.PathLike[str] | Bundle) -> Bundle:
    """What the Predictor opens: a loaded Bundle as is; an Ultralytics OpenVINO export (its `*_openvino_model/`
    directory or its .xml) as a one-variant bundle from its metadata.yaml; anything else through `Bundle.load` (bundle
    directories, plain Ultralytics .onnx files, nms=True exports included)."""
    if isinstance(model, Bundle):
        return model
    if is_openvino_export(model):
        return _openvino_bundle(openvino_export(model))
    return Bundle.load(model)


def _openvino_bundle(export: OpenVinoExport) -> Bundle:
    """An Ultralytics OpenVINO export described as a one-variant bundle, as `Bundle.from_onnx` describes an .onnx."""
    from cvdeploy import __version__
    from cvdeploy.bundle.bundle import sha256_file
    from cvdeploy.bundle.manifest import Manifest, PostprocessSpec, PreprocessSpec, SourceInfo, TaskInfo, TensorInfo, Variant
    from cvdeploy.runtime.openvino import read_io

    meta, xml = export.metadata, export.xml
    inputs, outputs = read_io(xml)
    digest, weights = sha256_file(xml), sha256_file(export.weights)
    manifest = Manifest(
        name=xml.stem,
        task=meta.task,  # type: ignore[arg-type]
        names=meta.names,
        task_info=TaskInfo(kpt_shape=meta.kpt_shape, kpt_names=meta.kpt_names) if meta.kpt_shape else None,
        input=TensorInfo(name=inputs[0].name, shape=list(inputs[0].shape), dtype=inputs[0].dtype),  # type: ignore[arg-type]
        outputs=[TensorInfo(name=o.name, shape=list(o.shape), dtype=o.dtype) for o in outputs],  # type: ignore[arg-type]
        preprocess=PreprocessSpec.for_task(meta.task, meta.imgsz, meta.stride),
        postprocess=PostprocessSpec(end2end=meta.end2end),
        # Computed in f32 whatever the weights are stored in (a half=True export compresses them to fp16): OpenVINO's CPU
        # plugin would otherwise pick bf16 on CPUs that have it.
        variants={"openvino-fp32": Variant(file=xml.name, format="openvino", engine="openvino", precision="fp32", sha256=digest,
                                           size_bytes=xml.stat().st_size + export.weights.stat().st_size,
                                           companions={export.weights.name: weights})},
        default_variant="openvino-fp32",
        source=SourceInfo(file=xml.name, sha256=digest, format="openvino", exporter=meta.version and f"ultralytics {meta.version}",
                          golden_images=""),
        created_at=meta.date or datetime.now(UTC).isoformat(),
        cvdeploy_version=__version__,
    )
    return Bundle(manifest, None, onnx_path=xml)


def _kpt_shape(manifest: Any, engine_metadata: dict[str, str] | None) -> tuple[int, int] | None:
    """A pose model's keypoint shape: the bundle's, else the ONNX model's own Ultralytics metadata (a plain .onnx)."""
    info = manifest.task_info
    if info is not None and info.kpt_shape is not None:
        return tuple(info.kpt_shape)
    if engine_metadata and "kpt_shape" in engine_metadata:
        from cvdeploy.runtime.exports import parse_kpt_shape

        return parse_kpt_shape(engine_metadata["kpt_shape"])
    return None


def _with_threads(options: Any, kind: str, threads: int) -> Any:
    """`options` (or the engine's defaults) with its thread count set to `threads`."""
    if threads < 0:
        raise InputError(f"threads must be >= 0 (0 lets the engine choose), got {threads}")
    if kind == "openvino":
        from cvdeploy.runtime.openvino import OvOptions

        return replace(options if isinstance(options, OvOptions) else OvOptions(), num_threads=threads)
    if kind == "ncnn":
        from cvdeploy.runtime.ncnn import NcnnOptions

        return replace(options if isinstance(options, NcnnOptions) else NcnnOptions(), num_threads=threads)
    if kind == "litert":
        from cvdeploy.runtime.litert import LiteRtOptions

        return replace(options if isinstance(options, LiteRtOptions) else LiteRtOptions(), num_threads=threads)
    return replace(options if isinstance(options, OrtOptions) else OrtOptions(), intra_op_threads=threads)


def _source_name(src: ImageSource) -> str | None:
    return str(src) if isinstance(src, str | Path) else None
