"""The models a server holds: several models and versions side by side, loaded, warmed up, swapped safely.

Layout of a repository directory (as Triton's): ``DIR/<model>/<version>/`` where each version
directory is a bundle (``manifest.json`` ...). A model given as a bare bundle path is version 1.
A load builds and warms the new version completely before it becomes visible; if it fails, the
version that was serving keeps serving.

Each model has a state, which the health routes report: `loading` (its first load and warm-up are running; requests
for it get 503 with Retry-After), `ready`, `failed` (no version could be loaded; 503 too, with the reason) or
`unloaded` (known, not served: 404). The server is ready when no model is loading or failed and one at least serves.

Beside the versions it serves, a model may have a candidate (`serve.canary`: canary or shadow release), loaded and warmed
the same way but reached only through `pick`; promoting it swaps it in exactly as a reload does. Each version has a
drift monitor (`serve.monitor`), on when its bundle carries a baseline profile.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from cvdeploy.errors import InputError, NotFoundError, ServerBusyError
from cvdeploy.serve.loaded import LoadedModel, drain_and_stop, engine_threads, open_version, warm
from cvdeploy.serve.metrics import ServerMetrics
from cvdeploy.serve.settings import ServeSettings

__all__ = ["FAILED", "LOADING", "READY", "UNLOADED", "LoadedModel", "Repository", "ServeSettings", "engine_threads"]
LOADING, READY, FAILED, UNLOADED = "loading", "ready", "failed", "unloaded"
log = logging.getLogger("cvdeploy.serve")


class Repository:
    def __init__(self, settings: ServeSettings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._models: dict[str, dict[str, LoadedModel]] = {}
        self._sources: dict[str, Path] = {}  # model name -> its repository folder or bundle path
        self._state: dict[str, str] = {}  # model name -> LOADING, READY, FAILED or UNLOADED
        self._error: dict[str, str] = {}  # model name -> why its last load failed
        self._label: dict[str, str] = {}  # model name -> the version label of a source that is one bundle (default "1")
        self._lock = asyncio.Lock()
        self._draining: set[asyncio.Task] = set()
        from cvdeploy.serve.limits import ByteBudget

        self.budget = ByteBudget(settings.max_inflight_bytes)
        self.denials: Any = None  # a DenialAggregator over settings.audit, when there is an audit log
        self.iolog: Any = None  # a cvdeploy.diagnose.iolog.IOLog, with settings.io_log
        from cvdeploy.serve.canary import Releases
        from cvdeploy.serve.monitor import MonitorHub

        self.monitors = MonitorHub(settings, metrics)  # drift against each bundle's baseline profile
        self.releases = Releases(self)  # canary and shadow candidates
        self.pending_releases: list[dict[str, Any]] = []  # started once their model is first loaded (serve --canary)
        self.followers: list[Any] = []  # cvdeploy.serve.follow.AliasFollower: started once their model is first loaded

    # -- queries ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._models)

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        versions = self._models.get(name)
        if not versions:
            state = self._state.get(name)
            if state == LOADING:
                raise ServerBusyError(f"model {name!r} is loading and warming up; retry shortly")
            if state == FAILED:
                raise ServerBusyError(f"model {name!r} could not be loaded ({self._error.get(name)}); it serves once a reload succeeds")
            raise NotFoundError(f"model {name!r} is not loaded (loaded: {', '.join(self.names()) or 'none'})")
        if version is None:
            return versions[max(versions, key=_version_key)]
        if version not in versions:
            raise NotFoundError(f"model {name!r} has no version {version!r} (versions: {', '.join(sorted(versions, key=_version_key))})")
        return versions[version]

    def sources(self) -> list[str]:
        """The names of every model the repository knows (loaded or not)."""
        return sorted(self._sources)

    def source_of(self, name: str) -> tuple[Path, str | None]:
        """Where `name` is loaded from, and the version label of a source that is one bundle (None: "1")."""
        return self._sources[name], self._label.get(name)

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=_version_key)

    def index(self) -> list[dict[str, str]]:
        """Triton's repository index: READY, LOADING or UNAVAILABLE (with the reason when a load failed)."""
        out = []
        for name, src in sorted(self._sources.items()):
            loaded = self._models.get(name, {})
            for v in _discover_versions(src) or [self._label.get(name, "1")]:
                row = {"name": name, "version": v, "state": "READY" if v in loaded else
                       "LOADING" if self._state.get(name) == LOADING else "UNAVAILABLE"}
                if v not in loaded and name in self._error:
                    row["reason"] = self._error[name]
                out.append(row)
        return out

    def state(self, name: str) -> tuple[str, str | None]:
        """A known model's state and, when its last load failed, why."""
        if name not in self._sources:
            raise NotFoundError(f"model {name!r} is not in the repository (known: {', '.join(sorted(self._sources)) or 'none'})")
        return self._state[name], self._error.get(name)

    def ready(self) -> bool:
        """No model loading or failed, one at least serving (an unloaded model was taken out on purpose)."""
        states = self._state.values()
        return READY in states and all(s in (READY, UNLOADED) for s in states)

    def mark_loading(self, names: list[str]) -> None:
        """Models about to be loaded answer 503 (not 404) from now on: called before the server accepts requests."""
        for n in names:
            if n not in self._models:
                self._state[n] = LOADING

    # -- loading ---------------------------------------------------------------------------------

    def add_source(self, path: str | os.PathLike[str], name: str | None = None, *, version: str | None = None) -> str:
        """Register a bundle (version `version`, default 1) or a model folder of version bundles; returns the model name."""
        p = Path(path)
        if not p.exists():
            raise InputError(f"model not found: {p}")
        if (p / "manifest.json").is_file() or p.suffix.lower() == ".onnx":
            model_name = name or self._load_bundle(p).name
        else:
            if not _discover_versions(p):
                raise InputError(f"{p} is neither a bundle nor a model folder of version bundles (<model>/<version>/manifest.json)")
            model_name = name or p.name
        self._sources[model_name] = p
        if version is not None:
            self._label[model_name] = version
        self._state.setdefault(model_name, UNLOADED)
        self.metrics.load_failures.labels(model_name)  # a 0 from the start: alerts on its increase see the first failure
        return model_name

    def add_repository(self, root: str | os.PathLike[str]) -> list[str]:
        r = Path(root)
        if not r.is_dir():
            raise InputError(f"model repository {r} is not a directory")
        names = [self.add_source(d) for d in sorted(r.iterdir()) if d.is_dir() and _discover_versions(d)]
        if not names:
            raise InputError(f"model repository {r} holds no model (<model>/<version>/manifest.json)")
        return names

    def bundle_paths(self) -> list[Path]:
        """Every bundle the repository would load (each version of each model)."""
        out: list[Path] = []
        for src in self._sources.values():
            versions = _discover_versions(src)
            out += [src / v for v in versions] if versions else [src]
        return out

    def preflight(self) -> None:
        """What would fail the server's start, said in one line before it starts: every bundle loads (hashes, and the
        signature when a public key is configured), and a protected bundle's key decrypts it."""
        for path in self.bundle_paths():
            b = self._load_bundle(path)
            encrypted = [n for n, v in b.manifest.variants.items() if v.encryption]
            if encrypted:
                from cvdeploy.security.protect import load_key, variant_bytes

                variant_bytes(b, encrypted[0], load_key())  # a wrong key fails AES-GCM's tag here

    def _load_bundle(self, path: Path) -> Any:
        """Every load and reload goes through here: hashes always, the signature when a public key is configured."""
        from cvdeploy.bundle.bundle import Bundle

        return Bundle.load(path, public_key=self.settings.public_key)

    async def load(self, name: str) -> list[str]:
        """(Re)load every version of `name`; the old versions keep serving until the new ones are warm."""
        if name not in self._sources:
            raise NotFoundError(f"model {name!r} is not in the repository (known: {', '.join(sorted(self._sources)) or 'none'})")
        await self.releases.abandon(name, "the model is being reloaded")
        src = self._sources[name]
        versions = _discover_versions(src)
        targets = {v: src / v for v in versions} if versions else {self._label.get(name, "1"): src}
        first = name not in self._models
        async with self._lock:
            if name not in self._models:
                self._state[name] = LOADING
            fresh: dict[str, LoadedModel] = {}
            try:
                for v, path in targets.items():
                    fresh[v] = await asyncio.to_thread(self._open, name, v, path)
                    await self._warm(fresh[v])
            except BaseException as e:
                for m in fresh.values():
                    await m.batcher.stop()
                if isinstance(e, Exception):  # not a cancellation (shutdown)
                    self.metrics.load_failures.labels(name).inc()
                    self._error[name] = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                    if name not in self._models:  # else the version that was serving still serves
                        self._state[name] = FAILED
                raise
            self._swap(name, fresh)
        if first:
            self._start_pending(name)
        return sorted(fresh, key=_version_key)

    def _swap(self, name: str, fresh: dict[str, LoadedModel]) -> None:
        """Make `fresh` the versions of `name` at once; the old ones finish what they accepted, then stop."""
        old = self._models.get(name, {})
        self._models[name] = fresh
        self._state[name] = READY
        self._error.pop(name, None)
        for v, m in fresh.items():
            self.metrics.model_state.labels(name, v).set(1)
            self.monitors.register(m.monitor)
        for m in old.values():
            if m not in fresh.values():
                self.retire(m)

    def retire(self, m: LoadedModel) -> None:
        """Stop `m` once the requests holding it are done (in the background); its drift monitor goes at once."""
        self.monitors.retire(m.monitor)
        if m.version not in self._models.get(m.name, {}):  # a candidate rolled back, a version replaced by another label
            self.metrics.model_state.labels(m.name, m.version).set(0)
        task = asyncio.create_task(drain_and_stop(m))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    # -- candidates (cvdeploy.serve.canary) ------------------------------------------------------

    def next_version(self, name: str) -> str:
        """A version label for a candidate of `name`: one above its highest numbered version."""
        numbers = [int(v) for v in (*self.versions(name), *_discover_versions(self._sources.get(name, Path()))) if v.isdigit()]
        return str(max(numbers, default=0) + 1)

    async def open_candidate(self, name: str, version: str, path: Path) -> LoadedModel:
        """Load and warm `path` as version `version` of `name`, without making it visible (a release routes to it)."""
        m = await asyncio.to_thread(self._open, name, version, path)
        try:
            await self._warm(m)
        except BaseException:
            await m.batcher.stop()
            for p in m.instances:
                p.close()
            raise
        self.monitors.register(m.monitor)
        self.metrics.model_state.labels(name, version).set(1)
        return m

    async def promote(self, name: str, m: LoadedModel) -> None:
        """Serve `m` as the only version of `name` from now on (a reload loads its bundle again); the versions it
        replaces finish what they accepted."""
        async with self._lock:
            self._sources[name] = m.path
            self._label[name] = m.version
            self._swap(name, {m.version: m})

    def pick(self, name: str, version: str | None = None, cohort: str | None = None) -> LoadedModel:
        """The version answering a request: `version` when pinned, else the served one or a release's candidate."""
        return self.releases.pick(name, version, cohort)

    def _start_pending(self, name: str) -> None:
        for f in self.followers:
            if f.model == name and f.task is None:
                f.start()
        for spec in [p for p in self.pending_releases if p["name"] == name]:
            self.pending_releases.remove(spec)

            async def start(spec: dict[str, Any] = spec) -> None:
                try:
                    await self.releases.start(**spec)
                except Exception as e:
                    log.error("the %s release of %s could not start: %s", spec.get("mode", "canary"), name, e, extra={"model": name})

            task = asyncio.create_task(start())
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def unload(self, name: str) -> None:
        await self.releases.abandon(name, "the model is being unloaded")
        async with self._lock:
            old = self._models.pop(name, None)
            if old is None:
                if self._state.get(name) == FAILED:  # taken out on purpose: the server can be ready without it
                    self._state[name] = UNLOADED
                    return
                raise NotFoundError(f"model {name!r} is not loaded")
            self._state[name] = UNLOADED
            for v, m in old.items():
                self.metrics.model_state.labels(name, v).set(0)
                self.monitors.retire(m.monitor)
                await drain_and_stop(m)

    async def close(self) -> None:
        """Graceful shutdown: followers stop, releases end, every model drains the requests it accepted, then stops."""
        for f in self.followers:
            await f.stop()
        await self.releases.close()
        for name in list(self._models):
            await self.unload(name)
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)
        await asyncio.to_thread(self.monitors.close)

    def _open(self, name: str, version: str, path: Path) -> LoadedModel:
        return open_version(self.settings, self.metrics, self.monitors, self._load_bundle, name, version, path)

    async def _warm(self, m: LoadedModel) -> None:
        await warm(m, self.settings)


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), v) if v.isdigit() else (10**9, v)


def _discover_versions(path: Path) -> list[str]:
    if not path.is_dir() or (path / "manifest.json").is_file():
        return []
    return sorted((d.name for d in path.iterdir() if d.is_dir() and (d / "manifest.json").is_file()), key=_version_key)
