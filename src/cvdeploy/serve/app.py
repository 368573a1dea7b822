"""The HTTP server: Open Inference Protocol v2 (Triton-compatible), an image API, repository control, metrics.

`create_app(repository)` returns a FastAPI app; every model is loaded and warmed up in the
app's lifespan, before the server reports ready. Client errors are 4xx with ``{"error": ...}``;
a full queue is 503 with Retry-After; nothing a client sends produces a 500.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from cvdeploy import __version__
from cvdeploy.errors import CvdeployError, ImageDecodeError, InputError, ServerBusyError
from cvdeploy.predict import Prepared
from cvdeploy.serve.batcher import QueueFull, Served
from cvdeploy.serve.metrics import ServerMetrics
from cvdeploy.serve.protocol import HEADER, OutputNotRepresentable, decompress, encode_response, load_json, parse_request
from cvdeploy.serve.repository import LoadedModel, Repository, ServeSettings

log = logging.getLogger("cvdeploy.access")
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "cvdeploy_images"]
V2_TYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8", "int32": "INT32", "int64": "INT64"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def http_status(e: CvdeployError) -> int:
    """The one place a cvdeploy error becomes an HTTP status."""
    if isinstance(e, ServerBusyError):
        return 503
    if isinstance(e, OutputNotRepresentable):
        return 422
    return 400


def _model(repo: Repository, name: str, version: str | None) -> LoadedModel:
    try:
        return repo.get(name, version)
    except KeyError as e:
        raise ApiError(404, str(e.args[0])) from None


class ClientAbort(Exception):
    """The client disconnected before its request was read: logged as a client abort (499), not as a server error."""


async def _body(request: Request, limit: int, *, timeout: float | None = None, budget: Any = None, lease: Any = None) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` (declared or streamed), with 408 when it does not
    arrive within `timeout` seconds (a slow-body client holds a connection and memory), and with 503 when `budget`
    (the server's bytes in flight) cannot admit it; what it admits is charged to `lease`, released with the request."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is larger than the limit ({limit} bytes)")
    weight = budget.weight(request.headers.get("content-type")) if budget is not None else 1
    if budget is not None and declared is not None and declared.isdigit():
        budget.admit(lease, int(declared) * weight)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body is larger than the limit ({limit} bytes)")
                if budget is not None and (declared is None or not declared.isdigit()):
                    budget.admit(lease, len(chunk) * weight)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise ClientAbort() from None
    return b"".join(chunks)


def _metadata(m: LoadedModel) -> dict[str, Any]:
    eng = m.predictor.engine
    return {
        "name": m.name, "versions": [m.version], "platform": "onnxruntime_onnx" if "OpenVINO" not in eng.provider else "openvino",
        "inputs": [{"name": i.name, "datatype": V2_TYPES.get(i.dtype, "FP32"), "shape": [-1 if d is None else d for d in i.shape]}
                   for i in eng.inputs]
        + [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": o.name, "datatype": V2_TYPES.get(o.dtype, "FP32"), "shape": [-1 if d is None else d for d in o.shape]}
                    for o in eng.outputs] + [{"name": "detections", "datatype": "BYTES", "shape": [-1]}],
    }


def _ultralytics_metadata(m: LoadedModel) -> dict[str, Any]:
    """What Ultralytics' Triton client reads (with ast.literal_eval): plain literals only."""
    man = m.bundle.manifest
    h, w = man.preprocess.imgsz
    return {"description": f"cvdeploy {m.name} v{m.version}", "author": "cvdeploy", "version": __version__, "task": man.task,
            "stride": int(man.preprocess.stride), "batch": 1, "imgsz": [int(h), int(w)],
            "names": {int(k): str(v) for k, v in man.names.items()}, "args": {"nms": False}}


