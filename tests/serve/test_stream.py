"""The WebSocket stream against a real server: answers in order equal to the Predictor's, both backpressure policies,
bad frames and fuzz answered without ending the stream, authentication and rate limits, and a clean end when the client
leaves mid-stream (docs/streaming.md)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import sqlite3
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from cvdeploy import Predictor
from cvdeploy.security.audit import AuditLog
from cvdeploy.security.auth import AuthPolicy, KeyStore

MODEL = "yolo11n-shapes"
ROOT = Path(__file__).resolve().parents[2]
MAX_BODY = 4 * 1024 * 1024
MAX_PIXELS = 2_000_000


@pytest.fixture(scope="module")
def images(shapes_data: Path) -> list[Path]:
    paths = sorted((shapes_data / "images" / "val").glob("*.jpg"))
    assert len(paths) >= 40
    return paths


@pytest.fixture(scope="module")
def frames(images: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in images]


@pytest.fixture(scope="module")
def srv(demo_bundle: Path, server_factory):
    return server_factory([str(demo_bundle)], max_batch=4, max_delay_ms=5.0, max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS,
                          stream_max_in_flight=4, stream_max_connections=3)


def ws_url(server, query: str = "") -> str:
    return server.url.replace("http://", "ws://", 1) + f"/v1/models/{MODEL}/stream" + (f"?{query}" if query else "")


def open_stream(server, query: str = "", headers: dict | None = None) -> ClientConnection:
    # proxy=None: the client would otherwise read proxy settings from the environment
    return connect(ws_url(server, query), additional_headers=headers or {}, proxy=None, open_timeout=60, max_size=None)


def read(ws: ClientConnection, n: int) -> list[dict]:
    return [json.loads(ws.recv(timeout=120)) for _ in range(n)]


def send_all(ws: ClientConnection, messages: list) -> threading.Thread:
    """Send on a thread, so that the test reads answers meanwhile (as the documented client does)."""
    t = threading.Thread(target=lambda: [ws.send(m) for m in messages], daemon=True)
    t.start()
    return t


def closed_with(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as e:
        ws.recv(timeout=60)
    assert e.value.rcvd is not None, "the server closed without a close frame"
    return e.value.rcvd.code, e.value.rcvd.reason


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if re.match(rf"{name}(\{{| )", line))


def wait_for_metric(server, name: str, value: float) -> float:
    """The metric once it reaches `value` (the server ends a stream's tasks after the client has gone), or its last."""
    deadline = time.monotonic() + 30
    while (got := metric(server, name)) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    x2, y2 = np.minimum(a[:, 2], b[:, 2]), np.minimum(a[:, 3], b[:, 3])
    inter = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_answers_come_in_order_and_equal_the_predictor(srv, demo_bundle: Path, images: list[Path], frames: list[bytes]) -> None:
    """20 frames of varied sizes, 4 in flight (they share batches): one answer each, seq 0..19, each the Predictor's."""
    with open_stream(srv, "in_flight=4") as ws:
        sender = send_all(ws, frames[:20])
        answers = read(ws, 20)
        sender.join()
    assert [a["seq"] for a in answers] == list(range(20))
    predictor = Predictor(demo_bundle)
    matched = 0
    for path, a in zip(images[:20], answers, strict=True):
        assert a["model_name"] == MODEL and "error" not in a and "dropped" not in a, a
        # The Predictor's answer in the image API's own JSON form (boxes to 0.01 px, confidences to 1e-5): a 20 px box
        # off by one rounding step is IoU 0.999 already, so raw floats would be compared with rounded ones.
        ref = predictor.predict(path).to_dict()["detections"]
        assert (a["image"]["height"], a["image"]["width"]) == cv2.imread(str(path)).shape[:2]
        got = a["detections"]
        assert len(got) == len(ref), path.name
        if got:
            box = lambda ds: np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in ds])  # noqa: E731
            assert (_iou(box(got), box(ref)) >= 0.999).all(), path.name
            assert np.abs(np.array([d["confidence"] for d in got]) - [d["confidence"] for d in ref]).max() <= 1e-4, path.name
            assert [d["class_id"] for d in got] == [d["class_id"] for d in ref], path.name
            matched += len(got)
    assert matched > 20  # the comparison compared something


def test_options_from_the_query_and_from_a_message(srv, frames: list[bytes]) -> None:
    with open_stream(srv, "conf=0.99") as ws:
        ws.send(frames[0])
        (strict,) = read(ws, 1)
        ws.send(json.dumps({"conf": 0.05, "classes": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], "annotate": True}))
        ws.send(frames[0])
        (loose,) = read(ws, 1)
        ws.send(json.dumps({"conf": None, "annotate": False}))  # back to the bundle's threshold
        ws.send(frames[0])
        (default,) = read(ws, 1)
    assert (strict["seq"], loose["seq"], default["seq"]) == (0, 1, 2)
    assert len(strict["detections"]) < len(default["detections"]) <= len(loose["detections"])
    assert loose["annotated_image"] and "annotated_image" not in default


