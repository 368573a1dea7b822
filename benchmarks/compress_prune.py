"""Structured pruning of the demo detector, a sweep over MACs ratios, each pruned model fine-tuned and verified:

    nice -n 10 python benchmarks/compress_prune.py --out work-tmp/compress/prune [--ratios 0.5,0.35,0.7] [--epochs 4]

For each ratio: prune yolo11n-shapes.pt (torch-pruning, L2 magnitude), measure the pruned model's mAP before
fine-tuning, fine-tune it with the Ultralytics trainer on the shapes training split (seed 0), add it to a bundle of the
demo model as onnx-prunedNN-fp32 (parity against its own torch model, mAP50-95 budget 2.0 points against onnx-fp32),
then time every model (onnx-fp32 and each pruned ONNX, verified or not) interleaved in one run. Writes OUT/summary.json
and prints a markdown table (docs/compression.md). `--resume` continues interrupted fine-tunings.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("work-tmp/compress/prune"))
    p.add_argument("--ratios", default="0.5,0.35,0.7", help="MACs ratios to prune to, comma-separated")
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--importance", default="magnitude", choices=["magnitude", "taylor"])
    p.add_argument("--round-to", type=int, default=None, help="channel counts kept multiples of this (16: AVX-512)")
    p.add_argument("--max-map-drop", type=float, default=2.0)
    p.add_argument("--distill-weight", type=float, default=0.0, help="fine-tune with the source as teacher (0: off)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed (the data and the pruning stay seed 0)")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    from cvdeploy.bench.latency import interleaved_latency
    from cvdeploy.build import build_bundle
    from cvdeploy.build.compress.common import export_onnx
    from cvdeploy.build.compress.pipeline import prune_to_variant
    from cvdeploy.bundle.bundle import Bundle
    from cvdeploy.demo import DEMO_MODEL
    from cvdeploy.demo.shapes import generate_shapes

    out = args.out.resolve()
    t_all = time.time()
    data = out / "data" / "data.yaml"
    if not data.is_file():
        data = generate_shapes(out / "data", n_train=args.n_train, n_val=args.n_val, seed=0)
    bundle = out / "yolo11n-shapes.cvd"
    if not bundle.is_dir():
        build_bundle(DEMO_MODEL, bundle, name="yolo11n-shapes")
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        run = out / f"r{ratio:g}"
        t0 = time.time()
        resume = args.resume and (run / "finetune" / "weights" / "last.pt").is_file() and not (run / "done.json").is_file()
        if (run / "done.json").is_file():
            rows.append(json.loads((run / "done.json").read_text()))
            continue
        outcome, record = prune_to_variant(
            bundle, model=DEMO_MODEL, data=data, out=run, macs_ratio=ratio, importance=args.importance,
            round_to=args.round_to,
            epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=args.workers, seed=args.seed,
            max_map_drop=args.max_map_drop, distill_weight=args.distill_weight, resume=resume,
            progress=lambda r, ratio=ratio: print(f"[prune {ratio:g}] epoch {r['epoch']}/{r['epochs']} "
                                                  f"mAP50-95 {r['map50_95']:.4f} losses {r.get('box_loss')} "
                                                  f"{r.get('cls_loss')} {r.get('dfl_loss')}", flush=True),
            on_step=lambda v, s: print(f"[{v}] {s}", flush=True))
        v = outcome.variant
        export_onnx(run / "finetune" / "weights" / "best.pt", run / "finetuned.onnx", args.imgsz)
        export_onnx(run / "pruned.pt", run / "pruned.onnx", args.imgsz)
        row = {"ratio_target": ratio, "variant": outcome.name, "written": outcome.written, "reason": outcome.reason,
               "macs_ratio": record["macs_ratio"], "params_ratio": record["params_ratio"],
               "macs_after": record["macs_after"], "params_after": record["params_after"],
               "map50_95": v.metrics.get("map50_95") if v else None,
               "map50_95_drop_points": v.metrics.get("map50_95_drop_points") if v else None,
               "epochs": args.epochs, "n_train": args.n_train, "finetune_wall_s": record["wall_time_s"],
               "history": record["history"], "total_wall_s": round(time.time() - t0, 1)}
        (run / "done.json").write_text(json.dumps(row, indent=2))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)

    # Before fine-tuning: the pruned model's mAP through the same evaluator (a throwaway bundle per ratio).
    from cvdeploy.evaluate import evaluate_detect
    from cvdeploy.predict import Predictor

    for row in rows:
        run = out / f"r{row['ratio_target']:g}"
        with Predictor(Bundle.load(run / "pruned.onnx")) as pr:
            row["map50_95_before_finetune"] = round(evaluate_detect(pr, data).map50_95, 5)
    b = Bundle.load(bundle)
    base_map = b.manifest.variants["onnx-fp32"].metrics.get("map50_95")
    golden = next(b.golden()).input[:1]
    models = {"onnx-fp32": (b.variant_path("onnx-fp32"), "onnxruntime", "fp32")}
    models |= {f"pruned {r['ratio_target']:g}": (out / f"r{r['ratio_target']:g}" / "finetuned.onnx", "onnxruntime", "fp32")
               for r in rows}
    lat = interleaved_latency(models, golden, rounds=10, per_round=10)
    for r in rows:
        r["latency_ms_b1"] = round(lat[f"pruned {r['ratio_target']:g}"], 3)
        r["speedup_vs_fp32"] = round(lat["onnx-fp32"] / r["latency_ms_b1"], 3)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": "python benchmarks/compress_prune.py "
               + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "resume")),
               "source_map50_95": base_map, "onnx_fp32_latency_ms_b1": round(lat["onnx-fp32"], 3), "rows": rows,
               "bundle_variants": {n: v.metrics for n, v in b.manifest.variants.items()},
               "wall_s": round(time.time() - t_all, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("| MACs kept | params kept | mAP50-95 before FT | after FT | drop (points) | ms b1 | speed-up | variant |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['macs_ratio']:.1%} | {r['params_ratio']:.1%} | {r['map50_95_before_finetune']:.4f} | {r['map50_95']} | "
              f"{r['map50_95_drop_points']} | {r['latency_ms_b1']:.2f} | {r['speedup_vs_fp32']:.2f}x | "
              f"{r['variant'] if r['written'] else 'refused: ' + r['reason']} |")
    print(f"source onnx-fp32: mAP50-95 {base_map}, {lat['onnx-fp32']:.2f} ms")


if __name__ == "__main__":
    main()
