"""cvdeploy: deploy Ultralytics YOLO models the careful way (bundle, verify, predict, serve)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from cvdeploy.bundle import Bundle, Manifest
from cvdeploy.errors import (
    BundleError,
    CvdeployError,
    EngineError,
    ImageDecodeError,
    InputError,
    MissingDependencyError,
    ModelFormatError,
)
from cvdeploy.predict import Predictor
from cvdeploy.vision import Classifications, Detections, Result, Timings

if TYPE_CHECKING:
    from cvdeploy.build import build_bundle

__all__ = [
    "Bundle",
    "BundleError",
    "Classifications",
    "CvdeployError",
    "Detections",
    "EngineError",
    "ImageDecodeError",
    "InputError",
    "Manifest",
    "MissingDependencyError",
    "ModelFormatError",
    "Predictor",
    "Result",
    "Timings",
    "__version__",
    "build_bundle",
]


def __getattr__(name: str) -> Any:
    # build_bundle pulls in torch and ultralytics: import it only when asked for.
    if name == "build_bundle":
        from cvdeploy.build import build_bundle

        return build_bundle
    raise AttributeError(f"module 'cvdeploy' has no attribute {name!r}")
