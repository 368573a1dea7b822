"""cvdeploy results to roboflow supervision's `sv.Detections`, for its annotators, trackers and zones."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cvdeploy.errors import InputError
from cvdeploy.vision.result import missing_package

if TYPE_CHECKING:
    import supervision

    from cvdeploy.vision.result import Result


def _sv() -> Any:
    try:
        import supervision
    except ImportError as e:
        raise missing_package("supervision", "Result.to_supervision") from e
    return supervision


def to_supervision(result: Result) -> supervision.Detections:
    """`result`'s detections as `sv.Detections`: xyxy (float32, original pixels), confidence, class_id (int) and
    data["class_name"], best confidence first. The same as `sv.Detections.from_ultralytics(result)`."""
    sv = _sv()
    d = result.detections
    if d is None:
        raise InputError(f"a {result.task} result has no detections to convert to supervision")
    names = np.array([result.names.get(int(c), str(int(c))) for c in d.class_id], dtype=str)
    return sv.Detections(
        xyxy=d.xyxy.copy(),
        confidence=d.confidence.copy(),
        class_id=d.class_id.astype(int),
        data={"class_name": names},
    )
