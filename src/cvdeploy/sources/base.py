"""Frames and the Source they come from: ordered reading, vid_stride, a background reader, latest-N buffering and
reconnection with backoff for live sources, and a clean stop."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from cvdeploy.errors import CvdeployError, InputError, SourceError


@dataclass(frozen=True)
class Frame:
    """One image from a source, with where and when it came from."""

    image: np.ndarray  # HxWx3 BGR uint8
    source: str  # the source's name: a path, a URL (password hidden) or "webcam:0"
    index: int  # the frame's position in its source, counted before vid_stride (0 for a still image)
    timestamp: float | None  # seconds: a video's presentation time; a live source's arrival time since it was opened
    fps: float | None  # the source's frame rate, when it declares one
    kind: str  # "image", "video", "stream" or "webcam"
    read_ms: float = 0.0  # the time spent reading and decoding this frame (live: decoding, not waiting for it)

    @property
    def name(self) -> str:
        """How results name this frame: the path for a still image, else `SOURCE#frame=INDEX`."""
        return self.source if self.kind == "image" else f"{self.source}#frame={self.index}"


@dataclass
class SourceStats:
    """What the reader did: frames read (before vid_stride), frames dropped from the buffer because the consumer was
    slower than a live source, frames that could not be decoded, and reconnections after a drop."""

    read: int = 0
    dropped: int = 0
    bad: int = 0
    reconnects: int = 0


@dataclass
class _State:
    buf: collections.deque[Frame] = field(default_factory=collections.deque)
    done: bool = False
    error: CvdeployError | None = None
    index: int = 0  # the next frame's index, kept across reconnections


class Source:
    """Frames from one place, in order: an iterator of `Frame`s and a context manager (`close` stops its reader).

    `read(n)` returns up to n frames (at least one, waiting for it) and [] at the end. A finite source (a file) is read
    in order without dropping a frame, a few frames ahead in a background thread. A live source (a stream, a webcam) is
    read in a background thread as fast as it sends; only the latest `buffer` frames are kept, so that a slow model
    sees recent frames rather than a growing backlog. A live source that drops is reconnected with exponential backoff,
    up to `reconnect` attempts in a row; the end of a file is just its end.

    Subclasses implement `_connect`, `_grab` (advance one frame: False at the end or on a drop), `_retrieve` (decode
    the grabbed frame), `_timestamp` and `_disconnect`; all of them run in the reader thread only, so a capture object
    is never touched from two threads.
    """

    kind = "video"
    live = False

    def __init__(self, name: str, *, vid_stride: int = 1, buffer: int | None = None, reconnect: int = 5,
                 timeout: float = 10.0, backoff: float = 0.5) -> None:
        if not isinstance(vid_stride, int) or vid_stride < 1:
            raise InputError(f"vid_stride must be an integer >= 1, got {vid_stride!r}")
        if buffer is not None and (not isinstance(buffer, int) or buffer < 1):
            raise InputError(f"buffer must be an integer >= 1, got {buffer!r}")
        if not isinstance(reconnect, int) or reconnect < 0:
            raise InputError(f"reconnect must be an integer >= 0, got {reconnect!r}")
        if not timeout > 0:
            raise InputError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.name = name
        self.vid_stride = vid_stride
        # Live: keep the latest `buffer` frames. Files: read this many frames ahead.
        self.buffer = buffer or (1 if self.live else 4)
        self.reconnect = reconnect
        self.timeout = timeout
        self.backoff = backoff
        self.fps: float | None = None
        self.total: int | None = None  # frames this source will yield (after vid_stride), when known
        self.size: tuple[int, int] | None = None  # (width, height), when known
        self.stats = SourceStats()
        self._state = _State()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._opened_at = time.monotonic()

    # -- what subclasses provide (called in the reader thread) ----------------------------------------------------------

    def _connect(self) -> None:
        """Open (or reopen) the source; raise SourceError when it cannot be. May set fps, total and size."""

    def _grab(self) -> bool:
        """Advance to the next frame without decoding it; False at the end of a file or when a live source drops."""
        raise NotImplementedError

    def _retrieve(self) -> np.ndarray | None:
        """Decode the grabbed frame (BGR uint8), or None when it cannot be decoded (counted, skipped)."""
        raise NotImplementedError

    def _timestamp(self, index: int) -> float | None:
        return time.monotonic() - self._opened_at if self.live else None

    def _disconnect(self) -> None:
        """Release what `_connect` opened; called once per connection, also after a failure."""

    # -- the reader -----------------------------------------------------------------------------------------------------

    def start(self) -> Source:
        """Start the reader and wait (at most `timeout` seconds) for the first frame; raise SourceError when none comes."""
        if self._thread is not None:
            return self
        if self._closed:
            raise SourceError(f"{self.name}: this source was closed")
        self._opened_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"cvdeploy-source {self.name}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.timeout
        try:
            with self._cond:
                while not self._state.buf and not self._state.done:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(min(left, 0.25))
                state = self._state
                started = bool(state.buf) or state.done
                error = state.error if not state.buf else None
                empty = state.done and not state.buf and error is None
        except BaseException:  # Ctrl-C while waiting: nobody else holds this source to close it
            self.close()
            raise
        if not started:
            self.close()
            raise SourceError(f"{self.name}: no frame within {self.timeout:g} s (is the {self.kind} running and reachable?)")
        if error is not None:
            self.close()
            raise error
        if empty:
            self.close()
            raise SourceError(f"{self.kind} {self.name} has no decodable frames")
        return self

    def _run(self) -> None:
        error: CvdeployError | None = None
        try:
            self._connect()
        except CvdeployError as e:
            self._disconnect()
            self._finish(e)
            return
        except Exception as e:  # a capture library failing in its own way: one line for the user, not a traceback
            self._disconnect()
            self._finish(SourceError(f"{self.name}: cannot open: {_reason(e)}"))
            return
        attempts = 0
        while True:
            got = self._pump()
            self._disconnect()
            if self._stop.is_set() or not self.live:
                break
            attempts = 0 if got else attempts
            error = self._reconnect(attempts)
            if error is not None or self._stop.is_set():
                break
            attempts = 0
        self._finish(error)

    def _reconnect(self, attempts: int) -> CvdeployError | None:
        """After a drop: retry with exponential backoff; None once connected again (or stopped), else the final error."""
        last = ""
        while attempts < self.reconnect:
            attempts += 1
            if self._stop.wait(min(self.backoff * 2 ** (attempts - 1), 30.0)):
                return None
            try:
                self._connect()
            except Exception as e:  # CvdeployError or the capture library's own: both mean "not back yet"
                self._disconnect()
                last = f": {_reason(e)}"
                continue
            self.stats.reconnects += 1
            return None
        return SourceError(f"{self.kind} {self.name} dropped and did not come back after {self.reconnect} "
                           f"reconnection attempt(s){last}")

    def _pump(self) -> int:
        """Read frames from the current connection into the buffer until it ends, drops or the source is stopped."""
        got = 0
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                more = self._grab()
            except Exception:  # a live source that fails mid-read has dropped; a file has ended
                more = False
            if not more:
                break
            index = self._state.index
            self._state.index += 1
            self.stats.read += 1
            got += 1
            if index % self.vid_stride:
                continue
            if self.live:  # a live source's grab waits for the frame to arrive: that wait is not reading time
                t0 = time.perf_counter()
            try:
                image = self._retrieve()
            except Exception:
                image = None
            if image is None:
                self.stats.bad += 1
                continue
            if self.size is None:
                self.size = (image.shape[1], image.shape[0])
            frame = Frame(image, self.name, index, self._timestamp(index), self.fps, self.kind,
                          (time.perf_counter() - t0) * 1000.0)
            self._put(frame)
        return got

    def _put(self, frame: Frame) -> None:
        with self._cond:
            buf = self._state.buf
            if self.live:
                if len(buf) >= self.buffer:  # a slow consumer: keep the latest frames, not a backlog
                    buf.popleft()
                    self.stats.dropped += 1
            else:
                while len(buf) >= self.buffer and not self._stop.is_set():
                    self._cond.wait(0.25)
            buf.append(frame)
            self._cond.notify_all()

    def _finish(self, error: CvdeployError | None) -> None:
        with self._cond:
            self._state.done = True
            self._state.error = error
            self._cond.notify_all()

    # -- the consumer side ----------------------------------------------------------------------------------------------

    def read(self, n: int = 1) -> list[Frame]:
        """Up to `n` frames, in order (waiting for the first); [] at the end. Raises the source's error (a live source
        that dropped for good) once its last frames have been read."""
        if self._closed:
            return []
        if self._thread is None:
            self.start()
        with self._cond:
            state = self._state
            while not state.buf and not state.done and not self._stop.is_set():
                self._cond.wait(0.25)
            if not state.buf:
                error, state.error = state.error, None
                if error is not None:
                    raise error
                return []
            frames = [state.buf.popleft() for _ in range(min(n, len(state.buf)))]
            self._cond.notify_all()
            return frames

    def __iter__(self) -> Iterator[Frame]:
        while frames := self.read(1):
            yield from frames

    def close(self) -> None:
        """Stop the reader and release the source (the capture is released in the reader thread)."""
        self._closed = True
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # A read blocked in a socket or a capture returns within its own timeout.
            thread.join(self.timeout + 5.0)

    @property
    def alive(self) -> bool:
        """Whether the reader thread is still running."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Source:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
