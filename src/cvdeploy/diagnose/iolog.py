"""Inference I/O logging: a sampled, size-bounded record of what a deployment was given and what it answered.

Each sampled request becomes one JSON line (time, model, image size and sha256, letterbox meta, detections, timings,
anomalies) in a rotating segment file, with the image itself, a small thumbnail, or nothing (`store`: "image",
"thumbnail" or "hash", for privacy). Anomalies are checked on every request, sampled or not, and counted by kind:
NaN or inf in the outputs, an all-black or saturated input (these two are always recorded), no detection at all,
or a confidence collapse (the best score far below the run's usual; these two are flagged in sampled records: an
empty scene is normal in many deployments and must not make every request a record). The directory never holds more than `max_bytes`:
the oldest segments (and their images) are deleted first. Writes happen on one background thread behind a bounded
queue, so the request path only samples and enqueues; when the queue is full the record is dropped and counted.
`cvdeploy doctor --io-log DIR` reads the directory back as field data.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.errors import InputError

STORES = ("image", "thumbnail", "hash")
MIN_BYTES = 1024 * 1024
THUMBNAIL_SIDE = 160


@dataclass
class IOLogStats:
    seen: int = 0
    recorded: int = 0
    dropped: int = 0  # the writer's queue was full
    anomalies: dict[str, int] | None = None  # kind -> requests seen with it

    def __post_init__(self) -> None:
        self.anomalies = self.anomalies or {}


def anomalies_of(image: np.ndarray | None, result: Any, *, usual_top_conf: float | None = None) -> list[str]:
    """What is wrong with one request's input or output, if anything (cheap: a few reductions)."""
    out = []
    if image is not None and image.size:
        small = image[::8, ::8]
        mean = float(small.mean())
        if mean < 2.0:
            out.append("input all black")
        elif mean > 253.0:
            out.append("input saturated")
    dets = getattr(result, "detections", None)
    if dets is not None:
        if len(dets) and (not np.isfinite(dets.xyxy).all() or not np.isfinite(dets.confidence).all()):
            out.append("NaN or inf in the outputs")
        if len(dets) == 0:
            out.append("no detection")
        elif usual_top_conf is not None and float(dets.confidence.max()) < 0.5 * usual_top_conf:
            out.append(f"confidence collapse: best {float(dets.confidence.max()):.2f} against a usual {usual_top_conf:.2f}")
    return out


