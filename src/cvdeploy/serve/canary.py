"""Canary and shadow releases: a candidate version beside the version a model serves, judged on live traffic.

- **canary**: a share of the model's requests (`canary_share`), or those with `X-Cvdeploy-Cohort: canary`, are answered
  by the candidate; `X-Cvdeploy-Cohort: stable` keeps a request on the incumbent; `?version=` pins one.
- **shadow**: clients are answered by the incumbent only; a share of the requests is copied, after its answer, to a
  bounded queue that workers of their own replay on the candidate. A full queue skips the copy, a failing candidate is
  counted; neither reaches a client.

Each side keeps a window of its last requests: failures (the server's own, not the client's), the model's time per image
(letterbox, queue, engine, decoding of the output: the decoding of the input is the client's image and the same for
both), and the prediction statistics of the data profile. Every `canary_every` candidate requests, once both sides have
`canary_min_requests`, the candidate is judged: a higher error rate, a slower median, or a prediction statistic that
the doctor's tests (`compare`) find seriously different from the incumbent's `canary_consecutive` times in a row rolls
it back; `canary_window` requests without any of these promote it (with `canary_auto`; else the judgement is only
reported). Promotion and rollback go through the repository's swap and drain: requests already holding a version finish
on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cvdeploy.errors import BundleError, CvdeployError, DeadlineError, EngineError, InputError, NotFoundError, ServerBusyError
from cvdeploy.serve.canary_arms import Arm, compare_windows, model_info, speed_ratio
from cvdeploy.serve.monitor import PREDICTION_STATISTICS, prediction_sample, tested

if TYPE_CHECKING:
    from cvdeploy.serve.repository import LoadedModel, Repository

__all__ = ["Arm", "Release", "Releases", "model_failure", "speed_ratio"]  # Arm and speed_ratio live in canary_arms
log = logging.getLogger("cvdeploy.serve")
MODES = ("canary", "shadow")
COHORT_HEADER = "x-cvdeploy-cohort"
RUNNING, PROMOTED, ROLLED_BACK = "running", "promoted", "rolled_back"
_LABEL = re.compile(r"[A-Za-z0-9._-]{1,64}")


def model_failure(e: BaseException) -> bool:
    """A failure of the model's side (not the client's, not load shedding): it counts against a candidate."""
    return isinstance(e, Exception) and (not isinstance(e, CvdeployError) or isinstance(e, EngineError | DeadlineError))


class Release:
    """A running canary or shadow release of one model."""

    def __init__(self, repo: Repository, incumbent: LoadedModel, candidate: LoadedModel, mode: str, share: float, by: str | None) -> None:
        s = repo.settings
        self.repo, self.incumbent, self.candidate, self.mode, self.share, self.by = repo, incumbent, candidate, mode, share, by
        self.name = incumbent.name
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self.status, self.reason, self.decided_by, self.decided_at = RUNNING, "", None, None
        self.arms = {"incumbent": Arm(s.canary_window), "candidate": Arm(s.canary_window)}
        self.streak: dict[str, int] = {}
        self.judgement: dict[str, Any] = {"verdict": "pending", "reasons": [], "findings": []}
        self.judging = False
        self.next_at = s.canary_every  # candidate requests at which the next judgement is due
        self.queue: asyncio.Queue[np.ndarray] = asyncio.Queue(s.shadow_queue)
        self.workers: list[asyncio.Task] = []
        self.shadowed = self.skipped = 0

    def arm_of(self, m: LoadedModel) -> Arm | None:
        return self.arms["candidate"] if m is self.candidate else self.arms["incumbent"] if m is self.incumbent else None

    def judge(self, inc: Arm, cand: Arm) -> dict[str, Any]:
        """The verdict on snapshots of the two arms: "rollback" (with reasons), "promote" or "pending" (CPU work: run it
        off the event loop, one at a time)."""
        s = self.repo.settings
        if min(len(inc.failed), len(cand.failed)) < s.canary_min_requests:
            need = f"{s.canary_min_requests} requests a side (incumbent {len(inc.failed)}, candidate {len(cand.failed)})"
            return {"verdict": "pending", "reasons": [f"waiting for {need}"], "findings": []}
        reasons: list[str] = []
        if cand.error_rate > inc.error_rate + s.canary_max_error_increase:
            reasons.append(f"error rate {cand.error_rate:.1%} vs {inc.error_rate:.1%} (allowed: +{s.canary_max_error_increase:.1%})")
        ratio = speed_ratio(inc, cand)
        if ratio is not None and ratio > s.canary_max_latency_ratio:
            reasons.append(f"model time per image at equal batch sizes x{ratio:.2f} the incumbent's "
                           f"(allowed: x{s.canary_max_latency_ratio:g})")
        findings = tested(compare_windows(list(inc.samples), list(cand.samples), model_info(self.incumbent),
                                          model_info(self.candidate)), PREDICTION_STATISTICS)
        for d in findings:
            self.streak[d.statistic] = self.streak.get(d.statistic, 0) + 1 if d.severity == "serious" else 0
            if self.streak[d.statistic] >= s.canary_consecutive:
                reasons.append(f"{d.statistic} differs from the incumbent's: {d.message}")
        verdict = "rollback" if reasons else "promote" if cand.requests >= s.canary_window else "pending"
        if verdict == "pending":
            reasons.append(f"{cand.requests} of {s.canary_window} candidate requests observed, no threshold crossed")
        return {"verdict": verdict, "reasons": reasons, "speed_ratio": None if ratio is None else round(ratio, 3),
                "findings": [d.to_dict() for d in findings]}

    def status_dict(self) -> dict[str, Any]:
        return {"model": self.name, "mode": self.mode, "share": self.share, "status": self.status, "started": self.started,
                "started_by": self.by, "incumbent": {"version": self.incumbent.version, "bundle": str(self.incumbent.path),
                                                     **self.arms["incumbent"].summary()},
                "candidate": {"version": self.candidate.version, "bundle": str(self.candidate.path), **self.arms["candidate"].summary()},
                "judgement": self.judgement, "reason": self.reason, "decided_by": self.decided_by, "decided_at": self.decided_at,
                **({"shadow": {"copied": self.shadowed, "skipped_queue_full": self.skipped}} if self.mode == "shadow" else {})}


class Releases:
    """The releases of a server, one per model at most; the last decided one of each model is kept for its status."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.active: dict[str, Release] = {}
        self.done: dict[str, Release] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- routing ---------------------------------------------------------------------------------

    def pick(self, name: str, version: str | None = None, cohort: str | None = None) -> LoadedModel:
        """The version that answers a request for `name`: `version` when pinned, else the incumbent or, in a canary
        release, the candidate (the cohort header's choice, else a random draw at the release's share)."""
        if cohort is not None:
            cohort = cohort.strip().lower()
            if cohort not in ("canary", "stable", ""):
                raise InputError(f"X-Cvdeploy-Cohort must be 'canary' or 'stable', got {cohort[:40]!r}")
        r = self.active.get(name)
        if r is None or r.mode != "canary":  # a shadow candidate never answers
            return self.repo.get(name, version)
        if version is not None:
            return r.candidate if version == r.candidate.version else self.repo.get(name, version)
        if cohort == "canary" or (cohort != "stable" and random.random() < r.share):
            return r.candidate
        return self.repo.get(name)

    def fallback(self, m: LoadedModel) -> LoadedModel | None:
        """The version serving `m`'s model when `m` is a canary candidate (still on trial, or just decided while the
        request was in flight) and not serving itself: it answers a request the candidate failed."""
        r = self.active.get(m.name) or self.done.get(m.name)
        if r is None or r.candidate is not m or r.mode != "canary":
            return None
        try:
            current = self.repo.get(m.name)
        except CvdeployError:
            return None
        return None if current is m else current

    # -- observations (on the event loop) --------------------------------------------------------

    def observe(self, m: LoadedModel, latency_s: float, result: Any, rows: int = 1, per_image_s: float | None = None) -> None:
        """A request `m` answered: its time from letterbox to boxes, its prediction, and the model time per image of
        its batch (`rows` images)."""
        r = self.active.get(m.name)
        arm = r.arm_of(m) if r is not None else None
        if arm is None:
            return
        arm.ok(latency_s, prediction_sample(result), rows, per_image_s)
        self._maybe_judge(r, arm)  # type: ignore[arg-type]

    def fail(self, m: LoadedModel) -> None:
        r = self.active.get(m.name)
        arm = r.arm_of(m) if r is not None else None
        if arm is not None:
            arm.fail()
            self._maybe_judge(r, arm)  # type: ignore[arg-type]

    def shadow(self, m: LoadedModel, image: np.ndarray) -> None:
        """Copy a request `m` (the incumbent) answered to the shadow candidate, if drawn and if there is room."""
        r = self.active.get(m.name)
        if r is None or r.mode != "shadow" or m is not r.incumbent or random.random() >= r.share:
            return
        try:
            r.queue.put_nowait(image)
            r.shadowed += 1
        except asyncio.QueueFull:
            r.skipped += 1
            self.repo.metrics.shadow_dropped.labels(r.name).inc()

    def _maybe_judge(self, r: Release, arm: Arm) -> None:
        # A judgement due while one runs is taken right after it (`next_at`), not skipped to the next multiple.
        if arm is not r.arms["candidate"] or r.judging or arm.requests < r.next_at:
            return
        r.judging = True
        r.next_at = arm.requests + self.repo.settings.canary_every
        self._spawn(self._judge(r))

    async def _judge(self, r: Release) -> None:
        try:
            arms = r.arms["incumbent"].copy(), r.arms["candidate"].copy()  # on the loop: nothing appends meanwhile
            verdict = await asyncio.to_thread(r.judge, *arms)
            if r.status != RUNNING:
                return
            r.judgement = verdict
            if self.repo.settings.canary_auto and verdict["verdict"] in ("promote", "rollback"):
                reason = "; ".join(verdict["reasons"]) or f"{r.arms['candidate'].requests} requests within every threshold"
                if verdict["verdict"] == "promote":
                    await self.promote(r.name, by="auto", reason=reason)
                else:
                    await self.rollback(r.name, by="auto", reason=reason)
        except NotFoundError:  # decided meanwhile (an admin's call, a reload)
            pass
        except Exception:
            log.exception("judging the candidate of %s failed", r.name)
        finally:
            r.judging = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, name: str, bundle: str | Path, *, mode: str = "canary", share: float | None = None,
                    version: str | None = None, by: str | None = None) -> dict[str, Any]:
        """Load and warm `bundle` as a candidate version of `name` (not visible until then) and start the release."""
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        share = self.repo.settings.canary_share if share is None else share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise InputError(f"share must be a number within 0..1, got {share!r}")
        if name in self.active:
            raise InputError(f"model {name!r} already has a {self.active[name].mode} release running: promote or roll it back first")
        incumbent = self.repo.get(name)
        if version is not None and not _LABEL.fullmatch(version):
            raise InputError(f"version must be 1-64 letters, digits, '.', '_' or '-', got {version[:70]!r}")
        path = Path(bundle)
        try:
            found = (path / "manifest.json").is_file()
        except (OSError, ValueError):  # a name too long, a NUL byte
            found = False
        if not found:
            raise InputError(f"candidate {str(path)[:300]} is not a bundle directory (no manifest.json)")
        label = version or self.repo.next_version(name)
        if label in self.repo.versions(name):
            raise InputError(f"model {name!r} already serves a version {label!r}: give the candidate another version")
        try:
            candidate = await self.repo.open_candidate(name, label, path)
        except CvdeployError:
            raise
        except Exception as e:  # an engine that cannot open the candidate's model: the candidate is what is wrong
            raise BundleError(f"the candidate {path} could not be loaded: {str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}") from None
        problem = _incompatible(incumbent, candidate)
        if problem is None and (name in self.active or self.repo.get(name) is not incumbent):
            problem = "the model changed while the candidate was loading (another release, a reload): start again"
        if problem is not None:
            self.repo.retire(candidate)
            raise InputError(problem)
        r = Release(self.repo, incumbent, candidate, mode, float(share), by)
        self.active[name] = r
        if mode == "shadow":
            r.workers = [asyncio.create_task(self._shadow_worker(r), name=f"cvdeploy-shadow-{name}")
                         for _ in range(max(1, self.repo.settings.instances))]
        self.repo.metrics.canary.labels(name, label, mode).set(share)
        log.info("%s release of %s: candidate version %s (%s) gets %.0f%% of the requests", mode, name, label, path, share * 100,
                 extra={"model": name, "version": label})
        return r.status_dict()

    async def promote(self, name: str, *, by: str | None = None, reason: str = "") -> dict[str, Any]:
        r = self._end(name, PROMOTED, by, reason)
        await self._stop_shadow(r)
        await self.repo.promote(name, r.candidate)
        log.info("promoted %s version %s (by %s): %s", name, r.candidate.version, by, reason, extra={"model": name})
        return r.status_dict()

    async def rollback(self, name: str, *, by: str | None = None, reason: str = "") -> dict[str, Any]:
        r = self._end(name, ROLLED_BACK, by, reason)
        await self._stop_shadow(r)
        self.repo.retire(r.candidate)  # requests it holds finish on it, then it stops
        log.warning("rolled back %s candidate version %s (by %s): %s", name, r.candidate.version, by, reason, extra={"model": name})
        return r.status_dict()

    def _end(self, name: str, status: str, by: str | None, reason: str) -> Release:
        r = self.active.pop(name, None)  # from now on no request is routed to the candidate
        if r is None:
            raise NotFoundError(f"model {name!r} has no release running" + (f" (the last one was {self.done[name].status})"
                                                                              if name in self.done else ""))
        r.status, r.decided_by, r.reason = status, by, reason
        r.decided_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.done[name] = r
        self.repo.metrics.canary.remove(name, r.candidate.version, r.mode)
        self.repo.metrics.canary_decisions.labels(name, "promote" if status == PROMOTED else "rollback",
                                                  "auto" if by == "auto" else "admin").inc()
        return r

    async def abandon(self, name: str, why: str) -> None:
        """Roll back a running release of `name` (the model is being reloaded or unloaded)."""
        if name in self.active:
            await self.rollback(name, by="server", reason=why)

    async def close(self) -> None:
        for name in list(self.active):
            await self.abandon(name, "the server is shutting down")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        names = sorted(set(self.active) | set(self.done)) if name is None else [name]
        out = []
        for n in names:
            r = self.active.get(n) or self.done.get(n)
            if r is not None:
                out.append(r.status_dict())
        return out

    # -- shadow ------------------------------------------------------------------------------------

    async def _shadow_worker(self, r: Release) -> None:
        from cvdeploy.serve.pipeline import run_model

        cand, arm = r.candidate, r.arms["candidate"]
        p = cand.predictor
        while True:
            image = await r.queue.get()
            try:
                with cand:
                    t0 = time.perf_counter()
                    prepared = await asyncio.to_thread(p.prepare, [image])
                    served = await run_model(cand, prepared.tensor, self.repo.settings.request_timeout_s)
                    t1 = time.perf_counter()
                    (result,) = p.finish(prepared, served.outputs, options=p.options)
                    done = time.perf_counter()
                    per_image = prepared.ms_per_image / 1000 + served.infer_s / served.batch_rows + (done - t1)
                    arm.ok(done - t0, prediction_sample(result), served.batch_rows, per_image)
            except ServerBusyError:  # the candidate's queue is full: a skipped copy, not a failure
                r.skipped += 1
            except Exception:  # a failing candidate is what a shadow release is for: counted, logged, never answered
                arm.fail()
                self.repo.metrics.shadow_failures.labels(r.name).inc()
                log.debug("shadow run of %s@%s failed", r.name, cand.version, exc_info=True)
            finally:
                r.queue.task_done()
            if r.status != RUNNING:
                return
            self._maybe_judge(r, arm)

    async def _stop_shadow(self, r: Release) -> None:
        for t in r.workers:
            t.cancel()
        for t in r.workers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _incompatible(incumbent: LoadedModel, candidate: LoadedModel) -> str | None:
    a, b = incumbent.bundle.manifest, candidate.bundle.manifest
    if a.task != b.task:
        return f"the candidate is a {b.task} model, the incumbent a {a.task} model: clients would get other answers"
    if dict(a.names) != dict(b.names):
        return "the candidate's class names differ from the incumbent's: clients would read other classes"
    return None
