"""Video files, RTSP/RTMP streams, video URLs and webcams through OpenCV's VideoCapture (FFmpeg, V4L2)."""

from __future__ import annotations

import math
import time

import cv2
import numpy as np

from cvdeploy.sources.base import Source, SourceError


class Capture(Source):
    """One OpenCV VideoCapture: a finite video (file or URL, read in order) or a live one (stream, webcam).

    URLs and files go through FFmpeg with open and read timeouts, so that a stream that never answers or stalls ends a
    wait instead of hanging it; a webcam index goes through OpenCV's default backend (V4L2 on Linux).
    """

    def __init__(self, target: str | int, name: str, *, kind: str = "video", live: bool = False, **options: object) -> None:
        self.kind, self.live = kind, live  # before Source.__init__: the buffer's default depends on `live`
        super().__init__(name, **options)  # type: ignore[arg-type]
        self.target = target
        self.fourcc: str | None = None  # the source's codec, e.g. "FMP4", "MJPG", "h264" (when OpenCV reports one)
        self._cap: cv2.VideoCapture | None = None

    def _connect(self) -> None:
        ms = int(self.timeout * 1000)
        if isinstance(self.target, int):
            cap = cv2.VideoCapture(self.target)
        else:
            cap = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG,
                                   [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
        self._cap = cap
        if not cap.isOpened():
            raise SourceError(self._cannot_open())
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if math.isfinite(fps) and 0 < fps < 1000 else None
        code = int(cap.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF
        text = code.to_bytes(4, "little").decode("latin-1") if code else ""
        self.fourcc = text if text.isprintable() and text.strip() else None
        if not self.live:
            count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
            if math.isfinite(count) and count > 0:
                self.total = math.ceil(int(count) / self.vid_stride)
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if w > 0 and h > 0 and self.size is None:
            self.size = (w, h)

    def _cannot_open(self) -> str:
        if self.kind == "webcam":
            return f"webcam {self.target} could not be opened (no camera at that index, or it is in use)"
        if self.kind == "stream":
            return f"stream {self.name} could not be opened within {self.timeout:g} s (is it running and reachable?)"
        return f"cannot open video {self.name}: not a video OpenCV/FFmpeg can read"

    def _grab(self) -> bool:
        return self._cap is not None and bool(self._cap.grab())

    def _retrieve(self) -> np.ndarray | None:
        assert self._cap is not None
        ok, image = self._cap.retrieve()
        if not ok or image is None or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            return None
        return np.ascontiguousarray(image)

    def _timestamp(self, index: int) -> float | None:
        if self.live:
            return time.monotonic() - self._opened_at
        assert self._cap is not None
        ms = self._cap.get(cv2.CAP_PROP_POS_MSEC)
        if math.isfinite(ms) and (ms > 0 or index == 0):
            return ms / 1000.0
        return index / self.fps if self.fps else None

    def _disconnect(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
