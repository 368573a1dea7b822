"""Ray Serve: a bundle as a Ray Serve application (replicas, `@serve.batch`, autoscaling) answering cvdeploy's image API.

    start(["yolo11n-shapes.cvd"], port=8000)      # deploy on the Ray cluster this process is connected to (or a local one)
    run(["yolo11n-shapes.cvd"])                   # the same, then serve until Ctrl-C
    build_app("yolo11n-shapes.cvd", replicas=2)   # the Application, for `serve.run` or a Serve config (`app_builder`)

Each replica loads one `Predictor` once and answers ``POST /v1/models/<name>/predict`` exactly as `cvdeploy serve` does:
the same upload forms (raw image bytes, multipart, JSON ``{"image": base64}``), the same query parameters, limits and
JSON answer, 4xx ``{"error": ...}`` for what a client got wrong. Requests are decoded and letterboxed on their own (the
minimal rectangle, as `Predictor.predict` does); `@serve.batch` gathers them and runs the tensors that share a shape as
one engine batch, so an answer equals `Predictor.predict`'s whatever it was batched with.
"""

# No `from __future__ import annotations` here: Ray Serve's FastAPI ingress rebuilds the route methods' signatures, and
# FastAPI then takes a postponed "Request" annotation for a query parameter.
import asyncio
import base64
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.errors import DeadlineError, EngineError, InputError, MissingDependencyError

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve
except ImportError as e:  # the module is imported only for Ray Serve: say which extra brings it
    raise MissingDependencyError(e.name or "ray[serve]", "ray", "serving on Ray") from None

from cvdeploy.serve.batcher import Served
from cvdeploy.serve.http import install_error_handlers, read_body
from cvdeploy.serve.routes_images import image_from, predict_query, request_options
from cvdeploy.serve.settings import ServeSettings

__all__ = ["BATCH_HEADER", "REPLICA_HEADER", "Autoscaling", "app_builder", "build_app", "route_prefix", "run", "start"]

REPLICA_HEADER = "x-cvdeploy-replica"  # which replica answered: for tests, logs and load-balancing checks
BATCH_HEADER = "x-cvdeploy-batch-rows"  # how many images the engine call that served this one ran


