"""Fleet updates end to end: a real update server process on 127.0.0.1, device agents as processes, real signatures.

The module's fleet (FLEET_SIZE devices) starts with the first version committed; each test publishes what it needs and
judges every device against where it stood before, so that the tests hold in any order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from tests.fleet.conftest import (
    FLEET_SIZE,
    CuttingProxy,
    Devices,
    Publisher,
    Server,
    Versions,
    cli,
    finish,
    make_devices,
    run_agents,
    start_agents,
    start_server,
    stop,
)

from cvdeploy.bundle.bundle import Bundle, manifest_content_hash
from cvdeploy.fleet.slots import Device, active_bundle
from cvdeploy.predict import Predictor

pytestmark = pytest.mark.slow
ALL = range(FLEET_SIZE)


def manifest_sha(bundle: Path) -> str:
    import hashlib

    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


def pointer_identity(device: Path) -> tuple[str, int, int]:
    """The pointer link as an object: its target, inode and change time. Switching it (even there and back) makes a new
    link, so an equal identity means it was never switched."""
    st = os.lstat(device / "current")
    return os.readlink(device / "current"), st.st_ino, st.st_ctime_ns


def predictions(bundle: Path, images: list[Path]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    with Predictor(bundle) as p:
        return [(r.detections.xyxy, r.detections.confidence, r.detections.class_id) for r in (p.predict(i) for i in images)]


def same(a: list[Any], b: list[Any]) -> bool:
    return all(len(x[0]) == len(y[0]) and all(np.allclose(u, v, atol=1e-4) for u, v in zip(x, y, strict=True))
               for x, y in zip(a, b, strict=True))


def new_downloads(server: Server, since: int) -> list[dict[str, Any]]:
    return server.downloads()[since:]


# -- (1) and (5): a good update reaches every device, and only the changed file travels ----------------------------


def test_good_update_reaches_every_device_downloading_only_the_changed_variant(
        server: Server, fleet: Devices, versions: Versions, publisher: Publisher) -> None:
    before = {d.name: Device(d).active_slot() for d in fleet.dirs}
    doc = server.publish(versions.v2, publisher.public, version="v2")
    changed = Bundle.load(versions.v2).manifest.variants["onnx-fp16"]
    assert changed.sha256 != Bundle.load(versions.v1).manifest.variants["onnx-fp16"].sha256
    mark = len(server.downloads())

    results = run_agents(fleet, server, ALL)

    for d, (code, report, stderr) in zip(fleet.dirs, results, strict=True):
        assert code == 0 and report["state"] == "committed", stderr
        assert report["version"] == "v2" and report["active_version"] == "v2"
        assert report["files_downloaded"] == 1 and report["files_reused"] == len(doc["files"]) - 1
        assert report["bytes_downloaded"] == changed.size_bytes
        assert report["canary"]["passed"] and report["canary"]["baseline"] == "previous version"
        active = active_bundle(d)
        assert active.name != before[d.name], "an update must go to the other slot"
        assert manifest_sha(active) == doc["manifest_sha256"]
        Bundle.load(d / "current", public_key=fleet.public_key)  # what the device serves: signed, every hash holds
        assert Device(d).record(before[d.name]).state == "superseded"  # the previous version stays in its slot
    # Server side: one request per device, each for the one file that changed, whole.
    got = new_downloads(server, mark)
    assert sorted(e["device"] for e in got) == sorted(d.name for d in fleet.dirs)
    assert {e["sha256"] for e in got} == {changed.sha256}
    assert all(e["status"] == 200 and e["complete"] and e["bytes"] == changed.size_bytes for e in got)
    # Each device's report reached the server.
    reports = server.reports()
    assert all(reports[d.name]["state"] == "committed" and reports[d.name]["version"] == "v2" for d in fleet.dirs)


# -- (2): a bad update is rolled back everywhere, and the previous version serves throughout --------------------------


def test_bad_update_is_rolled_back_on_every_device_which_keeps_serving_the_previous_version(
        server: Server, fleet: Devices, versions: Versions, publisher: Publisher) -> None:
    images = sorted(fleet.samples.iterdir())[:3]
    served = {d.name: (active_bundle(d), Bundle.load(active_bundle(d)).manifest, pointer_identity(d)) for d in fleet.dirs}
    before_version = {d.name: Device(d).active_record().version for d in fleet.dirs}
    reference = predictions(active_bundle(fleet.dirs[0]), images)
    # The bad model predicts otherwise: a check that could not tell the two apart would prove nothing.
    assert not same(predictions(versions.bad, images), reference)
    server.publish(versions.bad, publisher.public, version="bad")

    processes = start_agents(fleet, server, ALL)
    predicted = 0
    while any(p.poll() is None for p in processes):  # while the agents work, the devices serve what they served
        for d in fleet.dirs:
            assert active_bundle(d) == served[d.name][0] and pointer_identity(d) == served[d.name][2]
        if predicted < FLEET_SIZE:  # a prediction through each device's pointer (each loads a model: a few, not a loop)
            assert same(predictions(fleet.dirs[predicted] / "current", images), reference)
            predicted += 1
        time.sleep(0.1)
    results = finish(processes)
    assert predicted >= 1

    for d, (code, report, stderr) in zip(fleet.dirs, results, strict=True):
        assert code == 1 and report["state"] == "rolled-back", stderr
        assert report["version"] == "bad" and report["active_version"] == before_version[d.name]
        assert "golden parity failed on this device" in report["reason"] and "onnx-fp32" in report["reason"]
        assert pointer_identity(d) == served[d.name][2], "the pointer must never have left the previous version"
        assert same(predictions(d / "current", images), reference)
        assert Device(d).record(Device(d).inactive_slot()).state == "rolled-back"
    reports = server.reports()
    assert all(reports[d.name]["state"] == "rolled-back" and reports[d.name]["version"] == "bad" for d in fleet.dirs)

    # A rolled-back version is not tried again: the next poll downloads nothing and says where the device stands.
    mark = len(server.downloads())
    (code, report, _), = run_agents(fleet, server, [0])
    assert report["state"] == "rolled-back" and report["version"] == "bad" and code == 1
    assert not [e for e in new_downloads(server, mark) if e["device"] == fleet.dirs[0].name]


# -- (3): tampered downloads are refused and nothing is installed --------------------------------------------------


def _device_state(d: Path) -> tuple[Any, ...]:
    dev = Device(d)
    return pointer_identity(d), dev.record("a"), dev.record("b")


def test_a_file_altered_on_the_server_is_refused_and_nothing_is_installed(
        server: Server, fleet: Devices, versions: Versions, publisher: Publisher) -> None:
    doc = server.publish(versions.tamper_file, publisher.public, version="tampered-file")
    altered = Bundle.load(versions.tamper_file).manifest.variants["onnx-fp16"].sha256
    blob = server.root / "files" / altered
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit pattern flipped in the middle: same size, other sha256
    blob.write_bytes(bytes(data))
    which = [0, 1]
    before = {i: _device_state(fleet.dirs[i]) for i in which}

    results = run_agents(fleet, server, which)

    for i, (code, report, stderr) in zip(which, results, strict=True):
        d = fleet.dirs[i]
        assert code == 1 and report["state"] == "refused", stderr
        assert report["version"] == "tampered-file" and f"file {altered[:12]}" in report["reason"]
        assert "not the one the signed manifest gives" in report["reason"]
        assert _device_state(d) == before[i], "nothing may be installed: same pointer, same slots"
        assert not (d / "incoming").exists() and not (d / "downloads" / f"{altered}.part").exists()
        slots = [Device(d).slot_dir(s) for s in ("a", "b") if (Device(d).slot_dir(s) / "manifest.json").is_file()]
        assert slots and all(manifest_sha(s) != doc["manifest_sha256"] for s in slots)

    # The same file made longer than the signed manifest says: cut at its signed size, refused (no disk filled).
    size = Bundle.load(versions.tamper_file).manifest.variants["onnx-fp16"].size_bytes
    blob.write_bytes(bytes(data) + b"\0" * 1_000_000)
    (code, report, stderr), = run_agents(fleet, server, [0])
    assert code == 1 and report["state"] == "refused", stderr
    assert f"larger than its {size}-byte limit" in report["reason"] and report["bytes_downloaded"] <= size
    assert _device_state(fleet.dirs[0]) == before[0] and not list((fleet.dirs[0] / "downloads").glob("*.part"))


def test_a_manifest_altered_on_the_server_is_refused_before_any_file_is_downloaded(
        server: Server, fleet: Devices, versions: Versions, publisher: Publisher) -> None:
    server.publish(versions.tamper_sig, publisher.public, version="tampered-manifest")
    served = server.root / "versions" / "tampered-manifest" / "manifest.json"
    raw = json.loads(served.read_text())
    raw["names"]["0"] = "c1rcle"
    raw["content_sha256"] = manifest_content_hash(raw)  # the manifest's own hash "fixed": only the signature is left
    served.write_text(json.dumps(raw, indent=2))
    which = [2, 3]
    before = {i: _device_state(fleet.dirs[i]) for i in which}
    mark = len(server.downloads())

    results = run_agents(fleet, server, which)

    for i, (code, report, stderr) in zip(which, results, strict=True):
        assert code == 1 and report["state"] == "refused", stderr
        assert "signature" in report["reason"] and "does not match" in report["reason"]
        assert report["bytes_downloaded"] == 0 and report["files_downloaded"] == 0
        assert _device_state(fleet.dirs[i]) == before[i]
    assert new_downloads(server, mark) == []  # no file was asked for


# -- (4): an interrupted download continues with Range --------------------------------------------------------------


def test_an_interrupted_download_resumes_with_range_in_the_next_try_and_the_next_run(
        server: Server, versions: Versions, publisher: Publisher, samples: Path, tmp_path: Path) -> None:
    server.publish(versions.single, publisher.public, channel="resume", version="single")
    big = Bundle.load(versions.single).manifest.variants["onnx-fp32"]
    devices = make_devices(tmp_path, ["resumer"], publisher, samples)
    port = int(server.url.rsplit(":", 1)[1])
    # The first two answers for the model file are cut: after 2 MB, then after 3 MB more.
    proxy = CuttingProxy(port, f"/v1/files/{big.sha256}".encode(), cuts=[2_000_000, 3_000_000])
    url = f"http://127.0.0.1:{proxy.port}"
    mark = len(server.downloads())
    try:
        # Run 1 gives up at the first cut (no retries): the part stays on the device.
        (code, report, stderr), = run_agents(devices, server, [0], "resume", "--retries", "0", url=url)
        assert code == 1 and report["state"] == "failed", stderr
        part = devices.dirs[0] / "downloads" / f"{big.sha256}.part"
        first = part.stat().st_size
        assert 0 < first < big.size_bytes
        assert Device(devices.dirs[0]).active_slot() is None  # nothing installed
        # Run 2 continues from there; its first try is cut again, its second finishes the file.
        (code, report, stderr), = run_agents(devices, server, [0], "resume", "--retries", "2", url=url)
    finally:
        proxy.close()
    assert proxy.cut == 2
    assert code == 0 and report["state"] == "committed", stderr
    assert report["resumed"] == 2
    others = sum(g.stat().st_size for g in (versions.single / "golden").iterdir())
    assert report["bytes_downloaded"] == big.size_bytes - first + others  # no byte of the model fetched twice by run 2
    asked = [e for e in new_downloads(server, mark) if e["sha256"] == big.sha256]
    assert [e["status"] for e in asked] == [200, 206, 206]
    starts = [int(e["range"].removeprefix("bytes=").removesuffix("-")) for e in asked[1:]]
    assert starts[0] == first and first < starts[1] < big.size_bytes
    assert manifest_sha(active_bundle(devices.dirs[0])) == manifest_sha(versions.single)


# -- the canary ---------------------------------------------------------------------------------------------------


def test_a_version_whose_parity_holds_but_whose_predictions_shift_fails_the_canary(
        server: Server, versions: Versions, publisher: Publisher, samples: Path, tmp_path: Path) -> None:
    from cvdeploy.evaluate.verify import verify_bundle

    assert all(c.ok for c in verify_bundle(versions.regressed))  # golden parity alone would let it through
    devices = make_devices(tmp_path, ["canary-device"], publisher, samples)
    server.publish(versions.single, publisher.public, channel="canary", version="single")
    (code, report, stderr), = run_agents(devices, server, [0], "canary")
    assert code == 0 and report["state"] == "committed", stderr
    pointer = pointer_identity(devices.dirs[0])

    server.publish(versions.regressed, publisher.public, channel="canary", version="regressed")
    (code, report, stderr), = run_agents(devices, server, [0], "canary")

    assert code == 1 and report["state"] == "rolled-back", stderr
    assert report["reason"].startswith("canary failed: [serious]")
    serious = {f["statistic"] for f in report["canary"]["findings"] if f["severity"] == "serious"}
    assert serious and serious <= {"boxes_per_image", "top_confidence", "confidence", "box_size", "class_mix"}
    assert report["canary"]["baseline"] == "previous version" and report["canary"]["images"] == 12
    assert pointer_identity(devices.dirs[0]) == pointer and report["active_version"] == "single"


# -- publishing, authentication, TLS -------------------------------------------------------------------------------


def test_publish_refuses_unsigned_wrongly_signed_and_altered_bundles(
        server: Server, versions: Versions, publisher: Publisher, tmp_path: Path) -> None:
    from cvdeploy.bundle.signing import new_signing_key, sign_bundle

    channel = json.loads((server.root / "channels" / "stable.json").read_text())
    unsigned = tmp_path / "unsigned.cvd"
    shutil.copytree(versions.v1, unsigned)
    (unsigned / "signature.json").unlink()
    r = cli("fleet", "publish", unsigned, "--root", server.root, "--key", publisher.public)
    assert r.returncode == 1 and "is not signed" in r.stderr

    other_private, other_public = new_signing_key(tmp_path / "other.pem")
    foreign = tmp_path / "foreign.cvd"
    shutil.copytree(unsigned, foreign)
    sign_bundle(foreign, other_private)
    r = cli("fleet", "publish", foreign, "--root", server.root, "--key", publisher.public)
    assert r.returncode == 1 and "signed by another key" in r.stderr
    r = cli("fleet", "publish", foreign, "--root", server.root, "--key", other_public)  # a key other than the pinned one
    assert r.returncode == 1 and "devices pin the publisher's key" in r.stderr

    altered = tmp_path / "altered.cvd"
    shutil.copytree(versions.v1, altered)
    golden = sorted((altered / "golden").iterdir())[0]
    data = bytearray(golden.read_bytes())
    data[len(data) // 2] ^= 0xFF
    golden.write_bytes(bytes(data))
    r = cli("fleet", "publish", altered, "--root", server.root, "--key", publisher.public)
    assert r.returncode == 1 and "does not match its sha256" in r.stderr
    assert json.loads((server.root / "channels" / "stable.json").read_text()) == channel  # nothing was published


def test_every_route_but_health_needs_the_fleet_token(server: Server, versions: Versions) -> None:
    token = server.token_file.read_text().strip()
    sha = Bundle.load(versions.v1).manifest.variants["onnx-fp32"].sha256
    routes = [("GET", "/v1/channels"), ("GET", "/v1/channels/stable"), ("GET", "/v1/versions/v1/manifest.json"), ("GET", f"/v1/files/{sha}"), ("GET", "/v1/devices"),
              ("POST", "/v1/devices/intruder/status")]
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/v1/health").status_code == 200
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer " + "x" * 43}, {"Authorization": token}):
                r = c.request(method, path, headers=headers, json={"device": "intruder", "state": "committed"})
                assert r.status_code == 401 and "fleet token" in r.json()["error"], (method, path, headers)
        good = {"Authorization": f"Bearer {token}"}
        assert c.get("/v1/channels/stable", headers=good).status_code == 200
        r = c.get(f"/v1/files/{sha}", headers={**good, "Range": "bytes=100-199"})
        assert r.status_code == 206 and len(r.content) == 100 and r.headers["content-range"].startswith("bytes 100-199/")
        assert c.get("/v1/files/" + "0" * 64, headers=good).status_code == 404
        assert c.get("/v1/versions/..%2Fpublisher.pub/manifest.json", headers=good).status_code in (400, 404)
        r = c.post("/v1/devices/someone/status", headers=good, json={"device": "else", "state": "committed"})
        assert r.status_code == 400


def test_the_server_speaks_tls_and_status_reads_it_through_the_ca(server: Server, tmp_path: Path) -> None:
    from cvdeploy.security.tls import make_dev_pki

    pki = make_dev_pki(tmp_path / "pki")
    tls = start_server(server.root, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key, scheme="https",
                       ca=pki.ca_cert)
    try:
        r = cli("fleet", "status", "--server", tls.url, "--token-file", server.token_file, "--ca", pki.ca_cert, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == json.loads(cli("fleet", "status", "--root", server.root, "--json").stdout)
        r = cli("fleet", "status", "--server", tls.url, "--token-file", server.token_file)  # without the CA: refused
        assert r.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in r.stderr
    finally:
        stop(tls.process)


def test_the_agent_polls_in_a_loop_and_stops_cleanly_on_sigterm(
        server: Server, versions: Versions, publisher: Publisher, samples: Path, tmp_path: Path) -> None:
    server.publish(versions.single, publisher.public, channel="loop", version="single")
    devices = make_devices(tmp_path, ["looper"], publisher, samples)
    args = [a for a in devices.agent_args(0, server.url, server.token_file, "loop") if a != "--once"]
    process = subprocess.Popen([*args, "--interval", "0.2"], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    history = server.root / "devices" / "reports.jsonl"

    def mine() -> list[dict[str, Any]]:
        lines = history.read_text().splitlines() if history.is_file() else []
        return [d for d in map(json.loads, lines) if d["device"] == "looper"]

    deadline = time.monotonic() + 120  # a bound for a stuck agent, not a timing assertion
    while sum(d["state"] == "committed" for d in mine()) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    states = [d["state"] for d in mine()]
    # One update, then heartbeats that repeat where the device stands; never a second download.
    assert states[:4] == ["downloading", "verifying", "canary", "committed"] and states.count("committed") >= 3, states
    assert states.count("downloading") == 1
    polls = [json.loads(line) for line in stdout.splitlines()]
    assert len(polls) >= 3 and all(p["state"] == "committed" and p["version"] == "single" for p in polls)
