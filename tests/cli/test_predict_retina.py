"""`cvdeploy predict --retina-masks`: a segment bundle's masks decoded at the image's own size, as
`Predictor.predict(retina_masks=True)` decodes them; a model of another task notes that the flag changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cvdeploy import Predictor

pytestmark = pytest.mark.slow  # builds a bundle


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cvdeploy", *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def seg_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cvdeploy.build import build_bundle
    from cvdeploy.demo import DEMO_SEG_MODEL

    return build_bundle(DEMO_SEG_MODEL, tmp_path_factory.mktemp("retina") / "seg.cvd", imgsz=160).root  # type: ignore[return-value]


@pytest.fixture(scope="module")
def image(shapes_data: Path) -> Path:
    return sorted((shapes_data / "images" / "val").glob("*.jpg"))[0]


def _masks(doc: dict) -> list[str]:
    return [d["mask"]["counts"] for d in doc["detections"]]


def test_retina_masks_flag_reaches_the_predictor(seg_bundle: Path, image: Path) -> None:
    retina = run("predict", seg_bundle, image, "--json", "--retina-masks")
    plain = run("predict", seg_bundle, image, "--json")
    assert retina.returncode == 0 and plain.returncode == 0, retina.stderr + plain.stderr
    (r,), (q,) = json.loads(retina.stdout), json.loads(plain.stdout)
    with Predictor(seg_bundle) as p:
        want_retina, want_plain = p.predict(image, retina_masks=True).to_dict(), p.predict(image).to_dict()
    assert r["detections"] and _masks(r) == _masks(want_retina)
    assert _masks(q) == _masks(want_plain)
    assert _masks(r) != _masks(q)  # the flag changed the masks
    assert "--retina-masks" not in retina.stderr  # no note for a segment model


def test_retina_masks_flag_on_a_detect_model_is_noted_and_changes_nothing(demo_bundle: Path, image: Path) -> None:
    flagged = run("predict", demo_bundle, image, "--json", "--retina-masks")
    plain = run("predict", demo_bundle, image, "--json")
    assert flagged.returncode == 0, flagged.stderr
    assert "note: --retina-masks changes segment masks only" in flagged.stderr
    assert [d["box"] for d in json.loads(flagged.stdout)[0]["detections"]] == \
        [d["box"] for d in json.loads(plain.stdout)[0]["detections"]]
