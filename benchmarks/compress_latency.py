"""Batch-1 latency of ONNX models against a baseline, interleaved round by round (machine noise hits all alike):

    nice -n 10 python benchmarks/compress_latency.py BASE.onnx OTHER.onnx [...] [--imgsz 256] [--rounds 20] [--per-round 20]
        [--threads 0]

`--threads 1` times each model on one intra-op thread: how `cvdeploy serve --instances 2` runs each engine on 2 cores.

Used to re-time the pruned models of benchmarks/compress_prune.py with more rounds than the build does. Prints the
median milliseconds and each model's speed-up against the first one, as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--per-round", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default, one per core)")
    args = p.parse_args()

    from cvdeploy.bench.latency import interleaved_latency
    from cvdeploy.demo.shapes import sample_scene
    from cvdeploy.runtime import OrtOptions
    from cvdeploy.vision.letterbox import LetterboxSpec, preprocess

    image = sample_scene(np.random.default_rng(0)).image
    tensor = preprocess([image], LetterboxSpec(imgsz=(args.imgsz, args.imgsz), rect=False))[0]
    models = {str(m): (m, "onnxruntime", "fp32") for m in args.models}
    ms = interleaved_latency(models, tensor, rounds=args.rounds, per_round=args.per_round,
                             options={"onnxruntime": OrtOptions(intra_op_threads=args.threads)})
    base = ms[str(args.models[0])]
    print(json.dumps({m: {"ms_b1": round(v, 3), "speedup": round(base / v, 3)} for m, v in ms.items()}, indent=2))


if __name__ == "__main__":
    main()
