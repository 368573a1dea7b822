"""`cvdeploy build`: export a .pt with Ultralytics to ONNX and write a verified bundle around it.

Every YOLO task is built: detect, segment, pose, obb and classify, and end-to-end (NMS-free, YOLO26) heads. Every
output of the graph (segment: predictions and prototypes) is held against the torch model run in the same head mode
as the export (one-to-one for an end-to-end head).

This is the one place (with the rest of cvdeploy.build) where torch and ultralytics are imported.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.bundle.bundle import MANIFEST, Bundle, set_bundle_modes, sha256_file, write_golden, write_manifest
from cvdeploy.bundle.card import write_card
from cvdeploy.bundle.environment import capture
from cvdeploy.bundle.manifest import (
    GoldenCase,
    Manifest,
    OutputParity,
    ParityReport,
    PostprocessSpec,
    PreprocessSpec,
    SourceInfo,
    TaskInfo,
    TensorInfo,
    Variant,
)
from cvdeploy.errors import BundleError, CvdeployError, InputError, MissingDependencyError, ModelFormatError
from cvdeploy.evaluate.parity import compare_outputs, merge_parity
from cvdeploy.runtime.onnxruntime import OrtEngine, OrtOptions
from cvdeploy.vision.image import IMAGE_SUFFIXES, load_image
from cvdeploy.vision.letterbox import preprocess
from cvdeploy.vision.tasks import TASKS

BUILD_STEPS = ("load model", "export ONNX", "golden inputs", "source outputs", "parity check", "write bundle")
DEFAULT_SCORE_TOLERANCE = 1e-3


def _require_build_deps() -> tuple[Any, Any]:
    os.environ.setdefault("YOLO_OFFLINE", "1")  # never reach out for fonts, assets or hub checks
    try:
        import torch
        import ultralytics
    except ImportError as e:
        raise MissingDependencyError(e.name or "ultralytics", "build", "building a bundle from a .pt model") from e
    return torch, ultralytics


@contextmanager
def _quiet_ultralytics() -> Iterator[None]:
    """Ultralytics logs every export step; the CLI shows its own progress instead."""
    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its warnings are about its own CLI use, not ours
    try:
        yield
    finally:
        logger.setLevel(level)


def golden_images(images: str | os.PathLike[str] | None, n: int, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """Images for the golden cases: the user's (first n files of a directory) or generated shapes scenes."""
    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise InputError(f"golden images: {root} is not a directory")
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
        if not files:
            raise InputError(f"golden images: no image files in {root}")
        return [load_image(p) for p in files], str(root)
    from cvdeploy.demo.shapes import sample_scene

    rng = np.random.default_rng(seed)
    return [sample_scene(rng).image for _ in range(n)], f"cvdeploy shapes scenes (seed {seed})"


def golden_tensors(imgs: Sequence[np.ndarray], pre: PreprocessSpec) -> list[tuple[np.ndarray, str]]:
    """Inputs that exercise what the graph must handle: single images at their own (rect) sizes and a batch."""
    from dataclasses import replace

    spec = pre.letterbox()
    crop = spec.mode == "center_crop"
    one = "center crop" if crop else "minimal-padding letterbox" if spec.rect else "square letterbox"
    cases = [(preprocess([im], spec)[0], f"image {i}, {one}") for i, im in enumerate(imgs)]
    if len(imgs) >= 2:
        batch = preprocess(list(imgs[:2]), replace(spec, rect=False))[0]
        cases.append((batch, f"images 0-1 as a batch of 2, {'center crop' if crop else 'square letterbox'}"))
    return cases


def torch_outputs(y: Any) -> list[Any]:
    """The tensors the exported graph returns, from the torch model's eval-mode output: detect, pose, obb (inference,
    raw) -> inference; segment ((predictions, prototypes), raw) -> both; classify (probabilities, logits) ->
    probabilities. An end-to-end head's inference output is its top-k rows."""
    if isinstance(y, list | tuple):
        y = y[0]
    return list(y) if isinstance(y, list | tuple) else [y]


def task_info(yolo: Any, task: str) -> TaskInfo | None:
    """Pose: keypoint shape, names and flip order (the last from the training data.yaml, when it is still there);
    segment: the number of prototypes."""
    head = yolo.model.model[-1]
    if task == "segment":
        return TaskInfo(mask_channels=int(head.nm))
    if task != "pose":
        return None
    kpt_names = getattr(yolo.model, "kpt_names", None)
    names = {int(k): [str(n) for n in v] for k, v in kpt_names.items()} if isinstance(kpt_names, dict) else None
    return TaskInfo(kpt_shape=tuple(int(v) for v in head.kpt_shape), kpt_names=names, flip_idx=_flip_idx(yolo))


