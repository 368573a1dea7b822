"""`cvdeploy client predict` and `cvdeploy.client` against real servers on 127.0.0.1: API keys, a private CA, mutual TLS,
directories; and `cvdeploy predict --key-file` on a protected bundle. No mocks: real processes, certificates and keys."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvdeploy.client import AsyncClient, AuthenticationError, Client, ConnectionFailed, PermissionDenied, TlsError
from cvdeploy.errors import InputError
from cvdeploy.security.auth import AuthPolicy, KeyStore
from cvdeploy.security.tls import DevPki, make_dev_pki

MODEL = "yolo11n-shapes"
CLI = [sys.executable, "-m", "cvdeploy"]
SECRET_ENVS = ("CVDEPLOY_API_KEY", "CVDEPLOY_API_KEY_FILE", "CVDEPLOY_MODEL_KEY", "CVDEPLOY_MODEL_KEY_FILE",
               "CVDEPLOY_MODEL_KEY_COMMAND")


def _serve_helpers():
    # The server tests' helpers start a real uvicorn server; conftest files are not importable by
    # name (no packages, importlib mode), so load that one file as a module and reuse it unchanged.
    path = Path(__file__).resolve().parents[1] / "serve" / "conftest.py"
    spec = importlib.util.spec_from_file_location("cvdeploy_tests_serve_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_serve = _serve_helpers()


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, with no credential leaking in from the environment of the test run."""
    base = {k: v for k, v in os.environ.items() if k not in SECRET_ENVS}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**base, "COLUMNS": "200", **(env or {})})


