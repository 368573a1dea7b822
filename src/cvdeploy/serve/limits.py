"""What the server holds at once: request bytes in flight (admission), and slow or idle connections (timeouts, a cap).

Memory: a request's body becomes several copies of itself (the bytes, the decoded tensor, its place in a batch;
a JSON tensor becomes Python floats first, about 12 bytes of memory per byte of JSON). The budget charges each
body its size times that weight and refuses (503 + Retry-After) what does not fit, so that the peak resident
memory stays under a ceiling whatever the mix of requests: see docs/security.md for the formula.

Connections: uvicorn closes a keep-alive connection idle for `timeout_keep_alive`, but a client that sends its
headers slowly (or never) is never dropped, and every such connection holds a descriptor. `guarded_protocol`
adds a header timeout and a connection cap to uvicorn's HTTP protocol; the body timeout is enforced where the
body is read (`serve.app._body`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from typing import Any

from cvdeploy.errors import ServerBusyError

JSON_WEIGHT = 12  # measured: a 29 MB JSON FP32 body raised the peak by ~330 MB
BINARY_WEIGHT = 3  # the body, the tensor (a view of it, or one copy), its place in the batch
_TRIM_AFTER = 64 * 1024 * 1024  # bytes released since the last trim before memory is handed back to the OS


@dataclass
class Lease:
    """What one request was admitted with (from the main pool, and from the reserve for small requests)."""

    bytes: int = 0
    reserve: int = 0


class ByteBudget:
    """Weighted request bytes in flight, at most `limit` plus a reserve of `limit / 8` that only small requests (an
    image, a small tensor: at most `limit / 64` each) may use, so that a flood of large bodies cannot starve them.
    Used from the event loop only (no lock needed)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the in-flight byte budget must be at least 1 byte")
        self.limit = limit
        self.reserve_limit = limit // 8
        self.small = max(1, limit // 64)
        self.used = 0
        self.reserve_used = 0
        self.peak = 0
        self._released = 0

    @staticmethod
    def lease() -> Lease:
        return Lease()

    @staticmethod
    def weight(content_type: str | None) -> int:
        ctype = (content_type or "").split(";")[0].strip().lower()
        return JSON_WEIGHT if ctype in ("", "application/json", "text/json") else BINARY_WEIGHT

    def admit(self, lease: Lease, n: int) -> None:
        """Charge `n` bytes to `lease`, or refuse with ServerBusyError. A request alone on an idle server is always
        admitted (else one larger than the budget could never run); the body limit bounds it."""
        if n <= 0:
            return
        if self.used == 0 or self.used + n <= self.limit:
            self.used += n
            lease.bytes += n
        elif lease.bytes + lease.reserve + n <= self.small and self.reserve_used + n <= self.reserve_limit:
            self.reserve_used += n
            lease.reserve += n
        else:
            raise ServerBusyError(f"the server holds {self.used // 2**20} MiB of requests in flight (limit "
                                  f"{self.limit // 2**20} MiB); retry later")
        self.peak = max(self.peak, self.used + self.reserve_used)

    def release(self, lease: Lease) -> None:
        self.used -= lease.bytes
        self.reserve_used -= lease.reserve
        self._released += lease.bytes + lease.reserve
        lease.bytes = lease.reserve = 0
        if self.used == 0 and self.reserve_used == 0 and self._released >= _TRIM_AFTER:
            # glibc keeps freed large blocks in its arenas: without a trim, RSS stays at the peak of a burst forever.
            self._released = 0
            _malloc_trim()


_libc: Any = None


def _malloc_trim() -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        _libc = False


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with a header timeout and a connection cap.

    The header timer runs from the connection's first byte of each request (and from the connection itself, so
    that a client that never sends anything is dropped too) until the request's headers are complete. A connection
    beyond `max_connections` is closed at once, before it can hold a descriptor and memory.
    """
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    log = logging.getLogger("cvdeploy.serve")

    class Guarded(Base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            full = len(self.connections) >= max_connections
            super().connection_made(transport)
            if full:
                log.warning("connection cap (%d) reached: closing a new connection", max_connections)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        if hasattr(Base, "on_headers_complete"):  # httptools
            def on_message_begin(self) -> None:
                super().on_message_begin()
                self._arm()

            def on_headers_complete(self) -> None:
                self._disarm()
                super().on_headers_complete()
        else:  # pragma: no cover - h11: the request event means the headers are in
            def handle_events(self) -> None:
                had = self.cycle
                super().handle_events()
                if self.cycle is not had:
                    self._disarm()

    Guarded.__name__ = f"Guarded{Base.__name__}"
    return Guarded
