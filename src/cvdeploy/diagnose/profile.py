"""Data profile of images and of a model's predictions, and the drift tests that compare a field profile to a baseline.

A profile keeps, per statistic, a compact sample summary (a `Sketch`: count, mean, std and 101 quantiles, or exact
counts for categories), so a baseline can ship in a bundle and be compared with live traffic years later. `compare`
picks for each statistic the test that fits it (KS, PSI or Wasserstein, see `docs/drift.md`) with thresholds widened
for small samples, and returns one finding per statistic, worst first.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np
from PIL import ExifTags, Image

from cvdeploy.errors import InputError
from cvdeploy.vision.image import IMAGE_SUFFIXES, ImageSource, image_files, image_format, load_image

if TYPE_CHECKING:
    from cvdeploy.bundle.bundle import Bundle
    from cvdeploy.predict import Predictor
    from cvdeploy.vision.result import Result

__all__ = [
    "PROFILE_VERSION",
    "DataProfile",
    "Drift",
    "Profiler",
    "Severity",
    "Sketch",
    "compare",
    "image_statistics",
    "jpeg_quality",
    "profile_images",
    "read_profile",
]

PROFILE_VERSION = 1
N_QUANTILES = 101  # 0 %, 1 %, ..., 100 %: KS and Wasserstein read to within about 0.01 of the raw-sample values
CONFIDENCE_BINS = 20  # the stored confidence histogram, over [0, 1]
MIN_SAMPLES = 5  # fewer on either side: the statistic is not tested
SMALL_SAMPLE = 30  # fewer on either side: the finding says its thresholds were widened for the sample size

Severity = Literal["ok", "warning", "serious"]
_RANK = {"ok": 0, "warning": 1, "serious": 2}

_ORIENTATION_TAG = int(ExifTags.Base.Orientation)


# -- sample summaries ------------------------------------------------------------------------------


def _sig(value: float) -> float:
    # Six significant digits keep a profile small and its JSON stable; far below any threshold's resolution.
    return float(f"{value:.6g}")


@dataclass(frozen=True)
class Sketch:
    """A numeric sample as count, mean, std and its 101 quantiles (0 %, 1 %, ... 100 %); empty quantiles when count is 0."""

    count: int
    mean: float = 0.0
    std: float = 0.0
    quantiles: tuple[float, ...] = ()

    @classmethod
    def of(cls, values: Iterable[float]) -> Sketch:
        v = np.asarray(list(values), dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return cls(0)
        q = np.quantile(v, np.linspace(0.0, 1.0, N_QUANTILES))
        return cls(int(v.size), _sig(v.mean()), _sig(v.std()), tuple(_sig(x) for x in q))

    def quantile(self, p: float) -> float:
        if not self.quantiles:
            return math.nan
        return float(np.interp(p, np.linspace(0.0, 1.0, len(self.quantiles)), self.quantiles))

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "std": self.std, "quantiles": list(self.quantiles)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sketch:
        q = tuple(float(x) for x in d.get("quantiles", ()))
        count = int(d["count"])
        if (count > 0 and len(q) != N_QUANTILES) or (count == 0 and q) or any(b < a for a, b in pairwise(q)):
            raise ValueError(f"a sketch needs {N_QUANTILES} sorted quantiles when its count is positive, none otherwise")
        return cls(count, float(d.get("mean", 0.0)), float(d.get("std", 0.0)), q)


# -- the profile -------------------------------------------------------------------------------------


@dataclass
class DataProfile:
    """What a set of images looked like, and what a model predicted on them.

    numeric:      width, height, size (√(w·h) px), aspect (w/h), brightness, contrast, saturation, sharpness,
                  mean_b/g/r, std_b/g/r, jpeg_quality; with a model also top_confidence (per image, 0 without a box),
                  confidence (per box), box_size (per box, √(box area / image area)).
    categorical:  format, exif_orientation ("none" or the tag's value); with a model also boxes_per_image (exact
                  counts per number of boxes) and class_mix (boxes per class name).
    model:        the bundle, variant and postprocessing options predictions were made with, or None.
    """

    images: int
    numeric: dict[str, Sketch]
    categorical: dict[str, dict[str, int]]
    model: dict[str, Any] | None = None
    confidence_histogram: list[int] | None = None  # CONFIDENCE_BINS bins over [0, 1], per box
    created: str = ""
    version: int = PROFILE_VERSION

    @property
    def has_predictions(self) -> bool:
        return self.model is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "created": self.created,
            "images": self.images,
            "model": self.model,
            "numeric": {k: s.to_dict() for k, s in self.numeric.items()},
            "categorical": {k: dict(v) for k, v in self.categorical.items()},
            "confidence_histogram": self.confidence_histogram,
        }

    @classmethod
    def from_dict(cls, d: Any) -> DataProfile:
        if not isinstance(d, Mapping) or "version" not in d:
            raise InputError("not a cvdeploy data profile (expected a JSON object with a 'version')")
        if d["version"] != PROFILE_VERSION:
            raise InputError(
                f"data profile version {d['version']!r} is not the version this cvdeploy reads ({PROFILE_VERSION}): "
                "profile the baseline images again with this version"
            )
        try:
            return cls(
                images=int(d["images"]),
                numeric={str(k): Sketch.from_dict(v) for k, v in d["numeric"].items()},
                categorical={str(k): {str(c): int(n) for c, n in v.items()} for k, v in d["categorical"].items()},
                model=dict(d["model"]) if d.get("model") is not None else None,
                confidence_histogram=[int(x) for x in d["confidence_histogram"]] if d.get("confidence_histogram") is not None else None,
                created=str(d.get("created", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"malformed data profile: {type(exc).__name__}: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        out = Path(path)
        out.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DataProfile:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise InputError(f"data profile not found: {p}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read data profile {p}: {exc}") from exc
        try:
            return cls.from_dict(data)
        except InputError as exc:
            raise InputError(f"{p}: {exc}") from exc


# -- per-image statistics ----------------------------------------------------------------------------


REFERENCE_SIDE = 640  # pixel statistics are read at this longer side (YOLO's default input): see image_statistics


def image_statistics(image: np.ndarray) -> dict[str, float]:
    """The statistics of one HxWx3 BGR uint8 image (decoded, as the model receives it).

    Width, height, size and aspect are the image's own. The pixel statistics are read on the image resized so that its
    longer side is REFERENCE_SIDE (area-averaged when shrinking, linear when enlarging): the variance of the Laplacian
    depends on the scale it is read at, and a field camera of another resolution must not read as "sharper" or
    "blurrier" for that reason alone (a small image enlarged to the model's input is blurrier, and reads so). It also
    bounds the cost of a 50-megapixel photo.
    """
    h, w = image.shape[:2]
    r = REFERENCE_SIDE / max(h, w)
    ref_size = (max(1, round(w * r)), max(1, round(h * r)))
    work = image if ref_size == (w, h) else cv2.resize(image, ref_size, interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    gray = cv2.cvtColor(work, cv2.COLOR_BGR2GRAY)
    means, stds = cv2.meanStdDev(work)
    g_mean, g_std = (float(x[0, 0]) for x in cv2.meanStdDev(gray))
    stats = {
        "width": float(w),
        "height": float(h),
        "size": math.sqrt(w * h),
        "aspect": w / h,
        "brightness": g_mean,
        # RMS contrast relative to the mean: a gain or exposure change scales mean and spread together and leaves it
        # unchanged, so darker images read as darker, not also as flatter. The absolute spreads are std_b/g/r.
        "contrast": g_std / max(g_mean, 1.0),
        "saturation": float(cv2.mean(cv2.cvtColor(work, cv2.COLOR_BGR2HSV))[1]),  # HSV S: (max - min) / max, also gain-free
        # The Laplacian's spread (the usual focus measure) over the gray levels' spread: unitless, so gain and contrast
        # leave it alone and only the fine detail moves it (focus, motion blur, compression, denoising; noise raises it).
        "sharpness": float(cv2.Laplacian(gray, cv2.CV_64F).std()) / max(g_std, 1.0),
    }
    for i, c in enumerate("bgr"):
        stats[f"mean_{c}"] = float(means[i, 0])
        stats[f"std_{c}"] = float(stds[i, 0])
    return stats


# The IJG (libjpeg) base tables, natural order, and its quality scaling: what almost every encoder starts from.
_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
], dtype=np.float64)  # fmt: skip
_IJG_CHROMA = np.full(64, 99.0)
_IJG_CHROMA[[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 24, 25]] = [17, 18, 24, 47, 18, 21, 26, 66, 24, 26, 56, 47, 66]


def _ijg_tables() -> np.ndarray:
    q = np.arange(1, 101, dtype=np.float64)[:, None]
    scale = np.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    luma = np.clip(np.floor((_IJG_LUMA * scale + 50) / 100), 1, 255)
    chroma = np.clip(np.floor((_IJG_CHROMA * scale + 50) / 100), 1, 255)
    return np.stack([luma, chroma], 1)  # (100 qualities, 2 tables, 64)


_IJG = _ijg_tables()


def jpeg_quality(tables: Mapping[int, Iterable[int]]) -> float | None:
    """Estimate the IJG quality (1-100) a JPEG was saved with, from its quantization tables (Pillow's `quantization`,
    natural order): the quality whose IJG tables are nearest in log scale. Exact for libjpeg/OpenCV/Pillow files; for
    an encoder with its own tables (many cameras) it is the IJG quality of about the same coarseness. None without a
    usable table."""
    found = [np.asarray(list(tables[k]), dtype=np.float64) for k in sorted(tables)[:2]]
    found = [t for t in found if t.shape == (64,) and np.all(t > 0)]
    if not found:
        return None
    # Log distance: a table twice as coarse is as far off in the fine (low) entries as in the coarse ones.
    err = sum(np.abs(np.log(_IJG[:, i, :]) - np.log(t)).mean(1) for i, t in enumerate(found))
    return float(np.argmin(err) + 1)


def _header_facts(data: bytes) -> tuple[str, str, float | None]:
    """(format, EXIF orientation or "none", JPEG quality or None) from the encoded header; pixels stay undecoded."""
    fmt = image_format(data) or "unknown"
    if fmt not in Image.OPEN:
        Image.init()
    if fmt not in Image.OPEN:
        return fmt, "none", None
    factory, _ = Image.OPEN[fmt]
    try:
        header = factory(io.BytesIO(data), "")
        orientation = header.getexif().get(_ORIENTATION_TAG)
        quality = jpeg_quality(header.quantization) if fmt == "JPEG" and getattr(header, "quantization", None) else None
    except Exception:  # header facts are best effort: the pixels have already decoded, a bad EXIF block is no reason to fail
        return fmt, "none", None
    return fmt, "none" if orientation is None else str(orientation), quality


# -- profiling ---------------------------------------------------------------------------------------


class Profiler:
    """Adds images one by one (a file walk, a stream, live traffic) and makes a `DataProfile` of what it saw.

    With a predictor, each image is also predicted (`predictor.predict`, one image at a time so that each gets the
    letterbox the server gives a lone request) and the prediction statistics are kept.
    """

    def __init__(self, predictor: Predictor | None = None) -> None:
        self.predictor = predictor
        self.count = 0
        self._numeric: dict[str, list[float]] = {}
        self._categorical: dict[str, Counter[str]] = {"format": Counter(), "exif_orientation": Counter()}
        if predictor is not None:
            self._categorical |= {"boxes_per_image": Counter(), "class_mix": Counter()}
        self._confidence_hist = np.zeros(CONFIDENCE_BINS, dtype=np.int64)

    def add(self, source: ImageSource, *, name: str | None = None) -> None:
        """Decode one image (a path, encoded bytes, a BGR array or a PIL image) and add its statistics. An image that
        does not decode raises InputError naming it (`name`, else its path, else its position)."""
        name = name or (os.fsdecode(os.fspath(source)) if isinstance(source, str | os.PathLike) else f"image #{self.count + 1}")
        data: bytes | None = None
        if isinstance(source, str | os.PathLike):
            path = os.fsdecode(os.fspath(source))
            if os.path.isdir(path):
                raise InputError(f"image path is a directory, not a file: {path}")
            try:
                data = Path(path).read_bytes()
            except FileNotFoundError:
                raise InputError(f"image not found: {path}") from None
            except OSError as exc:
                raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from exc
        elif isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
        try:
            image = (self.predictor.decode if self.predictor is not None else load_image)(data if data is not None else source)
        except InputError as exc:
            raise type(exc)(f"{name}: {exc}") from exc
        stats = image_statistics(image)
        if data is not None:  # an array or a PIL image has no encoded header: format, EXIF and quality are unknown
            fmt, orientation, quality = _header_facts(data)
            self._categorical["format"][fmt] += 1
            self._categorical["exif_orientation"][orientation] += 1
        else:
            quality = None
        if quality is not None:
            stats["jpeg_quality"] = quality
        if self.predictor is not None:
            self._add_result(self.predictor.predict(image), stats)
        for k, v in stats.items():
            self._numeric.setdefault(k, []).append(v)
        self.count += 1

    def _add_result(self, result: Result, stats: dict[str, float]) -> None:
        dets = result.detections
        if dets is None:
            raise InputError(f"the data profile reads detections; this model returns {result.task} results")
        h, w = result.orig_shape
        conf = dets.confidence.astype(np.float64)
        self._categorical["boxes_per_image"][str(len(dets))] += 1
        stats["top_confidence"] = float(conf.max()) if len(dets) else 0.0
        self._numeric.setdefault("confidence", []).extend(conf.tolist())
        self._numeric.setdefault("box_size", []).extend(np.sqrt(np.clip(dets.area, 0, None) / (h * w)).tolist())
        self._confidence_hist += np.histogram(np.clip(conf, 0, 1), CONFIDENCE_BINS, (0.0, 1.0))[0]
        for c in dets.class_id.tolist():
            self._categorical["class_mix"][result.names.get(int(c), str(c))] += 1

    def profile(self) -> DataProfile:
        if self.count == 0:
            raise InputError("no images to profile")
        numeric = {k: Sketch.of(v) for k, v in self._numeric.items()}
        numeric.setdefault("jpeg_quality", Sketch(0))
        model = None
        if self.predictor is not None:
            p = self.predictor
            model = {"bundle": p.bundle.name, "variant": p.variant, "conf": p.options.conf, "iou": p.options.iou, "max_det": p.options.max_det}
            for k in ("confidence", "box_size"):
                numeric.setdefault(k, Sketch(0))
        return DataProfile(
            images=self.count,
            numeric=numeric,
            # Numbers of boxes in numeric order, names alphabetical: a profile a person can read.
            categorical={k: dict(sorted(v.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0, kv[0])))
                         for k, v in self._categorical.items()},
            model=model,
            confidence_histogram=self._confidence_hist.tolist() if self.predictor is not None else None,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )


def _iter_sources(images: Iterable[ImageSource] | str | os.PathLike[str]) -> Iterator[ImageSource]:
    if isinstance(images, str | os.PathLike):
        root = Path(images)
        if root.is_dir():
            files = image_files(root)
            if not files:
                raise InputError(f"no images found in {root} (looked for {', '.join(IMAGE_SUFFIXES)})")
            yield from files
        else:
            yield images
    elif isinstance(images, bytes | bytearray | memoryview | Image.Image) or (isinstance(images, np.ndarray) and images.ndim < 4):
        yield images  # one image, not an iterable of images
    else:
        try:
            iterator = iter(images)
        except TypeError:
            raise InputError(f"cannot profile a {type(images).__name__}: pass image paths, bytes or arrays, or a directory") from None
        yield from iterator


def profile_images(
    images: Iterable[ImageSource] | str | os.PathLike[str],
    predictor: Predictor | None = None,
    *,
    on_progress: Callable[[int], None] | None = None,
) -> DataProfile:
    """Profile images (paths, encoded bytes, BGR arrays, PIL images, or a directory walked for image files); with a
    predictor, also what it predicts on them. `on_progress(1)` is called after each image. InputError for no images
    or one that does not decode (named)."""
    profiler = Profiler(predictor)
    for source in _iter_sources(images):
        profiler.add(source)
        if on_progress is not None:
            on_progress(1)
    return profiler.profile()


# -- the tests -----------------------------------------------------------------------------------------

TestKind = Literal["ks", "psi", "wasserstein"]


@dataclass(frozen=True)
class _Spec:
    name: str
    label: str
    test: TestKind
    warning: float  # the nominal thresholds; small samples widen them (_test_numeric, _test_categorical)
    serious: float
    up: str  # the finding's opening when the field values are higher
    down: str
    fmt: str = "{:.0f}"
    log2: bool = False  # Wasserstein on log2 values (sizes and ratios: a factor, not a difference, is what matters)
    unit: str = ""  # of the Wasserstein distance, for the message
    prediction: bool = False
    per_box: bool = False  # one value per box: the sample size a test may trust is the number of images with boxes
    # Ranks findings of one severity: summary image statistics (1) before per-channel detail (2), since a change of
    # brightness or contrast moves all three channels with it; prediction statistics (3) last: they are the symptoms,
    # the image statistics the causes one can act on.
    tier: int = 1

    @property
    def short(self) -> str:
        """The label without its definition: "contrast" for "contrast (std/mean of gray)"."""
        return self.label.split(" (")[0].split(" √")[0]


_KS_WARNING, _KS_SERIOUS = 0.15, 0.30  # D floors: with large samples, tiny significant shifts are not worth a finding
_KS_C = {"warning": 1.628, "serious": 1.949}  # c(alpha) of the two-sample KS test: alpha = 0.01, 0.001
_PSI_WARNING, _PSI_SERIOUS = 0.10, 0.25
_CHI2_Z = {"warning": 2.3263, "serious": 3.0902}  # normal quantiles of 0.99, 0.999 (Wilson-Hilferty)
_W_K = {"warning": 2.6, "serious": 3.3}  # null 99 % and 99.9 % points of W1 in units of std·sqrt(1/n + 1/m) (normal)

# The order breaks exact ties within a tier (see _Spec.tier).
_SPECS: tuple[_Spec, ...] = (
    _Spec("brightness", "brightness", "ks", _KS_WARNING, _KS_SERIOUS, "field images are brighter", "field images are darker"),
    _Spec("contrast", "contrast (std/mean of gray)", "ks", _KS_WARNING, _KS_SERIOUS,
          "field images have more contrast", "field images have less contrast", "{:.2f}"),
    _Spec("sharpness", "sharpness (std of Laplacian/std of gray)", "ks", _KS_WARNING, _KS_SERIOUS,
          "field images are sharper (or noisier)", "field images are blurrier (or less noisy)", "{:.3f}"),
    _Spec("size", "size √(w·h)", "wasserstein", 0.5, 1.0, "field images are larger", "field images are smaller",
          "{:.0f} px", log2=True, unit=" octaves"),
    _Spec("aspect", "aspect ratio w/h", "wasserstein", 0.15, 0.4, "field images are wider", "field images are taller",
          "{:.2f}", log2=True, unit=" octaves"),
    _Spec("saturation", "saturation", "ks", _KS_WARNING, _KS_SERIOUS,
          "field images are more saturated", "field images are less saturated (greyer)"),
    _Spec("jpeg_quality", "JPEG quality", "wasserstein", 5.0, 15.0,
          "field JPEGs are less compressed", "field JPEGs are more compressed", unit=" quality points"),
    *(
        _Spec(f"mean_{c}", f"mean {full}", "ks", _KS_WARNING, _KS_SERIOUS,
              f"field images hold more {full}", f"field images hold less {full}", tier=2)
        for c, full in (("b", "blue"), ("g", "green"), ("r", "red"))
    ),
    *(
        _Spec(f"std_{c}", f"std of {full}", "ks", _KS_WARNING, _KS_SERIOUS,
              f"{full} varies more within field images", f"{full} varies less within field images", "{:.1f}", tier=2)
        for c, full in (("b", "blue"), ("g", "green"), ("r", "red"))
    ),
    _Spec("format", "format", "psi", _PSI_WARNING, _PSI_SERIOUS, "", ""),
    _Spec("exif_orientation", "EXIF rotation", "psi", _PSI_WARNING, _PSI_SERIOUS, "", ""),
    _Spec("boxes_per_image", "boxes per image", "psi", _PSI_WARNING, _PSI_SERIOUS,
          "the model finds more objects in field images", "the model finds fewer objects in field images", prediction=True, tier=3),
    _Spec("top_confidence", "top confidence", "wasserstein", 0.05, 0.10,
          "the model is more confident on field images", "the model is less confident on field images", "{:.2f}", prediction=True, tier=3),
    _Spec("confidence", "box confidence", "wasserstein", 0.05, 0.10,
          "field boxes are more confident", "field boxes are less confident", "{:.2f}", prediction=True, per_box=True, tier=3),
    _Spec("box_size", "box size √(box/image area)", "ks", _KS_WARNING, _KS_SERIOUS,
          "field objects look larger", "field objects look smaller", "{:.1%}", prediction=True, per_box=True, tier=3),
    _Spec("class_mix", "class mix", "psi", _PSI_WARNING, _PSI_SERIOUS, "", "", prediction=True, per_box=True, tier=3),
)


@dataclass(frozen=True)
class Drift:
    """One statistic's verdict: the test, its value against the (sample-size-aware) thresholds, and a one-line message."""

    statistic: str
    test: str  # "ks", "psi", "wasserstein"; "none" when not tested (too few samples) or a settings check
    value: float
    warning_threshold: float
    serious_threshold: float
    severity: Severity
    message: str
    p_value: float | None = None
    baseline_n: int = 0
    field_n: int = 0

    @property
    def threshold(self) -> float:
        """The line that matters for this severity: the serious one once crossed, else the warning one."""
        return self.serious_threshold if self.severity == "serious" else self.warning_threshold

    @property
    def score(self) -> float:
        """How far past the serious line (1.0 = on it); ranks findings of one severity."""
        return self.value / self.serious_threshold if self.serious_threshold > 0 and math.isfinite(self.value) else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "statistic": self.statistic, "test": self.test, "value": _sig(self.value), "threshold": _sig(self.threshold),
            "warning_threshold": _sig(self.warning_threshold), "serious_threshold": _sig(self.serious_threshold),
            "severity": self.severity, "message": self.message,
            "p_value": None if self.p_value is None else _sig(self.p_value), "baseline_n": self.baseline_n, "field_n": self.field_n,
        }  # fmt: skip

    def __str__(self) -> str:
        return f"[{self.severity}] {self.statistic}: {self.message}"


