"""The server as clients use it: tritonclient, the Ultralytics Triton client, the image API, bad input, metrics."""

from __future__ import annotations

import base64
import gzip
import json
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from cvdeploy import Predictor
from cvdeploy.vision.image import load_image

MODEL = "yolo11n-shapes"


@pytest.fixture(scope="module")
def image(shapes_data: Path) -> Path:
    return sorted((shapes_data / "images" / "val").glob("*.jpg"))[1]


@pytest.fixture(scope="module")
def predictor(demo_bundle: Path) -> Predictor:
    """What the image API must answer: the Predictor's own results (minimal-rectangle letterbox)."""
    return Predictor(demo_bundle)


@pytest.fixture(scope="module")
def square(demo_bundle: Path) -> Predictor:
    """The Predictor with a square letterbox: what clients that letterbox themselves (Ultralytics' Triton client) send."""
    p = Predictor(demo_bundle)
    p.spec = replace(p.spec, rect=False)
    return p


def test_tritonclient_metadata_and_infer_binary_and_json(server, square: Predictor, predictor: Predictor, image: Path) -> None:
    import tritonclient.http as tc

    c = tc.InferenceServerClient(server.hostport)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL)
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    meta = c.get_model_metadata(MODEL)
    assert meta["inputs"][0] == {"name": "images", "datatype": "FP32", "shape": [-1, 3, -1, -1]}
    x, _ = square.preprocess([load_image(image)])
    ref = square.infer(x)
    for binary in (True, False):
        inp = tc.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        r = c.infer(MODEL, [inp], outputs=[tc.InferRequestedOutput("output0", binary_data=binary)])
        np.testing.assert_allclose(r.as_numpy("output0"), ref, rtol=0, atol=1e-5 if binary else 1e-4)
    # encoded images as BYTES: the server decodes, letterboxes, batches and runs NMS
    inp = tc.InferInput("image", [2], "BYTES")
    inp.set_data_from_numpy(np.array([image.read_bytes()] * 2, dtype=object))
    dets = [json.loads(d) for d in c.infer(MODEL, [inp]).as_numpy("detections")]
    expected = predictor.predict(image).to_dict()["detections"]
    assert [d["detections"] for d in dets] == [expected, expected]


def test_ultralytics_triton_client(server, square: Predictor, image: Path) -> None:
    from ultralytics import YOLO

    model = YOLO(f"{server.url}/{MODEL}", task="detect")
    res = model.predict(str(image), conf=0.25, verbose=False)[0]
    ours = square.predict(image, conf=0.25).detections
    assert len(res.boxes) == len(ours) and model.names == square.names
    if len(ours):
        np.testing.assert_allclose(res.boxes.xyxy.numpy(), ours.xyxy, atol=0.5)
        np.testing.assert_allclose(res.boxes.conf.numpy(), ours.confidence, atol=1e-3)


def test_image_api_raw_multipart_and_base64(server, predictor: Predictor, image: Path) -> None:
    url = f"{server.url}/v1/models/{MODEL}/predict"
    blob = image.read_bytes()
    expected = predictor.predict(image, conf=0.1).to_dict()["detections"]
    raw = httpx.post(url, content=blob, params={"conf": 0.1}, headers={"content-type": "image/jpeg"})
    multi = httpx.post(url, files={"image": ("a.jpg", blob, "image/jpeg")}, params={"conf": 0.1})
    b64 = httpx.post(url, json={"image": base64.b64encode(blob).decode()}, params={"conf": 0.1, "annotate": True})
    for r in (raw, multi, b64):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["detections"] == expected and body["model_name"] == MODEL
        assert set(body["timings_ms"]) >= {"decode", "preprocess", "infer", "postprocess"}
        assert r.headers["x-request-id"]
    annotated = base64.b64decode(b64.json()["annotated_image"])
    assert load_image(annotated).shape[:2] == load_image(blob).shape[:2]
    some = httpx.post(url, content=blob, params={"conf": 0.01, "classes": "0", "max_det": 2}).json()["detections"]
    assert len(some) <= 2 and all(d["class_id"] == 0 for d in some)
    assert httpx.post(url, content=blob, headers={"x-request-id": "abc"}).headers["x-request-id"] == "abc"


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + b"\0" * 64


