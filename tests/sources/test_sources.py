"""Reading sources for real: files, directories and globs, a test-made video, URLs and an MJPEG stream served on
127.0.0.1, an RTSP server when one is installed, a webcam index that does not exist."""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest

from cvdeploy.errors import InputError
from cvdeploy.sources import SourceError, open_source, resolve_sources
from cvdeploy.vision.image import load_image


def one_line(e: pytest.ExceptionInfo[BaseException], *needles: str) -> str:
    text = str(e.value)
    assert "\n" not in text and text, text
    for n in needles:
        assert n in text, text
    return text


def wait_for(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll a condition (a counter another thread moves), bounded; not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# -- what a source string names ------------------------------------------------------------------------------------------


def test_files_directories_and_globs(tmp_path: Path, frames: list, helpers: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "imgs" / "a.jpg"), frames[0])
    cv2.imwrite(str(tmp_path / "imgs" / "sub" / "b.png"), frames[1])
    helpers.write_video(tmp_path / "imgs" / "c.avi", frames[:3], fourcc="MJPG")
    (tmp_path / "imgs" / "notes.txt").write_text("not media")

    specs = resolve_sources(["imgs"])
    assert [(s.kind, Path(s.name).name) for s in specs] == [("image", "a.jpg"), ("video", "c.avi"), ("image", "b.png")]
    assert [s.name for s in resolve_sources(["imgs/*.jpg"])] == ["imgs/a.jpg"]
    assert [s.name for s in resolve_sources(["imgs/**/*.png"])] == ["imgs/sub/b.png"]  # ** recurses
    assert len(resolve_sources(["imgs/**/*"])) == 3  # media only: notes.txt is not a source
    with pytest.raises(InputError) as e:
        resolve_sources(["imgs/*.txt"])
    one_line(e, "1 path(s) match imgs/*.txt, none an image or a video")
    with pytest.raises(InputError) as e:
        resolve_sources(["imgs/*.heic"])
    one_line(e, "no files match imgs/*.heic")
    with pytest.raises(InputError) as e:
        resolve_sources(["imgs/missing.mp4"])
    one_line(e, "video not found", "missing.mp4")
    with pytest.raises(InputError) as e:
        resolve_sources(["missing.jpg"])
    one_line(e, "image not found", "missing.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError) as e:
        resolve_sources([empty])
    one_line(e, "no image files", ".mp4")

    # A video with a suffix that says nothing is recognised by its bytes; other unknown files are tried as images.
    (tmp_path / "clip.bin").write_bytes((tmp_path / "imgs" / "c.avi").read_bytes())
    (tmp_path / "x.dat").write_text("hello")
    assert [s.kind for s in resolve_sources(["clip.bin", "x.dat"])] == ["video", "image"]


def test_urls_streams_and_webcam_indices() -> None:
    specs = resolve_sources(["rtsp://admin:s3cret@127.0.0.1:8554/live", "http://127.0.0.1/x.jpg", "0", 2])
    assert [(s.kind, s.target) for s in specs[2:]] == [("webcam", 0), ("webcam", 2)]
    assert specs[0].kind == "stream" and specs[0].name == "rtsp://admin:***@127.0.0.1:8554/live"  # no password in names
    assert specs[1].kind == "url"
    for bad, needle in (("ftp://127.0.0.1/a.jpg", "unsupported URL scheme ftp://"), (-1, "webcam index")):
        with pytest.raises(InputError) as e:
            resolve_sources([bad])
        one_line(e, needle)


def test_a_webcam_that_does_not_exist_is_one_line() -> None:
    for index in (99, "99"):
        with pytest.raises(SourceError) as e:
            open_source(index)
        one_line(e, "webcam 99 could not be opened")


# -- video files ---------------------------------------------------------------------------------------------------------


def test_a_video_is_read_in_order_with_its_metadata(video: Path, helpers: ModuleType) -> None:
    expected = helpers.decode_all(video)
    assert len(expected) == 300
    with open_source(video, buffer=2) as src:  # a consumer slower than the reader: a file still loses no frame
        assert (src.kind, src.live, src.fps, src.total, src.size) == ("video", False, 25.0, 300, (320, 240))
        got = list(src)
        assert src.stats.dropped == 0 and src.stats.read == 300
    assert [f.index for f in got] == list(range(300))
    assert all(np.array_equal(f.image, e) for f, e in zip(got, expected, strict=True))
    assert [f.timestamp for f in got] == pytest.approx([i / 25 for i in range(300)], abs=1e-6)
    assert got[12].name == f"{video}#frame=12" and got[0].fps == 25.0 and got[0].kind == "video"


def test_vid_stride_keeps_every_nth_frame(video: Path, helpers: ModuleType) -> None:
    expected = helpers.decode_all(video)
    with open_source(str(video), vid_stride=7) as src:
        assert src.total == math.ceil(300 / 7)
        got = list(src)
    assert [f.index for f in got] == list(range(0, 300, 7))
    assert all(np.array_equal(f.image, expected[f.index]) for f in got)
    with pytest.raises(InputError, match="vid_stride"):
        open_source(video, vid_stride=0)


def test_videos_that_cannot_be_read(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(SourceError) as e:
        open_source(junk)
    one_line(e, "cannot open video", "junk.mp4")
    empty = tmp_path / "empty.avi"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48)).release()  # a valid file of 0 frames
    with pytest.raises(SourceError) as e:
        open_source(empty)
    one_line(e, "has no decodable frames", "empty.avi")


