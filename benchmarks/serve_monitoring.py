"""Live drift monitoring (`cvdeploy serve`, serve/monitor.py): how many requests a shift takes to raise the alert (N), how
often an in-distribution stream raises it (false alarms), and what monitoring costs (throughput, on against off, c=8).

    python benchmarks/serve_monitoring.py [--reps 3] [--long 10000] [--rounds 7] [--requests 300] [--json OUT]

The demo bundle with a baseline profile of 300 generated validation scenes (seed 7), served with the default drift
settings (window 200, pixel sample 0.1, every 50, 2 in a row, CPU budget 5 % of a core). Live images are other scenes
of the same generator (other seeds), JPEG 92 as the baseline's.

1. Detection, through a real server: 200 in-distribution requests fill the window, then a shifted stream until the alert
   (at most 1000): darker (x0.6 exposure), rescaled (half the resolution), another class mix (every object other than a
   circle or a square redrawn as a circle of its size and colour: as many objects, mostly circles). N = shifted requests until the alert; the model is reloaded between runs (a fresh window).
2. False alarms: `--long` in-distribution images through the same monitor code in-process (predictions by the same
   Predictor, pixel statistics of a random 10 %), every evaluation counted.
3. Cost: two servers of the bundle (CVDEPLOY_SERVE_DRIFT_MONITOR=1 and 0: the same code and a flag), the same load
   generator (benchmarks/serve_load.py) at concurrency 8, alternating rounds; medians and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import cv2
import httpx
import numpy as np
from serve_load import (  # the sibling benchmark (this folder is on sys.path when run as a script)
    cpu_by_role,
    free_port,
    load,
    scratch_dir,
    wait_ready,
)

os.environ.setdefault("YOLO_OFFLINE", "1")
MODEL = "yolo11n-shapes"
KEEP = (0, 1)  # circle, square: the class-mix shift keeps these


def darker(scene) -> np.ndarray:
    return (scene.image.astype(np.float32) * 0.6).astype(np.uint8)


def rescaled(scene) -> np.ndarray:
    h, w = scene.image.shape[:2]
    return cv2.resize(scene.image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)


def class_mix(scene) -> np.ndarray:
    """The scene with every object other than a circle or a square replaced by a circle of its size and colour, with the
    scene's noise: as many objects, mostly circles."""
    img = scene.image.copy()
    rng = np.random.default_rng(len(scene.objects))
    for o in scene.objects:
        if o.class_id in KEEP:
            continue
        mask = np.zeros(img.shape[:2], np.uint8)
        cv2.fillPoly(mask, [np.round(o.polygon).astype(np.int32)], 255)
        colour = cv2.mean(img, mask)[:3]
        img = cv2.inpaint(img, cv2.dilate(mask, np.ones((5, 5), np.uint8)), 5, cv2.INPAINT_TELEA)
        x1, y1, x2, y2 = o.xyxy
        disc = np.zeros(img.shape[:2], np.uint8)
        cv2.circle(disc, (int((x1 + x2) / 2), int((y1 + y2) / 2)), max(4, int(min(x2 - x1, y2 - y1) / 2)), 255, -1, cv2.LINE_AA)
        noisy = np.clip(np.array(colour, np.float32) + rng.normal(0, 6, img.shape).astype(np.float32), 0, 255).astype(np.uint8)
        img = np.where(disc[..., None] > 0, noisy, img)
    return img


