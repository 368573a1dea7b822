"""Every YOLO task through a real server (issue 14): detect, segment, pose, obb, classify and a YOLO26 end-to-end head,
each bundle built once for the module from the packaged demo models at imgsz 160, served together by one uvicorn
server on 127.0.0.1.

- v2 (the real `tritonclient.http`): metadata and config list every raw output with its shape and the task facts; raw
  tensors come back as every output, equal to the Predictor's `infer_all`; BYTES images come back as the Predictor's
  JSON. Ultralytics' own Triton client (`YOLO("http://.../model")`) reads the metadata and decodes what the server
  answers as the Predictor decodes the same square letterbox. The server offers no gRPC endpoint (HTTP only).
- image API: each task's answer equals `Predictor.predict` on the same files, sent concurrently with dynamic batching
  on; `retina_masks` (segment; ignored by the other tasks, as in Ultralytics); annotated images; bad input is a 4xx.
- WebSocket frames between the body limit and uvicorn's old fixed 16 MiB cap get 413, not a 1009 close (issue 12).
"""

from __future__ import annotations

import ast
import base64
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from tests.serve.conftest import start_server, stop_server
from tests.tasks.conftest import make_task_model  # a YOLO26 head from its YAML, made to give detections

from cvdeploy import Predictor
from cvdeploy.vision.masks import rle_decode

pytestmark = pytest.mark.slow  # builds six bundles and runs Ultralytics

