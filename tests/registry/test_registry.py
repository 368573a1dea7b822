"""The registry on a real SQLite file with real bundles: versions, copies and references, aliases, rollback, lineage,
changelog and the audit log every step goes through."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cvdeploy.bundle.bundle import Bundle
from cvdeploy.errors import BundleError, CvdeployError, InputError, NotFoundError
from cvdeploy.registry import Registry
from cvdeploy.registry.changelog import lines
from cvdeploy.registry.lineage import data_lineage, tree_sha256
from cvdeploy.security.audit import verify
from cvdeploy.security.protect import parse_key

MakeVersion = Callable[..., Path]  # the make_version fixture (conftest.py)


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    r = Registry(tmp_path / "reg" / "registry.db")
    yield r
    r.close()


def _audit_entries(reg: Registry) -> list[tuple[str, str, str, str]]:
    db = sqlite3.connect(reg.audit_path)
    try:
        return db.execute("SELECT action, outcome, principal, resource FROM entries ORDER BY seq").fetchall()
    finally:
        db.close()


def test_register_copies_the_bundle_so_deleting_the_build_does_not_break_it(reg: Registry, make_version: MakeVersion) -> None:
    src = make_version("a")
    v = reg.register(src, note="first")
    assert (v.model, v.version, v.stored, v.note) == ("yolo11n-shapes", 1, "copy", "first")
    assert v.path.parent == reg.store and v.path.name == f"{v.bundle_sha256}.cvd"
    assert v.bundle_sha256 == tree_sha256(src)
    manifest = json.loads((src / "manifest.json").read_text())
    assert v.manifest_sha256 == manifest["content_sha256"] and v.source["sha256"] == manifest["source"]["sha256"]
    assert v.manifest["environment"] == manifest["environment"] and v.changelog == {"previous": None, "changes": []}
    shutil.rmtree(src)
    path = reg.resolve("yolo11n-shapes", "latest")
    assert path == v.path and reg.resolve("yolo11n-shapes", 1) == reg.resolve("yolo11n-shapes", "v1") == path
    assert Bundle.load(path).manifest.content_sha256 == v.manifest_sha256  # the stored copy verifies
    assert [m.to_dict() for m in reg.models()] == [{"name": "yolo11n-shapes", "versions": 1, "latest": 1, "aliases": {},
                                                    "created_at": v.registered_at}]
    reg.close()
    moved = reg.root.parent / "moved"
    reg.root.rename(moved)  # copies are recorded relative to the registry directory: it moves as a whole
    with Registry(moved / "registry.db") as again:
        assert again.resolve("yolo11n-shapes", 1) == moved / "store" / f"{v.bundle_sha256}.cvd"


def test_a_reference_breaks_loudly_when_its_bundle_is_rebuilt_or_deleted(reg: Registry, make_version: MakeVersion) -> None:
    src = make_version("ref", conf=0.3)
    v = reg.register(src, copy=False, model="shapes")
    assert v.stored == "reference" and v.path == src.resolve() and reg.resolve("shapes", 1) == src.resolve()
    assert not reg.store.exists()
    b = Bundle.load(src)
    b.manifest.postprocess.conf = 0.5  # rebuilt in place: another bundle under the registered path
    b.save_manifest()
    with pytest.raises(BundleError, match="no longer the one registered as version 1 of 'shapes'"):
        reg.resolve("shapes", 1)
    shutil.rmtree(src)
    with pytest.raises(BundleError, match=r"stored by reference at .* which no longer holds a readable bundle"):
        reg.resolve("shapes", "latest")


def test_a_bundle_that_fails_its_hashes_is_refused_and_the_refusal_audited(reg: Registry, make_version: MakeVersion) -> None:
    reg.register(make_version("good"))
    bad = make_version("bad", conf=0.4)
    with (bad / "variants" / "onnx-fp32.onnx").open("r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="does not match its sha256"):
        reg.register(bad)
    assert [v.version for v in reg.versions("yolo11n-shapes")] == [1]
    assert _audit_entries(reg)[-1][:2] == ("registry.register", "refused")


def test_the_same_bundle_twice_is_refused(reg: Registry, make_version: MakeVersion) -> None:
    src = make_version("once")
    reg.register(src)
    with pytest.raises(InputError, match="already version 1 of 'yolo11n-shapes'"):
        reg.register(src)
    reg.register(src, model="other")  # another model may hold the same bundle, from the same stored copy
    assert reg.resolve("other", 1) == reg.resolve("yolo11n-shapes", 1)


def test_promote_and_rollback_walk_back_through_the_history(reg: Registry, make_version: MakeVersion) -> None:
    for i, conf in enumerate((0.2, 0.3, 0.4), 1):
        assert reg.register(make_version(f"v{i}", conf=conf)).version == i
    m = "yolo11n-shapes"
    assert reg.promote(m, "production", 1).previous is None
    c = reg.promote(m, "production", 2, by="alice", reason="better")
    assert (c.version, c.previous, c.changed, c.by) == (2, 1, True, "alice")
    assert reg.promote(m, "production", "v2").changed is False  # already there: nothing recorded
    reg.promote(m, "production", "latest")
    reg.promote(m, "staging", "production")  # to another alias's target
    assert reg.show(m, "staging").version == 3 and reg.show(m, "production").aliases == ("production", "staging")
    assert (reg.rollback(m, "production").version, reg.resolve(m, "production")) == (2, reg.resolve(m, 2))
    assert reg.rollback(m, "production").version == 1
    with pytest.raises(InputError, match="no earlier target to roll back to"):
        reg.rollback(m, "production")
    assert reg.show(m, "production").version == 1
    reg.promote(m, "production", 3)
    assert reg.rollback(m, "production").version == 1  # back to where it was before that promotion
    events = [(e.action, e.previous, e.version, e.undone) for e in reg.history(m, "production")]
    assert events == [("promote", None, 1, False), ("promote", 1, 2, True), ("promote", 2, 3, True), ("rollback", 3, 2, False),
                      ("rollback", 2, 1, False), ("promote", 1, 3, True), ("rollback", 3, 1, False)]
    assert reg.models()[0].aliases == {"production": 1, "staging": 3}


def test_unknown_names_and_bad_aliases_are_one_line_errors(reg: Registry, make_version: MakeVersion) -> None:
    with pytest.raises(NotFoundError, match="no registry at"):
        reg.show("yolo11n-shapes")
    assert not reg.root.exists()  # reading, or a refusal, creates nothing (reads are not audited: only changes are)
    reg.register(make_version("x"))
    m = "yolo11n-shapes"
    for call, pattern in [(lambda: reg.show("nope"), "unknown model 'nope' .* it has yolo11n-shapes"),
                          (lambda: reg.resolve(m, 7), r"unknown version 7 of model 'yolo11n-shapes' \(versions 1 to 1\)"),
                          (lambda: reg.resolve(m, "production"), "unknown alias 'production' .* it has no aliases"),
                          (lambda: reg.promote(m, "prod", 9), "unknown version 9"),
                          (lambda: reg.rollback(m, "prod"), "unknown alias 'prod'")]:
        with pytest.raises(NotFoundError, match=pattern):
            call()
    for alias in ("3", "v3", "latest", "-x", "a b"):
        with pytest.raises(InputError, match="is not valid"):
            reg.promote(m, alias, 1)
    with pytest.raises(InputError, match="model name"):
        reg.register(make_version("y", conf=0.5), model="bad name")
    refused = [e for e in _audit_entries(reg) if e[1] == "refused"]
    assert len(refused) == 2 + 5 + 1 and {e[0] for e in refused} == {"registry.promote", "registry.rollback", "registry.register"}


def test_changelog_says_what_changed_from_the_previous_version(reg: Registry, make_version: MakeVersion, shapes_data: Path,
                                                               tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(shapes_data, data)
    (data / "data.yaml").write_text((data / "data.yaml").read_text().replace(str(shapes_data), str(data)))
    first = reg.register(make_version("one", metrics={"onnx-fp32": {"map50_95": 0.60, "latency_ms_b1": 5.0}}), data=data / "data.yaml")
    assert first.data is not None and first.data["splits"]["val"]["images"] == 60
    label = sorted((data / "labels" / "val").glob("*.txt"))[0]
    label.write_text(label.read_text() + "0 0.5 0.5 0.1 0.1\n")

    def edit(m: Any) -> None:
        m.variants["onnx-fp32b"] = m.variants["onnx-fp32"].model_copy()
        m.preprocess.imgsz = (320, 320)
        m.cvdeploy_version = "9.9.9"

    second = reg.register(make_version("two", conf=0.4, names={0: "circle", 1: "box", 2: "triangle", 3: "star", 4: "hexagon",
                                                                   5: "cross", 6: "ring"},
                                       metrics={"onnx-fp32": {"map50_95": 0.65}}, edit=edit), data=data / "data.yaml")
    assert second.changelog["previous"] == 1
    changes = {c["what"]: c for c in second.changelog["changes"]}
    assert changes["data.labels_sha256"]["before"] == first.data["labels_sha256"] != changes["data.labels_sha256"]["after"]
    assert "added 'ring'" in changes["names"]["text"] and "renamed 1: 'square' -> 'box'" in changes["names"]["text"]
    assert changes["variants"]["text"] == "variants: added onnx-fp32b"
    assert changes["metrics.onnx-fp32.map50_95"]["text"] == "onnx-fp32 map50_95: 0.6 -> 0.65 (+0.05)"
    assert changes["metrics.onnx-fp32.latency_ms_b1"]["after"] is None  # recorded before, not now: said, not dropped
    assert changes["imgsz"]["text"].endswith("-> 320x320") and changes["postprocess.conf"]["after"] == 0.4
    assert changes["cvdeploy_version"]["after"] == "9.9.9" and "source.sha256" not in changes
    text = lines(reg.show("yolo11n-shapes", 2).changelog)
    assert text[0] == "since version 1:" and any("data labels" in line for line in text)
    same_but_source = make_version("three", conf=0.4, names={int(k): v for k, v in second.manifest["names"].items()},
                                   metrics={"onnx-fp32": {"map50_95": 0.65}},
                                   edit=lambda m: (edit(m), setattr(m.source, "sha256", "f" * 64)))
    third = reg.register(same_but_source, data=data / "data.yaml")
    assert [c["what"] for c in third.changelog["changes"]] == ["source.sha256"]


def test_data_lineage_hashes_labels_not_images_or_location(shapes_data: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(shapes_data, moved)
    (moved / "data.yaml").write_text((moved / "data.yaml").read_text().replace(str(shapes_data), str(moved)))
    a, b = data_lineage(shapes_data / "data.yaml"), data_lineage(moved / "data.yaml")
    assert a["labels_sha256"] == b["labels_sha256"] and a["yaml"] != b["yaml"]
    next(iter((moved / "labels" / "val").glob("*.txt"))).unlink()
    c = data_lineage(moved / "data.yaml")
    assert c["labels_sha256"] != a["labels_sha256"] and c["splits"]["val"]["label_files"] == a["splits"]["val"]["label_files"] - 1
    with pytest.raises(InputError, match="not found"):
        data_lineage(tmp_path / "none.yaml")


def test_every_step_is_in_the_audit_log_and_the_chain_verifies(reg: Registry, make_version: MakeVersion) -> None:
    reg.register(make_version("a"), by="ci-bot")
    reg.register(make_version("b", conf=0.3))
    reg.promote("yolo11n-shapes", "production", 2, reason="release")
    with pytest.raises(InputError):
        reg.rollback("yolo11n-shapes", "production")  # no earlier target yet: refused, and that is recorded too
    reg.promote("yolo11n-shapes", "production", 1)
    reg.rollback("yolo11n-shapes", "production", by="oncall", reason="p99")
    entries = _audit_entries(reg)
    assert [(a, o) for a, o, _, _ in entries] == [("registry.register", "success")] * 2 + [
        ("registry.promote", "success"), ("registry.rollback", "refused"), ("registry.promote", "success"),
        ("registry.rollback", "success")]
    assert entries[0][2] == "ci-bot" and entries[0][3] == "yolo11n-shapes/1" and entries[-1][2:] == ("oncall", "yolo11n-shapes@production")
    details = json.loads(sqlite3.connect(reg.audit_path).execute("SELECT details FROM entries WHERE seq = 6").fetchone()[0])
    assert details["version"] == 2 and details["previous"] == 1 and details["reason"] == "p99" and details["os_user"]
    v = verify(reg.audit_path, parse_key((reg.root / "audit.key").read_bytes()))
    assert v.ok and v.entries == 6, v.problems
    assert oct((reg.root / "audit.key").stat().st_mode & 0o777) == "0o600"


def test_a_step_that_cannot_be_audited_does_not_happen(tmp_path: Path, make_version: MakeVersion) -> None:
    loc = tmp_path / "r" / "registry.db"
    with Registry(loc) as reg:
        reg.register(make_version("a"))
    (tmp_path / "r" / "audit.key").write_bytes(bytes(range(32)))  # someone swapped the key: the chain no longer verifies
    with Registry(loc) as reg, pytest.raises(CvdeployError, match="fails verification"):
        reg.register(make_version("b", conf=0.3))
    with Registry(loc) as reg:
        assert [v.version for v in reg.versions("yolo11n-shapes")] == [1]
    (tmp_path / "r" / "audit.key").unlink()
    with Registry(loc) as reg, pytest.raises(InputError, match=r"exists but its key .* does not"):
        reg.promote("yolo11n-shapes", "production", 1)
    with Registry(loc) as reg:
        assert reg.models()[0].aliases == {}
