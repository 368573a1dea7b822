"""Aggregation of denials for the audit log: a flood of refused requests becomes a few entries and a count, so that it
cannot flood the log (or the disk under it)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cvdeploy.errors import InputError

if TYPE_CHECKING:
    from cvdeploy.security.audit import AuditLog


@dataclass
class _Window:
    start: float
    first_seq: int
    outcome: str
    suppressed: int = 0
    written: int = 1


class DenialAggregator:
    """One entry per (action, client) per interval instead of one per denial: a flood must not flood the log.

    The first `burst` denials of a pair in an interval are written at once, each with its details (so the
    log shows the flood began, when, and a sample of what was tried); the next ones in the same interval are only counted, and one summary entry ("N more rate_limit
    denials for client X in the 10 s after entry S") is written when the interval ends: on the next
    `record` after it ends, on `flush_expired()` (for a periodic timer) or `flush()` (at shutdown: call it
    before closing the log). At most `max_pairs` pairs are tracked; past that, the oldest is summarised
    and dropped, so memory stays bounded whatever the number of addresses. Thread-safe.
    """

    def __init__(self, log: AuditLog, interval_s: float = 10.0, *, max_pairs: int = 10_000, burst: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not interval_s > 0 or max_pairs < 1 or burst < 1:
            raise InputError("the aggregation interval must be positive, max_pairs and burst at least 1")
        self.log, self.interval_s, self.max_pairs, self.burst = log, float(interval_s), max_pairs, burst
        self._clock = clock
        self._lock = threading.Lock()
        # Insertion order is start order (a pair is re-inserted when its new interval starts), so the
        # ended intervals and the oldest pair are always at the front: sweeping costs O(1) per record.
        self._open: OrderedDict[tuple[str, str | None], _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def record(self, action: str, client: str | None, details: Any = None, *, outcome: str = "denied", **fields: Any) -> int | None:
        """Record one denial; the sequence number of the entry written, or None when it was only counted."""
        with self._lock:
            # The append happens under this lock so that a pair's first entry always precedes its summary.
            now = self._clock()
            self._sweep_locked(now)
            w = self._open.get((action, client))
            if w is not None and w.written >= self.burst:
                w.suppressed += 1
                return None
            if w is not None:
                w.written += 1
                return self.log.append(action, outcome, client=client, details=details, **fields)
            seq = self.log.append(action, outcome, client=client, details=details, **fields)
            self._open[(action, client)] = _Window(now, seq, outcome)
            while len(self._open) > self.max_pairs:
                k, old = self._open.popitem(last=False)
                self._summarise_locked(k, old, now)
            return seq

    def flush_expired(self) -> int:
        """Write the summaries of the intervals that have ended; the number of entries written."""
        with self._lock:
            return self._sweep_locked(self._clock())

    def flush(self) -> int:
        """Write the summaries of every open interval, ended or not, and forget them; the number written."""
        with self._lock:
            now, n = self._clock(), 0
            while self._open:
                k, w = self._open.popitem(last=False)
                n += self._summarise_locked(k, w, now)
            return n

    def _sweep_locked(self, now: float) -> int:
        n = 0
        while self._open:
            k, w = next(iter(self._open.items()))
            if now - w.start < self.interval_s:
                break
            del self._open[k]
            n += self._summarise_locked(k, w, now)
        return n

    def _summarise_locked(self, k: tuple[str, str | None], w: _Window, now: float) -> int:
        if not w.suppressed:
            return 0
        action, client = k
        window = f"{min(self.interval_s, now - w.start):.1f}".removesuffix(".0")
        self.log.append(action, w.outcome, client=client,
                        details=f"{w.suppressed} more {action} denials for client {client} in the {window} s after entry {w.first_seq}")
        return 1
