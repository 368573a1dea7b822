"""Where images come from: files, directories, globs, URLs, videos, streams and webcams, as frames with metadata.

    open_source("clip.mp4", vid_stride=2) -> Source          iterate for Frames, read(n) for batches, close()
    stream(predictor, "rtsp://cam/live") -> ResultStream     FrameResults as frames arrive (an iterator, closable)
    resolve_sources(["imgs/*.jpg", "0"]) -> [SourceSpec]     what each argument names, checked, not yet opened

Used by `cvdeploy predict` and `Predictor.stream`; see docs/sources.md.
"""

from cvdeploy.sources.base import Frame, Source, SourceError, SourceStats
from cvdeploy.sources.predict import FrameResult, ResultStream, predict_frames, stream
from cvdeploy.sources.spec import (
    STREAM_SCHEMES,
    VIDEO_SUFFIXES,
    SourceLike,
    SourceSpec,
    open_source,
    resolve_sources,
)

__all__ = [
    "STREAM_SCHEMES",
    "VIDEO_SUFFIXES",
    "Frame",
    "FrameResult",
    "ResultStream",
    "Source",
    "SourceError",
    "SourceLike",
    "SourceSpec",
    "SourceStats",
    "open_source",
    "predict_frames",
    "resolve_sources",
    "stream",
]
