"""The dynamic batcher on its own: batch formation, the delay, early closing, instances in parallel, failures.

Every check here is about what happened (which rows ran together, in which order, who got what), never about how
long it took: a machine twice as slow runs the same batches. Engines that must stay busy while a test queues more
work are held on a threading.Event; the only clocks are hang guards, far above what a correct batcher needs.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable

import numpy as np
import pytest

from cvdeploy.errors import CvdeployError, QueueFullError, ServerBusyError
from cvdeploy.serve.batcher import BatchStats, DynamicBatcher

HANG_GUARD_S = 30.0  # only ever reached when the batcher is broken (waits forever); a correct run takes milliseconds


class Engine:
    """A stand-in for an engine call, as the batcher sees one: an (n, ...) tensor in, outputs of n rows out. It records
    each call (the first pixel of each row tells the requests apart) and, when `held`, blocks its calls until
    `release` is set, so that a test can queue work while the engine is busy."""

    def __init__(self, *, held: bool = False, result: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None) -> None:
        self.calls: list[np.ndarray] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not held:
            self.release.set()
        self.result = result or (lambda x: {"y": x * 2})

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append(x.copy())
        self.started.set()
        assert self.release.wait(HANG_GUARD_S), "the test never released the engine"
        return self.result(x)

    @property
    def sizes(self) -> list[int]:
        return [c.shape[0] for c in self.calls]

    @property
    def batches(self) -> list[list[float]]:
        """Which requests (by their value) ran together, batch by batch, in order."""
        return [c.reshape(c.shape[0], -1)[:, 0].tolist() for c in self.calls]


def _x(v: float, n: int = 1, side: int = 4) -> np.ndarray:
    return np.full((n, 3, side, side), v, np.float32)


def _y(out: dict[str, np.ndarray]) -> list[float]:
    return out["y"].reshape(out["y"].shape[0], -1)[:, 0].tolist()


async def _until(condition: Callable[[], bool], steps: int = 10_000) -> None:
    """Let the event loop run (steps, not time) until `condition` holds; for states reached without any thread."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the batcher never reached the expected state")


async def _started(engine: Engine) -> None:
    assert await asyncio.to_thread(engine.started.wait, HANG_GUARD_S), "the engine was never called"


def _run(main: Callable[[], object]) -> object:
    async def guarded():
        async with asyncio.timeout(HANG_GUARD_S * 2):
            return await main()  # type: ignore[misc]

    return asyncio.run(guarded())


# --- batch formation -------------------------------------------------------------------------------------------


def test_requests_queued_together_share_a_batch_and_get_their_own_rows() -> None:
    engine, stats = Engine(), []

    async def main() -> list[dict]:
        b = DynamicBatcher(engine, max_batch=4, max_delay_ms=50, on_batch=stats.append)
        outs = await asyncio.gather(*(b.submit(_x(i)) for i in range(6)))
        await b.stop()
        return outs

    outs = _run(main)
    assert engine.batches == [[0, 1, 2, 3], [4, 5]]  # a full batch in arrival order, then the rest: nothing else is coming
    assert [_y(o) for o in outs] == [[2.0 * i] for i in range(6)]  # each caller its own row, not its neighbour's
    assert all(isinstance(s, BatchStats) for s in stats) and [s.batch_images for s in stats] == [4, 2]


def test_a_request_of_several_rows_gets_all_of_them_and_counts_toward_max_batch() -> None:
    engine = Engine()

    async def main() -> list[dict]:
        b = DynamicBatcher(engine, max_batch=4, max_delay_ms=50)
        outs = await asyncio.gather(b.submit(_x(1, n=3)), b.submit(_x(2, n=2)), b.submit(_x(3)))
        await b.stop()
        return outs

    outs = _run(main)
    assert engine.batches == [[1, 1, 1, 3], [2, 2]]  # 3 + 2 > 4: the 2-row request waits, the 1-row one fits
    assert [_y(o) for o in outs] == [[2, 2, 2], [4, 4], [6]]