def test_drop_oldest_accounts_for_every_frame_in_order(srv, frames: list[bytes]) -> None:
    """A burst of 40 frames, 1 in flight, read only once all are sent: the model is far slower than the burst, so
    frames wait and the oldest waiting ones are dropped; every frame is answered once, in order, the first and the
    newest never dropped (the newest always runs: nothing newer can push it out)."""
    dropped_before = metric(srv, 'cvdeploy_stream_frames_answered_total{model="yolo11n-shapes",outcome="dropped"}')
    burst = frames[:40]
    with open_stream(srv, "in_flight=1&policy=drop-oldest") as ws:
        for f in burst:
            ws.send(f)
        answers = read(ws, len(burst))
    assert [a["seq"] for a in answers] == list(range(len(burst)))
    dropped = [a["seq"] for a in answers if a.get("dropped")]
    assert all(a == {"seq": a["seq"], "dropped": True} for a in answers if a.get("dropped"))
    assert all("detections" in a for a in answers if not a.get("dropped"))
    assert dropped, "no frame was dropped: the burst never found the one slot taken"
    assert 0 not in dropped and len(burst) - 1 not in dropped
    assert metric(srv, 'cvdeploy_stream_frames_answered_total{model="yolo11n-shapes",outcome="dropped"}') - dropped_before == len(dropped)


def test_block_never_drops(srv, frames: list[bytes]) -> None:
    """The same burst under block (the default): the server stops reading instead, and every frame gets its result."""
    burst = frames[:40]
    runs, images = metric(srv, "cvdeploy_execution_count_total"), metric(srv, "cvdeploy_inference_count_total")
    with open_stream(srv, "in_flight=1") as ws:
        for f in burst:
            ws.send(f)
        answers = read(ws, len(burst))
    assert [a["seq"] for a in answers] == list(range(len(burst)))
    assert all("detections" in a and "dropped" not in a for a in answers)
    # One frame in flight: never two of them in the model at once, so never in one batch (nothing else runs here).
    assert metric(srv, "cvdeploy_execution_count_total") - runs == metric(srv, "cvdeploy_inference_count_total") - images == 40


def test_block_stops_reading_until_a_slot_frees(srv) -> None:
    """TCP backpressure, seen from both ends. Annotated answers of a noise image (~2 MB each) that the client does not
    read fill the socket buffers, so the one slot stays taken and the server stops reading: the client's sends stall
    (30 frames of 1.5 MB cannot all fit in the buffers between the two), and the server holds 1 frame all along."""
    noise = np.random.default_rng(1).integers(0, 256, (1000, 1900, 3), dtype=np.uint8)
    frame = cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    sent: list[int] = []

    def send() -> None:
        with contextlib.suppress(Exception):  # ends when the test cuts the connection
            for i in range(30):
                ws.send(frame)
                sent.append(i)

    with connect(ws_url(srv, "in_flight=1&annotate=true"), proxy=None, compression=None, max_queue=1, max_size=None) as ws:
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        held = []
        try:
            for _ in range(20):  # samples while the stream is stuck (it stays stuck: the client never reads)
                held.append(metric(srv, "cvdeploy_stream_frames_in_flight"))
                time.sleep(0.05)
            stalled = sender.is_alive()
        finally:
            ws.socket.shutdown(socket.SHUT_RDWR)  # the client goes away without reading (and its blocked send returns)
    assert stalled and len(sent) < 30, len(sent)
    assert max(held) <= 1, held
    sender.join(timeout=60)
    assert wait_for_metric(srv, "cvdeploy_stream_frames_in_flight", 0) == 0
    assert wait_for_metric(srv, "cvdeploy_streams_open", 0) == 0


