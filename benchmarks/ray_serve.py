"""Throughput of a bundle on Ray Serve (2 replicas x 1 CPU, 1 replica x 2 CPUs) and on `cvdeploy serve --instances 2`,
each against one Predictor called in a loop in interleaved rounds; c=8 HTTP clients, JPEG uploads of shapes scenes.

    python benchmarks/ray_serve.py BUNDLE [--rounds 5] [--out work-tmp/ray-bench]

Prints JSON: median images/s and latency per configuration, and the median per-round ratio to the loop.
Needs `pip install 'cvdeploy[ray]'`. A local Ray is started on 127.0.0.1 with 2 CPUs and shut down at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from serve_load import free_port, wait_ready  # the sibling benchmark (this folder is on sys.path when run as a script)

N = 96  # requests per round


def loop_round(predictor, blobs: list[bytes]) -> tuple[float, float]:
    lat = []
    t0 = time.perf_counter()
    for i in range(N):
        a = time.perf_counter()
        predictor.predict(blobs[i % len(blobs)])
        lat.append(time.perf_counter() - a)
    return N / (time.perf_counter() - t0), statistics.median(lat) * 1000


def http_round(client: httpx.Client, url: str, blobs: list[bytes], c: int = 8) -> tuple[float, float]:
    lat: list[float] = []

    def one(i: int) -> None:
        a = time.perf_counter()
        r = client.post(url, content=blobs[i % len(blobs)])
        lat.append(time.perf_counter() - a)
        assert r.status_code == 200, r.text

    t0 = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        list(pool.map(one, range(N)))
    return N / (time.perf_counter() - t0), statistics.median(lat) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("work-tmp/ray-bench"))
    args = ap.parse_args()

    import ray
    from ray import serve

    from cvdeploy import Predictor
    from cvdeploy.demo.shapes import generate_shapes
    from cvdeploy.deploy.ray_serve import start

    root = generate_shapes(args.out / "shapes", n_train=0, n_val=24, seed=77).parent
    blobs = [p.read_bytes() for p in sorted((root / "images" / "val").iterdir())]
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    configs = {"ray 2x1cpu b8": dict(replicas=2, num_cpus_per_replica=1, max_batch_size=8, batch_wait_timeout_s=0.005),
               "ray 1x2cpu b8": dict(replicas=1, num_cpus_per_replica=2, max_batch_size=8, batch_wait_timeout_s=0.005)}
    serve_name = "cvdeploy serve --instances 2"
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in ["loop@serve", serve_name, *configs, *("loop@" + c for c in configs)]}
    with Predictor(args.bundle) as p, httpx.Client(timeout=120, limits=httpx.Limits(max_connections=16)) as client:
        name = p.bundle.name
        for _ in range(10):
            p.predict(blobs[0])
        sport = free_port()
        srv = subprocess.Popen([sys.executable, "-m", "cvdeploy", "serve", str(args.bundle), "--port", str(sport),
                                "--instances", "2", "--log-level", "warning"], stderr=subprocess.DEVNULL)
        try:
            wait_ready(f"http://127.0.0.1:{sport}", srv)
            url = f"http://127.0.0.1:{sport}/v1/models/{name}/predict"
            http_round(client, url, blobs)  # warm-up
            for _ in range(args.rounds):
                res["loop@serve"].append(loop_round(p, blobs))
                res[serve_name].append(http_round(client, url, blobs))
        finally:
            srv.terminate()
            srv.wait()
        port = free_port()
        for cname, opts in configs.items():
            url = start([args.bundle], host="127.0.0.1", port=port, **opts)[name]
            http_round(client, url, blobs)  # warm-up
            for _ in range(args.rounds):
                res["loop@" + cname].append(loop_round(p, blobs))
                res[cname].append(http_round(client, url, blobs))
            serve.delete(name)
    serve.shutdown()
    ray.shutdown()
    summary: dict[str, dict] = {k: {"images_per_s_median": round(statistics.median(x[0] for x in v), 1),
                                    "latency_ms_median": round(statistics.median(x[1] for x in v), 1), "rounds": len(v)}
                                for k, v in res.items()}
    for k in [serve_name, *configs]:
        base = res["loop@serve" if k == serve_name else "loop@" + k]
        summary[k]["ratio_vs_loop_median"] = round(statistics.median(a[0] / b[0] for a, b in zip(res[k], base, strict=True)), 2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