def _config(m: LoadedModel) -> dict[str, Any]:
    eng = m.predictor.engine
    return {
        "name": m.name, "platform": "onnxruntime_onnx", "backend": "cvdeploy", "max_batch_size": 0,
        "input": [{"name": i.name, "data_type": "TYPE_" + V2_TYPES.get(i.dtype, "FP32"),
                   "dims": [-1 if d is None else d for d in i.shape]} for i in eng.inputs],
        "output": [{"name": o.name, "data_type": "TYPE_" + V2_TYPES.get(o.dtype, "FP32"),
                    "dims": [-1 if d is None else d for d in o.shape]} for o in eng.outputs],
        "dynamic_batching": {"max_queue_delay_microseconds": int(m.batcher.max_delay * 1e6),
                             "preferred_batch_size": [m.batcher.max_batch]},
        "instance_group": [{"count": m.batcher.instances, "kind": "KIND_CPU" if "CPU" in eng.provider.upper() else "KIND_GPU"}],
        "parameters": {"metadata": {"string_value": repr(_ultralytics_metadata(m))}},
    }


async def _run(m: LoadedModel, tensor: np.ndarray, timeout: float) -> Served:
    try:
        async with asyncio.timeout(timeout):  # no extra task per request, unlike wait_for
            return await m.infer(tensor)
    except QueueFull as e:
        raise ApiError(503, f"model {m.name!r} is overloaded: {e}; retry later", {"Retry-After": "1"}) from None
    except TimeoutError:
        raise ApiError(504, f"model {m.name!r} did not answer within {timeout:g} s") from None


async def _all(aws: list[Any]) -> list[Any]:
    """Await every awaitable: one directly (the common single-image request, without gather's task), several gathered."""
    return [await aws[0]] if len(aws) == 1 else list(await asyncio.gather(*aws))


async def _detect_images(repo: Repository, m: LoadedModel, blobs: list[bytes], options: Any, annotate: bool = False) -> list[dict]:
    """Encoded images through the Predictor's own stages: decode and prepare (thread pool), infer (the batcher, which
    batches same-shape tensors), finish. Each image is letterboxed exactly as `Predictor.predict` letterboxes it (the
    minimal rectangle), so the answer is the Predictor's; images whose rectangles match share batches."""
    from cvdeploy.vision.image import image_format
    from cvdeploy.vision.result import Timings

    p = m.predictor
    allowed = repo.settings.allowed_formats

    def prepare(blob: bytes) -> tuple[np.ndarray, Prepared, float]:
        fmt = image_format(blob)
        if fmt is not None and fmt.lower() not in allowed:
            raise InputError(f"image format {fmt} is not allowed here (allowed: {', '.join(allowed)})")
        t0 = time.perf_counter()
        img = p.decode(blob)
        decode_ms = (time.perf_counter() - t0) * 1000
        return img, p.prepare([img]), decode_ms

    timeout = repo.settings.request_timeout_s
    with m.batcher.expect(len(blobs)):
        prepared = await _all([asyncio.to_thread(prepare, b) for b in blobs])
    served = await _all([_run(m, pr.tensor, timeout) for _, pr, _ in prepared])
    results = []
    for (img, pr, decode_ms), sv in zip(prepared, served, strict=True):
        t = Timings(decode=decode_ms, preprocess=pr.ms_per_image, queue=sv.queue_s * 1000, infer=sv.infer_s * 1000 / sv.batch_rows)
        (r,) = p.finish(pr, sv.outputs, options=options, timings=[t])
        repo.metrics.stage.labels(m.name, m.version, "preprocess").observe((t.decode + t.preprocess) / 1000)
        repo.metrics.stage.labels(m.name, m.version, "postprocess").observe(t.postprocess / 1000)
        d = r.to_dict()
        d.pop("source", None)
        if annotate:
            import cv2

            from cvdeploy.vision.draw import draw

            ok, buf = cv2.imencode(".jpg", draw(img, r))
            d["annotated_image"] = base64.b64encode(buf.tobytes()).decode() if ok else None
        results.append(d)
    return results


