"""Protected bundles: identical results with the key, refused without it, after any tampering, or with swapped metadata;
obfuscation of every ONNX variant kind (fp32, fp16, int8) checked against the outputs before it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cvdeploy import Predictor
from cvdeploy.bundle.bundle import Bundle
from cvdeploy.errors import BundleError, InputError
from cvdeploy.security.protect import (
    check_obfuscation,
    load_key,
    new_key_file,
    obfuscate_onnx,
    parse_key,
    protect_bundle,
    variant_bytes,
)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return new_key_file(tmp_path_factory.mktemp("keys") / "model.key")


@pytest.fixture(scope="module")
def protected(demo_bundle: Path, key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return protect_bundle(demo_bundle, tmp_path_factory.mktemp("p") / "p.cvd", load_key(key_file), obfuscate=True)


def test_protected_bundle_predicts_exactly_like_the_plain_one(demo_bundle: Path, protected: Path, key_file: Path,
                                                              shapes_data: Path) -> None:
    images = sorted((shapes_data / "images" / "val").glob("*.jpg"))[:5]
    plain = Predictor(demo_bundle)
    locked = Predictor(protected, model_key=load_key(key_file))
    for img in images:
        a, b = plain.predict(img), locked.predict(img)
        np.testing.assert_allclose(a.detections.xyxy, b.detections.xyxy, atol=1e-3)
        assert a.detections.class_id.tolist() == b.detections.class_id.tolist()
    x, _ = plain.preprocess([np.full((200, 300, 3), 90, np.uint8)])
    np.testing.assert_allclose(plain.infer(x), locked.infer(x), atol=1e-5)  # obfuscation changes no output
    assert not any(p.suffix == ".onnx" for p in (protected / "variants").iterdir())  # no plaintext model on disk
    assert b"/model." not in (protected / "variants" / "onnx-fp32.onnx.enc").read_bytes()


def test_wrong_key_tampering_and_swapped_metadata_fail_closed(protected: Path, key_file: Path, tmp_path: Path) -> None:
    import shutil

    with pytest.raises(BundleError, match="cannot be decrypted"):
        Predictor(protected, model_key=b"\x01" * 32)
    with pytest.raises(InputError, match="encrypted"):
        Predictor(protected)  # no key anywhere
    copy = tmp_path / "c.cvd"
    shutil.copytree(protected, copy)
    f = copy / "variants" / "onnx-fp32.onnx.enc"
    data = bytearray(f.read_bytes())
    data[1000] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        Bundle.load(copy)
    m = json.loads((copy / "manifest.json").read_text())  # an attacker who also fixes the hash is caught by GCM
    from cvdeploy.bundle.bundle import manifest_content_hash, sha256_file

    m["variants"]["onnx-fp32"]["sha256"] = sha256_file(f)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="was edited after it was written"):  # a hand edit of the manifest is seen
        Predictor(copy, model_key=load_key(key_file))
    m["content_sha256"] = manifest_content_hash(m)  # and one who re-computes the manifest's own hash too
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="cannot be decrypted"):
        Predictor(copy, model_key=load_key(key_file))
    shutil.copyfile(protected / "variants" / "onnx-fp32.onnx.enc", f)
    m = json.loads((protected / "manifest.json").read_text())
    m["name"] = "another-model"  # the file bound to one bundle name does not open under another
    m["content_sha256"] = manifest_content_hash(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="cannot be decrypted"):
        Predictor(copy, model_key=load_key(key_file))


def test_obfuscation_leaves_no_original_name(demo_bundle: Path) -> None:
    import onnx

    src = (demo_bundle / "variants" / "onnx-fp32.onnx").read_bytes()
    m = onnx.load_from_string(obfuscate_onnx(src, seed=0))
    original = onnx.load_from_string(src)
    old_names = {n.name for n in original.graph.node} | {i.name for i in original.graph.initializer}
    new_names = {n.name for n in m.graph.node} | {i.name for i in m.graph.initializer} | {t for n in m.graph.node for t in n.output}
    assert not (old_names - {"images", "output0"}) & new_names
    assert m.producer_name == "" and all(n.doc_string == "" for n in m.graph.node)
    assert sum(n.op_type == "Identity" for n in m.graph.node) > sum(n.op_type == "Identity" for n in original.graph.node)


def test_keys_and_the_commands(demo_bundle: Path, key_file: Path, tmp_path: Path, shapes_data: Path) -> None:
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(load_key(key_file)) == 32
    assert parse_key(b"\x02" * 32) == b"\x02" * 32 and parse_key(("ab" * 32).encode()) == bytes.fromhex("ab" * 32)
    with pytest.raises(InputError, match="32 bytes"):
        parse_key("short")
    cli = [sys.executable, "-m", "cvdeploy"]
    out = tmp_path / "cli.cvd"
    p = subprocess.run([*cli, "protect", str(demo_bundle), "-o", str(out), "--key-file", str(key_file)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    image = str(next((shapes_data / "images" / "val").glob("*.jpg")))
    env = {**__import__("os").environ, "CVDEPLOY_MODEL_KEY_FILE": str(key_file)}
    ok = subprocess.run([*cli, "predict", str(out), image, "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr
    ref = subprocess.run([*cli, "predict", str(demo_bundle), image, "--json"], capture_output=True, text=True, timeout=300)
    strip = lambda s: [{k: v for k, v in r.items() if k not in ("timings_ms", "source")} for r in json.loads(s)]  # noqa: E731
    assert strip(ok.stdout) == strip(ref.stdout)
    no_key = subprocess.run([*cli, "predict", str(out), image], capture_output=True, text=True, timeout=300)
    assert no_key.returncode == 1 and no_key.stderr.startswith("error:") and "encrypted" in no_key.stderr


def test_verify_checks_a_protected_bundle_with_its_key(protected: Path, key_file: Path) -> None:
    from cvdeploy.evaluate.verify import verify_bundle

    checks = verify_bundle(protected, model_key=load_key(key_file))
    assert [c.name for c in checks] == ["onnx-fp32"] and all(c.ok for c in checks)  # obfuscated, yet the same outputs
    with pytest.raises(BundleError, match="cannot be decrypted"):
        verify_bundle(protected, model_key=b"\x07" * 32)
    p = subprocess.run([sys.executable, "-m", "cvdeploy", "verify", str(protected), "--key-file", str(key_file)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


# -- obfuscation of every variant kind ------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_bundle(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    from cvdeploy.build.variants import add_variants

    b = tmp_path_factory.mktemp("fp16") / "fp16.cvd"
    shutil.copytree(demo_bundle, b)
    (fp16,) = [o for o in add_variants(b, ["onnx-fp16"]) if o.name == "onnx-fp16"]
    assert fp16.written, fp16.reason
    return b


def test_obfuscated_fp16_variant_loads_and_gives_the_same_outputs(fp16_bundle: Path, key_file: Path, tmp_path: Path) -> None:
    import onnx

    key = load_key(key_file)
    locked = protect_bundle(fp16_bundle, tmp_path / "fp16-locked.cvd", key, obfuscate=True)
    b = Bundle.load(locked)
    assert set(b.manifest.variants) == {"onnx-fp32", "onnx-fp16"}
    for name, v in b.manifest.variants.items():
        assert v.encryption["obfuscated"] is True and v.encryption["obfuscation_max_abs_diff"] <= 1e-4, name
        plain, obfuscated = Predictor(fp16_bundle, name), Predictor(locked, name, model_key=key)
        for g in plain.bundle.golden():
            np.testing.assert_allclose(obfuscated.infer(g.input), plain.infer(g.input), rtol=1e-5, atol=1e-5, err_msg=name)
    original = onnx.load(str(fp16_bundle / "variants" / "onnx-fp16.onnx"))
    main, _ = variant_bytes(b, "onnx-fp16", key)
    graph = onnx.load_from_string(main).graph
    assert not {n.name for n in original.graph.node} & {n.name for n in graph.node}
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["output0"]


def test_protect_obfuscate_command_on_an_fp16_bundle(fp16_bundle: Path, key_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-fp16.cvd"  # the reported crash: a traceback "Nodes in a graph must be topologically sorted"
    p = subprocess.run([sys.executable, "-m", "cvdeploy", "protect", str(fp16_bundle), "-o", str(out), "--key-file", str(key_file),
                        "--obfuscate"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "obfuscated: onnx-fp32, onnx-fp16" in p.stdout


def test_obfuscation_keeps_an_int8_variant_exact(demo_bundle: Path, tmp_path: Path) -> None:
    import onnx

    from cvdeploy.build.quantize import int8_recipe, quantize_int8

    b = Bundle.load(demo_bundle)
    int8 = tmp_path / "int8.onnx"
    quantize_int8(b.variant_path("onnx-fp32"), int8, [g.input[:1] for g in b.golden()], int8_recipe("u8s8-w7"))
    data = int8.read_bytes()
    obfuscated = obfuscate_onnx(data, seed=3)
    assert check_obfuscation(b, "onnx-int8", data, obfuscated) <= 1e-4
    g = onnx.load_from_string(obfuscated).graph
    producer = {o: n for n in g.node for o in n.output}
    qdq = {"QuantizeLinear", "DequantizeLinear"}
    identities = [n for n in g.node if n.op_type == "Identity"]
    assert identities  # inert nodes were added, none between a Q/DQ node and its neighbours (ONNX Runtime fuses those)
    for n in identities:
        assert producer[n.input[0]].op_type not in qdq
        assert not any(c.op_type in qdq for c in g.node if n.output[0] in c.input)


def test_obfuscation_sorts_an_unsorted_graph_and_keeps_if_bodies() -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    # Out of order on purpose (ONNX Runtime runs it, the ONNX checker does not accept it), with an If whose branches
    # read a tensor of the outer graph.
    then = helper.make_graph([helper.make_node("Identity", ["doubled"], ["then_out"])], "then", [],
                             [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["doubled"], ["else_out"])], "else", [],
                              [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="/secret/If"),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0, name="/secret/Sum"),
        helper.make_node("Greater", ["total", "zero"], ["cond"], name="/secret/Greater"),
        helper.make_node("Add", ["x", "x"], ["doubled"], name="/secret/Add"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = model.SerializeToString()
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)
    out = obfuscate_onnx(data, seed=0)  # checked inside
    assert "secret" not in str(onnx.load_from_string(out))
    run = lambda d, x: ort.InferenceSession(d, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    for x in (np.array([1.0, 2.0], np.float32), np.array([-3.0, 1.0], np.float32)):
        np.testing.assert_array_equal(run(out, x), run(data, x))


def test_a_changed_model_fails_the_obfuscation_check(fp16_bundle: Path) -> None:
    b = Bundle.load(fp16_bundle)
    fp32, fp16 = (b.variant_path(v).read_bytes() for v in ("onnx-fp32", "onnx-fp16"))
    with pytest.raises(BundleError, match="obfuscating variant 'onnx-fp32' changed output 'output0'"):
        check_obfuscation(b, "onnx-fp32", fp32, fp16)  # fp16 rounding is far more than obfuscation may change


def test_openvino_variants_are_encrypted_not_obfuscated(demo_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from cvdeploy.bundle.bundle import sha256_file
    from cvdeploy.bundle.manifest import Variant

    # The bytes of an OpenVINO IR are only carried: protect encrypts them without opening them.
    b_dir = tmp_path / "ov.cvd"
    shutil.copytree(demo_bundle, b_dir)
    ov = b_dir / "variants" / "openvino-fp32"
    ov.mkdir()
    (ov / "model.xml").write_bytes(b"<net name='secret'/>")
    (ov / "model.bin").write_bytes(b"\x00weights")
    b = Bundle.load(b_dir)
    b.manifest.variants["openvino-fp32"] = Variant(
        file="variants/openvino-fp32/model.xml", format="openvino", engine="openvino", sha256=sha256_file(ov / "model.xml"),
        size_bytes=30, companions={"variants/openvino-fp32/model.bin": sha256_file(ov / "model.bin")})
    b.save_manifest()
    key = b"\x09" * 32
    locked = Bundle.load(protect_bundle(b_dir, tmp_path / "ov-locked.cvd", key, obfuscate=True))
    assert locked.manifest.variants["onnx-fp32"].encryption["obfuscated"] is True
    assert locked.manifest.variants["openvino-fp32"].encryption["obfuscated"] is False  # recorded as it is
    main, extra = variant_bytes(locked, "openvino-fp32", key)
    assert main == b"<net name='secret'/>" and extra == {"variants/openvino-fp32/model.bin": b"\x00weights"}
