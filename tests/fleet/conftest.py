"""A real fleet for the fleet tests: signed bundle versions made from the demo bundle, an update server process on
127.0.0.1 (`cvdeploy fleet serve`), device agents as processes (`cvdeploy fleet agent --once`), and a TCP proxy that
cuts a download once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cvdeploy.bundle.bundle import Bundle, read_golden, sha256_file, write_golden
from cvdeploy.bundle.signing import new_signing_key, sign_bundle
from cvdeploy.fleet.publish import FleetRoot

FLEET_SIZE = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: Any, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cvdeploy", *map(str, args)], capture_output=True, text=True, timeout=timeout)


# -- bundle versions ----------------------------------------------------------------------------------


def _rewrite_variant(bundle: Path, variant: str, edit: Any) -> None:
    """Load the variant's ONNX model, apply `edit(model)`, save it, and record its new sha256 and size."""
    import onnx

    b = Bundle.load(bundle)
    path = bundle / b.manifest.variants[variant].file
    model = onnx.load(str(path))
    edit(model)
    onnx.save(model, str(path))
    v = b.manifest.variants[variant]
    v.sha256, v.size_bytes = sha256_file(path), path.stat().st_size
    b.save_manifest()


def retag(bundle: Path, variant: str, tag: str) -> None:
    """A new build of `variant` that computes exactly the same (another metadata value): new bytes, same outputs."""
    def edit(model: Any) -> None:
        entry = model.metadata_props.add()
        entry.key, entry.value = "fleet_build", tag

    _rewrite_variant(bundle, variant, edit)


def scale_class_scores(bundle: Path, variant: str, factor: float) -> None:
    """A worse model: the class scores of output0 (channels 4..) multiplied by `factor` (a Mul appended to the graph)."""
    import onnx
    from onnx import helper, numpy_helper

    def edit(model: Any) -> None:
        g = model.graph
        out = g.output[0].name
        for node in g.node:
            node.output[:] = [f"{out}_raw" if o == out else o for o in node.output]
        channels = 4 + len(Bundle.load(bundle, check_hashes=False).names)
        scale = np.ones((1, channels, 1), np.float32)
        scale[0, 4:, 0] = factor
        g.initializer.append(numpy_helper.from_array(scale, "fleet_score_scale"))
        g.node.append(helper.make_node("Mul", [f"{out}_raw", "fleet_score_scale"], [out], name="fleet_score_scale_mul"))
        onnx.checker.check_model(model)

    _rewrite_variant(bundle, variant, edit)


def regenerate_golden(bundle: Path, variant: str) -> None:
    """Make the golden outputs those of `variant` as it is now (a self-consistent bundle: its parity holds)."""
    import onnxruntime as ort

    b = Bundle.load(bundle, check_hashes=False)
    session = ort.InferenceSession(str(bundle / b.manifest.variants[variant].file), providers=["CPUExecutionProvider"])
    for case in b.manifest.golden:
        inputs, _ = read_golden(bundle / case.file)
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {session.get_inputs()[0].name: inputs}),
                           strict=True))
        write_golden(bundle / case.file, inputs, outputs)
        case.sha256 = sha256_file(bundle / case.file)
    b.save_manifest()


def make_version(base: Path, out: Path, key: Path, *changes: Any) -> Path:
    """A copy of `base` with `changes` (callables taking the bundle path) applied, signed with `key`."""
    shutil.copytree(base, out)
    (out / "signature.json").unlink(missing_ok=True)
    for change in changes:
        change(out)
    sign_bundle(out, key)
    return out


@dataclass
class Publisher:
    private: Path
    public: Path


@dataclass
class Versions:
    v1: Path  # two variants (onnx-fp32, onnx-fp16)
    v2: Path  # v1 with onnx-fp16 rebuilt (other bytes, same outputs): a delta of one file
    bad: Path  # v1 with onnx-fp32 changed and the golden outputs left as they were: golden parity fails on devices
    tamper_file: Path  # v1 with onnx-fp16 rebuilt again: its file is altered on the server
    tamper_sig: Path  # v1 with onnx-fp16 rebuilt again: its manifest is altered on the server
    single: Path  # the demo bundle, signed: the base of the canary and resume tests
    regressed: Path  # `single` with weaker class scores, golden outputs regenerated: parity holds, the canary must not


