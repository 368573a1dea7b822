"""Administration routes: audit tail and API keys (authentication on, admin role, fresh TOTP), canary and shadow releases
(start, status, promote, rollback: `model.lifecycle`, audited), the drift report, and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from cvdeploy.errors import CvdeployError, InputError, NotFoundError
from cvdeploy.serve.access import audit
from cvdeploy.serve.http import read_body
from cvdeploy.serve.protocol import load_json
from cvdeploy.serve.repository import Repository


def register(app: FastAPI, repo: Repository) -> None:
    """Add the admin and metrics routes to `app`."""

    @app.get("/admin/audit")
    async def read_audit(request: Request, limit: int = 100) -> list:
        if repo.settings.auth is None or repo.settings.audit is None:
            raise NotFoundError("the audit API needs authentication and an audit log (serve --auth-keys --audit-log)")
        audit(repo, request, "read_audit", "success", f"last {limit}")
        return repo.settings.audit.tail(max(1, min(limit, 1000)))

    def key_store() -> Any:
        store = repo.settings.auth.store if repo.settings.auth is not None else None
        if store is None:
            raise NotFoundError("key management needs authentication with a key store (serve --auth-keys)")
        return store

    @app.post("/admin/keys")
    async def create_key(request: Request) -> dict:
        store = key_store()
        doc = load_json(await read_body(request, 64 * 1024, timeout=repo.settings.body_timeout_s), "the body")
        ttl = doc.get("ttl_days", 90) if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or not isinstance(doc.get("principal"), str) or not isinstance(doc.get("role"), str) \
                or isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise InputError('expected JSON {"principal": "...", "role": "...", "ttl_days": 90}')
        principal, role = doc["principal"], doc["role"]
        key_id, key = store.create(principal, role, ttl_days=ttl)
        audit(repo, request, "create_key", "success", f"{key_id} {principal} {role}")
        return {"key_id": key_id, "key": key, "principal": principal, "role": role, "note": "shown once"}

    @app.post("/admin/keys/{key_id}/revoke")
    async def revoke_key(key_id: str, request: Request) -> Response:
        key_store().revoke(key_id)
        audit(repo, request, "revoke_key", "success", key_id)
        return Response(status_code=200)

    register_releases(app, repo)

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        for n in repo.names():
            for v in repo.versions(n):
                repo.metrics.queue_depth.labels(n, v).set(repo.get(n, v).batcher.depth)
        return Response(repo.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)



def _who(request: Request) -> str | None:
    principal = getattr(request.state, "principal", None)
    return principal.name if principal is not None else None


async def _json_body(repo: Repository, request: Request, *, required: bool) -> dict[str, Any]:
    body = await read_body(request, 64 * 1024, timeout=repo.settings.body_timeout_s)
    if not body.strip() and not required:
        return {}
    doc = load_json(body, "the body")
    if not isinstance(doc, dict):
        raise InputError("expected a JSON object")
    return doc


def register_releases(app: FastAPI, repo: Repository) -> None:
    """Canary and shadow releases (`serve.canary`) and the drift report (`serve.monitor`)."""

    @app.get("/admin/drift")
    async def drift(model: str | None = None, sync: bool = False) -> dict:
        """Each served version's rolling window against its bundle's baseline profile (`sync`: queued requests first)."""
        if model is not None and model not in repo.sources():
            raise NotFoundError(f"model {model!r} is not in the repository (known: {', '.join(repo.sources()) or 'none'})")
        if sync:
            await asyncio.to_thread(repo.monitors.drain)
        return {"enabled": repo.settings.drift_monitor, "consecutive": repo.settings.drift_consecutive,
                "window": repo.settings.drift_window, "models": repo.monitors.report(model)}

    @app.get("/admin/canary")
    async def releases() -> list:
        return repo.releases.status()

    @app.get("/admin/models/{name}/canary")
    async def release_status(name: str) -> dict:
        found = repo.releases.status(name)
        if not found:
            raise NotFoundError(f"model {name!r} has had no canary or shadow release on this server")
        return found[0]

    @app.post("/admin/models/{name}/canary")
    async def start_release(name: str, request: Request) -> dict:
        doc = await _json_body(repo, request, required=True)
        unknown = set(doc) - {"bundle", "share", "mode", "version"}
        bundle, version = doc.get("bundle"), doc.get("version")
        if unknown or not isinstance(bundle, str) or not isinstance(version, str | None) or not isinstance(doc.get("mode", ""), str):
            raise InputError('expected JSON {"bundle": "PATH", "share": 0.1, "mode": "canary" or "shadow", "version": "2"} '
                             "(share, mode and version optional)")
        resource = f"{name} <- {bundle}"
        try:
            status = await repo.releases.start(name, bundle, mode=doc.get("mode", "canary"), share=doc.get("share"),
                                               version=version, by=_who(request))
        except CvdeployError as e:
            audit(repo, request, "canary_start", "failure", resource, details=str(e)[:300])
            raise
        audit(repo, request, "canary_start", "success", resource,
              details=f"{status['mode']} version {status['candidate']['version']} share {status['share']}")
        return status

    async def decide(name: str, request: Request, action: str) -> dict:
        doc = await _json_body(repo, request, required=False)
        reason = doc.get("reason", "")
        if not isinstance(reason, str):
            raise InputError('expected JSON {"reason": "..."} or no body')
        call = repo.releases.promote if action == "promote" else repo.releases.rollback
        try:
            status = await call(name, by=_who(request) or "admin", reason=reason[:500] or f"{action} by an admin call")
        except CvdeployError as e:
            audit(repo, request, f"canary_{action}", "failure", name, details=str(e)[:300])
            raise
        audit(repo, request, f"canary_{action}", "success", f"{name}@{status['candidate']['version']}", details=reason[:300] or None)
        return status

    @app.post("/admin/models/{name}/canary/promote")
    async def promote(name: str, request: Request) -> dict:
        return await decide(name, request, "promote")

    @app.post("/admin/models/{name}/canary/rollback")
    async def rollback(name: str, request: Request) -> dict:
        return await decide(name, request, "rollback")
