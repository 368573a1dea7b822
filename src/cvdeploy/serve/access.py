"""Who may do what, and what is recorded: the access middleware (request ids, authentication, rate limits, RBAC,
JSON access logs, no traceback to a client), audit entries, and the scope every inference request runs in.

Probes and scrapes (`/v2/health/*`, `/v2/models/*/ready`, `/metrics`) are left out of the access log unless
`log_probes`: a kubelet probing every few seconds and Prometheus scraping every 15 s would otherwise be most of it.
With `public_health`, `/v2/health/live` and `/v2/health/ready` (those two only) skip authentication and rate limits.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from cvdeploy.errors import AuthError, ClientAbortError, CvdeployError
from cvdeploy.serve.health import HEALTH_PATHS
from cvdeploy.serve.http import error_response, status_of
from cvdeploy.serve.repository import LoadedModel, Repository

log = logging.getLogger("cvdeploy.access")


def audit(repo: Repository, request: Request, action: str, outcome: str, resource: str, body: bytes | None = None,
           details: str | None = None) -> None:
    log_ = repo.settings.audit
    if log_ is None:
        return
    if action == "infer" and repo.settings.audit_sample < 1.0:
        import random

        if random.random() >= repo.settings.audit_sample:
            return
    import hashlib

    who = getattr(request.state, "principal", None)
    log_.append(action, outcome, principal=who.name if who else None, role=who.role if who else None,
                auth_method=who.method if who else "none", mfa=who.mfa if who else None, resource=resource,
                client=getattr(request.state, "client", None) or (request.client.host if request.client else None),
                request_id=getattr(request.state, "request_id", None),
                input_sha256=hashlib.sha256(body).hexdigest() if body is not None else None, details=details)


def deny(repo: Repository, request: Request, action: str, outcome: str, resource: str, details: str) -> None:
    """A refusal, audited through the aggregator when there is one (a flood of denials must not flood the log)."""
    agg = repo.denials
    if agg is None:
        audit(repo, request, action, outcome, resource, details=details)
        return
    agg.record(action, getattr(request.state, "client", None), details, outcome=outcome, resource=resource,
               request_id=getattr(request.state, "request_id", None))


async def check_access(repo: Repository, request: Request) -> Response | None:
    """Authentication, rate limits and RBAC (when the server has an auth policy); a response when refused.

    Order matters for denial of service: the address's rate limit comes first; an unknown key id costs a database
    lookup, never a hash; a key already verified (or a JWT) needs no hash; a secret that does need argon2 is hashed
    only when neither its address nor its key id has too many failed authentications, on the policy's small worker
    pool, never on the event loop. So guessing is throttled while a legitimate client behind the same address whose
    key is already verified keeps being served.
    """
    policy = repo.settings.auth
    if policy is None:
        return None
    from cvdeploy.security.auth import PendingKey, Principal, route_permission

    peer = request.client.host if request.client else None
    client = policy.client_address(peer, request.headers.get("x-forwarded-for"))
    request.state.client = client
    path = request.url.path
    # The API page's own scripts and styles need what the page needs (security.auth knows the page, not its assets).
    permission = route_permission(request.method, path)
    wait = policy.rate_ok(f"addr:{client}")
    key_id = None
    try:
        if wait:
            raise AuthError(429, "too many requests from this address", "rate limited (address)", retry_after=wait)
        try:
            token = policy.credentials({k.lower(): v for k, v in request.headers.items()}, dict(request.query_params))
            key_id = policy.key_id_of(token)
            found = policy.identify(token)  # no hashing: a key already verified, or a JWT, is settled here
            verified_now = not isinstance(found, Principal) or found.method != "api_key"
            if isinstance(found, PendingKey):  # argon2 ahead: only for an address and key id not guessing
                if (wait := policy.failures_wait(client, key_id)) > 0:
                    raise AuthError(429, "too many failed authentications; retry later", "failed authentications throttled",
                                    retry_after=wait)
                found = await policy.verify_async(found)
            principal = found
        except AuthError as e:
            if e.status in (401, 403) and e.detail != "no credentials":  # a guess was made: it counts against the next hash
                policy.record_failure(client, key_id)
            deny(repo, request, "authenticate", "failure", request.url.path, e.detail)
            raise
        request.state.principal = principal
        if verified_now or permission != "infer" or repo.settings.audit_sample < 1.0:
            # An inference by an already-verified key is recorded once, by its own entry (principal, role, method):
            # a second "authenticate" row per request would double the log's cost and say nothing new.
            audit(repo, request, "authenticate", "success", request.url.path, details=principal.key_id)
        wait = policy.rate_ok(f"principal:{principal.name}")
        if wait:
            raise AuthError(429, "too many requests for this principal", "rate limited (principal)", retry_after=wait)
        try:
            policy.authorize(principal, permission, request.headers.get("x-totp"))
        except AuthError as e:
            deny(repo, request, "authorize", "denied", f"{request.method} {request.url.path}", e.detail)
            raise
        if permission in policy.mfa_required:
            audit(repo, request, "authorize", "success", f"{request.method} {request.url.path}", details="step-up TOTP")
    except AuthError as e:
        if e.status == 429 and e.detail.startswith("rate limited"):
            deny(repo, request, "rate_limit", "denied", request.url.path, e.detail)
        return error_response(e)
    return None


class AccessMiddleware:
    """Request id, authentication and access control, in-flight gauge, JSON access log, and a 500 without internals
    for anything unexpected. Plain ASGI (not BaseHTTPMiddleware, which costs a task and a stream per request)."""

    def __init__(self, app: Any, repo: Repository) -> None:
        self.app, self.repo = app, repo

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = rid
        rid_header = (b"x-request-id", rid.encode("latin-1", "replace"))
        t0 = time.perf_counter()
        status, started = 500, False

        async def send_with_id(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), rid_header]}
            await send(message)

        metrics, settings = self.repo.metrics, self.repo.settings
        path = scope["path"]
        scraped = path == "/metrics"  # the scrape does not count itself in flight
        if not scraped:
            metrics.in_flight.inc()
        try:
            public = settings.public_health and path in HEALTH_PATHS
            denied = None if public else await check_access(self.repo, request)
            if denied is not None:
                await denied(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:  # an unexpected failure: log it, answer 500 without internals
            logging.getLogger("cvdeploy.serve").exception("unhandled error on %s %s", request.method, request.url.path)
            status = 500
            if not started:
                await JSONResponse({"error": "internal server error"}, status_code=500)(scope, receive, send_with_id)
        finally:
            if not scraped:
                metrics.in_flight.dec()
            probe = is_probe(path)
            if not probe:  # a not-ready probe's 503 is a state (cvdeploy_server_ready), not an error to alert on
                metrics.responses.labels(f"{status // 100}xx" if status != 499 else "client_abort").inc()
            if log.isEnabledFor(logging.INFO) and (settings.log_probes or not probe):
                log.info("%s %s %d", request.method, path, status, extra={
                    "request_id": rid, "method": request.method, "path": path, "status": status,
                    "ms": round((time.perf_counter() - t0) * 1000, 2), "client": request.client.host if request.client else None})


def is_probe(path: str) -> bool:
    """A health probe or a metrics scrape (left out of the access log by default)."""
    return path in HEALTH_PATHS or path == "/metrics" or (path.startswith("/v2/models/") and path.endswith("/ready"))



@asynccontextmanager
async def inference_scope(repo: Repository, m: LoadedModel, request: Request, route: str) -> AsyncIterator[SimpleNamespace]:
    """Hold the model version for the request (it is not stopped under it), then count, time and audit it."""
    record = SimpleNamespace(body=None, lease=repo.budget.lease())
    t0 = time.perf_counter()
    outcome = "failure"
    with m:
        try:
            yield record
            outcome = "success"
        except ClientAbortError:
            outcome = "client_abort"
            raise
        except CvdeployError as e:
            outcome = "client_error" if status_of(e) < 500 else "rejected"
            raise
        finally:
            repo.budget.release(record.lease)
            repo.metrics.requests.labels(m.name, m.version, outcome).inc()
            repo.metrics.request_duration.labels(m.name, m.version, route).observe(time.perf_counter() - t0)
            if record.body is not None:
                repo.metrics.request_body.labels(m.name, m.version, route).observe(len(record.body))
            audit(repo, request, "infer", outcome, f"{m.name}@{m.version}#{m.bundle.manifest.source.sha256[:12]}", record.body)

