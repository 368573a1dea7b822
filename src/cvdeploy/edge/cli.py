"""`python -m cvdeploy.edge` (or `cvdeploy-edge`): run a bundle's edge variant on images and print the detections.

argparse, not the main CLI's Typer app: on a device the runner imports nothing it does not need.
stdout carries the detections (a line per image, or JSON lines with --json); the chosen variant and errors go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from cvdeploy.errors import CvdeployError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cvdeploy-edge", description="Run a cvdeploy bundle on an edge device (NCNN, LiteRT or "
                                "ONNX Runtime), without torch or a server.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="predict images, a folder, a video or a camera and print the detections")
    run.add_argument("bundle", help="the bundle directory (NAME.cvd)")
    run.add_argument("--source", required=True, help="an image, a folder of images, a video file or a camera index (0)")
    run.add_argument("--variant", default=None, help="the variant to run (default: the first of ncnn-fp32, ncnn-fp16 (first on "
                     "Arm), litert-int8, litert-fp32, onnx-int8, onnx-fp32 that the bundle has and this device can run)")
    run.add_argument("--conf", type=float, default=None, help="confidence threshold (default: the bundle's)")
    run.add_argument("--iou", type=float, default=None, help="NMS IoU threshold (default: the bundle's)")
    run.add_argument("--max-det", type=int, default=None, help="most detections per image (default: the bundle's)")
    run.add_argument("--threads", type=int, default=None, help="engine threads (default: the engine's)")
    run.add_argument("--max-frames", type=int, default=None, help="stop after this many images or frames")
    run.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    return p


def _options(kind: str, threads: int | None) -> Any:
    if threads is None:
        return None
    if kind == "ncnn":
        from cvdeploy.runtime.ncnn import NcnnOptions

        return NcnnOptions(num_threads=threads)
    if kind == "litert":
        from cvdeploy.runtime.litert import LiteRtOptions

        return LiteRtOptions(num_threads=threads)
    from cvdeploy.runtime.onnxruntime import OrtOptions

    return OrtOptions(intra_op_threads=threads)


def run(args: argparse.Namespace) -> int:
    from cvdeploy.bundle import Bundle
    from cvdeploy.edge.runner import choose_edge_variant, frames
    from cvdeploy.predict import Predictor

    bundle = Bundle.load(args.bundle)
    variant, why = choose_edge_variant(bundle, args.variant)
    kind = bundle.manifest.variants[variant].engine
    with Predictor(bundle, variant, conf=args.conf, iou=args.iou, max_det=args.max_det,
                   engine_options=_options(kind, args.threads)) as predictor:
        print(f"{bundle.name}: {variant} ({why}) on {predictor.engine.provider}", file=sys.stderr)
        n = 0
        for name, image in frames(args.source, max_frames=args.max_frames):
            result = predictor.predict(image)
            n += 1
            if args.json:
                print(json.dumps({"source": name, "variant": variant, "detections": result.summary()}), flush=True)
                continue
            print(f"{name}: {result.line()}", flush=True)
            for box, conf, cls in result.detections or []:
                x1, y1, x2, y2 = (float(v) for v in box)
                print(f"  {bundle.names.get(cls, str(cls))} {conf:.2f} {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}", flush=True)
        print(f"{n} image(s)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except (CvdeployError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
