"""One served version of a model: its Predictor instances (one engine session each) and its batcher, opened, warmed
before it becomes visible, then drained and stopped when it is replaced. `serve.repository` decides which versions
serve; this module only makes and ends them."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.serve.batcher import BatchStats, DynamicBatcher, Served
from cvdeploy.serve.metrics import ServerMetrics
from cvdeploy.serve.settings import ServeSettings


@dataclass
class LoadedModel:
    """One version of a model as served: its engine instances, its batcher, and the requests holding it."""

    name: str
    version: str
    instances: list[Any]  # one cvdeploy.Predictor per engine instance (each its own session)
    batcher: DynamicBatcher
    path: Path
    loaded_at: float = field(default_factory=time.time)
    active: int = 0  # requests holding this version; it is stopped only when they are done
    monitor: Any = None  # its cvdeploy.serve.monitor.DriftMonitor

    def __enter__(self) -> LoadedModel:
        self.active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.active -= 1

    @property
    def predictor(self) -> Any:
        """The first instance: its engine, spec, options and names stand for the model."""
        return self.instances[0]

    @property
    def bundle(self) -> Any:
        return self.predictor.bundle

    async def infer(self, tensor: np.ndarray) -> Served:
        """`tensor`'s rows of every output, through the model's batcher, with its queue and engine time."""
        return await self.batcher.submit_timed(tensor)


def open_version(settings: ServeSettings, metrics: ServerMetrics, monitors: Any, load_bundle: Callable[[Path], Any], name: str,
                 version: str, path: Path) -> LoadedModel:
    """Version `version` of `name` from the bundle at `path`: one Predictor per engine instance (each bundle read
    through `load_bundle`, which checks hashes and signature), its batcher (not started) and its drift monitor."""
    from cvdeploy.predict import Predictor
    from cvdeploy.vision.image import DecodeLimits

    s = settings
    threads = engine_threads(s.instances, s.threads)
    predictors: list[Any] = []
    try:
        for _ in range(s.instances):
            bundle = load_bundle(path)  # checked once per instance: a reload reads the files again
            predictors.append(Predictor(bundle, limits=DecodeLimits(max_pixels=s.max_pixels), max_batch=s.max_batch, threads=threads))
    except BaseException:
        for p in predictors:
            p.close()
        raise
    labels = (name, version)

    def on_batch(stats: BatchStats) -> None:
        metrics.executions.labels(*labels).inc()
        metrics.inferences.labels(*labels).inc(stats.batch_images)
        metrics.stage.labels(*labels, "queue").observe(stats.queue_s)
        metrics.stage.labels(*labels, "infer").observe(stats.infer_s)

    h, w = predictors[0].spec.imgsz
    native = s.max_batch * 3 * h * w  # a full batch at the model's own size
    for p in predictors:  # after an input larger than that, the engine hands its extra working memory back
        if hasattr(p.engine, "shrink_arena_above"):
            p.engine.shrink_arena_above = native
    batcher = DynamicBatcher([p.infer_all for p in predictors], max_batch=s.max_batch, max_delay_ms=s.max_delay_ms,
                             max_queue=s.max_queue, on_batch=on_batch, max_batch_elements=native)
    return LoadedModel(name, version, predictors, batcher, path, monitor=monitors.open(name, version, predictors[0]))


async def warm(m: LoadedModel, settings: ServeSettings) -> None:
    """First calls allocate and pick kernels: pay for them, on every instance, before the model is visible."""
    h, w = m.predictor.spec.imgsz
    for n in sorted({1, min(m.predictor.max_batch, settings.max_batch)}):
        x = np.full((n, 3, h, w), 114 / 255.0, np.float32)
        for p in m.instances:
            for _ in range(settings.warmup_runs):
                await asyncio.to_thread(p.infer_all, x)


def engine_threads(instances: int, threads: int | None) -> int | None:
    """Engine threads per instance: as asked; else the engine's own choice (or the bundle's tuned hint) for one
    instance, and the usable cores split evenly for several, so that instances do not oversubscribe the CPU."""
    if threads is not None:
        return threads
    if instances <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // instances)


async def drain_and_stop(m: LoadedModel, timeout: float = 30.0) -> None:
    """Wait for every request holding `m` (decoding, queued or running), then stop it."""
    deadline = time.monotonic() + timeout
    while m.active and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    await m.batcher.stop(max(0.0, deadline - time.monotonic()))
    for p in m.instances:
        p.close()
