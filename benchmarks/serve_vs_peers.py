"""cvdeploy serve against LitServe and a naive engine loop, in one run, alternating rounds (issue 12).

    python benchmarks/serve_vs_peers.py [--sizes 320,640] [--concurrency 1,8,32] [--requests 200] [--rounds 3] [--json OUT]

For each input size the demo model is built at that size; then, round after round (the order rotating):
  - naive: `session.run` of ONNX Runtime (its default options) on one preprocessed tensor, batch 1, in a loop: the
    engine alone, no HTTP, no decoding;
  - cvdeploy: `cvdeploy serve BUNDLE --instances 2` (its documented tuning for a 2-core machine), the image API;
  - LitServe 0.2.19: one worker (its default), its documented decode_request / predict / encode_response API,
    around the same model through cvdeploy's own stages (decode, prepare, infer, finish).
Both servers get the same JPEG images as JSON `{"image": base64}` (an image form both document) from the same
load generator (benchmarks/serve_load.py's prepared-request client), at each concurrency. Printed: images/s
(median over rounds), p99 latency (median over rounds), errors, and the ratios at each concurrency. Targets:
at concurrency 8, cvdeploy >= 1.05x the naive loop and >= 1.3x LitServe. Only 127.0.0.1 is used; requests and time
are bounded. Needs `pip install litserve` (not a cvdeploy dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from serve_load import (  # the sibling benchmark (this folder is on sys.path when run as a script)
    free_port,
    load,
    scratch_dir,
    wait_ready,
)

os.environ.setdefault("YOLO_OFFLINE", "1")

LITSERVE_APP = textwrap.dedent('''
    import base64, sys
    import litserve as ls
    from cvdeploy import Predictor

    class YoloAPI(ls.LitAPI):
        def setup(self, device):
            self.p = Predictor(sys.argv[1])

        def decode_request(self, request):
            return self.p.decode(base64.b64decode(request["image"]))

        def predict(self, image):
            prepared = self.p.prepare([image])
            return prepared, self.p.infer_all(prepared.tensor)

        def encode_response(self, output):
            prepared, outputs = output
            (result,) = self.p.finish(prepared, outputs)
            return result.to_dict()

    if __name__ == "__main__":
        ls.LitServer(YoloAPI(), accelerator="cpu", workers_per_device=1).run(port=int(sys.argv[2]), generate_client_file=False)
''')


def naive_loop(bundle: Path, image: bytes, seconds: float, threads: int = 0) -> float:
    """Images/s of ONNX Runtime's session.run on one prepared tensor, batch 1, default session options (or `threads`)."""
    import onnxruntime as ort

    from cvdeploy import Predictor

    p = Predictor(bundle)
    tensor = p.prepare([p.decode(image)]).tensor
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(p.bundle.variant_path(p.variant)), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: tensor}
    for _ in range(5):
        session.run(None, feed)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, feed)
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="320,640")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import cv2

    from cvdeploy.build import build_bundle
    from cvdeploy.bundle.environment import cpu_info
    from cvdeploy.demo import DEMO_MODEL
    from cvdeploy.demo.shapes import ShapesConfig, iter_scenes

    work = scratch_dir("cvdeploy-peers-")
    (work / "litserve_app.py").write_text(LITSERVE_APP)
    jpegs = [cv2.imencode(".jpg", s.image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
             for s in iter_scenes(5, "test", 32, ShapesConfig(min_side=320, max_side=960))]
    bodies = [json.dumps({"image": base64.b64encode(j).decode()}).encode() for j in jpegs]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    report: dict[str, dict] = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        bundle = work / f"demo-{size}.cvd"
        build_bundle(DEMO_MODEL, bundle, imgsz=size, name="yolo11n-shapes")
        ours_port, lit_port = free_port(), free_port()
        ours = subprocess.Popen([sys.executable, "-m", "cvdeploy", "serve", str(bundle), "--port", str(ours_port), "--instances", "2",
                                 "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lit = subprocess.Popen([sys.executable, str(work / "litserve_app.py"), str(bundle), str(lit_port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ours_url, lit_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{lit_port}"
        try:
            wait_ready(ours_url, ours)
            wait_ready(lit_url, lit, path="/health")
            targets = {"cvdeploy": (ours_url, "/v1/models/yolo11n-shapes/predict"), "litserve": (lit_url, "/predict")}
            for url, path in targets.values():  # warm the HTTP paths
                asyncio.run(load(url, "", bodies, 4, 40, None, path=path, content_type="application/json"))
            samples: dict[str, list[dict]] = {}
            for r in range(args.rounds):
                order = ["naive", "cvdeploy", "litserve"]
                order = order[r % 3:] + order[: r % 3]
                for system in order:
                    if system == "naive":
                        samples.setdefault("naive", []).append({"throughput_ips": naive_loop(bundle, jpegs[0], 3.0)})
                        # for context (not the target's baseline): one thread, which a shared 2-core machine favours
                        samples.setdefault("naive1", []).append({"throughput_ips": naive_loop(bundle, jpegs[0], 3.0, threads=1)})
                        continue
                    url, path = targets[system]
                    for c in concurrencies:
                        res = asyncio.run(load(url, "", bodies, c, args.requests, None, path=path, content_type="application/json"))
                        samples.setdefault(f"{system} c={c}", []).append(res)
                print(f"{size} px round {r + 1}/{args.rounds} done", flush=True)
        finally:
            for proc in (ours, lit):
                proc.terminate()
                proc.wait(timeout=60)
        naive = statistics.median(s["throughput_ips"] for s in samples["naive"])
        naive1 = statistics.median(s["throughput_ips"] for s in samples["naive1"])
        rows = {"naive": {"ips": round(naive, 1)}, "naive_1_thread": {"ips": round(naive1, 1)}}
        print(f"\n{size} px: naive loop {naive:.1f} img/s (batch 1, ORT defaults); with 1 thread {naive1:.1f} img/s")
        print(f"{'concurrency':>12}{'cvdeploy img/s':>16}{'p99 ms':>9}{'LitServe img/s':>16}{'p99 ms':>9}{'vs naive':>10}{'vs LitServe':>13}{'errors':>8}")
        for c in concurrencies:
            o, lt = samples[f"cvdeploy c={c}"], samples[f"litserve c={c}"]
            o_ips, l_ips = statistics.median(x["throughput_ips"] for x in o), statistics.median(x["throughput_ips"] for x in lt)
            o_p99, l_p99 = statistics.median(x["p99_ms"] for x in o), statistics.median(x["p99_ms"] for x in lt)
            errors = sum(x["errors"] for x in o + lt)
            rows[f"c={c}"] = {"cvdeploy_ips": round(o_ips, 1), "cvdeploy_p99_ms": round(o_p99, 1), "litserve_ips": round(l_ips, 1),
                              "litserve_p99_ms": round(l_p99, 1), "vs_naive": round(o_ips / naive, 3),
                              "vs_litserve": round(o_ips / l_ips, 3), "errors": errors}
            print(f"{c:>12}{o_ips:>16.1f}{o_p99:>9.1f}{l_ips:>16.1f}{l_p99:>9.1f}{o_ips / naive:>9.2f}x{o_ips / l_ips:>12.2f}x{errors:>8}")
        report[str(size)] = rows
    c8 = {s: r.get("c=8") for s, r in report.items()}
    checks = {f"{s}px_c8_vs_naive_ge_1.05": bool(r and r["vs_naive"] >= 1.05) for s, r in c8.items()} | \
             {f"{s}px_c8_vs_litserve_ge_1.3": bool(r and r["vs_litserve"] >= 1.3) for s, r in c8.items()}
    print(json.dumps(checks, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": {"python": platform.python_version(), "cpu": cpu_info(), "cores": os.cpu_count()},
                                         "rounds": args.rounds, "requests": args.requests, "results": report, "checks": checks},
                                        indent=2))


if __name__ == "__main__":
    main()
