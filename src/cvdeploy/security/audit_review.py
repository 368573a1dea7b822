"""Reviewing an audit log: the entries a person should look at (bursts of failed authentication, denials, revoked
keys, one-off addresses, activity in quiet hours), as one line each."""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict

from cvdeploy.security.audit_store import read_rows


def review(path: str | os.PathLike[str], *, burst: int = 5, window_s: float = 60.0, quiet_hours: tuple[int, int] = (0, 6)) -> list[str]:
    """Flags: bursts of failed authentication per address, authorization denials, revoked keys used,
    addresses seen once among many, and activity in quiet hours (UTC)."""
    [rows] = read_rows(path, "SELECT seq, ts, principal, action, outcome, client, details FROM entries ORDER BY seq")
    flags: list[str] = []
    fails: dict[str, list[float]] = defaultdict(list)
    clients = Counter(r[5] for r in rows if r[5])
    for seq, ts, principal, action, outcome, client, details in rows:
        if action == "authenticate" and outcome != "success":
            times = [t for t in fails[client or "?"] if ts - t <= window_s] + [ts]
            fails[client or "?"] = times
            if len(times) == burst:
                flags.append(f"entry {seq}: {burst} failed authentications from {client} within {window_s:g} s")
        if outcome == "denied":
            flags.append(f"entry {seq}: {principal or 'anonymous'} denied {action} from {client}")
        if details and "revoked" in details:
            flags.append(f"entry {seq}: a revoked key was used from {client}")
        hour = time.gmtime(ts).tm_hour
        if quiet_hours[0] <= hour < quiet_hours[1] and action not in ("infer",):
            flags.append(f"entry {seq}: {action} by {principal or 'anonymous'} at {hour:02d}h UTC (quiet hours)")
    if len(rows) >= 20:
        for c, n in clients.items():
            if n == 1:
                flags.append(f"address {c} appears once in {len(rows)} entries")
    return flags