def thread_cpu(pid: int, comm: str) -> float:
    """CPU seconds of the threads of `pid` named `comm` (the monitor's thread names itself cvd-drift)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            if Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() == comm:
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            continue
    return total


def jpegs(seed: int, n: int, shift: Callable | None = None) -> list[bytes]:
    from cvdeploy.demo.shapes import iter_scenes

    return [cv2.imencode(".jpg", shift(s) if shift else s.image, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
            for s in iter_scenes(seed, "test", n)]


async def send(client: httpx.AsyncClient, blobs: list[bytes], c: int = 8) -> None:
    sem = asyncio.Semaphore(c)

    async def one(b: bytes) -> None:
        async with sem:
            r = await client.post(f"/v1/models/{MODEL}/predict", content=b)
            if r.status_code != 200:
                raise SystemExit(f"a request failed: {r.status_code} {r.text[:200]}")

    await asyncio.gather(*(one(b) for b in blobs))


async def detection_run(url: str, warm: list[bytes], shifted: list[bytes], every: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        (await client.post(f"/v2/repository/models/{MODEL}/load")).raise_for_status()  # a fresh window
        await send(client, warm)
        before = (await client.get("/admin/drift", params={"sync": "true"})).json()["models"][0]
        for i in range(0, len(shifted), every):
            await send(client, shifted[i:i + every])
            now = (await client.get("/admin/drift", params={"sync": "true"})).json()["models"][0]
            if now["alert"]:
                return {"n": now["alert_since"] - len(warm), "statistics": now["alert_statistics"],
                        "top": now["findings"][0]["message"], "false_alarm_before": before["alert"]}
    return {"n": None, "statistics": [], "top": now["findings"][0]["message"], "false_alarm_before": before["alert"]}


def false_alarms(bundle: Path, n: int, seed0: int) -> dict:
    """`n` in-distribution images through DriftMonitor as the server feeds it (pixel statistics of a random share)."""
    import random

    from cvdeploy import Predictor
    from cvdeploy.build.profile_step import read_profile
    from cvdeploy.demo.shapes import iter_scenes
    from cvdeploy.serve.metrics import ServerMetrics
    from cvdeploy.serve.monitor import DriftMonitor, image_sample, prediction_sample
    from cvdeploy.serve.settings import ServeSettings

    s = ServeSettings()
    rng = random.Random(0)
    with Predictor(bundle) as p:
        model = {"bundle": p.bundle.name, "variant": p.variant, "conf": p.options.conf, "iou": p.options.iou, "max_det": p.options.max_det}
        mon = DriftMonitor(MODEL, "1", read_profile(p.bundle), s, ServerMetrics(), model=model)
        mon.activate()
        serious_evals, raised, serious_by = 0, 0, Counter()
        last_eval, was = 0, False
        t0 = time.perf_counter()
        for i, scene in enumerate(iter_scenes(seed0, "test", n)):
            data = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
            img = p.decode(data)
            sample = prediction_sample(p.predict(img), image_sample(img.shape, data, img if rng.random() < s.drift_sample else None))
            mon.add(sample)
            if mon.evaluations > last_eval:
                last_eval = mon.evaluations
                bad = [d.statistic for d in mon.findings if d.severity == "serious"]
                serious_evals += bool(bad)
                serious_by.update(bad)
                raised += mon.alert and not was
                was = mon.alert
            if (i + 1) % 2000 == 0:
                print(f"  false alarms: {i + 1}/{n} images, {raised} alerts, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return {"images": n, "evaluations": mon.evaluations, "evaluations_with_a_serious_statistic": serious_evals,
            "serious_by_statistic": dict(serious_by), "alerts_raised": raised,
            "false_alarms_per_10k_requests": round(raised * 10000 / n, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="detection runs per shift")
    ap.add_argument("--long", type=int, default=10000, help="in-distribution images for the false-alarm rate (0: skip)")
    ap.add_argument("--rounds", type=int, default=7, help="cost: rounds per configuration (0: skip)")
    ap.add_argument("--requests", type=int, default=300, help="cost: requests per round")
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from cvdeploy.build import build_bundle
    from cvdeploy.build.profile_step import write_profile
    from cvdeploy.demo import DEMO_MODEL
    from cvdeploy.demo.shapes import generate_shapes
    from cvdeploy.serve.settings import ServeSettings

    work = scratch_dir("cvdeploy-monitor-")
    bundle = work / "demo.cvd"
    b = build_bundle(DEMO_MODEL, bundle, name=MODEL)
    write_profile(b, generate_shapes(work / "shapes", n_train=0, n_val=300, seed=7))
    b.save_manifest()
    defaults = ServeSettings()
    out: dict = {"settings": {k: getattr(defaults, k) for k in ("drift_window", "drift_sample", "drift_every", "drift_min_requests",
                                                                 "drift_consecutive")}, "baseline_images": 300}

    ports = {"on": free_port(), "off": free_port()}
    procs = {k: subprocess.Popen([sys.executable, "-m", "cvdeploy", "serve", str(bundle), "--port", str(p), "--instances",
                                  str(args.instances), "--log-level", "warning"], env={**os.environ, "CVDEPLOY_SERVE_DRIFT_MONITOR":
                                  "1" if k == "on" else "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for k, p in ports.items()}
    urls = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
    try:
        for k, u in urls.items():
            wait_ready(u, procs[k])
        detection: dict[str, list[dict]] = {}
        for name, shift in (("darker x0.6", darker), ("half resolution", rescaled), ("class mix (mostly circles)", class_mix)):
            for rep in range(args.reps):
                seed = 1000 + 10 * rep
                res = asyncio.run(detection_run(urls["on"], jpegs(seed, defaults.drift_window), jpegs(seed + 1, 1000, shift),
                                                defaults.drift_every))
                detection.setdefault(name, []).append(res)
                print(f"  {name} #{rep + 1}: N = {res['n']} ({', '.join(res['statistics'])})", file=sys.stderr)
        out["detection"] = {k: {"n": [r["n"] for r in v], "median_n": statistics.median([r["n"] if r["n"] is not None else 10**9 for r in v]),
                                "alert_statistics": sorted({s for r in v for s in r["statistics"]}), "top_finding": v[0]["top"],
                                "false_alarm_in_warmup": sum(r["false_alarm_before"] for r in v)} for k, v in detection.items()}
        if args.rounds:
            images = jpegs(50, 64)
            for u in urls.values():
                asyncio.run(load(u, MODEL, images, 8, 60, None))
            ips: dict[str, list[float]] = {"on": [], "off": []}
            cpu: dict[str, list[float]] = {"on": [], "off": []}  # server CPU ms per request, every thread
            drift_cpu = 0.0
            for r in range(args.rounds):
                for k in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    before, drift0 = cpu_by_role(procs[k].pid), thread_cpu(procs[k].pid, "cvd-drift")
                    res = asyncio.run(load(urls[k], MODEL, images, 8, args.requests, None))
                    after, drift1 = cpu_by_role(procs[k].pid), thread_cpu(procs[k].pid, "cvd-drift")
                    if res["errors"]:
                        raise SystemExit(f"{k}: {res['errors']} errors")
                    ips[k].append(res["throughput_ips"])
                    cpu[k].append(1000 * sum(after[x] - before[x] for x in after) / args.requests)
                    if k == "on":
                        drift_cpu += drift1 - drift0
            on, off = statistics.median(ips["on"]), statistics.median(ips["off"])
            pairs = [a / b for a, b in zip(ips["on"], ips["off"], strict=True)]  # each round against its neighbour
            metrics = httpx.get(urls["on"] + "/metrics", timeout=30).text
            def metric(name: str) -> float:
                return next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + " ")), 0.0)

            skipped, work = metric("cvdeploy_drift_skipped_requests_total"), metric("cvdeploy_drift_work_seconds_total")
            pixels_skipped = metric("cvdeploy_drift_pixels_skipped_total")
            served = sum(float(line.split()[-1]) for line in metrics.splitlines()
                         if line.startswith("cvdeploy_inference_count_total{"))
            report = httpx.get(urls["on"] + "/admin/drift", timeout=30).json()["models"][0]
            cpu_on, cpu_off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
            out["cost"] = {"on_ips": round(on, 1), "off_ips": round(off, 1), "ratio": round(on / off, 4), "loss": round(1 - on / off, 4),
                           "median_pair_ratio": round(statistics.median(pairs), 4),
                           "server_cpu_ms_per_request_on": round(cpu_on, 3), "server_cpu_ms_per_request_off": round(cpu_off, 3),
                           "cpu_overhead": round(cpu_on / cpu_off - 1, 4),
                           "drift_thread_cpu_ms_per_request": round(1000 * drift_cpu / (args.rounds * args.requests), 3),
                           "rounds": args.rounds, "requests_per_round": args.requests, "rounds_on": [round(x, 1) for x in ips["on"]],
                           "rounds_off": [round(x, 1) for x in ips["off"]], "skipped_queue_full": skipped, "pixel_statistics_skipped_budget": pixels_skipped,
                           "monitor_thread_ms_per_request": round(1000 * work / max(served, 1), 3),
                           "evaluations_during_cost_run": report["evaluations"], "instances": args.instances}
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=60)
    if args.long:
        out["false_alarms"] = false_alarms(bundle, args.long, 5000)
    for k, v in out.get("detection", {}).items():
        print(f"{k}: alert after N = {v['n']} shifted requests (median {v['median_n']}); {', '.join(v['alert_statistics'])}")
    if "false_alarms" in out:
        f = out["false_alarms"]
        print(f"in distribution: {f['alerts_raised']} alert(s) in {f['images']} requests ({f['evaluations']} evaluations, "
              f"{f['evaluations_with_a_serious_statistic']} with a serious statistic)")
    if "cost" in out:
        c = out["cost"]
        print(f"c=8: {c['on_ips']} img/s monitored against {c['off_ips']} unmonitored: ratio {c['ratio']:.3f} of the medians, "
              f"{c['median_pair_ratio']:.3f} median of adjacent rounds ({c['rounds']} alternating rounds each); server CPU "
              f"{c['server_cpu_ms_per_request_on']} vs {c['server_cpu_ms_per_request_off']} ms per request "
              f"({100 * c['cpu_overhead']:+.1f} %), of which the monitor thread {c['drift_thread_cpu_ms_per_request']} ms")
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
