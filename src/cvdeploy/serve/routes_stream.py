"""The streaming API: one WebSocket per client, encoded frames in, one JSON answer per frame out, in order, through
the image API's own pipeline, with a bounded number of frames held per connection (docs/streaming.md).

The access middleware is plain HTTP (it passes WebSocket scopes through untouched), so the handshake is checked here
with its own function (`access.check_access`: authentication, rate limits, RBAC, audited denials) on an HTTP view of
the handshake; each frame then counts as one inference request (rate limits, audit, request metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, WebSocket
from prometheus_client import Counter, Gauge
from starlette.requests import Request
from starlette.websockets import WebSocketDisconnect

from cvdeploy.errors import (
    AuthError,
    CvdeployError,
    ImageDecodeError,
    OutputNotRepresentableError,
    PayloadTooLargeError,
    ServerBusyError,
)
from cvdeploy.serve.access import check_access, deny, inference_scope
from cvdeploy.serve.http import status_of
from cvdeploy.serve.limits import BINARY_WEIGHT
from cvdeploy.serve.pipeline import detect_images
from cvdeploy.serve.repository import LoadedModel, Repository
from cvdeploy.serve.stream_options import (  # noqa: F401  (the options' names, importable from here as before)
    MAX_OPTIONS_BYTES,
    OPTION_KEYS,
    POLICIES,
    Options,
    message_options,
    query_options,
)

log = logging.getLogger("cvdeploy.serve")
access_log = logging.getLogger("cvdeploy.access")

# Under drop-oldest the server keeps reading; answers a client has not read yet (dropped ones are a few bytes each)
# are bounded too: past this many per in-flight slot it stops reading, whatever the policy.
UNSENT_PER_SLOT = 16
# Close codes (RFC 6455): 1008 for who the client is or what it asked (the 4xx), 1013 for "try again later" (429, 503).
POLICY_VIOLATION, TRY_AGAIN_LATER, INTERNAL_ERROR = 1008, 1013, 1011


class StreamMetrics:
    """The streams' own series, on the server's registry (docs/observability.md lists them with the others)."""

    def __init__(self, registry: Any) -> None:
        self.received = Counter("cvdeploy_stream_frames_received_total", "Frames received on WebSocket streams", ("model",),
                                registry=registry)
        self.answered = Counter("cvdeploy_stream_frames_answered_total", "Frames answered on WebSocket streams, by outcome "
                                "(result, error, dropped)", ("model", "outcome"), registry=registry)
        self.in_flight = Gauge("cvdeploy_stream_frames_in_flight", "Frames held by WebSocket streams: received, not yet "
                               "answered", registry=registry)
        self.open = Gauge("cvdeploy_streams_open", "Open WebSocket streams", registry=registry)
        self.count = 0  # the open streams, read by the connection cap (a gauge is not meant to be read back)


@dataclass(eq=False)
class _Entry:
    """An answer the stream owes, in order: a frame's (`seq`) or a refused options message's (no seq)."""

    answer: asyncio.Future  # (outcome, JSON text)
    seq: int | None = None
    started: bool = False


def _text(doc: dict) -> str:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


def _error(seq: int | None, e: CvdeployError) -> tuple[str, str]:
    doc: dict[str, Any] = {} if seq is None else {"seq": seq}
    doc |= {"error": e.message if isinstance(e, AuthError) else str(e), "status": status_of(e)}
    if isinstance(e, AuthError) and e.retry_after:
        doc["retry_after"] = round(e.retry_after, 3)
    return "error", _text(doc)


class Stream:
    """One connection: this reader, one task per started frame, and a writer that answers in order.

    Frames are held from their arrival until their answer is sent: at most `in_flight` run at once (decode, batcher,
    finish). Under `block` the reader does not read the socket while `in_flight` frames are held, so the client's
    sends stall (TCP backpressure). Under `drop-oldest` it keeps reading: a frame that finds every slot taken waits,
    at most `in_flight` wait, and when one more arrives the oldest waiting one is answered `{"seq": n, "dropped": true}`.
    A slot frees when its answer is sent, so a client that does not read its answers slows its own stream.
    """

    def __init__(self, ws: WebSocket, http: Request, repo: Repository, metrics: StreamMetrics, name: str,
                 version: str | None, model: LoadedModel, opts: Options) -> None:
        self.ws, self.http, self.repo, self.metrics = ws, http, repo, metrics
        self.name, self.version, self.label, self.opts = name, version, model.name, opts
        self.cohort = http.headers.get("x-cvdeploy-cohort")  # a canary release's side, as on the image API
        self.model = model  # the handshake's: options messages are checked against it
        self.writes: asyncio.Queue[_Entry] = asyncio.Queue()
        self.waiting: deque[tuple[_Entry, bytes, Options]] = deque()
        self.tasks: set[asyncio.Task] = set()
        self.room = asyncio.Event()
        self.held = 0  # entries not yet sent
        self.running = 0  # frames started, answer not yet sent
        self.next_seq = 0
        self.sent = {"result": 0, "error": 0, "dropped": 0}
        self.gone = False  # the client left (or a send failed): nothing more is read or sent
        self.failed = False  # the writer failed (a bug): the stream is closed with 1011
        self.client_code: int | None = None  # the close code the client sent, when it closed the stream

    async def run(self) -> tuple[int, str] | None:
        """Serve until the client leaves or the stream idles; the close code and reason to send, if any."""
        writer = asyncio.create_task(self._write())
        try:
            return await self._read()
        finally:
            self.gone = True
            for t in (writer, *self.tasks):
                t.cancel()
            await asyncio.gather(writer, *self.tasks, return_exceptions=True)
            self.metrics.in_flight.dec(self.held)
            self.held = 0

    # -- reading ---------------------------------------------------------------------------------

    def _cap(self) -> int:
        return self.opts.in_flight if self.opts.policy == "block" else self.opts.in_flight * UNSENT_PER_SLOT

    async def _read(self) -> tuple[int, str] | None:
        idle = self.repo.settings.stream_idle_timeout_s
        while True:
            while self.held >= self._cap() and not self.gone:
                self.room.clear()
                await self.room.wait()
            if self.gone:
                return (INTERNAL_ERROR, "internal server error") if self.failed else None
            try:
                async with asyncio.timeout(idle):
                    message = await self.ws.receive()
            except TimeoutError:
                if self.held:
                    continue  # frames in flight: not idle
                return 1000, f"idle for {idle:g} s"
            if message["type"] == "websocket.disconnect":
                self.client_code = message.get("code")
                return None
            if message.get("bytes") is not None:
                self._frame(message["bytes"])
            elif message.get("text") is not None:
                try:
                    opts = message_options(message["text"], self.opts)
                    opts.check(self.model, self.repo.settings.stream_max_in_flight)
                    self.opts = opts
                except CvdeployError as e:
                    self._push(_Entry(self._resolved(*_error(None, e))))

    def _push(self, entry: _Entry) -> None:
        self.held += 1
        self.metrics.in_flight.inc()
        self.writes.put_nowait(entry)

    def _resolved(self, outcome: str, text: str) -> asyncio.Future:
        f = asyncio.get_running_loop().create_future()
        f.set_result((outcome, text))
        return f

    def _frame(self, blob: bytes) -> None:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        self.metrics.received.labels(self.label).inc()
        limited = self._rate_limited(seq)
        if limited is not None:
            self._push(_Entry(self._resolved(*limited), seq))
            return
        entry = _Entry(asyncio.get_running_loop().create_future(), seq)
        self._push(entry)
        if self.running < self.opts.in_flight and not self.waiting:
            self._start(entry, blob, self.opts)
            return
        self.waiting.append((entry, blob, self.opts))
        if self.opts.policy == "drop-oldest" and len(self.waiting) > self.opts.in_flight:
            old, _, _ = self.waiting.popleft()
            old.answer.set_result(("dropped", _text({"seq": old.seq, "dropped": True})))

    def _rate_limited(self, seq: int) -> tuple[str, str] | None:
        """Each frame is one request against the address's and the principal's rate limits, as a POST would be."""
        policy = self.repo.settings.auth
        if policy is None:
            return None
        principal = self.http.state.principal
        for key, what, message in ((f"addr:{self.http.state.client}", "address", "too many requests from this address"),
                                   (f"principal:{principal.name}", "principal", "too many requests for this principal")):
            wait = policy.rate_ok(key)
            if wait:
                deny(self.repo, self.http, "rate_limit", "denied", self.http.url.path, f"rate limited ({what})")
                return _error(seq, AuthError(429, message, f"rate limited ({what})", retry_after=wait))
        return None

    def _start(self, entry: _Entry, blob: bytes, opts: Options) -> None:
        entry.started = True
        self.running += 1
        task = asyncio.create_task(self._answer(entry.seq, blob, opts))  # type: ignore[arg-type]
        self.tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self.tasks.discard(t)
            if not t.cancelled() and not entry.answer.done():
                entry.answer.set_result(t.result())

        task.add_done_callback(done)

    async def _answer(self, seq: int, blob: bytes, opts: Options) -> tuple[str, str]:
        """One frame through the image API's pipeline; every failure is this frame's answer, never the stream's end."""
        repo = self.repo
        try:
            # Per frame, as per request on the image API: a reload or a canary release may answer a long stream's frames.
            m = repo.pick(self.name, self.version, self.cohort)
            async with inference_scope(repo, m, self.http, "stream") as record:
                if len(blob) > repo.settings.max_body_bytes:
                    raise PayloadTooLargeError(f"frame of {len(blob)} bytes is larger than the limit ({repo.settings.max_body_bytes} bytes)")
                if not blob:
                    raise ImageDecodeError("empty frame: send one encoded image (JPEG, PNG, ...) per binary message")
                record.body = blob
                repo.budget.admit(record.lease, len(blob) * BINARY_WEIGHT)
                (result,) = await detect_images(repo, m, [blob], opts.check(m, repo.settings.stream_max_in_flight), opts.annotate)
            try:
                return "result", _text({"seq": seq, "model_name": m.name, "model_version": m.version, **result})
            except ValueError:
                raise OutputNotRepresentableError("the answer holds NaN or infinity, which JSON cannot carry") from None
        except CvdeployError as e:
            return _error(seq, e)
        except Exception:  # a bug, not the client's doing: logged, answered as HTTP would (500), the stream goes on
            log.exception("unhandled error on frame %d of a stream to %s", seq, self.http.url.path)
            return "error", _text({"seq": seq, "error": "internal server error", "status": 500})

    # -- writing ---------------------------------------------------------------------------------

    async def _write(self) -> None:
        try:
            while True:
                entry = await self.writes.get()
                outcome, text = await entry.answer
                if self.gone:
                    return
                await self.ws.send_text(text)
                self.held -= 1
                self.metrics.in_flight.dec()
                if entry.seq is not None:  # a frame's answer (not a refused options message's)
                    self.metrics.answered.labels(self.label, outcome).inc()
                    self.sent[outcome] += 1
                if entry.started:
                    self.running -= 1
                    while self.waiting and self.running < self.opts.in_flight:
                        self._start(*self.waiting.popleft())
                self.room.set()
        except (WebSocketDisconnect, OSError):  # the client left while an answer was on its way
            pass
        except Exception:  # a bug: logged, and the stream ends with 1011
            log.exception("unhandled error answering a stream to %s", self.http.url.path)
            self.failed = True
        finally:
            self.gone = True
            self.room.set()