def test_a_forming_batch_waits_for_an_announced_request() -> None:
    engine = Engine()

    async def main() -> None:
        # The delay is a minute: only the announced request can complete this batch before then.
        b = DynamicBatcher(engine, max_batch=2, max_delay_ms=60_000)
        with b.expect():  # a second request is on its way (being received, decoded) while the first is queued
            first = asyncio.ensure_future(b.submit(_x(0)))
            await _until(lambda: b.depth == 1)
            await _until(lambda: b.depth == 0)  # the worker holds the first and, the queue empty, waits for the second
            assert engine.calls == []
        second = asyncio.ensure_future(b.submit(_x(1)))
        assert [_y(o) for o in await asyncio.gather(first, second)] == [[0], [2]]
        await b.stop()

    _run(main)
    assert engine.batches == [[0, 1]]  # the announced request joined the batch that had waited for it


def test_the_delay_closes_a_batch_whose_announced_request_is_late() -> None:
    engine = Engine()

    async def main() -> None:
        b = DynamicBatcher(engine, max_batch=8, max_delay_ms=20)
        with b.expect():  # announced, and only submitted once the first has its answer: it cannot join that batch
            assert _y(await b.submit(_x(0))) == [0]  # answered although a request is still expected: the delay closed it
            assert engine.batches == [[0]]
        assert _y(await b.submit(_x(1))) == [2]
        await b.stop()

    _run(main)
    assert engine.batches == [[0], [1]]


def test_nothing_expected_means_no_wait() -> None:
    engine = Engine()

    async def main() -> None:
        # Ten minutes of delay: were the batch to wait for it, the hang guard would fail the test long before.
        b = DynamicBatcher(engine, max_batch=8, max_delay_ms=600_000)
        assert _y(await b.submit(_x(1))) == [2]
        assert _y(await b.submit(_x(2))) == [4]
        await b.stop()

    _run(main)
    assert engine.batches == [[1], [2]]


def test_shapes_do_not_mix_and_a_full_queue_refuses() -> None:
    engine = Engine(held=True)

    async def main() -> list[dict]:
        b = DynamicBatcher(engine, max_batch=4, max_delay_ms=5, max_queue=4)
        first = asyncio.ensure_future(b.submit(_x(0)))
        await _started(engine)  # the engine is busy with the first request: what comes next queues
        queued = [asyncio.ensure_future(b.submit(t)) for t in (_x(1, side=8), _x(2), _x(3), _x(4, side=8))]
        await _until(lambda: b.depth == 4)
        with pytest.raises(QueueFullError, match=r"queue full \(4 requests waiting\)") as refused:
            await b.submit(_x(5))
        assert isinstance(refused.value, ServerBusyError)  # a retry-later refusal (503), not a failure
        engine.release.set()
        outs = await asyncio.gather(first, *queued)
        await b.stop()
        return outs

    outs = _run(main)
    # The 8x8 tensors ran together, the 4x4 ones held back (in order) ran together next; nothing was mixed or lost.
    assert engine.batches == [[0], [1, 4], [2, 3]]
    assert [c.shape[2:] for c in engine.calls] == [(4, 4), (8, 8), (4, 4)]
    assert [_y(o) for o in outs] == [[0], [2], [4], [6], [8]]
    assert [o["y"].shape for o in outs] == [(1, 3, 4, 4), (1, 3, 8, 8), (1, 3, 4, 4), (1, 3, 4, 4), (1, 3, 8, 8)]


def test_large_inputs_run_alone_under_max_batch_elements() -> None:
    engine = Engine()

    async def main() -> None:
        one = _x(0).size
        b = DynamicBatcher(engine, max_batch=8, max_delay_ms=50, max_batch_elements=2 * one)
        outs = await asyncio.gather(*(b.submit(_x(i)) for i in range(5)), b.submit(_x(9, n=3)))
        assert [_y(o) for o in outs] == [[0], [2], [4], [6], [8], [18, 18, 18]]
        await b.stop()

    _run(main)
    # Two requests' worth of elements per batch; a request larger than that still runs (alone).
    assert engine.batches == [[0, 1], [2, 3], [4], [9, 9, 9]]


