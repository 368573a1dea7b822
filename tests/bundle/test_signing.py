"""Bundle signatures: ed25519 over the canonical manifest; a public key makes a valid signature by it a requirement."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cvdeploy.bundle.bundle import Bundle, manifest_content_hash
from cvdeploy.bundle.signing import (
    key_fingerprint,
    load_private_key,
    load_public_key,
    new_signing_key,
    read_signature,
    sign_bundle,
)
from cvdeploy.errors import BundleError, InputError


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return new_signing_key(tmp_path_factory.mktemp("keys") / "signing.pem")


@pytest.fixture
def signed(demo_bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "signed.cvd"
    shutil.copytree(demo_bundle, copy)
    sign_bundle(copy, keys[0])
    return copy


def test_sign_then_load_with_the_right_key(signed: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    fingerprint = key_fingerprint(load_public_key(public))
    assert fingerprint == key_fingerprint(load_private_key(private)) and fingerprint.startswith("sha256:")
    doc = json.loads((signed / "signature.json").read_text())
    assert doc["algorithm"] == "ed25519" and doc["key_fingerprint"] == fingerprint and len(doc["signature"]) == 88
    # The key as a path, as PEM bytes or loaded: the same check.
    for key in (public, str(public), public.read_bytes(), public.read_text(), load_public_key(public)):
        assert Bundle.load(signed, public_key=key).signed_by == fingerprint
    assert Bundle.load(signed).signed_by is None  # without a key, signatures are not required (nor checked)


def test_wrong_key_is_refused(signed: Path, tmp_path: Path) -> None:
    _, other = new_signing_key(tmp_path / "other.pem")
    with pytest.raises(BundleError, match=r"is signed by another key \(sha256:[0-9a-f]{64}\), not by the public key given"):
        Bundle.load(signed, public_key=other)


def test_unsigned_bundle_is_refused_when_a_key_is_required(demo_bundle: Path, keys: tuple[Path, Path]) -> None:
    with pytest.raises(BundleError, match=r"is not signed \(no signature\.json\) and a signature is required: sign it with "
                                          r"`cvdeploy sign"):
        Bundle.load(demo_bundle, public_key=keys[1])
    Bundle.load(demo_bundle)  # and loads without one
    onnx = demo_bundle / "variants" / "onnx-fp32.onnx"  # a plain .onnx cannot carry a signature at all
    with pytest.raises(BundleError, match="cannot carry a signature"):
        Bundle.load(onnx, public_key=keys[1])


def test_one_byte_changed_in_a_variant_is_refused(signed: Path, keys: tuple[Path, Path]) -> None:
    f = signed / "variants" / "onnx-fp32.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x10
    f.write_bytes(bytes(data))
    for check_hashes in (True, False):  # a public key hashes every file: the signature covers them only through the hashes
        with pytest.raises(BundleError, match=r"variants/onnx-fp32\.onnx does not match its sha256"):
            Bundle.load(signed, public_key=keys[1], check_hashes=check_hashes)


def test_manifest_edit_with_a_recomputed_content_hash_is_refused_by_the_signature(signed: Path, keys: tuple[Path, Path]) -> None:
    m = json.loads((signed / "manifest.json").read_text())
    m["postprocess"]["conf"] = 0.01
    m["names"]["0"] = "stop-sign"
    m["content_sha256"] = manifest_content_hash(m)  # anyone can recompute the hash: it catches edits, not attackers
    (signed / "manifest.json").write_text(json.dumps(m, indent=2))
    assert Bundle.load(signed).manifest.postprocess.conf == 0.01
    with pytest.raises(BundleError, match=r"signature of bundle .* does not match it: its manifest .* was changed after it was signed"):
        Bundle.load(signed, public_key=keys[1])
    del m["content_sha256"]  # nor does dropping the hash (a manifest from before hashes) get past the signature
    (signed / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="does not match it"):
        Bundle.load(signed, public_key=keys[1])


def test_a_forged_signature_file_is_refused(signed: Path, keys: tuple[Path, Path]) -> None:
    path = signed / "signature.json"
    doc = json.loads(path.read_text())
    sig = bytearray(__import__("base64").b64decode(doc["signature"]))
    sig[0] ^= 1
    path.write_text(json.dumps({**doc, "signature": __import__("base64").b64encode(bytes(sig)).decode()}))
    with pytest.raises(BundleError, match="does not match it"):
        Bundle.load(signed, public_key=keys[1])
    path.write_text(json.dumps({**doc, "algorithm": "none"}))
    with pytest.raises(BundleError, match="unknown signature algorithm 'none'"):
        Bundle.load(signed, public_key=keys[1])
    path.write_text("{}")
    with pytest.raises(BundleError, match="not a cvdeploy signature"):
        Bundle.load(signed, public_key=keys[1])


def test_rewriting_the_manifest_removes_the_signature(signed: Path, keys: tuple[Path, Path]) -> None:
    b = Bundle.load(signed, public_key=keys[1])
    b.manifest.postprocess.conf = 0.3
    b.save_manifest()  # e.g. `bench tune`: the old signature could only fail now
    assert read_signature(signed) is None
    with pytest.raises(BundleError, match="is not signed"):
        Bundle.load(signed, public_key=keys[1])
    sign_bundle(signed, keys[0])
    assert Bundle.load(signed, public_key=keys[1]).manifest.postprocess.conf == 0.3


def test_key_files(keys: tuple[Path, Path], tmp_path: Path) -> None:
    private, public = keys
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.name == "signing.pem.pub" and b"PUBLIC KEY" in public.read_bytes()
    with pytest.raises(InputError, match="exists; pass --force"):
        new_signing_key(private)
    with pytest.raises(InputError, match="is a private key: give its public key"):
        load_public_key(private)  # the machines that verify should never need the private key
    with pytest.raises(InputError, match=r"not a PEM private key .*that is a public key"):
        load_private_key(public)
    with pytest.raises(InputError, match="public key file not found"):
        load_public_key(tmp_path / "nope.pub")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ecdsa = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(InputError, match="not an ed25519 public key"):
        load_public_key(ecdsa)
    again, _ = new_signing_key(tmp_path / "again.pem")
    os.chmod(again, 0o644)
    new_signing_key(again, force=True)  # a replaced key is written 600 again, whatever the old file's mode was
    assert again.stat().st_mode & 0o777 == 0o600


def test_a_protected_bundle_can_be_signed(demo_bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    from cvdeploy.security.protect import protect_bundle

    src = tmp_path / "src.cvd"
    shutil.copytree(demo_bundle, src)
    sign_bundle(src, keys[0])
    locked = protect_bundle(src, tmp_path / "locked.cvd", b"\x05" * 32)
    assert read_signature(locked) is None  # a new manifest: the source's signature is not carried over
    sign_bundle(locked, keys[0])  # sign after protect
    b = Bundle.load(locked, public_key=keys[1])
    assert b.manifest.variants["onnx-fp32"].encryption and b.signed_by == key_fingerprint(load_public_key(keys[1]))


def test_sign_key_sign_and_verify_commands(demo_bundle: Path, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "cvdeploy"]
    env = {**os.environ, "COLUMNS": "200"}

    def run(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)

    key = tmp_path / "k" / "release.pem"
    made = run("security", "sign-key", key)
    assert made.returncode == 0, made.stderr
    assert key.stat().st_mode & 0o777 == 0o600 and (tmp_path / "k" / "release.pem.pub").is_file()
    b = tmp_path / "b.cvd"
    shutil.copytree(demo_bundle, b)
    unsigned = run("verify", b, "--public-key", f"{key}.pub")
    assert unsigned.returncode == 1 and unsigned.stderr.startswith("error:") and "is not signed" in unsigned.stderr
    assert "Traceback" not in unsigned.stderr
    signed = run("sign", b, "--key", key)
    assert signed.returncode == 0, signed.stderr
    assert "signed" in signed.stdout and (b / "signature.json").is_file()
    ok = run("verify", b, "--public-key", f"{key}.pub")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "signature: valid, by key sha256:" in ok.stdout and "verified: 1 variant(s)" in ok.stdout
    m = json.loads((b / "manifest.json").read_text())
    m["preprocess"]["channel_order"] = "BGR"
    m["content_sha256"] = manifest_content_hash(m)
    (b / "manifest.json").write_text(json.dumps(m))
    edited = run("verify", b, "--public-key", f"{key}.pub")
    assert edited.returncode == 1 and "does not match it" in edited.stderr and "Traceback" not in edited.stderr
    wrong = run("verify", b, "--public-key", key)  # the private key given where the public one belongs
    assert wrong.returncode == 1 and "is a private key" in wrong.stderr
