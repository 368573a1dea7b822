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
            options = request_options(m, q["conf"], q["iou"], q["max_det"], q["classes"], retina_masks=q["retina_masks"])
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
    "retina_masks": ("boolean", "Segment: masks decoded at the image's own size (Ultralytics' retina_masks); other "
                     "tasks ignore it, as Ultralytics does."),
    "annotate": ("boolean", "Also answer the image with the result drawn (base64 JPEG): boxes, rotated boxes, masks, "
                 "keypoints or top classes."),
    "version": ("string", "Model version (default: the latest)."),
}
PREDICT_QUERY_DOC = [{"name": k, "in": "query", "required": False, "description": d, "schema": {"type": t}}
                     for k, (t, d) in _QUERY_TYPES.items()]
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def predict_query(request: Request) -> dict[str, Any]:
    """The image API's query parameters, typed, with a 400 naming the parameter when one is malformed."""
    out: dict[str, Any] = {"conf": None, "iou": None, "max_det": None, "classes": None, "retina_masks": False, "annotate": False,
                           "version": None}
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


def request_options(m: LoadedModel, conf: float | None, iou: float | None, max_det: int | None, classes: str | None, *,
                    retina_masks: bool = False) -> Any:
    """The Predictor's options for one request. `retina_masks` is taken by every task and changes only a segment
    model's masks, as in Ultralytics (and the Predictor): a client may send one query to models of several tasks."""
    if conf is not None and not 0 <= conf <= 1:
        raise InputError(f"conf must be within 0..1, got {conf}")
    if iou is not None and not 0 <= iou <= 1:
        raise InputError(f"iou must be within 0..1, got {iou}")
    if max_det is not None and not 1 <= max_det <= 10_000:
        raise InputError(f"max_det must be within 1..10000, got {max_det}")
    overrides: dict[str, Any] = {"conf": conf, "iou": iou, "max_det": max_det, "retina_masks": bool(retina_masks)}
    if classes:
        try:
            overrides["classes"] = [int(c) for c in classes.split(",") if c.strip()]
        except ValueError:
            raise InputError(f"classes takes comma-separated integers, got {classes!r}") from None
    return m.predictor.detect_options(**overrides)


_PARAMETER_TYPES: dict[str, tuple[str, Any]] = {
    "conf": ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    "iou": ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    "max_det": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "classes": ("a comma-separated string of class ids", lambda v: isinstance(v, str)),
    "retina_masks": ("true or false", lambda v: isinstance(v, bool)),
    "annotate": ("true or false", lambda v: isinstance(v, bool)),
}


def parameter_options(m: LoadedModel, params: dict[str, Any]) -> tuple[Any, bool]:
    """The options of a v2 request whose input is `image` (BYTES): the image API's query options, read from the
    request's `parameters` (typed JSON values; the protocol's own parameters, e.g. binary_data_output, pass)."""
    got: dict[str, Any] = {}
    for key, (expected, ok) in _PARAMETER_TYPES.items():
        if key in params:
            if not ok(params[key]):
                raise InputError(f"parameter {key}: expected {expected}, got {str(params[key])[:80]!r}")
            got[key] = params[key]
    options = request_options(m, got.get("conf"), got.get("iou"), got.get("max_det"), got.get("classes"),
                              retina_masks=got.get("retina_masks", False))
    return options, got.get("annotate", False)


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


