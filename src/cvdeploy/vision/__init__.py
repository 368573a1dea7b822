"""Images in, results out: decoding, letterbox, task decoders, NMS, result types and drawing."""

from cvdeploy.vision.detections import Boxes, Classifications, Detections
from cvdeploy.vision.draw import draw
from cvdeploy.vision.image import DecodeLimits, load_image
from cvdeploy.vision.letterbox import LetterboxParams, LetterboxSpec, preprocess
from cvdeploy.vision.postprocess import DetectOptions, decode_classify, decode_detect, nms
from cvdeploy.vision.result import Result, Timings

__all__ = [
    "Boxes",
    "Classifications",
    "DecodeLimits",
    "DetectOptions",
    "Detections",
    "LetterboxParams",
    "LetterboxSpec",
    "Result",
    "Timings",
    "decode_classify",
    "decode_detect",
    "draw",
    "load_image",
    "nms",
    "preprocess",
]
