"""Serving a registry alias and following its moves: `cvdeploy serve --registry PATH --model NAME@ALIAS`.

The alias is resolved once at start (the bundle is served as the version number the registry gave it), then polled every
`registry_poll_s` seconds; when it points at another version (`cvdeploy registry promote` or `rollback`), that version is
loaded and warmed beside the one serving and swapped in by the repository's swap and drain: no restart, and the
requests the old version accepted finish on it. A target that cannot be loaded (deleted, tampered with) leaves the
serving version in place; it is logged once and tried again only when the alias moves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cvdeploy.errors import InputError

if TYPE_CHECKING:
    from cvdeploy.serve.repository import Repository

log = logging.getLogger("cvdeploy.serve")


def parse_ref(ref: str) -> tuple[str, str]:
    """"NAME@ALIAS" (or NAME@3, NAME@latest) -> (NAME, ALIAS)."""
    name, sep, alias = ref.partition("@")
    if not sep or not name.strip() or not alias.strip():
        raise InputError(f"--model takes NAME@ALIAS (e.g. shapes@production), got {ref!r}")
    return name.strip(), alias.strip()


def resolve(registry: str | os.PathLike[str] | None, model: str, alias: str) -> tuple[Path, str]:
    """(bundle directory, version number) that `alias` of `model` points at now (blocking: SQLite and a manifest read)."""
    from cvdeploy.registry import Registry

    with Registry(registry) as reg:
        path = reg.resolve(model, alias)  # also checks the directory still holds the registered manifest
        info = reg.show(model, alias)
    if Path(info.path) != path:  # the alias moved between the two reads: the next poll sees it settled
        raise InputError(f"alias {alias!r} of {model!r} moved while it was read; reading it again")
    return path, str(info.version)


def follow_alias(repo: Repository, registry: str | os.PathLike[str] | None, ref: str) -> AliasFollower:
    """Serve the bundle `ref` (NAME@ALIAS) points at now, as the model NAME at the registry's version number, and follow
    the alias from the first load on. `registry` None: the registry's own default ($CVDEPLOY_REGISTRY, else
    ./cvdeploy-registry)."""
    try:
        import cvdeploy.registry  # noqa: F401
    except ImportError as e:
        raise InputError(f"following a registry alias needs cvdeploy.registry ({e})") from None
    model, alias = parse_ref(ref)
    path, version = resolve(registry, model, alias)
    repo.add_source(path, name=model, version=version)
    follower = AliasFollower(repo, registry, model, alias, version)
    repo.followers.append(follower)
    return follower


class AliasFollower:
    """Polls one alias and swaps the model it serves when the alias moves."""

    def __init__(self, repo: Repository, registry: str | os.PathLike[str] | None, model: str, alias: str, version: str) -> None:
        self.repo, self.registry, self.model, self.alias = repo, registry, model, alias
        self.version = version  # the registry version serving now
        self._failed: str | None = None  # a target that could not be loaded: not tried again until the alias moves
        self._unreadable: str | None = None  # why the registry could not be read at the last poll
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"cvdeploy-follow-{self.model}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def poll(self) -> bool:
        """Resolve the alias once and swap to its target if it moved; True when the served version changed."""
        try:
            path, version = await asyncio.to_thread(resolve, self.registry, self.model, self.alias)
        except Exception as e:
            if _line(e) != self._unreadable:  # once per cause, not at every poll while the registry is away
                log.warning("cannot read alias %s@%s from the registry (%s); version %s keeps serving", self.model, self.alias,
                            _line(e), self.version, extra={"model": self.model})
            self._unreadable = _line(e)
            return False
        self._unreadable = None
        if version == self.version or version == self._failed:
            return False
        previous = self.repo.source_of(self.model)
        try:
            self.repo.add_source(path, self.model, version=version)
            await self.repo.load(self.model)  # loaded and warmed beside the serving version, then swapped in
        except Exception as e:
            with contextlib.suppress(InputError):  # a later reload must find the serving bundle (if it still exists)
                self.repo.add_source(previous[0], self.model, version=previous[1])
            self._failed = version
            log.error("alias %s@%s moved to version %s, which could not be loaded (%s); version %s keeps serving",
                      self.model, self.alias, version, _line(e), self.version, extra={"model": self.model})
            return False
        log.info("alias %s@%s moved: serving version %s (was %s) from %s", self.model, self.alias, version, self.version, path,
                 extra={"model": self.model, "version": version})
        self.version, self._failed = version, None
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.repo.settings.registry_poll_s)
            await self.poll()


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
