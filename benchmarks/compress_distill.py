"""Distillation against no distillation at equal epochs, two seeds each, on the demo detector:

    nice -n 10 python benchmarks/compress_distill.py --out work-tmp/compress/distill [--student-macs 0.35] [--epochs 2]

Teacher: the shipped yolo11n-shapes.pt. Student: the teacher pruned to `--student-macs` of its MACs (L2 magnitude, no
fine-tuning: a narrower YOLO11 that starts from the teacher's surviving channels) or, with `--student-yaml`, a YOLO11
YAML at `--width` trained from scratch. Each seed trains the student twice from the same start, with and without the
teacher's logit + DFL targets (everything else equal: data, epochs, augmentation, seed), and measures mAP50-95 of the
best weights on the val split through cvdeploy's evaluator (COCO protocol, ONNX). The best distilled student then
enters a bundle of the teacher as onnx-distilled-fp32 through the variant checks. Writes OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")


def coco_map(pt: Path, data: Path, imgsz: int) -> float:
    """mAP50-95 of a .pt through cvdeploy's own evaluator (its ONNX export, the Predictor, COCO protocol)."""
    from cvdeploy.build.compress.common import export_onnx
    from cvdeploy.bundle.bundle import Bundle
    from cvdeploy.evaluate import evaluate_detect
    from cvdeploy.predict import Predictor

    onnx = export_onnx(pt, pt.with_suffix(".onnx"), imgsz)
    with Predictor(Bundle.load(onnx)) as p:
        return round(evaluate_detect(p, data).map50_95, 5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("work-tmp/compress/distill"))
    p.add_argument("--student-macs", type=float, default=0.35)
    p.add_argument("--student-yaml", default=None, help="e.g. yolo11n.yaml: a student from scratch instead")
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-map-drop", type=float, default=2.0)
    args = p.parse_args()

    from cvdeploy.build import build_bundle
    from cvdeploy.build.compress.common import add_compressed_variant, load_torch_model, save_checkpoint
    from cvdeploy.build.compress.distill import distill
    from cvdeploy.build.compress.prune import prune
    from cvdeploy.demo import DEMO_MODEL
    from cvdeploy.demo.shapes import generate_shapes

    out = args.out.resolve()
    t_all = time.time()
    data = out / "data" / "data.yaml"
    if not data.is_file():
        data = generate_shapes(out / "data", n_train=args.n_train, n_val=args.n_val, seed=0)
    student: object
    if args.student_yaml:
        student, start_desc = args.student_yaml, f"{args.student_yaml} width {args.width} from scratch"
    else:
        start = out / "student-start.pt"
        if not start.is_file():
            r = prune(load_torch_model(DEMO_MODEL), imgsz=args.imgsz, macs_ratio=args.student_macs)
            save_checkpoint(r.model, start, imgsz=args.imgsz)
            (out / "student-start.json").write_text(json.dumps(r.record(), indent=2))
        student, start_desc = start, f"yolo11n-shapes pruned to {args.student_macs:.0%} of its MACs (magnitude), not fine-tuned"
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for teach in (True, False):
            name = f"{'kd' if teach else 'base'}-s{seed}"
            done = out / f"{name}.json"
            if done.is_file():
                runs.append(json.loads(done.read_text()))
                continue
            resume = (out / name / "weights" / "last.pt").is_file()
            t0 = time.time()
            try:
                tr = distill(data, teacher=DEMO_MODEL, student=student, width=args.width, project=out, name=name,
                             epochs=args.epochs, imgsz=args.imgsz, seed=seed, batch=args.batch, workers=args.workers,
                             teach=teach, resume=resume,
                             progress=lambda r, name=name: print(f"[{name}] epoch {r['epoch']}/{r['epochs']} "
                                                                 f"mAP50-95 {r['map50_95']:.4f} kd {r.get('kd_loss')}", flush=True))
            except Exception as e:  # a finished run whose json was not written: measure it
                if "nothing to resume" not in str(e):
                    raise
                tr = None
            best = out / name / "weights" / "best.pt"
            row = {"run": name, "seed": seed, "distilled": teach, "epochs": args.epochs, "n_train": args.n_train,
                   "map50_95": coco_map(best, data, args.imgsz), "wall_s": round(time.time() - t0, 1),
                   "record": tr.record if tr else None, "history": tr.history if tr else None}
            done.write_text(json.dumps(row, indent=2))
            runs.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("record", "history")}), flush=True)

    best_kd = max((r for r in runs if r["distilled"]), key=lambda r: r["map50_95"])
    bundle = out / "yolo11n-shapes.cvd"
    if not bundle.is_dir():
        build_bundle(DEMO_MODEL, bundle, name="yolo11n-shapes")
    outcome = add_compressed_variant(bundle, "onnx-distilled-fp32", out / best_kd["run"] / "weights" / "best.pt",
                                     training={**(best_kd["record"] or {}), "history": best_kd["history"]}, data=data,
                                     max_map_drop=args.max_map_drop, on_step=lambda v, s: print(f"[{v}] {s}", flush=True))
    seeds = sorted({r["seed"] for r in runs})
    pairs = {s: {r["distilled"]: r["map50_95"] for r in runs if r["seed"] == s} for s in seeds}
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "student": start_desc,
               "command": "python benchmarks/compress_distill.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
               "runs": [{k: v for k, v in r.items() if k not in ("record", "history")} for r in runs],
               "per_seed": {s: {"distilled": pr.get(True), "baseline": pr.get(False),
                                "gain_points": round(100 * (pr[True] - pr[False]), 2)} for s, pr in pairs.items()},
               "variant": {"name": outcome.name, "written": outcome.written, "reason": outcome.reason,
                           "metrics": outcome.variant.metrics if outcome.variant else None},
               "wall_s": round(time.time() - t_all, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
