"""The one detections type: parallel numpy arrays, validated on construction, filtered by indexing; and `Boxes`, the
Ultralytics-shaped view of it that `Result.boxes` offers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
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


class Boxes:
    """Ultralytics' `Results.boxes`, in numpy: `data` is (n, 6) float32 rows of x1, y1, x2, y2, conf, cls.

    The properties are those of `ultralytics.engine.results.Boxes` with the same shapes, dtypes and values: `xyxy`
    (n, 4), `conf` (n,), `cls` (n,) float32 (class ids as floats, as Ultralytics keeps them), `xywh`, `xyxyn`, `xywhn`
    (normalised by `orig_shape`), `id` (None: no tracking), `len()`. Indexing keeps two dimensions (`boxes[0].xyxy` is
    (1, 4)); iterating yields one-row Boxes. `cpu()` and `numpy()` return the Boxes itself, so code written for
    Ultralytics' tensors (`boxes.cpu().numpy().xyxy`) runs unchanged.
    """

    is_track = False
    id = None

    def __init__(self, data: np.ndarray, orig_shape: tuple[int, int]) -> None:
        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 1 and data.size:
            data = data[None]
        if data.size == 0:
            data = data.reshape(0, 6)
        if data.ndim != 2 or data.shape[1] != 6:
            raise InputError(f"boxes: expected shape (n, 6) (x1, y1, x2, y2, conf, cls), got {data.shape}")
        self.data = data
        self.orig_shape = (int(orig_shape[0]), int(orig_shape[1]))

    @classmethod
    def from_detections(cls, detections: Detections, orig_shape: tuple[int, int]) -> Boxes:
        data = np.concatenate(
            [detections.xyxy, detections.confidence[:, None], detections.class_id[:, None].astype(np.float32)], 1
        )
        return cls(data, orig_shape)

    @property
    def xyxy(self) -> np.ndarray:
        return self.data[:, :4]

    @property
    def conf(self) -> np.ndarray:
        return self.data[:, 4]

    @property
    def cls(self) -> np.ndarray:
        return self.data[:, 5]

    @cached_property
    def xywh(self) -> np.ndarray:
        xyxy = self.xyxy
        return np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)

    @cached_property
    def xyxyn(self) -> np.ndarray:
        return self.xyxy / self._whwh

    @cached_property
    def xywhn(self) -> np.ndarray:
        return self.xywh / self._whwh

    @property
    def _whwh(self) -> np.ndarray:
        h, w = self.orig_shape
        return np.array([w, h, w, h], dtype=np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def cpu(self) -> Boxes:
        return self

    def numpy(self) -> Boxes:
        return self

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: Any) -> Boxes:
        if isinstance(index, int | np.integer):
            if not -len(self) <= index < len(self):
                raise IndexError(f"box index {index} out of range for {len(self)} boxes")
            index = slice(index, int(index) + 1 or None)  # one row, still 2-D (as Ultralytics); -1 -> slice(-1, None)
        return Boxes(self.data[index], self.orig_shape)

    def __iter__(self) -> Iterator[Boxes]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"Boxes(n={len(self)}, orig_shape={self.orig_shape})"
