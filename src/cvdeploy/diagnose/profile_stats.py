"""The data profile's statistics: a numeric sample as a sketch (count, mean, std, 101 quantiles), the statistics of one
decoded image, and the facts its encoded header gives (format, EXIF orientation, JPEG quality)."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import cv2
import numpy as np
from PIL import ExifTags, Image

from cvdeploy.vision.image import image_format

__all__ = ["N_QUANTILES", "ORIENTATION_TAG", "REFERENCE_SIDE", "Sketch", "header_facts", "image_statistics", "jpeg_quality", "sig"]

N_QUANTILES = 101  # 0 %, 1 %, ..., 100 %: KS and Wasserstein read to within about 0.01 of the raw-sample values
ORIENTATION_TAG = int(ExifTags.Base.Orientation)


# -- sample summaries ------------------------------------------------------------------------------


def sig(value: float) -> float:
    """A figure as stored in a profile: six significant digits."""
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
        return cls(int(v.size), sig(v.mean()), sig(v.std()), tuple(sig(x) for x in q))

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


def header_facts(data: bytes) -> tuple[str, str, float | None]:
    """(format, EXIF orientation or "none", JPEG quality or None) from the encoded header; pixels stay undecoded."""
    fmt = image_format(data) or "unknown"
    if fmt not in Image.OPEN:
        Image.init()
    if fmt not in Image.OPEN:
        return fmt, "none", None
    factory, _ = Image.OPEN[fmt]
    try:
        header = factory(io.BytesIO(data), "")
        orientation = header.getexif().get(ORIENTATION_TAG)
        quality = jpeg_quality(header.quantization) if fmt == "JPEG" and getattr(header, "quantization", None) else None
    except Exception:  # header facts are best effort: the pixels have already decoded, a bad EXIF block is no reason to fail
        return fmt, "none", None
    return fmt, "none" if orientation is None else str(orientation), quality
