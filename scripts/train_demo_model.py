"""Train the bundled demo model: YOLO11n from yolo11n.yaml (no pretrained weights) on the shapes dataset.

    python scripts/train_demo_model.py --out work-tmp/demo-train

Writes the dataset, trains on the CPU, validates on the generated val split and copies the
stripped weights to src/cvdeploy/demo/yolo11n-shapes.pt (with --install). The command, seed,
epochs, wall time and mAP are written to OUT/train_summary.json; docs/demo-model.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # no font, asset or hub download

from cvdeploy.demo.shapes import generate_shapes

PACKAGED = Path(__file__).resolve().parents[1] / "src" / "cvdeploy" / "demo" / "yolo11n-shapes.pt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("work-tmp/demo-train"))
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--finetune", type=Path, default=None,
                   help="start from these weights (a second stage: e.g. more epochs from a first run's best.pt)")
    p.add_argument("--lr0", type=float, default=0.01, help="initial learning rate (use ~0.002 with --finetune)")
    p.add_argument("--install", action="store_true", help="copy the weights into the package")
    args = p.parse_args()

    from ultralytics import YOLO

    t0 = time.time()
    data = generate_shapes(args.out / "data", n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    model = YOLO(str(args.finetune) if args.finetune else "yolo11n.yaml")
    model.train(lr0=args.lr0, warmup_epochs=0 if args.finetune else 3,
        data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=args.workers,
        seed=args.seed, deterministic=True, nbs=args.batch, cache="ram", device="cpu", amp=False, plots=False, pretrained=False,
        project=str(args.out.resolve()), name="train", exist_ok=True, close_mosaic=max(1, args.epochs // 6),
        val=True, verbose=False,
    )
    train_s = time.time() - t0
    best = args.out.resolve() / "train" / "weights" / "best.pt"
    metrics = YOLO(str(best)).val(data=str(data), imgsz=args.imgsz, batch=16, device="cpu", plots=False, verbose=False)
    # The figure the project quotes: COCO protocol (faster-coco-eval) through cvdeploy's own Predictor.
    from cvdeploy import Predictor
    from cvdeploy.build import build_bundle
    from cvdeploy.evaluate import evaluate_detect

    bundle = build_bundle(best, args.out / "demo.cvd", force=True)
    coco = evaluate_detect(Predictor(bundle), data)
    summary = {
        "command": "python scripts/train_demo_model.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("install",) and v is not None
        ),
        "seed": args.seed, "epochs": args.epochs, "finetune_from": str(args.finetune) if args.finetune else None, "imgsz": args.imgsz, "n_train": args.n_train, "n_val": args.n_val,
        "wall_time_s": round(train_s, 1),
        "coco_map50_95": round(coco.map50_95, 4), "coco_map50": round(coco.map50, 4),
        "ultralytics_val_map50_95": round(float(metrics.box.map), 4), "ultralytics_val_map50": round(float(metrics.box.map50), 4),
        "weights_bytes": best.stat().st_size,
    }
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if args.install:
        shutil.copyfile(best, PACKAGED)
        print(f"installed {PACKAGED}")


if __name__ == "__main__":
    main()
