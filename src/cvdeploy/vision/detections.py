"""The one detections type: parallel numpy arrays, validated on construction, filtered by indexing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cvdeploy.errors import InputError


@dataclass
class Detections:
    """Boxes in pixel coordinates of the original image.

    `xyxy` is (n, 4) float32, `confidence` (n,) float32, `class_id` (n,) int64. `data` holds
    extra per-detection arrays (masks, keypoints, ...) that are indexed along with the boxes.
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    data: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.xyxy = np.asarray(self.xyxy, dtype=np.float32)
        if self.xyxy.size == 0:
            self.xyxy = self.xyxy.reshape(0, 4)
        self.confidence = np.asarray(self.confidence, dtype=np.float32)
        self.class_id = np.asarray(self.class_id, dtype=np.int64)
        n = len(self.xyxy)
        if self.xyxy.ndim != 2 or self.xyxy.shape[1] != 4:
            raise InputError(f"xyxy: expected shape (n, 4), got {self.xyxy.shape}")
        for name, arr in (("confidence", self.confidence), ("class_id", self.class_id)):
            if arr.shape != (n,):
                raise InputError(f"{name}: expected shape ({n},), got {arr.shape}")
        for name, arr in self.data.items():
            if len(arr) != n:
                raise InputError(f"data[{name!r}]: expected {n} rows, got {len(arr)}")

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index: Any) -> Detections:
        if isinstance(index, int | np.integer):
            index = [index]
        return Detections(
            self.xyxy[index], self.confidence[index], self.class_id[index], {k: v[index] for k, v in self.data.items()}
        )

    def __iter__(self) -> Iterator[tuple[np.ndarray, float, int]]:
        for i in range(len(self)):
            yield self.xyxy[i], float(self.confidence[i]), int(self.class_id[i])

    @property
    def area(self) -> np.ndarray:
        return (self.xyxy[:, 2] - self.xyxy[:, 0]) * (self.xyxy[:, 3] - self.xyxy[:, 1])


@dataclass
class Classifications:
    """Top-k classes of one image, best first."""

    class_id: np.ndarray  # (k,) int64
    confidence: np.ndarray  # (k,) float32

    def __post_init__(self) -> None:
        self.class_id = np.asarray(self.class_id, dtype=np.int64)
        self.confidence = np.asarray(self.confidence, dtype=np.float32)
        if self.class_id.shape != self.confidence.shape or self.class_id.ndim != 1:
            raise InputError(
                f"class_id and confidence: expected two (k,) arrays, got {self.class_id.shape} and {self.confidence.shape}"
            )

    def __len__(self) -> int:
        return len(self.class_id)