def _flip_idx(yolo: Any) -> list[int] | None:
    import yaml

    args = {**((getattr(yolo, "ckpt", None) or {}).get("train_args") or {}), **(getattr(yolo.model, "args", None) or {})}
    data = args.get("data") if isinstance(args, dict) else None
    try:
        values = yaml.safe_load(Path(data).read_text()).get("flip_idx") if data and Path(data).is_file() else None
        return [int(v) for v in values] if values else None
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return None


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not cleaned:
        raise InputError(f"bundle name {name!r} has no usable characters")
    return cleaned


def build_bundle(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    imgsz: int | None = None,
    name: str | None = None,
    images: str | os.PathLike[str] | None = None,
    n_golden: int = 3,
    score_tolerance: float = DEFAULT_SCORE_TOLERANCE,
    force: bool = False,
    on_step: Callable[[str], None] | None = None,
    private: bool = False,
) -> Bundle:
    """Export `model` (.pt) to ONNX FP32 and write a bundle directory at `out`; return it loaded.

    The ONNX graph takes dynamic batch and spatial sizes and has no NMS inside. Its outputs on
    the golden inputs must match the torch model's within `score_tolerance` on class scores,
    or the build fails and nothing is written. The bundle is readable by every user (directories
    0755, files 0644), or by its owner only with `private` (0700, 0600).
    """
    src = Path(model)
    if not src.is_file():
        raise InputError(f"model not found: {src}")
    if src.suffix.lower() != ".pt":
        raise ModelFormatError(f"cvdeploy build takes an Ultralytics .pt model, got {src.name}")
    dest = Path(out)
    if dest.exists() and not force:
        raise InputError(f"{dest} already exists; choose another -o or pass --force to replace it")
    if imgsz is not None and (imgsz < 32 or imgsz % 32):
        raise InputError(f"imgsz must be a multiple of 32 and at least 32, got {imgsz}")
    if n_golden < 1:
        raise InputError(f"n_golden must be at least 1, got {n_golden}")
    bundle_name = _safe_name(name or src.stem)  # bad names and image folders fail before the slow export
    if images is not None and not Path(images).is_dir():
        raise InputError(f"golden images: {images} is not a directory")
    step = on_step or (lambda _s: None)
    torch, ultralytics = _require_build_deps()
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="cvdeploy-build-") as tmp, _quiet_ultralytics():
        work = Path(tmp)
        step("load model")
        local_pt = work / src.name  # Ultralytics writes the export next to the weights: keep the user's folder clean
        shutil.copyfile(src, local_pt)
        try:
            yolo = YOLO(str(local_pt))
        except Exception as e:  # ultralytics raises bare Exceptions/KeyErrors for foreign pickles
            raise ModelFormatError(f"{src} is not an Ultralytics model ({type(e).__name__}: {e})") from e
        task = yolo.task
        if task not in TASKS:
            raise ModelFormatError(f"{src} is a {task} model; cvdeploy builds {', '.join(TASKS)} bundles")
        names = {int(k): str(v) for k, v in yolo.names.items()}
        train_imgsz = (yolo.overrides or {}).get("imgsz")
        size = imgsz or (train_imgsz if isinstance(train_imgsz, int) else 640)
        stride = int(max(int(yolo.model.stride.max()), 32))

        step("export ONNX")
        try:
            onnx_file = Path(yolo.export(format="onnx", imgsz=size, dynamic=True, simplify=True, nms=False,
                                         device="cpu", batch=1, verbose=False))
        except Exception as e:
            raise CvdeployError(f"Ultralytics could not export {src.name} to ONNX: {e}") from e
        _reproducible(onnx_file, (getattr(yolo, "ckpt", None) or {}).get("date"))

        step("golden inputs")
        pre = PreprocessSpec.for_task(task, (size, size), stride)
        imgs, golden_source = golden_images(images, n_golden)
        cases = golden_tensors(imgs, pre)

        step("source outputs")
        engine = OrtEngine(onnx_file, OrtOptions(providers=("CPUExecutionProvider",)))
        out_names = [o.name for o in engine.outputs]
        # The export's own head mode: an end-to-end (NMS-free) head exports its one-to-one branch and top-k rows; the
        # torch model must run the same branch, or it answers (1, 4 + nc, anchors) where the graph gives (1, 300, 6).
        end2end = str(engine.metadata.get("end2end", "False")) == "True"
        net = yolo.model.float().eval()
        if hasattr(net, "end2end"):
            net.end2end = end2end
        reference: list[dict[str, np.ndarray]] = []
        with torch.inference_mode():
            for tensor, _ in cases:
                ys = torch_outputs(net(torch.from_numpy(tensor)))
                if len(ys) != len(out_names):
                    raise BundleError(f"the torch model gives {len(ys)} output(s), the ONNX export {len(out_names)} "
                                      f"({', '.join(out_names)}); cannot check parity")
                reference.append({n: y.numpy().astype(np.float32) for n, y in zip(out_names, ys, strict=True)})

        step("parity check")
        per_output: dict[str, list[OutputParity]] = {}
        for (tensor, _), ref in zip(cases, reference, strict=True):
            got = engine.run({engine.inputs[0].name: tensor})
            for k, v in compare_outputs(got, ref, task=task, nc=len(names), end2end=end2end).items():
                per_output.setdefault(k, []).append(v)
        merged = {k: merge_parity(vs) for k, vs in per_output.items()}
        worst_name, worst_parity = max(merged.items(), key=lambda kv: kv[1].worst)
        worst = worst_parity.worst
        parity = ParityReport(reference=f"torch {torch.__version__} (source .pt, fp32)", tolerance_scores=score_tolerance,
                              passed=worst <= score_tolerance, outputs=merged)
        if not parity.passed:
            what = "class scores" if worst_parity.max_abs_scores is not None else f"output {worst_name!r} (relative to its range)"
            raise BundleError(
                f"the ONNX export differs from the source model: {what} differ by up to {worst:.2e} "
                f"(tolerance {score_tolerance:.0e}); nothing was written"
            )

        step("write bundle")
        dest.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{bundle_name}-", dir=dest.parent))  # same filesystem: atomic rename
        try:
            (stage / "variants").mkdir()
            (stage / "golden").mkdir()
            variant_file = stage / "variants" / "onnx-fp32.onnx"
            shutil.copyfile(onnx_file, variant_file)
            golden = []
            for i, ((tensor, desc), ref) in enumerate(zip(cases, reference, strict=True)):
                g = stage / "golden" / f"case_{i:03d}.npz"
                write_golden(g, tensor, ref)
                golden.append(GoldenCase(file=f"golden/{g.name}", sha256=sha256_file(g), input_shape=list(tensor.shape), description=desc))
            inp = engine.inputs[0]
            manifest = Manifest(
                name=bundle_name,
                task=task,
                names=names,
                task_info=task_info(yolo, task),
                input=TensorInfo(name=inp.name, shape=list(inp.shape), dtype=inp.dtype),  # type: ignore[arg-type]
                outputs=[TensorInfo(name=o.name, shape=list(o.shape), dtype=o.dtype) for o in engine.outputs],  # type: ignore[arg-type]
                preprocess=pre,
                postprocess=PostprocessSpec(end2end=end2end),
                variants={"onnx-fp32": Variant(file="variants/onnx-fp32.onnx", sha256=sha256_file(variant_file),
                                               size_bytes=variant_file.stat().st_size, parity=parity)},
                default_variant="onnx-fp32",
                golden=golden,
                source=SourceInfo(file=src.name, sha256=sha256_file(src), format="pt",
                                  exporter=f"ultralytics {ultralytics.__version__}", golden_images=golden_source),
                environment=capture(),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                cvdeploy_version=_version(),
            )
            engine.close()
            write_manifest(stage / MANIFEST, manifest)
            write_card(Bundle(manifest, stage))  # MODEL_CARD.md: quotes the manifest's hash, so it is not hashed itself
            set_bundle_modes(stage, private)  # the staging directory is mkdtemp's 0700: say what the bundle is
            if dest.exists():
                shutil.rmtree(dest)
            stage.rename(dest)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return Bundle.load(dest)


def _reproducible(onnx_file: Path, source_date: object) -> None:
    """Make the export byte-identical for the same .pt, imgsz and versions, so that a rebuild can be checked against a
    published sha256. Two things vary from run to run: Ultralytics stamps the export time into the metadata (the source
    checkpoint's own date replaces it), and onnxslim's symbolic shape inference leaves a different set of shape
    annotations in each process (they are dropped and inferred again by ONNX's deterministic shape inference)."""
    import onnx

    model = onnx.load(str(onnx_file))
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    props = [(p.key, p.value) for p in model.metadata_props]
    del model.metadata_props[:]
    for key, value in props:
        if key == "date":
            if not source_date:
                continue  # no stable date to give: leave it out
            value = str(source_date)
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(onnx_file))


def _version() -> str:
    from cvdeploy import __version__

    return __version__