def test_bad_frames_and_options_are_answered_and_the_stream_goes_on(srv, frames: list[bytes]) -> None:
    bomb = cv2.imencode(".png", np.zeros((1500, 2000, 3), np.uint8))[1].tobytes()  # a small file, past max_pixels
    assert len(bomb) < MAX_BODY
    messages = [frames[0], b"not an image", b"", b"\xff" * (MAX_BODY + 1), frames[1],
                json.dumps({"conf": 2}), "not json", "[" * 10_000, json.dumps({"bogus": 1}), json.dumps({"in_flight": 99}),
                json.dumps({"policy": "fastest"}), json.dumps({"max_det": True}), json.dumps([1]), bomb, frames[2]]
    with open_stream(srv) as ws:
        sender = send_all(ws, messages)
        answers = read(ws, len(messages))
        sender.join()
        ws.send(frames[3])  # still open, still answering
        (last,) = read(ws, 1)
    by_seq = {a["seq"]: a for a in answers if "seq" in a}
    assert list(by_seq) == list(range(7)) and last["seq"] == 7 and "detections" in last
    assert [by_seq[s].get("status") for s in range(7)] == [None, 400, 400, 413, None, 400, None]
    assert "not a supported image" in by_seq[1]["error"] and "empty frame" in by_seq[2]["error"]
    assert "larger than the limit" in by_seq[3]["error"] and "pixels" in by_seq[5]["error"]
    control = [a for a in answers if "seq" not in a]
    assert len(control) == 8 and all(a["status"] == 400 for a in control), control
    for needle in ("conf must be within 0..1", "not valid JSON", "nested too deeply", "unknown option(s) 'bogus'",
                   "in_flight must be within 1..4", "policy must be one of block, drop-oldest", "option max_det: expected",
                   "must be a JSON object"):
        assert any(needle in a["error"] for a in control), needle


def test_random_frames_and_messages_never_end_the_stream(srv, frames: list[bytes]) -> None:
    """Random bytes, image headers followed by junk, truncated JPEG and PNG, random text: every frame answered in
    order with a result or a 4xx (never a 500), the stream open to the end, closed 1000 by the client."""
    rng = np.random.default_rng(7)
    png = cv2.imencode(".png", cv2.imdecode(np.frombuffer(frames[4], np.uint8), cv2.IMREAD_COLOR))[1].tobytes()
    fuzz: list[bytes | str] = []
    for i in range(60):
        kind = i % 5
        if kind == 0:
            fuzz.append(rng.bytes(int(rng.integers(0, 4000))))
        elif kind == 1:
            fuzz.append(bytes.fromhex("ffd8ffe0") + rng.bytes(int(rng.integers(0, 2000))))
        elif kind == 2:
            fuzz.append(b"\x89PNG\r\n\x1a\n" + rng.bytes(int(rng.integers(0, 2000))))
        elif kind == 3:
            src = frames[i % 10] if i % 2 else png
            fuzz.append(src[: int(rng.integers(1, len(src)))])
        else:
            fuzz.append(rng.bytes(int(rng.integers(0, 300))).decode("latin-1"))  # a text message
    n_frames = sum(isinstance(m, bytes) for m in fuzz)
    with open_stream(srv) as ws:
        sender = send_all(ws, [*fuzz, frames[0]])
        answers = read(ws, len(fuzz) + 1)
        sender.join()
        ws.close(1000)
    seqs = [a["seq"] for a in answers if "seq" in a]
    assert seqs == list(range(n_frames + 1))
    statuses = [a.get("status") for a in answers]
    assert all(s is None or 400 <= s < 500 for s in statuses), sorted({s for s in statuses if s})
    assert "detections" in answers[-1]


def test_clients_leaving_mid_stream_leave_nothing_behind(srv, frames: list[bytes], caplog: pytest.LogCaptureFixture) -> None:
    """Politely (a close frame) or not (the socket cut) with frames in flight and waiting: the frames are cancelled,
    the gauges return to 0, nothing is logged as an error, and the server goes on serving streams."""
    caplog.set_level(logging.WARNING)
    for how in ("close", "cut"):
        for policy in ("block", "drop-oldest"):
            with open_stream(srv, f"policy={policy}&in_flight=2") as ws:
                for f in frames[:12]:
                    ws.send(f)
                if how == "cut":  # as a crashed client: no close frame
                    ws.socket.shutdown(socket.SHUT_RDWR)
            assert wait_for_metric(srv, "cvdeploy_stream_frames_in_flight", 0) == 0, (how, policy)
            assert wait_for_metric(srv, "cvdeploy_streams_open", 0) == 0, (how, policy)
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR and not r.name.startswith("websockets")]
    assert not errors, errors
    with open_stream(srv) as ws:
        ws.send(frames[0])
        assert "detections" in read(ws, 1)[0]


def test_the_stream_cap_refuses_with_1013(srv, frames: list[bytes]) -> None:
    assert wait_for_metric(srv, "cvdeploy_streams_open", 0) == 0
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(open_stream(srv)) for _ in range(3)]
        for ws in held:  # each is served (the handshake has counted it)
            ws.send(frames[0])
            assert read(ws, 1)[0]["seq"] == 0
        with open_stream(srv) as extra:
            refusal = json.loads(extra.recv(timeout=60))
            assert refusal["status"] == 503 and "too many open streams" in refusal["error"]
            assert closed_with(extra)[0] == 1013
    assert wait_for_metric(srv, "cvdeploy_streams_open", 0) == 0
    with open_stream(srv) as ws:
        ws.send(frames[0])
        assert "detections" in read(ws, 1)[0]


