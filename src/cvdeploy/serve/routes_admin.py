"""Administration routes (authentication on, admin role, fresh TOTP: audit tail, API keys) and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from cvdeploy.errors import InputError, NotFoundError
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

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        for n in repo.names():
            for v in repo.versions(n):
                repo.metrics.queue_depth.labels(n, v).set(repo.get(n, v).batcher.depth)
        return Response(repo.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

