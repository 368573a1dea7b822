"""A device's A/B slots and pointer: installs go to the inactive slot, the pointer switches atomically, odd pointers are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cvdeploy.errors import InputError
from cvdeploy.fleet.protocol import check_name
from cvdeploy.fleet.slots import Device, SlotRecord, active_bundle


def _install(device: Device, version: str) -> str:
    incoming = device.fresh_incoming()
    (incoming / "manifest.json").write_text(version)
    return device.install(SlotRecord(version=version, manifest_sha256="0" * 64, state="installed", at="now"))


def test_installs_alternate_between_slots_and_never_touch_the_active_one(tmp_path: Path) -> None:
    device = Device(tmp_path / "dev")
    device.create()
    with pytest.raises(InputError, match="no active version yet"):
        active_bundle(device.root)
    assert _install(device, "v1") == "a"
    device.switch("a")
    assert active_bundle(device.root) == device.slot_dir("a") and os.readlink(device.pointer) == "slots/a"
    assert _install(device, "v2") == "b"  # the inactive slot
    assert (device.slot_dir("a") / "manifest.json").read_text() == "v1"  # the active one untouched
    assert device.active_record().version == "v1"  # until the switch
    device.switch("b")
    assert device.active_record().version == "v2" and device.inactive_slot() == "a"
    assert _install(device, "v3") == "a" and (device.slot_dir("b") / "manifest.json").read_text() == "v2"
    assert not device.incoming.exists() and not (device.root / ".current.tmp").exists()


def test_a_pointer_the_agent_did_not_write_is_refused(tmp_path: Path) -> None:
    device = Device(tmp_path / "dev")
    device.create()
    os.symlink("/etc", device.pointer)
    with pytest.raises(InputError, match="not to one of the slots"):
        device.active_slot()
    device.pointer.unlink()
    device.pointer.write_text("slots/a")  # a file, not a link
    with pytest.raises(InputError, match="not the slot pointer"):
        device.active_slot()


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "..", "x" * 65, "a b", "ä"])
def test_names_that_could_become_odd_file_names_are_refused(name: str) -> None:
    with pytest.raises(InputError, match="not a valid name"):
        check_name(name, "device")


def test_ordinary_names_are_accepted() -> None:
    for name in ("camera-01", "v2", "yolo11n-shapes-3705a37f3fce", "edge_7.lab"):
        assert check_name(name, "device") == name
