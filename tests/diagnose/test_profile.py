"""Data profile and drift tests: injected drifts on the synthetic shapes data must come out on top, clean data must not."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cvdeploy.demo.shapes import ShapesConfig, generate_shapes
from cvdeploy.diagnose import PROFILE_VERSION, DataProfile, Drift, Sketch, compare, jpeg_quality, profile_images
from cvdeploy.errors import ImageDecodeError, InputError
from cvdeploy.predict import Predictor

N = 35  # images a set: enough for the tests' power, small enough for a 2-core machine


def _shapes(root: Path, seed: int, config: ShapesConfig = ShapesConfig()) -> list[Path]:
    generate_shapes(root, n_train=0, n_val=N, seed=seed, config=config)
    return sorted((root / "images" / "val").glob("*.jpg"))


def _write(images: list[np.ndarray], out: Path, quality: int = 92) -> list[Path]:
    """Field images are written as JPEG files at the generator's quality: only the injected change differs."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        path = out / f"field_{i:03d}.jpg"
        assert cv2.imwrite(str(path), im, [cv2.IMWRITE_JPEG_QUALITY, quality])
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def predictor(demo_bundle: Path) -> Predictor:
    return Predictor(demo_bundle)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The baseline (seed 11) and a clean field set of the same generator (seed 12)."""
    return {"baseline": _shapes(tmp_path_factory.mktemp("baseline"), 11), "field": _shapes(tmp_path_factory.mktemp("field"), 12)}


@pytest.fixture(scope="module")
def baseline(sets: dict[str, list[Path]], predictor: Predictor) -> DataProfile:
    return profile_images(sets["baseline"], predictor)


def _lower_contrast(im: np.ndarray) -> np.ndarray:
    # Compress the lightness (CIELAB L) towards its mean, colour (a, b) kept: a contrast change, not a haze that also
    # greys the colours out.
    lab = cv2.cvtColor(im, cv2.COLOR_BGR2LAB).astype(np.float32)
    lightness = lab[..., 0]
    lab[..., 0] = (lightness - lightness.mean()) * 0.4 + lightness.mean()
    return cv2.cvtColor(np.clip(lab, 0, 255).astype(np.uint8), cv2.COLOR_LAB2BGR)


def _crop_16_9(im: np.ndarray) -> np.ndarray:
    # A wider frame of the same scene scale: crop to 16:9 (no stretching, objects keep their size).
    h, w = im.shape[:2]
    if w / h > 16 / 9:
        nw = round(h * 16 / 9)
        return im[:, (w - nw) // 2 : (w - nw) // 2 + nw]
    nh = round(w * 9 / 16)
    return im[(h - nh) // 2 : (h - nh) // 2 + nh]


DRIFTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str, str]] = {
    # name: (injection, the statistic that must top the findings, a word of its direction)
    "darker": (lambda im: cv2.convertScaleAbs(im, alpha=0.5), "brightness", "darker"),
    "lower-contrast": (_lower_contrast, "contrast", "less contrast"),
    "blurred": (lambda im: cv2.GaussianBlur(im, (0, 0), 3), "sharpness", "blurrier"),
    "upscaled": (lambda im: cv2.resize(im, None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR), "size", "larger"),
    "wider-16:9": (_crop_16_9, "aspect", "wider"),
}


def _serious(findings: list[Drift]) -> list[Drift]:
    return [d for d in findings if d.severity == "serious"]


def test_clean_field_data_has_no_serious_finding(baseline: DataProfile, sets: dict[str, list[Path]], predictor: Predictor) -> None:
    findings = compare(baseline, profile_images(sets["field"], predictor))
    assert not _serious(findings), "\n".join(map(str, findings))
    # Every statistic is tested, image and prediction ones alike, and every one says why in one line.
    tested = {d.statistic for d in findings if d.test != "none"}
    assert {"brightness", "contrast", "sharpness", "size", "aspect", "saturation", "jpeg_quality", "mean_r", "std_b",
            "format", "exif_orientation", "boxes_per_image", "top_confidence", "confidence", "box_size", "class_mix"} <= tested  # fmt: skip
    assert all(d.message and "\n" not in d.message for d in findings)


@pytest.mark.parametrize("drift", list(DRIFTS))
def test_injected_drift_is_the_top_finding(drift: str, baseline: DataProfile, sets: dict[str, list[Path]], predictor: Predictor,
                                           tmp_path: Path) -> None:
    inject, statistic, direction = DRIFTS[drift]
    field = _write([inject(cv2.imread(str(p))) for p in sets["field"]], tmp_path)
    findings = compare(baseline, profile_images(field, predictor))
    top = findings[0]
    report = "\n".join(map(str, findings[:6]))
    assert top.statistic == statistic, report
    assert top.severity == "serious", report
    assert direction in top.message, report
    assert top.value > top.serious_threshold == top.threshold


def test_few_objects_give_a_serious_prediction_drift(baseline: DataProfile, predictor: Predictor, tmp_path: Path) -> None:
    # Same backgrounds, same generator, but objects of a few pixels: the images look alike, the model finds little.
    tiny = _shapes(tmp_path, 12, ShapesConfig(min_object_px=2.0, max_object_frac=0.01))
    field = profile_images(tiny, predictor)
    findings = {d.statistic: d for d in compare(baseline, field)}
    assert findings["boxes_per_image"].severity == "serious", findings["boxes_per_image"]
    assert "fewer objects" in findings["boxes_per_image"].message
    assert findings["top_confidence"].severity == "serious", findings["top_confidence"]
    assert "less confident" in findings["top_confidence"].message
    # The confidence histogram is kept per box: far fewer boxes in the field.
    assert sum(field.confidence_histogram or []) < sum(baseline.confidence_histogram or []) / 3
    assert findings["brightness"].severity != "serious"


def test_different_prediction_settings_are_flagged_first(baseline: DataProfile, sets: dict[str, list[Path]],
                                                         demo_bundle: Path) -> None:
    with Predictor(demo_bundle, conf=0.6) as strict:
        findings = compare(baseline, profile_images(sets["field"][:10], strict))
    assert findings[0].statistic == "model" and findings[0].severity == "warning"
    assert "conf 0.6 vs 0.25" in findings[0].message


def test_profile_json_round_trip(baseline: DataProfile, tmp_path: Path) -> None:
    path = baseline.save(tmp_path / "profile.json")
    loaded = DataProfile.load(path)
    assert loaded == baseline
    assert loaded.to_dict() == json.loads(path.read_text())
    assert loaded.numeric["brightness"].count == N and len(loaded.numeric["brightness"].quantiles) == 101
    assert sum(loaded.categorical["boxes_per_image"].values()) == N
    assert loaded.model is not None and loaded.model["conf"] == 0.25
    same = compare(baseline, loaded)
    assert all(d.severity == "ok" for d in same)
    assert all(d.value == 0 for d in same if d.test in ("ks", "wasserstein", "psi"))


def test_image_profile_without_a_model(sets: dict[str, list[Path]], tmp_path: Path) -> None:
    calls: list[int] = []
    folder = sets["field"][0].parent
    profile = profile_images(folder, on_progress=calls.append)  # a directory is walked for image files
    assert profile.images == N and sum(calls) == N and not profile.has_predictions
    assert profile.categorical["format"] == {"JPEG": N} and profile.categorical["exif_orientation"] == {"none": N}
    assert profile.numeric["jpeg_quality"].quantiles[0] == profile.numeric["jpeg_quality"].quantiles[-1] == 92
    # Arrays carry no header: their format, EXIF and quality are unknown, not "drifted".
    arrays = profile_images([cv2.imread(str(p)) for p in sets["field"]])
    findings = {d.statistic: d for d in compare(profile, arrays)}
    assert findings["format"].test == "none" and findings["jpeg_quality"].test == "none"
    assert findings["brightness"].value == 0.0
    assert "boxes_per_image" not in findings


@pytest.mark.parametrize("quality", [10, 40, 75, 92, 100])
def test_jpeg_quality_is_read_from_the_quantization_tables(quality: int) -> None:
    image = (np.random.default_rng(quality).random((48, 64, 3)) * 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    assert jpeg_quality(Image.open(io.BytesIO(buf.tobytes())).quantization) == quality
    out = io.BytesIO()
    Image.fromarray(image).save(out, "JPEG", quality=quality)
    assert jpeg_quality(Image.open(io.BytesIO(out.getvalue())).quantization) == quality
    assert jpeg_quality({}) is None


def test_exif_rotation_share(baseline: DataProfile, sets: dict[str, list[Path]]) -> None:
    rotated = []
    for p in sets["field"]:
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90° clockwise to display"
        out = io.BytesIO()
        Image.open(p).save(out, "JPEG", quality=92, exif=exif)
        rotated.append(out.getvalue())
    field = profile_images(rotated)
    assert field.categorical["exif_orientation"] == {"6": N}
    # The decoder applies the rotation: the profile sees the image as the model does, on its side.
    first = cv2.imread(str(sets["field"][0]))
    assert field.numeric["width"].count == N and first.shape[0] in field.numeric["width"].quantiles
    findings = {d.statistic: d for d in compare(baseline, field)}
    exif = findings["exif_orientation"]
    assert exif.severity == "serious" and "100% vs 0%" in exif.message and "EXIF-rotated" in exif.message
    assert findings["jpeg_quality"].severity == "ok"


def test_small_samples_are_reported_not_raised(baseline: DataProfile, sets: dict[str, list[Path]], predictor: Predictor) -> None:
    tiny = compare(baseline, profile_images(sets["field"][:3], predictor))
    assert all(d.severity == "ok" and d.test == "none" and "not tested" in d.message for d in tiny)
    few = compare(baseline, profile_images(sets["field"][:8], predictor))
    brightness = next(d for d in few if d.statistic == "brightness")
    assert brightness.test == "ks" and "small sample (8 field vs 35 baseline)" in brightness.message
    full = next(d for d in compare(baseline, baseline) if d.statistic == "brightness")
    assert brightness.serious_threshold > full.serious_threshold  # widened for 8 images


def _profile(values: np.ndarray) -> DataProfile:
    return DataProfile(images=len(values), numeric={"brightness": Sketch.of(values)}, categorical={})


def test_thresholds_scale_with_sample_size() -> None:
    rng = np.random.default_rng(0)
    # Huge samples: a shift of 0.1 std is significant but not worth a finding (the D floor of 0.15).
    big = next(d for d in compare(_profile(rng.normal(120, 20, 20_000)), _profile(rng.normal(122, 20, 20_000))) if d.statistic == "brightness")
    assert big.p_value is not None and big.p_value < 0.001 and big.severity == "ok"
    # Small samples: the same D that is serious for 2,000 images is within noise for 20.
    a, b = rng.normal(120, 20, 2_000), rng.normal(135, 20, 2_000)
    large = next(d for d in compare(_profile(a), _profile(b)) if d.statistic == "brightness")
    small = next(d for d in compare(_profile(a[:20]), _profile(b[:20])) if d.statistic == "brightness")
    assert large.severity == "serious" and "brighter" in large.message
    assert small.serious_threshold > 0.5 > large.serious_threshold


def test_sketch_tests_agree_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    from cvdeploy.diagnose.profile import _ks, _ks_p

    rng = np.random.default_rng(1)
    for n, m, shift in ((35, 35, 0.0), (35, 35, 0.8), (30, 200, 0.4), (1000, 800, 0.1)):
        a, b = rng.normal(0, 1, n), rng.normal(shift, 1, m)
        ref = stats.ks_2samp(a, b)
        d = _ks(Sketch.of(a), Sketch.of(b))
        assert d == pytest.approx(ref.statistic, abs=0.03)
        assert _ks_p(d, n * m / (n + m)) == pytest.approx(ref.pvalue, abs=0.08)
        w = next(x for x in compare(_profile_w(a), _profile_w(b)) if x.statistic == "top_confidence").value
        assert w == pytest.approx(stats.wasserstein_distance(a, b), abs=0.03 + 0.05 * stats.wasserstein_distance(a, b))


def _profile_w(values: np.ndarray) -> DataProfile:
    # top_confidence is a plain (not log) Wasserstein statistic: a vehicle to check the distance itself.
    return DataProfile(images=len(values), numeric={"top_confidence": Sketch.of(values)}, categorical={},
                       model={"bundle": "x"})  # fmt: skip


def test_errors_name_the_problem(tmp_path: Path, baseline: DataProfile) -> None:
    with pytest.raises(InputError, match="no images to profile"):
        profile_images([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found in"):
        profile_images(tmp_path / "empty")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    good = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg"):
        profile_images([good, bad])
    with pytest.raises(ImageDecodeError, match=r"image #2: not a supported image"):
        profile_images([good, b"plain text"])
    with pytest.raises(InputError, match="image not found"):
        profile_images([tmp_path / "missing.jpg"])
    with pytest.raises(InputError, match="cannot profile a int"):
        profile_images(42)  # type: ignore[arg-type]

    old = baseline.to_dict() | {"version": PROFILE_VERSION + 1}
    with pytest.raises(InputError, match="version 2 is not the version"):
        DataProfile.from_dict(old)
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(InputError, match=r"old\.json: data profile version"):
        DataProfile.load(tmp_path / "old.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read data profile"):
        DataProfile.load(tmp_path / "junk.json")
    with pytest.raises(InputError, match="malformed data profile"):
        DataProfile.from_dict({"version": PROFILE_VERSION, "images": 3})
    with pytest.raises(InputError, match="data profile not found"):
        DataProfile.load(tmp_path / "nope.json")
    stale = DataProfile(baseline.images, baseline.numeric, baseline.categorical, baseline.model, version=0)
    with pytest.raises(InputError, match="the field profile is version 0"):
        compare(baseline, stale)