@pytest.fixture(scope="module")
def publisher(tmp_path_factory: pytest.TempPathFactory) -> Publisher:
    return Publisher(*new_signing_key(tmp_path_factory.mktemp("publisher") / "release.pem"))


@pytest.fixture(scope="module")
def versions(demo_bundle: Path, publisher: Publisher, tmp_path_factory: pytest.TempPathFactory) -> Versions:
    from cvdeploy.build.variants import add_variants

    d = tmp_path_factory.mktemp("versions")
    base = d / "base.cvd"
    shutil.copytree(demo_bundle, base)
    # Injected latencies: the build's interleaved timing is not what these tests are about.
    add_variants(base, ["onnx-fp16"], timer=lambda label, call: 12.0 if "fp16" in label else 10.0)
    key = publisher.private
    return Versions(
        v1=make_version(base, d / "v1.cvd", key),
        v2=make_version(base, d / "v2.cvd", key, lambda b: retag(b, "onnx-fp16", "v2")),
        bad=make_version(base, d / "bad.cvd", key, lambda b: scale_class_scores(b, "onnx-fp32", 0.5)),
        tamper_file=make_version(base, d / "tf.cvd", key, lambda b: retag(b, "onnx-fp16", "tamper-file")),
        tamper_sig=make_version(base, d / "ts.cvd", key, lambda b: retag(b, "onnx-fp16", "tamper-signature")),
        single=make_version(demo_bundle, d / "single.cvd", key),
        regressed=make_version(demo_bundle, d / "regressed.cvd", key, lambda b: scale_class_scores(b, "onnx-fp32", 0.3),
                               lambda b: regenerate_golden(b, "onnx-fp32")),
    )


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The devices' local images for the canary."""
    from cvdeploy.demo.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("samples"), n_train=0, n_val=12, seed=11).parent / "images" / "val"


# -- the update server ----------------------------------------------------------------------------------