def _severity(value: float, warning: float, serious: float) -> Severity:
    return "serious" if value > serious else "warning" if value > warning else "ok"


def _ks(a: Sketch, b: Sketch) -> float:
    """Two-sample KS D between two sketches: each CDF read as the step function of its quantiles (right-continuous),
    compared at every quantile of either, from the right and from the left."""
    qa, qb = np.asarray(a.quantiles), np.asarray(b.quantiles)
    grid = np.union1d(qa, qb)

    def cdf(q: np.ndarray, side: Literal["left", "right"]) -> np.ndarray:
        k = np.searchsorted(q, grid, side=side)
        return np.where(k > 0, (k - 1) / (len(q) - 1), 0.0)

    return float(max(np.abs(cdf(qa, "right") - cdf(qb, "right")).max(), np.abs(cdf(qa, "left") - cdf(qb, "left")).max()))


def _ks_p(d: float, n_eff: float) -> float:
    """Asymptotic two-sample KS p-value (Kolmogorov distribution, Stephens' small-sample correction)."""
    s = math.sqrt(n_eff)
    lam = (s + 0.12 + 0.11 / s) * d
    if lam < 0.2:
        return 1.0
    p = 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return min(1.0, max(0.0, p))


def _chi2_quantile(z: float, df: int) -> float:
    """Wilson-Hilferty: the chi-square quantile whose normal score is z (within about 2 % for df >= 1 at these tails)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def _chi2_sf(x: float, df: int) -> float:
    c = 2.0 / (9.0 * df)
    z = ((x / df) ** (1.0 / 3.0) - (1.0 - c)) / math.sqrt(c)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _q(values: Sketch, log2: bool) -> np.ndarray:
    q = np.asarray(values.quantiles, dtype=np.float64)
    return np.log2(np.clip(q, 1e-12, None)) if log2 else q


def _verdict(statistic: str, severity: Severity, warning: float, serious: float, p_value: float | None) -> str:
    """E.g. "KS D=0.92 > 0.45 serious; p<0.001" or "PSI 0.03, warning above 0.10"."""
    text = f"{statistic} > {serious:.2f} serious" if severity == "serious" else (
        f"{statistic} > {warning:.2f} warning" if severity == "warning" else f"{statistic}, warning above {warning:.2f}")
    if p_value is None:
        return text
    return f"{text}; " + ("p<0.001" if p_value < 0.001 else f"p={p_value:.3f}" if p_value < 0.1 else f"p={p_value:.2f}")


def _test_numeric(spec: _Spec, base: Sketch, fld: Sketch, n_b: int, n_f: int) -> Drift:
    n_eff = n_b * n_f / (n_b + n_f)
    qb, qf = _q(base, spec.log2), _q(fld, spec.log2)
    shift = float(np.mean(qf - qb))  # the direction: how the whole quantile function moved
    p_value: float | None = None
    if spec.test == "ks":
        value = _ks(base, fld)
        root = math.sqrt(n_eff)
        scale = root + 0.12 + 0.11 / root
        warning = max(spec.warning, _KS_C["warning"] / scale)
        serious = max(spec.serious, _KS_C["serious"] / scale)
        p_value = _ks_p(value, n_eff)
        detail = f"KS D={value:.2f}"
    else:
        d = np.abs(qf - qb)
        value = float(((d[:-1] + d[1:]) / 2).mean())  # W1 = integral of |Qf - Qb| over p
        noise = float(np.std(qb)) * math.sqrt(1 / n_b + 1 / n_f)  # W1 of two samples of one distribution is of this order
        warning = max(spec.warning, _W_K["warning"] * noise)
        serious = max(spec.serious, _W_K["serious"] * noise)
        detail = f"Wasserstein {value:.2f}{spec.unit}"
    severity = _severity(value, warning, serious)
    detail = _verdict(detail, severity, warning, serious, p_value)
    medians = f"median {spec.label} {spec.fmt.format(fld.median)} vs {spec.fmt.format(base.median)}"
    if severity == "ok":
        message = f"{spec.short} holds: {medians} ({detail})"
    else:
        message = f"{spec.up if shift > 0 else spec.down}: {medians} ({detail})"
    return Drift(spec.name, spec.test, value, warning, serious, severity, message + _small(n_b, n_f), p_value, base.count, fld.count)


_BOX_BINS = ((0, 0), (1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 10**9))


def _bins(spec: _Spec, counts: Mapping[str, int]) -> dict[str, int]:
    if spec.name == "exif_orientation":
        # No tag and tag 1 both mean upright: a pipeline that strips EXIF is not a rotation drift.
        out: dict[str, int] = {}
        for k, n in counts.items():
            label = "upright" if k in ("none", "1") else k
            out[label] = out.get(label, 0) + n
        return out
    if spec.name != "boxes_per_image":
        return dict(counts)
    # Merged ranges: a bin per exact count would leave most bins nearly empty and the test without power.
    out = {f"{lo}" if lo == hi else f"{lo}+" if hi > 10**8 else f"{lo}-{hi}": 0 for lo, hi in _BOX_BINS}
    for k, n in counts.items():
        label = next(lab for lab, (lo, hi) in zip(out, _BOX_BINS, strict=True) if lo <= int(k) <= hi)
        out[label] += n
    return out


def _mean_boxes(counts: Mapping[str, int]) -> float:
    total = sum(counts.values())
    return sum(int(k) * n for k, n in counts.items()) / total if total else 0.0


def _test_categorical(spec: _Spec, base_counts: Mapping[str, int], field_counts: Mapping[str, int], n_b: int, n_f: int) -> Drift:
    b, f = _bins(spec, base_counts), _bins(spec, field_counts)
    keys = [k for k in dict.fromkeys([*b, *f]) if b.get(k, 0) + f.get(k, 0) > 0]
    tb, tf = sum(b.values()), sum(f.values())
    cb = np.array([b.get(k, 0) for k in keys], dtype=np.float64)
    cf = np.array([f.get(k, 0) for k in keys], dtype=np.float64)
    # Half a count per category (Jeffreys): a category absent on one side gives a large, finite PSI.
    pb, pf = (cb + 0.5) / (tb + 0.5 * len(keys)), (cf + 0.5) / (tf + 0.5 * len(keys))
    value = float(np.sum((pf - pb) * np.log(pf / pb))) if len(keys) > 1 else 0.0
    df = max(len(keys) - 1, 1)
    n_eff = n_b * n_f / (n_b + n_f)
    # n_eff·PSI is close to a chi-square with k-1 degrees of freedom when nothing drifted: below ~100 samples a side its
    # 99 % / 99.9 % points exceed the usual 0.1 / 0.25, and those points become the thresholds.
    warning = max(spec.warning, _chi2_quantile(_CHI2_Z["warning"], df) / n_eff)
    serious = max(spec.serious, _chi2_quantile(_CHI2_Z["serious"], df) / n_eff)
    p_value = _chi2_sf(n_eff * value, df) if len(keys) > 1 else 1.0
    severity = _severity(value, warning, serious)
    detail = _verdict(f"PSI {value:.2f}", severity, warning, serious, p_value)
    sb, sf = cb / max(tb, 1), cf / max(tf, 1)
    if spec.name == "boxes_per_image":
        mb, mf = _mean_boxes(base_counts), _mean_boxes(field_counts)
        e_b, e_f = base_counts.get("0", 0) / max(tb, 1), field_counts.get("0", 0) / max(tf, 1)
        what = f"{mf:.1f} vs {mb:.1f} boxes per image, {e_f:.0%} vs {e_b:.0%} of images without a box"
        opening = "boxes per image hold" if severity == "ok" else spec.up if mf > mb else spec.down
    elif spec.name == "exif_orientation":
        rb, rf = 1.0 - b.get("upright", 0) / max(tb, 1), 1.0 - f.get("upright", 0) / max(tf, 1)
        what = f"{rf:.0%} vs {rb:.0%} of images carry an EXIF rotation"
        opening = "EXIF rotation share holds" if severity == "ok" else "more field images are EXIF-rotated" if rf > rb else "fewer field images are EXIF-rotated"
    else:
        i = int(np.argmax(np.abs(sf - sb)))
        what = f"largest change {keys[i]} {sf[i]:.0%} vs {sb[i]:.0%}" if keys else "no values"
        opening = f"{spec.label} holds" if severity == "ok" else f"the {spec.label} changed"
    message = f"{opening}: {what} ({detail})" + _small(n_b, n_f)
    return Drift(spec.name, "psi", value, warning, serious, severity, message, p_value, tb, tf)


def _small(n_b: int, n_f: int) -> str:
    return f"; small sample ({n_f} field vs {n_b} baseline): thresholds widened, only large drifts show" if min(n_b, n_f) < SMALL_SAMPLE else ""


def _untested(spec: _Spec, n_b: int, n_f: int, why: str) -> Drift:
    return Drift(spec.name, "none", 0.0, spec.warning, spec.serious, "ok", f"{spec.short} not tested: {why}", None, n_b, n_f)


def _sizes(spec: _Spec, profile: DataProfile) -> tuple[int, int]:
    """(values in the sample, sample size the test may trust)."""
    if spec.test == "psi":
        count = sum(profile.categorical.get(spec.name, {}).values())
    else:
        count = profile.numeric.get(spec.name, Sketch(0)).count
    if not spec.per_box:
        return count, count
    with_boxes = profile.images - profile.categorical.get("boxes_per_image", {}).get("0", 0)
    return count, min(count, with_boxes)


def compare(baseline: DataProfile, field: DataProfile) -> list[Drift]:
    """One finding per statistic, worst first (severity, then how far past the serious line). Prediction statistics are
    compared when both profiles have them; a statistic with fewer than MIN_SAMPLES values on a side is reported as not
    tested rather than raising."""
    for which, p in (("baseline", baseline), ("field", field)):
        if p.version != PROFILE_VERSION:
            raise InputError(f"the {which} profile is version {p.version}, this cvdeploy compares version {PROFILE_VERSION}: profile it again")
    findings: list[Drift] = []
    both = baseline.has_predictions and field.has_predictions
    for spec in _SPECS:
        if spec.prediction and not both:
            continue
        (count_b, n_b), (count_f, n_f) = _sizes(spec, baseline), _sizes(spec, field)
        if min(n_b, n_f) < MIN_SAMPLES:
            unit = {"jpeg_quality": "JPEG images", "format": "encoded images", "exif_orientation": "encoded images"}.get(
                spec.name, "images with boxes" if spec.per_box else "images")
            findings.append(_untested(spec, count_b, count_f, f"{n_f} field vs {n_b} baseline {unit} (needs {MIN_SAMPLES} a side)"))
        elif spec.test == "psi":
            findings.append(_test_categorical(spec, baseline.categorical[spec.name], field.categorical[spec.name], n_b, n_f))
        else:
            findings.append(_test_numeric(spec, baseline.numeric[spec.name], field.numeric[spec.name], n_b, n_f))
    findings += _settings_findings(baseline, field)
    order = {s.name: i for i, s in enumerate(_SPECS)}
    tier = {s.name: s.tier for s in _SPECS}  # the settings finding (tier 0) comes first: it qualifies the others
    findings.sort(key=lambda d: (-_RANK[d.severity], tier.get(d.statistic, 0), -round(d.score, 9), order.get(d.statistic, len(order))))
    return findings


def _settings_findings(baseline: DataProfile, field: DataProfile) -> list[Drift]:
    if baseline.has_predictions != field.has_predictions:
        which = "field" if baseline.has_predictions else "baseline"
        return [Drift("predictions", "none", 0.0, 0.0, 0.0, "ok",
                      f"prediction statistics not compared: the {which} profile was made without a model", None,
                      baseline.images, field.images)]  # fmt: skip
    if not baseline.has_predictions:
        return []
    keys = ("bundle", "variant", "conf", "iou", "max_det")
    diff = [f"{k} {field.model.get(k)!r} vs {baseline.model.get(k)!r}" for k in keys if field.model.get(k) != baseline.model.get(k)]  # type: ignore[union-attr]
    if not diff:
        return []
    # Not a drift of the data, but it moves every prediction statistic: say so before anyone reads them.
    return [Drift("model", "none", 1.0, 0.5, 2.0, "warning",
                  f"the profiles were predicted with different settings ({', '.join(diff)}): prediction statistics may differ for that reason",
                  None, baseline.images, field.images)]  # fmt: skip


def read_profile(bundle: Bundle | str | os.PathLike[str]) -> DataProfile | None:
    """The bundle's baseline data profile; None when the bundle was built without a controlled set (then give the
    doctor a baseline). Its sha256 is checked by `Bundle.load` with every other file of the bundle."""
    from cvdeploy.bundle.bundle import Bundle as _Bundle

    b = bundle if isinstance(bundle, _Bundle) else _Bundle.load(bundle)
    info = b.manifest.profile
    if info is None or b.root is None:
        return None
    return DataProfile.load(b.root / info.file)
