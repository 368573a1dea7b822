"""A model compressed by training (pruned, distilled, QAT) enters a bundle as a verified variant.

    add_compressed_variant(bundle_path, name, model, *, training, data=None, onnx=None,
                           max_map_drop=2.0, score_tolerance=None, on_step=None, timer=None) -> Outcome

- `name`: `onnx-<what>-fp32` or `onnx-<what>-int8` (e.g. `onnx-pruned50-fp32`, `onnx-qat-int8`); the suffix is the
  precision its parity is judged at. The names `cvdeploy build --variants` makes (onnx-fp32, onnx-int8, ...) are refused.
  `openvino-<what>-...` converts the ONNX graph to OpenVINO IR (`variants/NAME.xml` + `.bin`), run by OpenVINO.
- `model`: the trained compressed model, an Ultralytics `.pt` or the torch module itself (a DetectionModel).
- `onnx`: a ready ONNX file (a QAT QDQ export); without it, `model` is exported with the bundle's own export settings.
- `training`: the training record (data, epochs, seed, wall time, ...), JSON-serialisable; it is stored with the variant.
- `data`: a YOLO data.yaml; with it, the variant's mAP50-95 must stay within `max_map_drop` points of onnx-fp32's.
- `score_tolerance`: the class-score tolerance of the parity check (default: `evaluate.parity.SCORE_TOLERANCE[precision]`).

Why a variant of its own kind: its ONNX comes from another .pt than the bundle's source, so its golden parity is
checked against *its own* torch model's outputs on the bundle's golden inputs (stored under `golden/NAME/` as companions
of the variant, so that `cvdeploy verify` on another machine can check it too), while its accuracy is checked against
the source: the mAP budget against onnx-fp32's on the same controlled set. Latency is measured for every variant,
interleaved, as `add_variants` does. The training record is a companion `variants/NAME.training.json` (hashed with the
bundle) and is shown in report.html. A variant that fails any check is removed and the manifest left as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.bundle.bundle import Bundle, set_bundle_modes, sha256_file, write_golden
from cvdeploy.bundle.manifest import GoldenCase, Variant
from cvdeploy.errors import BundleError, InputError

NAME = re.compile(r"^(?:onnx|openvino)-[a-z0-9]+(?:-[a-z0-9]+)*-(fp32|int8)$")
GOLDEN_DIR = "golden"  # the variant's own golden outputs: golden/NAME/case_XXX.npz


def precision_of(name: str) -> str:
    """fp32 or int8, from the variant name; refuses names the regular build makes and names it cannot parse."""
    from cvdeploy.build.variants import ALL_VARIANTS

    m = NAME.match(name)
    if m is None or name in ALL_VARIANTS:
        raise InputError(f"compressed variant name {name!r}: use onnx-<what>-fp32 or onnx-<what>-int8 (e.g. "
                         "onnx-pruned50-fp32; openvino-<what>-... for OpenVINO IR), not one of the names `cvdeploy build "
                         "--variants` makes")
    return m.group(1)


def training_file(name: str) -> str:
    return f"variants/{name}.training.json"


def own_golden(bundle: Bundle, name: str) -> Bundle:
    """A view of `bundle` whose golden cases are the variant's own (its torch model's outputs), for parity checks."""
    v = bundle.manifest.variants[name]
    prefix = f"{GOLDEN_DIR}/{name}/"
    cases = [GoldenCase(file=f, sha256=d, input_shape=[]) for f, d in sorted(v.companions.items()) if f.startswith(prefix)]
    if not cases:
        return bundle
    return Bundle(bundle.manifest.model_copy(update={"golden": cases}), bundle.root)


def training_record(bundle: Bundle, name: str) -> dict[str, Any] | None:
    """The training record stored with a compressed variant, or None for a variant made without training."""
    v = bundle.manifest.variants.get(name)
    if v is None or training_file(name) not in v.companions or bundle.root is None:
        return None
    return json.loads((bundle.root / training_file(name)).read_text())


# -- torch side ---------------------------------------------------------------------------------------------------


def load_torch_model(model: Any) -> Any:
    """The torch module of an Ultralytics .pt (or the module itself), float and in eval mode."""
    if isinstance(model, str | os.PathLike):
        from ultralytics.nn.tasks import load_checkpoint

        if not Path(model).is_file():
            raise InputError(f"compressed model not found: {model}")
        net, _ = load_checkpoint(str(model))
        return net.float().eval()
    return model.float().eval()


def save_checkpoint(net: Any, path: Path, *, imgsz: int, extra: Mapping[str, Any] | None = None) -> Path:
    """An Ultralytics-loadable checkpoint holding the whole module (a pruned model's shapes are not in any YAML)."""
    import copy

    import torch

    ckpt = {"model": copy.deepcopy(net).float().eval(), "train_args": {"imgsz": imgsz, "task": "detect"},
            "date": None, **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, str(path))
    return path


def export_onnx(model: Any, out: Path, imgsz: int) -> Path:
    """Export like `build_bundle` does (dynamic axes, simplified, no NMS, reproducible bytes) to `out`."""
    from ultralytics import YOLO

    from cvdeploy.build.export import _quiet_ultralytics, _reproducible

    with tempfile.TemporaryDirectory(prefix="cvdeploy-compress-") as tmp:
        pt = Path(tmp) / "model.pt"
        if isinstance(model, str | os.PathLike):
            shutil.copyfile(model, pt)
        else:
            save_checkpoint(model, pt, imgsz=imgsz)
        with _quiet_ultralytics():
            try:
                onnx_file = Path(YOLO(str(pt)).export(format="onnx", imgsz=imgsz, dynamic=True, simplify=True, nms=False,
                                                      device="cpu", batch=1, verbose=False))
            except Exception as e:  # Ultralytics raises bare exceptions
                raise BundleError(f"Ultralytics could not export the compressed model to ONNX: {e}") from e
        _reproducible(onnx_file, None)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(onnx_file), out)
    return out