@dataclass
class Server:
    root: Path
    url: str
    token_file: Path
    process: subprocess.Popen[str]

    def publish(self, bundle: Path, key: Path, channel: str = "stable", version: str | None = None) -> dict[str, Any]:
        """What `cvdeploy fleet publish` does (the command itself is run by the server fixture and the refusal tests),
        in this process: the running server reads the directory at each request."""
        return FleetRoot(self.root).publish(bundle, key, channel=channel, version=version).model_dump()

    def downloads(self) -> list[dict[str, Any]]:
        log = self.root / "log" / "downloads.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []

    def reports(self) -> dict[str, dict[str, Any]]:
        """Each device's last report, as the server answers GET /v1/devices (`fleet status --server` reads the same)."""
        token = self.token_file.read_text().strip()
        r = httpx.get(f"{self.url}/v1/devices", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200, r.text
        return {d["device"]: d for d in r.json()}


def start_server(root: Path, *extra: Any, scheme: str = "http", ca: Path | None = None) -> Server:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "cvdeploy", "fleet", "serve", "--root", str(root), "--port", str(port),
                                *map(str, extra)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"{scheme}://127.0.0.1:{port}"
    verify: Any = ssl.create_default_context(cafile=str(ca)) if ca is not None else True
    for _ in range(300):
        if process.poll() is not None:
            raise AssertionError(f"the update server exited: {process.stdout.read() if process.stdout else ''}")
        try:
            if httpx.get(f"{url}/v1/health", verify=verify, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    else:
        process.kill()
        raise AssertionError("the update server did not start")
    return Server(root, url, root / "fleet.token", process)


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, versions: Versions, publisher: Publisher) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("update-server")
    # The first publish pins the key; the server makes the fleet token at its first start.
    p = cli("fleet", "publish", versions.v1, "--root", root, "--key", publisher.public, "--json")
    assert p.returncode == 0, p.stderr
    channel = json.loads(p.stdout)  # --json: the channel document alone on stdout
    manifest = (versions.v1 / "manifest.json").read_bytes()
    assert channel["manifest_sha256"] == hashlib.sha256(manifest).hexdigest(), channel
    shas = {f["sha256"] for f in channel["files"]}
    assert {hashlib.sha256((versions.v1 / "variants" / f).read_bytes()).hexdigest() for f in ("onnx-fp32.onnx", "onnx-fp16.onnx")} <= shas
    s = start_server(root)
    yield s
    stop(s.process)


# -- devices --------------------------------------------------------------------------------------


@dataclass
class Devices:
    dirs: list[Path]
    public_key: Path
    samples: Path

    def agent_args(self, i: int, server_url: str, token_file: Path, channel: str = "stable", *extra: Any) -> list[str]:
        return [sys.executable, "-m", "cvdeploy", "fleet", "agent", "--once", "--json", "--device-dir", str(self.dirs[i]),
                "--device-id", self.dirs[i].name, "--server", server_url, "--token-file", str(token_file),
                "--public-key", str(self.public_key), "--samples", str(self.samples), "--channel", channel,
                *map(str, extra)]


def start_agents(devices: Devices, server: Server, which: Sequence[int], channel: str = "stable", *extra: Any,
                 url: str | None = None) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen(devices.agent_args(i, url or server.url, server.token_file, channel, *extra), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in which]


def finish(processes: Sequence[subprocess.Popen[str]]) -> list[tuple[int, dict[str, Any], str]]:
    """(exit code, the final report, stderr) of each agent process."""
    out = []
    for p in processes:
        stdout, stderr = p.communicate(timeout=180)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        assert lines, f"agent printed no report (exit {p.returncode}): {stderr}"
        out.append((p.returncode, json.loads(lines[-1]), stderr))
    return out


def run_agents(devices: Devices, server: Server, which: Sequence[int], channel: str = "stable", *extra: Any,
               url: str | None = None) -> list[tuple[int, dict[str, Any], str]]:
    return finish(start_agents(devices, server, which, channel, *extra, url=url))


def make_devices(root: Path, names: Sequence[str], publisher: Publisher, samples: Path) -> Devices:
    key = root / "publisher.pub"  # what a device is given at provisioning: the public key only
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(publisher.public, key)
    return Devices([root / n for n in names], key, samples)


@pytest.fixture(scope="module")
def fleet(server: Server, publisher: Publisher, samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Devices:
    """FLEET_SIZE devices with the first published version committed: the first installed by its agent, the others
    provisioned from a copy of its directory (a device image), then polled once, as they would at first boot."""
    devices = make_devices(tmp_path_factory.mktemp("fleet"), [f"device-{i}" for i in range(FLEET_SIZE)], publisher, samples)
    (code, report, stderr), = run_agents(devices, server, [0])
    assert code == 0 and report["state"] == "committed", stderr
    for d in devices.dirs[1:]:
        shutil.copytree(devices.dirs[0], d, symlinks=True)  # the pointer is a relative link: it points into the copy
    for code, report, stderr in run_agents(devices, server, range(1, FLEET_SIZE)):
        assert code == 0 and report["state"] == "committed" and report["bytes_downloaded"] == 0, stderr
    return devices


# -- a TCP proxy that cuts a download ------------------------------------------------------------------


class CuttingProxy:
    """Forwards 127.0.0.1:port to the server; for each of the next requests whose first bytes contain `target`, it cuts the
    connection after forwarding `cuts[i]` bytes of the answer (headers included): a network failure mid-file."""

    def __init__(self, upstream_port: int, target: bytes, cuts: Sequence[int]) -> None:
        self.upstream_port, self.target, self.cuts = upstream_port, target, list(cuts)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = 0  # connections cut so far
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            limit: list[int | None] = [None]  # bytes of the answer still allowed through; None: no cut armed
            threading.Thread(target=self._requests, args=(client, upstream, limit), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client, limit), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, limit: list[int | None]) -> None:
        try:
            while data := client.recv(65536):
                with self._lock:
                    if self.target in data and self.cuts:
                        limit[0] = self.cuts.pop(0)  # armed before the request reaches the server
                upstream.sendall(data)
        except OSError:
            pass
        _close(client, upstream)

    def _answers(self, upstream: socket.socket, client: socket.socket, limit: list[int | None]) -> None:
        try:
            while data := upstream.recv(65536):
                left = limit[0]
                if left is not None and len(data) >= left:
                    client.sendall(data[:left])
                    with self._lock:
                        self.cut += 1
                    break
                if left is not None:
                    limit[0] = left - len(data)
                client.sendall(data)
        except OSError:
            pass
        _close(client, upstream)

    def close(self) -> None:
        self.listener.close()


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()
