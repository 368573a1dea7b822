"""What surrounds a QAT result: where PTQ's drop comes from, what other PTQ calibrations give, and a held-out check.

    python benchmarks/qat_context.py where   --dir OUT [--recipe u8s8-w7] [--per-channel]
    python benchmarks/qat_context.py calib   --dir OUT [--recipe u8s8-w7] [--per-channel]
    python benchmarks/qat_context.py heldout --dir OUT RUN_DIR [RUN_DIR ...] [--images 400 --seed 11]

OUT is a `benchmarks/compress_qat.py --out` directory (its data/ and yolo11n-shapes.cvd with onnx-fp32). Weights are
per tensor unless --per-channel, as in compress_qat.py.

- `where`: mAP50-95 on the val split of the fake-quantized torch model (PTQ's minmax ranges, before any training)
  with the weight quantizers only, the activation quantizers only, and both: which part of the drop is which.
- `calib`: PTQ graphs at the recipe's types with each calibration method (minmax, percentile, entropy): the drop
  that other ranges alone remove, without training.
- `heldout`: the PTQ and QAT graphs of each RUN_DIR (a compress_qat.py run: RUN_DIR/run/ptq-int8.onnx and
  qat-int8.onnx) and onnx-fp32, scored on a fresh shapes val set of another seed than the one QAT's settings were
  chosen on.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from serve_load import scratch_dir  # the sibling benchmark (this folder is on sys.path when run as a script)

os.environ.setdefault("YOLO_OFFLINE", "1")


def where(bundle: Any, data: Path, recipe: str, per_channel: bool) -> None:
    import onnx

    from cvdeploy.build.compress.qat import ptq_reference
    from cvdeploy.build.compress.qat_fakequant import insert_fake_quant, quant_plan
    from cvdeploy.build.compress.qat_train import QatConfig, load_fused, torch_map
    from cvdeploy.demo import DEMO_MODEL

    config = QatConfig(recipe=recipe, per_channel=per_channel)
    ptq, calib, _ = ptq_reference(bundle, data, config, scratch_dir("cvdeploy-qat-where-"), measure=False)
    model = load_fused(DEMO_MODEL)
    fq = insert_fake_quant(model, config.int8_recipe(), quant_plan(onnx.load(str(ptq), load_external_data=False)))
    fq.calibrate(model, calib)
    n = 10**6  # every val image
    for label, weights, activations in (("float", False, False), ("weights only", True, False),
                                        ("activations only", False, True), ("both", True, True)):
        for w in fq.weights:
            w.enabled = weights
        for m in fq.modules():
            m.enabled = activations
        print(f"{label:18s} mAP50-95 {torch_map(model, bundle, data, n):.4f}", flush=True)


def calib_methods(bundle: Any, data: Path, recipe: str, per_channel: bool) -> None:
    import onnx

    from cvdeploy.build.compress.qat import graph_map
    from cvdeploy.build.quantize import head_float_nodes, int8_recipe, quantize_int8
    from cvdeploy.build.variants import calibration_tensors

    fp32 = bundle.variant_path("onnx-fp32")
    floats = head_float_nodes(onnx.load(str(fp32), load_external_data=False))
    calib = calibration_tensors(bundle, data, 64)
    base = bundle.manifest.variants["onnx-fp32"].metrics["map50_95"]
    tmp = scratch_dir("cvdeploy-qat-calib-")
    for method in ("minmax", "percentile", "entropy"):
        t0 = time.perf_counter()
        out = tmp / f"ptq-{method}.onnx"
        quantize_int8(fp32, out, calib, int8_recipe(recipe, method, per_channel), float_nodes=floats)
        m = graph_map(bundle, out, data)["map50_95"]
        print(f"PTQ {recipe} {method:10s} mAP50-95 {m:.4f}, drop {100 * (base - m):.2f} points "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


def heldout(bundle: Any, runs: list[Path], images: int, seed: int) -> None:
    from cvdeploy.build.compress.qat import graph_map
    from cvdeploy.build.variants import map_of
    from cvdeploy.demo.shapes import generate_shapes

    data = generate_shapes(scratch_dir("cvdeploy-qat-heldout-"), n_train=1, n_val=images, seed=seed)
    fp32 = map_of(bundle, "onnx-fp32", data)["map50_95"]
    print(f"held-out set: {images} val images, seed {seed}; onnx-fp32 mAP50-95 {fp32:.4f}", flush=True)
    for run in runs:
        ptq = graph_map(bundle, run / "run" / "ptq-int8.onnx", data)["map50_95"]
        qat = graph_map(bundle, run / "run" / "qat-int8.onnx", data)["map50_95"]
        print(f"{run}: PTQ {ptq:.4f} (drop {100 * (fp32 - ptq):.2f}), QAT {qat:.4f} (drop {100 * (fp32 - qat):.2f})",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["where", "calib", "heldout"])
    p.add_argument("runs", nargs="*", type=Path, help="heldout: compress_qat.py --out directories")
    p.add_argument("--dir", type=Path, default=Path("work-tmp/compress/qat"), help="a compress_qat.py --out directory")
    p.add_argument("--recipe", default="u8s8-w7")
    p.add_argument("--per-channel", action="store_true")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_intermixed_args()

    from cvdeploy.bundle.bundle import Bundle

    bundle = Bundle.load(args.dir / "yolo11n-shapes.cvd")
    data = args.dir / "data" / "data.yaml"
    if args.what == "where":
        where(bundle, data, args.recipe, args.per_channel)
    elif args.what == "calib":
        calib_methods(bundle, data, args.recipe, args.per_channel)
    else:
        if not args.runs:
            p.error("heldout needs at least one RUN_DIR")
        heldout(bundle, args.runs, args.images, args.seed)


if __name__ == "__main__":
    main()
