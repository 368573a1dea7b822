"""What a source string names (a file, a directory, a glob, a URL, a stream, a webcam index) and how it is opened."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from cvdeploy.errors import CvdeployError, InputError
from cvdeploy.sources.base import Frame, Source
from cvdeploy.sources.files import ErrorHandler, Images
from cvdeploy.vision.image import IMAGE_SUFFIXES, DecodeLimits, image_format

__all__ = ["STREAM_SCHEMES", "VIDEO_SUFFIXES", "SourceLike", "SourceSpec", "open_source", "resolve_sources"]

# Suffixes read as videos (by OpenCV/FFmpeg). GIF stays an image: its first frame, as cv2.imdecode (training) reads it.
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts",
                                   ".m2ts", ".wmv", ".asf", ".flv", ".3gp", ".ogv")
STREAM_SCHEMES: tuple[str, ...] = ("rtsp", "rtsps", "rtmp", "rtmps", "rtp", "srt", "udp", "tcp")
URL_SCHEMES: tuple[str, ...] = ("http", "https")

SourceLike: TypeAlias = str | os.PathLike[str] | int


@dataclass(frozen=True)
class SourceSpec:
    """One resolved source: its kind, what to open (a path, a URL or a webcam index) and the name results carry."""

    kind: str
    target: str | int
    name: str

    @property
    def live(self) -> bool:
        return self.kind in ("stream", "webcam")

    def open(self, *, vid_stride: int = 1, buffer: int | None = None, reconnect: int = 5, timeout: float = 10.0,
             backoff: float = 0.5, limits: DecodeLimits = DecodeLimits(), max_bytes: int | None = None,
             on_error: ErrorHandler | None = None) -> Source:
        """Open it and, for videos and streams, wait for the first frame (at most `timeout` s for a live source); a
        source that cannot be opened raises a one-line SourceError here, not later."""
        from cvdeploy.sources.capture import Capture
        from cvdeploy.sources.http import open_url

        common: dict[str, Any] = dict(vid_stride=vid_stride, buffer=buffer, reconnect=reconnect, backoff=backoff)
        if self.kind == "image":
            return Images.from_paths(self.name, [str(self.target)], limits=limits, on_error=on_error)
        if self.kind == "url":
            source = open_url(str(self.target), limits=limits, timeout=timeout, max_bytes=max_bytes, **common)
        else:
            source = Capture(self.target, self.name, kind=self.kind, live=self.live, timeout=timeout, **common)
        return source.start()


def _classify_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError:
        return "image"  # load_image says why it cannot be read
    return "video" if image_format(head) is None and _looks_like_video(head) else "image"


def _looks_like_video(head: bytes) -> bool:
    return (head[4:8] == b"ftyp"  # MP4/MOV (image_format has already claimed the HEIF/AVIF brands)
            or (head[:4] == b"RIFF" and head[8:11] == b"AVI")
            or head[:4] == b"\x1a\x45\xdf\xa3"  # Matroska/WebM
            or head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")  # MPEG program stream, MPEG video
            or (len(head) > 188 and head[0] == 0x47 and head[188] == 0x47)  # MPEG transport stream
            or head[:3] == b"FLV"
            or head[:4] == b"\x30\x26\xb2\x75")  # ASF/WMV


def _media_files(folder: Path) -> list[Path]:
    suffixes = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    return sorted(f for f in folder.rglob("*") if f.suffix.lower() in suffixes and f.is_file())


def _file_spec(path: Path) -> SourceSpec:
    return SourceSpec(_classify_file(path), str(path), str(path))


def resolve(spec: SourceLike) -> list[SourceSpec]:
    """One source string (or path, or webcam index) -> the sources it names: a directory or a glob expands (sorted,
    recursively, image and video files); anything that does not exist is a one-line InputError."""
    from cvdeploy.sources.http import redact

    if isinstance(spec, bool) or not isinstance(spec, str | os.PathLike | int):
        raise InputError(f"a source is a path, a URL, a glob or a webcam index, got a {type(spec).__name__}")
    if isinstance(spec, int):
        if spec < 0:
            raise InputError(f"a webcam index is >= 0, got {spec}")
        return [SourceSpec("webcam", spec, f"webcam:{spec}")]
    text = os.fspath(spec)
    if isinstance(spec, str) and "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme in URL_SCHEMES:
            return [SourceSpec("url", text, redact(text))]
        if scheme in STREAM_SCHEMES:
            return [SourceSpec("stream", text, redact(text))]
        if scheme != "file":
            raise InputError(f"unsupported URL scheme {scheme}:// in {redact(text)} (http, https, "
                             f"{', '.join(STREAM_SCHEMES)} or a path)")
        text = text[len("file://"):]
    path = Path(text)
    if path.is_dir():
        found = _media_files(path)
        if not found:
            raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) or videos ({', '.join(VIDEO_SUFFIXES)}) in {path}")
        return [_file_spec(f) for f in found]
    if path.is_file():
        return [_file_spec(path)]
    if text.isdigit():
        return [SourceSpec("webcam", int(text), f"webcam:{int(text)}")]
    if glob.has_magic(text):
        matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
        files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES]
        if not files:
            what = f"{len(matches)} path(s) match {text}, none an image or a video file" if matches else f"no files match {text}"
            raise InputError(what)
        return [_file_spec(f) for f in files]
    what = "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"
    raise InputError(f"{what} not found: {path}")


def resolve_sources(specs: Iterable[SourceLike]) -> list[SourceSpec]:
    """Every source of `specs`, resolved in order (see `resolve`)."""
    return [s for spec in specs for s in resolve(spec)]


class Chain(Source):
    """Several resolved sources read one after the other (a directory or a glob of images and videos)."""

    kind = "files"

    def __init__(self, name: str, specs: Sequence[SourceSpec], on_error: ErrorHandler | None = None,
                 **options: Any) -> None:
        super().__init__(name)
        self.specs = list(specs)
        self.on_error = on_error
        self.options = options
        self._current: Source | None = None
        self._next = 0

    def start(self) -> Chain:
        return self

    def read(self, n: int = 1) -> list[Frame]:
        while not self._closed:
            if self._current is None:
                if self._next >= len(self.specs):
                    return []
                spec = self.specs[self._next]
                self._next += 1
                try:
                    self._current = spec.open(on_error=self.on_error, **self.options)
                except CvdeployError as e:
                    if self.on_error is None:
                        raise
                    self.on_error(spec.name, e)
                    continue
            frames = self._current.read(n)
            if frames:
                return frames
            self._current.close()
            self._current = None
        return []

    def close(self) -> None:
        self._closed = True
        if self._current is not None:
            self._current.close()
            self._current = None


def open_source(source: SourceLike, *, vid_stride: int = 1, buffer: int | None = None, reconnect: int = 5,
                timeout: float = 10.0, backoff: float = 0.5, limits: DecodeLimits = DecodeLimits(),
                max_bytes: int | None = None, on_error: ErrorHandler | None = None) -> Source:
    """Open a source and return it, started: iterate it for `Frame`s (or `read(n)` for batches), then `close()` it (or
    use it as a context manager).

    `source`: an image or video file, a directory or glob (quoted: "imgs/**/*.jpg"), an http(s) URL (an image, an MJPEG
    stream or a video, told apart by its content type), an rtsp://, rtmp://, ... stream URL, or a webcam index (0 or
    "0"). `vid_stride`: keep every n-th frame of a video or stream. `buffer`: a live source keeps its latest `buffer`
    frames (default 1); a file is read that many frames ahead (default 4). `reconnect`: attempts after a live source
    drops, with exponential backoff from `backoff` seconds. `timeout`: seconds for a connection, an answer, a first
    frame. `limits`: decode limits of still images and MJPEG frames; `max_bytes` caps a URL's image (default: the
    limits' max_bytes, else 50 MiB). `on_error(name, error)`: report an unreadable image of several and go on (default:
    raise).
    """
    options: dict[str, Any] = dict(vid_stride=vid_stride, buffer=buffer, reconnect=reconnect, timeout=timeout,
                                   backoff=backoff, limits=limits, max_bytes=max_bytes)
    specs = resolve(source)
    name = os.fspath(source) if not isinstance(source, int) else specs[0].name
    if len(specs) == 1:
        return specs[0].open(on_error=on_error, **options)
    if all(s.kind == "image" for s in specs):
        return Images.from_paths(name, [str(s.target) for s in specs], limits=limits, on_error=on_error)
    return Chain(name, specs, on_error=on_error, **options)