def torch_golden(bundle: Bundle, net: Any) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """The torch model's outputs on the bundle's golden inputs, named like the bundle's outputs."""
    import torch

    from cvdeploy.build.export import torch_outputs

    names = [o.name for o in bundle.manifest.outputs]
    if hasattr(net, "end2end"):
        net.end2end = bundle.manifest.postprocess.end2end
    cases = []
    with torch.inference_mode():
        for g in bundle.golden():
            ys = torch_outputs(net(torch.from_numpy(g.input)))
            if len(ys) != len(names):
                raise BundleError(f"the compressed model gives {len(ys)} output(s), the bundle {len(names)}; is it the "
                                  "same task and head?")
            cases.append((g.input, {n: y.float().numpy() for n, y in zip(names, ys, strict=True)}))
    return cases


# -- the entry point ----------------------------------------------------------------------------------------------


def add_compressed_variant(
    bundle_path: str | os.PathLike[str],
    name: str,
    model: Any,
    *,
    training: Mapping[str, Any],
    data: str | os.PathLike[str] | None = None,
    onnx: str | os.PathLike[str] | None = None,
    max_map_drop: float = 2.0,
    score_tolerance: float | None = None,
    on_step: Callable[[str, str], None] | None = None,
    timer: Any = None,
) -> Any:
    """Export (or take `onnx`), verify and record the compressed variant `name`; return its `Outcome` (see module doc).

    A refused variant leaves the bundle as it was and comes back with `written=False` and the reason.
    """
    from cvdeploy.build.variants import Outcome, map_of

    precision = precision_of(name)
    if max_map_drop < 0:
        raise InputError(f"max-map-drop must be >= 0 points, got {max_map_drop}")
    step = on_step or (lambda _v, _s: None)
    t0 = time.perf_counter()
    bundle = Bundle.load(bundle_path)
    if bundle.root is None:
        raise InputError(f"{bundle_path} is a plain .onnx file; variants are added to a bundle directory")
    if bundle.manifest.task != "detect":
        raise InputError(f"compressed variants are made for detect bundles; {bundle.name!r} is {bundle.manifest.task}")
    if "onnx-fp32" not in bundle.manifest.variants or next(bundle.golden(), None) is None:
        raise BundleError(f"bundle {bundle.name!r} needs an onnx-fp32 variant and golden cases to compare against")
    json.dumps(dict(training))  # fail now, not after the export, on a record that cannot be stored
    root, manifest = bundle.root, bundle.manifest
    from cvdeploy.build.variant_job import forget_variant

    forget_variant(bundle, name)
    _remove(root, name)
    outcome = Outcome(name, False, "")
    try:
        variant, problem = _make_and_check(bundle, name, precision, model, onnx, data, dict(training), max_map_drop,
                                           score_tolerance, step, map_of)
    except BaseException:
        _remove(root, name)
        raise
    if problem is not None:
        _remove(root, name)
        outcome.reason = problem
        outcome.variant = variant
        return outcome
    manifest.variants[name] = variant
    bundle.save_manifest()
    _time_all(bundle, step, timer)
    outcome.written, outcome.reason, outcome.variant = True, "verified", manifest.variants[name]
    outcome.tried = [f"training: {_summary(training)}"]
    from cvdeploy.build.variants import write_report
    from cvdeploy.bundle.card import write_card

    write_report(bundle, [outcome], time.perf_counter() - t0)
    write_card(bundle)
    set_bundle_modes(root)
    return outcome


