"""File modes: a plain bundle is readable by every user (another user, e.g. a container's non-root user, can load it);
`build --private` bundles, protected bundles, keys, key stores and audit logs are their owner's only. Modes are set
explicitly, so they hold whatever the umask."""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "cvdeploy"]


def modes(root: Path) -> dict[str, int]:
    """Every path under `root` (itself included, as '.') with its permission bits."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def assert_modes(root: Path, dir_mode: int, file_mode: int) -> None:
    wrong = {rel: oct(m) for rel, m in modes(root).items()
             if m != (dir_mode if (root / rel).is_dir() else file_mode)}
    assert not wrong, f"expected directories {oct(dir_mode)} and files {oct(file_mode)} in {root}: {wrong}"


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def cli(*args: str | Path, mask: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVDEPLOY_")}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600, env=env,
                          preexec_fn=(lambda: os.umask(mask)) if mask is not None else None)


def test_a_plain_bundle_is_readable_by_every_user(demo_bundle: Path) -> None:
    assert_modes(demo_bundle, 0o755, 0o644)  # staged in a 0700 temporary directory, renamed into place: not 0700


@pytest.mark.slow
def test_build_modes_whatever_the_umask(demo_pt: Path, tmp_path: Path) -> None:
    plain = cli("build", demo_pt, "-o", tmp_path / "plain.cvd", mask=0o077)  # a strict umask does not make it private
    assert plain.returncode == 0, plain.stderr
    assert_modes(tmp_path / "plain.cvd", 0o755, 0o644)
    private = cli("build", demo_pt, "-o", tmp_path / "private.cvd", "--private", mask=0o022)
    assert private.returncode == 0, private.stderr
    assert "private (owner only)" in private.stdout
    assert_modes(tmp_path / "private.cvd", 0o700, 0o600)


def test_a_rewritten_manifest_keeps_its_bundle_mode(demo_bundle: Path, tmp_path: Path) -> None:
    from cvdeploy.bundle.bundle import Bundle, set_bundle_modes

    public, private = tmp_path / "public.cvd", tmp_path / "private.cvd"
    shutil.copytree(demo_bundle, public)
    shutil.copytree(demo_bundle, private)
    set_bundle_modes(private, private=True)
    assert_modes(private, 0o700, 0o600)
    with umask(0o077):  # `bench tune` rewrites the manifest: it stays readable in a public bundle
        Bundle.load(public).save_manifest()
    with umask(0o022):  # ... and private in a private one
        Bundle.load(private).save_manifest()
    assert_modes(public, 0o755, 0o644)
    assert_modes(private, 0o700, 0o600)


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO is not installed")
def test_added_variants_take_the_bundle_mode(demo_bundle: Path, tmp_path: Path) -> None:
    from cvdeploy.build.variants import add_variants
    from cvdeploy.bundle.bundle import set_bundle_modes

    b = tmp_path / "private.cvd"
    shutil.copytree(demo_bundle, b)
    set_bundle_modes(b, private=True)
    with umask(0o022):
        outcomes = add_variants(b, ["openvino-fp32"])  # a new directory (variants/openvino-fp32/) and new files
    assert all(o.written for o in outcomes), [(o.name, o.reason) for o in outcomes]
    assert (b / "variants" / "openvino-fp32" / "model.xml").is_file()
    assert_modes(b, 0o700, 0o600)


def test_protected_bundles_keys_and_signatures_stay_private(demo_bundle: Path, tmp_path: Path) -> None:
    from cvdeploy.security.protect import new_key_file, protect_bundle

    with umask(0o022):
        key_file = new_key_file(tmp_path / "model.key")
        protected = protect_bundle(demo_bundle, tmp_path / "protected.cvd", bytes(range(32)))
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert_modes(protected, 0o700, 0o600)  # copied from a 0755/0644 bundle, yet closed

    signing = cli("security", "sign-key", tmp_path / "sign.pem", mask=0o022)
    assert signing.returncode == 0, signing.stderr
    assert stat.S_IMODE((tmp_path / "sign.pem").stat().st_mode) == 0o600
    signed = cli("sign", protected, "--key", tmp_path / "sign.pem", mask=0o022)
    assert signed.returncode == 0, signed.stderr
    assert_modes(protected, 0o700, 0o600)  # signature.json included
    public = tmp_path / "public.cvd"
    shutil.copytree(demo_bundle, public)
    signed = cli("sign", public, "--key", tmp_path / "sign.pem", mask=0o077)
    assert signed.returncode == 0, signed.stderr
    assert_modes(public, 0o755, 0o644)  # the signature of a plain bundle is as readable as the bundle


def test_key_stores_and_audit_logs_are_private(tmp_path: Path) -> None:
    from cvdeploy.security.audit import AuditLog
    from cvdeploy.security.auth import KeyStore

    with umask(0o022):
        KeyStore(tmp_path / "keys.db").create("alice", "viewer")
        log = AuditLog(tmp_path / "audit.db", bytes(32))
        log.append("login", "ok", principal="alice")
        log.close()
    assert stat.S_IMODE((tmp_path / "keys.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "audit.db").stat().st_mode) == 0o600
