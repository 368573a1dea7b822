"""What the update server and the device agents say to each other: routes, headers, states, documents, name rules.

    GET  /v1/health                            no token: liveness
    GET  /v1/channels                          every channel's current version name
    GET  /v1/channels/{channel}                the channel's current version (ChannelDoc)
    GET  /v1/versions/{version}/manifest.json  the version's manifest, byte for byte as signed
    GET  /v1/versions/{version}/signature.json its signature.json (ed25519 over the canonical manifest)
    GET  /v1/files/{sha256}                    a bundle file by content (Range: bytes=N- resumes a partial download)
    POST /v1/devices/{device}/status           a device's report (StatusReport)
    GET  /v1/devices                           every device's last report

Every route but /v1/health needs `Authorization: Bearer <fleet token>`. Nothing the server says is trusted by a device
beyond what the publisher's signature covers: the channel document only names a version; the signed manifest lists
the files and their sha256, and every byte is checked against it (docs/fleet.md, "Security model").
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cvdeploy.bundle.manifest import Manifest
from cvdeploy.errors import InputError

API = "/v1"
DEVICE_HEADER = "X-Fleet-Device"  # who downloads: the server's download log names the device
TOKEN_ENV = "CVDEPLOY_FLEET_TOKEN"
DEFAULT_CHANNEL = "stable"

# What a device reports, in the order an update goes through them. "refused": the download did not hold together (a
# signature or a sha256 that does not match, a file over its size): nothing was installed. "failed": the update could
# not be completed for a reason that may pass (the server unreachable, a disk error): the next poll tries again.
State = Literal["idle", "downloading", "verifying", "canary", "committed", "rolled-back", "refused", "failed"]
STATES: tuple[str, ...] = ("idle", "downloading", "verifying", "canary", "committed", "rolled-back", "refused", "failed")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_name(value: str, what: str) -> str:
    """A channel, version or device name: 1-64 letters, digits, '.', '_' or '-', not starting with a dot or a dash (it
    becomes a file name on the server)."""
    if not _NAME.match(value):
        raise InputError(f"{what} {value!r} is not a valid name: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
    return value


def is_sha256(value: str) -> bool:
    return bool(_SHA256.match(value))


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Doc):
    sha256: str
    size: int = Field(ge=0)


class ChannelDoc(_Doc):
    """GET /v1/channels/{channel}. Not signed: it only points at a version, whose signed manifest is what counts."""

    channel: str
    version: str
    manifest_sha256: str  # sha256 of the manifest.json bytes served for the version
    bundle: str  # the bundle's name
    published_at: str
    files: list[FileEntry]  # every signed file of the version, so a device can size its download (a hint only)


class CanarySummary(_Doc):
    """The canary's verdict as reported: the baseline it compared with, the sample, and each prediction statistic."""

    baseline: str  # "previous version <v>", "bundle profile", or "none"
    images: int
    passed: bool
    fail_on: str
    findings: list[dict[str, object]] = Field(default_factory=list)  # cvdeploy.diagnose.profile.Drift.to_dict()


class StatusReport(_Doc):
    """POST /v1/devices/{device}/status: where a device stands, sent at every state change and every poll."""

    device: str
    state: State
    version: str | None = None  # the version this report is about (the one being installed, or the active one)
    manifest_sha256: str | None = None
    active_version: str | None = None  # what the device serves now
    active_slot: str | None = None
    reason: str = ""
    bytes_downloaded: int = 0
    files_downloaded: int = 0
    files_reused: int = 0  # already on the device (same sha256): not downloaded (delta)
    resumed: int = 0  # downloads continued with a Range request after an interruption
    canary: CanarySummary | None = None
    at: str = Field(default_factory=now)
    received_at: str | None = None  # set by the server


def signed_files(manifest: Manifest) -> list[tuple[str, str]]:
    """(path in the bundle, sha256) of every file the manifest vouches for: variants, their companions, golden cases and
    the data profile. The same list `Bundle.check_files` checks; files it does not list (report.html, the model card)
    are not shipped to devices, since nothing signs them."""
    from cvdeploy.bundle.bundle import Bundle

    return list(dict.fromkeys((rel, digest) for _, rel, digest in Bundle(manifest, None).hashed_files()))


def signed_sizes(manifest: Manifest) -> dict[str, int]:
    """sha256 -> size for the files whose size the signed manifest itself records (the variants' main files)."""
    return {v.sha256: v.size_bytes for v in manifest.variants.values()}
