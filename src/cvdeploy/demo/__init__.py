"""The demo: the synthetic shapes dataset and the bundled YOLO11n model trained on it."""

from pathlib import Path

DEMO_MODEL = Path(__file__).with_name("yolo11n-shapes.pt")

__all__ = ["DEMO_MODEL"]