def _make_and_check(bundle: Bundle, name: str, precision: str, model: Any, onnx: Any, data: Any,
                    training: dict[str, Any], max_map_drop: float, tolerance: float | None,
                    step: Callable[[str, str], None], map_of: Callable[..., dict[str, float]]) -> tuple[Variant, str | None]:
    """The variant's files and record, and the first problem its checks found (None: verified)."""
    from cvdeploy.build.variant_job import weight_companions
    from cvdeploy.evaluate.parity import MIN_BOX_AGREEMENT, SCORE_TOLERANCE, golden_check

    root = bundle.root
    assert root is not None
    kind = _engine(name)
    target = _target(root, name)
    net = load_torch_model(model)
    if onnx is not None and not Path(onnx).is_file():
        raise InputError(f"ONNX file not found: {onnx}")
    if onnx is None:
        step(name, "export ONNX")
        onnx = export_onnx(model, root / "variants" / f"{name}.onnx", bundle.manifest.preprocess.imgsz[0])
    if kind == "openvino":  # the same ONNX graph (a QDQ one keeps its quantization as FakeQuantize) as OpenVINO IR
        from cvdeploy.build.variants import openvino_ir

        step(name, "convert to OpenVINO IR")
        openvino_ir(Path(onnx), target, None, float_head=False)
        if Path(onnx) == root / "variants" / f"{name}.onnx":
            Path(onnx).unlink()
    elif Path(onnx) != target:
        shutil.copyfile(onnx, target)
    step(name, "golden outputs of its own torch model")
    companions = {}
    (root / GOLDEN_DIR / name).mkdir(parents=True, exist_ok=True)
    for i, (tensor, outs) in enumerate(torch_golden(bundle, net)):
        rel = f"{GOLDEN_DIR}/{name}/case_{i:03d}.npz"
        write_golden(root / rel, tensor, outs)
        companions[rel] = sha256_file(root / rel)
    record = root / training_file(name)
    record.write_text(json.dumps(training, indent=2, sort_keys=True))
    companions[training_file(name)] = sha256_file(record)
    weights = weight_companions(root, target, kind)
    companions.update(weights)
    variant = Variant(file=f"variants/{target.name}", precision=precision, sha256=sha256_file(target),  # type: ignore[arg-type]
                      size_bytes=sum(f.stat().st_size for f in [target, *(root / w for w in weights)]), companions=companions,
                      format="openvino" if kind == "openvino" else "onnx", engine=kind)
    if "training" in Variant.model_fields:  # the manifest field proposed with this module; the companion file either way
        variant.training = {k: v for k, v in training.items() if k != "history"}  # type: ignore[attr-defined]
    step(name, "golden parity")
    with_it = Bundle(bundle.manifest.model_copy(update={"variants": {**bundle.manifest.variants, name: variant}}), root)
    parity, agreement, problem = golden_check(own_golden(with_it, name), target, precision, engine_kind=kind)
    tol = SCORE_TOLERANCE[precision] if tolerance is None else tolerance
    if tolerance is not None and np.isfinite(parity.worst) and (problem is None or "inf or NaN" not in problem):
        # judged again at the caller's tolerance (a QAT graph against its fake-quantized torch model)
        problem = None
        if parity.worst > tol:
            problem = f"class scores differ by up to {parity.worst:.3g} (tolerance {tol:g})"
        elif agreement < MIN_BOX_AGREEMENT[precision]:
            problem = f"only {agreement:.0%} of the golden boxes are found (at least {MIN_BOX_AGREEMENT[precision]:.0%} needed)"
    if problem is not None:
        problem = f"parity against its own torch model: {problem.replace('from the source', '')}"
    parity = parity.model_copy(update={"reference": f"its own torch model ({training.get('method', 'compressed')})",
                                       "tolerance_scores": tol, "passed": problem is None})
    variant.parity = parity
    variant.metrics["box_agreement"] = round(agreement, 4)
    if problem is None and data is not None:
        base = bundle.manifest.variants["onnx-fp32"]
        if "map50_95" not in base.metrics:
            step("onnx-fp32", "mAP")
            base.metrics.update(map_of(bundle, "onnx-fp32", data))
            bundle.save_manifest()
        step(name, "mAP")
        variant.metrics.update(map_of(with_it, name, data))
        drop = 100.0 * (base.metrics["map50_95"] - variant.metrics["map50_95"])
        variant.metrics["map50_95_drop_points"] = round(drop, 3)
        if drop > max_map_drop:
            problem = f"mAP50-95 drops by {drop:.2f} points against onnx-fp32 (budget {max_map_drop:g})"
    return variant, problem


