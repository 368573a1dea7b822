"""Predictions over a source, as its frames arrive: batches through the Predictor's public `predict`, one result per
frame, carrying the frame's index and timestamp."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from cvdeploy.errors import InputError
from cvdeploy.sources.base import Frame, Source
from cvdeploy.sources.files import ErrorHandler
from cvdeploy.sources.spec import SourceLike, open_source
from cvdeploy.vision.result import Result

if TYPE_CHECKING:
    from cvdeploy.predict import Predictor


@dataclass
class FrameResult(Result):
    """A Result for one frame of a source: `source` names the frame (`clip.mp4#frame=12`, or the path of a still image)
    and `frame`, `timestamp` and `fps` say where it was in its source. `to_dict` adds `frame` and `timestamp_s` for
    frames of videos and streams (a still image's dict is a plain Result's)."""

    frame: int | None = None  # the frame's index in its video or stream (before vid_stride); None for a still image
    timestamp: float | None = None  # seconds: a video's presentation time, a live source's time since it was opened
    fps: float | None = None  # the source's frame rate, when it declares one

    @classmethod
    def of(cls, result: Result, frame: Frame) -> FrameResult:
        still = frame.kind == "image"
        values = {f.name: getattr(result, f.name) for f in fields(Result)}
        values["source"] = frame.name
        # The Predictor got an array and timed no decoding: the source's read and decode stand in for it.
        values["timings"].decode = frame.read_ms
        return cls(**values, frame=None if still else frame.index, timestamp=frame.timestamp, fps=frame.fps)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.frame is not None:
            out["frame"] = self.frame
            out["timestamp_s"] = None if self.timestamp is None else round(self.timestamp, 4)
        return out


def _given(overrides: dict[str, Any]) -> dict[str, Any]:
    # Only what was given: classes=None passed on would lift a class filter the Predictor was built with.
    if "stream" in overrides:
        raise InputError("stream= is not a prediction option here: the frames are streamed already")
    return {k: v for k, v in overrides.items() if v is not None}


def _check_batch(batch: int) -> None:
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise InputError(f"batch must be an integer >= 1, got {batch!r}")


def predict_frames(predictor: Predictor, source: Source, *, batch: int = 1,
                   **overrides: Any) -> Iterator[tuple[Frame, FrameResult]]:
    """(frame, result) pairs of an open source, predicted `batch` frames at a time (a live source: as many as are
    waiting, up to `batch`) through `predictor.predict`, with its options (conf, iou, max_det, classes, ...). The caller
    owns `source` and closes it."""
    _check_batch(batch)
    options = _given(overrides)
    while frames := source.read(batch):
        results = predictor.predict([f.image for f in frames], **options)
        for frame, result in zip(frames, results, strict=True):
            yield frame, FrameResult.of(result, frame)


class ResultStream(Iterator[FrameResult]):
    """What `stream` returns: an iterator of FrameResults that owns its source. `close()` (or leaving a `with` block,
    or dropping it) stops the source's reader and releases the source; it closes by itself at the source's end."""

    def __init__(self, pairs: Iterator[tuple[Frame, FrameResult]], source: Source, *, owned: bool) -> None:
        self._pairs, self.source, self._owned = pairs, source, owned

    def __iter__(self) -> ResultStream:
        return self

    def __next__(self) -> FrameResult:
        try:
            return next(self._pairs)[1]
        except BaseException:  # the end, an error, Ctrl-C: release the source before saying so
            self.close()
            raise

    def close(self) -> None:
        self._pairs.close()  # type: ignore[attr-defined]
        if self._owned:
            self.source.close()

    def __enter__(self) -> ResultStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # `for r in stream(...): break` drops the last reference: the reader stops then, not at exit.
        with contextlib.suppress(Exception):
            self.close()


def stream(predictor: Predictor, source: SourceLike | Source, *, batch: int = 1, vid_stride: int = 1,
           buffer: int | None = None, reconnect: int = 5, timeout: float = 10.0, on_error: ErrorHandler | None = None,
           **overrides: Any) -> ResultStream:
    """Predict every frame of `source` as it arrives: an iterator of `FrameResult`s, one per frame.

    `source` is anything `open_source` takes (a file, directory, glob, URL, stream, webcam index), opened here (so a bad
    source raises here), or a Source already open (then the caller closes it). A live source keeps its latest `buffer`
    frames (default: `batch`), so a slow model skips frames instead of falling behind; a file is read in order without
    skipping. `overrides` are the Predictor's per-call options (conf, iou, max_det, classes, ...). The stream stops its
    reader and releases the source at the end, on `close()`, when a `with` block over it ends, or when it is dropped.

    >>> with stream(predictor, "rtsp://cam/live", vid_stride=2) as results:
    ...     for r in results:
    ...         print(r.source, r.timestamp, len(r.detections))     # rtsp://cam/live#frame=0 0.04 2
    """
    _check_batch(batch)
    owned = not isinstance(source, Source)
    src = open_source(source, vid_stride=vid_stride, buffer=buffer or batch, reconnect=reconnect, timeout=timeout,
                      limits=predictor.limits, on_error=on_error) if owned else source
    return ResultStream(predict_frames(predictor, src, batch=batch, **overrides), src, owned=owned)  # type: ignore[arg-type]