def one_line_error(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    err = p.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    for n in needles:
        assert n in err, err
    return err


def write_private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def image(shapes_data: Path) -> Path:
    return sorted((shapes_data / "images" / "val").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A key store with a predictor and a viewer key, each in its own file, and a key the store never issued."""
    d = tmp_path_factory.mktemp("client-keys")
    store = KeyStore(d / "keys.db")
    predictor, viewer = store.create("alice", "predictor")[1], store.create("victor", "viewer")[1]
    forged = predictor.split(".", 1)[0] + ".not-the-secret"
    return {"store": store, "predictor": predictor, "viewer": viewer,
            "predictor_file": write_private(d / "predictor.key", predictor + "\n"),
            "viewer_file": write_private(d / "viewer.key", viewer + "\n"),
            "forged_file": write_private(d / "forged.key", forged + "\n")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("client-pki"))


@pytest.fixture(scope="module")
def auth_server(demo_bundle: Path, keys: dict) -> Iterator[object]:
    """Plain HTTP, API keys required (as `cvdeploy serve --auth-keys`)."""
    r = _serve.start_server([str(demo_bundle)], auth=AuthPolicy(keys["store"], rate_per_s=1000, burst=1000))
    yield r
    _serve.stop_server(r)


@pytest.fixture(scope="module")
def tls_server(demo_bundle: Path, pki: DevPki) -> Iterator[object]:
    """HTTPS with a certificate from a private CA, no client certificate asked."""
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key)}
    r = _serve.start_server([str(demo_bundle)], tls=tls, client_verify=ssl.create_default_context(cafile=str(pki.ca_cert)))
    yield r
    _serve.stop_server(r)


@pytest.fixture(scope="module")
def mtls_server(demo_bundle: Path, pki: DevPki, keys: dict) -> Iterator[object]:
    """Everything at once: mutual TLS with the private CA, and API keys."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "tls_client_ca": str(pki.ca_cert)}
    r = _serve.start_server([str(demo_bundle)], tls=tls, client_verify=ctx,
                            auth=AuthPolicy(keys["store"], rate_per_s=1000, burst=1000))
    yield r
    _serve.stop_server(r)


def _detections(p: subprocess.CompletedProcess[str]) -> list[list[dict]]:
    assert p.returncode == 0, p.stderr
    return [a["detections"] for a in json.loads(p.stdout)]


# -- API keys ----------------------------------------------------------------------------------------


def test_client_predict_sends_the_api_key_from_a_file_or_the_environment(auth_server, keys: dict, image: Path) -> None:
    url = auth_server.url
    with Client(url, api_key=keys["predictor"]) as c:
        expected = c.predict(MODEL, image)["detections"]
    by_file = run("client", "predict", url, image, "--json", "--api-key-file", keys["predictor_file"])
    assert _detections(by_file) == [expected]
    assert keys["predictor"] not in by_file.stdout + by_file.stderr  # the key is never echoed
    by_env = run("client", "predict", url, image, "--json", env={"CVDEPLOY_API_KEY": keys["predictor"]})
    assert _detections(by_env) == [expected]
    by_env_file = run("client", "predict", url, image, "--json", env={"CVDEPLOY_API_KEY_FILE": str(keys["predictor_file"])})
    assert _detections(by_env_file) == [expected]
    # --api-key-file wins over the environment's key
    both = run("client", "predict", url, image, "--json", "--api-key-file", keys["predictor_file"],
               env={"CVDEPLOY_API_KEY": keys["viewer"]})
    assert _detections(both) == [expected]


def test_client_predict_says_why_it_was_refused(auth_server, keys: dict, image: Path) -> None:
    url = auth_server.url
    one_line_error(run("client", "predict", url, image), "server answered 401", "no API key was sent", "--api-key-file",
                   "CVDEPLOY_API_KEY")
    one_line_error(run("client", "predict", url, image, "--api-key-file", keys["forged_file"]), "server answered 401",
                   "did not accept the API key")
    one_line_error(run("client", "predict", url, image, "--api-key-file", keys["viewer_file"]), "server answered 403",
                   "viewer may not do this", "role")
    # a key in clear on the command line is refused before anything is sent, and not repeated back
    err = one_line_error(run("client", "predict", url, image, "--api-key", keys["predictor"]), "--api-key-file", "CVDEPLOY_API_KEY")
    assert keys["predictor"] not in err


def test_bad_api_key_files_are_one_line_errors(auth_server, keys: dict, image: Path, tmp_path: Path) -> None:
    url = auth_server.url
    one_line_error(run("client", "predict", url, image, "--api-key-file", tmp_path / "nope.key"), "API key file not found")
    one_line_error(run("client", "predict", url, image, "--api-key-file", tmp_path), "cannot read the API key file")
    one_line_error(run("client", "predict", url, image, "--api-key-file", write_private(tmp_path / "empty", "\n")), "is empty")
    two = write_private(tmp_path / "two", f"key id 1234 for alice\n{keys['predictor']}\n")
    one_line_error(run("client", "predict", url, image, "--api-key-file", two), "must hold only the key")
    one_line_error(run("client", "predict", url, image, env={"CVDEPLOY_API_KEY_FILE": str(tmp_path / "gone")}),
                   "API key file not found")


def test_python_clients_take_keys_and_raise_typed_errors(auth_server, keys: dict, image: Path, monkeypatch) -> None:
    url = auth_server.url
    with Client(url, api_key_file=keys["predictor_file"]) as c:
        assert c.ready() and c.sends_credentials
        expected = c.predict(MODEL, image)["detections"]
    with Client(url, api_key_file=keys["viewer_file"]) as c:
        assert c.models()[0]["name"] == MODEL  # a viewer may read metadata, not predict
        with pytest.raises(PermissionDenied) as denied:
            c.predict(MODEL, image)
    assert denied.value.status == 403
    with pytest.raises(AuthenticationError) as unauth, Client(url) as c:
        c.ready()  # a readiness probe that only said "not ready" would hide the missing key
    assert unauth.value.status == 401 and "--api-key-file" in str(unauth.value)
    monkeypatch.setenv("CVDEPLOY_API_KEY", keys["predictor"])

    async def go() -> dict:
        async with AsyncClient(url) as ac:
            return await ac.predict(MODEL, image.read_bytes())

    assert asyncio.run(go())["detections"] == expected
    # an explicit header wins over the environment's key
    with Client(url, headers={"X-API-Key": keys["viewer"]}) as c, pytest.raises(PermissionDenied):
        c.predict(MODEL, image)
    with pytest.raises(InputError, match="not both"):
        Client(url, api_key=keys["predictor"], api_key_file=keys["predictor_file"])


# -- directories and several paths ---------------------------------------------------------------------


def test_client_predict_takes_directories_and_several_paths(auth_server, keys: dict, shapes_data: Path, tmp_path: Path) -> None:
    val = sorted((shapes_data / "images" / "val").glob("*.jpg"))
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    for f in val[:2]:
        shutil.copy(f, d / f.name)
    shutil.copy(val[2], d / "sub" / val[2].name)
    shutil.copy(val[3], d / "sub" / (val[0].stem + ".png"))  # same stem as a .jpg: the saved copies must not collide
    (d / "notes.txt").write_text("not an image")
    extra = val[4]
    key = ["--api-key-file", keys["predictor_file"]]
    expected_order = [*sorted(p for p in d.rglob("*") if p.suffix in (".jpg", ".png")), extra]

    p = run("client", "predict", auth_server.url, d, extra, "--json", "--save", tmp_path / "ann", *key)
    answers = json.loads(p.stdout)
    assert p.returncode == 0, p.stderr
    assert [a["source"] for a in answers] == [str(f) for f in expected_order]
    with Client(auth_server.url, api_key_file=keys["predictor_file"]) as c:
        assert [a["detections"] for a in answers] == [c.predict(MODEL, f)["detections"] for f in expected_order]
    assert f"5 of 5 image(s) predicted by {MODEL}" in p.stderr  # the summary; stdout holds only the JSON
    assert len(list((tmp_path / "ann").glob("*.jpg"))) == 5

    table = run("client", "predict", auth_server.url, d, extra, *key, env={"COLUMNS": "400"})  # long tmp paths stay whole
    assert table.returncode == 0, table.stderr
    assert all(str(f) in table.stdout for f in expected_order)
    assert table.stdout.strip().splitlines()[-1].startswith(f"5 of 5 image(s) predicted by {MODEL}, ")

    one_line_error(run("client", "predict", auth_server.url, d / "sub" / "missing.jpg", *key), "image not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run("client", "predict", auth_server.url, empty, *key), "no image files")


def test_a_bad_image_among_several_is_reported_and_the_rest_predicted(auth_server, keys: dict, image: Path,
                                                                     tmp_path: Path) -> None:
    d = tmp_path / "mixed"
    d.mkdir()
    shutil.copy(image, d / "a.jpg")
    (d / "b.jpg").write_bytes(b"this is no jpeg")
    p = run("client", "predict", auth_server.url, d, "--json", "--api-key-file", keys["predictor_file"])
    assert p.returncode == 1
    assert [a["source"] for a in json.loads(p.stdout)] == [str(d / "a.jpg")]
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: {d / 'b.jpg'}: server answered 4")
    assert lines[-1] == "error: 1 of 2 image(s) could not be predicted"


# -- TLS: a private CA, mutual TLS -------------------------------------------------------------------


def test_a_private_ca_needs_ca(tls_server, pki: DevPki, image: Path, tmp_path: Path) -> None:
    url = tls_server.url
    one_line_error(run("client", "predict", url, image), "TLS verification of", "if the server uses a private CA", "--ca")
    other = make_dev_pki(tmp_path / "other")
    one_line_error(run("client", "predict", url, image, "--ca", other.ca_cert), "TLS verification", "--ca")
    ok = run("client", "predict", url, image, "--json", "--ca", pki.ca_cert)
    with Client(url, ca=pki.ca_cert) as c:
        assert _detections(ok) == [c.predict(MODEL, image)["detections"]]
    one_line_error(run("client", "predict", url, image, "--ca", tmp_path / "none.pem"), "--ca", "not found")
    one_line_error(run("client", "predict", url, image, "--ca", pki.ca_key), "--ca", "no usable PEM certificate")
    with pytest.raises(TlsError, match="--ca"), Client(url) as c:
        c.ready()


def test_mutual_tls_and_an_api_key_together(mtls_server, pki: DevPki, keys: dict, image: Path, tmp_path: Path) -> None:
    url = mtls_server.url
    tls = ["--ca", pki.ca_cert, "--client-cert", pki.client_cert, "--client-key", pki.client_key]
    key = ["--api-key-file", keys["predictor_file"]]
    ok = run("client", "predict", url, image, "--json", *tls, *key)
    with Client(url, ca=pki.ca_cert, client_cert=pki.client_cert, client_key=pki.client_key,
                api_key_file=keys["predictor_file"]) as c:
        assert _detections(ok) == [c.predict(MODEL, image)["detections"]]

    one_line_error(run("client", "predict", url, image, "--ca", pki.ca_cert, *key), "requires a client certificate",
                   "--client-cert", "--client-key")
    other = make_dev_pki(tmp_path / "other")
    one_line_error(run("client", "predict", url, image, "--ca", pki.ca_cert, "--client-cert", other.client_cert,
                       "--client-key", other.client_key, *key), "refused our client certificate")
    one_line_error(run("client", "predict", url, image, *tls), "server answered 401", "--api-key-file")
    one_line_error(run("client", "predict", url, image, "--ca", pki.ca_cert, "--client-key", pki.client_key, *key),
                   "--client-key needs --client-cert")
    one_line_error(run("client", "predict", url, image, "--ca", pki.ca_cert, "--client-cert", pki.client_cert,
                       "--client-key", pki.server_key, *key), "cannot use the client certificate")

    async def go() -> dict:
        async with AsyncClient(url, ca=pki.ca_cert, client_cert=pki.client_cert, client_key=pki.client_key,
                               api_key_file=keys["predictor_file"]) as ac:
            return await ac.predict(MODEL, image)

    assert asyncio.run(go())["detections"] == _detections(ok)[0]
    with pytest.raises(TlsError, match="client certificate"), Client(url, ca=pki.ca_cert,
                                                                      api_key_file=keys["predictor_file"]) as c:
        c.predict(MODEL, image)


def test_wrong_scheme_and_nothing_listening(auth_server, tls_server, image: Path) -> None:
    one_line_error(run("client", "predict", auth_server.url.replace("http://", "https://"), image), "does not speak TLS",
                   "http://")
    one_line_error(run("client", "predict", tls_server.url.replace("https://", "http://"), image), "use https://")
    port = _serve.free_port()
    one_line_error(run("client", "predict", f"http://127.0.0.1:{port}", image), "connection refused", "cvdeploy serve")
    with pytest.raises(ConnectionFailed, match="connection refused"), Client(f"http://127.0.0.1:{port}", timeout=5) as c:
        c.ready()


# -- cvdeploy predict on a protected bundle ---------------------------------------------------------


@pytest.fixture(scope="module")
def protected(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("protected")
    made = run("security", "model-key", d / "model.key")
    assert made.returncode == 0, made.stderr
    p = run("protect", demo_bundle, "-o", d / "p.cvd", "--key-file", d / "model.key")
    assert p.returncode == 0, p.stderr
    return d / "p.cvd", d / "model.key"


def test_predict_key_file_opens_a_protected_bundle(demo_bundle: Path, protected: tuple[Path, Path], image: Path,
                                                   tmp_path: Path) -> None:
    bundle, key = protected

    def strip(p: subprocess.CompletedProcess[str]) -> list[dict]:
        assert p.returncode == 0, p.stderr
        return [{k: v for k, v in r.items() if k not in ("timings_ms", "source")} for r in json.loads(p.stdout)]

    plain = strip(run("predict", demo_bundle, image, "--json"))
    assert strip(run("predict", bundle, image, "--json", "--key-file", key)) == plain
    assert strip(run("predict", bundle, image, "--json", env={"CVDEPLOY_MODEL_KEY_FILE": str(key)})) == plain

    wrong = tmp_path / "wrong.key"
    assert run("security", "model-key", wrong).returncode == 0
    one_line_error(run("predict", bundle, image, "--key-file", wrong), "cannot be decrypted", "wrong key")
    one_line_error(run("predict", bundle, image, "--key-file", tmp_path / "nope.key"), "model key file not found")
    one_line_error(run("predict", bundle, image), "encrypted", "--key-file")
