"""The build's data profile: a build with a controlled set writes profile.json, lists its sha256, and it is the baseline
a profile of the same images is compared with (no drift)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cvdeploy.build.profile_step import MAX_PROFILE_IMAGES, PROFILE_FILE, profile_sources, read_profile, write_profile
from cvdeploy.build.variants import add_variants
from cvdeploy.bundle.bundle import Bundle, sha256_file
from cvdeploy.diagnose.profile import DataProfile, compare, profile_images
from cvdeploy.errors import BundleError, InputError
from cvdeploy.evaluate.coco import load_yolo_split
from cvdeploy.predict import Predictor

N_VAL = 60  # the shapes_data fixture's val split


@pytest.fixture(scope="module")
def built(demo_bundle: Path, shapes_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    """The demo bundle through the build's variant step with a controlled set, as `cvdeploy build --data` runs it."""
    b = tmp_path_factory.mktemp("profiled") / "p.cvd"
    shutil.copytree(demo_bundle, b)
    steps: list[tuple[str, str]] = []
    add_variants(b, ["onnx-fp32"], data=shapes_data / "data.yaml", on_step=lambda v, s: steps.append((v, s)))
    return b, steps


def test_a_build_with_a_controlled_set_writes_its_profile_and_lists_its_hash(built: tuple[Path, list[tuple[str, str]]]) -> None:
    b, steps = built
    assert ("onnx-fp32", "data profile") in steps
    bundle = Bundle.load(b)  # every hash holds, the profile's included
    info = bundle.manifest.profile
    assert info is not None and info.file == PROFILE_FILE and (b / PROFILE_FILE).is_file()
    assert info.sha256 == sha256_file(b / PROFILE_FILE)
    assert info.images == N_VAL and info.variant == "onnx-fp32" and f"all {N_VAL} images" in info.source
    raw = json.loads((b / "manifest.json").read_text())
    assert raw["profile"]["sha256"] == info.sha256  # in the manifest file itself, under its content hash
    profile = DataProfile.load(b / PROFILE_FILE)
    assert profile.images == N_VAL and profile.has_predictions
    assert profile.model is not None and profile.model["variant"] == "onnx-fp32" and profile.model["bundle"] == bundle.name
    assert profile.model["conf"] == bundle.manifest.postprocess.conf  # served thresholds, not validation ones
    assert sum(profile.categorical["boxes_per_image"].values()) == N_VAL
    assert read_profile(b) == profile


def test_the_same_images_profiled_again_do_not_drift(built: tuple[Path, list[tuple[str, str]]], shapes_data: Path) -> None:
    b, _ = built
    baseline = read_profile(b)
    assert baseline is not None
    images, _ = load_yolo_split(shapes_data / "data.yaml", "val")
    with Predictor(b, "onnx-fp32") as p:
        again = profile_images([im.path for im in images], p)
    drifts = compare(baseline, again)
    assert drifts and all(d.severity == "ok" for d in drifts), [str(d) for d in drifts if d.severity != "ok"]
    assert {d.statistic for d in drifts} >= {"brightness", "confidence", "class_mix"}  # prediction statistics compared too


def test_an_edited_or_missing_profile_is_refused_like_any_bundle_file(built: tuple[Path, list[tuple[str, str]]], tmp_path: Path) -> None:
    edited = tmp_path / "edited.cvd"
    shutil.copytree(built[0], edited)
    data = json.loads((edited / PROFILE_FILE).read_text())
    data["numeric"]["brightness"]["mean"] += 40.0  # a baseline moved to hide a drift
    (edited / PROFILE_FILE).write_text(json.dumps(data, indent=1) + "\n")
    with pytest.raises(BundleError, match=r"data profile file profile\.json does not match its sha256"):
        Bundle.load(edited)
    (edited / PROFILE_FILE).unlink()
    with pytest.raises(BundleError, match=r"data profile file profile\.json is missing"):
        Bundle.load(edited)


def test_a_build_without_a_controlled_set_has_no_profile(demo_bundle: Path) -> None:
    assert Bundle.load(demo_bundle).manifest.profile is None
    assert not (demo_bundle / PROFILE_FILE).exists()
    assert read_profile(demo_bundle) is None


def test_a_large_split_is_sampled_evenly(demo_bundle: Path, shapes_data: Path, tmp_path: Path) -> None:
    data = shapes_data / "data.yaml"
    all_paths, total = profile_sources(data)
    assert total == N_VAL and len(all_paths) == N_VAL <= MAX_PROFILE_IMAGES
    paths, _ = profile_sources(data, max_images=7)
    assert len(paths) == 7 and paths[0] == all_paths[0] and paths[-1] == all_paths[-1]
    assert paths == sorted(paths) and len(set(paths)) == 7
    b = tmp_path / "s.cvd"
    shutil.copytree(demo_bundle, b)
    bundle = Bundle.load(b)
    info = write_profile(bundle, data, max_images=7)
    bundle.save_manifest()
    assert info.images == 7 and "7 of 60 images" in info.source
    assert DataProfile.load(b / PROFILE_FILE).images == 7 and Bundle.load(b).manifest.profile == info
    with pytest.raises(InputError, match="at least 1 image"):
        profile_sources(data, max_images=0)
