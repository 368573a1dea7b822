"""What changed from one registered version of a model to the next: computed once, at register, and stored.

Compared: the source model's hash, the controlled data (its label hash and data.yaml), the class names, the variants
added and removed, every metric of every variant both versions have (and per class where both recorded a controlled
report), the input size and the rest of the preprocessing and postprocessing, the default variant and the cvdeploy
version that built the bundle. Each change is a dict (`what`, `before`, `after`, `text`); `text` is the line `show`
prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

Change = dict[str, Any]
# The order `show` lists a variant's metrics in (others after, by name): accuracy first, then speed.
METRIC_ORDER = ("map50_95", "map50", "map50_95_drop_points", "box_agreement", "latency_ms_b1", "speedup_vs_fp32")


def _short(digest: str | None) -> str:
    return "-" if not digest else digest[:12]


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _change(what: str, before: Any, after: Any, text: str) -> Change:
    return {"what": what, "before": before, "after": after, "text": text}


def _metric(what: str, label: str, before: Any, after: Any) -> Change | None:
    if before == after:
        return None
    if isinstance(before, int | float) and isinstance(after, int | float) and math.isfinite(before) and math.isfinite(after):
        return _change(what, before, after, f"{label}: {_num(before)} -> {_num(after)} ({after - before:+.4g})")
    shown = [("absent" if v is None else _num(v)) for v in (before, after)]
    return _change(what, before, after, f"{label}: {shown[0]} -> {shown[1]}")


def _names(before: Mapping[str, str], after: Mapping[str, str]) -> list[Change]:
    if dict(before) == dict(after):
        return []
    parts = []
    added = [after[k] for k in after if k not in before]
    removed = [before[k] for k in before if k not in after]
    renamed = [f"{k}: {before[k]!r} -> {after[k]!r}" for k in after if k in before and before[k] != after[k]]
    if added:
        parts.append("added " + ", ".join(map(repr, added)))
    if removed:
        parts.append("removed " + ", ".join(map(repr, removed)))
    if renamed:
        parts.append("renamed " + ", ".join(renamed))
    return [_change("names", dict(before), dict(after), f"classes ({len(before)} -> {len(after)}): " + "; ".join(parts))]


def _settings(section: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Change]:
    out = []
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        if b != a:
            label = "imgsz" if (section, key) == ("preprocess", "imgsz") else f"{section}.{key}"
            shown = [("x".join(map(str, v)) if key == "imgsz" and isinstance(v, list) else _num(v)) for v in (b, a)]
            out.append(_change(label, b, a, f"{label}: {shown[0]} -> {shown[1]}"))
    return out


def _data(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> list[Change]:
    if before is None and after is None:
        return []
    if before is None or after is None:
        what = "recorded" if before is None else "not recorded"
        data = after or before
        return [_change("data", before, after, f"controlled data: {what} this time ({data['yaml']}, labels "
                                                f"{_short(data['labels_sha256'])})")]
    out = []
    if before["labels_sha256"] != after["labels_sha256"]:
        counts = [sum(s["label_files"] for s in d["splits"].values()) for d in (before, after)]
        out.append(_change("data.labels_sha256", before["labels_sha256"], after["labels_sha256"],
                           f"data labels: {_short(before['labels_sha256'])} -> {_short(after['labels_sha256'])} "
                           f"({counts[0]} -> {counts[1]} label files)"))
    if before["yaml"] != after["yaml"]:
        out.append(_change("data.yaml", before["yaml"], after["yaml"], f"data.yaml: {before['yaml']} -> {after['yaml']}"))
    return out


def _class_metrics(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> list[Change]:
    if not before or not after:
        return []
    out = []
    for variant in (v for v in after if v in before):
        for cls in (c for c in after[variant] if c in before[variant]):
            c = _metric(f"class_metrics.{variant}.{cls}", f"{variant} class {cls!r} mAP50-95", before[variant][cls],
                        after[variant][cls])
            if c:
                out.append(c)
    return out


def compute(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> dict[str, Any]:
    """The changelog of `current` against `previous` (None for a model's first version).

    Each is a version record as the registry stores it: `number`, `manifest` (the manifest as JSON), `data` (the
    data lineage or None), `class_metrics` (variant -> class name -> mAP50-95, or None).
    """
    if previous is None:
        return {"previous": None, "changes": []}
    b, a = previous["manifest"], current["manifest"]
    changes: list[Change] = []
    if b["source"]["sha256"] != a["source"]["sha256"]:
        changes.append(_change("source.sha256", b["source"]["sha256"], a["source"]["sha256"],
                               f"source model: {b['source']['file']} {_short(b['source']['sha256'])} -> "
                               f"{a['source']['file']} {_short(a['source']['sha256'])}"))
    changes += _data(previous.get("data"), current.get("data"))
    if b["task"] != a["task"]:
        changes.append(_change("task", b["task"], a["task"], f"task: {b['task']} -> {a['task']}"))
    changes += _names(b["names"], a["names"])
    added = [v for v in a["variants"] if v not in b["variants"]]
    removed = [v for v in b["variants"] if v not in a["variants"]]
    if added or removed:
        text = "; ".join(p for p in (f"added {', '.join(added)}" if added else "", f"removed {', '.join(removed)}" if removed else "") if p)
        changes.append(_change("variants", sorted(b["variants"]), sorted(a["variants"]), f"variants: {text}"))
    if b["default_variant"] != a["default_variant"]:
        changes.append(_change("default_variant", b["default_variant"], a["default_variant"],
                               f"default variant: {b['default_variant']} -> {a['default_variant']}"))
    for v in (v for v in a["variants"] if v in b["variants"]):
        mb, ma = b["variants"][v].get("metrics", {}), a["variants"][v].get("metrics", {})
        for key in sorted(set(mb) | set(ma), key=lambda k: (METRIC_ORDER.index(k) if k in METRIC_ORDER else len(METRIC_ORDER), k)):
            if c := _metric(f"metrics.{v}.{key}", f"{v} {key}", mb.get(key), ma.get(key)):
                changes.append(c)
    changes += _class_metrics(previous.get("class_metrics"), current.get("class_metrics"))
    changes += _settings("preprocess", b["preprocess"], a["preprocess"])
    changes += _settings("postprocess", b.get("postprocess", {}), a.get("postprocess", {}))
    if b["cvdeploy_version"] != a["cvdeploy_version"]:
        changes.append(_change("cvdeploy_version", b["cvdeploy_version"], a["cvdeploy_version"],
                               f"built with cvdeploy {b['cvdeploy_version']} -> {a['cvdeploy_version']}"))
    return {"previous": previous["number"], "changes": changes}


def lines(changelog: Mapping[str, Any]) -> list[str]:
    """The changelog as the lines `show` prints."""
    if changelog["previous"] is None:
        return ["first version of this model"]
    if not changelog["changes"]:
        return [f"no change from version {changelog['previous']} in source, data, classes, variants, metrics, "
                "pre/postprocessing or cvdeploy version"]
    return [f"since version {changelog['previous']}:", *(f"  {c['text']}" for c in changelog["changes"])]
