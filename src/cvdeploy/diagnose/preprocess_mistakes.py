"""The catalogue of preprocessing mistakes the audit reproduces: each a `Mistake` that builds the engine input a
deployment making it would build, with what it does, its fix and its symptom; `CORRECT` is the bundle's own pipeline."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np

from cvdeploy.diagnose.preprocess_samples import Sample
from cvdeploy.errors import InputError
from cvdeploy.vision.letterbox import LetterboxParams, LetterboxSpec, letterbox, preprocess, to_tensor

__all__ = ["ALIASES", "ALL", "CORRECT", "MISTAKES", "Mistake", "PrepareFn", "resolve_mistakes"]

# -- the candidates --------------------------------------------------------------------------------

PrepareFn = Callable[[Sample, LetterboxSpec], tuple[np.ndarray, LetterboxParams]]


@dataclass(frozen=True)
class Mistake:
    """A candidate preprocessing mistake: how a deployment making it builds the engine input from a decoded image.

    `prepare(sample, spec)` returns the (1, 3, H, W) float32 tensor that deployment feeds the engine and the letterbox
    parameters it maps boxes back with (`orig_shape` is the frame it reports boxes in). `explain` and `fix` are
    format strings over the bundle's spec: {order} {other} {imgsz} {w} {h} {pad} {scale} {stride} {large} {small}.
    """

    name: str
    prepare: PrepareFn
    explain: str  # one line: what the broken deployment does
    fix: str  # one line: how to fix it
    symptom: str  # how it tends to show in predictions
    needs_dynamic: bool = False  # the engine must accept another input size
    same_reason: str = "it gives the same engine input as the correct pipeline on every image"

    def describe(self, spec: LetterboxSpec) -> tuple[str, str]:
        """(explanation, fix) for a bundle with this spec."""
        values = _spec_words(spec)
        return self.explain.format(**values), self.fix.format(**values)


def _spec_words(spec: LetterboxSpec) -> dict[str, Any]:
    h, w = spec.imgsz
    return {"order": spec.channel_order, "other": "BGR" if spec.channel_order == "RGB" else "RGB",
            "imgsz": h if h == w else f"{w}x{h}", "w": w, "h": h, "pad": spec.pad_value, "wrong_pad": _wrong_pad(spec),
            "scale": f"{spec.scale:g}", "stride": spec.stride, "large": _large_size(spec), "small": _small_size(spec),
            "convert": "cv2.COLOR_BGR2RGB" if spec.channel_order == "RGB" else "cv2.COLOR_RGB2BGR"}


def _one(out: tuple[np.ndarray, list[LetterboxParams]]) -> tuple[np.ndarray, LetterboxParams]:
    tensor, params = out
    return tensor, params[0]


def _large_size(spec: LetterboxSpec) -> int:
    side = max(spec.imgsz)
    return 640 if side < 640 else 2 * side  # Ultralytics' default imgsz is the usual leftover


def _small_size(spec: LetterboxSpec) -> int:
    return max(spec.stride, round(max(spec.imgsz) / 2 / spec.stride) * spec.stride)


def _wrong_pad(spec: LetterboxSpec) -> int:
    return 0 if spec.pad_value != 0 else 114


def _correct(s: Sample, spec: LetterboxSpec) -> tuple[np.ndarray, LetterboxParams]:
    # Exactly Predictor.prepare on one image, as the server prepares each request.
    return _one(preprocess([s.image], spec))


def _bgr_rgb_swap(s: Sample, spec: LetterboxSpec) -> tuple[np.ndarray, LetterboxParams]:
    return _one(preprocess([s.image], replace(spec, channel_order="BGR" if spec.channel_order == "RGB" else "RGB")))


def _stretch_resize(s: Sample, spec: LetterboxSpec) -> tuple[np.ndarray, LetterboxParams]:
    th, tw = spec.imgsz
    h0, w0 = s.image.shape[:2]
    img = cv2.resize(s.image, (tw, th), interpolation=cv2.INTER_LINEAR)
    # Per-axis gains with no padding: the stretch deployment maps its boxes back consistently, only the input is wrong.
    return to_tensor([img], spec), LetterboxParams((h0, w0), (th, tw), (tw, th), 0, 0)


def _square_letterbox(s: Sample, spec: LetterboxSpec) -> tuple[np.ndarray, LetterboxParams]:
    img, params = letterbox(s.image, spec, auto=False)
    return to_tensor([img], spec), params


def _missing_normalization(s: Sample, spec: LetterboxSpec) -> tuple[np.ndarray, LetterboxParams]:
    return _one(preprocess([s.image], replace(spec, scale=1.0)))


def _double_normalization(s: Sample, spec: LetterboxSpec) -> tuple[np.ndarray, LetterboxParams]:
    return _one(preprocess([s.image], replace(spec, scale=spec.scale * spec.scale)))


def _wrong_imgsz_large(s: Sample, spec: LetterboxSpec) -> tuple[np.ndarray, LetterboxParams]:
    return _one(preprocess([s.image], replace(spec, imgsz=(_large_size(spec),) * 2)))


def _wrong_imgsz_small(s: Sample, spec: LetterboxSpec) -> tuple[np.ndarray, LetterboxParams]:
    return _one(preprocess([s.image], replace(spec, imgsz=(_small_size(spec),) * 2)))


def _wrong_pad_value(s: Sample, spec: LetterboxSpec) -> tuple[np.ndarray, LetterboxParams]:
    return _one(preprocess([s.image], replace(spec, pad_value=_wrong_pad(spec))))


def _exif_ignored(s: Sample, spec: LetterboxSpec) -> tuple[np.ndarray, LetterboxParams]:
    return _one(preprocess([s.unoriented()], spec))


CORRECT = Mistake(
    "correct", _correct,
    explain="the bundle's own preprocessing: letterbox to {imgsz} (minimal rectangle), pad {pad}, {order}, divide by {scale}",
    fix="nothing to fix", symptom="the reference every candidate is compared with")

MISTAKES: dict[str, Mistake] = {m.name: m for m in (
    Mistake("bgr_rgb_swap", _bgr_rgb_swap,
            explain="the deployment feeds {other} where the model was trained on {order} (e.g. cv2.imread's BGR straight "
                    "into the network, or PIL's RGB into a BGR model)",
            fix="convert with cv2.cvtColor(img, {convert}) before the network, or use cvdeploy's Predictor",
            symptom="boxes mostly still found, confidences lower, classes told apart by colour confused"),
    Mistake("stretch_resize", _stretch_resize,
            explain="the deployment resizes straight to {w}x{h} with cv2.resize, distorting the aspect ratio, instead of "
                    "letterboxing",
            fix="letterbox: scale by min({h}/h, {w}/w), pad with {pad} to a multiple of {stride} "
                "(cvdeploy.vision.letterbox.letterbox) and map boxes back through the same scale and padding",
            symptom="elongated images lose confidence and recall; objects squeezed into other aspect ratios are misclassified",
            same_reason="every image already has the model's aspect ratio: a stretch is a letterbox there"),
    Mistake("square_letterbox", _square_letterbox,
            explain="the deployment pads every image to the full {w}x{h} square where the bundle pads only to the next "
                    "multiple of {stride} (rect)",
            fix="pad to the minimal rectangle (letterbox(img, spec, auto=True)), as Ultralytics' predictor does; a fixed "
                "square is harmless if the model was validated that way",
            symptom="small shifts of confidences and box edges on elongated images; rarely a large mAP change",
            needs_dynamic=True, same_reason="the bundle (or its fixed-size graph) pads to the full square already, or every image is square"),
    Mistake("missing_normalization", _missing_normalization,
            explain="the deployment feeds 0..255 pixel values where the model expects 0..1 (no division by {scale})",
            fix="divide by {scale}: img.astype(np.float32) / {scale}",
            symptom="saturated activations: confidences collapse or explode, boxes in the wrong places, few true detections"),
    Mistake("double_normalization", _double_normalization,
            explain="the deployment divides by {scale} twice (e.g. a normalising client in front of a normalising export): "
                    "the model sees an almost black image",
            fix="divide by {scale} exactly once between uint8 pixels and the network",
            symptom="almost no detections, and those left with low confidence"),
    Mistake("wrong_imgsz_large", _wrong_imgsz_large,
            explain="the deployment letterboxes to {large} where the model was built for {imgsz} (a leftover imgsz=640, "
                    "Ultralytics' default, is the usual cause)",
            fix="use imgsz {imgsz}, the bundle's preprocess.imgsz (cvdeploy's Predictor reads it from the manifest)",
            symptom="objects larger than the model learnt: big objects missed or split, small ones sometimes better",
            needs_dynamic=True),
    Mistake("wrong_imgsz_small", _wrong_imgsz_small,
            explain="the deployment letterboxes to {small} where the model was built for {imgsz}",
            fix="use imgsz {imgsz}, the bundle's preprocess.imgsz (cvdeploy's Predictor reads it from the manifest)",
            symptom="small objects missed, box edges coarser, confidences lower",
            needs_dynamic=True),
    Mistake("wrong_pad_value", _wrong_pad_value,
            explain="the deployment pads with {wrong_pad} where the model was trained with {pad}",
            fix="pad with ({pad}, {pad}, {pad}) (cv2.copyMakeBorder(..., value=({pad},) * 3))",
            symptom="objects near the padded border lose confidence; spurious boxes on the padding",
            same_reason="no image needs padding at the model's input size"),
    Mistake("exif_ignored", _exif_ignored,
            explain="the deployment decodes files without applying their EXIF orientation (a raw JPEG decoder, or PIL "
                    "without ImageOps.exif_transpose): phone photos reach the model rotated",
            fix="apply the EXIF orientation when decoding: cv2.imread/cv2.imdecode with IMREAD_COLOR do, PIL needs "
                "ImageOps.exif_transpose(img)",
            symptom="on rotated photos only: fewer and lower-confidence detections, boxes in the unrotated frame",
            same_reason="no image was given as a file carrying an EXIF orientation other than 1"),
)}
ALL: tuple[str, ...] = tuple(MISTAKES)
ALIASES: dict[str, tuple[str, ...]] = {
    "wrong_imgsz": ("wrong_imgsz_large", "wrong_imgsz_small"),
    "normalization": ("missing_normalization", "double_normalization"),
}


def resolve_mistakes(mistakes: Iterable[str | Mistake]) -> list[Mistake]:
    """Names (or aliases, or custom Mistake objects) -> the candidates, in order, without repeats."""
    if isinstance(mistakes, str | Mistake):
        mistakes = [mistakes]
    out: dict[str, Mistake] = {}
    unknown = []
    for m in mistakes:
        if isinstance(m, Mistake):
            if m.name == CORRECT.name:
                raise InputError("'correct' is the reference the audit always runs, not a candidate mistake")
            out.setdefault(m.name, m)
        elif m in MISTAKES:
            out.setdefault(m, MISTAKES[m])
        elif m in ALIASES:
            for name in ALIASES[m]:
                out.setdefault(name, MISTAKES[name])
        else:
            unknown.append(str(m))
    if unknown:
        raise InputError(f"unknown preprocessing mistake(s): {', '.join(unknown)} "
                         f"(known: {', '.join([*ALL, *ALIASES])})")
    if not out:
        raise InputError("no candidate mistakes to audit")
    return list(out.values())
