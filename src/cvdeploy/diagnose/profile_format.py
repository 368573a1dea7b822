"""The data profile as data: `DataProfile` (what a set of images, and a model's predictions on them, looked like), its
versioned JSON file, and the baseline profile a bundle ships (`read_profile`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvdeploy.diagnose.profile_stats import Sketch
from cvdeploy.errors import InputError

if TYPE_CHECKING:
    from cvdeploy.bundle.bundle import Bundle

__all__ = ["CONFIDENCE_BINS", "PROFILE_VERSION", "DataProfile", "read_profile"]

PROFILE_VERSION = 1
CONFIDENCE_BINS = 20  # the stored confidence histogram, over [0, 1]


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


def read_profile(bundle: Bundle | str | os.PathLike[str]) -> DataProfile | None:
    """The bundle's baseline data profile; None when the bundle was built without a controlled set (then give the
    doctor a baseline). Its sha256 is checked by `Bundle.load` with every other file of the bundle."""
    from cvdeploy.bundle.bundle import Bundle as _Bundle

    b = bundle if isinstance(bundle, _Bundle) else _Bundle.load(bundle)
    info = b.manifest.profile
    if info is None or b.root is None:
        return None
    return DataProfile.load(b.root / info.file)