TASKS = ("detect", "segment", "pose", "obb", "classify", "end2end")
NC = 6
RAW_OUTPUTS = {  # the engine's outputs, -1 where the graph takes any size
    "detect": {"output0": [-1, 4 + NC, -1]},
    "segment": {"output0": [-1, 4 + NC + 32, -1], "output1": [-1, 32, -1, -1]},
    "pose": {"output0": [-1, 4 + NC + 4 * 3, -1]},  # the demo pose model: 4 keypoints of (x, y, visibility)
    "obb": {"output0": [-1, 4 + NC + 1, -1]},
    "classify": {"output0": [-1, NC]},
    "end2end": {"output0": [-1, 300, 6]},
}
TASK_OF = {t: ("detect" if t == "end2end" else t) for t in TASKS}
MAX_BODY = 17 * 1024 * 1024  # over uvicorn's default WebSocket cap (16 MiB): the frame-limit test needs the gap


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six generated scenes of different sizes and aspect ratios, and a mirror of the first (same size: shares its
    batch); plus one grayscale PNG."""
    from cvdeploy.demo.shapes import generate_shapes

    root = generate_shapes(tmp_path_factory.mktemp("task-serve"), n_train=0, n_val=6, seed=14).parent
    files = sorted((root / "images" / "val").glob("*.jpg"))
    first = cv2.imread(str(files[0]))
    mirror = root / "mirror.jpg"
    cv2.imwrite(str(mirror), first[:, ::-1])
    gray = root / "gray.png"
    cv2.imwrite(str(gray), cv2.cvtColor(cv2.imread(str(files[1])), cv2.COLOR_BGR2GRAY))
    out = [*files, mirror, gray]
    assert len({cv2.imread(str(f)).shape[:2] for f in out}) >= 4
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, images: list[Path]) -> dict[str, Path]:
    import torch

    from cvdeploy.build import build_bundle
    from cvdeploy.demo import TASK_MODELS

    work = tmp_path_factory.mktemp("task-bundles")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: the other worker's tests (some measure latency ratios) keep theirs
    try:
        out = {t: build_bundle(pt, work / f"{t}.cvd", imgsz=160, name=t).root for t, pt in TASK_MODELS.items()}
        pt = make_task_model("yolo26n.yaml", work, [cv2.imread(str(p)) for p in images[:6]], imgsz=160)
        out["end2end"] = build_bundle(pt, work / "end2end.cvd", imgsz=160, name="end2end").root
    finally:
        torch.set_num_threads(threads)
    return out  # type: ignore[return-value]


@pytest.fixture(scope="module")
def predictors(bundles: dict[str, Path]) -> Iterator[dict[str, Predictor]]:
    ps = {t: Predictor(b, threads=1) for t, b in bundles.items()}
    yield ps
    for p in ps.values():
        p.close()


@pytest.fixture(scope="module")
def srv(bundles: dict[str, Path]):
    # A long batching delay: concurrent requests of one shape are sure to share batches.
    # One engine thread per model: the tests leave a core to the other worker.
    r = start_server([str(b) for b in bundles.values()], max_batch=8, max_delay_ms=40.0, max_body_bytes=MAX_BODY, threads=1)
    yield r
    stop_server(r)


def _sample(registry, name: str, model: str) -> float:
    return registry.get_sample_value(name, {"model": model, "version": "1"}) or 0.0


# -- comparing an answer with the Predictor's ---------------------------------------------------------------------


def _iou(a: dict, b: dict) -> float:
    ax1, ay1, ax2, ay2 = (a[k] for k in ("x1", "y1", "x2", "y2"))
    bx1, by1, bx2, by2 = (b[k] for k in ("x1", "y1", "x2", "y2"))
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else float(a == b)


def assert_same(served: dict, expected: dict, where: str) -> None:
    """The server's JSON against `Result.to_dict()`: boxes IoU >= 0.99 (or within a pixel for a flat box), |dconf| <=
    1e-3, masks IoU >= 0.98, keypoints within 0.5 px, angles within 1e-3 rad, probabilities within 1e-4."""
    assert served["task"] == expected["task"] and served["image"] == expected["image"], where
    if expected["task"] == "classify":
        assert np.abs(np.array(served["probs"]) - np.array(expected["probs"])).max() <= 1e-4, where
        assert [c["class_id"] for c in served["classes"]][:1] == [c["class_id"] for c in expected["classes"]][:1], where
        assert len(served["classes"]) == 5, where
        return
    ours, theirs = served["detections"], expected["detections"]
    assert len(ours) == len(theirs), f"{where}: {len(ours)} detections, the Predictor {len(theirs)}"
    free = list(range(len(theirs)))
    for d in ours:
        same = [j for j in free if theirs[j]["class_id"] == d["class_id"]]
        assert same, f"{where}: no unmatched {d['class_name']} left"
        j = max(same, key=lambda j: _iou(d["box"], theirs[j]["box"]))
        e = theirs[j]
        free.remove(j)
        flat = max(abs(d["box"][k] - e["box"][k]) for k in d["box"]) <= 1.0
        assert _iou(d["box"], e["box"]) >= 0.99 or flat, f"{where}: box {d['box']} vs {e['box']}"
        assert abs(d["confidence"] - e["confidence"]) <= 1e-3, where
        if "mask" in e:
            a, b = rle_decode(d["mask"]).astype(bool), rle_decode(e["mask"]).astype(bool)
            assert a.shape == b.shape, where
            assert (a & b).sum() / max((a | b).sum(), 1) >= 0.98, f"{where}: mask IoU"
        if "keypoints" in e:
            assert np.abs(np.array(d["keypoints"])[:, :2] - np.array(e["keypoints"])[:, :2]).max() <= 0.5, where
            assert np.abs(np.array(d["keypoints"])[:, 2] - np.array(e["keypoints"])[:, 2]).max() <= 1e-3, where
        if "obb" in e:
            assert abs(d["obb"]["angle"] - e["obb"]["angle"]) <= 1e-3, where
            assert max(abs(d["obb"][k] - e["obb"][k]) for k in ("cx", "cy", "width", "height")) <= 0.5, where
        for key in ("mask", "keypoints", "obb"):
            assert (key in d) == (key in e), f"{where}: {key}"


# -- v2, with the real tritonclient -----------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_v2_metadata_and_config_describe_every_output_and_the_task(srv, predictors, task: str) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(srv.hostport)
    p = predictors[task]
    meta = client.get_model_metadata(task)
    raw = {o["name"]: o for o in meta["outputs"] if o["datatype"] != "BYTES"}
    assert {k: v["shape"] for k, v in raw.items()} == RAW_OUTPUTS[task]
    assert all(o["datatype"] == "FP32" for o in raw.values())
    assert [o["name"] for o in meta["outputs"] if o["datatype"] == "BYTES"] == ["detections"]
    params = meta["parameters"]
    assert params["task"] == TASK_OF[task] and params["end2end"] is (task == "end2end")
    assert json.loads(params["names"]) == {str(k): v for k, v in p.names.items()}
    assert json.loads(params["imgsz"]) == [160, 160] and params["stride"] == 32
    assert params["preprocess"] == ("center_crop" if task == "classify" else "letterbox")
    assert set(json.loads(params["outputs"])) == set(RAW_OUTPUTS[task])
    assert ("kpt_shape" in params) == (task == "pose")
    if task == "pose":
        assert json.loads(params["kpt_shape"]) == list(p.head.kpt_shape) == [4, 3]
    if task == "segment":
        assert params["mask_channels"] == 32

    config = client.get_model_config(task)
    assert {o["name"]: o["dims"] for o in config["output"]} == RAW_OUTPUTS[task]
    assert config["parameters"]["task"]["string_value"] == TASK_OF[task]
    lit = ast.literal_eval(config["parameters"]["metadata"]["string_value"])  # what Ultralytics' client reads
    assert lit["task"] == TASK_OF[task] and lit["end2end"] is (task == "end2end") and lit["imgsz"] == [160, 160]
    assert lit["names"] == p.names and lit["args"] == {"nms": False}
    assert lit.get("kpt_shape") == ([4, 3] if task == "pose" else None)


@pytest.mark.parametrize("task", TASKS)
def test_v2_raw_tensor_returns_every_output_as_infer_all(srv, predictors, images: list[Path], task: str) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(srv.hostport)
    p = predictors[task]
    tensor = p.prepare([p.decode(images[2])]).tensor  # its own rectangle (classify: the centre crop)
    want = p.infer_all(tensor)
    inp = triton.InferInput("images", list(tensor.shape), "FP32")
    inp.set_data_from_numpy(tensor, binary_data=True)
    res = client.infer(task, [inp])  # no outputs asked for: every output
    got = {o["name"]: res.as_numpy(o["name"]) for o in res.get_response()["outputs"]}
    assert set(got) == set(want) == set(RAW_OUTPUTS[task])
    for name, arr in want.items():
        assert got[name].shape == arr.shape and got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], arr, rtol=0, atol=1e-4 * max(1.0, float(np.abs(arr).max())))
    if task == "segment":  # one output asked for, in JSON: that one only
        res = client.infer(task, [inp], outputs=[triton.InferRequestedOutput("output1", binary_data=False)])
        assert [o["name"] for o in res.get_response()["outputs"]] == ["output1"]
        np.testing.assert_allclose(res.as_numpy("output1"), want["output1"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("task", TASKS)
def test_v2_image_bytes_answer_the_predictors_json_and_take_options(srv, predictors, images: list[Path], task: str) -> None:
    """Several images in one BYTES request (their tensors share batches by shape; classify: all, its crops are one
    size), with options in the request's parameters; a malformed option is a 400 for every task."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(srv.hostport)
    p = predictors[task]
    files = images[:3] + images[-2:]  # the first image's mirror among them: the same shape as the first
    inp = triton.InferInput("image", [len(files)], "BYTES")
    inp.set_data_from_numpy(np.array([f.read_bytes() for f in files], dtype=object))
    registry = srv.repo.metrics.registry
    runs0, seen0 = (_sample(registry, n, task) for n in ("cvdeploy_execution_count_total", "cvdeploy_inference_count_total"))
    options = {"conf": 0.3, "retina_masks": True}
    res = client.infer(task, [inp], parameters=options)
    answers = [json.loads(a) for a in res.as_numpy("detections")]
    for f, a in zip(files, answers, strict=True):
        assert_same(a, p.predict(f, **options).to_dict(), f"{task} {f.name}")
    runs = _sample(registry, "cvdeploy_execution_count_total", task) - runs0
    assert _sample(registry, "cvdeploy_inference_count_total", task) - seen0 == len(files)
    assert runs < len(files), f"{task}: {runs} engine runs for {len(files)} images: nothing was batched"
    for bad in ({"retina_masks": "yes"}, {"conf": 2.0}, {"max_det": 1.5}, {"classes": [1]}):
        with pytest.raises(InferenceServerException) as e:
            client.infer(task, [inp], parameters=bad)
        assert e.value.status() == "400", (bad, e.value)


