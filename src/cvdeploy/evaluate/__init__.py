"""Accuracy on a controlled dataset: YOLO-format data read back, COCO-protocol mAP."""

from cvdeploy.evaluate.coco import DetectionMetrics, evaluate_detect, load_yolo_split

__all__ = ["DetectionMetrics", "evaluate_detect", "load_yolo_split"]
