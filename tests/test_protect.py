"""Protected bundles: identical results with the key, refused without it, after any tampering, or with swapped metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cvdeploy import Predictor
from cvdeploy.bundle.bundle import Bundle
from cvdeploy.errors import BundleError, InputError
from cvdeploy.security.protect import load_key, new_key_file, obfuscate_onnx, parse_key, protect_bundle


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return new_key_file(tmp_path_factory.mktemp("keys") / "model.key")


@pytest.fixture(scope="module")
def protected(demo_bundle: Path, key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return protect_bundle(demo_bundle, tmp_path_factory.mktemp("p") / "p.cvd", load_key(key_file), obfuscate=True)


def test_protected_bundle_predicts_exactly_like_the_plain_one(demo_bundle: Path, protected: Path, key_file: Path,
                                                              shapes_data: Path) -> None:
    images = sorted((shapes_data / "images" / "val").glob("*.jpg"))[:5]
    plain = Predictor(demo_bundle)
    locked = Predictor(protected, model_key=load_key(key_file))
    for img in images:
        a, b = plain.predict(img), locked.predict(img)
        np.testing.assert_allclose(a.detections.xyxy, b.detections.xyxy, atol=1e-3)
        assert a.detections.class_id.tolist() == b.detections.class_id.tolist()
    x, _ = plain.preprocess([np.full((200, 300, 3), 90, np.uint8)])
    np.testing.assert_allclose(plain.infer(x), locked.infer(x), atol=1e-5)  # obfuscation changes no output
    assert not any(p.suffix == ".onnx" for p in (protected / "variants").iterdir())  # no plaintext model on disk
    assert b"/model." not in (protected / "variants" / "onnx-fp32.onnx.enc").read_bytes()


def test_wrong_key_tampering_and_swapped_metadata_fail_closed(protected: Path, key_file: Path, tmp_path: Path) -> None:
    import shutil

    with pytest.raises(BundleError, match="cannot be decrypted"):
        Predictor(protected, model_key=b"\x01" * 32)
    with pytest.raises(InputError, match="encrypted"):
        Predictor(protected)  # no key anywhere
    copy = tmp_path / "c.cvd"
    shutil.copytree(protected, copy)
    f = copy / "variants" / "onnx-fp32.onnx.enc"
    data = bytearray(f.read_bytes())
    data[1000] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        Bundle.load(copy)
    m = json.loads((copy / "manifest.json").read_text())  # an attacker who also fixes the hash is caught by GCM
    from cvdeploy.bundle.bundle import sha256_file

    m["variants"]["onnx-fp32"]["sha256"] = sha256_file(f)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="cannot be decrypted"):
        Predictor(copy, model_key=load_key(key_file))
    shutil.copyfile(protected / "variants" / "onnx-fp32.onnx.enc", f)
    m = json.loads((protected / "manifest.json").read_text())
    m["name"] = "another-model"  # the file bound to one bundle name does not open under another
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="cannot be decrypted"):
        Predictor(copy, model_key=load_key(key_file))


def test_obfuscation_leaves_no_original_name(demo_bundle: Path) -> None:
    import onnx

    src = (demo_bundle / "variants" / "onnx-fp32.onnx").read_bytes()
    m = onnx.load_from_string(obfuscate_onnx(src, seed=0))
    original = onnx.load_from_string(src)
    old_names = {n.name for n in original.graph.node} | {i.name for i in original.graph.initializer}
    new_names = {n.name for n in m.graph.node} | {i.name for i in m.graph.initializer} | {t for n in m.graph.node for t in n.output}
    assert not (old_names - {"images", "output0"}) & new_names
    assert m.producer_name == "" and all(n.doc_string == "" for n in m.graph.node)
    assert sum(n.op_type == "Identity" for n in m.graph.node) > sum(n.op_type == "Identity" for n in original.graph.node)


def test_keys_and_the_commands(demo_bundle: Path, key_file: Path, tmp_path: Path, shapes_data: Path) -> None:
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(load_key(key_file)) == 32
    assert parse_key(b"\x02" * 32) == b"\x02" * 32 and parse_key(("ab" * 32).encode()) == bytes.fromhex("ab" * 32)
    with pytest.raises(InputError, match="32 bytes"):
        parse_key("short")
    cli = [sys.executable, "-m", "cvdeploy"]
    out = tmp_path / "cli.cvd"
    p = subprocess.run([*cli, "protect", str(demo_bundle), "-o", str(out), "--key-file", str(key_file)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    image = str(next((shapes_data / "images" / "val").glob("*.jpg")))
    env = {**__import__("os").environ, "CVDEPLOY_MODEL_KEY_FILE": str(key_file)}
    ok = subprocess.run([*cli, "predict", str(out), image, "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr
    ref = subprocess.run([*cli, "predict", str(demo_bundle), image, "--json"], capture_output=True, text=True, timeout=300)
    strip = lambda s: [{k: v for k, v in r.items() if k not in ("timings_ms", "source")} for r in json.loads(s)]  # noqa: E731
    assert strip(ok.stdout) == strip(ref.stdout)
    no_key = subprocess.run([*cli, "predict", str(out), image], capture_output=True, text=True, timeout=300)
    assert no_key.returncode == 1 and no_key.stderr.startswith("error:") and "encrypted" in no_key.stderr


def test_verify_checks_a_protected_bundle_with_its_key(protected: Path, key_file: Path) -> None:
    from cvdeploy.evaluate.verify import verify_bundle

    checks = verify_bundle(protected, model_key=load_key(key_file))
    assert [c.name for c in checks] == ["onnx-fp32"] and all(c.ok for c in checks)  # obfuscated, yet the same outputs
    with pytest.raises(BundleError, match="cannot be decrypted"):
        verify_bundle(protected, model_key=b"\x07" * 32)
    p = subprocess.run([sys.executable, "-m", "cvdeploy", "verify", str(protected), "--key-file", str(key_file)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