async def _refuse(ws: WebSocket, status: int, message: str) -> int:
    """Refuse a stream at its handshake: the error as one JSON message, then a close whose reason repeats it."""
    code = TRY_AGAIN_LATER if status in (429, 503, 504) else POLICY_VIOLATION
    await ws.accept()
    await ws.send_text(_text({"error": message, "status": status}))
    await ws.close(code, message.encode()[:123].decode(errors="ignore"))  # a close reason holds 123 bytes
    return code


def register(app: FastAPI, repo: Repository) -> None:
    """Add `/v1/models/{name}/stream` (WebSocket) to `app`."""
    metrics = StreamMetrics(repo.metrics.registry)

    async def handshake(ws: WebSocket, http: Request, name: str) -> Stream | int:
        """The stream to serve, or the close code it was refused with (auth, options, model, the cap)."""
        denied = await check_access(repo, http)
        if denied is not None:
            return await _refuse(ws, denied.status_code, json.loads(bytes(denied.body))["error"])
        settings = repo.settings
        try:
            opts, version = query_options(http, settings.stream_max_in_flight, settings.stream_policy)
            m = repo.pick(name, version, http.headers.get("x-cvdeploy-cohort"))
            opts.check(m, settings.stream_max_in_flight)
            if metrics.count >= settings.stream_max_connections:
                raise ServerBusyError(f"too many open streams (limit {settings.stream_max_connections}); retry later")
        except CvdeployError as e:
            return await _refuse(ws, status_of(e), e.message if isinstance(e, AuthError) else str(e))
        return Stream(ws, http, repo, metrics, name, version, m, opts)

    @app.websocket("/v1/models/{name}/stream")
    async def stream(ws: WebSocket, name: str) -> None:
        t0 = time.perf_counter()
        # check_access and the audit take an HTTP request: the handshake is an HTTP GET.
        http = Request({**ws.scope, "type": "http", "method": "GET"})
        http.state.request_id = ws.headers.get("x-request-id") or uuid.uuid4().hex
        s: Stream | int | None = None
        code: int | None = None
        try:
            s = await handshake(ws, http, name)
            if isinstance(s, int):
                code = s
                return
            metrics.count += 1  # counted before the first await: concurrent handshakes see it
            metrics.open.inc()
            try:
                await ws.accept()
                closing = await s.run()
            finally:
                metrics.count -= 1
                metrics.open.dec()
            code = closing[0] if closing is not None else s.client_code
            if closing is not None:
                await ws.close(*closing)
        except (WebSocketDisconnect, OSError):  # the client left during the handshake or the close
            code = code or 1006
        except Exception:  # a bug: logged; the client sees 1011, never a traceback
            log.exception("unhandled error on the stream %s", http.url.path)
            code = INTERNAL_ERROR
            with contextlib.suppress(Exception):  # the connection may be gone already
                await ws.close(INTERNAL_ERROR, "internal server error")
        finally:
            if access_log.isEnabledFor(logging.INFO):
                frames, sent = (s.next_seq, s.sent) if isinstance(s, Stream) else (0, {})
                access_log.info("WEBSOCKET %s %s", http.url.path, code, extra={
                    "request_id": http.state.request_id, "method": "WEBSOCKET", "path": http.url.path, "status": code,
                    "ms": round((time.perf_counter() - t0) * 1000, 2), "client": ws.client.host if ws.client else None,
                    "frames": frames, **{f"frames_{k}": v for k, v in sent.items()}})
