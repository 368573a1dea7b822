"""Versions of a model for the registry tests: copies of the demo bundle whose manifests are changed through the real
writer (`Bundle.save_manifest`), so each copy is a distinct bundle that verifies."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cvdeploy.bundle.bundle import Bundle

MakeVersion = Callable[..., Path]


@pytest.fixture
def make_version(demo_bundle: Path, tmp_path: Path) -> MakeVersion:
    """make_version(name, conf=..., names=..., metrics={variant: {...}}, edit=callable(manifest)) -> a new bundle dir."""

    def make(name: str, *, conf: float | None = None, names: dict[int, str] | None = None,
             metrics: dict[str, dict[str, float]] | None = None, edit: Callable[[Any], None] | None = None) -> Path:
        out = tmp_path / f"{name}.cvd"
        shutil.copytree(demo_bundle, out)
        b = Bundle.load(out)
        if conf is not None:
            b.manifest.postprocess.conf = conf
        if names is not None:
            b.manifest.names = names
        for variant, values in (metrics or {}).items():
            b.manifest.variants[variant].metrics.update(values)
        if edit is not None:
            edit(b.manifest)
        b.save_manifest()
        return out

    return make
