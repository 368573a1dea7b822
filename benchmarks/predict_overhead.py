"""Predictor overhead at 640: end-to-end (JPEG bytes -> boxes) against raw `session.run`, and against Ultralytics.

    python benchmarks/predict_overhead.py [--images 24] [--repeats 5] [--threads 0] [--out DIR]

One run measures, on the same images, with the same ONNX file and the same thread settings:
  raw       session.run on the tensor the Predictor already preprocessed (the engine alone)
  cvdeploy  Predictor.predict(jpeg_bytes): decode + letterbox + engine + NMS + boxes to pixels
  ultra     ultralytics.YOLO(onnx).predict(path) (its own decode, preprocessing, torch NMS)
The three are interleaved image by image, in a rotating order with a short pause between calls (so
that machine noise, and the spinning of the previous session's threads, hit them alike); the figures
are medians of per-image times, with ratios. Targets (issue 2): overhead (cvdeploy - raw) / raw <= 10 %,
cvdeploy / ultra <= 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
from serve_load import scratch_dir  # the sibling benchmark (this folder is on sys.path when run as a script)

os.environ.setdefault("YOLO_OFFLINE", "1")


def make_images(out: Path, n: int) -> list[Path]:
    """Camera-like JPEGs around 640 px (landscape, portrait, square) made by the shapes generator."""
    from cvdeploy.demo.shapes import ShapesConfig, iter_scenes

    sizes = [(480, 640), (640, 480), (640, 640), (360, 640)]
    paths = []
    for i, scene in enumerate(iter_scenes(99, "test", n, ShapesConfig(min_side=320, max_side=640))):
        h, w = sizes[i % len(sizes)]
        img = cv2.resize(scene.image, (w, h), interpolation=cv2.INTER_AREA)
        p = out / f"img_{i:03d}.jpg"
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(p)
    return paths


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads for both (0: ONNX Runtime default)")
    ap.add_argument("--out", type=Path, default=None, help="where to build the 640 bundle (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    from ultralytics import YOLO

    from cvdeploy import Predictor
    from cvdeploy.build import build_bundle
    from cvdeploy.bundle.environment import cpu_info
    from cvdeploy.demo import DEMO_MODEL
    from cvdeploy.runtime import OrtOptions
    from cvdeploy.vision.image import load_image

    work = Path(args.out or scratch_dir("cvdeploy-bench-"))
    bundle_dir = work / "demo-640.cvd"
    if not (bundle_dir / "manifest.json").is_file():
        build_bundle(DEMO_MODEL, bundle_dir, imgsz=640, name="yolo11n-shapes-640", force=True)
    images = make_images(work, args.images)
    blobs = [p.read_bytes() for p in images]

    predictor = Predictor(bundle_dir, engine_options=OrtOptions(intra_op_threads=args.threads))
    session = predictor.engine.session
    onnx_path = str(predictor.bundle.variant_path())
    ultra = YOLO(onnx_path, task="detect")
    if args.threads:
        # Ultralytics builds its own session with default options; give it the same thread count.
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        ultra.predict(str(images[0]), imgsz=640, verbose=False)
        ultra.predictor.model.session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    tensors = [predictor.preprocess([load_image(b)])[0] for b in blobs]
    in_name = session.get_inputs()[0].name

    def raw(i: int) -> None:
        session.run(None, {in_name: tensors[i]})

    def ours(i: int) -> None:
        predictor.predict(blobs[i])

    def theirs(i: int) -> None:
        ultra.predict(str(images[i]), imgsz=640, conf=0.25, iou=0.7, verbose=False)

    for i in range(min(5, len(images))):  # warmup: first calls allocate and are excluded
        raw(i), ours(i), theirs(i)
    t_raw, t_ours, t_theirs, stages = [], [], [], []
    calls = ((raw, t_raw), (ours, t_ours), (theirs, t_theirs))
    for rep in range(args.repeats):
        for i in range(len(images)):
            # Rotate the order and pause between calls: an ONNX Runtime session's threads keep spinning a
            # little after a run, and would otherwise slow whichever method always comes next.
            for k in range(3):
                fn, out = calls[(i + rep + k) % 3]
                time.sleep(0.02)
                out.append(timed(fn, i))
        stages.append(predictor.predict(blobs[0]).timings.to_dict())

    med = statistics.median
    r, o, u = med(t_raw), med(t_ours), med(t_theirs)
    # Per-image overhead ratios, paired (same image, same repeat), then their median: robust to drift.
    overhead = med([(b - a) / a for a, b in zip(t_raw, t_ours, strict=True)])
    vs_ultra = med([b / c for b, c in zip(t_ours, t_theirs, strict=True)])
    figures = {
        "machine": f"{cpu_info()['model']} ({platform.machine()}), {os.cpu_count()} logical CPUs, Python {sys.version.split()[0]}",
        "provider": predictor.engine.provider,
        "threads": args.threads or "ort default",
        "images": len(images),
        "calls_per_method": len(t_raw),
        "median_ms": {"raw_session_run": round(r, 2), "cvdeploy_end_to_end": round(o, 2), "ultralytics_predict": round(u, 2)},
        "overhead_vs_raw": round(overhead, 4),
        "ratio_cvdeploy_over_ultralytics": round(vs_ultra, 4),
        "cvdeploy_stage_ms_median": {k: round(med([s[k] for s in stages]), 2) for k in stages[0]},
        "targets": {"overhead_vs_raw": "<= 0.10", "ratio_cvdeploy_over_ultralytics": "<= 1.0"},
        "pass": bool(overhead <= 0.10 and vs_ultra <= 1.0),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