def test_malformed_input_gets_4xx_and_the_server_keeps_serving(server, image: Path) -> None:
    url = f"{server.url}/v1/models/{MODEL}/predict"
    infer = f"{server.url}/v2/models/{MODEL}/infer"
    blob = image.read_bytes()
    cases = [
        httpx.post(url, content=blob[: len(blob) // 3]),  # truncated JPEG
        httpx.post(url, content=b""),  # zero bytes
        httpx.post(url, content=_png_header(100_000, 100_000)),  # enormous declared dimensions
        httpx.post(url, content=b"this is text, not an image"),
        httpx.post(url, content=b"{broken", headers={"content-type": "application/json"}),
        httpx.post(url, content=blob, params={"conf": 3}),
        httpx.post(url, content=blob, params={"classes": "a,b"}),
        httpx.post(url, content=blob, params={"conf": "high"}),
        httpx.post(url, content=blob, params={"annotate": "maybe"}),
        httpx.post(infer, content=b"{broken json"),
        httpx.post(infer, json={"inputs": [{"name": "images", "shape": [1, 3, 64], "datatype": "FP32", "data": [0.0] * 192}]}),
        httpx.post(infer, json={"inputs": [{"name": "images", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.0] * 5}]}),
        httpx.post(infer, json={"inputs": [{"name": "images", "shape": [1, 3, 64, 64], "datatype": "INT64", "data": [0] * 12288}]}),
        httpx.post(infer, json={"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32", "data": [0.0]}]}),
        httpx.post(infer, json={"inputs": [{"name": "images", "shape": [1, 3, 50, 50], "datatype": "FP32", "data": [0.0] * 7500}]}),
        httpx.post(infer, json={"inputs": []}),
        httpx.post(infer, content=b"{}", headers={"Inference-Header-Content-Length": "99"}),
        httpx.post(infer, content=gzip.compress(b"{}")[:-4], headers={"content-encoding": "gzip"}),
        httpx.post(f"{server.url}/v2/models/unknown/infer", json={"inputs": []}),
        httpx.post(url, content=b"\0" * (5 * 1024 * 1024)),  # over the 4 MiB body limit
    ]
    codes = [r.status_code for r in cases]
    assert all(400 <= c < 500 for c in codes), codes
    assert codes[-2] == 404 and codes[-1] == 413
    assert all("error" in r.json() for r in cases)
    assert "query parameter conf: expected a number, got 'high'" in cases[7].json()["error"]
    assert "query parameter annotate" in cases[8].json()["error"]
    assert httpx.post(url, content=blob).status_code == 200  # still serving


def test_gzip_request_and_json_outputs(server, square: Predictor) -> None:
    x = np.random.default_rng(0).random((1, 3, 64, 96), dtype=np.float32)
    doc = {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=gzip.compress(json.dumps(doc).encode()),
                   headers={"content-encoding": "gzip", "content-type": "application/json"})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    got = np.asarray(out["data"], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, square.infer(x), atol=1e-4)


def test_metrics_repository_and_versions(server, image: Path) -> None:
    httpx.post(f"{server.url}/v1/models/{MODEL}/predict", content=image.read_bytes())
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("cvdeploy_requests_total", "cvdeploy_inference_count_total", "cvdeploy_execution_count_total",
                 "cvdeploy_stage_duration_seconds_bucket", "cvdeploy_requests_in_flight", "cvdeploy_model_ready"):
        assert name in text, name
    assert f'cvdeploy_requests_total{{model="{MODEL}",outcome="success",version="1"}}' in text
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/1/ready").status_code == 200
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/7").status_code == 404
    index = httpx.post(f"{server.url}/v2/repository/index").json()
    assert index == [{"name": MODEL, "version": "1", "state": "READY"}]
    assert httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load").status_code == 200  # reload, no restart
    assert httpx.post(f"{server.url}/v1/models/{MODEL}/predict", content=image.read_bytes()).status_code == 200
    assert httpx.post(f"{server.url}/v2/repository/models/nope/load").status_code == 404


