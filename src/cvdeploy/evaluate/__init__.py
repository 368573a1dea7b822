"""Accuracy on a controlled dataset: YOLO-format data read back, and every task's figure (COCO box mAP for detect;
Ultralytics' `val` protocol for mask, keypoint and rotated-box mAP; top-1/top-5 for classify)."""

from cvdeploy.evaluate.accuracy import TaskMetrics, evaluate
from cvdeploy.evaluate.coco import DetectionMetrics, evaluate_detect, load_yolo_split

__all__ = ["DetectionMetrics", "TaskMetrics", "evaluate", "evaluate_detect", "load_yolo_split"]
