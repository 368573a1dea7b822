"""What a prediction returns: detections or classes, the image's size, class names and stage timings."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cvdeploy.vision.detections import Classifications, Detections

STAGES = ("decode", "preprocess", "queue", "infer", "postprocess")


@dataclass
class Timings:
    """Milliseconds spent in each stage for this image (batched stages are shared out per image). `queue` is the wait
    for a batch and an engine (the server's batcher); the Predictor alone has none."""

    decode: float = 0.0
    preprocess: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0
    queue: float = 0.0

    @property
    def total(self) -> float:
        return self.decode + self.preprocess + self.queue + self.infer + self.postprocess

    def to_dict(self) -> dict[str, float]:
        d = {s: round(getattr(self, s), 3) for s in STAGES}
        d["total"] = round(self.total, 3)
        return d


@dataclass
class Result:
    """One image's prediction. Exactly one of `detections` / `classes` is set, by task."""

    task: str
    names: dict[int, str]
    orig_shape: tuple[int, int]  # (height, width) of the decoded image
    detections: Detections | None = None
    classes: Classifications | None = None
    timings: Timings = field(default_factory=Timings)
    source: str | None = None  # path, or None for in-memory input

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: plain Python numbers, boxes in original pixels."""
        out: dict[str, Any] = {
            "task": self.task,
            "source": self.source,
            "image": {"height": int(self.orig_shape[0]), "width": int(self.orig_shape[1])},
            "timings_ms": self.timings.to_dict(),
        }
        if self.detections is not None:
            out["detections"] = [
                {
                    "box": {"x1": round(float(b[0]), 2), "y1": round(float(b[1]), 2), "x2": round(float(b[2]), 2), "y2": round(float(b[3]), 2)},
                    "confidence": round(conf, 5),
                    "class_id": cls,
                    "class_name": self.names.get(cls, str(cls)),
                }
                for b, conf, cls in self.detections
            ]
        if self.classes is not None:
            out["classes"] = [
                {"class_id": int(c), "class_name": self.names.get(int(c), str(c)), "confidence": round(float(p), 5)}
                for c, p in zip(self.classes.class_id, self.classes.confidence, strict=True)
            ]
        return out

    def summary(self) -> str:
        """A short human line, e.g. '3 circle, 1 star'."""
        if self.detections is not None:
            if not len(self.detections):
                return "no detections"
            counts = Counter(int(c) for c in self.detections.class_id)
            return ", ".join(f"{n} {self.names.get(i, str(i))}" for i, n in sorted(counts.items()))
        if self.classes is not None and len(self.classes):
            c = int(self.classes.class_id[0])
            return f"{self.names.get(c, str(c))} {float(self.classes.confidence[0]):.2f}"
        return ""
