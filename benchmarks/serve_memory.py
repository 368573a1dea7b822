"""Memory soak of `cvdeploy serve` under hostile request mixes: does resident memory stay under its ceiling?

    python benchmarks/serve_memory.py [--bundle DIR] [--max-inflight-mb 512] [--rounds 3] [--json OUT]

The server runs in its own process on 127.0.0.1 (so its RSS is its own) with `--max-inflight-mb`. Each round sends,
concurrently and bounded in count:
  - 8 binary FP32 tensors of 30 MB each (1x3x1600x1600: larger than the server allows for this model, refused after
    their bodies were read) and 8 of 25 MB (2x3x1024x1024: the largest allowed, 4x the model's 256 px) to the v2 route,
  - 4 JSON FP32 tensors of ~29 MB each (1x3x1152x1152 as JSON numbers),
  - 16 JPEG uploads to the image API,
while the server's RSS is sampled every 20 ms. It prints the baseline (after warm-up), the peak, the RSS after each
round, the answers by status (503 is the admission refusing what does not fit), and the ceiling the docs give:
baseline + max_inflight + the engine's working memory at the largest admitted input (measured here as the RSS
rise of one lone 1600 px request). Before the admission budget (issue 11): 16 x 30 MB took RSS from 250 MB to 3.9 GB,
never returned.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from serve_load import free_port, rss_mb, wait_ready  # the sibling benchmark (this folder is on sys.path when run as a script)

os.environ.setdefault("YOLO_OFFLINE", "1")


def post(port: int, path: str, body: bytes, headers: dict[str, str]) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        c.request("POST", path, body=body, headers=headers)
        r = c.getresponse()
        r.read()
        return r.status
    except (ConnectionError, http.client.HTTPException):
        return -1
    finally:
        c.close()


def binary_tensor(shape: tuple[int, ...], name: str) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    head = json.dumps({"inputs": [{"name": name, "shape": list(shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def json_tensor(shape: tuple[int, ...], name: str) -> bytes:
    x = np.round(np.random.default_rng(1).random(shape, dtype=np.float32).astype(np.float64), 3)
    return json.dumps({"inputs": [{"name": name, "shape": list(shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}).encode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="a bundle (default: the demo bundle, built if needed)")
    ap.add_argument("--max-inflight-mb", type=float, default=512.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    bundle = args.bundle
    if bundle is None:
        from cvdeploy.build import build_bundle
        from cvdeploy.demo import DEMO_MODEL

        bundle = Path("work-tmp/serve-memory/demo.cvd")
        if not bundle.is_dir():
            build_bundle(DEMO_MODEL, bundle, name="yolo11n-shapes")
    from cvdeploy.bundle import Bundle

    model = Bundle.load(bundle).name
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cvdeploy", "serve", str(bundle), "--port", str(port), "--max-body-mb", "40",
                               "--max-inflight-mb", str(args.max_inflight_mb), "--log-level", "warning"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", server)
        infer, predict = f"/v2/models/{model}/infer", f"/v1/models/{model}/predict"
        import cv2

        from cvdeploy.demo.shapes import sample_scene

        scene = sample_scene(np.random.default_rng(3)).image
        jpeg = cv2.imencode(".jpg", cv2.resize(scene, (1280, 960)))[1].tobytes()
        huge_bin, huge_headers = binary_tensor((1, 3, 1600, 1600), "images")
        big_bin, big_headers = binary_tensor((2, 3, 1024, 1024), "images")
        big_json = json_tensor((1, 3, 1152, 1152), "images")
        print(f"bodies: binary {len(huge_bin) / 1e6:.1f} and {len(big_bin) / 1e6:.1f} MB, JSON {len(big_json) / 1e6:.1f} MB, "
              f"JPEG {len(jpeg) / 1e3:.0f} kB")

        for _ in range(3):  # warm-up at every size the soak uses
            post(port, predict, jpeg, {"Content-Type": "image/jpeg"})
        base = rss_mb(server.pid)
        one = [0.0]
        sampler_stop = threading.Event()

        def sample() -> None:
            while not sampler_stop.is_set():
                one[0] = max(one[0], rss_mb(server.pid))
                time.sleep(0.02)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        assert post(port, infer, big_bin, big_headers) == 200  # one lone largest request: the engine's working memory
        engine_mb = one[0] - base
        print(f"baseline RSS {base:.0f} MB; one lone largest tensor raised it by {engine_mb:.0f} MB (engine working memory)")

        peak = [rss_mb(server.pid)]
        statuses: dict[int, int] = {}
        after_rounds = []

        def sample_peak() -> None:
            while not sampler_stop.is_set():
                peak[0] = max(peak[0], rss_mb(server.pid))
                time.sleep(0.02)

        sampler_stop.set()
        t.join()
        sampler_stop.clear()
        t = threading.Thread(target=sample_peak, daemon=True)
        t.start()
        jobs = [(infer, huge_bin, huge_headers)] * 8 + [(infer, big_bin, big_headers)] * 8 + \
            [(infer, big_json, {"Content-Type": "application/json"})] * 4 + [(predict, jpeg, {"Content-Type": "image/jpeg"})] * 16
        t0 = time.perf_counter()
        for r in range(args.rounds):
            with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                for code in pool.map(lambda j: post(port, *j), jobs):
                    statuses[code] = statuses.get(code, 0) + 1
            time.sleep(1.0)
            after_rounds.append(rss_mb(server.pid))
            print(f"round {r + 1}: RSS {after_rounds[-1]:.0f} MB, peak so far {peak[0]:.0f} MB, answers {dict(sorted(statuses.items()))}")
        sampler_stop.set()
        t.join()
        ceiling = base + engine_mb + args.max_inflight_mb
        figures = {"baseline_mb": round(base, 1), "engine_working_mb": round(engine_mb, 1), "peak_mb": round(peak[0], 1),
                   "after_rounds_mb": [round(x, 1) for x in after_rounds], "ceiling_mb": round(ceiling, 1),
                   "max_inflight_mb": args.max_inflight_mb, "statuses": statuses, "wall_s": round(time.perf_counter() - t0, 1),
                   "requests": len(jobs) * args.rounds}
        print(json.dumps(figures, indent=2))
        print(f"peak {peak[0]:.0f} MB against a ceiling of {ceiling:.0f} MB (baseline + engine working memory + max in flight): "
              f"{'UNDER' if peak[0] <= ceiling else 'OVER'}; no 5xx: {all(k < 500 or k == 503 for k in statuses)}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
