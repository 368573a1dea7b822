"""Ultralytics-shaped views of a result's task outputs, in numpy: `Masks`, `Keypoints`, `OBB` and `Probs`.

Each has the attributes of its `ultralytics.engine.results` namesake with the same shapes and values (`data`,
`orig_shape`, `xy`, `xyn`, `conf`, `top1`, ...), plus `cpu()` / `numpy()` returning itself, so code written for
Ultralytics results runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import Any

import numpy as np

from cvdeploy.errors import InputError


class _View:
    data: np.ndarray
    orig_shape: tuple[int, int]

    def __init__(self, data: np.ndarray, orig_shape: tuple[int, int]) -> None:
        self.data = data
        self.orig_shape = (int(orig_shape[0]), int(orig_shape[1]))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def cpu(self) -> Any:
        return self

    def numpy(self) -> Any:
        return self

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int | np.integer):
            if not -len(self) <= index < len(self):
                raise IndexError(f"index {index} out of range for {len(self)} items")
            index = slice(index, int(index) + 1 or None)  # one item, dimensions kept (as Ultralytics)
        return type(self)(self.data[index], self.orig_shape)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.data.shape)}, orig_shape={self.orig_shape})"


class Masks(_View):
    """`Results.masks`: `data` (n, H, W) uint8 binary masks at the network input's size (Ultralytics' default) or the
    original image's (`retina_masks=True`); `xy` / `xyn` one polygon per mask in original (normalised) pixels."""

    def __init__(self, data: np.ndarray, orig_shape: tuple[int, int]) -> None:
        data = np.asarray(data)
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3:
            raise InputError(f"masks: expected shape (n, height, width), got {data.shape}")
        super().__init__(data, orig_shape)

    @cached_property
    def xy(self) -> list[np.ndarray]:
        from cvdeploy.vision.masks import masks2segments, scale_coords

        return [scale_coords(self.data.shape[1:], s, self.orig_shape) for s in masks2segments(self.data)]

    @cached_property
    def xyn(self) -> list[np.ndarray]:
        from cvdeploy.vision.masks import masks2segments, scale_coords

        return [scale_coords(self.data.shape[1:], s, self.orig_shape, normalize=True) for s in masks2segments(self.data)]

    @cached_property
    def on_image(self) -> np.ndarray:
        """The masks at the original image's size (n, H, W) uint8 (cvdeploy's: what `rle` encodes)."""
        from cvdeploy.vision.masks import masks_on_image

        return masks_on_image(self.data, self.orig_shape)

    def rle(self, *, compressed: bool = True) -> list[dict[str, object]]:
        """Each mask at the original image's size as COCO RLE ({"size": [H, W], "counts": ...})."""
        from cvdeploy.vision.masks import rle_encode

        return [rle_encode(m, compressed=compressed) for m in self.on_image]


class Keypoints(_View):
    """`Results.keypoints`: `data` (n, K, 2 or 3) in original pixels; `xy`, `xyn`, `conf` (n, K) or None, `has_visible`."""

    def __init__(self, data: np.ndarray, orig_shape: tuple[int, int]) -> None:
        data = np.asarray(data, np.float32)
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3 or data.shape[-1] not in (2, 3):
            raise InputError(f"keypoints: expected shape (n, keypoints, 2 or 3), got {data.shape}")
        super().__init__(data, orig_shape)

    @property
    def has_visible(self) -> bool:
        return self.data.shape[-1] == 3

    @property
    def xy(self) -> np.ndarray:
        return self.data[..., :2]

    @cached_property
    def xyn(self) -> np.ndarray:
        xy = self.xy.copy()
        xy[..., 0] /= self.orig_shape[1]
        xy[..., 1] /= self.orig_shape[0]
        return xy

    @property
    def conf(self) -> np.ndarray | None:
        return self.data[..., 2] if self.has_visible else None


class OBB(_View):
    """`Results.obb`: `data` (n, 7) rows of x, y, w, h, rotation (radians), conf, cls; `xywhr`, `conf`, `cls`,
    `xyxyxyxy` (n, 4, 2) corners, `xyxyxyxyn`, `xyxy` (the enclosing axis-aligned boxes), `id` (None)."""

    is_track = False
    id = None

    def __init__(self, data: np.ndarray, orig_shape: tuple[int, int]) -> None:
        data = np.asarray(data, np.float32)
        if data.ndim == 1 and data.size:
            data = data[None]
        if data.size == 0:
            data = data.reshape(0, 7)
        if data.ndim != 2 or data.shape[1] != 7:
            raise InputError(f"obb: expected shape (n, 7) (x, y, w, h, rotation, conf, cls), got {data.shape}")
        super().__init__(data, orig_shape)

    @property
    def xywhr(self) -> np.ndarray:
        return self.data[:, :5]

    @property
    def conf(self) -> np.ndarray:
        return self.data[:, -2]

    @property
    def cls(self) -> np.ndarray:
        return self.data[:, -1]

    @cached_property
    def xyxyxyxy(self) -> np.ndarray:
        from cvdeploy.vision.obb import xywhr2xyxyxyxy

        return xywhr2xyxyxyxy(self.xywhr)

    @cached_property
    def xyxyxyxyn(self) -> np.ndarray:
        out = self.xyxyxyxy.copy()
        out[..., 0] /= self.orig_shape[1]
        out[..., 1] /= self.orig_shape[0]
        return out

    @cached_property
    def xyxy(self) -> np.ndarray:
        from cvdeploy.vision.obb import corners_to_xyxy

        return corners_to_xyxy(self.xyxyxyxy)


class Probs:
    """`Results.probs`: `data` (nc,) class probabilities; `top1`, `top5`, `top1conf`, `top5conf`."""

    def __init__(self, data: np.ndarray, orig_shape: tuple[int, int] | None = None) -> None:
        data = np.asarray(data, np.float32)
        if data.ndim != 1 or data.size == 0:
            raise InputError(f"probs: expected shape (classes,), got {data.shape}")
        self.data = data
        self.orig_shape = orig_shape

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @cached_property
    def top1(self) -> int:
        return int(self.data.argmax())

    @cached_property
    def top5(self) -> list[int]:
        return np.argsort(-self.data, kind="stable")[:5].tolist()

    @property
    def top1conf(self) -> np.float32:
        return self.data[self.top1]

    @property
    def top5conf(self) -> np.ndarray:
        return self.data[self.top5]

    def cpu(self) -> Probs:
        return self

    def numpy(self) -> Probs:
        return self

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"Probs(top1={self.top1}, top1conf={float(self.top1conf):.4f}, classes={len(self.data)})"
