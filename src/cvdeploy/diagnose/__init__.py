"""Accuracy-drop doctor. Re-exported here: the data profile of images and predictions and its drift tests (`profile`).

The other steps (the preprocessing audit, ...) are imported from their own modules.
"""

from cvdeploy.diagnose.profile import (
    PROFILE_VERSION,
    DataProfile,
    Drift,
    Profiler,
    Severity,
    Sketch,
    compare,
    image_statistics,
    jpeg_quality,
    profile_images,
)

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
]
