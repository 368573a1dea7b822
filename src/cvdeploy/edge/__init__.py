"""The edge runner: a bundle's NCNN or LiteRT variant on images, a folder, a video or a camera, without torch or a server.

    python -m cvdeploy.edge run BUNDLE --source DIR_OR_IMAGE_OR_0 [--variant ncnn-fp16] [--json]

It runs the Predictor's own stages (decode, letterbox, engine, postprocess), so its detections are the Predictor's for
the same variant. What it imports: numpy, OpenCV and Pillow (the decoding contract), pydantic and PyYAML (the
manifest) and the one engine the variant needs; never torch, Ultralytics, the server's packages, nor another engine.
"""

from __future__ import annotations

from cvdeploy.edge.runner import EDGE_ORDER, choose_edge_variant, engine_installed, frames

__all__ = ["EDGE_ORDER", "choose_edge_variant", "engine_installed", "frames"]
