"""Edge variants of the demo model in one run: how each was verified, its mAP drop, and batch-1 latency against onnx-fp32.

    python benchmarks/edge_variants.py [--out DIR] [--n-val 200] [--calib 64] [--rounds 10] [--per-round 10] [--threads 0] [--json OUT]

1. builds the demo bundle (onnx-fp32) and adds ncnn-fp32, ncnn-fp16, litert-fp32 and litert-int8 with the build's own
   code (`cvdeploy.build.edge.add_edge_variants`), on the shapes set (seed 0: the demo model's validation split),
   printing each variant's verdict: golden parity, box agreement, mAP50-95 and its drop against onnx-fp32 (budget 1.0
   point for fp32/fp16, 2.0 for full-integer INT8), or why it was refused;
2. a variant the guard refused is exported again into a scratch copy of the bundle with its budget opened, only to time
   it (printed as "refused": it is not in the bundle);
3. times onnx-fp32 and every edge variant's engine at batch 1 on the same preprocessed golden image at the bundle's
   size (the edge graphs take that one size), interleaved round by round so that machine noise hits all alike, with
   the same thread count for every engine; prints medians, p90 and the ratio to onnx-fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

EDGE = ["ncnn-fp32", "ncnn-fp16", "litert-fp32", "litert-int8"]


def _engine_options(threads: int) -> dict[str, object]:
    from cvdeploy.runtime.litert import LiteRtOptions
    from cvdeploy.runtime.ncnn import NcnnOptions
    from cvdeploy.runtime.onnxruntime import OrtOptions

    n = threads or (os.cpu_count() or 1)  # one setting for every engine: their own defaults differ
    return {"onnxruntime": OrtOptions(intra_op_threads=n), "ncnn": NcnnOptions(num_threads=n),
            "litert": LiteRtOptions(num_threads=n)}


def _timed(models: dict[str, tuple[object, str, str]], tensor: object, rounds: int, per_round: int,
           options: dict[str, object]) -> dict[str, list[float]]:
    """Every sample, not only the median (for p90): the loop of bench.latency.interleaved_latency."""
    from cvdeploy.runtime import open_engine

    engines = {k: open_engine(m, kind, options.get(kind), precision=p) for k, (m, kind, p) in models.items()}
    try:
        feeds = {k: {e.inputs[0].name: tensor} for k, e in engines.items()}
        for k, e in engines.items():
            for _ in range(5):
                e.run(feeds[k])
        samples: dict[str, list[float]] = {k: [] for k in engines}
        for r in range(rounds):
            for k in (list(engines) if r % 2 == 0 else list(reversed(engines))):
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    engines[k].run(feeds[k])
                    samples[k].append((time.perf_counter() - t0) * 1000.0)
    finally:
        for e in engines.values():
            e.close()
    return samples


def _latency_table(bundle: object, models: dict[str, tuple[object, str, str]], args: argparse.Namespace
                   ) -> tuple[dict[str, dict[str, float]], int]:
    import numpy as np

    m = bundle.manifest  # type: ignore[attr-defined]
    x = next(g.input for g in bundle.golden() if tuple(g.input.shape[2:]) == tuple(m.preprocess.imgsz))[:1]  # type: ignore[attr-defined]
    threads = args.threads or (os.cpu_count() or 1)
    print(f"\ninterleaved batch-1 latency at {x.shape[3]}x{x.shape[2]}, {args.rounds} rounds x {args.per_round} runs, "
          f"{threads} thread(s) for every engine")
    samples = _timed(models, x, args.rounds, args.per_round, _engine_options(args.threads))
    base = float(np.median(samples["onnx-fp32"]))
    print("| variant | median ms | p90 ms | vs onnx-fp32 |")
    print("| --- | --- | --- | --- |")
    timing = {}
    for k, s in samples.items():
        med, p90 = float(np.median(s)), float(np.percentile(s, 90))
        timing[k] = {"median_ms": round(med, 3), "p90_ms": round(p90, 3), "speedup_vs_onnx_fp32": round(base / med, 3)}
        print(f"| {k} | {med:.2f} | {p90:.2f} | **{base / med:.2f}x** |")
    return timing, threads


def _time_again(bundle_dir: Path, scratch: Path, args: argparse.Namespace) -> None:
    from cvdeploy.bundle.bundle import Bundle

    bundle = Bundle.load(bundle_dir)
    m = bundle.manifest
    models = {n: (bundle.variant_path(n), v.engine, v.precision) for n, v in m.variants.items()
              if n == "onnx-fp32" or n in EDGE}
    if scratch.is_dir():
        sb = Bundle.load(scratch)
        models.update({f"{n} (refused)": (sb.variant_path(n), v.engine, v.precision) for n, v in sb.manifest.variants.items()
                       if n in EDGE and n not in m.variants})
    _latency_table(bundle, models, args)


def main() -> None:

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("work-tmp/bench-edge"))
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="threads for every engine (0: one per logical CPU)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="time the bundle (and scratch copy) of an earlier run in --out again, "
                    "without rebuilding")
    args = ap.parse_args()

    from cvdeploy.build import build_bundle
    from cvdeploy.build.edge import add_edge_variants
    from cvdeploy.bundle.bundle import Bundle
    from cvdeploy.bundle.environment import cpu_info
    from cvdeploy.demo import DEMO_MODEL
    from cvdeploy.demo.shapes import generate_shapes

    bundle_dir = args.out / "demo.cvd"
    if args.reuse:
        _time_again(bundle_dir, args.out / "scratch.cvd", args)
        return
    data = generate_shapes(args.out / "data", n_train=args.calib, n_val=args.n_val, seed=0)
    build_bundle(DEMO_MODEL, bundle_dir, name="yolo11n-shapes", force=True)
    t0 = time.perf_counter()

    def step(variant: str, what: str) -> None:
        print(f"  [{time.perf_counter() - t0:6.1f} s] {variant}: {what}", flush=True)

    outcomes = add_edge_variants(bundle_dir, EDGE, source=DEMO_MODEL, data=data, calib_images=args.calib, on_step=step)
    build_s = time.perf_counter() - t0
    bundle = Bundle.load(bundle_dir)
    m = bundle.manifest
    base_map = m.variants["onnx-fp32"].metrics["map50_95"]
    print(f"\nbuilt and verified in {build_s:.1f} s; onnx-fp32 mAP50-95 {base_map:.4f} on {args.n_val} images\n")
    print("| variant | written | mAP50-95 | drop (points) | worst score diff | box agreement | size (MB) | why |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for o in outcomes[1:]:
        v = o.variant
        met = v.metrics if v is not None else {}
        worst = v.parity.worst if v is not None and v.parity is not None else float("nan")
        size = (v.size_bytes / 1e6) if v is not None and o.written else float("nan")
        print(f"| {o.name} | {'yes' if o.written else '**refused**'} | {met.get('map50_95', float('nan')):.4f} | "
              f"{met.get('map50_95_drop_points', float('nan')):.2f} | {worst:.2g} | {met.get('box_agreement', float('nan')):.0%} | "
              f"{size:.1f} | {o.reason} |")
        rows.append({"variant": o.name, "written": o.written, "reason": o.reason, **met, "worst_score_diff": worst})

    # A refused variant, timed from a scratch copy with its budget opened (not part of the bundle).
    refused = [o.name for o in outcomes[1:] if not o.written and o.variant is not None and "mAP50-95" in o.reason]
    models = {n: (bundle.variant_path(n), m.variants[n].engine, m.variants[n].precision)
              for n in ["onnx-fp32", *(o.name for o in outcomes[1:] if o.written)]}
    if refused:
        scratch = args.out / "scratch.cvd"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(bundle_dir, scratch)
        add_edge_variants(scratch, refused, source=DEMO_MODEL, data=data, calib_images=args.calib,
                          max_map_drop={"fp32": 100.0, "fp16": 100.0, "int8": 100.0})
        sb = Bundle.load(scratch)
        models.update({f"{n} (refused)": (sb.variant_path(n), sb.manifest.variants[n].engine, sb.manifest.variants[n].precision)
                       for n in refused})
    timing, threads = _latency_table(bundle, models, args)
    cpu = cpu_info()
    print(f"\nCPU: {cpu.get('model')} ({cpu.get('logical_cpus')} logical), flags: {' '.join(cpu.get('flags', []))}; "  # type: ignore[arg-type]
          f"{platform.machine()}")
    if args.json is not None:
        args.json.write_text(json.dumps({"build_s": round(build_s, 1), "variants": rows, "latency": timing,
                                         "cpu": cpu, "threads": threads}, indent=2, default=str))


if __name__ == "__main__":
    main()
