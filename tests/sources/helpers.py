"""Test media, made by the tests: a video of moving shapes, and a real HTTP server on 127.0.0.1 that serves an image, a
404, a non-image page, a slow answer, a video and an MJPEG stream (multipart/x-mixed-replace) that can drop once.

Loaded by path (tests/cli uses it too), so it imports nothing from the test packages.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np

from cvdeploy.demo.shapes import ShapesConfig, iter_scenes

FRAME_W, FRAME_H = 320, 240


def moving_shapes(n: int, *, seed: int = 7) -> list[np.ndarray]:
    """`n` frames of 320x240: a window sliding over shapes scenes, 50 frames a scene, so that the shapes move."""
    per_scene = 50
    config = ShapesConfig(min_side=300, max_side=300, min_aspect=4 / 3, max_aspect=4 / 3, min_objects=3)
    scenes = [s.image for s in iter_scenes(seed, "test", (n + per_scene - 1) // per_scene, config)]
    frames = []
    for i in range(n):
        scene = scenes[i // per_scene]
        k = i % per_scene
        x, y = round(k * (scene.shape[1] - FRAME_W) / per_scene), round(k * (scene.shape[0] - FRAME_H) / per_scene)
        frames.append(np.ascontiguousarray(scene[y : y + FRAME_H, x : x + FRAME_W]))
    return frames


def write_video(path: Path, frames: list[np.ndarray], *, fourcc: str = "mp4v", fps: float = 25.0) -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened(), f"this OpenCV cannot write {fourcc} to {path.suffix}"
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame of a video, decoded by OpenCV directly (what the sources' results are compared with)."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return buf.tobytes()


@dataclass
class ServerState:
    frames: list[bytes]  # the MJPEG stream's JPEG parts, sent in a loop
    image: bytes = b""
    video: bytes = b""
    drop_after: int | None = None  # the first /stream connection is closed after this many frames
    only_once: bool = False  # /stream answers 404 after its first connection (a camera that went away)
    interval: float = 0.02  # seconds between two MJPEG parts
    slow: float = 5.0  # how long /slow waits before answering
    max_frames: int = 3000  # per connection: every loop here is bounded
    connections: int = 0
    sent: int = 0
    active: int = 0  # /stream handlers running now
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    progress: threading.Condition = field(default_factory=threading.Condition)

    def wait_sent(self, n: int, timeout: float = 60.0) -> None:
        """Block until `n` MJPEG parts have been sent in all (a bounded wait, not a timing assertion)."""
        with self.progress:
            assert self.progress.wait_for(lambda: self.sent >= n, timeout), f"only {self.sent} of {n} parts sent"

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """True once no /stream handler is running (the client went away and the server noticed)."""
        with self.progress:
            return self.progress.wait_for(lambda: self.active == 0, timeout)


class _Handler(BaseHTTPRequestHandler):
    state: ServerState
    protocol_version = "HTTP/1.0"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that gave up (a timeout test)
            self.wfile.write(body)

    def do_GET(self) -> None:
        s = self.state
        path = self.path.split("?")[0]
        if path == "/image.jpg":
            self._send(200, "image/jpeg", s.image)
        elif path == "/image.bin":
            self._send(200, "application/octet-stream", s.image)
        elif path == "/page":
            self._send(200, "text/html; charset=utf-8", b"<html><body>not an image</body></html>")
        elif path == "/slow":
            s.stop.wait(s.slow)
            self._send(200, "image/jpeg", s.image)
        elif path == "/video.avi":
            self._send(200, "video/x-msvideo", s.video)
        elif path in ("/stream", "/stream-nolength"):
            self._stream(with_length=path == "/stream")
        elif path == "/stream-silent":  # the headers of a stream, then nothing: a stream that never starts
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            s.stop.wait(s.slow)
        else:
            self._send(404, "text/plain", b"not found")

    def _stream(self, *, with_length: bool) -> None:
        s = self.state
        with s.lock:
            s.connections += 1
            first = s.connections == 1
        if s.only_once and not first:
            self._send(404, "text/plain", b"gone")
            return
        with s.progress:
            s.active += 1
        try:
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            limit = s.drop_after if first and s.drop_after is not None else s.max_frames
            for i in range(limit):
                if s.stop.is_set():
                    break
                part = s.frames[i % len(s.frames)]
                head = b"--frame\r\nContent-Type: image/jpeg\r\n"
                if with_length:
                    head += f"Content-Length: {len(part)}\r\n".encode()
                self.wfile.write(head + b"\r\n" + part + b"\r\n")
                self.wfile.flush()
                with s.progress:
                    s.sent += 1
                    s.progress.notify_all()
                if s.stop.wait(s.interval):
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away: what a clean stop looks like from here
        finally:
            self.close_connection = True
            with s.progress:
                s.active -= 1
                s.progress.notify_all()


class MediaServer:
    """A ThreadingHTTPServer on 127.0.0.1 (ephemeral port) in a thread; a context manager."""

    def __init__(self, state: ServerState) -> None:
        handler = type("Handler", (_Handler,), {"state": state})
        self.state = state
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> MediaServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.state.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)


def source_threads() -> list[threading.Thread]:
    """The sources' reader threads still alive."""
    return [t for t in threading.enumerate() if t.name.startswith("cvdeploy-source")]


def wait_no_source_threads(timeout: float = 10.0) -> list[threading.Thread]:
    deadline = time.monotonic() + timeout
    while (alive := source_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive
