"""Dynamic batching: requests for one model are queued and run through its engine in batches.

A batch closes when it reaches `max_batch`, when its oldest request has waited `max_delay_ms`, or
as soon as the queue is empty and no request is expected: callers announce requests they are still
receiving or decoding with `expect(n)`; waiting when nothing is on its way could not grow the batch
and would only leave the engine idle.
Only tensors of the same shape (past the batch axis) share a batch. One worker per engine
instance drains the queue in its own thread (each instance its own session, so that two batches
never contend for one session's thread pool); the event loop never waits on an engine. A full queue
refuses new work at once (the server answers 503 with Retry-After) instead of letting latency grow
without bound.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from cvdeploy.errors import EngineError, QueueFullError


def os_thread_namer(name: str) -> Callable[[], None]:
    """A thread initializer that names the OS thread (Linux: `top -H`, `ps -L`, /proc/PID/task/*/comm), so that an
    operator, or `benchmarks/serve_load.py`, can tell the engine's CPU from the decoding's and the event loop's."""

    def init() -> None:
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME
            except (OSError, AttributeError):
                pass

    return init


QueueFull = QueueFullError  # the name of 0.1

@dataclass(eq=False)  # identity: list.remove() must not compare the tensors (numpy would raise, and kill the worker)
class _Item:
    tensor: np.ndarray  # (n, ...) with n >= 1
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatchStats:
    batch_images: int
    queue_s: float  # oldest request's wait
    infer_s: float


@dataclass(frozen=True)
class Served:
    """One request's rows of every output, with where its time went: waiting for a batch and an engine, and the engine."""

    outputs: dict[str, np.ndarray]
    queue_s: float
    infer_s: float  # the whole batch's engine call
    batch_rows: int = 1  # the rows that call ran (to share its time out per image)


class DynamicBatcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], dict[str, np.ndarray]] | Sequence[Callable[[np.ndarray], dict[str, np.ndarray]]],
        *,
        max_batch: int = 8,
        max_delay_ms: float = 5.0,
        max_queue: int = 256,
        instances: int | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        max_batch_elements: int | None = None,
    ) -> None:
        """`run`: one engine call shared by `instances` workers (default 1), or one per instance.

        `max_batch_elements` caps a batch's total tensor elements (its first request always runs): large inputs run
        alone, so that the engine's working memory is bounded by the largest input, not by `max_batch` of them.
        """
        runs = [run] * (instances or 1) if callable(run) else list(run)
        if instances is not None and instances != len(runs):
            raise ValueError(f"{len(runs)} engine calls given for {instances} instances")
        instances = len(runs)
        if max_batch < 1 or instances < 1 or max_queue < 1 or max_delay_ms < 0:
            raise ValueError("max_batch, instances and max_queue must be >= 1 and max_delay_ms >= 0")
        self._runs = runs
        self.max_batch_elements = max_batch_elements
        self.max_batch, self.max_delay, self.max_queue, self.instances = max_batch, max_delay_ms / 1000.0, max_queue, instances
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._pool = ThreadPoolExecutor(max_workers=instances, thread_name_prefix="cvdeploy-engine",
                                        initializer=os_thread_namer("cvd-engine"))
        self._workers: list[asyncio.Task] = []
        self._carry: list[_Item] = []  # items taken from the queue that did not fit the last batch's shape
        self._lock: asyncio.Lock | None = None
        self._busy = 0  # batches being run
        self._expected = 0  # requests announced with expect() and not submitted yet
        self._idle: asyncio.Event | None = None  # set whenever nothing is queued or running (stop() waits on it)

    @property
    def depth(self) -> int:
        return (self._queue.qsize() if self._queue else 0) + len(self._carry)

    def start(self) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._lock = asyncio.Lock()
            self._idle = asyncio.Event()
            self._idle.set()
            self._workers = [asyncio.create_task(self._worker(run)) for run in self._runs]

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Let queued and running requests finish (up to `drain_timeout_s`), then stop the workers."""
        if self._idle is not None:
            try:
                async with asyncio.timeout(drain_timeout_s):
                    while self.depth or self._busy:  # woken by every batch that ends with nothing left to do
                        self._idle.clear()
                        await self._idle.wait()
            except TimeoutError:
                pass
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self._pool.shutdown(wait=True)

    @contextmanager
    def expect(self, n: int = 1) -> Iterator[None]:
        """`n` requests are on their way (being received or decoded): a forming batch may wait for them."""
        self._expected += n
        try:
            yield
        finally:
            self._expected -= n

    async def submit(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """Queue `tensor` (n, C, H, W); return its rows of every output."""
        return (await self.submit_timed(tensor)).outputs

    async def submit_timed(self, tensor: np.ndarray) -> Served:
        """Queue `tensor` (n, C, H, W); return its rows of every output and its queue and engine time."""
        self.start()
        assert self._queue is not None and self._idle is not None
        if self.depth >= self.max_queue:
            raise QueueFullError(f"queue full ({self.max_queue} requests waiting)")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._idle.clear()
        await self._queue.put(_Item(tensor, fut))
        return await fut

    async def _next_batch(self) -> list[_Item]:
        assert self._queue is not None and self._lock is not None
        async with self._lock:  # one worker gathers at a time; the others run engines meanwhile
            first = self._carry.pop(0) if self._carry else await self._queue.get()
            batch, n = [first], first.tensor.shape[0]
            shape = first.tensor.shape[1:]
            room = [self.max_batch_elements - first.tensor.size if self.max_batch_elements else None]

            def fits(item: _Item) -> bool:
                ok = item.tensor.shape[1:] == shape and n + item.tensor.shape[0] <= self.max_batch and \
                    (room[0] is None or item.tensor.size <= room[0])
                if ok and room[0] is not None:
                    room[0] -= item.tensor.size
                return ok

            deadline = first.enqueued + self.max_delay
            kept: list[_Item] = []
            for item in list(self._carry):
                if n >= self.max_batch:
                    break
                if fits(item):
                    batch.append(item)
                    n += item.tensor.shape[0]
                    self._carry.remove(item)
            while n < self.max_batch:
                if self._queue.empty() and self._expected <= 0:
                    break  # nothing queued and nothing on its way: waiting could not grow the batch
                timeout = deadline - time.perf_counter()
                try:
                    if timeout <= 0 or not self._queue.empty():
                        item = self._queue.get_nowait()
                    else:
                        async with asyncio.timeout(timeout):  # no task per wait, unlike wait_for
                            item = await self._queue.get()
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                if fits(item):
                    batch.append(item)
                    n += item.tensor.shape[0]
                else:
                    kept.append(item)
            self._carry.extend(kept)
            return batch

    async def _worker(self, run: Callable[[np.ndarray], dict[str, np.ndarray]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                batch = await self._next_batch()
            except Exception:  # a defect in batch formation must not leave the model without a worker (every request
                # after it would hang until its timeout): log it and go on
                logging.getLogger("cvdeploy.serve").exception("batch formation failed")
                continue
            live = [it for it in batch if not it.future.cancelled()]
            self._busy += 1
            try:
                if live:
                    await self._run_batch(loop, run, live)
            except Exception as e:  # anything past the engine call (a metrics callback, a malformed output): the batch's
                # callers learn it, and the worker lives on for the next batch
                logging.getLogger("cvdeploy.serve").exception("a batch failed after the engine ran")
                for it in live:
                    if not it.future.done():
                        it.future.set_exception(EngineError(f"the batch failed: {type(e).__name__}: {e}"))
            finally:
                self._busy -= 1
                if not self._busy and not self.depth and self._idle is not None:
                    self._idle.set()  # even when every request of the batch was cancelled: stop() waits on this

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, run: Callable[[np.ndarray], dict[str, np.ndarray]],
                         live: list[_Item]) -> None:
        tensor = live[0].tensor if len(live) == 1 else np.concatenate([it.tensor for it in live])
        t0 = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._pool, run, tensor)
        except Exception as e:  # the engine failed: every request of the batch learns why
            for it in live:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        t1 = time.perf_counter()
        rows = int(tensor.shape[0])
        wrong = {name: out.shape[0] if getattr(out, "ndim", 0) else None for name, out in outputs.items()
                 if not getattr(out, "ndim", 0) or out.shape[0] != rows}
        if wrong:  # one output row per input row, or nobody can be given their share: every caller learns why
            e = EngineError(f"the engine returned {', '.join(f'{n!r} with {r} rows' for n, r in wrong.items())} for a batch of "
                            f"{rows} input rows ({len(live)} request(s)); expected one row per input")
            for it in live:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        if self._on_batch:
            try:
                self._on_batch(BatchStats(rows, t0 - min(it.enqueued for it in live), t1 - t0))
            except Exception:  # the inference succeeded: a broken metrics callback must not cost its callers their answer
                logging.getLogger("cvdeploy.serve").exception("the on_batch callback failed")
        start = 0
        for it in live:
            k = it.tensor.shape[0]
            if not it.future.done():
                it.future.set_result(Served({name: out[start : start + k] for name, out in outputs.items()}, t0 - it.enqueued,
                                            t1 - t0, rows))
            start += k

