"""Annotated videos out: the source's frame size and frame rate, and its container and codec where OpenCV can write them.

OpenCV's FFmpeg build writes MPEG-4 Part 2 (mp4v), MJPEG and VP8 but no H.264 (no encoder): an H.264 .mp4 comes back as
an mp4v .mp4, same container, same size, same rate. When no codec can be written to the source's container, the video
is written as MJPEG in .avi (OpenCV writes that without FFmpeg too), and `path` says so.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from cvdeploy.errors import CvdeployError

# Codecs tried for each container, after the source's own; the first that opens is used.
CODECS: dict[str, tuple[str, ...]] = {
    ".mp4": ("mp4v",), ".m4v": ("mp4v",), ".mov": ("mp4v",), ".3gp": ("mp4v",),
    ".avi": ("MJPG", "XVID"), ".mkv": ("mp4v", "MJPG"), ".webm": ("VP80", "VP90"),
    ".mpg": ("PIM1",), ".mpeg": ("PIM1",), ".wmv": ("WMV2",), ".asf": ("WMV2",), ".flv": ("FLV1",),
}
FALLBACK = (".avi", "MJPG")
_MEASURE_FRAMES = 30  # a source that declares no rate: its rate is measured over this many frames (or 2 s) first
_MEASURE_SECONDS = 2.0


class VideoSink:
    """Writes annotated frames to `stem` + the source's suffix; opened at the first frame (when the size is known) or,
    for a source of unknown rate, once the rate has been measured from the frames' timestamps."""

    def __init__(self, stem: Path, suffix: str, *, fps: float | None, fourcc: str | None = None) -> None:
        self.stem, self.suffix = stem, suffix.lower() or ".mp4"
        self.fps = fps if fps and math.isfinite(fps) and fps > 0 else None
        self.source_fourcc = fourcc
        self.path: Path | None = None
        self.fourcc: str | None = None
        self.size: tuple[int, int] | None = None  # (width, height)
        self.frames = 0
        self._writer: cv2.VideoWriter | None = None
        self._pending: list[tuple[np.ndarray, float | None]] = []

    def write(self, image: np.ndarray, timestamp: float | None = None) -> None:
        if self._writer is None:
            self._pending.append((image, timestamp))
            if self.fps is None:
                times = [t for _, t in self._pending if t is not None]
                span = times[-1] - times[0] if len(times) > 1 else 0.0
                if len(self._pending) < _MEASURE_FRAMES and span < _MEASURE_SECONDS:
                    return
            self._open()
            return
        self._write(image)

    def _measured_fps(self) -> float:
        times = [t for _, t in self._pending if t is not None]
        if len(times) > 1 and times[-1] > times[0]:
            return (len(times) - 1) / (times[-1] - times[0])
        return 10.0  # one frame, or no timestamps: any rate shows it

    def _open(self) -> None:
        first = self._pending[0][0]
        h, w = first.shape[:2]
        self.size = (w, h)
        fps = self.fps or self._measured_fps()
        tried = []
        if self.source_fourcc and len(self.source_fourcc) == 4 and self.source_fourcc.isalnum():
            tried.append((self.suffix, self.source_fourcc))
        tried += [(self.suffix, c) for c in CODECS.get(self.suffix, ())]
        tried += [(".mp4", "mp4v"), FALLBACK]
        for suffix, code in dict.fromkeys(tried):
            path = self.stem.with_name(self.stem.name + suffix)
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*code), fps, (w, h))
            if writer.isOpened():
                self._writer, self.path, self.fourcc, self.fps = writer, path, code, fps
                break
            writer.release()
            path.unlink(missing_ok=True)
        else:
            raise CvdeployError(f"cannot write a video to {self.stem}{self.suffix}: no codec OpenCV can write here")
        pending, self._pending = self._pending, []
        for image, _ in pending:
            self._write(image)

    def _write(self, image: np.ndarray) -> None:
        assert self._writer is not None and self.size is not None
        if (image.shape[1], image.shape[0]) != self.size:  # a stream that changed resolution: one video, one size
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        self._writer.write(image)
        self.frames += 1

    def close(self) -> Path | None:
        """Finalise the file (an MP4's index is written here); the path written, or None when no frame came."""
        if self._writer is None and self._pending:
            self._open()
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        return self.path
