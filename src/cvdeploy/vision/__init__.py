"""Images in, results out: decoding, letterbox, task decoders, NMS, result types and drawing."""

from cvdeploy.vision.detections import Boxes, Classifications, Detections
from cvdeploy.vision.draw import draw
from cvdeploy.vision.image import DecodeLimits, load_image
from cvdeploy.vision.letterbox import LetterboxParams, LetterboxSpec, preprocess
from cvdeploy.vision.masks import rle_decode, rle_encode
from cvdeploy.vision.postprocess import DetectOptions, decode_classify, decode_detect, nms
from cvdeploy.vision.result import Result, Timings
from cvdeploy.vision.tasks import TASKS, TaskHead, decode_batch
from cvdeploy.vision.views import OBB, Keypoints, Masks, Probs

__all__ = [
    "OBB",
    "TASKS",
    "Boxes",
    "Classifications",
    "DecodeLimits",
    "DetectOptions",
    "Detections",
    "Keypoints",
    "LetterboxParams",
    "LetterboxSpec",
    "Masks",
    "Probs",
    "Result",
    "TaskHead",
    "Timings",
    "decode_batch",
    "decode_classify",
    "decode_detect",
    "draw",
    "load_image",
    "nms",
    "preprocess",
    "rle_decode",
    "rle_encode",
]
