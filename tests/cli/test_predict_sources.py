"""`cvdeploy predict` on videos, streams, globs, URLs and webcams, run as a user runs it: a real subprocess, a video
made by the test, an HTTP server on 127.0.0.1 serving images and an MJPEG stream, Ctrl-C as a real SIGINT."""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest

CLI = [sys.executable, "-m", "cvdeploy"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _helpers() -> ModuleType:
    name = "cvdeploy_tests_sources_helpers"  # the same module tests/sources/conftest.py loads
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "sources" / "helpers.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


h = _helpers()


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("CVDEPLOY_")}
    return {**e, "COLUMNS": "200", "TERM": "xterm-256color"}


def run(*args: str | Path, tty_stderr: bool = False) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess; with `tty_stderr`, stderr is a pseudo-terminal (progress bars drawn), stdout a pipe."""
    cmd = [*CLI, *map(str, args)]
    if not tty_stderr:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env())
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def pump() -> None:
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=300,
                           env=env())
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    err = ANSI.sub("", b"".join(chunks).decode("utf-8", "replace")).replace("\r\n", "\n")
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout, err)


def assert_one_line_error(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode == 1, (p.returncode, p.stderr)
    err = p.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    for n in needles:
        assert n in err, err


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return h.moving_shapes(300)


@pytest.fixture(scope="module")
def video(frames: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h.write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames)


@pytest.fixture
def server(frames: list[np.ndarray]) -> Iterator:
    state = h.ServerState(frames=[h.jpeg(f) for f in frames[:40]], image=h.jpeg(frames[0]))
    with h.MediaServer(state) as srv:
        yield srv


def test_a_video_is_predicted_frame_by_frame_saved_and_reported_with_fps(demo_bundle: Path, video: Path,
                                                                          tmp_path: Path) -> None:
    from cvdeploy.predict import Predictor

    out = tmp_path / "out"
    p = run("predict", demo_bundle, video, "--save", out, "--json", tty_stderr=True)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)  # stdout is the JSON alone, progress or not
    assert [r["frame"] for r in doc] == list(range(300))
    assert doc[25]["source"] == f"{video}#frame=25" and doc[25]["timestamp_s"] == pytest.approx(1.0)
    # The same detections as each frame, decoded by OpenCV here, predicted alone (the JSON rounds boxes to 0.01).
    with Predictor(demo_bundle) as predictor:
        for r, frame in zip(doc, h.decode_all(video), strict=True):
            want = predictor.predict(frame).detections
            assert len(r["detections"]) == len(want), r["source"]
            got = np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in r["detections"]]).reshape(-1, 4)
            np.testing.assert_allclose(got, np.round(want.xyxy, 2), atol=1e-3)
            assert [d["class_id"] for d in r["detections"]] == want.class_id.tolist()
    assert re.search(r"\d+(\.\d)? fps", p.stderr.split("300 frame(s)")[0]), p.stderr  # the live progress bar's rate
    assert re.search(r"300 frame\(s\) of 1 video\(s\)/stream\(s\) at [\d.]+ fps, \d+ detection\(s\) .*; annotated "
                     rf"videos: {re.escape(str(out))}", p.stderr), p.stderr
    saved = out / "clip.mp4"  # the same container, size, rate and number of frames
    cap = cv2.VideoCapture(str(saved))
    assert (cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (25, 320, 240)
    cap.release()
    annotated = h.decode_all(saved)
    assert len(annotated) == 300
    assert not np.array_equal(annotated[0], h.decode_all(video)[0])  # boxes were drawn


def test_vid_stride_and_the_table(demo_bundle: Path, video: Path) -> None:
    p = run("predict", demo_bundle, video, "--vid-stride", "10", "--batch", "4")
    assert p.returncode == 0, p.stderr
    assert re.search(rf"{re.escape(str(video))}\s.*│\s+320x240\s+│\s+30 frame\(s\), [\d.]+ fps: ", p.stdout), p.stdout
    assert re.search(r"^30 frame\(s\) of 1 video\(s\)/stream\(s\) at [\d.]+ fps, ", p.stdout, re.M), p.stdout


def test_globs_and_urls(demo_bundle: Path, shapes_data: Path, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    images = sorted((shapes_data / "images" / "val").glob("*.jpg"))
    pattern = str(shapes_data / "images" / "val" / "val_00000[0-2].jpg")  # quoted: the CLI expands it, not a shell
    p = run("predict", demo_bundle, pattern, f"{server.url}/image.jpg", "--json", "--save", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert [r["source"] for r in doc] == [*map(str, images[:3]), f"{server.url}/image.jpg"]
    assert "4 image(s), " in p.stderr and sorted(f.name for f in (tmp_path / "out").iterdir()) == \
        ["image.jpg", "val_000000.jpg", "val_000001.jpg", "val_000002.jpg"]
    # Among several sources, one that fails is reported and the others still run; the exit code says so.
    p = run("predict", demo_bundle, images[0], f"{server.url}/missing.jpg", "--json")
    assert p.returncode == 1 and len(json.loads(p.stdout)) == 1
    assert "error: " + f"{server.url}/missing.jpg: the server answered 404 Not Found" in p.stderr
    assert "error: 1 of 1 video, stream or URL source(s) could not be read" in p.stderr


def test_bad_sources_give_one_line_errors(demo_bundle: Path, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(run("predict", demo_bundle, f"{server.url}/missing.jpg"), "404 Not Found")
    assert_one_line_error(run("predict", demo_bundle, f"{server.url}/page"), "text/html")
    assert_one_line_error(run("predict", demo_bundle, f"{server.url}/slow", "--timeout", "0.5"), "no answer within 0.5 s")
    assert_one_line_error(run("predict", demo_bundle, "99"), "webcam 99 could not be opened")
    assert_one_line_error(run("predict", demo_bundle, str(tmp_path / "*.mp4")), "no files match")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 4096)
    assert_one_line_error(run("predict", demo_bundle, junk), "cannot open video", "junk.mp4")


def test_ctrl_c_stops_a_stream_and_still_finalises_the_video_and_the_json(demo_bundle: Path, server,  # type: ignore[no-untyped-def]
                                                                           tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    with log.open("w") as sink:  # a file: nobody has to read it while the test reads stdout
        proc = subprocess.Popen([*CLI, "predict", str(demo_bundle), f"{server.url}/stream", "--save", str(out), "--json"],
                                stdout=subprocess.PIPE, stderr=sink, text=True, env=env())
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if sum('"frame":' in x for x in lines) >= 10:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen.wait(120), "no 10 frames predicted from the stream"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    err = log.read_text()
    assert proc.returncode == 130, err
    doc = json.loads("".join(lines))  # a complete list, closed after the interruption
    n = len(doc)
    assert n >= 10 and [r["frame"] for r in doc] == sorted(r["frame"] for r in doc)
    assert "stopped by Ctrl-C" in err and re.search(rf"{n} frame\(s\) of 1 video\(s\)/stream\(s\) at [\d.]+ fps", err), err
    assert "Traceback" not in err
    video = h.decode_all(out / "stream.mp4")  # readable: the MP4 was finalised
    assert len(video) == n and video[0].shape == (240, 320, 3)  # the same frames in the JSON, the summary and the video
    assert server.state.wait_idle(), "the CLI left its connection to the stream open"


def test_a_stream_that_never_answers(demo_bundle: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    try:
        p = run("predict", demo_bundle, f"rtsp://127.0.0.1:{listener.getsockname()[1]}/live", "--timeout", "1")
    finally:
        listener.close()
    assert_one_line_error(p, "within 1 s")