@pytest.mark.parametrize("task", ["segment", "pose", "obb", "classify", "end2end"])
def test_ultralytics_triton_client_decodes_the_server_as_cvdeploy(srv, bundles, images: list[Path], task: str) -> None:
    """`YOLO("http://host:port/model")` configures itself from the config's metadata (task, kpt_shape, end2end,
    imgsz, names) and runs the raw v2 path at the model's imgsz, letterboxed square: its results equal the Predictor's
    on the same square letterbox."""
    from dataclasses import replace

    from ultralytics import YOLO

    remote = YOLO(f"{srv.url}/{task}", task=TASK_OF[task])
    with Predictor(bundles[task]) as square:
        square.spec = replace(square.spec, rect=False)
        for f in images[:4]:
            a = remote.predict(str(f), verbose=False)[0]
            b = square.predict(f)
            if task == "classify":
                np.testing.assert_allclose(a.probs.data.numpy(), b.probs.data, atol=1e-4)
                continue
            ua, ub = (a.obb.data.numpy(), b.obb.data) if task == "obb" else (a.boxes.data.numpy(), b.boxes.data)
            assert ua.shape == ub.shape, f"{task} {f.name}: {len(ua)} detections, cvdeploy {len(ub)}"
            np.testing.assert_allclose(ua[:, :-2], ub[:, :-2], atol=0.5)  # boxes (obb: + angle)
            np.testing.assert_allclose(ua[:, -2], ub[:, -2], atol=1e-3)  # confidences
            assert (ua[:, -1] == ub[:, -1]).all()  # classes
            if task == "pose":
                np.testing.assert_allclose(a.keypoints.data.numpy()[..., :2], b.keypoints.data[..., :2], atol=0.5)
            if task == "segment":
                ma, mb = a.masks.data.numpy().astype(bool), b.masks.data.astype(bool)
                assert ma.shape == mb.shape and (ma & mb).sum() / max((ma | mb).sum(), 1) >= 0.98


