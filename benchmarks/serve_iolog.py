"""The cost of inference I/O logging: `cvdeploy serve` with `--log-io` (5 % sampled) against without, at concurrency 8.

    python benchmarks/serve_iolog.py [--rounds 5] [--requests 300] [--sample 0.05] [--store thumbnail] [--json OUT]

Two servers of the same demo bundle on 127.0.0.1, one logging; the same JPEG uploads from the same prepared-request
load generator (benchmarks/serve_load.py), alternating rounds; the median throughputs and the loss. Target
(issue 13): at most 5 % at a 5 % sample rate. Also checks the log's directory stayed within its size bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from serve_load import (  # the sibling benchmark (this folder is on sys.path when run as a script)
    free_port,
    load,
    scratch_dir,
    wait_ready,
)

os.environ.setdefault("YOLO_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--sample", type=float, default=0.05)
    ap.add_argument("--store", default="thumbnail")
    ap.add_argument("--max-mb", type=float, default=16.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import cv2

    from cvdeploy.build import build_bundle
    from cvdeploy.demo import DEMO_MODEL
    from cvdeploy.demo.shapes import ShapesConfig, iter_scenes

    work = scratch_dir("cvdeploy-iolog-")
    bundle = work / "demo.cvd"
    build_bundle(DEMO_MODEL, bundle, name="yolo11n-shapes")
    images = [cv2.imencode(".jpg", s.image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
              for s in iter_scenes(5, "test", 32, ShapesConfig(min_side=256, max_side=640))]
    ports = {"plain": free_port(), "logged": free_port()}
    extra = {"plain": [], "logged": ["--log-io", str(work / "io"), "--log-io-sample", str(args.sample), "--log-io-store", args.store,
                                     "--log-io-max-mb", str(args.max_mb)]}
    procs = {k: subprocess.Popen([sys.executable, "-m", "cvdeploy", "serve", str(bundle), "--port", str(p), "--instances", "2",
                                  "--log-level", "warning", *extra[k]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for k, p in ports.items()}
    try:
        urls = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
        for k, u in urls.items():
            wait_ready(u, procs[k])
        for u in urls.values():
            asyncio.run(load(u, "yolo11n-shapes", images, 4, 40, None))
        ips: dict[str, list[float]] = {"plain": [], "logged": []}
        for r in range(args.rounds):
            for k in (("plain", "logged") if r % 2 == 0 else ("logged", "plain")):
                res = asyncio.run(load(urls[k], "yolo11n-shapes", images, 8, args.requests, None))
                if res["errors"]:
                    raise SystemExit(f"{k}: {res['errors']} errors")
                ips[k].append(res["throughput_ips"])
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=60)
    plain, logged = statistics.median(ips["plain"]), statistics.median(ips["logged"])
    size = sum(f.stat().st_size for f in (work / "io").rglob("*") if f.is_file())
    records = sum(1 for f in (work / "io").glob("records-*.jsonl") for _ in f.open())
    out = {"plain_ips": round(plain, 1), "logged_ips": round(logged, 1), "loss": round(1 - logged / plain, 4), "rounds": args.rounds,
           "sample": args.sample, "store": args.store, "records": records, "log_bytes": size,
           "within_bound": size <= args.max_mb * 1024 * 1024}
    print(f"c=8: {logged:.1f} img/s with the I/O log ({args.sample:.0%} sampled, {args.store}) against {plain:.1f} without: "
          f"{100 * out['loss']:.1f} % loss (median of {args.rounds} alternating rounds); {records} records, "
          f"{size / 1e6:.2f} MB on disk (bound {args.max_mb:g} MiB)")
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
