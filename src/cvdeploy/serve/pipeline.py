"""The inference path of a request: the Predictor's own stages around the model's batcher."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np

from cvdeploy.errors import DeadlineError, InputError
from cvdeploy.predict import Prepared
from cvdeploy.serve.batcher import Served
from cvdeploy.serve.canary import model_failure
from cvdeploy.serve.http import gather_all
from cvdeploy.serve.repository import LoadedModel, Repository


async def run_model(m: LoadedModel, tensor: np.ndarray, timeout: float) -> Served:
    """`tensor` through the model's batcher within `timeout` (a full queue raises QueueFullError: 503)."""
    try:
        async with asyncio.timeout(timeout):  # no extra task per request, unlike wait_for
            return await m.infer(tensor)
    except TimeoutError:
        raise DeadlineError(f"model {m.name!r} did not answer within {timeout:g} s") from None


def _fallback_for(repo: Repository, m: LoadedModel, error: Exception) -> LoadedModel | None:
    """The incumbent that answers instead when `error` is the model's own failure (counted against a canary candidate);
    None when the error is the client's, or when there is no incumbent to fall back to."""
    if not model_failure(error):
        return None
    repo.releases.fail(m)
    return repo.releases.fallback(m)


async def infer_tensor(repo: Repository, m: LoadedModel, tensor: np.ndarray) -> dict[str, np.ndarray]:
    """A v2 request's own tensor through the model; a canary candidate's failure is answered by the incumbent."""
    try:
        return (await run_model(m, tensor, repo.settings.request_timeout_s)).outputs
    except Exception as e:
        incumbent = _fallback_for(repo, m, e)
        if incumbent is None:
            raise
        with incumbent:
            return (await run_model(incumbent, tensor, repo.settings.request_timeout_s)).outputs


async def detect_images(repo: Repository, m: LoadedModel, blobs: list[bytes], options: Any, annotate: bool = False) -> list[dict]:
    """Encoded images through the Predictor's own stages: decode and prepare (thread pool), infer (the batcher, which
    batches same-shape tensors), finish. Each image is letterboxed exactly as `Predictor.predict` letterboxes it (the
    minimal rectangle), so the answer is the Predictor's; images whose rectangles match share batches.

    A canary candidate's own failure (its engine, its deadline) is counted against it and the request is answered by
    the incumbent instead: a candidate on trial never costs a client its answer."""
    try:
        return await _detect(repo, m, blobs, options, annotate)
    except Exception as e:
        incumbent = _fallback_for(repo, m, e)
        if incumbent is None:
            raise
        with incumbent:
            results = await _detect(repo, incumbent, blobs, options, annotate)
        for r in results:
            r["model_version"] = incumbent.version  # who answered
        return results


async def _detect(repo: Repository, m: LoadedModel, blobs: list[bytes], options: Any, annotate: bool) -> list[dict]:
    from cvdeploy.vision.image import image_format
    from cvdeploy.vision.result import Timings

    p = m.predictor
    allowed = repo.settings.allowed_formats

    def prepare(blob: bytes) -> tuple[np.ndarray, Prepared, float, float]:
        fmt = image_format(blob)
        if fmt is not None and fmt.lower() not in allowed:
            raise InputError(f"image format {fmt} is not allowed here (allowed: {', '.join(allowed)})")
        t0 = time.perf_counter()
        img = p.decode(blob)
        t1 = time.perf_counter()
        return img, p.prepare([img]), (t1 - t0) * 1000, t1

    timeout = repo.settings.request_timeout_s
    with m.batcher.expect(len(blobs)):
        prepared = await gather_all([asyncio.to_thread(prepare, b) for b in blobs])
    served = await gather_all([run_model(m, pr.tensor, timeout) for _, pr, _, _ in prepared])
    # Monitoring and releases read requests answered with the bundle's own options: a client's conf=0.5 moves the
    # prediction statistics without any change in the data or the model.
    observed = options == p.options
    results = []
    for blob, (img, pr, decode_ms, decoded_at), sv in zip(blobs, prepared, served, strict=True):
        t = Timings(decode=decode_ms, preprocess=pr.ms_per_image, queue=sv.queue_s * 1000, infer=sv.infer_s * 1000 / sv.batch_rows)
        (r,) = p.finish(pr, sv.outputs, options=options, timings=[t])
        if observed:
            repo.releases.observe(m, time.perf_counter() - decoded_at, r, sv.batch_rows,
                                  (t.preprocess + t.infer + t.postprocess) / 1000)
            repo.releases.shadow(m, img)
            repo.monitors.submit(m.monitor, img, blob, r)
        if repo.iolog is not None:  # sampled: a random draw and a few reductions on the request path, writing elsewhere
            lb = pr.params[0]
            repo.iolog.record(model=f"{m.name}@{m.version}", image=img, data=blob, result=r,
                              meta={"input_shape": list(lb.input_shape), "gain_xy": [round(g, 6) for g in lb.gain_xy],
                                    "pad_top_left": [lb.top, lb.left]})
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