def _audit(repo: Repository, request: Request, action: str, outcome: str, resource: str, body: bytes | None = None,
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


def _deny(repo: Repository, request: Request, action: str, outcome: str, resource: str, details: str) -> None:
    """A refusal, audited through the aggregator when there is one (a flood of denials must not flood the log)."""
    agg = repo.denials
    if agg is None:
        _audit(repo, request, action, outcome, resource, details=details)
        return
    agg.record(action, getattr(request.state, "client", None), details, outcome=outcome, resource=resource,
               request_id=getattr(request.state, "request_id", None))


async def _check_access(repo: Repository, request: Request) -> Response | None:
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
    from cvdeploy.security.auth import AuthError, PendingKey, Principal, route_permission

    peer = request.client.host if request.client else None
    client = policy.client_address(peer, request.headers.get("x-forwarded-for"))
    request.state.client = client
    permission = route_permission(request.method, request.url.path)
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
            _deny(repo, request, "authenticate", "failure", request.url.path, e.detail)
            raise
        request.state.principal = principal
        if verified_now or permission != "infer" or repo.settings.audit_sample < 1.0:
            # An inference by an already-verified key is recorded once, by its own entry (principal, role, method):
            # a second "authenticate" row per request would double the log's cost and say nothing new.
            _audit(repo, request, "authenticate", "success", request.url.path, details=principal.key_id)
        wait = policy.rate_ok(f"principal:{principal.name}")
        if wait:
            raise AuthError(429, "too many requests for this principal", "rate limited (principal)", retry_after=wait)
        try:
            policy.authorize(principal, permission, request.headers.get("x-totp"))
        except AuthError as e:
            _deny(repo, request, "authorize", "denied", f"{request.method} {request.url.path}", e.detail)
            raise
        if permission in policy.mfa_required:
            _audit(repo, request, "authorize", "success", f"{request.method} {request.url.path}", details="step-up TOTP")
    except AuthError as e:
        headers = {"Retry-After": str(max(1, int((e.retry_after or 1) + 0.999)))} if e.status in (429, 503) else {}
        if e.status == 429 and e.detail.startswith("rate limited"):
            _deny(repo, request, "rate_limit", "denied", request.url.path, e.detail)
        if e.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="cvdeploy"'
        return JSONResponse({"error": e.message}, status_code=e.status, headers=headers)
    return None


class _AccessMiddleware:
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

        metrics = self.repo.metrics
        scraped = scope["path"] == "/metrics"  # the scrape does not count itself in flight
        if not scraped:
            metrics.in_flight.inc()
        try:
            denied = await _check_access(self.repo, request)
            if denied is not None:
                await denied(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except ClientAbort:  # the client went away mid-request: nothing to answer, nothing broken on our side
            status = 499
        except Exception:  # an unexpected failure: log it, answer 500 without internals
            logging.getLogger("cvdeploy.serve").exception("unhandled error on %s %s", request.method, request.url.path)
            status = 500
            if not started:
                await JSONResponse({"error": "internal server error"}, status_code=500)(scope, receive, send_with_id)
        finally:
            if not scraped:
                metrics.in_flight.dec()
            metrics.responses.labels(f"{status // 100}xx" if status != 499 else "client_abort").inc()
            if log.isEnabledFor(logging.INFO):
                log.info(json.dumps({"ts": round(time.time(), 3), "request_id": rid, "method": request.method,
                                     "path": request.url.path, "status": status, "ms": round((time.perf_counter() - t0) * 1000, 2),
                                     "client": request.client.host if request.client else None}))


def create_app(repository: Repository, *, load_all: bool = True) -> FastAPI:
    repo = repository
    metrics = repo.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Decoding, letterboxing and loads run in the loop's default executor: named threads, as many as asyncio's default.
        from concurrent.futures import ThreadPoolExecutor

        from cvdeploy.serve.batcher import os_thread_namer

        workers = min(32, (os.cpu_count() or 1) + 4)
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cvdeploy-work", initializer=os_thread_namer("cvd-work")))
        anchors = None
        if repo.settings.audit is not None:
            from cvdeploy.security.audit import AnchorWriter, DenialAggregator

            # A flood of refusals makes a few entries per client and 10 s (the first 20 with their details), not thousands.
            repo.denials = DenialAggregator(repo.settings.audit, burst=20)
            if repo.settings.audit_anchors is not None:  # signed checkpoints kept apart: truncation or a wipe shows
                anchors = AnchorWriter(repo.settings.audit, repo.settings.audit_anchors, every_s=repo.settings.audit_anchor_every_s)
                anchors.start()
        if load_all:
            for name in sorted(repo._sources):
                await repo.load(name)  # loaded and warmed before the first request is accepted
        app.state.ready = True
        yield
        app.state.ready = False
        await repo.close()  # graceful: drain what was accepted
        if repo.denials is not None:
            repo.denials.flush()
        if anchors is not None:
            anchors.stop()

    app = FastAPI(title="cvdeploy", version=__version__, lifespan=lifespan,
                  description="Open Inference Protocol v2 (KServe, Triton-compatible) and an image API for YOLO bundles.")
    app.state.ready = False

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(CvdeployError)
    async def _user_error(_: Request, e: CvdeployError) -> JSONResponse:
        status = http_status(e)
        return JSONResponse({"error": str(e)}, status_code=status, headers={"Retry-After": "1"} if status == 503 else None)

    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:  # 404, 405: the same shape as every error
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(OverflowError)
    async def _too_big(_: Request, e: OverflowError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=413)

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return JSONResponse({"error": f"invalid request at {where}: {first.get('msg', 'invalid')}"}, status_code=400)

    app.add_middleware(_AccessMiddleware, repo=repo)

    # -- health and metadata ----------------------------------------------------------------------

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "cvdeploy", "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        ok = app.state.ready and bool(repo.names())
        return Response(status_code=200 if ok else 503)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict:
        m = _model(repo, name, version)
        meta = _metadata(m)
        meta["versions"] = repo.versions(name)
        return meta

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        _model(repo, name, version)
        return Response(status_code=200)

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None) -> dict:
        return _config(_model(repo, name, version))

    @asynccontextmanager
    async def _inference(m: LoadedModel, request: Request, route: str):
        """Hold the model version for the request (it is not stopped under it), then count, time and audit it."""
        record = SimpleNamespace(body=None, lease=repo.budget.lease())
        t0 = time.perf_counter()
        outcome = "failure"
        with m:
            try:
                yield record
                outcome = "success"
            except (CvdeployError, ApiError) as e:
                outcome = "client_error" if (e.status if isinstance(e, ApiError) else http_status(e)) < 500 else "rejected"
                raise
            except ClientAbort:
                outcome = "client_abort"
                raise
            finally:
                repo.budget.release(record.lease)
                metrics.requests.labels(m.name, m.version, outcome).inc()
                metrics.request_duration.labels(m.name, m.version, route).observe(time.perf_counter() - t0)
                _audit(repo, request, "infer", outcome, f"{m.name}@{m.version}#{m.bundle.manifest.source.sha256[:12]}", record.body)

    # -- inference (v2) --------------------------------------------------------------------------

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        m = _model(repo, name, version)
        async with _inference(m, request, "v2") as record:
            limit = repo.settings.max_body_bytes
            with m.batcher.expect(1):  # a batch forming meanwhile may wait for this one
                raw = await _body(request, limit, timeout=repo.settings.body_timeout_s, budget=repo.budget, lease=record.lease)
                body = record.body = decompress(raw, request.headers.get("content-encoding"), limit)
                if len(body) > len(raw):  # inflated: charge what it became
                    repo.budget.admit(record.lease, (len(body) - len(raw)) * repo.budget.weight(request.headers.get("content-type")))
                req = parse_request(body, request.headers.get(HEADER))
            outputs = await _infer_tensors(m, req)
            payload, head_len = encode_response(m.name, m.version, req.id, outputs, req.outputs, req.binary_output)
        if head_len is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(head_len)})

    async def _infer_tensors(m: LoadedModel, req: Any) -> dict[str, np.ndarray]:
        spec = m.predictor.engine.inputs[0]
        if len(req.inputs) != 1:
            raise InputError(f"the model takes one input ({spec.name!r} as FP32 NCHW, or 'image' as BYTES), got {len(req.inputs)}")
        (name, arr), = req.inputs.items()
        if req.datatypes[name] == "BYTES":
            if arr.ndim != 1 or arr.size < 1:
                raise InputError(f"input {name!r}: BYTES images must have shape [n] with n >= 1, got {list(arr.shape)}")
            if arr.size > repo.settings.max_batch * 4:
                raise InputError(f"input {name!r}: at most {repo.settings.max_batch * 4} images per request, got {arr.size}")
            results = await _detect_images(repo, m, [bytes(b) for b in arr.reshape(-1)], m.predictor.options)
            out = np.empty(len(results), dtype=object)
            out[:] = [json.dumps(r).encode() for r in results]
            return {"detections": out}
        if name != spec.name:
            raise InputError(f"unknown input {name!r}; the model takes {spec.name!r} (FP32) or 'image' (BYTES)")
        if req.datatypes[name] != V2_TYPES.get(spec.dtype, "FP32"):
            raise InputError(f"input {name!r}: datatype {req.datatypes[name]}, the model takes {V2_TYPES.get(spec.dtype, 'FP32')}")
        if arr.ndim != len(spec.shape) or any(isinstance(d, int) and d != a for d, a in zip(spec.shape, arr.shape, strict=True)):
            raise InputError(f"input {name!r}: shape {list(arr.shape)} does not fit the model's {[-1 if d is None else d for d in spec.shape]}")
        side = min(4096, int(max(m.predictor.spec.imgsz) * repo.settings.max_input_scale))  # bounds the engine's memory
        if arr.shape[0] < 1 or arr.shape[0] > repo.settings.max_batch * 4 or min(arr.shape[2:]) < 32 or max(arr.shape[2:]) > side \
                or arr.shape[2] % m.predictor.spec.stride or arr.shape[3] % m.predictor.spec.stride:
            raise InputError(f"input {name!r}: shape {list(arr.shape)}: batch 1..{repo.settings.max_batch * 4}, sides 32..{side} "
                             f"and multiples of {m.predictor.spec.stride}")
        tensor = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(tensor).all():
            raise InputError(f"input {name!r} holds inf or NaN")
        return (await _run(m, tensor, repo.settings.request_timeout_s)).outputs

    # -- the image API ---------------------------------------------------------------------------

    @app.post("/v1/models/{name}/predict", openapi_extra={"parameters": PREDICT_QUERY_DOC})
    async def predict(name: str, request: Request) -> dict:
        # The query is read by hand: FastAPI's per-request parameter analysis cost ~1.7 ms of event-loop CPU here.
        q = _predict_query(request)
        m = _model(repo, name, q["version"])
        async with _inference(m, request, "images") as record:
            options = _options(m, q["conf"], q["iou"], q["max_det"], q["classes"])
            annotate = q["annotate"]
            with m.batcher.expect(1):
                body = record.body = await _body(request, repo.settings.max_body_bytes, timeout=repo.settings.body_timeout_s,
                                                 budget=repo.budget, lease=record.lease)
                blob = await _image_from(request, body)
            (result,) = await _detect_images(repo, m, [blob], options, annotate)
        # Plain JSON types already: answered as is, without FastAPI's per-value encoder walk.
        return JSONResponse({"model_name": m.name, "model_version": m.version, **result})

    # -- repository control (Triton's model repository extension) ---------------------------------

    @app.post("/v2/repository/index")
    async def repository_index() -> list:
        return repo.index()

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str, request: Request) -> Response:
        try:
            versions = await repo.load(name)
        except KeyError as e:
            _audit(repo, request, "load_model", "not_found", name)
            raise ApiError(404, str(e.args[0])) from None
        except CvdeployError as e:
            _audit(repo, request, "load_model", "failure", name)
            raise ApiError(400, f"could not load {name!r}; the version that was serving still serves: {e}") from None
        _audit(repo, request, "load_model", "success", f"{name}@{','.join(versions)}")
        return Response(status_code=200)

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(name: str, request: Request) -> Response:
        try:
            await repo.unload(name)
        except KeyError as e:
            _audit(repo, request, "unload_model", "not_found", name)
            raise ApiError(404, str(e.args[0])) from None
        _audit(repo, request, "unload_model", "success", name)
        return Response(status_code=200)

    # -- administration (only with authentication on: admin role and a fresh TOTP code) -------------

    @app.get("/admin/audit")
    async def read_audit(request: Request, limit: int = 100) -> list:
        if repo.settings.auth is None or repo.settings.audit is None:
            raise ApiError(404, "the audit API needs authentication and an audit log (serve --auth-keys --audit-log)")
        _audit(repo, request, "read_audit", "success", f"last {limit}")
        return repo.settings.audit.tail(max(1, min(limit, 1000)))

    def key_store() -> Any:
        store = repo.settings.auth.store if repo.settings.auth is not None else None
        if store is None:
            raise ApiError(404, "key management needs authentication with a key store (serve --auth-keys)")
        return store

    @app.post("/admin/keys")
    async def create_key(request: Request) -> dict:
        store = key_store()
        doc = load_json(await _body(request, 64 * 1024, timeout=repo.settings.body_timeout_s), "the body")
        ttl = doc.get("ttl_days", 90) if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or not isinstance(doc.get("principal"), str) or not isinstance(doc.get("role"), str) \
                or isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise ApiError(400, 'expected JSON {"principal": "...", "role": "...", "ttl_days": 90}')
        principal, role = doc["principal"], doc["role"]
        key_id, key = store.create(principal, role, ttl_days=ttl)
        _audit(repo, request, "create_key", "success", f"{key_id} {principal} {role}")
        return {"key_id": key_id, "key": key, "principal": principal, "role": role, "note": "shown once"}

    @app.post("/admin/keys/{key_id}/revoke")
    async def revoke_key(key_id: str, request: Request) -> Response:
        key_store().revoke(key_id)
        _audit(repo, request, "revoke_key", "success", key_id)
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for n in repo.names():
            for v in repo.versions(n):
                metrics.queue_depth.labels(n, v).set(repo.get(n, v).batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


_QUERY_TYPES: dict[str, tuple[str, str]] = {
    "conf": ("number", "Confidence threshold, 0..1 (default: the bundle's)."),
    "iou": ("number", "NMS IoU threshold, 0..1 (default: the bundle's)."),
    "max_det": ("integer", "Most detections kept per image, 1..10000."),
    "classes": ("string", "Comma-separated class ids to keep."),
    "annotate": ("boolean", "Also answer the image with the detections drawn (base64 JPEG)."),
    "version": ("string", "Model version (default: the latest)."),
}
PREDICT_QUERY_DOC = [{"name": k, "in": "query", "required": False, "description": d, "schema": {"type": t}}
                     for k, (t, d) in _QUERY_TYPES.items()]
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _predict_query(request: Request) -> dict[str, Any]:
    """The image API's query parameters, typed, with a 400 naming the parameter when one is malformed."""
    out: dict[str, Any] = {"conf": None, "iou": None, "max_det": None, "classes": None, "annotate": False, "version": None}
    for key, raw in request.query_params.multi_items():
        kind = _QUERY_TYPES.get(key, ("", ""))[0]
        try:
            if kind == "number":
                out[key] = float(raw)
            elif kind == "integer":
                out[key] = int(raw)
            elif kind == "boolean":
                if raw.lower() not in _TRUE | _FALSE:
                    raise ValueError
                out[key] = raw.lower() in _TRUE
            elif kind == "string":
                out[key] = raw
        except ValueError:
            raise InputError(f"query parameter {key}: expected {'an' if kind[0] in 'ai' else 'a'} {kind}, got {raw!r}") from None
    return out


def _options(m: LoadedModel, conf: float | None, iou: float | None, max_det: int | None, classes: str | None) -> Any:
    if conf is not None and not 0 <= conf <= 1:
        raise InputError(f"conf must be within 0..1, got {conf}")
    if iou is not None and not 0 <= iou <= 1:
        raise InputError(f"iou must be within 0..1, got {iou}")
    if max_det is not None and not 1 <= max_det <= 10_000:
        raise InputError(f"max_det must be within 1..10000, got {max_det}")
    overrides: dict[str, Any] = {"conf": conf, "iou": iou, "max_det": max_det}
    if classes:
        try:
            overrides["classes"] = [int(c) for c in classes.split(",") if c.strip()]
        except ValueError:
            raise InputError(f"classes takes comma-separated integers, got {classes!r}") from None
    return m.predictor.detect_options(**overrides)


async def _image_from(request: Request, body: bytes) -> bytes:
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartParser

        async def stream():
            yield body

        try:
            form = await MultiPartParser(request.headers, stream()).parse()
        except Exception as e:  # malformed multipart
            raise InputError(f"malformed multipart body: {e}") from None
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise InputError("the multipart body has no file part (send the image as a file field, e.g. 'image')")
        return await files[0].read()
    if ctype == "application/json":
        doc = load_json(body, "the JSON body")
        data = doc.get("image") if isinstance(doc, dict) else None
        if not isinstance(data, str):
            raise InputError('a JSON body must be {"image": "<base64>"}')
        try:
            return base64.b64decode(data, validate=True)
        except ValueError as e:
            raise InputError(f'a JSON body must be {{"image": "<base64>"}}: {e}') from None
    if not body:
        raise ImageDecodeError("empty body: send image bytes, a multipart file or JSON {\"image\": base64}")
    return body


def build_repository(sources: list[str], repository_dir: str | None, settings: ServeSettings) -> Repository:
    repo = Repository(settings, ServerMetrics())
    if repository_dir:
        repo.add_repository(repository_dir)
    for s in sources:
        repo.add_source(s)
    if not repo._sources:
        raise InputError("nothing to serve: give bundles or --repository DIR")
    return repo


def uvicorn_config(app: FastAPI, host: str, port: int, *, tls_cert: str | None = None, tls_key: str | None = None,
                   tls_client_ca: str | None = None, log_level: str = "info", settings: ServeSettings | None = None) -> Any:
    """A loaded uvicorn Config; with TLS, its SSL context is cvdeploy's hardened one (TLS 1.2+, AEAD, optional mTLS).
    The HTTP protocol drops slow-header clients and connections past the cap (`settings`, default ServeSettings())."""
    import uvicorn

    from cvdeploy.serve.limits import guarded_protocol

    s = settings or ServeSettings()
    if (tls_cert is None) != (tls_key is None):
        raise InputError("TLS needs both --tls-cert and --tls-key")
    if tls_client_ca is not None and tls_cert is None:
        raise InputError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    kw: dict[str, Any] = {}
    if tls_cert is not None:
        from cvdeploy.security.tls import server_context

        context = server_context(tls_cert, tls_key, tls_client_ca)  # type: ignore[arg-type]
        kw = {"ssl_certfile": tls_cert, "ssl_keyfile": tls_key}
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=30,
                            http=guarded_protocol(s.header_timeout_s, s.max_connections),
                            timeout_keep_alive=s.keep_alive_timeout_s, **kw)  # type: ignore[arg-type]
    config.load()
    if tls_cert is not None:
        config.ssl = context  # replaces uvicorn's default context
    return config
