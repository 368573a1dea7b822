"""Verifying an audit log: walk its hash chain, check its checkpoints, and hold it against exported checkpoints and
anchors, naming the first break and every contradiction (edit, deletion, reordering, truncation, wipe, rewrite)."""

from __future__ import annotations

import hmac
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvdeploy.errors import InputError
from cvdeploy.security.audit_anchor import anchor_is_authentic, anchor_shape_ok, read_anchors
from cvdeploy.security.audit_chain import FIELDS, GENESIS, checkpoint_mac, entry_mac
from cvdeploy.security.audit_store import read_rows


@dataclass
class Verdict:
    ok: bool
    entries: int
    problems: list[str] = field(default_factory=list)
    last_seq: int = 0  # the highest sequence number in the log (0 when it has none)
    head_mac: str = GENESIS  # the MAC of the last entry that verified: the chain head when ok
    anchor: dict[str, Any] | None = None  # the newest valid anchor the log was held against
    anchors_valid: int = 0


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def verify(path: str | os.PathLike[str], key: bytes, anchor: str | os.PathLike[str] | dict | None = None, *,
           anchors: str | os.PathLike[str] | Iterable[dict[str, Any]] | None = None) -> Verdict:
    """Walk the chain; report the first break and any checkpoint, exported checkpoint (`anchor`) or anchor it contradicts.

    `anchors` is an anchor file (JSON lines, see `AuditLog.anchor`) or a list of anchors. Every anchor's MAC is
    checked (a failing one is reported as forged); the log is then held against the newest valid one, the one
    with the highest sequence number: as the log only grows, that is the latest state, whatever order the
    lines are in. Fewer entries or a lower last sequence number than it (truncation, wipe), or another MAC at
    its sequence number (rewrite), is a problem.
    """
    rows, cps = read_rows(path, f"SELECT seq, {', '.join(FIELDS)}, prev_mac, mac FROM entries ORDER BY rowid",
                          "SELECT seq, head_mac, ts, mac FROM checkpoints ORDER BY seq")
    problems: list[str] = []
    prev, expected_seq = GENESIS, 1
    macs: dict[int, str] = {}
    for row in rows:
        seq, values, prev_mac, mac = row[0], dict(zip(FIELDS, row[1 : 1 + len(FIELDS)], strict=True)), row[-2], row[-1]
        if seq != expected_seq:
            problems.append(f"entry {expected_seq} is missing or out of order (found {seq} next): deleted, inserted or reordered")
            break
        if prev_mac != prev:
            problems.append(f"entry {seq} does not follow entry {seq - 1} (chain broken: reordered or inserted)")
            break
        if not hmac.compare_digest(entry_mac(key, seq, values, prev), mac):
            problems.append(f"entry {seq} was modified (its MAC does not match its content)")
            break
        macs[seq] = mac
        prev, expected_seq = mac, seq + 1
    last = expected_seq - 1 if not problems else None
    for seq, head, ts, mac in cps:
        if not hmac.compare_digest(checkpoint_mac(key, seq, head, ts), mac):
            problems.append(f"checkpoint at entry {seq} was forged or modified")
        elif last is not None and seq > last:
            problems.append(f"checkpoint at entry {seq} but the log ends at entry {last}: truncated")
        elif seq in macs and macs[seq] != head:
            problems.append(f"checkpoint at entry {seq} does not match the log's entry {seq}")
    if anchor is not None:
        if not isinstance(anchor, dict) and not Path(anchor).is_file():
            raise InputError(f"exported checkpoint not found: {anchor}")
        try:
            a = anchor if isinstance(anchor, dict) else json.loads(Path(anchor).read_text())
            authentic = hmac.compare_digest(checkpoint_mac(key, a["seq"], a["head_mac"], a["ts"]), a["mac"])
        except (ValueError, KeyError, TypeError):
            a, authentic = {}, False
        if not authentic:
            problems.append("the exported checkpoint is not authentic")
        elif last is not None and a["seq"] > last:
            problems.append(f"the exported checkpoint covers entry {a['seq']} but the log ends at entry {last}: truncated")
        elif a["seq"] in macs and macs[a["seq"]] != a["head_mac"]:
            problems.append(f"the log's entry {a['seq']} differs from the exported checkpoint")
    entries = len(rows)
    last_seq = max((r[0] for r in rows), default=0)
    newest, valid = None, 0
    if anchors is not None:
        # The stored MACs, chain-verified or not: a rewrite is named even past a break the walk stopped at.
        stored = {r[0]: r[-1] for r in rows}
        newest, valid = _check_anchors(key, read_anchors(anchors), entries, last_seq, stored, problems)
    return Verdict(not problems, entries, problems, last_seq, prev, newest, valid)


def _check_anchors(key: bytes, lines: list[tuple[int, Any]], entries: int, last_seq: int, stored: dict[int, str],
                   problems: list[str]) -> tuple[dict[str, Any] | None, int]:
    valid: list[dict[str, Any]] = []
    for i, a in lines:
        if not anchor_shape_ok(a):
            # Not skipped: hiding the newest anchor behind a garbled line would let a cut back to an older one pass.
            problems.append(f"anchor line {i} is not an anchor (damaged or forged)")
        elif not anchor_is_authentic(key, a):
            problems.append(f"anchor line {i} is forged or was modified: its MAC does not verify with this key "
                            f"(it claims {a['entries']} entries up to entry {a['last_seq']})")
        else:
            valid.append(a)
    if not valid:
        problems.append("no valid anchor to check the log against (the anchor file is empty or every line failed)")
        return None, 0
    a = max(valid, key=lambda x: (x["last_seq"], x["entries"], x["ts"]))
    when = f"the anchor of {_utc(a['ts'])} ({a['entries']} entries up to entry {a['last_seq']})"
    if entries == 0 and a["entries"] > 0:
        problems.append(f"wiped: the log has no entries, but {when}")
    elif last_seq < a["last_seq"]:
        problems.append(f"truncated: the log ends at entry {last_seq} with {entries} entries, but {when}; "
                        f"{a['last_seq'] - last_seq} entries are gone")
    elif entries < a["entries"]:
        problems.append(f"entries deleted: the log has {entries} entries up to entry {last_seq}, but {when}")
    if a["last_seq"] and a["last_seq"] in stored and not hmac.compare_digest(stored[a["last_seq"]], a["head_mac"]):
        problems.append(f"rewritten: the log's entry {a['last_seq']} is not the one anchored by {when} (another MAC): "
                        "the log was replaced or rewritten up to there")
    return a, len(valid)
