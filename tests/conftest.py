"""Shared fixtures: the demo bundle is built once per session from the packaged demo model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics: no font, asset or hub download in tests
os.environ.setdefault("YOLO_VERBOSE", "False")


@pytest.fixture(scope="session")
def demo_pt() -> Path:
    from cvdeploy.demo import DEMO_MODEL

    assert DEMO_MODEL.is_file(), f"the packaged demo model is missing: {DEMO_MODEL}"
    return DEMO_MODEL


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory, demo_pt: Path) -> Path:
    from cvdeploy.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "demo.cvd"
    build_bundle(demo_pt, out, name="yolo11n-shapes")
    return out


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 validation images of varied sizes and aspect ratios (a seed the model never trained on)."""
    from cvdeploy.demo.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes"), n_train=0, n_val=60, seed=123).parent
