"""Data profile of images and of a model's predictions, and the drift tests that compare a field profile to a baseline.

A profile keeps, per statistic, a compact sample summary (a `Sketch`: count, mean, std and 101 quantiles, or exact
counts for categories), so a baseline can ship in a bundle and be compared with live traffic years later. `compare`
picks for each statistic the test that fits it (KS, PSI or Wasserstein, see `docs/drift.md`) with thresholds widened
for small samples, and returns one finding per statistic, worst first.

This module profiles (`Profiler`, `profile_images`); the statistics are in `profile_stats`, the profile and its file in
`profile_format`, the drift tests in `profile_drift`; their public names are importable from here too.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cvdeploy.diagnose.profile_drift import MIN_SAMPLES as MIN_SAMPLES
from cvdeploy.diagnose.profile_drift import SMALL_SAMPLE as SMALL_SAMPLE
from cvdeploy.diagnose.profile_drift import Drift, Severity, compare, ks_p_value, ks_statistic
from cvdeploy.diagnose.profile_drift import TestKind as TestKind
from cvdeploy.diagnose.profile_format import CONFIDENCE_BINS, PROFILE_VERSION, DataProfile, read_profile
from cvdeploy.diagnose.profile_stats import N_QUANTILES as N_QUANTILES
from cvdeploy.diagnose.profile_stats import REFERENCE_SIDE as REFERENCE_SIDE
from cvdeploy.diagnose.profile_stats import Sketch, header_facts, image_statistics, jpeg_quality
from cvdeploy.errors import InputError
from cvdeploy.vision.image import IMAGE_SUFFIXES, ImageSource, image_files, load_image

if TYPE_CHECKING:
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

# Private names imported from here before the split (serve/monitor.py, tests/diagnose/test_profile.py): kept as aliases.
_header_facts = header_facts
_ks, _ks_p = ks_statistic, ks_p_value


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
            fmt, orientation, quality = header_facts(data)
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
