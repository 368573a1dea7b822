"""MODEL_CARD.md: rendered from a real bundle's manifest (and a real controlled report), written without touching the
bundle's hashes or signature."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cvdeploy.bundle.bundle import Bundle
from cvdeploy.bundle.card import CARD_FILE, INTENDED_USE_MISSING, controlled_class_map, load_controlled, render_card, write_card
from cvdeploy.errors import InputError

SECTIONS = ["# Model card: yolo11n-shapes", "## Model details", "## Intended use", "## Classes", "## Training and evaluation data",
            "## Metrics", "### Per variant", "### Per class", "## Known limitations", "## Environment", "## Hashes"]


@pytest.fixture(scope="module")
def controlled(demo_bundle: Path, shapes_data: Path) -> dict[str, Any]:
    from cvdeploy.diagnose.controlled import controlled_report

    return controlled_report(demo_bundle, shapes_data / "data.yaml").to_dict()


def _table_rows(card: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header row starts with `header`."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_the_card_of_a_bundle_built_without_data(demo_bundle: Path) -> None:
    b = Bundle.load(demo_bundle)
    m = b.manifest
    card = render_card(b)
    positions = [card.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert INTENDED_USE_MISSING in card and m.content_sha256 in card
    assert _table_rows(card, "id") == [[str(i), n] for i, n in sorted(m.names.items())]
    assert "**Accuracy not measured on labelled data.**" in card and "**No drift baseline**" in card
    assert "No per-class figures" in card and "not signed" in card
    hashes = dict((r[0], r[1]) for r in _table_rows(card, "file"))
    assert hashes["manifest (content)"] == m.content_sha256 and hashes[f"source: {m.source.file}"] == m.source.sha256
    assert all(hashes[f"golden: {g.file}"] == g.sha256 for g in m.golden)
    assert hashes["onnx-fp32: variants/onnx-fp32.onnx"] == m.variants["onnx-fp32"].sha256
    (variant,) = _table_rows(card, "variant")
    assert variant[0] == "onnx-fp32 *" and variant[4] == "-"  # no mAP: said, not invented
    assert f"| Python | {m.environment['python']} |" in card


def test_intended_use_metrics_int8_and_refused_variants(demo_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "q.cvd"
    shutil.copytree(demo_bundle, copy)
    b = Bundle.load(copy)
    m = b.manifest
    shutil.copyfile(copy / "variants" / "onnx-fp32.onnx", copy / "variants" / "onnx-int8.onnx")
    int8 = m.variants["onnx-fp32"].model_copy(deep=True)
    int8.file, int8.precision = "variants/onnx-int8.onnx", "int8"
    int8.metrics = {"map50_95": 0.6475, "map50": 0.7737, "map50_95_drop_points": 0.4, "box_agreement": 1.0}
    int8.quantization = {"recipe": "u8s8-w8", "reduce_range": False, "note": "U8S8, full 8-bit weights", "calib_images": 64,
                         "head_in_float": True, "float_nodes": 112, "cpu": "Old Xeon", "cpu_flags": ["avx", "avx2", "fma"]}
    m.variants["onnx-int8"] = int8
    m.variants["onnx-fp32"].metrics.update({"map50_95": 0.6515, "map50": 0.7794})
    b.save_manifest()
    card = render_card(copy, intended_use="Count shapes on the assembly line.", refused={"openvino-int8": "mAP50-95 drops by 2.1 points"})
    assert "Count shapes on the assembly line." in card and INTENDED_USE_MISSING not in card
    rows = {r[0]: r for r in _table_rows(card, "variant")}
    assert rows["onnx-int8"][2] == "int8" and rows["onnx-int8"][4:7] == ["0.6475", "0.7737", "0.40"]
    assert "**openvino-int8 was not written**: mAP50-95 drops by 2.1 points." in card
    assert "**onnx-int8** loses 0.40 mAP50-95 points" in card
    int8_line = next(line for line in card.splitlines() if line.startswith("- **onnx-int8**: INT8 recipe u8s8-w8"))
    assert "need one of amx_int8, avx512_vnni, avx_vnni" in int8_line and "Old Xeon (no VNNI or AMX)" in int8_line
    assert "Accuracy not measured" not in card


def test_per_class_figures_from_a_real_controlled_report(demo_bundle: Path, controlled: dict[str, Any], tmp_path: Path) -> None:
    card = render_card(demo_bundle, controlled=controlled)
    rows = _table_rows(card, "class")
    per_class = controlled["source_scores"]["per_class"]
    assert [r[0] for r in rows] == list(per_class)
    for r in rows:
        s = per_class[r[0]]
        assert r[1] == str(s["labels"]) and r[2] == ("-" if s["map50_95"] is None else f"{s['map50_95']:.3f}")
    assert "No per-class figures" not in card
    worse = json.loads(json.dumps(controlled))  # the report as it reads when a variant loses on a class
    first = next(iter(per_class))
    worse["variants"]["onnx-int8"] = {"precision": "int8", "per_class": {first: {"map50_95": 0.5, "labels": 9}},
                                      "delta_points": {"per_class": {first: -2.5}, "per_bucket": {"small": -1.25}},
                                      "worst_classes": [first], "worst_buckets": ["small"]}
    card2 = render_card(demo_bundle, controlled=worse)
    assert f"- **onnx-int8** loses most, against onnx-fp32 on the controlled set, on: class '{first}' -2.5, small objects " \
           "-1.2 mAP50-95 points." in card2
    assert _table_rows(card2, "class")[0][3] == "0.500 (-2.5)"
    doctor_json = tmp_path / "doctor.json"  # what `cvdeploy doctor --data ... --json` writes
    doctor_json.write_text(json.dumps({"bundle": str(demo_bundle), "sections": {"controlled": controlled}}))
    assert load_controlled(doctor_json) == controlled
    assert render_card(demo_bundle, controlled=doctor_json) == card
    assert controlled_class_map(controlled)["onnx-fp32"] == {c: s["map50_95"] for c, s in per_class.items()}
    (tmp_path / "other.json").write_text('{"findings": []}')
    with pytest.raises(InputError, match="is not a controlled report"):
        load_controlled(tmp_path / "other.json")


def test_writing_the_card_keeps_hashes_and_signature(demo_bundle: Path, tmp_path: Path) -> None:
    from cvdeploy.bundle.signing import new_signing_key, sign_bundle

    copy = tmp_path / "s.cvd"
    shutil.copytree(demo_bundle, copy)
    private, public = new_signing_key(tmp_path / "k.pem")
    sign_bundle(copy, private)
    before = (copy / "manifest.json").read_bytes()
    path = write_card(copy)
    assert path == copy / CARD_FILE and oct(path.stat().st_mode & 0o777) == "0o644"
    assert (copy / "manifest.json").read_bytes() == before
    b = Bundle.load(copy, public_key=public)  # every hash and the signature still verify
    assert "signed (`signature.json`" in path.read_text() and b.signed_by


def test_cvdeploy_card(demo_bundle: Path, tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    run = [sys.executable, "-m", "cvdeploy", "card", str(demo_bundle)]
    p = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout == render_card(demo_bundle), p.stderr
    use = tmp_path / "use.md"
    use.write_text("For the [demo] only.\n")
    p = subprocess.run([*run, "-o", str(tmp_path / "c.md"), "--intended-use-file", str(use)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0 and "For the [demo] only." in (tmp_path / "c.md").read_text(), p.stderr
    p = subprocess.run([*run, "--controlled", str(tmp_path / "none.json")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and p.stderr.strip() == f"error: --controlled: {tmp_path / 'none.json'} not found"
