"""Open Inference Protocol v2 routes (KServe, Triton-compatible): metadata, inference, repository control (health: `health`)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from cvdeploy import __version__
from cvdeploy.errors import CvdeployError, InputError, NotFoundError
from cvdeploy.serve import model_info
from cvdeploy.serve.access import audit, inference_scope
from cvdeploy.serve.http import read_body
from cvdeploy.serve.model_info import IMAGE_INPUT, RESULTS_OUTPUT, V2_TYPES
from cvdeploy.serve.pipeline import detect_images, infer_tensor
from cvdeploy.serve.protocol import HEADER, decompress, encode_response, parse_request
from cvdeploy.serve.repository import LoadedModel, Repository
from cvdeploy.serve.routes_images import parameter_options

EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "cvdeploy_images"]
def register(app: FastAPI, repo: Repository) -> None:
    """Add the v2 routes to `app`."""

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "cvdeploy", "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict:
        m = repo.get(name, version)
        meta = model_info.model_metadata(m)
        meta["versions"] = repo.versions(name)
        return meta

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None) -> dict:
        return model_info.model_config(repo.get(name, version))

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        m = repo.pick(name, version, request.headers.get("x-cvdeploy-cohort"))  # a canary release may answer
        async with inference_scope(repo, m, request, "v2") as record:
            limit = repo.settings.max_body_bytes
            with m.batcher.expect(1):  # a batch forming meanwhile may wait for this one
                raw = await read_body(request, limit, timeout=repo.settings.body_timeout_s, budget=repo.budget, lease=record.lease)
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
            raise InputError(f"the model takes one input ({spec.name!r} as FP32 NCHW, or {IMAGE_INPUT!r} as BYTES), got {len(req.inputs)}")
        (name, arr), = req.inputs.items()
        if req.datatypes[name] == "BYTES":
            if arr.ndim != 1 or arr.size < 1:
                raise InputError(f"input {name!r}: BYTES images must have shape [n] with n >= 1, got {list(arr.shape)}")
            if arr.size > repo.settings.max_batch * 4:
                raise InputError(f"input {name!r}: at most {repo.settings.max_batch * 4} images per request, got {arr.size}")
            options, annotate = parameter_options(m, req.parameters)
            results = await detect_images(repo, m, [bytes(b) for b in arr.reshape(-1)], options, annotate)
            out = np.empty(len(results), dtype=object)
            out[:] = [json.dumps(r).encode() for r in results]
            return {RESULTS_OUTPUT: out}
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
        return await infer_tensor(repo, m, tensor)

    @app.post("/v2/repository/index")
    async def repository_index() -> list:
        return repo.index()

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str, request: Request) -> Response:
        try:
            versions = await repo.load(name)
        except NotFoundError:
            audit(repo, request, "load_model", "not_found", name)
            raise
        except CvdeployError as e:
            audit(repo, request, "load_model", "failure", name)
            raise InputError(f"could not load {name!r}; the version that was serving still serves: {e}") from None
        audit(repo, request, "load_model", "success", f"{name}@{','.join(versions)}")
        return Response(status_code=200)

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(name: str, request: Request) -> Response:
        try:
            await repo.unload(name)
        except NotFoundError:
            audit(repo, request, "unload_model", "not_found", name)
            raise
        audit(repo, request, "unload_model", "success", name)
        return Response(status_code=200)

