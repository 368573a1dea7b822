"""The update server's directory: publishing signed bundle versions to channels, and the devices' reports.

    ROOT/
      publisher.pub                  the public key every published version is signed by (pinned at the first publish)
      fleet.token                    the fleet token (mode 600), made by `cvdeploy fleet serve` when none is given
      files/<sha256>                 every signed file of every version, by content: a file shared by two versions is
                                     stored (and downloaded by a device that has it) once
      versions/<version>/manifest.json, signature.json, version.json
      channels/<channel>.json        the channel's current version (ChannelDoc); <channel>.history.jsonl: every change
      devices/<device>.json          each device's last report; devices/reports.jsonl: every report
      log/downloads.jsonl            one line per file download: device, sha256, range asked, status, bytes sent

Publishing refuses a bundle that is unsigned, signed by another key, or changed after signing (`Bundle.load` with the
public key: the signature, then every file's sha256). Only the files the signed manifest lists are published.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cvdeploy.bundle.bundle import MANIFEST, SIGNATURE, Bundle, sha256_file
from cvdeploy.errors import BundleError, InputError, NotFoundError
from cvdeploy.fleet.protocol import (
    DEFAULT_CHANNEL,
    TOKEN_ENV,
    ChannelDoc,
    FileEntry,
    StatusReport,
    check_name,
    is_sha256,
    now,
    signed_files,
)
from cvdeploy.security import write_private

PUBLISHER_KEY = "publisher.pub"
TOKEN_FILE = "fleet.token"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` so that a reader sees the old content or the new one, never a part (rename over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append_line(path: Path, doc: dict[str, Any], lock: threading.Lock) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(doc, separators=(",", ":")) + "\n"
    with lock, open(path, "a") as f:
        f.write(line)


class FleetRoot:
    """The update server's directory (see the module docstring); the server and `publish` share it, so a publish takes
    effect at the next request without restarting the server."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    # -- layout ---------------------------------------------------------------------------------

    def blob(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise NotFoundError(f"no file {sha256!r}: files are named by their sha256 (64 lowercase hex digits)")
        return self.root / "files" / sha256

    def version_dir(self, version: str) -> Path:
        return self.root / "versions" / check_name(version, "version")

    def channel_path(self, channel: str) -> Path:
        return self.root / "channels" / f"{check_name(channel, 'channel')}.json"

    @property
    def downloads_log(self) -> Path:
        return self.root / "log" / "downloads.jsonl"

    # -- publishing -----------------------------------------------------------------------------

    def publish(self, bundle_path: str | os.PathLike[str], public_key: str | os.PathLike[str] | bytes, *,
                channel: str = DEFAULT_CHANNEL, version: str | None = None) -> ChannelDoc:
        """Check the bundle's signature by `public_key` and every file's sha256, store its signed files by content, and
        point `channel` at it. Returns the channel document devices will read."""
        from cvdeploy.bundle.signing import key_fingerprint, load_public_key

        check_name(channel, "channel")
        key = load_public_key(public_key)
        self._pin_key(key, key_fingerprint(key))
        bundle = Bundle.load(bundle_path, public_key=key)  # refuses unsigned, another key, any change after signing
        assert bundle.root is not None
        manifest_bytes = (bundle.root / MANIFEST).read_bytes()
        signature_bytes = (bundle.root / SIGNATURE).read_bytes()
        manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
        if version is None:
            version = f"{bundle.name}-{manifest_sha[:12]}"
            try:
                check_name(version, "version")
            except InputError:
                version = manifest_sha[:12]
        vdir = self.version_dir(version)
        if (vdir / MANIFEST).is_file() and (vdir / MANIFEST).read_bytes() != manifest_bytes:
            raise InputError(f"version {version!r} is already published with another manifest: give this bundle another "
                             "--version (a published version never changes: devices may hold it)")
        entries = []
        for rel, digest in signed_files(bundle.manifest):
            entries.append(FileEntry(sha256=digest, size=self._store(bundle.root / rel, digest)))
        write_atomic(vdir / SIGNATURE, signature_bytes)
        write_atomic(vdir / MANIFEST, manifest_bytes)  # last: a version directory with a manifest is complete
        doc = ChannelDoc(channel=channel, version=version, manifest_sha256=manifest_sha, bundle=bundle.name,
                         published_at=now(), files=entries)
        write_atomic(vdir / "version.json", json.dumps({"version": version, "manifest_sha256": manifest_sha,
                                                        "bundle": bundle.name, "signed_by": bundle.signed_by,
                                                        "files": [e.model_dump() for e in entries]}, indent=1).encode())
        write_atomic(self.channel_path(channel), doc.model_dump_json(indent=1).encode())
        _append_line(self.root / "channels" / f"{channel}.history.jsonl", doc.model_dump(exclude={"files"}), self._lock)
        return doc

    def _pin_key(self, key: Any, fingerprint: str) -> None:
        from cryptography.hazmat.primitives import serialization

        from cvdeploy.bundle.signing import key_fingerprint, load_public_key

        pinned = self.root / PUBLISHER_KEY
        if pinned.is_file():
            have = key_fingerprint(load_public_key(pinned))
            if have != fingerprint:
                raise InputError(f"{self.root} publishes bundles signed by {have} ({pinned}), and this key is {fingerprint}: "
                                 "devices pin the publisher's key, so a new key needs a new key on every device; to change it "
                                 f"on purpose, remove {pinned} and give devices the new public key")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(pinned, key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def _store(self, src: Path, digest: str) -> int:
        """Copy `src` to files/<digest> unless it is there already, intact; the copy is hashed before it takes the name."""
        target = self.blob(digest)
        if target.is_file() and sha256_file(target) == digest:  # hashed, not trusted by name: a damaged copy is replaced
            return target.stat().st_size
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{digest}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        if sha256_file(tmp) != digest:
            tmp.unlink()
            raise BundleError(f"{src} changed while it was published (its sha256 no longer matches the manifest): publish again")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        return target.stat().st_size

    # -- reading --------------------------------------------------------------------------------

    def channel(self, channel: str) -> ChannelDoc:
        p = self.channel_path(channel)
        if not p.is_file():
            raise NotFoundError(f"channel {channel!r} has no published version (`cvdeploy fleet publish BUNDLE --channel {channel}`)")
        return ChannelDoc.model_validate_json(p.read_bytes())

    def channels(self) -> list[ChannelDoc]:
        folder = self.root / "channels"
        return [ChannelDoc.model_validate_json(p.read_bytes()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []

    def version_file(self, version: str, name: str) -> bytes:
        if name not in (MANIFEST, SIGNATURE):
            raise NotFoundError(f"a version holds {MANIFEST} and {SIGNATURE}, not {name!r}")
        p = self.version_dir(version) / name
        if not (self.version_dir(version) / MANIFEST).is_file() or not p.is_file():
            raise NotFoundError(f"version {version!r} is not published")
        return p.read_bytes()

    # -- device reports and the download log -------------------------------------------------------

    def record_report(self, report: StatusReport) -> StatusReport:
        check_name(report.device, "device")
        report = report.model_copy(update={"received_at": now()})
        write_atomic(self.root / "devices" / f"{report.device}.json", report.model_dump_json(indent=1).encode())
        _append_line(self.root / "devices" / "reports.jsonl", report.model_dump(mode="json"), self._lock)
        return report

    def reports(self) -> list[StatusReport]:
        """Each device's last report, by device name."""
        out = []
        for p in sorted((self.root / "devices").glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                out.append(StatusReport.model_validate_json(p.read_bytes()))
        return out

    def log_download(self, entry: dict[str, Any]) -> None:
        _append_line(self.downloads_log, {"at": now(), **entry}, self._lock)

    def downloads(self) -> Iterator[dict[str, Any]]:
        if self.downloads_log.is_file():
            for line in self.downloads_log.read_text().splitlines():
                if line.strip():
                    yield json.loads(line)


def load_token(token_file: str | os.PathLike[str] | None, *, root: str | os.PathLike[str] | None = None,
               create: bool = False) -> str:
    """The fleet token: from `token_file`, else $CVDEPLOY_FLEET_TOKEN, else ROOT/fleet.token, made (32 random bytes,
    URL-safe base64, mode 600) when `create` and none exists."""
    if token_file is not None:
        p = Path(token_file)
        if not p.is_file():
            raise InputError(f"fleet token file not found: {p}")
        token = p.read_text().strip()
    elif os.environ.get(TOKEN_ENV, "").strip():
        token = os.environ[TOKEN_ENV].strip()
    elif root is not None and (Path(root) / TOKEN_FILE).is_file():
        token = (Path(root) / TOKEN_FILE).read_text().strip()
    elif root is not None and create:
        token = secrets.token_urlsafe(32)
        Path(root).mkdir(parents=True, exist_ok=True)
        write_private(Path(root) / TOKEN_FILE, (token + "\n").encode())
    else:
        raise InputError(f"no fleet token: give --token-file FILE or set ${TOKEN_ENV} (the server makes ROOT/{TOKEN_FILE} "
                         "at its first start)")
    if len(token) < 16:
        raise InputError("the fleet token is shorter than 16 characters: use a long random one (e.g. `openssl rand -base64 32`)")
    return token
