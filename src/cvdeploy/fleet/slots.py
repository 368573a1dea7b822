"""A device's A/B slots and the one pointer that says which of them is served.

    DEVICE/
      current -> slots/a     the pointer: a symbolic link, switched by renaming a new link over it (rename(2) is atomic:
                             a reader opens the old slot or the new one, never neither)
      slots/a/, slots/b/     two bundle directories; an update is installed into the one `current` does not point to
      slots/a.json, b.json   what each slot holds (SlotRecord): version, manifest sha256, state, why
      incoming/              a version being downloaded and checked, moved into the inactive slot only once it holds
      downloads/<sha>.part   partial downloads, continued with an HTTP Range request after an interruption
      agent.json, agent.lock the agent's memory (versions it rolled back, its last report) and its lock

Whatever serves predictions on the device opens `DEVICE/current` (`cvdeploy serve DEVICE/current`,
`Predictor(active_bundle(DEVICE))`): until an update is committed the pointer does not move, so the version that
served before keeps serving while the new one is downloaded, verified and tried.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from cvdeploy.errors import InputError
from cvdeploy.fleet.protocol import now

SLOTS = ("a", "b")
POINTER = "current"
SlotState = Literal["installed", "committed", "rolled-back", "superseded"]


class SlotRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    manifest_sha256: str
    state: SlotState
    at: str
    reason: str = ""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Device:
    """The slots, the pointer and the staging areas of one device directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.pointer = self.root / POINTER
        self.incoming = self.root / "incoming"
        self.downloads = self.root / "downloads"

    def create(self) -> None:
        for d in (self.root / "slots", self.downloads):
            d.mkdir(parents=True, exist_ok=True)

    def slot_dir(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise InputError(f"unknown slot {slot!r}; a device has slots {', '.join(SLOTS)}")
        return self.root / "slots" / slot

    # -- the pointer ------------------------------------------------------------------------------

    def active_slot(self) -> str | None:
        """The slot `current` points to, or None before the first install."""
        try:
            target = os.readlink(self.pointer)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise InputError(f"{self.pointer} is not the slot pointer this agent writes (a symbolic link): {e}") from None
        slot = Path(target).name
        if Path(target).parent != Path("slots") or slot not in SLOTS:
            raise InputError(f"{self.pointer} points to {target!r}, not to one of the slots (slots/a, slots/b)")
        return slot

    def inactive_slot(self) -> str:
        active = self.active_slot()
        return SLOTS[1] if active == SLOTS[0] else SLOTS[0]

    def switch(self, slot: str) -> None:
        """Point `current` at `slot`, atomically: a new link renamed over the old one."""
        self.slot_dir(slot)
        tmp = self.root / f".{POINTER}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(f"slots/{slot}", tmp)
        os.replace(tmp, self.pointer)
        _fsync_dir(self.root)  # the switch survives a power cut once this returns

    # -- slot records ---------------------------------------------------------------------------

    def _record_path(self, slot: str) -> Path:
        return self.root / "slots" / f"{slot}.json"

    def record(self, slot: str | None) -> SlotRecord | None:
        if slot is None:
            return None
        p = self._record_path(slot)
        try:
            return SlotRecord.model_validate_json(p.read_bytes())
        except (OSError, ValueError):
            return None

    def write_record(self, slot: str, record: SlotRecord) -> None:
        from cvdeploy.fleet.publish import write_atomic

        write_atomic(self._record_path(slot), record.model_dump_json(indent=1).encode())

    def set_state(self, slot: str, state: SlotState, reason: str = "") -> None:
        rec = self.record(slot)
        if rec is not None:
            self.write_record(slot, rec.model_copy(update={"state": state, "reason": reason, "at": now()}))

    def active_record(self) -> SlotRecord | None:
        return self.record(self.active_slot())

    # -- installing -------------------------------------------------------------------------------

    def fresh_incoming(self) -> Path:
        """An empty staging directory for the next version (what an interrupted attempt left there is dropped; its
        partial downloads stay in downloads/)."""
        shutil.rmtree(self.incoming, ignore_errors=True)
        self.incoming.mkdir(parents=True)
        return self.incoming

    def drop_incoming(self) -> None:
        shutil.rmtree(self.incoming, ignore_errors=True)

    def install(self, record: SlotRecord) -> str:
        """Move the checked `incoming/` into the inactive slot (never the active one) and return that slot."""
        slot = self.inactive_slot()
        target = self.slot_dir(slot)
        self._record_path(slot).unlink(missing_ok=True)  # no record while the slot changes: it holds nothing usable
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.incoming, target)
        _fsync_dir(target.parent)
        self.write_record(slot, record)
        return slot


def active_bundle(device_dir: str | os.PathLike[str]) -> Path:
    """The bundle directory a device serves: `DEVICE/current` resolved to its slot. InputError before the first commit."""
    device = Device(device_dir)
    slot = device.active_slot()
    if slot is None:
        raise InputError(f"{device.root} has no active version yet (no {POINTER} pointer): run `cvdeploy fleet agent` first")
    return device.slot_dir(slot)