class IOLog:
    """Sampled inference records in `root`, at most `max_bytes` on disk. Thread-safe; `close()` flushes."""

    def __init__(self, root: str | os.PathLike[str], *, sample: float = 0.05, store: str = "thumbnail",
                 max_bytes: int = 256 * 1024 * 1024, seed: int | None = None, queue_size: int = 1000) -> None:
        if not 0.0 <= sample <= 1.0:
            raise InputError(f"the I/O log's sample rate must be within 0..1, got {sample}")
        if store not in STORES:
            raise InputError(f"the I/O log stores one of {', '.join(STORES)}, got {store!r}")
        if max_bytes < MIN_BYTES:
            raise InputError(f"the I/O log needs at least {MIN_BYTES // 2**20} MiB (max_bytes), got {max_bytes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "images").mkdir(exist_ok=True)
        self.sample, self.store, self.max_bytes = sample, store, max_bytes
        self.stats = IOLogStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._top: list[float] = []  # recent best confidences: what "usual" means for a collapse
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=queue_size)
        # Rotation is by segment (its records and its images): eight of them fill the bound.
        self._segment_limit = max_bytes // 8
        existing = self._segments()
        self._segment = self._segment_path(int(existing[-1].stem.split("-")[1]) + 1 if existing else 0)
        self._seg_bytes = 0
        self._written = sum(1 for _ in (self.root / "images").iterdir())
        self._total = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        self._writer = threading.Thread(target=self._write_loop, name="cvdeploy-iolog", daemon=True)
        self._writer.start()

    # -- the request path ------------------------------------------------------------------------

    def record(self, *, model: str, image: np.ndarray | None, data: bytes | None, result: Any,
               meta: dict[str, Any] | None = None) -> bool:
        """Look at one request; enqueue a record when it is sampled or anomalous. True when it was enqueued."""
        with self._lock:
            self.stats.seen += 1
            usual = float(np.median(self._top)) if len(self._top) >= 20 else None
            dets = getattr(result, "detections", None)
            if dets is not None and len(dets):
                self._top.append(float(dets.confidence.max()))
                del self._top[:-200]
            draw = self._rng.random()
        found = anomalies_of(image, result, usual_top_conf=usual)
        with self._lock:
            for a in found:
                kind = a.split(":")[0]
                self.stats.anomalies[kind] = self.stats.anomalies.get(kind, 0) + 1  # type: ignore[index]
        forced = any(a.startswith(("NaN", "input")) for a in found)
        if not forced and draw >= self.sample:
            return False
        rec = {"ts": round(time.time(), 3), "model": model, "anomalies": found, "result": result.to_dict(), "meta": meta or {},
               "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
               "shape": list(image.shape[:2]) if image is not None else None}
        payload = None
        if self.store == "image" and data is not None:
            payload = ("bin", data)
        elif self.store == "thumbnail" and image is not None:
            payload = ("img", image)
        rec["_payload"] = payload
        try:
            self._queue.put_nowait(rec)
        except queue.Full:
            with self._lock:
                self.stats.dropped += 1
            return False
        with self._lock:
            self.stats.recorded += 1
        return True

    def flush(self) -> None:
        """Wait until every queued record is on disk."""
        self._queue.join()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer (idempotent)."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout)

    # -- the writer thread -----------------------------------------------------------------------

    def _segments(self) -> list[Path]:
        return sorted(self.root.glob("records-*.jsonl"))

    def _segment_path(self, n: int) -> Path:
        return self.root / f"records-{n:06d}.jsonl"

    def _write_loop(self) -> None:
        while True:
            rec = self._queue.get()
            try:
                if rec is None:
                    return
                self._write(rec)
            except OSError:  # a full disk must not take the server down: the record is lost, counted as dropped
                with self._lock:
                    self.stats.dropped += 1
            finally:
                self._queue.task_done()

    def _write(self, rec: dict[str, Any]) -> None:
        import cv2

        payload = rec.pop("_payload")
        blob, suffix = None, ""
        if payload is not None:
            kind, value = payload
            if kind == "bin":
                blob, suffix = value, ".bin"
            else:
                h, w = value.shape[:2]
                scale = THUMBNAIL_SIDE / max(h, w)
                thumb = cv2.resize(value, (max(1, round(w * scale)), max(1, round(h * scale)))) if scale < 1 else value
                blob, suffix = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes(), ".jpg"
        if blob is not None and len(blob) > self._segment_limit:
            blob, rec["file_skipped"] = None, f"{len(blob)} bytes: larger than the log keeps for one image"
        line_guess = len(json.dumps(rec)) + 200
        n = line_guess + (len(blob) if blob is not None else 0)
        if self._seg_bytes and self._seg_bytes + n > self._segment_limit:
            self._segment = self._segment_path(int(self._segment.stem.split("-")[1]) + 1)
            self._seg_bytes = 0
        self._make_room(n)
        if blob is not None:
            self._written += 1  # the writer's own count: unique names, whatever the request threads do meanwhile
            path = self.root / "images" / f"{self._segment.stem}-{self._written:09d}{suffix}"
            path.write_bytes(blob)
            rec["file"] = f"images/{path.name}"
            self._account(len(blob))
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        with self._segment.open("ab") as f:
            f.write(line)
        self._account(len(line))

    def _account(self, n: int) -> None:
        self._seg_bytes += n
        self._total += n

    def _make_room(self, n: int) -> None:
        """Delete the oldest segments (with their images) until `n` more bytes fit within max_bytes."""
        for seg in self._segments():
            if self._total + n <= self.max_bytes or seg == self._segment:
                break
            for img in (self.root / "images").glob(f"{seg.stem}-*"):
                self._total -= img.stat().st_size
                img.unlink(missing_ok=True)
            self._total -= seg.stat().st_size
            seg.unlink(missing_ok=True)

    def disk_bytes(self) -> int:
        """What the log holds on disk now (tests and monitoring read it)."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())


def read_iolog(root: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of an I/O log directory, oldest first; `file` (when stored) is resolved to a path."""
    r = Path(root)
    segments = sorted(r.glob("records-*.jsonl"))
    if not segments:
        raise InputError(f"{r} holds no I/O log records (records-*.jsonl)")
    for seg in segments:
        for line in seg.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if rec.get("file"):
                rec["path"] = str(r / rec["file"])
            yield rec