def _time_all(bundle: Bundle, step: Callable[[str, str], None], timer: Any) -> None:
    """Every variant timed interleaved at batch 1 (like `add_variants`), the speed-ups against onnx-fp32 recorded."""
    from cvdeploy.bench.latency import measure_here, runnable_here, store_record

    step("all variants", "latency, interleaved")
    manifest = bundle.manifest
    record = measure_here(bundle, runnable_here(bundle), how="build", **({"timer": timer} if timer else {}))
    store_record(manifest, record)
    for n, ms in record.variants.items():
        manifest.variants[n].metrics["latency_ms_b1"] = ms
        if n != "onnx-fp32" and "onnx-fp32" in record.variants:
            manifest.variants[n].metrics["speedup_vs_fp32"] = round(record.variants["onnx-fp32"] / ms, 3)
    bundle.save_manifest()


def _engine(name: str) -> str:
    return "openvino" if name.startswith("openvino-") else "onnxruntime"


def _target(root: Path, name: str) -> Path:
    return root / "variants" / (f"{name}.xml" if _engine(name) == "openvino" else f"{name}.onnx")


def _remove(root: Path, name: str) -> None:
    for suffix in (".onnx", ".xml", ".bin"):
        (root / "variants" / f"{name}{suffix}").unlink(missing_ok=True)
    (root / training_file(name)).unlink(missing_ok=True)
    shutil.rmtree(root / GOLDEN_DIR / name, ignore_errors=True)


def _summary(training: Mapping[str, Any]) -> str:
    keys = ("method", "data", "epochs", "seed", "imgsz", "wall_time_s", "macs_ratio", "teacher", "student")
    return ", ".join(f"{k} {training[k]}" for k in keys if k in training)
