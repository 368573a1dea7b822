"""`stream(predictor, source)`: predictions as frames arrive, equal to predicting the same frames one by one."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest

from cvdeploy.errors import CvdeployError, InputError
from cvdeploy.sources import FrameResult, SourceError, open_source, stream
from cvdeploy.vision.image import load_image
from cvdeploy.vision.result import Result


@pytest.fixture(scope="module")
def reference(predictor, video: Path, helpers: ModuleType) -> list[Result]:  # type: ignore[no-untyped-def]
    """Every frame decoded by OpenCV here and predicted alone: what streaming must give."""
    return [predictor.predict(f) for f in helpers.decode_all(video)]


def assert_same(got: Result, want: Result, atol: float = 1e-3) -> None:
    g, w = got.detections, want.detections
    assert g is not None and w is not None and len(g) == len(w), (got.source, len(g or ()), len(w or ()))
    np.testing.assert_allclose(g.xyxy, w.xyxy, atol=atol)
    np.testing.assert_allclose(g.confidence, w.confidence, atol=atol)
    np.testing.assert_array_equal(g.class_id, w.class_id)
    assert got.orig_shape == want.orig_shape


def test_a_streamed_video_equals_its_frames_predicted_one_by_one(predictor, video: Path, reference: list[Result]) -> None:  # type: ignore[no-untyped-def]
    results = list(stream(predictor, video))
    assert len(results) == 300 and sum(len(r.detections) for r in reference) > 300  # frames with shapes in them
    for i, (r, want) in enumerate(zip(results, reference, strict=True)):
        assert isinstance(r, FrameResult) and isinstance(r, Result)
        assert (r.source, r.frame, r.fps) == (f"{video}#frame={i}", i, 25.0)
        assert r.timestamp == pytest.approx(i / 25, abs=1e-6)
        assert r.timings.decode > 0  # the source's read and decode, standing in for the Predictor's decode stage
        assert_same(r, want)
    d = results[12].to_dict()
    assert d["frame"] == 12 and d["timestamp_s"] == pytest.approx(0.48) and d["source"] == f"{video}#frame=12"


def test_batches_and_vid_stride(predictor, video: Path, reference: list[Result]) -> None:  # type: ignore[no-untyped-def]
    results = list(stream(predictor, str(video), batch=4, vid_stride=5, conf=0.3))
    assert [r.frame for r in results] == list(range(0, 300, 5))
    for r in results:  # a batch of same-size frames is letterboxed as one frame is: the same boxes, to float noise
        want = reference[r.frame]
        keep = want.detections.confidence >= 0.3
        assert len(r.detections) == int(keep.sum())
        np.testing.assert_allclose(r.detections.xyxy, want.detections.xyxy[keep], atol=1e-3)
    with pytest.raises(InputError, match="batch"):
        next(stream(predictor, video, batch=0))


def test_the_predictors_stream_method(predictor, video: Path, reference: list[Result]) -> None:  # type: ignore[no-untyped-def]
    for r in predictor.stream(video, vid_stride=100):
        assert_same(r, reference[r.frame])


def test_a_live_stream_is_predicted_and_stopped_by_closing_the_generator(predictor, server, helpers: ModuleType) -> None:  # type: ignore[no-untyped-def]
    parts = server.state.frames
    gen = stream(predictor, server.url + "/stream", classes=[0, 1, 2, 3, 4, 5])
    results = [next(gen) for _ in range(8)]
    assert helpers.source_threads(), "the stream's reader runs while the generator is open"
    gen.close()
    assert helpers.wait_no_source_threads() == [] and server.state.wait_idle()
    frames = [r.frame for r in results]
    assert frames == sorted(frames) and all(r.source == f"{server.url}/stream#frame={r.frame}" for r in results)
    for r in results:
        assert_same(r, predictor.predict(load_image(parts[r.frame % len(parts)])))

    with stream(predictor, server.url + "/stream") as live:  # a with block closes it
        assert isinstance(next(live), FrameResult) and helpers.source_threads()
    assert helpers.wait_no_source_threads() == []
    for r in stream(predictor, server.url + "/stream"):  # so does leaving a loop that holds the only reference
        assert r.source.startswith(server.url)
        break
    assert helpers.wait_no_source_threads() == []
    with pytest.raises(SourceError, match="404"):  # a bad source fails at the call, before any iteration
        stream(predictor, server.url + "/missing.jpg")


def test_a_directory_of_images_and_videos(predictor, tmp_path: Path, frames: list, helpers: ModuleType) -> None:  # type: ignore[no-untyped-def]
    cv2.imwrite(str(tmp_path / "a.png"), frames[0])
    helpers.write_video(tmp_path / "b.avi", frames[:5], fourcc="MJPG")
    results = list(stream(predictor, tmp_path))
    assert [r.source for r in results] == [str(tmp_path / "a.png")] + [f"{tmp_path / 'b.avi'}#frame={i}" for i in range(5)]
    assert results[0].frame is None and "frame" not in results[0].to_dict()  # a still image's dict is a plain Result's
    assert_same(results[0], predictor.predict(tmp_path / "a.png"))


def test_unreadable_images_raise_or_are_reported(predictor, tmp_path: Path, shapes_data: Path) -> None:  # type: ignore[no-untyped-def]
    for f in sorted((shapes_data / "images" / "val").glob("*.jpg"))[:2]:
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(CvdeployError, match=r"bad\.jpg"):
        list(stream(predictor, tmp_path))
    reported: list[str] = []
    results = list(stream(predictor, tmp_path, on_error=lambda name, e: reported.append(name)))
    assert len(results) == 2 and reported == [str(tmp_path / "bad.jpg")]


def test_an_open_source_stays_the_callers(predictor, video: Path) -> None:  # type: ignore[no-untyped-def]
    with open_source(video, vid_stride=150) as src:
        assert [r.frame for r in stream(predictor, src)] == [0, 150]
        assert src.read() == []  # read to its end, not closed by stream: the caller's `with` closes it