# -- http(s) URLs --------------------------------------------------------------------------------------------------------


def test_image_urls(server) -> None:  # type: ignore[no-untyped-def]
    expected = load_image(server.state.image)
    for path in ("/image.jpg", "/image.bin"):  # image/jpeg, and application/octet-stream told apart by its bytes
        with open_source(server.url + path) as src:
            (frame,) = list(src)
        assert src.kind == "image" and frame.name == server.url + path and frame.index == 0
        assert np.array_equal(frame.image, expected)


def test_bad_urls_give_one_line_errors(server) -> None:  # type: ignore[no-untyped-def]
    url = server.url
    with pytest.raises(SourceError) as e:
        open_source(url + "/missing.jpg")
    one_line(e, "/missing.jpg: the server answered 404 Not Found")
    with pytest.raises(SourceError) as e:
        open_source(url + "/page")
    one_line(e, "is text/html, not an image, a video or an MJPEG stream")
    with pytest.raises(SourceError) as e:
        open_source(url + "/slow", timeout=0.5)
    one_line(e, "/slow: no answer within 0.5 s")
    with pytest.raises(SourceError) as e:
        open_source(url + "/image.jpg", max_bytes=1000)
    one_line(e, f"{len(server.state.image)} bytes exceeds the limit of 1000 bytes")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(SourceError) as e:
        open_source(f"http://127.0.0.1:{closed}/x.jpg")
    one_line(e, "cannot connect")


def test_a_video_url_is_read_by_opencv(server) -> None:  # type: ignore[no-untyped-def]
    with open_source(server.url + "/video.avi") as src:
        assert src.kind == "video" and not src.live
        assert [f.index for f in src] == list(range(30))


# -- an MJPEG stream -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/stream", "/stream-nolength"])
def test_mjpeg_frames_are_the_served_jpegs(server, path: str) -> None:  # type: ignore[no-untyped-def]
    parts = server.state.frames
    src = open_source(server.url + path, buffer=50)
    try:
        assert (src.kind, src.live) == ("stream", True)
        got = [f for _, f in zip(range(12), src, strict=False)]
    finally:
        src.close()
    indices = [f.index for f in got]
    assert indices == sorted(indices) and len(set(indices)) == 12
    for f in got:  # decoded as the same JPEG read from a file would be
        assert np.array_equal(f.image, load_image(parts[f.index % len(parts)]))
        assert f.name == f"{server.url}{path}#frame={f.index}" and f.timestamp is not None
    assert not src.alive
    assert server.state.wait_idle(), "the server still streams to a closed source"


