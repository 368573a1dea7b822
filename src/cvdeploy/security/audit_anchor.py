"""Anchors of the audit log: signed records of its state, kept in a file apart from the database.

Checkpoints live in the same file as the entries and go with them: neither can reveal a log cut after its last
checkpoint, or wiped. An anchor (the entry count, the last sequence number, the chain head) appended to a file kept
elsewhere closes that gap; `verify(..., anchors=...)` holds the log against the newest valid one.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cvdeploy.errors import InputError
from cvdeploy.security.audit_chain import hmac_hex

ANCHOR_TYPE = "cvdeploy.audit.anchor"
ANCHOR_VERSION = 1
_ANCHOR_FIELDS = ("type", "v", "entries", "last_seq", "head_mac", "ts")


def _anchor_mac(key: bytes, anchor: dict[str, Any]) -> str:
    # The "anchor|" prefix keeps an anchor's MAC from ever being valid as an entry's or a checkpoint's.
    body = json.dumps({k: anchor[k] for k in _ANCHOR_FIELDS}, sort_keys=True, separators=(",", ":"))
    return hmac_hex(key, b"anchor|" + body.encode())


def make_anchor(key: bytes, *, entries: int, last_seq: int, head_mac: str, ts: float | None = None) -> dict[str, Any]:
    """A small JSON-able document: the entry count, the last sequence number, the chain head's MAC and the
    time, under an HMAC-SHA256 with the audit key (which never leaves the server; anyone with the key can
    check an anchor, no one without it can make one)."""
    a: dict[str, Any] = {"type": ANCHOR_TYPE, "v": ANCHOR_VERSION, "entries": int(entries), "last_seq": int(last_seq),
                         "head_mac": head_mac, "ts": float(time.time() if ts is None else ts)}
    a["mac"] = _anchor_mac(key, a)
    return a


def anchor_shape_ok(a: Any) -> bool:
    """Whether `a` has an anchor's fields with their types (its MAC unchecked)."""
    if not isinstance(a, dict) or a.get("type") != ANCHOR_TYPE or a.get("v") != ANCHOR_VERSION:
        return False
    ints_ok = all(isinstance(a.get(k), int) and not isinstance(a.get(k), bool) and a[k] >= 0 for k in ("entries", "last_seq"))
    return (ints_ok and isinstance(a.get("ts"), int | float) and not isinstance(a.get("ts"), bool)
            and isinstance(a.get("head_mac"), str) and len(a["head_mac"]) == 64 and isinstance(a.get("mac"), str))


def anchor_is_authentic(key: bytes, anchor: Any) -> bool:
    """Whether `anchor` is well formed and its MAC verifies with `key`."""
    return anchor_shape_ok(anchor) and hmac.compare_digest(_anchor_mac(key, anchor), anchor["mac"])


def write_anchor(path: str | os.PathLike[str], anchor: dict[str, Any]) -> None:
    """Append `anchor` as one JSON line to `path` (created 0600), synced to disk before returning."""
    line = (json.dumps(anchor, sort_keys=True, separators=(",", ":")) + "\n").encode()
    fd = os.open(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        # One write on an O_APPEND descriptor: a line from the server's writer and one from the CLI
        # cannot interleave, and a crash leaves at worst a torn last line, never a corrupted older one.
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_anchors(anchors: str | os.PathLike[str] | Iterable[dict[str, Any]]) -> list[tuple[int, Any]]:
    """(line number, parsed document or None when the line is not JSON) for each non-blank line."""
    if not isinstance(anchors, str | os.PathLike):
        return [(i, a) for i, a in enumerate(anchors, 1)]
    p = Path(anchors)
    if not p.is_file():
        raise InputError(f"anchor file not found: {p}")
    out: list[tuple[int, Any]] = []
    for i, raw in enumerate(p.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            out.append((i, json.loads(raw)))
        except (ValueError, UnicodeDecodeError):
            out.append((i, None))
    return out
