"""Pose keypoints: scaled back through the letterbox as Ultralytics does, and the skeleton they are drawn with."""

from __future__ import annotations

import numpy as np

from cvdeploy.errors import InputError
from cvdeploy.vision.letterbox import LetterboxParams

# COCO's 17-keypoint person skeleton (1-based pairs), and Ultralytics' colours for its limbs and points (RGB palette).
COCO_SKELETON = ((16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9), (8, 10),
                 (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7))
POSE_PALETTE = np.array([[255, 128, 0], [255, 153, 51], [255, 178, 102], [230, 230, 0], [255, 153, 255], [153, 204, 255],
                         [255, 102, 255], [255, 51, 255], [102, 178, 255], [51, 153, 255], [255, 153, 153], [255, 102, 102],
                         [255, 51, 51], [153, 255, 153], [102, 255, 102], [51, 255, 51], [0, 255, 0], [0, 0, 255],
                         [255, 0, 0], [255, 255, 255]], dtype=np.uint8)
LIMB_COLORS = POSE_PALETTE[[9, 9, 9, 9, 7, 7, 7, 0, 0, 0, 0, 0, 16, 16, 16, 16, 16, 16, 16]]
KPT_COLORS = POSE_PALETTE[[16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9, 9, 9]]


def check_kpt_shape(kpt_shape: tuple[int, int] | list[int] | None, channels: int) -> tuple[int, int]:
    """The (keypoints, values per keypoint) that `channels` extra values per detection hold."""
    if kpt_shape is None:
        raise InputError("a pose model needs its keypoint shape (kpt_shape, e.g. [17, 3]); neither the bundle nor the "
                         "model's metadata gives it: rebuild the bundle with cvdeploy build")
    k, d = (int(v) for v in kpt_shape)
    if k < 1 or d not in (2, 3):
        raise InputError(f"kpt_shape must be (keypoints, 2 or 3), got {list(kpt_shape)}")
    if k * d != channels:
        raise InputError(f"kpt_shape {[k, d]} needs {k * d} values per detection, the model gives {channels}")
    return k, d


def scale_keypoints(kpts: np.ndarray, params: LetterboxParams) -> np.ndarray:
    """(n, K, D) keypoints from network-input pixels to original-image pixels, clipped to the image (Ultralytics'
    `scale_coords`); the visibility column, if any, is kept."""
    gx, gy = params.gain_xy
    h0, w0 = params.orig_shape
    out = np.asarray(kpts, np.float32).copy()
    out[..., 0] = ((out[..., 0] - params.left) / gx).clip(0, w0)
    out[..., 1] = ((out[..., 1] - params.top) / gy).clip(0, h0)
    return out
