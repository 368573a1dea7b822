"""Fixtures of the sources tests: a test-made video, a real HTTP media server on 127.0.0.1, the demo Predictor."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest


def load_helpers() -> ModuleType:
    """tests/sources/helpers.py as a module (test folders are not packages here; tests/cli loads it the same way)."""
    name = "cvdeploy_tests_sources_helpers"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("helpers.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def helpers() -> ModuleType:
    return load_helpers()


@pytest.fixture(scope="session")
def frames(helpers: ModuleType) -> list:
    return helpers.moving_shapes(300)


@pytest.fixture(scope="session")
def video(helpers: ModuleType, frames: list, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300-frame, 25 fps, 320x240 MPEG-4 (mp4v) video of moving shapes."""
    return helpers.write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames)


@pytest.fixture
def server(helpers: ModuleType, frames: list, video: Path) -> Iterator:
    """A fresh media server per test (its counters start at zero); the MJPEG stream loops over 40 frames."""
    avi = helpers.write_video(video.with_name("served.avi"), frames[:30], fourcc="MJPG")
    state = helpers.ServerState(frames=[helpers.jpeg(f) for f in frames[:40]], image=helpers.jpeg(frames[0]),
                                video=avi.read_bytes())
    with helpers.MediaServer(state) as srv:
        yield srv
    assert helpers.wait_no_source_threads() == [], "a source's reader thread outlived its test"


@pytest.fixture(scope="session")
def predictor(demo_bundle: Path) -> Iterator:
    from cvdeploy.predict import Predictor

    with Predictor(demo_bundle) as p:
        yield p
