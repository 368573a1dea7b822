"""Ray Serve: the demo bundle on a real local Ray cluster (2 CPUs, 2 replicas) answers exactly as the Predictor does."""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
from ray import serve

from cvdeploy import Predictor
from cvdeploy.deploy.ray_serve import BATCH_HEADER, REPLICA_HEADER, Autoscaling, app_builder, build_app, route_prefix, start
from cvdeploy.errors import BundleError, InputError
from cvdeploy.serve.settings import ServeSettings
from cvdeploy.vision.result import Result

MAX_BODY = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five shapes scenes of different sizes (a seed the model never trained on)."""
    from cvdeploy.demo.shapes import generate_shapes

    root = generate_shapes(tmp_path_factory.mktemp("ray-shapes"), n_train=0, n_val=5, seed=31).parent
    paths = sorted((root / "images" / "val").iterdir())
    assert len(paths) == 5
    return paths


@pytest.fixture(scope="module")
def url(demo_bundle: Path) -> Iterator[str]:
    """The demo bundle on a local Ray cluster: 2 replicas of 1 CPU each, batches of up to 4 that wait 0.2 s to fill."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        urls = start([demo_bundle], host="127.0.0.1", port=_free_port(), replicas=2, max_batch_size=4,
                     batch_wait_timeout_s=0.2, num_cpus_per_replica=1, settings=ServeSettings(max_body_bytes=MAX_BODY))
        yield urls["yolo11n-shapes"]
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(client: httpx.Client, url: str, path: Path, form: str) -> httpx.Response:
    data = path.read_bytes()
    if form == "json":
        return client.post(url, json={"image": base64.b64encode(data).decode()})
    if form == "multipart":
        return client.post(url, files={"image": (path.name, data, "image/jpeg")})
    return client.post(url, content=data, headers={"content-type": "application/octet-stream"})


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _assert_same(answer: dict, ref: Result, what: str) -> None:
    """The JSON answer equals the Predictor's result; the JSON rounds boxes to 0.01 px and confidences to 1e-5, so the
    bounds are 1e-3 px and 1e-4 past that rounding."""
    assert ref.detections is not None
    assert answer["image"] == {"height": ref.orig_shape[0], "width": ref.orig_shape[1]}, what
    dets = answer["detections"]
    assert len(dets) == len(ref.detections), what
    boxes = np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in dets], np.float64).reshape(-1, 4)
    conf = np.array([d["confidence"] for d in dets], np.float64)
    assert [d["class_id"] for d in dets] == [int(c) for c in ref.detections.class_id], what
    if len(dets):
        assert np.abs(boxes - ref.detections.xyxy).max() <= 5e-3 + 1e-3, what
        assert (_iou(boxes, ref.detections.xyxy.astype(np.float64)) >= 0.999).all(), what
        assert np.abs(conf - ref.detections.confidence).max() <= 5e-6 + 1e-4, what


@pytest.mark.slow
def test_two_replicas_batch_and_answer_as_the_predictor(url: str, images: list[Path], demo_bundle: Path) -> None:
    with Predictor(demo_bundle) as p:
        expected = {path: p.predict(path) for path in images}
    assert sum(len(r.detections) for r in expected.values()) > 0  # type: ignore[arg-type]
    # 20 requests at once: one image 8 times (same rectangle: they may share engine calls), the others 3 times each,
    # in every upload form the image API takes.
    work = [(images[0], i) for i in range(8)] + [(path, i) for path in images[1:] for i in range(3)]
    forms = ("raw", "json", "multipart")
    replicas: set[str] = set()
    rows: list[int] = []
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(len(work)) as pool:
        for _ in range(3):  # Ray's router spreads load by queue length: a rare wave may land on one replica only
            answers = list(pool.map(lambda job: (job[0], _post(client, url, job[0], forms[job[1] % 3])), work))
            for path, r in answers:
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["model_name"] == "yolo11n-shapes" and body["model_version"] == "1"
                _assert_same(body, expected[path], path.name)
                replicas.add(r.headers[REPLICA_HEADER])
                rows.append(int(r.headers[BATCH_HEADER]))
            if len(replicas) == 2:
                break
    assert len(replicas) == 2, f"only replica(s) {replicas} answered"
    assert max(rows) >= 2, "no two requests ever shared an engine call: @serve.batch is not batching"
    assert max(rows) <= 4  # max_batch_size
    status = serve.status().applications["yolo11n-shapes"]
    assert status.deployments["cvdeploy"].replica_states == {"RUNNING": 2}


@pytest.mark.slow
def test_bad_requests_get_4xx_with_a_json_error(url: str, images: list[Path]) -> None:
    with httpx.Client(timeout=60) as client:
        cases = {
            "garbage": (client.post(url, content=b"this is not an image"), 400),
            "empty": (client.post(url, content=b""), 400),
            "bad base64": (client.post(url, json={"image": "!!not base64!!"}), 400),
            "json without image": (client.post(url, json={"picture": "x"}), 400),
            "bad query": (client.post(url + "?conf=high", content=images[0].read_bytes()), 400),
            "conf out of range": (client.post(url + "?conf=2", content=images[0].read_bytes()), 400),
            "too large": (client.post(url, content=b"\xff\xd8\xff" + bytes(MAX_BODY)), 413),
            "unknown version": (client.post(url + "?version=7", content=images[0].read_bytes()), 404),
        }
        for what, (r, status) in cases.items():
            assert r.status_code == status, (what, r.status_code, r.text)
            assert isinstance(r.json()["error"], str) and r.json()["error"], what
        # The same query answers narrower when asked to: options reach the Predictor's finish stage.
        few = client.post(url + "?max_det=1&conf=0.01", content=images[1].read_bytes())
        assert few.status_code == 200 and len(few.json()["detections"]) == 1
        meta = client.get(url.removesuffix("predict"))
        assert meta.status_code == 200 and meta.json()["names"]["0"] == "circle"


def test_build_app_refuses_bad_settings_before_any_replica_starts(demo_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="either"):
        build_app(demo_bundle, replicas=2, autoscaling=Autoscaling())
    with pytest.raises(InputError, match="replicas"):
        build_app(demo_bundle, replicas=0)
    with pytest.raises(InputError, match="num_cpus_per_replica"):
        build_app(demo_bundle, num_cpus_per_replica=0)
    with pytest.raises(InputError, match="min_replicas"):
        Autoscaling(min_replicas=3, max_replicas=2)
    with pytest.raises(InputError, match="app_builder takes"):
        app_builder({"bundle": str(demo_bundle), "replica": 2})
    with pytest.raises(InputError):
        build_app(tmp_path / "missing.cvd")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    with pytest.raises(BundleError):  # `cvdeploy serve --public-key` holds on Ray too: an unsigned bundle is refused
        build_app(demo_bundle, settings=ServeSettings(public_key=Ed25519PrivateKey.generate().public_key()))
    assert Autoscaling(min_replicas=0, max_replicas=3, target_ongoing_requests=2).config() == {
        "min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 2, "upscale_delay_s": 30.0, "downscale_delay_s": 600.0}
    assert isinstance(app_builder({"bundle": str(demo_bundle), "autoscaling": {"max_replicas": 2}}), serve.Application)
    assert route_prefix("yolo11n-shapes") == "/v1/models/yolo11n-shapes"
