"""Preprocessing audit: re-run a bundle under candidate preprocessing mistakes and name the one that reproduces a field symptom.

A deployment that gets preprocessing wrong (BGR fed to an RGB model, a stretch instead of a letterbox, no /255, ...)
keeps running and keeps answering; only its accuracy drops. Each mistake leaves its own signature on the predictions,
so the audit reproduces every candidate with the bundle's own engine and postprocessing (only preprocessing changes)
and compares:

    audit_with_predictions(predictor, images, field_predictions)   field answers on known images -> which pipeline agrees
    audit_with_labels(predictor, data_yaml, field_map=0.31)        labelled images -> the mAP each mistake gives

See docs/preprocessing-audit.md for the candidates, the scoring and how to read a report.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import ExifTags, Image

from cvdeploy.errors import CvdeployError, InputError
from cvdeploy.evaluate.coco import LabelledImage, coco_map, load_yolo_split
from cvdeploy.predict import Prepared
from cvdeploy.vision.detections import Detections
from cvdeploy.vision.image import ImageSource
from cvdeploy.vision.letterbox import LetterboxParams, LetterboxSpec, letterbox, preprocess, to_tensor
from cvdeploy.vision.postprocess import DetectOptions
from cvdeploy.vision.result import Result

if TYPE_CHECKING:
    from cvdeploy.predict import Predictor

__all__ = [
    "ALIASES",
    "ALL",
    "CORRECT",
    "MISTAKES",
    "AuditReport",
    "FieldPrediction",
    "Finding",
    "Mistake",
    "Sample",
    "audit_with_labels",
    "audit_with_predictions",
    "load_samples",
    "parse_field_predictions",
    "resolve_mistakes",
    "run_candidate",
    "simulate_deployment",
]

_ORIENTATION_TAG = int(ExifTags.Base.Orientation)
IOU_MATCH = 0.5  # a field box and a re-run box are the same detection: same class, IoU >= 0.5 (as evaluate.parity)
CLEAR_MARGIN = 0.02  # a mistake must agree this much better than the correct pipeline (absolute) ...
CLEAR_RATIO = 0.5  # ... and leave at most this share of the correct pipeline's disagreement, to be named
TIE = 0.01  # mistakes this close to the best one are named with it: these images cannot tell them apart
GOOD_AGREEMENT = 0.9  # below this, even the best candidate reproduces the field only in part
MAP_MATCH = 0.02  # labels mode: mAP differences smaller than this are noise on a small set
_WINDOW = 32  # images decoded at once: bounds memory on a large set of field photos


# -- images --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Sample:
    """One audited image: decoded as the bundle expects (BGR, EXIF orientation applied), with its encoded file if known."""

    image: np.ndarray  # HxWx3 BGR uint8
    data: bytes | None = None  # the encoded file: needed to decode it the wrong way (EXIF ignored)
    name: str | None = None
    orientation: int = 1  # the file's EXIF orientation tag (1: upright, nothing to apply)

    def unoriented(self) -> np.ndarray:
        """The image decoded without applying its EXIF orientation (the sensor's raw pixel order)."""
        if self.data is None or self.orientation == 1:
            return self.image
        img = cv2.imdecode(np.frombuffer(self.data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if img is None:  # a file OpenCV cannot read: Pillow, without exif_transpose
            with Image.open(io.BytesIO(self.data)) as im:
                img = cv2.cvtColor(np.asarray(im.convert("RGB")), cv2.COLOR_RGB2BGR)
        return np.ascontiguousarray(img)


def _orientation(data: bytes) -> int:
    try:
        with Image.open(io.BytesIO(data)) as im:
            value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # any header Pillow cannot parse simply has no orientation for us
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_images(images: Sequence[ImageSource]) -> None:
    if isinstance(images, str | os.PathLike | bytes | np.ndarray):
        raise InputError("images must be a list of images (paths, bytes or arrays), not a single one")
    if not images:
        raise InputError("no images to audit: give the images the field predictions were made on")


def _load(predictor: Predictor, src: ImageSource, i: int) -> Sample:
    data: bytes | None = None
    name: str | None = None
    if isinstance(src, str | os.PathLike):
        name = str(src)
        path = Path(src)
        if not path.is_file():
            raise InputError(f"image {i} not found: {path}")
        data = path.read_bytes()
    elif isinstance(src, bytes | bytearray | memoryview):
        data = bytes(src)
    image = predictor.decode(data if data is not None else src)
    return Sample(image, data, name, _orientation(data) if data is not None else 1)


def _windows(predictor: Predictor, images: Sequence[ImageSource]) -> Iterator[tuple[int, list[Sample]]]:
    """(offset, decoded samples) a window at a time: a field set of large photos is never all in memory."""
    for start in range(0, len(images), _WINDOW):
        yield start, [_load(predictor, images[i], i) for i in range(start, min(start + _WINDOW, len(images)))]


def load_samples(predictor: Predictor, images: Sequence[ImageSource]) -> list[Sample]:
    """Decode `images` (paths, encoded bytes, BGR arrays or PIL images) with the Predictor's decoder.

    Files and bytes keep their encoded form, so the EXIF mistake can be reproduced; arrays and PIL images cannot
    (they are already decoded) and leave that candidate out.
    """
    _check_images(images)
    return [s for _, window in _windows(predictor, images) for s in window]


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


# -- running a candidate ---------------------------------------------------------------------------


def _dynamic(predictor: Predictor) -> bool:
    shape = predictor.engine.inputs[0].shape
    return not (isinstance(shape[2], int) and isinstance(shape[3], int))


def _infer(predictor: Predictor, prepared: Sequence[tuple[np.ndarray, LetterboxParams]], names: Sequence[str | None],
           options: DetectOptions) -> list[Result]:
    """The engine and the bundle's postprocessing on prepared (1, 3, H, W) tensors; tensors of one shape are batched."""
    results: list[Result | None] = [None] * len(prepared)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (tensor, _) in enumerate(prepared):
        groups.setdefault(tensor.shape, []).append(i)
    for idx in groups.values():
        for b in range(0, len(idx), predictor.max_batch):
            chunk = idx[b : b + predictor.max_batch]
            tensor = np.concatenate([prepared[i][0] for i in chunk])
            params = [prepared[i][1] for i in chunk]
            out = predictor.finish(Prepared(tensor, params, [p.orig_shape for p in params]), predictor.infer_all(tensor),
                                   options=options, sources=[names[i] for i in chunk])
            for i, r in zip(chunk, out, strict=True):
                results[i] = r
    return [r for r in results if r is not None]


def run_candidate(predictor: Predictor, samples: Sequence[Sample], mistake: Mistake, options: DetectOptions) -> list[Result]:
    """Predict `samples` as a deployment making `mistake` would: its tensors, the bundle's engine and postprocessing.

    One Result per sample, with boxes in the frame that deployment reports them in.
    """
    return _infer(predictor, [mistake.prepare(s, predictor.spec) for s in samples], [s.name for s in samples], options)


def simulate_deployment(predictor: Predictor, images: Sequence[ImageSource], mistake: str | Mistake = "correct",
                        **overrides: Any) -> list[dict[str, Any]]:
    """What a deployment making `mistake` ("correct": none) answers for each image, in the image API's JSON shape.

    Useful to see a mistake's effect on your own images, and to rehearse the audit (the tests do).
    Overrides: conf, iou, max_det, classes.
    """
    m = CORRECT if mistake in ("correct", CORRECT) else resolve_mistakes([mistake])[0]
    _check_images(images)
    options = predictor.detect_options(**overrides)
    return [{"model_name": predictor.bundle.name, **r.to_dict()}
            for _, window in _windows(predictor, images) for r in run_candidate(predictor, window, m, options)]


# -- field predictions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldPrediction:
    """One image's recorded field answer."""

    detections: Detections
    shape: tuple[int, int] | None = None  # (height, width) the field reported, when it did


def _box_of(det: Mapping[str, Any], where: str) -> list[float]:
    box = det.get("box", det.get("xyxy"))
    if isinstance(box, Mapping):
        try:
            return [float(box[k]) for k in ("x1", "y1", "x2", "y2")]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}: a box needs numbers x1, y1, x2, y2, got {dict(box)!r}") from None
    if isinstance(box, Sequence) and len(box) == 4:
        try:
            return [float(v) for v in box]
        except (TypeError, ValueError):
            raise InputError(f"{where}: box values must be numbers, got {box!r}") from None
    raise InputError(f"{where}: each detection needs a 'box' {{x1, y1, x2, y2}} (or 'xyxy': [x1, y1, x2, y2]) in pixels")


def _detections_of(item: Any, where: str) -> FieldPrediction:
    if isinstance(item, Result):
        if item.detections is None:
            raise InputError(f"{where}: a {item.task} result has no detections")
        return FieldPrediction(item.detections, tuple(item.orig_shape))  # type: ignore[arg-type]
    if isinstance(item, Detections):
        return FieldPrediction(item)
    shape = None
    if isinstance(item, Mapping):
        img = item.get("image")
        if isinstance(img, Mapping) and "height" in img and "width" in img:
            shape = (int(img["height"]), int(img["width"]))
        if "detections" not in item and "xyxy" in item:  # column form: parallel lists
            try:
                xyxy = np.asarray(item["xyxy"], np.float32).reshape(-1, 4)
                conf = np.asarray(item.get("confidence", item.get("conf")), np.float32).reshape(-1)
                cls = np.asarray(item.get("class_id", item.get("cls")), np.int64).reshape(-1)
                return FieldPrediction(Detections(xyxy, conf, cls), shape)
            except (TypeError, ValueError) as e:
                raise InputError(f"{where}: xyxy, confidence and class_id must be parallel lists of numbers ({e})") from None
        if "detections" not in item:
            raise InputError(f"{where}: expected the image API's answer ({{'detections': [...]}}), "
                             f"got keys {', '.join(map(str, item)) or 'none'}")
        item = item["detections"]
    if not isinstance(item, Sequence) or isinstance(item, str | bytes):
        raise InputError(f"{where}: expected a list of detections, got {type(item).__name__}")
    boxes, confs, classes = [], [], []
    for j, det in enumerate(item):
        if not isinstance(det, Mapping):
            raise InputError(f"{where}, detection {j}: expected an object with box, confidence and class_id")
        boxes.append(_box_of(det, f"{where}, detection {j}"))
        try:
            confs.append(float(det["confidence"]))
            classes.append(int(det["class_id"]))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}, detection {j}: needs a numeric 'confidence' and an integer 'class_id'") from None
    return FieldPrediction(Detections(np.asarray(boxes, np.float32).reshape(-1, 4), confs, classes), shape)


def parse_field_predictions(field_predictions: Any, n_images: int) -> list[FieldPrediction]:
    """Field answers, one per image in order: the image API's JSON (`{"detections": [{"box": {x1..y2}, "confidence",
    "class_id"}, ...]}`), a bare list of such detections, columns (`{"xyxy", "confidence", "class_id"}`), or Result /
    Detections objects. A `{"predictions": [...]}` or `{"results": [...]}` wrapper is unwrapped."""
    if isinstance(field_predictions, Mapping):
        for key in ("predictions", "results"):
            if key in field_predictions:
                field_predictions = field_predictions[key]
                break
        else:
            raise InputError("field predictions: expected a list with one answer per image")
    if not isinstance(field_predictions, Sequence) or isinstance(field_predictions, str | bytes):
        raise InputError("field predictions: expected a list with one answer per image")
    if len(field_predictions) != n_images:
        raise InputError(f"{len(field_predictions)} field prediction(s) for {n_images} image(s): give one answer per image, "
                         "in the same order as the images")
    return [_detections_of(p, f"field prediction {i}") for i, p in enumerate(field_predictions)]


# -- agreement between two sets of predictions -----------------------------------------------------


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def _agreement(field: Sequence[Detections], rerun: Sequence[Detections], conf: float) -> dict[str, Any]:
    """Greedy matching (field boxes by confidence, same class, IoU >= 0.5), pooled over images.

    `rerun` is predicted at half the field's threshold so that a box just below it still matches; its unmatched boxes
    count only above the threshold.
    """
    matched = n_field = n_rerun = 0
    ious: list[float] = []
    pairs: list[tuple[float, float]] = []
    rerun_kept, rerun_conf = 0, 0.0
    for f, r in zip(field, rerun, strict=True):
        n_field += len(f)
        above = r.confidence >= conf
        rerun_kept += int(above.sum())
        rerun_conf += float(r.confidence[above].sum())
        used = np.zeros(len(r), bool)
        for j in np.argsort(-f.confidence, kind="stable"):
            if len(r) == 0:
                break
            iou = _iou(f.xyxy[j], r.xyxy)
            iou[(r.class_id != f.class_id[j]) | used] = 0
            k = int(iou.argmax())
            if iou[k] >= IOU_MATCH:
                used[k] = True
                ious.append(float(iou[k]))
                pairs.append((float(f.confidence[j]), float(r.confidence[k])))
        matched += int(used.sum())
        n_rerun += int((above | used).sum())
    total = n_field + n_rerun
    f1 = 1.0 if total == 0 else 2 * matched / total
    mean_iou = float(np.mean(ious)) if ious else (1.0 if total == 0 else 0.0)
    dconf = float(np.mean([abs(a - b) for a, b in pairs])) if pairs else (0.0 if total == 0 else 1.0)
    corr = None
    if len(pairs) >= 3:
        a, b = np.asarray(pairs).T
        if a.std() > 1e-9 and b.std() > 1e-9:
            corr = round(float(np.corrcoef(a, b)[0, 1]), 4)
    score = f1 * (1.0 - dconf) * mean_iou if matched or total == 0 else 0.0
    return {"agreement": round(score, 4), "box_f1": round(f1, 4), "matched": matched, "field_boxes": n_field,
            "rerun_boxes": n_rerun, "mean_iou": round(mean_iou, 4), "mean_abs_dconf": round(dconf, 4), "conf_corr": corr,
            "dets_per_image": round(rerun_kept / max(len(rerun), 1), 3),
            "mean_conf": round(rerun_conf / rerun_kept, 4) if rerun_kept else None}


# -- the report ------------------------------------------------------------------------------------


@dataclass
class Finding:
    """One pipeline's result: a candidate mistake, or the correct pipeline (the baseline)."""

    mistake: str
    score: float  # predictions mode: agreement with the field (0..1, 1 = reproduces it); labels mode: mAP
    evidence: dict[str, Any]
    explanation: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return {"mistake": self.mistake, "score": round(self.score, 4), "evidence": self.evidence,
                "explanation": self.explanation, "fix": self.fix}


@dataclass
class AuditReport:
    """What the audit found: the ranked candidates, the one(s) named as the cause (if any) and why."""

    mode: str  # "predictions" or "labels"
    images: int
    baseline: Finding  # the bundle's own preprocessing
    findings: list[Finding]  # the candidate mistakes, best explanation (or most harmful) first
    cause: list[str]  # the mistakes named as the cause; empty: none (see verdict)
    verdict: str
    observed: dict[str, Any] = field(default_factory=dict)  # the field symptom: prediction statistics or mAP
    skipped: dict[str, str] = field(default_factory=dict)  # candidates not run, and why

    @property
    def looks_right(self) -> bool:
        """True when the correct pipeline explains the field best (or, with labels, matches the field mAP)."""
        return not self.cause and self.observed.get("correct_explains", False)

    def finding(self, name: str) -> Finding:
        for f in [self.baseline, *self.findings]:
            if f.mistake == name:
                return f
        raise InputError(f"the report has no finding {name!r}" + (f" ({self.skipped[name]})" if name in self.skipped else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "images": self.images, "verdict": self.verdict, "cause": list(self.cause),
                "looks_right": self.looks_right, "observed": self.observed, "baseline": self.baseline.to_dict(),
                "findings": [f.to_dict() for f in self.findings], "skipped": dict(self.skipped)}

    def to_text(self) -> str:
        """A plain-text table for a terminal or a log."""
        if self.mode == "predictions":
            first = "agreement"
            cols = (("box F1", "box_f1"), ("IoU", "mean_iou"), ("|Δconf|", "mean_abs_dconf"), ("dets/img", "dets_per_image"))
        else:
            first = "mAP50-95" if self.observed.get("metric", "map50_95") == "map50_95" else "mAP50"
            other = ("mAP50", "map50") if first == "mAP50-95" else ("mAP50-95", "map50_95")
            cols = (other, ("drop", "drop"), ("dets/img", "dets_per_image"))
        o = self.observed
        if self.mode == "predictions":
            seen = (f"field: {self.images} images, {o.get('field_boxes')} boxes ({o.get('dets_per_image')} per image), "
                    f"mean confidence {_fmt(o.get('mean_conf'))}, threshold {o.get('conf_threshold')}")
        else:
            fm = o.get("field_map")
            seen = f"field {first}: {'not given' if fm is None else f'{fm:.4f}'} ({self.images} labelled images, {o.get('instances')} objects)"
        lines = [self.verdict, "", seen, f"  {'pipeline':<22} {first:>9} " + " ".join(f"{h:>8}" for h, _ in cols)]
        for f in [self.baseline, *self.findings]:
            mark = "*" if f.mistake in self.cause else " "
            lines.append(f"{mark} {f.mistake:<22} {f.score:>9.4f} " + " ".join(f"{_fmt(f.evidence.get(k)):>8}" for _, k in cols))
        for name, why in self.skipped.items():
            lines.append(f"  {name:<22} skipped: {why}")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


# -- the audits ------------------------------------------------------------------------------------


def _candidates(predictor: Predictor, mistakes: Iterable[str | Mistake]) -> tuple[list[Mistake], dict[str, str]]:
    chosen = resolve_mistakes(mistakes)
    dynamic = _dynamic(predictor)
    skipped: dict[str, str] = {}
    runnable = []
    for m in chosen:
        if m.needs_dynamic and not dynamic:
            h, w = predictor.spec.imgsz
            skipped[m.name] = f"the model's input is fixed at {w}x{h}: a deployment cannot feed it another size"
        else:
            runnable.append(m)
    return runnable, skipped


def _run_all(predictor: Predictor, images: Sequence[ImageSource], mistakes: list[Mistake], options: DetectOptions,
             skipped: dict[str, str], on_progress: Callable[[str, int, int], None] | None,
             check: Callable[[int, list[Sample]], None] | None = None,
             ) -> tuple[list[Result], dict[str, tuple[list[Result], int]]]:
    """The correct pipeline and every candidate, a window of images at a time; (correct results, {name: (results,
    images changed)}). An image whose engine input a mistake leaves unchanged gets the correct pipeline's result
    (same input, same output) without a run; a mistake that changes no image at all is skipped, with its reason."""
    total = len(images) * (1 + len(mistakes))
    done = 0
    spec = predictor.spec
    base: list[Result] = []
    runs: dict[str, list[Result]] = {m.name: [] for m in mistakes}
    changed = dict.fromkeys(runs, 0)
    failed: dict[str, str] = {}

    def advance(label: str, k: int) -> None:
        nonlocal done
        done += k
        if on_progress:
            on_progress(label, done, total)

    for offset, window in _windows(predictor, images):
        if check:
            check(offset, window)
        names = [s.name for s in window]
        ref = [CORRECT.prepare(s, spec) for s in window]
        ref_results = _infer(predictor, ref, names, options)
        base += ref_results
        advance(CORRECT.name, len(window))
        for m in mistakes:
            if m.name in failed:
                advance(m.name, len(window))
                continue
            try:
                prepared = [m.prepare(s, spec) for s in window]
                diff = [i for i, (t, _) in enumerate(prepared) if t.shape != ref[i][0].shape or not np.array_equal(t, ref[i][0])]
                out = list(ref_results)
                for i, r in zip(diff, _infer(predictor, [prepared[i] for i in diff], [names[i] for i in diff], options),
                                strict=True):
                    out[i] = r
            except CvdeployError as e:  # e.g. an engine that refuses the size this mistake feeds it
                failed[m.name] = f"could not be reproduced: {e}"
            else:
                runs[m.name] += out
                changed[m.name] += len(diff)
            advance(m.name, len(window))
    skipped.update(failed)
    for m in mistakes:
        if m.name not in failed and changed[m.name] == 0:
            skipped[m.name] = m.same_reason
    return base, {n: (r, changed[n]) for n, r in runs.items() if n not in skipped}


def audit_with_predictions(
    predictor: Predictor, images: Sequence[ImageSource], field_predictions: Any, *,
    mistakes: Iterable[str | Mistake] = ALL, conf: float | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> AuditReport:
    """Which preprocessing reproduces `field_predictions`, the answers a deployment gave on `images`?

    The correct pipeline and each candidate mistake are re-run on the same images; each is scored by its agreement
    with the field (see docs/preprocessing-audit.md): box F1 (same class, IoU >= 0.5) x (1 - mean |Δconf|) x mean IoU.
    A mistake is named when it agrees clearly better than the correct pipeline; mistakes these images cannot tell
    apart from it are named with it. `conf` is the threshold the field ran with (default: the bundle's).
    `on_progress(label, done, total)` is called as images are run.
    """
    _check_images(images)
    fields = parse_field_predictions(field_predictions, len(images))

    def check(offset: int, window: list[Sample]) -> None:
        for i, s in enumerate(window, offset):
            f = fields[i]
            if f.shape is None:
                continue
            shapes = {tuple(s.image.shape[:2])}
            if s.orientation != 1 and s.data is not None:
                shapes.add(tuple(s.unoriented().shape[:2]))
            if f.shape not in shapes:
                h, w = s.image.shape[:2]
                raise InputError(f"field prediction {i} is for a {f.shape[1]}x{f.shape[0]} image but image {i} is {w}x{h}: "
                                 "are the predictions in the same order as the images?")

    threshold = predictor.options.conf if conf is None else conf
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"conf must be within (0, 1], got {threshold}")
    options = replace(predictor.options, conf=threshold / 2)  # see _agreement: near-threshold boxes still match
    candidates, skipped = _candidates(predictor, mistakes)
    base, runs = _run_all(predictor, images, candidates, options, skipped, on_progress, check)
    field_dets = [f.detections for f in fields]
    spec = predictor.spec

    def finding(m: Mistake, results: list[Result], changed: int | None) -> Finding:
        ev = _agreement(field_dets, [r.detections for r in results], threshold)  # type: ignore[misc]
        if changed is not None:
            ev["images_changed"] = changed
        explanation, fix = m.describe(spec)
        return Finding(m.name, ev["agreement"], ev, explanation, fix)

    baseline = finding(CORRECT, base, None)
    by_name = {m.name: m for m in candidates}
    order = {m.name: i for i, m in enumerate(candidates)}
    findings = sorted((finding(by_name[n], r, c) for n, (r, c) in runs.items()), key=lambda f: (-f.score, order[f.mistake]))
    n_field = sum(len(d) for d in field_dets)
    confs = np.concatenate([d.confidence for d in field_dets]) if n_field else np.zeros(0)
    observed: dict[str, Any] = {
        "field_boxes": n_field, "dets_per_image": round(n_field / len(images), 3),
        "mean_conf": round(float(confs.mean()), 4) if n_field else None,
        "min_conf": round(float(confs.min()), 4) if n_field else None, "conf_threshold": threshold,
    }
    cause, explains, verdict = _name_by_agreement(baseline, findings)
    observed["correct_explains"] = explains
    truncated = any(len(d) >= predictor.options.max_det for d in field_dets)  # max_det, not conf, set the lowest one
    if n_field and not truncated and observed["min_conf"] > threshold + 0.1:
        verdict += (f" Note: the field's lowest confidence is {observed['min_conf']:.2f}, well above the threshold "
                    f"{threshold:g} the audit assumed; pass conf= the field's threshold.")
    return AuditReport("predictions", len(images), baseline, findings, cause, verdict, observed, skipped)


def _name_by_agreement(baseline: Finding, findings: list[Finding]) -> tuple[list[str], bool, str]:
    """(the mistakes named, whether the correct pipeline explains the field, the verdict)."""
    b = baseline.score
    if not findings:
        return [], b >= GOOD_AGREEMENT, f"no candidate mistake could be run on these images; the correct pipeline agrees at {b:.3f}."

    def clear(f: Finding) -> bool:
        return f.score >= b + CLEAR_MARGIN and (1 - f.score) <= CLEAR_RATIO * (1 - b)

    best = findings[0]
    if not clear(best):
        if best.score > b + TIE:
            return [], False, (f"no mistake clearly explains the field predictions: {best.mistake} agrees slightly better "
                               f"({best.score:.3f} against {b:.3f} for the correct pipeline), within what another engine or "
                               "precision can explain; if it is the cause, it changes little on these images.")
        if b >= GOOD_AGREEMENT:
            return [], True, (f"the preprocessing looks right: the bundle's own pipeline reproduces the field predictions "
                              f"(agreement {b:.3f}); no mistake does better (the closest, {best.mistake}, {best.score:.3f}).")
        return [], False, (f"no candidate explains the field predictions: the correct pipeline agrees best but only at "
                           f"{b:.3f}; the difference lies elsewhere (engine, precision, other images, a postprocessing "
                           "change, or mistakes combined).")
    cause = [f.mistake for f in findings if f.score >= best.score - TIE and clear(f)]
    what = cause[0] if len(cause) == 1 else " or ".join(cause)
    verdict = (f"the field predictions are reproduced by {what}: agreement {best.score:.3f} against {b:.3f} for the "
               f"correct pipeline. {best.explanation[0].upper()}{best.explanation[1:]}. Fix: {best.fix}.")
    if len(cause) > 1:
        verdict += " These images cannot tell the named mistakes apart; more (or more varied) images can."
    if best.score < GOOD_AGREEMENT:
        verdict += (f" It explains the field only in part (agreement {best.score:.3f} < {GOOD_AGREEMENT}): another "
                    "difference remains (engine, precision, or a second mistake).")
    return cause, False, verdict


def audit_with_labels(
    predictor: Predictor, data: str | os.PathLike[str] | Sequence[LabelledImage], *,
    mistakes: Iterable[str | Mistake] = ALL, field_map: float | None = None, metric: str = "map50_95",
    split: str = "val", conf: float = 0.001, iou: float = 0.7, max_det: int = 300,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> AuditReport:
    """mAP (COCO protocol) of the correct pipeline and of each candidate mistake on labelled images.

    `data` is a data.yaml (its `split` is used) or labelled images from `load_yolo_split`. With `field_map` (the mAP
    measured on the field deployment, `metric` "map50_95" or "map50"), candidates are ranked by how closely they
    reproduce it and the close ones are named; without it, by how much mAP each one costs this model.
    Thresholds default to validation ones, as `evaluate_detect`.
    """
    if metric not in ("map50_95", "map50"):
        raise InputError(f"metric must be 'map50_95' or 'map50', got {metric!r}")
    if field_map is not None and not 0.0 <= field_map <= 1.0:
        raise InputError(f"field_map must be within 0..1, got {field_map}")
    if isinstance(data, str | os.PathLike):
        gt, _ = load_yolo_split(data, split)
    else:
        gt = list(data)
        if not gt:
            raise InputError("no labelled images to audit")
    paths = [g.path for g in gt]

    def check(offset: int, window: list[Sample]) -> None:
        for g, s in zip(gt[offset:], window, strict=False):
            if (g.height, g.width) != s.image.shape[:2]:
                raise InputError(f"{g.path}: labels are for a {g.width}x{g.height} image, it decodes to "
                                 f"{s.image.shape[1]}x{s.image.shape[0]}")

    options = predictor.detect_options(conf=conf, iou=iou, max_det=max_det)
    candidates, skipped = _candidates(predictor, mistakes)
    base, runs = _run_all(predictor, paths, candidates, options, skipped, on_progress, check)
    nc = len(predictor.names)
    spec = predictor.spec
    shown = predictor.options.conf

    def finding(m: Mistake, results: list[Result], changed: int | None) -> Finding:
        dets = [r.detections for r in results]
        metrics = coco_map(gt, [(d.xyxy, d.confidence, d.class_id) for d in dets], nc)  # type: ignore[union-attr]
        kept = [d.confidence[d.confidence >= shown] for d in dets]  # type: ignore[union-attr]
        n = sum(len(k) for k in kept)
        ev: dict[str, Any] = {**metrics.to_dict(), "dets_per_image": round(n / len(dets), 3),
                              "mean_conf": round(float(np.concatenate(kept).mean()), 4) if n else None}
        if changed is not None:
            ev["images_changed"] = changed
        explanation, fix = m.describe(spec)
        return Finding(m.name, float(getattr(metrics, metric)), ev, explanation, fix)

    baseline = finding(CORRECT, base, None)
    baseline.evidence["drop"] = 0.0
    order = {m.name: i for i, m in enumerate(candidates)}
    by_name = {m.name: m for m in candidates}
    findings = [finding(by_name[n], r, c) for n, (r, c) in runs.items()]
    for f in findings:
        f.evidence["drop"] = round(baseline.score - f.score, 4)
    label = "mAP50-95" if metric == "map50_95" else "mAP50"
    observed: dict[str, Any] = {"metric": metric, "field_map": field_map, "correct_map": round(baseline.score, 4),
                                "instances": baseline.evidence.get("instances")}
    if field_map is None:
        findings.sort(key=lambda f: (f.score, order[f.mistake]))
        harmful = [f for f in findings if baseline.score - f.score >= MAP_MATCH]
        worst = ", ".join(f"{f.mistake} (-{baseline.score - f.score:.3f})" for f in harmful[:3])
        verdict = (f"no field mAP given, so nothing is named; the correct pipeline scores {label} {baseline.score:.3f}. "
                   + (f"The mistakes that hurt this model most: {worst}." if harmful else
                      f"No candidate costs this model more than {MAP_MATCH} mAP on these images."))
        better = [f for f in findings if f.score - baseline.score >= MAP_MATCH]
        harmless = [f.mistake for f in findings if abs(baseline.score - f.score) < MAP_MATCH]
        if harmless:
            verdict += f" Harmless here (within {MAP_MATCH} mAP): {', '.join(harmless)}."
        if better:
            verdict += (" Scoring higher than the bundle's own preprocessing: "
                        + ", ".join(f"{f.mistake} (+{f.score - baseline.score:.3f})" for f in better)
                        + " (on these images; worth a look at the bundle's settings).")
        return AuditReport("labels", len(gt), baseline, findings, [], verdict, observed, skipped)
    findings.sort(key=lambda f: (abs(f.score - field_map), order[f.mistake]))
    for f in [baseline, *findings]:
        f.evidence["gap_to_field"] = round(f.score - field_map, 4)
    drop = baseline.score - field_map
    observed["field_drop"] = round(drop, 4)
    if abs(drop) <= MAP_MATCH:
        observed["correct_explains"] = True
        verdict = (f"the preprocessing looks right: the correct pipeline's {label} ({baseline.score:.3f}) matches the "
                   f"field's ({field_map:.3f}); a preprocessing mistake is not needed to explain it.")
        return AuditReport("labels", len(gt), baseline, findings, [], verdict, observed, skipped)
    tol = max(MAP_MATCH, 0.15 * abs(drop))
    cause = [f.mistake for f in findings if abs(f.score - field_map) <= tol]
    if not cause:
        closest = findings[0] if findings else None
        verdict = (f"no single candidate reproduces the field {label} {field_map:.3f} (correct pipeline "
                   f"{baseline.score:.3f}" + (f", closest {closest.mistake} {closest.score:.3f}" if closest else "") +
                   "): look beyond preprocessing (data drift, engine, precision) or at mistakes combined.")
        return AuditReport("labels", len(gt), baseline, findings, [], verdict, observed, skipped)
    best = findings[0]
    verdict = (f"{' or '.join(cause)} reproduce{'s' if len(cause) == 1 else ''} the field {label}: "
               f"{best.mistake} gives {best.score:.3f} against {field_map:.3f} observed and {baseline.score:.3f} for the "
               f"correct pipeline. {best.explanation[0].upper()}{best.explanation[1:]}. Fix: {best.fix}.")
    if len(cause) > 1:
        verdict += " mAP alone cannot tell these apart: confirm with audit_with_predictions on recorded field answers."
    return AuditReport("labels", len(gt), baseline, findings, cause, verdict, observed, skipped)
