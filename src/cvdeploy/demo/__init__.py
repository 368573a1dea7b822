"""The demo: the synthetic shapes dataset and the bundled YOLO11n models trained on it."""

from pathlib import Path

_HERE = Path(__file__).parent

DEMO_MODEL = _HERE / "yolo11n-shapes.pt"  # detect
DEMO_SEG_MODEL = _HERE / "yolo11n-shapes-seg.pt"
DEMO_POSE_MODEL = _HERE / "yolo11n-shapes-pose.pt"
DEMO_OBB_MODEL = _HERE / "yolo11n-shapes-obb.pt"
DEMO_CLS_MODEL = _HERE / "yolo11n-shapes-cls.pt"

# task -> packaged weights (Ultralytics task names); a file may be absent if it was not shipped
TASK_MODELS: dict[str, Path] = {
    "detect": DEMO_MODEL,
    "segment": DEMO_SEG_MODEL,
    "pose": DEMO_POSE_MODEL,
    "obb": DEMO_OBB_MODEL,
    "classify": DEMO_CLS_MODEL,
}

__all__ = ["DEMO_CLS_MODEL", "DEMO_MODEL", "DEMO_OBB_MODEL", "DEMO_POSE_MODEL", "DEMO_SEG_MODEL", "TASK_MODELS"]