def test_each_instance_runs_its_own_engine_in_parallel() -> None:
    seen: list[str] = []
    barrier = threading.Barrier(2, timeout=10)

    def engine(label: str):
        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            seen.append(label)
            barrier.wait()  # both instances must be running at once, or this times out
            return {"y": x}

        return run

    async def main() -> None:
        b = DynamicBatcher([engine("a"), engine("b")], max_batch=1, max_delay_ms=0)
        await asyncio.gather(b.submit(_x(0)), b.submit(_x(1)))
        await b.stop()

    _run(main)
    assert sorted(seen) == ["a", "b"]


# --- failures and cancellation ---------------------------------------------------------------------------------


def test_an_engine_failure_reaches_every_caller_of_the_batch_and_only_them() -> None:
    failing = [True]

    def result(x: np.ndarray) -> dict[str, np.ndarray]:
        if failing[0]:
            raise RuntimeError("the engine ran out of memory")
        return {"y": x * 2}

    engine = Engine(result=result)

    async def main() -> tuple[list, dict]:
        b = DynamicBatcher(engine, max_batch=4, max_delay_ms=50)
        outs = await asyncio.gather(*(b.submit(_x(i)) for i in range(3)), return_exceptions=True)
        failing[0] = False
        after = await b.submit(_x(7))  # the worker survived the failure: the next batch runs
        await b.stop()
        return outs, after

    outs, after = _run(main)
    assert engine.batches == [[0, 1, 2], [7]]  # one batch failed, once: no retry, nobody run alone
    assert all(isinstance(o, RuntimeError) and str(o) == "the engine ran out of memory" for o in outs), outs
    assert outs[0] is outs[1] is outs[2]  # the engine's own exception, to each caller
    assert _y(after) == [14]


def test_a_cancelled_request_is_dropped_before_the_model_runs() -> None:
    engine = Engine(held=True)

    async def main() -> tuple[list, asyncio.Future]:
        b = DynamicBatcher(engine, max_batch=4, max_delay_ms=0)
        first = asyncio.ensure_future(b.submit(_x(0)))
        await _started(engine)
        a, c, d = (asyncio.ensure_future(b.submit(_x(v))) for v in (1, 2, 3))
        await _until(lambda: b.depth == 3)  # all three queued behind the busy engine
        c.cancel()  # its client went away
        engine.release.set()
        outs = await asyncio.gather(first, a, d)
        with pytest.raises(asyncio.CancelledError):
            await c
        await b.stop()
        return outs, c

    outs, c = _run(main)
    assert c.cancelled()
    assert engine.batches == [[0], [1, 3]]  # request 2 never reached the model; 1 and 3 still shared a batch
    assert [_y(o) for o in outs] == [[0], [2], [6]]  # and got their own rows, not shifted by the missing one


def test_a_batch_of_only_cancelled_requests_never_runs_and_the_next_one_does() -> None:
    engine = Engine(held=True)

    async def main() -> dict:
        b = DynamicBatcher(engine, max_batch=4, max_delay_ms=0)
        first = asyncio.ensure_future(b.submit(_x(0)))
        await _started(engine)
        doomed = [asyncio.ensure_future(b.submit(_x(v))) for v in (1, 2)]
        await _until(lambda: b.depth == 2)
        for t in doomed:
            t.cancel()
        engine.release.set()
        assert _y(await first) == [0]
        await _until(lambda: b.depth == 0)
        out = await b.submit(_x(3))
        await b.stop()
        return out

    assert _y(_run(main)) == [6]
    assert engine.batches == [[0], [3]]


def test_stop_returns_once_the_queue_held_only_cancelled_requests() -> None:
    engine = Engine(held=True)

    async def main() -> None:
        b = DynamicBatcher(engine, max_batch=4, max_delay_ms=0)
        first = asyncio.ensure_future(b.submit(_x(0)))
        await _started(engine)
        doomed = [asyncio.ensure_future(b.submit(_x(v))) for v in (1, 2)]
        await _until(lambda: b.depth == 2)
        for t in doomed:
            t.cancel()
        stopping = asyncio.ensure_future(b.stop(drain_timeout_s=600))  # a drain that a correct batcher ends at once
        await _until(lambda: not stopping.done() and b.depth == 2)  # stop() is waiting for the queue to drain
        engine.release.set()
        assert _y(await first) == [0]
        try:
            async with asyncio.timeout(5):  # nothing left to do: a correct stop() is done within a few loop steps
                await stopping
        finally:
            if not stopping.done():
                stopping.cancel()
                await b.stop(drain_timeout_s=0)

    asyncio.run(main())
    assert engine.batches == [[0]]


