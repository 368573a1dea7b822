"""The dynamic batcher on its own: batch formation, the delay, early closing, instances in parallel."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from cvdeploy.serve.batcher import DynamicBatcher, QueueFull


def _echo(log: list[int], pause: float = 0.0):
    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        log.append(x.shape[0])
        time.sleep(pause)
        return {"y": x * 2}

    return run


def _x(v: float, n: int = 1) -> np.ndarray:
    return np.full((n, 3, 4, 4), v, np.float32)


def test_requests_queued_together_share_a_batch_and_get_their_own_rows() -> None:
    sizes: list[int] = []

    async def main() -> list[dict]:
        b = DynamicBatcher(_echo(sizes), max_batch=4, max_delay_ms=50)
        outs = await asyncio.gather(*(b.submit(_x(i)) for i in range(6)))
        await b.stop()
        return outs

    outs = asyncio.run(main())
    assert sizes == [4, 2]  # full batch, then the rest: nothing else is on its way
    assert [float(o["y"][0, 0, 0, 0]) for o in outs] == [2.0 * i for i in range(6)]


def test_a_batch_waits_for_expected_requests_but_not_past_the_delay() -> None:
    sizes: list[int] = []

    async def main() -> tuple[float, float]:
        b = DynamicBatcher(_echo(sizes), max_batch=8, max_delay_ms=300)

        async def late(delay: float) -> dict:
            with b.expect():
                await asyncio.sleep(delay)
            return await b.submit(_x(1))

        t0 = time.perf_counter()
        await asyncio.gather(late(0.0), late(0.05))  # the second is announced: the first waits for it
        joined = time.perf_counter() - t0
        t0 = time.perf_counter()
        await asyncio.gather(late(0.0), late(1.0))  # announced but too late: the delay closes the batch
        capped = time.perf_counter() - t0
        await b.stop()
        return joined, capped

    joined, capped = asyncio.run(main())
    assert sizes[0] == 2, sizes  # the expected request joined the first batch
    assert sizes[1:] == [1, 1]  # the late one came after the 300 ms delay and ran on its own
    assert capped >= 1.0 and joined < 1.0


def test_nothing_expected_means_no_wait() -> None:
    sizes: list[int] = []

    async def main() -> float:
        b = DynamicBatcher(_echo(sizes), max_batch=8, max_delay_ms=2000)
        t0 = time.perf_counter()
        await b.submit(_x(1))
        took = time.perf_counter() - t0
        await b.stop()
        return took

    assert asyncio.run(main()) < 1.0  # not the 2 s delay
    assert sizes == [1]


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

    asyncio.run(main())
    assert sorted(seen) == ["a", "b"]


def test_shapes_do_not_mix_and_a_full_queue_refuses() -> None:
    sizes: list[int] = []

    async def main() -> None:
        b = DynamicBatcher(_echo(sizes, pause=0.2), max_batch=4, max_delay_ms=5, max_queue=2)
        first = asyncio.ensure_future(b.submit(_x(0)))
        await asyncio.sleep(0.05)  # running now
        other = [asyncio.ensure_future(b.submit(np.zeros((1, 3, 8, 8), np.float32))), asyncio.ensure_future(b.submit(_x(1)))]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit(_x(2))
        await asyncio.gather(first, *other)
        await b.stop()

    asyncio.run(main())
    assert sizes == [1, 1, 1]  # the 8x8 and the 4x4 tensor never shared a batch


def test_instances_and_engine_calls_must_agree() -> None:
    with pytest.raises(ValueError, match="2 engine calls given for 3 instances"):
        DynamicBatcher([_echo([]), _echo([])], instances=3)


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