# -- the image API ----------------------------------------------------------------------------------------------


def _post_all(url: str, files: list[Path], query: str = "") -> list[httpx.Response]:
    """Every file at once, one connection each (the server batches what arrives together)."""
    def post(f: Path) -> httpx.Response:
        return httpx.post(f"{url}{query}", content=f.read_bytes(), headers={"content-type": "application/octet-stream"},
                          timeout=60)

    with ThreadPoolExecutor(len(files)) as pool:
        return list(pool.map(post, files))


@pytest.mark.parametrize("task", TASKS)
def test_image_api_answers_the_predictor_under_concurrent_batched_requests(srv, predictors, images: list[Path],
                                                                           task: str) -> None:
    p = predictors[task]
    registry = srv.repo.metrics.registry
    seen0 = _sample(registry, "cvdeploy_inference_count_total", task)
    answers = _post_all(f"{srv.url}/v1/models/{task}/predict", images * 2)
    assert _sample(registry, "cvdeploy_inference_count_total", task) - seen0 == 2 * len(images)
    for f, r in zip(images * 2, answers, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_name"] == task and body["model_version"] == "1"
        assert_same(body, p.predict(f).to_dict(), f"{task} {f.name}")


def test_retina_masks_give_the_predictors_image_size_masks(srv, predictors, images: list[Path]) -> None:
    p = predictors["segment"]
    retina = _post_all(f"{srv.url}/v1/models/segment/predict", images, "?retina_masks=true")
    plain = _post_all(f"{srv.url}/v1/models/segment/predict", images, "?retina_masks=false")
    differ = 0
    for f, r, q in zip(images, retina, plain, strict=True):
        assert r.status_code == q.status_code == 200
        expected = p.predict(f, retina_masks=True).to_dict()
        assert_same(r.json(), expected, f"retina {f.name}")
        assert_same(q.json(), p.predict(f).to_dict(), f"plain {f.name}")
        differ += sum(a["mask"]["counts"] != b["mask"]["counts"] for a, b in zip(r.json()["detections"], q.json()["detections"], strict=True))
    assert differ > 0, "retina_masks changed no mask: the option did not reach the decoder"


@pytest.mark.parametrize("task", ["detect", "pose", "obb", "classify", "end2end"])
def test_retina_masks_is_ignored_by_tasks_without_masks(srv, images: list[Path], task: str) -> None:
    """As in Ultralytics and the Predictor: the option exists for every task and changes only segment masks."""
    url = f"{srv.url}/v1/models/{task}/predict"
    a = httpx.post(f"{url}?retina_masks=true", content=images[0].read_bytes()).json()
    b = httpx.post(url, content=images[0].read_bytes()).json()
    key = "probs" if task == "classify" else "detections"
    assert a[key] == b[key]


@pytest.mark.parametrize("task", TASKS)
def test_bad_input_is_a_4xx_for_every_task(srv, images: list[Path], task: str) -> None:
    url = f"{srv.url}/v1/models/{task}/predict"
    blob = images[0].read_bytes()
    for query, body, status in (("?retina_masks=banana", blob, 400), ("?annotate=maybe", blob, 400), ("?conf=1.5", blob, 400),
                                ("?max_det=0", blob, 400), ("?classes=a,b", blob, 400), ("?iou=x", blob, 400),
                                ("", b"not an image", 400), ("", blob[: len(blob) // 3], 400), ("", b"", 400),
                                ("?version=9", blob, 404)):
        r = httpx.post(url + query, content=body, headers={"content-type": "application/octet-stream"})
        assert r.status_code == status, (task, query, r.status_code, r.text)
        assert "error" in r.json()


@pytest.mark.parametrize("task", TASKS)
def test_annotated_image_draws_the_tasks_result(srv, predictors, images: list[Path], task: str) -> None:
    from cvdeploy.vision.draw import draw

    p = predictors[task]
    f = images[0]
    r = httpx.post(f"{srv.url}/v1/models/{task}/predict?annotate=true", content=f.read_bytes())
    assert r.status_code == 200
    got = cv2.imdecode(np.frombuffer(base64.b64decode(r.json()["annotated_image"]), np.uint8), cv2.IMREAD_COLOR)
    image = cv2.imread(str(f))
    ok, buf = cv2.imencode(".jpg", draw(image, p.predict(f)))
    want = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    assert ok and got.shape == image.shape
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 0.5  # the same drawing
    assert np.abs(got.astype(int) - image.astype(int)).mean() > 1.0  # and something is drawn


def test_stream_takes_retina_masks_like_the_image_api(srv, images: list[Path]) -> None:
    from websockets.sync.client import connect

    url = srv.url.replace("http", "ws", 1) + "/v1/models/segment/stream?retina_masks=true"
    with connect(url, proxy=None, open_timeout=60, max_size=None) as ws:
        ws.send(images[1].read_bytes())
        frame = json.loads(ws.recv(timeout=60))
        ws.send(json.dumps({"retina_masks": "yes"}))  # a malformed option: answered, the stream goes on
        refused = json.loads(ws.recv(timeout=60))
    posted = httpx.post(f"{srv.url}/v1/models/segment/predict?retina_masks=true", content=images[1].read_bytes()).json()
    assert frame["seq"] == 0 and frame["detections"] == posted["detections"]
    assert refused["status"] == 400 and "retina_masks" in refused["error"]


# -- WebSocket frames past the body limit (issue 12) ------------------------------------------------------------


def test_ws_max_size_follows_the_body_limit() -> None:
    from cvdeploy.serve.app import WS_FRAME_SLACK, ws_max_size
    from cvdeploy.serve.settings import ServeSettings

    for limit in (1024, 32 * 1024 * 1024, 100 * 1024 * 1024):
        assert ws_max_size(ServeSettings(max_body_bytes=limit)) == limit + WS_FRAME_SLACK


def test_stream_frame_over_16_mib_gets_the_http_routes_answer(srv, images: list[Path]) -> None:
    """Under a 17 MiB body limit, a 16.5 MiB frame is read (not an image: 400) and a 17.5 MiB one is refused with 413,
    the stream going on after both; uvicorn's own 16 MiB cap used to close the socket with 1009 on either."""
    from websockets.sync.client import connect

    url = srv.url.replace("http", "ws", 1) + "/v1/models/detect/stream"
    with connect(url, proxy=None, open_timeout=60, max_size=None) as ws:
        ws.send(os.urandom(16 * 1024 * 1024 + 512 * 1024))
        under = json.loads(ws.recv(timeout=60))
        ws.send(b"\0" * (MAX_BODY + 512 * 1024))
        over = json.loads(ws.recv(timeout=60))
        ws.send(images[0].read_bytes())
        after = json.loads(ws.recv(timeout=60))
    assert (under["seq"], under["status"]) == (0, 400), under
    assert (over["seq"], over["status"]) == (1, 413), over
    assert after["seq"] == 2 and "detections" in after
