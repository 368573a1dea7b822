"""MODEL_CARD.md: a bundle described for people (intended use, classes, data, metrics, limitations, environment,
hashes), rendered from its manifest and, when given, a controlled report.

Everything in the card comes from the manifest (or the report): what the manifest does not record is said to be
missing, never guessed. The card is not listed in the manifest and not hashed there: it is derived from the manifest
(whose content hash it quotes, so a reader can tell which manifest it describes) and is rewritten whenever the
manifest changes, which a hash in the manifest would forbid. `cvdeploy card BUNDLE` renders it again at any time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cvdeploy.bundle.bundle import Bundle, is_private
from cvdeploy.bundle.environment import VNNI_FLAGS
from cvdeploy.bundle.manifest import Manifest, Variant
from cvdeploy.errors import InputError

CARD_FILE = "MODEL_CARD.md"
INTENDED_USE_MISSING = ("**Not stated.** Whoever deploys this model must fill this in before it serves anyone: what it "
                        "is for, for whom, on which images (cameras, scenes, conditions), and what it must not be used "
                        "for. Render the card again with `cvdeploy card BUNDLE --intended-use TEXT`.")


# -- controlled reports ----------------------------------------------------------------------------


def load_controlled(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A controlled report from a JSON file: `ControlledReport.to_dict()` or a doctor report (`cvdeploy doctor --data
    ... --json FILE`), whose `sections.controlled` holds one."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"controlled report {p}: not a readable JSON file ({e})") from None
    if isinstance(doc, dict) and isinstance(doc.get("sections"), dict) and "controlled" in doc["sections"]:
        doc = doc["sections"]["controlled"]
    if not isinstance(doc, dict) or not {"source", "source_scores", "variants"} <= set(doc):
        raise InputError(f"{p} is not a controlled report: give the JSON of `cvdeploy doctor BUNDLE --data DATA.yaml --json "
                         "FILE` (its controlled section) or of ControlledReport.to_dict()")
    return doc


def controlled_class_map(report: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """mAP50-95 per class of the source and every variant a controlled report scored: {model: {class name: mAP}}."""
    out = {str(report["source"]): {c: s.get("map50_95") for c, s in report["source_scores"].get("per_class", {}).items()}}
    for name, v in report["variants"].items():
        out[name] = {c: s.get("map50_95") for c, s in v.get("per_class", {}).items()}
    return out


# -- rendering -------------------------------------------------------------------------------------


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    aligns = [("---:" if a == "r" else "---") for a in (align or "l" * len(header)).ljust(len(header), "l")]
    return ["| " + " | ".join(map(_cell, header)) + " |", "| " + " | ".join(aligns) + " |",
            *("| " + " | ".join(map(_cell, r)) + " |" for r in rows), ""]


def _f(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _details(m: Manifest) -> list[str]:
    pre, post = m.preprocess, m.postprocess
    padding = "minimal padding (rectangular) when a batch allows it" if pre.rect else "square padding"
    variants = ", ".join(f"{n} (default)" if n == m.default_variant else n for n in m.variants)
    src = m.source
    rows = [
        ("name", m.name), ("task", m.task), ("classes", len(m.names)),
        ("input", f"{pre.channel_order} images decoded as OpenCV's imread does (EXIF orientation applied, alpha dropped), "
                  f"letterboxed to {pre.imgsz[0]}x{pre.imgsz[1]} (height x width; stride {pre.stride}, pad value "
                  f"{pre.pad_value}, {padding}), divided by {pre.scale:g}"),
        ("postprocessing", f"confidence >= {post.conf:g}, NMS IoU {post.iou:g}, at most {post.max_det} detections"
                           + (" (NMS inside the graph)" if post.end2end else "")),
        ("variants", variants),
        ("source model", f"{src.file} ({src.format}, sha256 `{src.sha256}`)" + (f", exported by {src.exporter}" if src.exporter else "")),
        ("built", f"{m.created_at} with cvdeploy {m.cvdeploy_version}"),
    ]
    return ["## Model details", "", *_table(("", ""), rows)]


def _data(m: Manifest, controlled: Mapping[str, Any] | None) -> list[str]:
    src = m.source
    out = ["## Training and evaluation data", "",
           f"- **Training data**: not recorded in the bundle. cvdeploy records what a bundle was built from, the "
           f"trained checkpoint `{src.file}` (sha256 `{src.sha256[:16]}…`), not how that checkpoint was trained: "
           "describe the training set here or in the registry's notes."]
    has_map = any("map50_95" in v.metrics for v in m.variants.values())
    if m.profile is not None:
        out.append(f"- **Controlled set** (the labelled set every variant's mAP was measured on): {m.profile.source or 'recorded'}; "
                   f"its {m.profile.images} images are the drift baseline (`{m.profile.file}`).")
    elif has_map:
        out.append("- **Controlled set**: mAP was measured on a labelled set the manifest does not name.")
    else:
        out.append("- **Controlled set**: none. The bundle was built without `--data`, so no mAP was measured.")
    if controlled is not None:
        out.append(f"- **Controlled report** (per class, below): {controlled.get('data')} ({controlled.get('split')} split, "
                   f"{controlled.get('images')} images, {controlled.get('labels')} labels), against {controlled.get('source')}.")
    out.append(f"- **Golden inputs** (parity with the source model): {len(m.golden)} case(s) from "
               f"{src.golden_images or 'an unrecorded source'}.")
    out.append(f"- **Input size**: {m.preprocess.imgsz[0]}x{m.preprocess.imgsz[1]}.")
    return [*out, ""]


def _ran_at(v: Variant) -> str:
    """The precision the engine reported while verifying the variant (OpenVINO may run an fp32 file in bf16)."""
    if v.parity is None or v.parity.engine_precision in (None, "as stored"):
        return v.precision
    return v.parity.engine_precision


def _variant_rows(m: Manifest) -> list[tuple[str, ...]]:
    rows = []
    for name, v in m.variants.items():
        mt = v.metrics
        rows.append((name + (" *" if name == m.default_variant else ""), v.engine, _ran_at(v),
                     _size(v.size_bytes), _f(mt.get("map50_95"), ".4f"), _f(mt.get("map50"), ".4f"),
                     _f(mt.get("map50_95_drop_points"), ".2f"), _f(mt.get("box_agreement"), ".3f"),
                     "-" if v.parity is None else f"{v.parity.worst:.1e} ({'pass' if v.parity.passed else 'FAIL'})",
                     _f(mt.get("latency_ms_b1"), ".2f"), _f(mt.get("speedup_vs_fp32"), ".2f")))
    return rows


def _metrics(m: Manifest, controlled: Mapping[str, Any] | None) -> list[str]:
    out = ["## Metrics", "", "### Per variant", "",
           "mAP on the controlled set (COCO protocol); the loss in mAP50-95 points is against onnx-fp32 (negative: a gain); box agreement and "
           "the largest class-score difference are against the source model on the golden inputs; latency is the median "
           "at batch 1 on the build machine. `*` marks the default variant.", "",
           *_table(("variant", "engine", "precision", "size", "mAP50-95", "mAP50", "loss vs fp32 (points)", "box agreement",
                    "max abs Δ scores", "latency ms", "speed-up"), _variant_rows(m), "lllrrrrrrrr")]
    if m.latencies:
        names = list(m.variants)
        out += ["### Latency by machine", "", "Median ms at batch 1, all variants timed interleaved on each machine.", "",
                *_table(("machine", "CPU", "CPU flags", *names, "how", "measured"),
                        [(r.machine, r.cpu or "?", " ".join(r.flags) or "-", *(_f(r.variants.get(n), ".2f") for n in names),
                          r.how or "-", r.measured_at or "-") for r in m.latencies], "lll" + "r" * len(names) + "ll")]
    out += ["### Per class", ""]
    if controlled is None:
        out += ["No per-class figures: the manifest records mAP per variant only. Score every variant per class with "
                "`cvdeploy doctor BUNDLE --data DATA.yaml --json report.json`, then `cvdeploy card BUNDLE --controlled "
                "report.json`.", ""]
        return out
    src_name = str(controlled["source"])
    src_cls = controlled["source_scores"].get("per_class", {})
    variants = controlled["variants"]
    rows = []
    for cls, s in src_cls.items():
        cells = [cls, s.get("labels", "-"), _f(s.get("map50_95"), ".3f")]
        for v in variants.values():
            score = v.get("per_class", {}).get(cls, {}).get("map50_95")
            delta = v.get("delta_points", {}).get("per_class", {}).get(cls)
            cells.append(_f(score, ".3f") + ("" if delta is None else f" ({delta:+.1f})"))
        rows.append(cells)
    out += [f"mAP50-95 per class on {controlled.get('data')} ({controlled.get('split')} split); in brackets the change in "
            f"points against {src_name}.", "",
            *_table(("class", "labels", src_name, *variants), rows, "lrr" + "r" * len(variants))]
    return out


def _int8_limits(name: str, v: Variant) -> list[str]:
    q = v.quantization or {}
    if not q:
        return []
    if "recipe" in q:
        vnni = sorted(set(q.get("cpu_flags") or []) & VNNI_FLAGS)
        if q.get("reduce_range"):
            needs = "Its 7-bit weights make it exact on every x86-64 CPU"
        else:
            needs = (f"To be exact its 8-bit weights need one of {', '.join(sorted(VNNI_FLAGS))} (x86) or Arm dot products; "
                     "elsewhere run `cvdeploy verify BUNDLE` on the machine before serving it")
        where = f"{q.get('cpu') or 'the build CPU'} ({', '.join(vnni) if vnni else 'no VNNI or AMX'})"
        return [f"- **{name}**: INT8 recipe {q['recipe']}: {q.get('note', '').rstrip('.')}. {needs}. Verified and timed on "
                f"{where}; calibrated on {q.get('calib_images', '?')} images; {q.get('float_nodes', 0)} node(s) kept in float"
                + (", the detection head's decoding among them" if q.get("head_in_float") else "") + "."]
    return [f"- **{name}** was quantized by {q.get('tool', '?')} ({q.get('preset', '?')} preset) on "
            f"{q.get('calib_images', '?')} calibration images" + (", head in float" if q.get("head_in_float") else "") + "."]


def _limitations(b: Bundle, m: Manifest, refused: Mapping[str, str], controlled: Mapping[str, Any] | None) -> list[str]:
    out: list[str] = []
    if not any("map50_95" in v.metrics for v in m.variants.values()):
        out.append(f"- **Accuracy not measured on labelled data.** The only check is agreement with the source model on "
                   f"{len(m.golden)} golden input(s); build with `--data DATA.yaml` for mAP per variant.")
    for name, why in refused.items():
        out.append(f"- **{name} was not written**: {why}.")
    for name, v in m.variants.items():
        drop = v.metrics.get("map50_95_drop_points")
        if drop is not None and drop > 0:
            out.append(f"- **{name}** loses {drop:.2f} mAP50-95 points against onnx-fp32 on the controlled set.")
        if v.precision == "int8":
            out += _int8_limits(name, v)
        if v.parity is not None and v.parity.engine_precision not in (None, "as stored", v.precision):
            out.append(f"- **{name}** ran at {v.parity.engine_precision} when it was verified, not {v.precision}.")
        if v.encryption:
            out.append(f"- **{name}** is encrypted: serving it needs the model key.")
    if controlled is not None:
        for name, v in controlled["variants"].items():
            deltas = v.get("delta_points", {})
            worst = [f"class {c!r} {deltas.get('per_class', {}).get(c, 0):+.1f}" for c in v.get("worst_classes", [])]
            worst += [f"{b} objects {deltas.get('per_bucket', {}).get(b, 0):+.1f}" for b in v.get("worst_buckets", [])]
            if worst:
                out.append(f"- **{name}** loses most, against {controlled['source']} on the controlled set, on: "
                           + ", ".join(worst) + " mAP50-95 points.")
        for f in controlled.get("findings", []):
            if f.get("severity") in ("serious", "warning"):
                out.append(f"- **{f['severity']}** ({f.get('variant', '?')}, controlled set): {f['message']}")
    cpus = sorted({r.cpu or r.machine for r in m.latencies})
    if cpus:
        out.append(f"- **Latency** was measured on {', '.join(cpus)} only; on another machine the variants may rank "
                   "otherwise: run `cvdeploy bench tune BUNDLE` there.")
    if m.profile is None:
        out.append("- **No drift baseline** (built without `--data`): `cvdeploy doctor` and drift monitoring need a "
                   "baseline given to them.")
    else:
        out.append(f"- **Drift baseline**: {m.profile.images} images, {m.profile.source or 'source not recorded'}. Drift "
                   "is measured against that set, so it is only as representative as that set is of the intended use.")
    out.append(f"- **Task**: {m.task} only, {len(m.names)} classes; objects of other classes are not detected.")
    signed = b.root is not None and (b.root / "signature.json").is_file()
    out.append("- **Signature**: " + ("signed (`signature.json`; check it with `cvdeploy verify --public-key`)." if signed else
                                       "not signed: integrity rests on the manifest's hashes (sign it with `cvdeploy sign`)."))
    return ["## Known limitations", "", *out, ""]


def _environment(m: Manifest) -> list[str]:
    env = m.environment
    if not env:
        return ["## Environment", "", "Not recorded (a bundle described from a plain .onnx file).", ""]
    cpu: Any = env.get("cpu", {})
    pk: Any = env.get("packages", {})
    rows = [("Python", env.get("python", "?")), ("platform", env.get("platform", "?")),
            ("CPU", f"{cpu.get('model', '?')} ({cpu.get('logical_cpus', '?')} logical CPUs; flags: "
                    f"{' '.join(cpu.get('flags', [])) or '-'})"),
            *((name, version) for name, version in pk.items())]
    return ["## Environment", "", "Where the bundle was built.", "", *_table(("", ""), rows)]


def _hashes(m: Manifest) -> list[str]:
    rows: list[tuple[str, str]] = [("manifest (content)", m.content_sha256 or "not recorded"),
                                   (f"source: {m.source.file}", m.source.sha256)]
    for name, v in m.variants.items():
        rows.append((f"{name}: {v.file}", v.sha256))
        rows += [(f"{name}: {f}", d) for f, d in v.companions.items()]
    rows += [(f"golden: {g.file}", g.sha256) for g in m.golden]
    if m.profile is not None:
        rows.append((f"profile: {m.profile.file}", m.profile.sha256))
    return ["## Hashes", "", "sha256 of every file the manifest lists (checked whenever the bundle is loaded).", "",
            *_table(("file", "sha256"), rows)]


def render_card(bundle: Bundle | str | os.PathLike[str], *, intended_use: str | None = None,
                controlled: Mapping[str, Any] | str | os.PathLike[str] | None = None,
                refused: Mapping[str, str] | None = None) -> str:
    """MODEL_CARD.md of `bundle` as Markdown.

    `intended_use`: the text of that section (default: a note that it must be filled in). `controlled`: a controlled
    report (its dict or JSON file) for per-class figures. `refused`: variant -> why the build did not write it (the build
    knows; the manifest lists written variants only).
    """
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    m = b.manifest
    report = load_controlled(controlled) if isinstance(controlled, str | os.PathLike) else controlled
    use = (intended_use or "").strip() or INTENDED_USE_MISSING
    lines = [f"# Model card: {m.name}", "",
             f"*Generated by cvdeploy {_version()} from the bundle's manifest (content sha256 "
             f"`{m.content_sha256 or 'not recorded'}`). The card is derived, not hashed: render it again with "
             "`cvdeploy card` after anything changes the bundle. What the manifest does not record is said to be "
             "missing here, never guessed.*", "",
             *_details(m),
             "## Intended use", "", use, "",
             "## Classes", "", *_table(("id", "name"), sorted(m.names.items()), "rl"),
             *_data(m, report), *_metrics(m, report), *_limitations(b, m, refused or {}, report),
             *_environment(m), *_hashes(m)]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_card(bundle: Bundle | str | os.PathLike[str], path: str | os.PathLike[str] | None = None, **options: Any) -> Path:
    """Render the card (options as `render_card`) and write it atomically to `path` (default BUNDLE/MODEL_CARD.md), as
    open or private as the bundle; return the path."""
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    if path is None and b.root is None:
        raise InputError(f"{b.name} is a plain .onnx file: give the card a path (-o)")
    out = Path(path) if path is not None else b.root / CARD_FILE  # type: ignore[operator]
    text = render_card(b, **options)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o600 if is_private(out.parent) else 0o644)
    os.replace(tmp, out)
    return out


def _version() -> str:
    from cvdeploy import __version__

    return __version__