def test_refused_handshakes_close_with_a_reason(srv) -> None:
    for query, status, needle in (("policy=nope", 400, "policy must be one of"), ("conf=abc", 400, "query parameter conf"),
                                  ("in_flight=5", 400, "in_flight must be within 1..4"), ("version=9", 404, "no version '9'")):
        with open_stream(srv, query) as ws:
            refusal = json.loads(ws.recv(timeout=60))
            assert refusal["status"] == status and needle in refusal["error"], refusal
            code, reason = closed_with(ws)
            assert code == 1008 and needle in reason
    with connect(srv.url.replace("http://", "ws://") + "/v1/models/nope/stream", proxy=None) as ws:
        assert json.loads(ws.recv(timeout=60))["status"] == 404
        assert closed_with(ws)[0] == 1008


@pytest.fixture(scope="module")
def secured(demo_bundle: Path, server_factory, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("stream-auth")
    store = KeyStore(d / "keys.db")
    keys = {role: store.create(f"{role}-user", role)[1] for role in ("viewer", "predictor")}
    audit = AuditLog(d / "audit.db", b"a" * 32)
    # Refill slow enough that no token comes back during the test: the rate limit answers are exact.
    policy = AuthPolicy(store, rate_per_s=0.001, burst=12, fail_burst=1000)
    server = server_factory([str(demo_bundle)], auth=policy, audit=audit, stream_idle_timeout_s=2.0)
    return server, keys, d


def test_an_idle_stream_is_closed(secured) -> None:
    server, keys, _ = secured
    with open_stream(server, headers={"X-API-Key": keys["predictor"]}) as ws:
        code, reason = closed_with(ws)  # nothing sent: closed after stream_idle_timeout_s
    assert code == 1000 and "idle" in reason


def test_authentication_rbac_rate_limits_and_audit(secured, frames: list[bytes]) -> None:
    """The handshake is authenticated like a POST (1008 when refused, the denial audited); each frame is one request
    against the rate limits (answered 429 with retry_after once they are spent, the stream going on)."""
    server, keys, d = secured
    refused = [({}, 401, "authentication required"), ({"Authorization": "Bearer cvd_nope.nope"}, 401, "invalid"),
               ({"X-API-Key": keys["viewer"]}, 403, "")]
    for headers, status, needle in refused:
        with open_stream(server, headers=headers) as ws:
            refusal = json.loads(ws.recv(timeout=60))
            assert refusal["status"] == status and needle in refusal["error"].lower(), refusal
            assert closed_with(ws)[0] == 1008
    with open_stream(server, f"api_key={keys['predictor']}") as ws:  # never in the query string
        assert json.loads(ws.recv(timeout=60))["status"] == 400
        assert closed_with(ws)[0] == 1008
    # 12 tokens in the address's bucket: at most 6 left (the start-up probe, the 4 handshakes above, this one; the
    # idle test's handshake before), none coming back during the test: the first frames are served, then 429s.
    with open_stream(server, headers={"Authorization": f"Bearer {keys['predictor']}"}) as ws:
        sender = send_all(ws, frames[:10])
        answers = read(ws, 10)
        sender.join()
    assert [a["seq"] for a in answers] == list(range(10))
    ok = [a for a in answers if "detections" in a]
    limited = [a for a in answers if a.get("status") == 429]
    assert 1 <= len(ok) <= 6 and answers[: len(ok)] == ok and answers[len(ok):] == limited, [a.get("status") for a in answers]
    assert all(a["retry_after"] > 0 and "too many requests" in a["error"] for a in limited)
    rows = sqlite3.connect(d / "audit.db").execute("SELECT action, outcome, resource, principal FROM entries").fetchall()
    stream_path = f"/v1/models/{MODEL}/stream"
    assert ("authenticate", "failure", stream_path, None) in rows
    assert any(r[0] == "authorize" and r[1] == "denied" and r[2] == f"GET {stream_path}" for r in rows)
    assert ("rate_limit", "denied", stream_path, None) in rows
    assert sum(r[0] == "infer" and r[1] == "success" and r[3] == "predictor-user" for r in rows) == len(ok)  # one per frame


def test_the_documented_client(srv, frames: list[bytes]) -> None:
    """docs/streaming.md's client, run as written."""
    text = (ROOT / "docs" / "streaming.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    namespace: dict = {}
    exec(compile(code, "docs/streaming.md", "exec"), namespace)
    answers = namespace["stream"](ws_url(srv), frames[:3], conf=0.5, policy="drop-oldest")
    assert [a["seq"] for a in answers] == [0, 1, 2]
    assert all("detections" in a or a.get("dropped") for a in answers)
    with pytest.raises(ValueError, match="conf must be within"):
        namespace["stream"](ws_url(srv), frames[:1], conf=5)