def test_a_slow_consumer_gets_the_latest_frame_not_a_backlog(server) -> None:  # type: ignore[no-untyped-def]
    with open_source(server.url + "/stream", buffer=1) as src:
        src.read()
        target = src.stats.read + 15
        server.state.wait_sent(target)
        # `read` counts a frame when it is grabbed, before it is decoded and buffered: once the next one is counted,
        # frame `target - 1` is in the buffer (waiting for `read >= target` raced with that decode under load)
        wait_for(lambda: src.stats.read > target)
        (frame,) = src.read(5)  # one frame waits, however many were sent meanwhile
        assert frame.index >= target - 1 and src.stats.dropped >= 13


def test_a_dropped_stream_reconnects(server) -> None:  # type: ignore[no-untyped-def]
    server.state.drop_after = 5  # the server closes the first connection after 5 frames
    src = open_source(server.url + "/stream", buffer=100, backoff=0.05)
    try:
        seen = []
        for f in src:
            seen.append(f.index)
            if f.index >= 12:
                break
        assert src.stats.reconnects == 1 and server.state.connections == 2
        assert seen == sorted(seen) and seen[-1] >= 12  # indices go on across the reconnection
    finally:
        src.close()
    assert not src.alive


def test_a_stream_that_does_not_come_back_ends_with_one_line(server) -> None:  # type: ignore[no-untyped-def]
    server.state.drop_after, server.state.only_once = 5, True
    src = open_source(server.url + "/stream", buffer=100, reconnect=2, backoff=0.05)
    got = []
    with pytest.raises(SourceError) as e:
        for f in src:
            got.append(f.index)
    one_line(e, "dropped and did not come back after 2 reconnection attempt(s)", "404")
    assert got == [0, 1, 2, 3, 4] and server.state.connections == 3
    src.close()


def test_a_stream_that_never_starts_is_a_bounded_wait(server) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SourceError) as e:
        open_source(server.url + "/stream-silent", timeout=0.5)
    one_line(e, "no frame within 0.5 s")
    listener = socket.socket()  # an RTSP address that accepts connections and never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    try:
        with pytest.raises(SourceError) as e:
            open_source(f"rtsp://127.0.0.1:{listener.getsockname()[1]}/live", timeout=1)
        one_line(e, "within 1 s")
    finally:
        listener.close()


# -- RTSP, with a real RTSP server when one is installed --------------------------------------------------------------------


@pytest.fixture
def rtsp_url(helpers: ModuleType, frames: list, tmp_path: Path):  # type: ignore[no-untyped-def]
    """An H.264 file (PyAV's libx264) served by aio-rtsp-toolkit's RTSP/TCP server on 127.0.0.1, played once per
    connection."""
    server = pytest.importorskip("aio_rtsp_toolkit.server", reason="no RTSP server installed (pip install aio-rtsp-toolkit)")
    av = pytest.importorskip("av")
    import asyncio
    import threading

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.options = {"g": "10", "tune": "zerolatency"}
        for f in frames[:30]:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="bgr24")))
        out.mux(stream.encode())

    class Quiet:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return lambda *a, **k: None

    server.logger = Quiet()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    rtsp = server.RtspServer(str(tmp_path), "127.0.0.1", port)
    rtsp.logger = Quiet()
    thread = threading.Thread(target=lambda: (loop.run_until_complete(rtsp.start()), loop.run_forever()), daemon=True)
    thread.start()
    wait_for(lambda: rtsp._server is not None)
    yield f"rtsp://127.0.0.1:{port}/clip.mp4"
    asyncio.run_coroutine_threadsafe(rtsp.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_rtsp_stream_reads_reconnects_and_stops(rtsp_url: str, helpers: ModuleType) -> None:
    src = open_source(rtsp_url, buffer=100, backoff=0.05, timeout=5)
    try:
        assert (src.kind, src.live, src.fps, src.size) == ("stream", True, 25.0, (320, 240))
        seen = []
        for f in src:  # the server plays the 30-frame file once per connection: frame 40 needs a reconnection
            seen.append(f.index)
            if f.index >= 40:
                break
        assert src.stats.reconnects >= 1 and seen == sorted(seen)
    finally:
        src.close()
    assert not src.alive and helpers.wait_no_source_threads() == []
