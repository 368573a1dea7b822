"""The image API: POST an image (raw bytes, multipart, or JSON base64), get the Predictor's detections as JSON."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cvdeploy.errors import ImageDecodeError, InputError
from cvdeploy.serve.access import inference_scope
from cvdeploy.serve.http import read_body
from cvdeploy.serve.pipeline import detect_images
from cvdeploy.serve.protocol import load_json
from cvdeploy.serve.repository import LoadedModel, Repository


def register(app: FastAPI, repo: Repository) -> None:
    """Add the image API to `app`."""

    @app.post("/v1/models/{name}/predict", openapi_extra={"parameters": PREDICT_QUERY_DOC})
    async def predict(name: str, request: Request) -> dict:
        # The query is read by hand: FastAPI's per-request parameter analysis cost ~1.7 ms of event-loop CPU here.
        q = predict_query(request)
        m = repo.pick(name, q["version"], request.headers.get("x-cvdeploy-cohort"))  # a canary release may answer
        async with inference_scope(repo, m, request, "images") as record:
            options = request_options(m, q["conf"], q["iou"], q["max_det"], q["classes"])
            annotate = q["annotate"]
            with m.batcher.expect(1):
                body = record.body = await read_body(request, repo.settings.max_body_bytes, timeout=repo.settings.body_timeout_s,
                                                 budget=repo.budget, lease=record.lease)
                blob = await image_from(request, body)
            (result,) = await detect_images(repo, m, [blob], options, annotate)
        # Plain JSON types already: answered as is, without FastAPI's per-value encoder walk.
        return JSONResponse({"model_name": m.name, "model_version": m.version, **result})


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


def predict_query(request: Request) -> dict[str, Any]:
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


def request_options(m: LoadedModel, conf: float | None, iou: float | None, max_det: int | None, classes: str | None) -> Any:
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


async def image_from(request: Request, body: bytes) -> bytes:
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


