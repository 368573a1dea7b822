"""Optimized variants of the demo model, in one run: accuracy and batch-1 latency against onnx-fp32.

    python benchmarks/variants.py [--out DIR] [--n-val 200] [--calib 64] [--rounds 8] [--threads 0] [--json OUT]

1. builds the demo bundle with all five variants (onnx-fp32, onnx-fp16, onnx-int8, openvino-fp32,
   openvino-int8) on the shapes set (seed 0: the demo model's validation split), timing the build;
2. times every variant's engine at batch 1 on the same preprocessed images, interleaved round by
   round (so that machine noise hits all alike), with the same thread setting;
3. prints mAP50-95 (COCO protocol, from the build's verification), the drop against onnx-fp32,
   the median latencies and the speed-up ratios. Targets (issue 3): onnx-int8 within 1.0 point
   and >= 1.3x faster; openvino-int8 within 1.0 point;
4. profiles each INT8 variant against its FP32 counterpart op by op (as `cvdeploy bench layers`)
   and prints the speed-up by kind of op: whether the INT8 convolutions are faster on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

VARIANTS = ["onnx-fp32", "onnx-fp16", "onnx-int8", "openvino-fp32", "openvino-int8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("work-tmp/bench-variants"))
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads for ONNX Runtime / inference threads for OpenVINO")
    ap.add_argument("--profile-rounds", type=int, default=6, help="alternating op-profile rounds per INT8/FP32 pair")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from cvdeploy.build import build_bundle
    from cvdeploy.build.variants import add_variants
    from cvdeploy.bundle.bundle import Bundle
    from cvdeploy.bundle.environment import cpu_info
    from cvdeploy.demo import DEMO_MODEL
    from cvdeploy.demo.shapes import generate_shapes
    from cvdeploy.runtime import open_engine
    from cvdeploy.runtime.onnxruntime import OrtOptions
    from cvdeploy.runtime.openvino import OvOptions
    from cvdeploy.vision.image import load_image
    from cvdeploy.vision.letterbox import preprocess

    data = generate_shapes(args.out / "data", n_train=args.calib, n_val=args.n_val, seed=0)
    bundle_dir = args.out / "demo.cvd"
    t0 = time.perf_counter()
    build_bundle(DEMO_MODEL, bundle_dir, name="yolo11n-shapes", force=True)
    t_fp32 = time.perf_counter() - t0

    def on_step(v: str, s: str) -> None:
        print(f"  {time.perf_counter() - t0:7.1f} s  {v}: {s}", flush=True)

    outcomes = add_variants(bundle_dir, VARIANTS, data=data, calib_images=args.calib, on_step=on_step)
    build_s = time.perf_counter() - t0
    for o in outcomes:
        print(f"{o.name}: {'written' if o.written else 'REFUSED'} ({o.reason}) {'; '.join(o.tried)}")
    bundle = Bundle.load(bundle_dir)
    m = bundle.manifest
    written = [n for n in VARIANTS if n in m.variants]

    # Interleaved batch-1 timing of the engines on real preprocessed images (rect letterbox, as served).
    images = sorted((data.parent / "images" / "val").glob("*.jpg"))[:8]
    spec = m.preprocess.letterbox()
    tensors = [preprocess([load_image(p)], spec)[0] for p in images]
    engines = {}
    for n in written:
        v = m.variants[n]
        opts = OvOptions(num_threads=args.threads) if v.engine == "openvino" else OrtOptions(intra_op_threads=args.threads)
        engines[n] = open_engine(bundle.variant_path(n), v.engine, opts)
    for e in engines.values():
        for t in tensors[:3]:
            e.run({e.inputs[0].name: t})
    samples: dict[str, list[float]] = {n: [] for n in engines}
    for _ in range(args.rounds):
        for n, e in engines.items():
            for k in range(args.per_round):
                t = tensors[k % len(tensors)]
                s = time.perf_counter()
                e.run({e.inputs[0].name: t})
                samples[n].append((time.perf_counter() - s) * 1000.0)
    med = {n: statistics.median(v) for n, v in samples.items()}
    base_map = m.variants["onnx-fp32"].metrics.get("map50_95")
    rows = []
    print(f"\n{'variant':<15}{'mAP50-95':>10}{'drop pts':>10}{'p50 ms':>10}{'vs fp32':>9}{'size MB':>9}")
    for n in written:
        v = m.variants[n]
        mp = v.metrics.get("map50_95")
        drop = None if mp is None or base_map is None else 100 * (base_map - mp)
        ratio = med["onnx-fp32"] / med[n]
        rows.append({"variant": n, "map50_95": mp, "drop_points": None if drop is None else round(drop, 3),
                     "p50_ms": round(med[n], 3), "speedup_vs_fp32": round(ratio, 3), "size_mb": round(v.size_bytes / 1e6, 2)})
        print(f"{n:<15}{mp if mp is not None else float('nan'):>10.4f}{drop if drop is not None else float('nan'):>10.2f}"
              f"{med[n]:>10.2f}{ratio:>8.2f}x{v.size_bytes / 1e6:>9.2f}")
    by = {r["variant"]: r for r in rows}
    checks = {
        "onnx_int8_within_1_point": by.get("onnx-int8", {}).get("drop_points") is not None and by["onnx-int8"]["drop_points"] <= 1.0,
        "onnx_int8_at_least_1_3x": by.get("onnx-int8", {}).get("speedup_vs_fp32", 0) >= 1.3,
        "openvino_int8_within_1_point": by.get("openvino-int8", {}).get("drop_points") is not None
        and by["openvino-int8"]["drop_points"] <= 1.0,
    }
    # Where INT8 wins or loses its time: both engines' op profiles by kind of op (as `cvdeploy bench layers`).
    from cvdeploy.bench.profile import profile_pair

    kinds = {}
    feeds = {m.input.name: tensors[0]}
    for a, b in (("onnx-fp32", "onnx-int8"), ("openvino-fp32", "openvino-int8")):
        if a in written and b in written:
            c, _ = profile_pair(bundle, a, b, feeds, rounds=args.profile_rounds, runs=10, threads=args.threads)
            kinds[b] = c.to_dict() | {"convolution_speedup": round(c.speedup("convolution"), 3)}
            print(f"{b}: convolutions {c.speedup('convolution'):.2f}x as fast as {a}, all kernels {c.speedup():.2f}x "
                  f"({', '.join(f'{k} {x:.2f}->{y:.2f} ms' for k, (x, y) in c.categories.items())})")
    figures = {"machine": {"python": platform.python_version(), "cpu": cpu_info(), "cores": os.cpu_count()},
               "threads": args.threads, "imgsz": list(m.preprocess.imgsz), "n_val": args.n_val, "calib_images": args.calib,
               "fp32_build_s": round(t_fp32, 1), "full_build_s": round(build_s, 1), "rows": rows, "checks": checks,
               "refused": {o.name: o.reason for o in outcomes if not o.written}, "int8_by_kind_of_op": kinds}
    print(json.dumps({"full_build_s": figures["full_build_s"], "checks": checks}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
