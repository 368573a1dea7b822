"""QAT against PTQ at the same (aggressive) INT8 recipe on the demo detector, accuracy and speed in one run:

    nice -n 10 python benchmarks/compress_qat.py --out work-tmp/compress/qat [--recipe u8s8-w7 --per-tensor --calib-method minmax]
        [--openvino] [--train-images 192 --epochs 4 --lr 5e-5 --distill 1 --labels 0 --range-lr 3e-2 --seed 0] [--no-resume]

1. The shapes set of the demo model (train split: its own 800 training images, seed 0; val: 200 images, seed 0) and a
   bundle of yolo11n-shapes.pt with onnx-fp32 and the default onnx-int8 (PTQ, recipe chosen on this machine).
2. `qat_to_variant`: the PTQ graph of the aggressive recipe (the starting point, its mAP measured), QAT fine-tuning of
   the source under that quantization, the result quantized with the same recipe and added as onnx-qat-int8 (parity
   against its own torch model, mAP budget against onnx-fp32, latency).
3. mAP50-95 (COCO protocol, cvdeploy's Predictor) of every graph on the 200 val images, and batch-1 latency of
   onnx-fp32, onnx-int8, PTQ at the recipe and QAT at the recipe, interleaved in one session.

Prints the figures and ratios, writes OUT/summary.json. The acceptance: QAT recovers at least half of PTQ's mAP drop
when that drop is >= 0.5 point, at PTQ's speed.
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
    p.add_argument("--out", type=Path, default=Path("work-tmp/compress/qat"))
    p.add_argument("--recipe", default="u8s8-w7")
    p.add_argument("--per-tensor", action="store_true", default=True)
    p.add_argument("--per-channel", dest="per_tensor", action="store_false")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--calib-method", default="minmax", choices=["minmax", "percentile", "entropy"])
    p.add_argument("--train-images", type=int, default=192)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--distill", type=float, default=1.0)
    p.add_argument("--labels", type=float, default=0.0, help="weight of the detection loss (0: distillation only)")
    p.add_argument("--range-lr", type=float, default=3e-2, help="Adam lr of the activation ranges (0: not trained)")
    p.add_argument("--seed", type=int, default=0, help="QAT data order and flips (the data set stays seed 0)")
    p.add_argument("--val-images", type=int, default=0, help="per-epoch fake-quant mAP on this many val images (0: none)")
    p.add_argument("--rounds", type=int, default=20, help="latency: interleaved rounds (10 runs each)")
    p.add_argument("--no-resume", dest="resume", action="store_false")
    p.add_argument("--openvino", action="store_true", help="also add and time the QAT graph as OpenVINO IR")
    args = p.parse_args()

    from cvdeploy.bench.latency import interleaved_latency
    from cvdeploy.build import build_bundle
    from cvdeploy.build.compress.qat import QatConfig, qat_to_variant
    from cvdeploy.build.variants import add_variants
    from cvdeploy.bundle.bundle import Bundle
    from cvdeploy.demo import DEMO_MODEL
    from cvdeploy.demo.shapes import generate_shapes

    out = args.out.resolve()
    t_all = time.time()
    data = out / "data" / "data.yaml"
    if not data.is_file():
        data = generate_shapes(out / "data", n_train=800, n_val=200, seed=0)
    bundle = out / "yolo11n-shapes.cvd"
    if not (bundle / "manifest.json").is_file() or "onnx-int8" not in Bundle.load(bundle).manifest.variants:
        build_bundle(DEMO_MODEL, bundle, name="yolo11n-shapes", force=True)
        t0 = time.time()
        add_variants(bundle, ["onnx-fp32", "onnx-int8"], data=data)
        print(f"default PTQ onnx-int8 built in {time.time() - t0:.0f} s", flush=True)

    config = QatConfig(recipe=args.recipe, per_channel=not args.per_tensor, calib_images=args.calib_images,
                       calib_method=args.calib_method,
                       train_images=args.train_images, epochs=args.epochs, batch=args.batch, lr=args.lr,
                       distill=args.distill, labels=args.labels, seed=args.seed, range_lr=args.range_lr, val_images=args.val_images)

    def progress(event: str, d: dict) -> None:
        if event != "step" or d["step"] % 8 == 0:
            print(f"[{time.time() - t_all:6.0f} s] {event} {json.dumps(d)}", flush=True)

    t0 = time.time()
    outcome, record = qat_to_variant(bundle, model=DEMO_MODEL, data=data, out=out / "run", config=config,
                                     max_map_drop=2.0, resume=args.resume, openvino=args.openvino, progress=progress,
                                     on_step=lambda v, s: print(f"[{time.time() - t_all:6.0f} s] {v}: {s}", flush=True))
    qat_wall = time.time() - t0
    m = Bundle.load(bundle).manifest
    print(f"onnx-qat-int8: {'written' if outcome.written else 'NOT written: ' + outcome.reason}", flush=True)

    recipe = (f"{config.recipe}{' per-tensor' if args.per_tensor else ''}"
              f"{'' if args.calib_method == 'minmax' else ' ' + args.calib_method}")
    graphs = {"onnx-fp32": (bundle / m.variants["onnx-fp32"].file, "onnxruntime", "fp32"),
              "onnx-int8 (PTQ default)": (bundle / m.variants["onnx-int8"].file, "onnxruntime", "int8"),
              f"PTQ {recipe}": (out / "run" / "ptq-int8.onnx", "onnxruntime", "int8"),
              f"QAT {recipe}": (out / "run" / "qat-int8.onnx", "onnxruntime", "int8")}
    if "openvino-qat-int8" in m.variants:
        graphs[f"QAT {recipe}, OpenVINO IR"] = (bundle / m.variants["openvino-qat-int8"].file, "openvino", "int8")
    golden = next(Bundle.load(bundle).golden()).input[:1]
    lat = interleaved_latency(graphs, golden, rounds=args.rounds, per_round=10, warmup=5)
    labels = list(graphs)
    fp32 = m.variants["onnx-fp32"].metrics["map50_95"]
    maps = {labels[0]: fp32, labels[1]: m.variants["onnx-int8"].metrics["map50_95"],
            labels[2]: record["ptq_reference"]["map50_95"], labels[3]: record.get("map50_95")}
    if len(labels) > 4:
        maps[labels[4]] = m.variants["openvino-qat-int8"].metrics.get("map50_95")
    ptq_drop = 100 * (fp32 - maps[labels[2]])
    qat_drop = None if maps[labels[3]] is None else 100 * (fp32 - maps[labels[3]])
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": m.environment.get("cpu"),
        "config": record["config"], "train_images": record["train_images"], "epochs": record["epochs"],
        "train_seconds": record["train_seconds"], "qat_wall_seconds": round(qat_wall, 1),
        "written": outcome.written, "reason": outcome.reason,
        "map50_95": {k: None if v is None else round(v, 5) for k, v in maps.items()},
        "drop_points": {"ptq": round(ptq_drop, 3), "qat": None if qat_drop is None else round(qat_drop, 3)},
        "recovered_share": None if qat_drop is None or ptq_drop <= 0 else round((ptq_drop - qat_drop) / ptq_drop, 3),
        "latency_ms_b1": {k: round(v, 3) for k, v in lat.items()},
        "speed_vs_fp32": {k: round(lat[labels[0]] / v, 3) for k, v in lat.items()},
        "qat_over_ptq_latency": round(lat[labels[3]] / lat[labels[2]], 3),
        "node_types_same_as_ptq": record["same_node_types_as_ptq"], "qlinearconv": record["node_types"].get("QLinearConv"),
        "history": record["history"], "wall_seconds": round(time.time() - t_all, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print("\n| graph | mAP50-95 | drop (points) | latency b1 (ms, median) | vs onnx-fp32 |\n|---|---|---|---|---|")
    for k in labels:
        mp = maps[k]
        drop = "" if mp is None or k == labels[0] else f"{100 * (fp32 - mp):.2f}"
        print(f"| {k} | {'' if mp is None else f'{mp:.4f}'} | {drop} | {lat[k]:.2f} | {lat[labels[0]] / lat[k]:.2f}x |")


if __name__ == "__main__":
    main()