@dataclass(frozen=True)
class Autoscaling:
    """Ray Serve's autoscaling for a model: between `min_replicas` and `max_replicas`, aiming at `target_ongoing_requests`
    requests in progress or queued per replica. Serve adds replicas; the Ray autoscaler (KubeRay on Kubernetes) adds the
    nodes they need."""

    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 4.0  # with batching, a replica works best with a few requests to group
    initial_replicas: int | None = None
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < 1 or self.min_replicas > self.max_replicas:
            raise InputError(f"autoscaling needs 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                             f"got min_replicas={self.min_replicas}, max_replicas={self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise InputError(f"autoscaling initial_replicas must lie within min_replicas..max_replicas "
                             f"({self.min_replicas}..{self.max_replicas}), got {self.initial_replicas}")
        if self.target_ongoing_requests <= 0:
            raise InputError(f"autoscaling target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise InputError("autoscaling upscale_delay_s and downscale_delay_s must be >= 0")

    def config(self) -> dict[str, Any]:
        """As Ray Serve's `autoscaling_config`."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class _Item:
    tensor: np.ndarray  # one request's prepared NCHW tensor
    enqueued: float  # perf_counter when it was handed to the batch queue


_api = FastAPI(title="cvdeploy on Ray Serve", docs_url=None, redoc_url=None)
install_error_handlers(_api)  # the one map from cvdeploy errors to statuses: client errors are 4xx, never Ray's 500


@serve.deployment(name="cvdeploy", max_ongoing_requests=16, graceful_shutdown_timeout_s=20)
@serve.ingress(_api)
class CvdeployModel:
    """One replica: one Predictor, loaded and warmed once; the image API in front, `@serve.batch` before the engine."""

    def __init__(self, bundle: str, *, threads: int, max_batch_size: int, batch_wait_timeout_s: float,
                 settings: ServeSettings) -> None:
        from cvdeploy.predict import Predictor
        from cvdeploy.vision.image import DecodeLimits

        self.settings = settings
        limits = DecodeLimits(max_pixels=settings.max_pixels, formats=frozenset(f.upper() for f in settings.allowed_formats))
        # ONNX Runtime's intra-op pool sized to this replica's CPUs: replicas sharing a node must not oversubscribe it.
        self.predictor = Predictor(bundle, limits=limits, max_batch=max_batch_size, threads=threads)
        self.name = self.predictor.bundle.name
        self.replica = serve.get_replica_context().replica_tag
        # The decorator's sizes are the class's; this replica's come from build_app.
        self._infer.set_max_batch_size(max_batch_size)
        self._infer.set_batch_wait_timeout_s(batch_wait_timeout_s)
        h, w = self.predictor.spec.imgsz
        for n in sorted({1, self.predictor.max_batch}):  # first calls allocate and pick kernels: before the replica is ready
            self.predictor.infer_all(np.full((n, 3, h, w), 114 / 255.0, np.float32))

    @_api.get("/")
    async def metadata(self) -> dict:
        p = self.predictor
        return {"name": self.name, "version": "1", "task": p.bundle.manifest.task, "variant": p.variant,
                "names": {str(k): v for k, v in p.names.items()}, "replica": self.replica}

    @_api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        q = predict_query(request)
        if q["version"] not in (None, "1"):
            from cvdeploy.errors import NotFoundError

            raise NotFoundError(f"model {self.name!r} has no version {q['version']!r} (versions: 1)")
        # `request_options` reads only `.predictor` of the model it is given: this replica has one.
        options = request_options(self, q["conf"], q["iou"], q["max_det"], q["classes"])  # type: ignore[arg-type]
        s = self.settings
        body = await read_body(request, s.max_body_bytes, timeout=s.body_timeout_s)
        blob = await image_from(request, body)
        p = self.predictor
        t0 = time.perf_counter()
        img = await asyncio.to_thread(p.decode, blob)  # decoding and letterboxing off the loop: it keeps receiving
        t1 = time.perf_counter()
        prepared = await asyncio.to_thread(p.prepare, [img])
        try:
            async with asyncio.timeout(s.request_timeout_s):
                served: Served = await self._infer(_Item(prepared.tensor, time.perf_counter()))
        except TimeoutError:
            raise DeadlineError(f"model {self.name!r} did not answer within {s.request_timeout_s:g} s") from None
        from cvdeploy.vision.result import Timings

        t = Timings(decode=(t1 - t0) * 1000, preprocess=prepared.ms_per_image, queue=served.queue_s * 1000,
                    infer=served.infer_s * 1000 / served.batch_rows)
        (result,) = p.finish(prepared, served.outputs, options=options, timings=[t])
        answer = result.to_dict()
        answer.pop("source", None)
        if q["annotate"]:
            import cv2

            from cvdeploy.vision.draw import draw

            ok, buf = cv2.imencode(".jpg", draw(img, result))
            answer["annotated_image"] = base64.b64encode(buf.tobytes()).decode() if ok else None
        return JSONResponse({"model_name": self.name, "model_version": "1", **answer},
                            headers={REPLICA_HEADER: self.replica, BATCH_HEADER: str(served.batch_rows)})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _infer(self, items: list[_Item]) -> list[Served]:
        return await asyncio.to_thread(self._run_batch, items)

    def _run_batch(self, items: list[_Item]) -> list[Served]:
        """The batch Ray gathered, as engine calls over tensors of one shape (at most the Predictor's batch each): an image
        is letterboxed alone to its own rectangle, so only images whose rectangles match can share a call."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(tuple(it.tensor.shape[1:]), []).append(i)
        served: list[Served | None] = [None] * len(items)
        step = self.predictor.max_batch
        for members in groups.values():
            for start in range(0, len(members), step):
                chunk = members[start : start + step]
                tensors = [items[i].tensor for i in chunk]
                tensor = tensors[0] if len(tensors) == 1 else np.concatenate(tensors)
                t0 = time.perf_counter()
                outputs = self.predictor.infer_all(tensor)
                t1 = time.perf_counter()
                rows = int(tensor.shape[0])
                wrong = [n for n, out in outputs.items() if not getattr(out, "ndim", 0) or out.shape[0] != rows]
                if wrong:  # one output row per input row, or nobody can be given their share
                    raise EngineError(f"the engine returned outputs {wrong} without one row per input row ({rows})")
                row = 0
                for i in chunk:
                    k = int(items[i].tensor.shape[0])
                    served[i] = Served({n: out[row : row + k] for n, out in outputs.items()}, t0 - items[i].enqueued, t1 - t0, rows)
                    row += k
        return [s for s in served if s is not None]


def route_prefix(name: str) -> str:
    """Where a model's application is mounted: its routes then read as `cvdeploy serve`'s (`/v1/models/NAME/predict`)."""
    return f"/v1/models/{name}"


def build_app(
    bundle: str | Path,
    *,
    replicas: int | None = None,
    max_batch_size: int = 8,
    batch_wait_timeout_s: float = 0.005,
    autoscaling: Autoscaling | None = None,
    num_cpus_per_replica: float = 1.0,
    max_ongoing_requests: int | None = None,
    settings: ServeSettings | None = None,
) -> serve.Application:
    """The Ray Serve Application serving `bundle`: `replicas` fixed replicas (default 1), or `autoscaling`.

    Each replica reserves `num_cpus_per_replica` CPUs and gives ONNX Runtime that many threads (at least 1). A replica
    takes up to `max_ongoing_requests` at once (default: twice `max_batch_size`, so that a batch can form while one
    runs); `@serve.batch` runs up to `max_batch_size` of them together, waiting at most `batch_wait_timeout_s` for the
    batch to fill. `settings` gives the limits of `cvdeploy serve` (body size, pixels, formats, timeouts) and its
    `public_key` (serve only a bundle it signed); its batching and instance settings do not apply here, and
    authentication and audit are refused (Ray Serve's proxy does not run cvdeploy's access middleware). Mount the Application at `route_prefix(model name)`.
    """
    from cvdeploy.bundle import Bundle

    settings = settings or ServeSettings()
    path = Path(bundle).resolve()
    # A missing, tampered or (with `settings.public_key`) unsigned bundle is refused here, not in every replica.
    Bundle.load(path, public_key=settings.public_key)
    if replicas is not None and autoscaling is not None:
        raise InputError("give either a fixed number of replicas or autoscaling, not both")
    if replicas is not None and replicas < 1:
        raise InputError(f"replicas must be at least 1, got {replicas}")
    if max_batch_size < 1:
        raise InputError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if batch_wait_timeout_s < 0:
        raise InputError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
    if not num_cpus_per_replica > 0:
        raise InputError(f"num_cpus_per_replica must be > 0, got {num_cpus_per_replica}")
    if settings.auth is not None or settings.audit is not None:
        raise InputError("authentication and audit are not applied on Ray Serve: put the application behind an "
                         "authenticating gateway, or serve with `cvdeploy serve`")
    ongoing = max_ongoing_requests if max_ongoing_requests is not None else 2 * max_batch_size
    if ongoing < 1:
        raise InputError(f"max_ongoing_requests must be at least 1, got {ongoing}")
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": num_cpus_per_replica}, "max_ongoing_requests": ongoing}
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling.config()
    else:
        options["num_replicas"] = replicas or 1
    threads = max(1, math.floor(num_cpus_per_replica))
    return CvdeployModel.options(**options).bind(str(path), threads=threads, max_batch_size=max_batch_size,
                                                 batch_wait_timeout_s=batch_wait_timeout_s,
                                                 settings=settings.model_copy(update={"public_key": None}))  # keys don't pickle


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For a Serve config file (`serve run` / `serve deploy`, KubeRay's RayService):
    ``import_path: cvdeploy.deploy.ray_serve:app_builder`` with ``args: {bundle: /models/x.cvd, replicas: 2, ...}``;
    `autoscaling` takes a mapping of `Autoscaling`'s fields."""
    known = {"bundle", "replicas", "max_batch_size", "batch_wait_timeout_s", "autoscaling", "num_cpus_per_replica",
             "max_ongoing_requests"}
    unknown = set(args) - known
    if unknown or "bundle" not in args:
        raise InputError(f"app_builder takes bundle and optionally {', '.join(sorted(known - {'bundle'}))}; "
                         f"got {', '.join(sorted(args)) or 'nothing'}")
    kwargs = dict(args)
    if isinstance(kwargs.get("autoscaling"), dict):
        kwargs["autoscaling"] = Autoscaling(**kwargs["autoscaling"])
    return build_app(kwargs.pop("bundle"), **kwargs)


def start(bundles: Sequence[str | Path], *, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> dict[str, str]:
    """Deploy each bundle as its own application on the Ray cluster this process is connected to (a local one is
    started when none is), its HTTP proxy on `host`:`port`; returns each model's predict URL once every replica is
    up. `options` are `build_app`'s."""
    import ray

    from cvdeploy.bundle import Bundle

    if not bundles:
        raise InputError("no bundle to serve")
    names = [Bundle.load(b).name for b in bundles]
    if len(set(names)) != len(names):
        raise InputError(f"two bundles share a model name ({', '.join(names)}): each model is served under its name")
    if not ray.is_initialized():
        # $RAY_ADDRESS names a cluster to join; else a local one starts, kept on loopback with the proxy.
        local = not os.environ.get("RAY_ADDRESS") and host in ("127.0.0.1", "localhost")
        ray.init(include_dashboard=False, **({"_node_ip_address": "127.0.0.1"} if local else {}))
    serve.start(http_options={"host": host, "port": port})
    urls = {}
    for b, name in zip(bundles, names, strict=True):
        serve.run(build_app(b, **options), name=name, route_prefix=route_prefix(name))
        urls[name] = f"http://{host}:{port}{route_prefix(name)}/predict"
    return urls


def run(bundles: Sequence[str | Path], *, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """`start`, then serve until Ctrl-C or SIGTERM (a container's stop); Serve, and a Ray started here, are then shut
    down gracefully: replicas finish the requests they hold."""
    import signal

    import ray

    ours = not ray.is_initialized()

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = None
    try:
        start(bundles, host=host, port=port, **options)
        # Set after ray.init, whose own handler exits at once with a native stack dump (status 134).
        previous = signal.signal(signal.SIGTERM, interrupt)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while shutting down ends the process
        if ray.is_initialized():
            serve.shutdown()
            if ours:
                ray.shutdown()
