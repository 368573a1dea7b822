"""Bundle loading refuses anything incomplete or tampered with (the manifest itself included), and names the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cvdeploy.bundle import SCHEMA_VERSION, Bundle
from cvdeploy.bundle.bundle import manifest_content_hash
from cvdeploy.errors import BundleError, InputError, ModelFormatError


@pytest.fixture
def bundle_copy(demo_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.cvd"
    shutil.copytree(demo_bundle, dst)
    return dst


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _rewrite(root: Path, m: dict) -> None:
    """Write a changed manifest with a matching content hash, as a tool (not a hand edit) would: the later checks run."""
    m["content_sha256"] = manifest_content_hash(m)
    (root / "manifest.json").write_text(json.dumps(m))


def test_load_checks_and_describes_the_bundle(demo_bundle: Path) -> None:
    b = Bundle.load(demo_bundle)
    m = b.manifest
    assert m.schema_version == SCHEMA_VERSION
    assert m.task == "detect"
    assert m.names[0] == "circle" and len(m.names) == 6
    assert m.input.shape == [None, 3, None, None]  # dynamic batch and spatial dims
    assert m.preprocess.imgsz == (256, 256) and m.preprocess.pad_value == 114
    v = m.variants["onnx-fp32"]
    assert len(v.sha256) == 64 and v.size_bytes == (demo_bundle / v.file).stat().st_size
    assert len(m.golden) >= 3 and all((demo_bundle / g.file).is_file() for g in m.golden)
    env = m.environment
    assert {"numpy", "onnx", "onnxruntime", "torch", "ultralytics"} <= set(env["packages"])
    assert env["cpu"]["model"] and isinstance(env["cpu"]["flags"], list)


def test_flipped_byte_in_variant_is_refused_naming_the_file(bundle_copy: Path) -> None:
    f = bundle_copy / "variants" / "onnx-fp32.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"variants/onnx-fp32\.onnx") as e:
        Bundle.load(bundle_copy)
    assert "onnx-fp32" in str(e.value) and "sha256" in str(e.value)


def test_tampered_golden_file_is_refused(bundle_copy: Path) -> None:
    g = bundle_copy / _manifest(bundle_copy)["golden"][0]["file"]
    g.write_bytes(g.read_bytes() + b"x")
    with pytest.raises(BundleError, match=g.name):
        Bundle.load(bundle_copy)


def test_missing_variant_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "variants" / "onnx-fp32.onnx").unlink()
    with pytest.raises(BundleError, match=r"incomplete.*onnx-fp32\.onnx.*missing"):
        Bundle.load(bundle_copy)


def test_missing_or_broken_manifest(bundle_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        Bundle.load(tmp_path)
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        Bundle.load(bundle_copy)


def test_unknown_schema_and_invalid_fields(bundle_copy: Path) -> None:
    m = _manifest(bundle_copy)
    m["schema_version"] = SCHEMA_VERSION + 1
    _rewrite(bundle_copy, m)
    with pytest.raises(BundleError, match="schema_version"):
        Bundle.load(bundle_copy)
    m["schema_version"] = SCHEMA_VERSION
    m["postprocess"]["conf"] = 7
    _rewrite(bundle_copy, m)
    with pytest.raises(BundleError, match=r"postprocess\.conf"):
        Bundle.load(bundle_copy)


def test_default_variant_must_be_one_of_the_variants(bundle_copy: Path) -> None:
    m = _manifest(bundle_copy)
    m["default_variant"] = "onnx-int8"
    _rewrite(bundle_copy, m)
    with pytest.raises(BundleError, match="default_variant 'onnx-int8' is not one of the variants"):
        Bundle.load(bundle_copy)


def test_manifest_cannot_point_outside_the_bundle(bundle_copy: Path) -> None:
    m = _manifest(bundle_copy)
    m["variants"]["onnx-fp32"]["file"] = "../../etc/passwd"
    _rewrite(bundle_copy, m)
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.load(bundle_copy)


def test_plain_ultralytics_onnx_is_a_bundle(demo_bundle: Path, tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    shutil.copyfile(demo_bundle / "variants" / "onnx-fp32.onnx", onnx)
    b = Bundle.load(onnx)
    assert b.manifest.task == "detect"
    assert b.names == Bundle.load(demo_bundle).names
    assert b.manifest.preprocess.imgsz == (256, 256) and b.manifest.preprocess.stride == 32
    assert b.variant_path() == onnx


def test_bad_paths_and_formats(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        Bundle.load(tmp_path / "nope.cvd")
    weird = tmp_path / "model.tflite"
    weird.write_bytes(b"\0" * 10)
    with pytest.raises(ModelFormatError, match="unknown model format"):
        Bundle.load(weird)


def test_golden_cases_round_trip(demo_bundle: Path) -> None:
    cases = list(Bundle.load(demo_bundle).golden())
    assert cases and all(c.input.dtype.name == "float32" and c.input.ndim == 4 for c in cases)
    assert {c.input.shape[2:] for c in cases} != {(256, 256)}  # rectangular inputs are exercised too
    assert any(c.input.shape[0] == 2 for c in cases)  # and a batch
    for c in cases:
        (out,) = c.outputs.values()
        assert out.shape[0] == c.input.shape[0] and out.shape[1] == 4 + 6


# -- the manifest's own content hash ---------------------------------------------------------------


@pytest.fixture
def hashed_copy(bundle_copy: Path) -> Path:
    """The copy with its manifest written by cvdeploy (save_manifest), so it carries a content hash."""
    Bundle.load(bundle_copy).save_manifest()
    assert _manifest(bundle_copy)["content_sha256"] == manifest_content_hash(_manifest(bundle_copy))
    return bundle_copy


def _swap_channels(m: dict) -> None:
    m["preprocess"]["channel_order"] = "BGR"


def _rename_class(m: dict) -> None:
    m["names"]["0"] = "stop-sign"


def _lower_conf(m: dict) -> None:
    m["postprocess"]["conf"] = 0.01


def _shrink_imgsz(m: dict) -> None:
    m["preprocess"]["imgsz"] = [128, 128]


@pytest.mark.parametrize("edit", [_rename_class, _swap_channels, _lower_conf, _shrink_imgsz], ids=lambda f: f.__name__[1:])
def test_hand_edited_manifest_is_refused(hashed_copy: Path, edit) -> None:
    m = _manifest(hashed_copy)
    edit(m)
    (hashed_copy / "manifest.json").write_text(json.dumps(m, indent=2))  # the old content hash kept, as a hand edit does
    with pytest.raises(BundleError, match=r"manifest\.json of bundle .* was edited after it was written \(its content hash "
                                          r"does not match\): rebuild it or restore it"):
        Bundle.load(hashed_copy)
    with pytest.raises(BundleError, match="was edited"):
        Bundle.load(hashed_copy, check_hashes=False)  # skipping the file hashes does not skip the manifest's own


def test_save_manifest_rehashes_and_the_bundle_stays_loadable(hashed_copy: Path) -> None:
    b = Bundle.load(hashed_copy)
    b.manifest.postprocess.conf = 0.4
    b.save_manifest()
    again = Bundle.load(hashed_copy)
    assert again.manifest.postprocess.conf == 0.4
    assert again.manifest.content_sha256 == b.manifest.content_sha256 == manifest_content_hash(_manifest(hashed_copy))
    m = _manifest(hashed_copy)  # the hash is of the content, not the layout: key order and whitespace do not matter
    (hashed_copy / "manifest.json").write_text(json.dumps(m, sort_keys=True))
    Bundle.load(hashed_copy)


def test_manifest_written_before_the_hash_still_loads(hashed_copy: Path) -> None:
    m = _manifest(hashed_copy)
    del m["content_sha256"]
    m["postprocess"]["conf"] = 0.3
    (hashed_copy / "manifest.json").write_text(json.dumps(m))
    assert Bundle.load(hashed_copy).manifest.postprocess.conf == 0.3


def test_invalid_content_hash_and_duplicate_keys_are_refused(hashed_copy: Path) -> None:
    m = _manifest(hashed_copy)
    m["content_sha256"] = 12
    (hashed_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="was edited"):
        Bundle.load(hashed_copy)
    text = json.dumps({**m, "content_sha256": None})  # no hash: only the duplicate key is wrong
    # A key given twice: readers disagree on which value counts, so the hash could not say what was checked.
    (hashed_copy / "manifest.json").write_text(text[:-1] + ', "name": "other"}')
    with pytest.raises(BundleError, match=r"not valid JSON \(key 'name' appears twice"):
        Bundle.load(hashed_copy)


def test_a_fresh_build_records_its_content_hash(demo_bundle: Path) -> None:
    m = _manifest(demo_bundle)
    assert m.get("content_sha256") == manifest_content_hash(m)
