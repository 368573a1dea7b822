"""http(s) sources: one GET says what the URL is (an image, an MJPEG stream or a video) by its content type.

Images are fetched with a size cap and timeouts. MJPEG streams (multipart/x-mixed-replace) are parsed here and each
JPEG part is decoded by `load_image`, exactly as the same JPEG read from a file would be (the decoding the model was
trained with), rather than by FFmpeg's MJPEG decoder. Videos and HLS/DASH playlists go to OpenCV (`capture.Capture`).
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from typing import Any

import numpy as np

from cvdeploy import __version__
from cvdeploy.errors import CvdeployError, ImageDecodeError
from cvdeploy.sources.base import Source, SourceError
from cvdeploy.sources.files import Images
from cvdeploy.vision.image import DecodeLimits, image_format, load_image

DEFAULT_MAX_BYTES = 50 * 1024 * 1024  # an image URL's body, or one MJPEG part, when the decode limits set none
_LIVE_TYPES = {"application/vnd.apple.mpegurl", "application/x-mpegurl", "audio/mpegurl", "application/dash+xml"}
_ACCEPT = "image/*, multipart/x-mixed-replace, video/*;q=0.9, */*;q=0.1"
_MAX_PREAMBLE = 64 * 1024  # bytes skipped looking for a boundary before the stream is called broken


def redact(url: str) -> str:
    """The URL with its password replaced by ***: names end up in results, logs and file names."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _get(url: str, name: str, timeout: float) -> http.client.HTTPResponse:
    """GET `url` (redirects followed); the response once its headers are in, or a one-line SourceError."""
    request = urllib.request.Request(url, headers={"User-Agent": f"cvdeploy/{__version__}", "Accept": _ACCEPT})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        raise SourceError(f"{name}: the server answered {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise SourceError(f"{name}: no answer within {timeout:g} s") from None
        reason = e.reason.strerror if isinstance(e.reason, OSError) and e.reason.strerror else e.reason
        raise SourceError(f"{name}: cannot connect ({reason})") from None
    except TimeoutError:
        raise SourceError(f"{name}: no answer within {timeout:g} s") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise SourceError(f"{name}: cannot fetch ({' '.join(str(e).split()) or type(e).__name__})") from None


def _content_type(headers: Message) -> str:
    return headers.get_content_type() if headers.get("Content-Type") else ""


def _read_capped(response: Any, name: str, max_bytes: int, timeout: float) -> bytes:
    """The whole body, refused past `max_bytes` (before reading it when Content-Length says so) or past a deadline of
    4 x timeout (a server that drips bytes stays within each read's timeout)."""
    length = response.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise SourceError(f"{name}: {int(length)} bytes exceeds the limit of {max_bytes} bytes")
    deadline = time.monotonic() + 4 * timeout
    chunks, size = [], 0
    try:
        while chunk := response.read(64 * 1024):
            size += len(chunk)
            if size > max_bytes:
                raise SourceError(f"{name}: the answer exceeds the limit of {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise SourceError(f"{name}: the answer did not arrive within {4 * timeout:g} s")
            chunks.append(chunk)
    except TimeoutError:
        raise SourceError(f"{name}: the answer stalled for {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as e:
        raise SourceError(f"{name}: the connection failed while reading ({' '.join(str(e).split())})") from None
    return b"".join(chunks)


def open_url(url: str, *, limits: DecodeLimits = DecodeLimits(), timeout: float = 10.0, max_bytes: int | None = None,
             **options: Any) -> Source:
    """Open an http(s) URL as what its answer is: an image, an MJPEG stream, a video or a live playlist."""
    from cvdeploy.sources.capture import Capture

    name = redact(url)
    cap = max_bytes or limits.max_bytes or DEFAULT_MAX_BYTES
    response = _get(url, name, timeout)
    ctype = _content_type(response.headers)
    try:
        if ctype == "multipart/x-mixed-replace":
            boundary = response.headers.get_param("boundary")
            if not isinstance(boundary, str) or not boundary:
                raise SourceError(f"{name}: a multipart/x-mixed-replace answer without a boundary")
            stream = MjpegStream(url, name, boundary, limits=limits, max_bytes=cap, timeout=timeout, **options)
            stream.adopt(response)
            return stream
        if ctype.startswith("video/") or ctype in _LIVE_TYPES:
            response.close()
            live = ctype in _LIVE_TYPES
            return Capture(url, name, kind="stream" if live else "video", live=live, timeout=timeout, **options)
        if ctype.startswith("image/") or ctype in ("", "application/octet-stream", "binary/octet-stream"):
            body = _read_capped(response, name, cap, timeout)
            if image_format(body) is None and not ctype.startswith("image/"):
                raise SourceError(f"{name} is {ctype or 'of no content type'} and not an image")
            try:
                image = load_image(body, limits=limits)
            except ImageDecodeError as e:
                raise ImageDecodeError(f"{name}: {e}") from None
            return Images(name, [(name, lambda: image)])
        raise SourceError(f"{name} is {ctype}, not an image, a video or an MJPEG stream")
    except BaseException:
        response.close()
        raise


class MjpegStream(Source):
    """An HTTP MJPEG stream (multipart/x-mixed-replace), live: each part a JPEG, decoded by `load_image`."""

    kind = "stream"
    live = True

    def __init__(self, url: str, name: str, boundary: str, *, limits: DecodeLimits = DecodeLimits(),
                 max_bytes: int = DEFAULT_MAX_BYTES, **options: Any) -> None:
        super().__init__(name, **options)
        self.url = url
        self.limits = limits
        self.max_bytes = max_bytes
        b = boundary.encode("latin-1")
        # Cameras disagree on whether the header's boundary includes the leading "--": accept both.
        self._marks = {b"--" + b, b} if not b.startswith(b"--") else {b, b[2:]}
        self._response: Any = None
        self._adopted: Any = None
        self._part = b""
        self._at_boundary = False

    def adopt(self, response: Any) -> None:
        """Use the response the URL was probed with as the first connection (some cameras take one client only)."""
        self._adopted = response

    def _connect(self) -> None:
        response, self._adopted = self._adopted, None
        if response is None:
            response = _get(self.url, self.name, self.timeout)
            if _content_type(response.headers) != "multipart/x-mixed-replace":
                response.close()
                raise SourceError(f"{self.name} is no longer an MJPEG stream")
        self._response = response
        self._at_boundary = False

    def _is_mark(self, line: bytes) -> bool:
        return line.strip() in self._marks

    def _grab(self) -> bool:
        fp = self._response
        if fp is None:
            return False
        try:
            if not self._at_boundary:
                skipped = 0
                while True:
                    line = fp.readline(_MAX_PREAMBLE)
                    if not line or line.strip() in {m + b"--" for m in self._marks}:
                        return False  # the server closed the stream, or ended it
                    if self._is_mark(line):
                        break
                    skipped += len(line)
                    if skipped > _MAX_PREAMBLE:
                        return False
            self._at_boundary = False
            length = None
            while True:
                line = fp.readline(8192)
                if not line:
                    return False
                if not line.strip():
                    break
                key, _, value = line.decode("latin-1").partition(":")
                if key.strip().lower() == "content-length" and value.strip().isdigit():
                    length = int(value.strip())
            if length is not None:
                if length > self.max_bytes:
                    return False
                data = fp.read(length)
                if len(data) < length:
                    return False
            else:
                data = self._read_to_boundary(fp)
                if data is None:
                    return False
        except (OSError, http.client.HTTPException, ValueError):  # a timeout (stall) or a reset: the stream dropped
            return False
        self._part = data
        return True

    def _read_to_boundary(self, fp: Any) -> bytes | None:
        """A part without Content-Length: everything up to the next boundary line (which is consumed)."""
        chunks, size = [], 0
        while True:
            line = fp.readline(64 * 1024)
            if not line:
                return None
            if self._is_mark(line):
                self._at_boundary = True
                break
            size += len(line)
            if size > self.max_bytes:
                return None
            chunks.append(line)
        data = b"".join(chunks)
        return data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data

    def _retrieve(self) -> np.ndarray | None:
        try:
            return load_image(self._part, limits=self.limits)
        except CvdeployError:
            return None

    def close(self) -> None:
        started = self._thread is not None
        super().close()
        if not started and self._adopted is not None:  # never read: the probe's response is still ours to close
            self._adopted.close()
            self._adopted = None

    def _disconnect(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            response.close()
        adopted, self._adopted = self._adopted, None
        if adopted is not None:
            adopted.close()