@pytest.mark.parametrize(
    ("rows", "result"),
    [
        (2, lambda x: {"y": x[:-1] * 2}),  # a row short: the last caller would get an empty slice
        (4, lambda x: {"y": np.concatenate([x, x[:1]]) * 2}),  # a row too many: silently dropped
        (None, lambda x: {"y": np.float32(1.0)}),  # no batch axis at all
    ],
    ids=["fewer", "more", "scalar"],
)
def test_an_output_without_one_row_per_input_is_an_error_for_every_caller(rows: int | None, result) -> None:
    engine = Engine(result=result)

    async def main() -> tuple[list, dict]:
        b = DynamicBatcher(engine, max_batch=4, max_delay_ms=50)
        outs = await asyncio.gather(*(b.submit(_x(i)) for i in range(3)), return_exceptions=True)
        engine.result = lambda x: {"y": x * 2}
        after = await b.submit(_x(5))  # the worker carries on with a sane engine
        await b.stop()
        return outs, after

    outs, after = _run(main)
    assert engine.sizes == [3, 1]
    for o in outs:  # nobody gets a share of rows that cannot be told apart
        assert isinstance(o, RuntimeError | CvdeployError), o
        assert re.search(r"\b3\b", str(o)), f"the error should name the batch size (3): {o}"
        if rows is not None:
            assert re.search(rf"\b{rows}\b", str(o)), f"the error should name the rows returned ({rows}): {o}"
    assert _y(after) == [10]


def test_a_failing_on_batch_callback_neither_hangs_the_callers_nor_stops_the_batcher() -> None:
    engine = Engine()

    async def main() -> None:
        called = asyncio.Event()

        def on_batch(stats: BatchStats) -> None:  # called on the event loop once the engine has returned
            called.set()
            raise ValueError("the metrics registry is broken")

        b = DynamicBatcher(engine, max_batch=4, max_delay_ms=50, on_batch=on_batch)
        tasks = [asyncio.ensure_future(b.submit(_x(i))) for i in range(2)]
        async with asyncio.timeout(HANG_GUARD_S):
            await called.wait()
        try:
            await _until(lambda: all(t.done() for t in tasks), steps=1000)  # loop steps, no clock
            # The inference itself succeeded: its callers get their rows, and the next request is served.
            assert [_y(t.result()) for t in tasks] == [[0], [2]]
            async with asyncio.timeout(HANG_GUARD_S):
                assert _y(await b.submit(_x(3))) == [6]
        finally:
            for t in tasks:
                t.cancel()
            await b.stop(drain_timeout_s=0)

    asyncio.run(main())


# --- configuration and threads ---------------------------------------------------------------------------------


def test_instances_and_engine_calls_must_agree() -> None:
    with pytest.raises(ValueError, match="2 engine calls given for 3 instances"):
        DynamicBatcher([Engine(), Engine()], instances=3)


def test_engine_threads_split_the_cores_among_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from cvdeploy.serve.repository import engine_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)), raising=False)
    assert engine_threads(1, None) is None  # one instance: the bundle's tuned setting or the engine's default
    assert engine_threads(2, None) == 4 and engine_threads(3, None) == 2 and engine_threads(16, None) == 1
    assert engine_threads(2, 3) == 3  # as asked


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="OS thread names are read from /proc")
def test_server_threads_carry_os_names() -> None:
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from cvdeploy.serve.batcher import os_thread_namer

    with ThreadPoolExecutor(1, initializer=os_thread_namer("cvd-engine")) as pool:
        tid = pool.submit(threading.get_native_id).result()
        assert Path(f"/proc/self/task/{tid}/comm").read_text().strip() == "cvd-engine"