def test_python_clients_and_the_client_command(server, predictor: Predictor, image: Path, tmp_path: Path) -> None:
    import asyncio
    import subprocess
    import sys

    from cvdeploy.client import AsyncClient, Client, ConnectionFailed, ServerError

    expected = predictor.predict(image, conf=0.2).to_dict()["detections"]
    with Client(server.url) as c:
        assert c.ready() and c.models()[0]["name"] == MODEL
        assert c.predict(MODEL, image, conf=0.2)["detections"] == expected
        with pytest.raises(ServerError) as e:
            c.predict("nope", image)
        assert e.value.status == 404

    async def go() -> dict:
        async with AsyncClient(server.url) as ac:
            return await ac.predict(MODEL, image.read_bytes(), conf=0.2)

    assert asyncio.run(go())["detections"] == expected
    with pytest.raises(ConnectionFailed), Client("http://127.0.0.1:9", timeout=2) as c:
        c.ready()

    cli = [sys.executable, "-m", "cvdeploy", "client", "predict", server.url, str(image)]
    out = subprocess.run([*cli, "--conf", "0.2", "--json", "--save", str(tmp_path / "ann")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["detections"] == expected and (tmp_path / "ann" / f"{image.stem}.jpg").is_file()
    bad = subprocess.run([*cli, "--model", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: server answered 404") and "Traceback" not in bad.stderr


def test_reload_under_load_loses_no_accepted_request(server, image: Path) -> None:
    import asyncio

    blob = image.read_bytes()

    async def go() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            async def one() -> int:
                return (await c.post(f"/v1/models/{MODEL}/predict", content=blob)).status_code

            async def reloads() -> list[int]:
                codes = []
                for _ in range(2):
                    await asyncio.sleep(0.2)
                    codes.append((await c.post(f"/v2/repository/models/{MODEL}/load")).status_code)
                return codes

            results = await asyncio.gather(*(one() for _ in range(40)), reloads())
            return list(results[:-1]), results[-1]

    codes, reload_codes = asyncio.run(go())
    assert reload_codes == [200, 200] and codes == [200] * 40


def test_a_protected_bundle_serves_identical_results(demo_bundle: Path, server, server_factory, image: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from cvdeploy.security.protect import load_key, new_key_file, protect_bundle

    key = new_key_file(tmp_path / "k")
    protected = protect_bundle(demo_bundle, tmp_path / "p.cvd", load_key(key), obfuscate=True)
    monkeypatch.setenv("CVDEPLOY_MODEL_KEY_FILE", str(key))
    locked = server_factory([str(protected)])
    blob = image.read_bytes()
    a = httpx.post(f"{server.url}/v1/models/{MODEL}/predict", content=blob, params={"conf": 0.05}).json()
    b = httpx.post(f"{locked.url}/v1/models/{MODEL}/predict", content=blob, params={"conf": 0.05}).json()
    assert a["detections"] == b["detections"]


def test_audit_log_records_inference_and_lifecycle(demo_bundle: Path, server_factory, image: Path, tmp_path: Path) -> None:
    import hashlib
    import sqlite3

    from cvdeploy.security.audit import AuditLog, verify

    key = b"a" * 32
    log = AuditLog(tmp_path / "audit.db", key)
    s = server_factory([str(demo_bundle)], audit=log)
    blob = image.read_bytes()
    assert httpx.post(f"{s.url}/v1/models/{MODEL}/predict", content=blob, headers={"x-request-id": "req-1"}).status_code == 200
    assert httpx.post(f"{s.url}/v1/models/{MODEL}/predict", content=b"junk").status_code == 400
    assert httpx.post(f"{s.url}/v2/repository/models/{MODEL}/load").status_code == 200
    rows = sqlite3.connect(tmp_path / "audit.db").execute(
        "SELECT action, outcome, resource, request_id, input_sha256, client FROM entries ORDER BY seq").fetchall()
    assert rows[0][:2] == ("infer", "success") and rows[0][3] == "req-1" and rows[0][4] == hashlib.sha256(blob).hexdigest()
    assert rows[0][2].startswith(f"{MODEL}@1#") and rows[0][5] == "127.0.0.1"
    assert rows[1][:2] == ("infer", "client_error") and rows[2][:2] == ("load_model", "success")
    assert verify(tmp_path / "audit.db", key).ok


def test_a_failed_load_keeps_the_serving_version(demo_bundle: Path, server_factory, image: Path, tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "models"
    shutil.copytree(demo_bundle, repo / "shapes" / "1")
    s = server_factory([], str(repo))
    url = f"{s.url}/v1/models/shapes/predict"
    assert httpx.post(url, content=image.read_bytes()).status_code == 200
    broken = repo / "shapes" / "2"
    shutil.copytree(demo_bundle, broken)
    f = broken / "variants" / "onnx-fp32.onnx"
    f.write_bytes(f.read_bytes()[:-100])  # a damaged new version
    r = httpx.post(f"{s.url}/v2/repository/models/shapes/load")
    assert r.status_code == 400 and "still serves" in r.json()["error"] and "onnx-fp32" in r.json()["error"]
    assert httpx.post(url, content=image.read_bytes()).status_code == 200  # version 1 kept serving
    assert httpx.get(f"{s.url}/v2/models/shapes").json()["versions"] == ["1"]


def test_several_engine_instances_serve_the_same_results(demo_bundle: Path, server_factory, predictor: Predictor, image: Path) -> None:
    r = server_factory([str(demo_bundle)], instances=2, threads=1, max_batch=2)
    config = httpx.get(f"{r.url}/v2/models/{MODEL}/config").json()
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    loaded = r.repo.get(MODEL)
    assert len(loaded.instances) == 2 and all(p.engine.options.intra_op_threads == 1 for p in loaded.instances)
    expected = predictor.predict(image).to_dict()["detections"]
    with httpx.Client(base_url=r.url, timeout=60) as c:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: c.post(f"/v1/models/{MODEL}/predict", content=image.read_bytes()), range(12)))
    assert all(a.status_code == 200 and a.json()["detections"] == expected for a in answers)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    x2, y2 = np.minimum(a[:, 2], b[:, 2]), np.minimum(a[:, 3], b[:, 3])
    inter = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_what_is_served_is_what_is_predicted_under_concurrent_batching(demo_bundle: Path, server_factory, predictor: Predictor,
                                                                       shapes_data: Path) -> None:
    """60 images of varied sizes and aspect ratios, sent at once: the server batches those whose letterbox rectangles
    match, and every answer equals Predictor.predict on the same file (issue 12: it used to letterbox square)."""
    from concurrent.futures import ThreadPoolExecutor

    s = server_factory([str(demo_bundle)], max_batch=4, max_delay_ms=50.0)
    images = sorted((shapes_data / "images" / "val").glob("*.jpg"))
    assert len(images) >= 50 and len({load_image(p).shape for p in images}) >= 10  # varied sizes and aspect ratios
    with httpx.Client(base_url=s.url, timeout=120) as c, ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda p: c.post(f"/v1/models/{MODEL}/predict", content=p.read_bytes()), images))
    for path, r in zip(images, answers, strict=True):
        assert r.status_code == 200, r.text
        got = r.json()["detections"]
        ref = predictor.predict(path).detections
        assert len(got) == len(ref), path.name
        if len(ref):
            boxes = np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in got])
            assert (_iou(boxes, ref.xyxy) >= 0.99).all(), path.name
            assert np.abs(np.array([d["confidence"] for d in got]) - ref.confidence).max() <= 1e-3
            assert [d["class_id"] for d in got] == ref.class_id.tolist()
    text = httpx.get(f"{s.url}/metrics").text
    count = lambda name: sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name + "{"))  # noqa: E731
    assert count("cvdeploy_execution_count_total") < count("cvdeploy_inference_count_total")  # requests did share batches
