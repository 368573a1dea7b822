"""The device agent: poll the update server, download a new version (deltas, resumable), check it, try it, commit it or
roll it back by itself, and report every step.

One poll (`Agent.poll_once`):

    downloading  the channel names a version; its manifest and signature are fetched and the signature checked against
                 the publisher's pinned public key before any file is; then every file the signed manifest lists, copied
                 from a slot that already holds one with that sha256 (delta) or downloaded (resumable); then the whole
                 version is loaded as `Bundle.load(..., public_key=...)` checks it (signature, schema, every sha256) and
                 moved into the inactive slot. Anything that does not hold: "refused", nothing installed.
    verifying    `verify_bundle`: every hash again and the golden parity of every variant on this device's engine
    canary       the new version's prediction statistics on the device's sample images against the active version's
                 (`cvdeploy.fleet.canary`)
    committed    the pointer is switched to the new slot (one atomic rename), the version is loaded and run through
                 the pointer once; if that fails the pointer goes back
    rolled-back  golden parity, the canary or the check after the switch failed: the previous version is served (the
                 pointer never left it, or went back to it) and this version is not tried again

The version served before keeps serving until the commit. Reports go to the server at each step and on every poll.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cvdeploy.bundle.bundle import MANIFEST, SIGNATURE, Bundle, canonical_manifest_bytes, sha256_file
from cvdeploy.bundle.manifest import Manifest
from cvdeploy.errors import BundleError, CvdeployError, InputError
from cvdeploy.fleet.canary import FailOn, run_canary, sample_images
from cvdeploy.fleet.download import Fetcher, Transfer
from cvdeploy.fleet.protocol import DEFAULT_CHANNEL, ChannelDoc, StatusReport, check_name, now, signed_files, signed_sizes
from cvdeploy.fleet.publish import write_atomic
from cvdeploy.fleet.slots import Device, SlotRecord

log = logging.getLogger("cvdeploy.fleet.agent")

MAX_MANIFEST_BYTES = 4 << 20
MAX_SIGNATURE_BYTES = 64 << 10


class AgentSettings(BaseModel):
    """Everything an agent is told (CLI flags and CVDEPLOY_FLEET_* variables map onto these)."""

    model_config = ConfigDict(extra="forbid")

    device_dir: Path
    server: str
    token: str = Field(repr=False)
    public_key: Path  # the publisher's ed25519 public key, pinned on the device (never fetched from the server)
    device_id: str = Field(default_factory=socket.gethostname)
    channel: str = DEFAULT_CHANNEL
    samples: Path | None = None  # the canary's images
    canary_images: int = Field(32, ge=1)
    fail_on: FailOn = "serious"
    ca: Path | None = None  # the CA that signed the server's TLS certificate (https:// servers with a private CA)
    retries: int = Field(3, ge=0)  # per download, within one poll
    timeout_s: float = Field(30.0, gt=0)
    max_file_mb: int = Field(4096, ge=1)  # for files whose size the signed manifest does not record


class _Memory(BaseModel):
    """agent.json: what the agent keeps between polls."""

    model_config = ConfigDict(extra="ignore")

    device: str
    rejected: dict[str, str] = Field(default_factory=dict)  # manifest sha256 -> why it was rolled back
    last: StatusReport | None = None


class Agent:
    """One device's agent. `poll_once()` does one poll and returns the last report; `run()` polls until stopped."""

    def __init__(self, settings: AgentSettings, *, on_report: Callable[[StatusReport], None] | None = None) -> None:
        from cvdeploy.bundle.signing import load_public_key

        self.s = settings
        check_name(settings.device_id, "device id")
        check_name(settings.channel, "channel")
        self.key = load_public_key(settings.public_key)  # fails now, not at the first update, when the key is wrong
        if settings.samples is not None and not settings.samples.is_dir():
            raise InputError(f"--samples {settings.samples} is not a directory of images")
        self.device = Device(settings.device_dir)
        self.device.create()
        self.on_report = on_report or (lambda _r: None)
        self._memory_path = self.device.root / "agent.json"

    # -- memory and reports -----------------------------------------------------------------------

    def _memory(self) -> _Memory:
        with contextlib.suppress(OSError, ValueError):
            return _Memory.model_validate_json(self._memory_path.read_bytes())
        return _Memory(device=self.s.device_id)

    def _remember(self, memory: _Memory) -> None:
        write_atomic(self._memory_path, memory.model_dump_json(indent=1).encode())

    def _report(self, fetch: Fetcher | None, state: str, **fields: Any) -> StatusReport:
        active = self.device.active_record()
        report = StatusReport(device=self.s.device_id, state=state, active_version=active.version if active else None,  # type: ignore[arg-type]
                              active_slot=self.device.active_slot(), **fields)
        memory = self._memory()
        memory.last = report
        self._remember(memory)
        self.on_report(report)
        if fetch is not None:
            try:
                fetch.post_json(f"/devices/{self.s.device_id}/status", report.model_dump_json().encode())
            except (CvdeployError, OSError) as e:  # a report lost is sent again at the next poll (the last one is kept)
                log.warning("could not report %s to %s: %s", state, self.s.server, e)
        return report

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.device.root / "agent.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"another agent is working on {self.device.root}") from None
            yield

    # -- one poll --------------------------------------------------------------------------------

    def poll_once(self) -> StatusReport:
        with self._lock(), Fetcher(self.s.server, self.s.token, self.s.device_id, ca=self.s.ca,
                                   timeout=self.s.timeout_s, retries=self.s.retries) as fetch:
            try:
                raw = fetch.get_bytes(f"/channels/{self.s.channel}", 1 << 20)
                channel = ChannelDoc.model_validate_json(raw)
            except (CvdeployError, ValidationError) as e:
                return self._report(fetch, "failed", reason=f"cannot read channel {self.s.channel!r}: {_one_line(e)}")
            return self._update(fetch, channel)

    def _update(self, fetch: Fetcher, channel: ChannelDoc) -> StatusReport:
        active = self.device.active_record()
        memory = self._memory()
        if (active is not None and active.manifest_sha256 == channel.manifest_sha256) or channel.manifest_sha256 in memory.rejected:
            return self._heartbeat(fetch, memory, channel)  # up to date, or rolled back before: not tried again
        version = channel.version
        transfer = Transfer()
        self._report(fetch, "downloading", version=version, manifest_sha256=channel.manifest_sha256)
        try:
            manifest_sha = self._download(fetch, channel, transfer)
        except BundleError as e:
            self.device.drop_incoming()
            return self._report(fetch, "refused", version=version, reason=_one_line(e), **_figures(transfer))
        except (CvdeployError, OSError) as e:
            self.device.drop_incoming()
            return self._report(fetch, "failed", version=version, reason=_one_line(e), **_figures(transfer))
        figures = {"version": version, "manifest_sha256": manifest_sha, **_figures(transfer)}
        if (active is not None and manifest_sha == active.manifest_sha256) or manifest_sha in memory.rejected:
            self.device.drop_incoming()  # the channel document named another manifest than the one served
            return self._heartbeat(fetch, memory, channel.model_copy(update={"manifest_sha256": manifest_sha}))
        previous_slot = self.device.active_slot()
        slot = self.device.install(SlotRecord(version=version, manifest_sha256=manifest_sha, state="installed", at=now()))
        for stale in self.device.downloads.glob("*.part"):  # parts of versions given up on: this one is whole
            stale.unlink(missing_ok=True)
        return self._try(fetch, slot, previous_slot, figures)

    def _try(self, fetch: Fetcher, slot: str, previous_slot: str | None, figures: dict[str, Any]) -> StatusReport:
        """Golden parity, canary, switch, check through the pointer: commit, or roll back at the first step that fails.

        Whatever the new version does (an engine that cannot load it, an exception of the engine's own), the agent rolls
        back and reports it rather than stopping half-way: hence the broad `except Exception` on these three steps.
        """
        new_dir = self.device.slot_dir(slot)
        self._report(fetch, "verifying", **figures)
        problem = self._golden(new_dir)
        if problem:
            return self._roll_back(fetch, slot, previous_slot, problem, figures)

        self._report(fetch, "canary", **figures)
        images = sample_images(self.s.samples, self.s.canary_images)
        previous_dir = self.device.slot_dir(previous_slot) if previous_slot is not None else None
        try:
            canary = run_canary(new_dir, previous_dir, images, fail_on=self.s.fail_on)
        except Exception as e:
            return self._roll_back(fetch, slot, previous_slot, f"canary could not run: {_one_line(e)}", figures)
        figures["canary"] = canary.summary()
        if not canary.passed:
            return self._roll_back(fetch, slot, previous_slot, canary.reason, figures)

        self.device.switch(slot)
        try:
            self._check_served(images)
        except Exception as e:
            return self._roll_back(fetch, slot, previous_slot, f"after the switch, the version did not load or run through "
                                   f"{self.device.pointer}: {_one_line(e)}", figures)
        self.device.set_state(slot, "committed", canary.reason)
        if previous_slot is not None:
            self.device.set_state(previous_slot, "superseded", f"replaced by {figures['version']}")
        return self._report(fetch, "committed", reason=canary.reason, **figures)

    def _heartbeat(self, fetch: Fetcher, memory: _Memory, channel: ChannelDoc) -> StatusReport:
        """Nothing new to install: say again where the device stands (so `fleet status` shows it is alive): the channel's
        version rolled back before, or the active version committed."""
        last = memory.last
        if last is not None and last.manifest_sha256 == channel.manifest_sha256 and last.state in ("committed", "rolled-back"):
            keep = last.model_dump(include={"version", "manifest_sha256", "reason", "canary"})  # this poll moved no bytes
            return self._report(fetch, last.state, **keep)
        if channel.manifest_sha256 in memory.rejected:
            return self._report(fetch, "rolled-back", version=channel.version, manifest_sha256=channel.manifest_sha256,
                                reason=memory.rejected[channel.manifest_sha256])
        active = self.device.active_record()
        if active is None:
            return self._report(fetch, "idle")
        return self._report(fetch, "committed", version=active.version, manifest_sha256=active.manifest_sha256,
                            reason=active.reason)

    def _roll_back(self, fetch: Fetcher, slot: str, previous_slot: str | None, reason: str, figures: dict[str, Any]) -> StatusReport:
        if self.device.active_slot() == slot:  # switched already: the pointer goes back (or away, on a first install)
            if previous_slot is not None:
                self.device.switch(previous_slot)
            else:
                self.device.pointer.unlink()
        self.device.set_state(slot, "rolled-back", reason)
        memory = self._memory()
        memory.rejected[str(figures["manifest_sha256"])] = reason
        self._remember(memory)
        return self._report(fetch, "rolled-back", reason=reason, **figures)

    # -- the steps -------------------------------------------------------------------------------

    def _download(self, fetch: Fetcher, channel: ChannelDoc, transfer: Transfer) -> str:
        """Fetch and check the version into incoming/; return the sha256 of its manifest.json. BundleError for anything
        that does not hold."""
        from cvdeploy.bundle.signing import verify_manifest_signature

        manifest_bytes = fetch.get_bytes(f"/versions/{channel.version}/{MANIFEST}", MAX_MANIFEST_BYTES)
        signature_bytes = fetch.get_bytes(f"/versions/{channel.version}/{SIGNATURE}", MAX_SIGNATURE_BYTES)
        incoming = self.device.fresh_incoming()
        (incoming / MANIFEST).write_bytes(manifest_bytes)
        (incoming / SIGNATURE).write_bytes(signature_bytes)
        try:
            raw = json.loads(manifest_bytes)
        except ValueError as e:
            raise BundleError(f"the manifest of version {channel.version!r} is not JSON ({e}): refused") from None
        if not isinstance(raw, dict):
            raise BundleError(f"the manifest of version {channel.version!r} is not a JSON object: refused")
        # The signature first: no file is downloaded for a manifest the publisher did not sign.
        verify_manifest_signature(incoming, canonical_manifest_bytes(raw), self.key)
        try:
            manifest = Manifest.model_validate(raw)
        except ValidationError as e:
            raise BundleError(f"the signed manifest of version {channel.version!r} is not one this cvdeploy reads: "
                              f"{e.errors()[0]['msg']}") from None
        sizes = signed_sizes(manifest)
        have = self._files_on_device()
        for rel, digest in signed_files(manifest):
            target = _inside(incoming, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            if self._reuse(have.get(digest, []), digest, target):
                transfer.reused += 1
                continue
            part = self.device.downloads / f"{digest}.part"
            fetch.fetch_file(digest, part, sizes.get(digest, self.s.max_file_mb << 20), transfer)
            os.replace(part, target)
        Bundle.load(incoming, public_key=self.key)  # the whole version as every reader checks it: schema, signature, hashes
        return hashlib.sha256(manifest_bytes).hexdigest()

    def _files_on_device(self) -> dict[str, list[Path]]:
        """sha256 -> files in the slots that the slot's own manifest lists with that sha256 (content-addressed reuse)."""
        out: dict[str, list[Path]] = {}
        for slot in ("a", "b"):
            root = self.device.slot_dir(slot)
            try:
                manifest = Manifest.model_validate_json((root / MANIFEST).read_bytes())
            except (OSError, ValueError):
                continue
            for rel, digest in signed_files(manifest):
                with contextlib.suppress(BundleError):
                    out.setdefault(digest, []).append(_inside(root, rel))
        return out

    def _reuse(self, candidates: list[Path], digest: str, target: Path) -> bool:
        for src in candidates:
            # Hashed before it is trusted: a file damaged on the device's disk is downloaded again instead.
            if src.is_file() and sha256_file(src) == digest:
                tmp = target.with_name(f".{target.name}.tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, target)
                return True
        return False

    def _golden(self, bundle_dir: Path) -> str:
        from cvdeploy.evaluate.verify import verify_bundle

        try:
            checks = verify_bundle(bundle_dir)
        except Exception as e:  # an engine that cannot even load the model: a failed verification, not a crashed agent
            return f"verification failed: {type(e).__name__}: {_one_line(e)}"
        problems = [f"{c.name}: {p}" for c in checks for p in c.problems]
        return ("golden parity failed on this device: " + "; ".join(problems)) if problems else ""

    def _check_served(self, images: list[Path]) -> None:
        """Load the version through the pointer, as the device's predictor will, and run it once."""
        from cvdeploy.predict import Predictor

        bundle = Bundle.load(self.device.pointer, public_key=self.key)
        if images:
            with Predictor(bundle) as p:
                p.predict(images[0])

    # -- polling ---------------------------------------------------------------------------------

    def run(self, interval_s: float, stop: threading.Event | None = None, *, max_polls: int | None = None,
            on_poll: Callable[[StatusReport], None] | None = None) -> StatusReport | None:
        """Poll every `interval_s` (±10 % jitter, so that a fleet does not poll in step) until `stop` is set or after
        `max_polls`. A poll that cannot start (another agent holds the device) is skipped, not fatal."""
        stop = stop or threading.Event()
        last, polls = None, 0
        while not stop.is_set():
            try:
                last = self.poll_once()
            except CvdeployError as e:
                log.warning("poll skipped: %s", e)
            else:
                if on_poll is not None:
                    on_poll(last)
            polls += 1
            if max_polls is not None and polls >= max_polls:
                break
            stop.wait(interval_s * random.uniform(0.9, 1.1))
        return last


def _inside(root: Path, rel: str) -> Path:
    """`root / rel`, refused when `rel` is absolute or climbs out of `root` (a signed manifest never does; checked anyway
    before anything is written)."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise BundleError(f"the manifest lists a file outside the bundle ({rel!r}): refused")
    return root / p


def _figures(t: Transfer) -> dict[str, int]:
    return {"bytes_downloaded": t.bytes, "files_downloaded": t.files, "files_reused": t.reused, "resumed": t.resumed}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
