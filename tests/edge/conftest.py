"""Bundles with edge variants, exported once per session from the demo model (slow: Ultralytics exports them from torch)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

# Ultralytics' exporters pip-install what they miss unless told not to: a test must never fetch anything.
os.environ.setdefault("YOLO_AUTOINSTALL", "false")


def _edge_bundle(tmp: Path, demo_bundle: Path, demo_pt: Path, data: Path, names: list[str], **options: Any) -> tuple[Path, list]:
    from cvdeploy.build.edge import add_edge_variants

    out = tmp / "edge.cvd"
    shutil.copytree(demo_bundle, out)
    outcomes = add_edge_variants(out, names, source=demo_pt, data=data / "data.yaml", **options)
    return out, outcomes


@pytest.fixture(scope="session")
def ncnn_bundle(tmp_path_factory: pytest.TempPathFactory, demo_bundle: Path, demo_pt: Path, shapes_data: Path) -> tuple[Path, list]:
    """The demo bundle with ncnn-fp32 and ncnn-fp16, verified on the 60 shapes images; (path, outcomes)."""
    return _edge_bundle(tmp_path_factory.mktemp("ncnn"), demo_bundle, demo_pt, shapes_data, ["ncnn-fp32", "ncnn-fp16"])


def _needs_litert_build() -> None:
    """The LiteRT converter stack is installed apart (pip --no-deps, docs/edge.md): without it these tests say so."""
    import importlib.util

    missing = [m for m in ("litert_torch", "ai_edge_quantizer", "ai_edge_litert") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"LiteRT export needs {', '.join(missing)} (docs/edge.md: the --no-deps install of the converter stack)")


@pytest.fixture(scope="session")
def litert_bundle(tmp_path_factory: pytest.TempPathFactory, demo_bundle: Path, demo_pt: Path, shapes_data: Path) -> tuple[Path, list]:
    """The demo bundle with litert-fp32; (path, outcomes)."""
    _needs_litert_build()
    return _edge_bundle(tmp_path_factory.mktemp("litert"), demo_bundle, demo_pt, shapes_data, ["litert-fp32"])


@pytest.fixture(scope="session")
def litert_int8_bundle(tmp_path_factory: pytest.TempPathFactory, demo_bundle: Path, demo_pt: Path,
                       shapes_data: Path) -> tuple[Path, list]:
    """The demo bundle with litert-int8 under the default budget (2.0 points of mAP50-95); (path, outcomes)."""
    _needs_litert_build()
    return _edge_bundle(tmp_path_factory.mktemp("litert8"), demo_bundle, demo_pt, shapes_data, ["litert-int8"])
