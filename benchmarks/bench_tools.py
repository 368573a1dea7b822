"""Checks of `cvdeploy bench` itself, on the demo bundle, in one run:

    python benchmarks/bench_tools.py [--bundle DIR] [--iterations 40] [--rounds 5] [--json OUT]

1. agreement: bench's raw engine figure (cvdeploy.bench.harness.bench_engine) against an independent
   plain timed loop of onnxruntime `session.run` written here, same model, tensor and threads;
   the two are interleaved round by round so that machine noise hits both alike. Target: within 10 %.
2. pipelining: Predictor throughput, JPEG bytes in, boxes out, sequential against 4 requests in
   flight (bench_sequential against bench_pipelined, interleaved rounds). Target: pipelined > sequential.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from serve_load import scratch_dir  # the sibling benchmark (this folder is on sys.path when run as a script)

os.environ.setdefault("YOLO_OFFLINE", "1")


def plain_loop(model: Path, tensor, iterations: int, warmup: int) -> list[float]:
    """The independent figure: nothing from cvdeploy, just onnxruntime and perf_counter."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: tensor}
    for _ in range(warmup):
        session.run(None, feeds)
    out = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        session.run(None, feeds)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="bundle to measure (default: build the demo bundle)")
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from cvdeploy.bench.harness import bench_engine, bench_pipelined, bench_sequential
    from cvdeploy.bundle.environment import cpu_info
    from cvdeploy.cli.bench import bench_images
    from cvdeploy.predict import Predictor
    from cvdeploy.vision.image import load_image

    bundle = args.bundle
    if bundle is None:
        from cvdeploy.build import build_bundle
        from cvdeploy.demo import DEMO_MODEL

        bundle = scratch_dir("cvdeploy-benchtools-") / "demo.cvd"
        build_bundle(DEMO_MODEL, bundle, name="yolo11n-shapes")
    images = bench_images(None)
    predictor = Predictor(bundle)
    tensor, _ = predictor.preprocess([load_image(images[0])])
    model = predictor.bundle.variant_path(predictor.variant)

    ours, plain, seq_ips, pipe_ips = [], [], [], []
    per_round = max(1, args.iterations // args.rounds)
    for r in range(args.rounds):
        res = bench_engine(predictor, images[:1], warmup=2, iterations=per_round)
        ours.append(res.latency.p50)
        plain.append(statistics.median(plain_loop(model, tensor, per_round, 2)))
        seq_ips.append(bench_sequential(predictor, images, warmup=2, iterations=per_round).throughput)
        pipe_ips.append(bench_pipelined(predictor, images, concurrency=args.concurrency, warmup=2,
                                        iterations=per_round).throughput)
        print(f"round {r + 1}/{args.rounds}: engine {ours[-1]:.2f} ms, plain loop {plain[-1]:.2f} ms, "
              f"sequential {seq_ips[-1]:.1f} img/s, pipelined c{args.concurrency} {pipe_ips[-1]:.1f} img/s", flush=True)
    ours_med, plain_med = statistics.median(ours), statistics.median(plain)
    seq_med, pipe_med = statistics.median(seq_ips), statistics.median(pipe_ips)
    figures = {
        "machine": {"python": platform.python_version(), "cpu": cpu_info(), "cores": os.cpu_count()},
        "bundle": str(bundle), "imgsz": list(predictor.spec.imgsz), "rounds": args.rounds, "per_round": per_round,
        "engine_p50_ms_bench": round(ours_med, 3), "engine_p50_ms_plain_loop": round(plain_med, 3),
        "agreement_ratio": round(ours_med / plain_med, 3),
        "agreement_pass": abs(ours_med / plain_med - 1) <= 0.10,
        "sequential_ips": round(seq_med, 2), f"pipelined_c{args.concurrency}_ips": round(pipe_med, 2),
        "pipelined_over_sequential": round(pipe_med / seq_med, 3),
        "pipelining_pass": pipe_med > seq_med,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
