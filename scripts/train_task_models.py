"""Train the packaged demo models of the other tasks: segment, pose, obb, classify.

    python scripts/train_task_models.py --task classify --out work-tmp/task-train/classify --install

Each model is built from Ultralytics' YAML (`yolo11n-seg.yaml`, `yolo11n-pose.yaml`,
`yolo11n-obb.yaml`, `yolo11n-cls.yaml`: nothing is downloaded) and starts from the packaged
detect demo model (`src/cvdeploy/demo/yolo11n-shapes.pt`) wherever a layer's name and shape
match: the whole backbone and neck, and for segment/pose/obb the box and class branches of the
head too; the count of transferred tensors is checked and written to the summary. Training is
seeded, on the CPU, on the shapes dataset of `--seed` (train split); accuracy is measured by
Ultralytics' `val` on the val split of `--val-seed` (a seed no model was trained on) and written
to OUT/train_summary.json with the wall time. `--install` copies the weights (optimizer
stripped) to src/cvdeploy/demo/yolo11n-shapes-{seg,pose,obb,cls}.pt when the floor is reached.
`--finetune W` continues from earlier weights (a second stage) instead of the detect model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # no font, asset or hub download

from cvdeploy.demo import DEMO_MODEL, TASK_MODELS
from cvdeploy.demo.shapes import generate_shapes

# task: (Ultralytics model YAML, metric name, floor, image size, n_train, n_val, epochs); the defaults
# are the recipes of the packaged models (docs/demo-model.md)
TASKS = {
    "classify": ("yolo11n-cls.yaml", "top1", 0.90, 96, 1200, 300, 20),
    "pose": ("yolo11n-pose.yaml", "pose_map50_95", 0.50, 256, 400, 200, 6),
    "obb": ("yolo11n-obb.yaml", "obb_map50_95", 0.50, 256, 400, 200, 10),
    "segment": ("yolo11n-seg.yaml", "mask_map50_95", 0.50, 256, 400, 200, 12),
}


def model_yaml(task: str, yaml_name: str, out: Path) -> Path:
    """Ultralytics' YAML with this dataset's class count (and keypoint shape), so that the model
    built before the transfer is the one trained: the class branch then transfers as well."""
    import yaml
    from ultralytics.nn.tasks import yaml_model_load

    from cvdeploy.demo.shapes import CLASS_NAMES, KPT_SHAPE

    cfg = {k: v for k, v in yaml_model_load(yaml_name).items() if k not in ("scale", "yaml_file")}
    cfg["nc"] = len(CLASS_NAMES)
    if task == "pose":
        cfg["kpt_shape"] = list(KPT_SHAPE)
    path = out / "model" / yaml_name  # the same file name: Ultralytics reads the scale ("n") from it
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# The classification backbone ends in C2PSA at index 9, where the detect backbone has SPPF (9)
# then C2PSA (10): after Ultralytics' name-and-shape load, layer 9 is loaded from detect's layer 10.
RENAMES = {"classify": {"model.10.": "model.9."}}


def transfer_from_detect(model, detect_pt: Path, task: str) -> dict:
    """`model.load(detect_pt)` and check what was actually copied: names and shapes that match."""
    import torch
    from ultralytics.nn.tasks import load_checkpoint

    src = load_checkpoint(str(detect_pt))[0].float().state_dict()
    before = _state(model.model)
    model.load(str(detect_pt))  # sets model.ckpt, so that train() starts from these weights
    for old, new in RENAMES.get(task, {}).items():
        src = {k: v for k, v in src.items() if not k.startswith(new)}
        src.update({new + k[len(old):]: v for k, v in list(src.items()) if k.startswith(old)})
        moved = {k: v for k, v in src.items() if k.startswith(new) and k in before and before[k].shape == v.shape}
        model.model.load_state_dict(moved, strict=False)
    after = model.model.state_dict()
    matching = [k for k, v in before.items() if k in src and src[k].shape == v.shape]
    copied = [k for k in matching if torch.equal(after[k].float(), src[k].float())]
    changed = [k for k in matching if not torch.equal(before[k], after[k])]
    if len(copied) != len(matching):
        raise SystemExit(f"transfer failed: {len(copied)} of {len(matching)} matching tensors copied")
    layers = sorted({int(k.split(".")[1]) for k in copied if k.startswith("model.")})
    return {"from": detect_pt.name, "tensors": len(copied), "of": len(before), "changed": len(changed), "layers": layers}


def _metric(task: str, metrics) -> dict:
    if task == "classify":
        return {"top1": round(float(metrics.top1), 4), "top5": round(float(metrics.top5), 4)}
    box = {"box_map50_95": round(float(metrics.box.map), 4), "box_map50": round(float(metrics.box.map50), 4)}
    if task == "segment":
        return {"mask_map50_95": round(float(metrics.seg.map), 4), "mask_map50": round(float(metrics.seg.map50), 4), **box}
    if task == "pose":
        return {"pose_map50_95": round(float(metrics.pose.map), 4), "pose_map50": round(float(metrics.pose.map50), 4), **box}
    return {"obb_map50_95": box["box_map50_95"], "obb_map50": box["box_map50"]}


def make_data(task: str, out: Path, n_train: int, n_val: int, seed: int, val_seed: int) -> Path:
    """Training split of `seed`, validation split of `val_seed`, joined into one `data=` for Ultralytics."""
    train = generate_shapes(out / f"train-seed{seed}", n_train=n_train, n_val=6, seed=seed, task=task)
    val = generate_shapes(out / f"val-seed{val_seed}", n_train=0, n_val=n_val, seed=val_seed, task=task)
    if task == "classify":
        root = out / "joined"
        root.mkdir(parents=True, exist_ok=True)
        for split, src in (("train", train / "train"), ("val", val / "val")):
            link = root / split
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(src.resolve(), target_is_directory=True)
        return root
    text = train.read_text().replace("val: images/val", f"val: {(val.parent / 'images' / 'val').resolve()}")
    joined = out / "data.yaml"
    joined.write_text(text.replace("# generated", f"# val: seed {val_seed}; generated"))
    return joined


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-train", type=int, default=None, help="training images (classify: crops)")
    p.add_argument("--n-val", type=int, default=None, help="validation images (classify: crops)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training split and of training")
    p.add_argument("--val-seed", type=int, default=1, help="seed of the validation split (not trained on)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--imgsz", type=int, default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--mosaic", type=float, default=1.0)
    p.add_argument("--close-mosaic", type=int, default=None, help="epochs without mosaic at the end (default: a third)")
    p.add_argument("--finetune", type=Path, default=None, help="continue from these weights instead of the detect model")
    p.add_argument("--install", action="store_true", help="copy the weights into the package if the floor is reached")
    args = p.parse_args()
    yaml_name, metric, floor, imgsz, n_train, n_val, epochs = TASKS[args.task]
    args.imgsz = args.imgsz or imgsz
    args.n_train = args.n_train or n_train
    args.n_val = args.n_val or n_val
    args.epochs = args.epochs or epochs
    close_mosaic = args.close_mosaic if args.close_mosaic is not None else max(1, args.epochs // 3)

    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import strip_optimizer

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = make_data(args.task, out / "data", args.n_train, args.n_val, args.seed, args.val_seed)
    data_s = time.time() - t0
    if args.finetune:
        model, transfer = YOLO(str(args.finetune)), {"from": str(args.finetune)}
    else:
        model = YOLO(str(model_yaml(args.task, yaml_name, out)))
        transfer = transfer_from_detect(model, DEMO_MODEL, args.task)
    print("transfer:", json.dumps(transfer), flush=True)
    t1 = time.time()
    model.train(
        data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=args.workers,
        seed=args.seed, deterministic=True, nbs=args.batch, cache="disk", device="cpu", amp=False, plots=False,
        project=str(out), name="train", exist_ok=True, close_mosaic=close_mosaic, warmup_epochs=args.warmup_epochs,
        mosaic=args.mosaic, val=False, verbose=False,
    )
    train_s = time.time() - t1
    weights_dir = out / "train" / "weights"
    weights = weights_dir / "best.pt" if (weights_dir / "best.pt").exists() else weights_dir / "last.pt"
    t2 = time.time()
    metrics = YOLO(str(weights)).val(data=str(data), imgsz=args.imgsz, batch=16, device="cpu", plots=False,
                                     verbose=False, project=str(out), name="val", exist_ok=True)
    val_s = time.time() - t2
    figures = _metric(args.task, metrics)
    stripped = out / f"{TASK_MODELS[args.task].stem}.pt"
    strip_optimizer(str(weights), s=str(stripped))
    summary = {
        "task": args.task,
        "command": "python scripts/train_task_models.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "install" and v is not None),
        "model_yaml": yaml_name, "transfer": transfer,
        "seed": args.seed, "val_seed": args.val_seed, "epochs": args.epochs, "imgsz": args.imgsz,
        "n_train": args.n_train, "n_val": args.n_val, "batch": args.batch, "close_mosaic": close_mosaic,
        "data_s": round(data_s, 1), "train_s": round(train_s, 1), "val_s": round(val_s, 1),
        "wall_time_s": round(time.time() - t0, 1),
        "val": figures, "metric": metric, "floor": floor, "reached": figures[metric] >= floor,
        "weights_bytes": stripped.stat().st_size,
        "versions": {"python": sys.version.split()[0], **_versions()},
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), flush=True)
    if args.install:
        if not summary["reached"]:
            print(f"not installed: {metric} {figures[metric]} < floor {floor}", flush=True)
        else:
            shutil.copyfile(stripped, TASK_MODELS[args.task])
            print(f"installed {TASK_MODELS[args.task]}", flush=True)


def _versions() -> dict:
    import torch
    import ultralytics

    return {"torch": torch.__version__, "ultralytics": ultralytics.__version__, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    main()
