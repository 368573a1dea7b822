"""What a prediction returns: detections (with masks, keypoints or oriented boxes by task) or class probabilities, the
image's size, class names and stage timings; read the cvdeploy way (`detections`, `to_dict`) or the Ultralytics way
(`boxes`, `masks`, `keypoints`, `obb`, `probs`, `speed`, `plot`, `summary`, `to_json`, `to_df`)."""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cvdeploy.errors import InputError, MissingDependencyError
from cvdeploy.vision.detections import Boxes, Classifications, Detections
from cvdeploy.vision.views import OBB, Keypoints, Masks, Probs

if TYPE_CHECKING:
    import supervision

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


def missing_package(package: str, action: str, *, needs: str | None = None) -> MissingDependencyError:
    """A MissingDependencyError naming the pip package itself: no cvdeploy extra carries these optional libraries."""
    err = MissingDependencyError(package, "all", action)
    err.msg = f"{action} needs {needs or package}: install it with `pip install {package}`"  # what str(ImportError) shows
    err.args = (err.msg,)
    return err


_NOT_A_LIST = ("a Result is one image's prediction, not a list: `predictor.predict(image)` returns one Result; "
               "`predictor(image)[0]` or `predictor.predict([image])[0]` give the first of a list, `result.boxes[i]` a box")


@dataclass
class Result:
    """One image's prediction. Exactly one of `detections` / `classes` is set, by task.

    detect, segment, pose, obb: `detections` (boxes in original pixels; segment adds `data["masks"]` (n, h, w) uint8,
    pose `data["keypoints"]` (n, K, 2 or 3), obb `data["xywhr"]` (n, 5) with `xyxy` the enclosing upright boxes).
    classify: `classes` (the top 5) and `probabilities` (every class).

    `orig_img` is the decoded BGR image when the Predictor's `predict` or `__call__` made the Result (what `plot` and
    `save` draw on); the server's pipeline does not keep it.
    """

    task: str
    names: dict[int, str]
    orig_shape: tuple[int, int]  # (height, width) of the decoded image
    detections: Detections | None = None
    classes: Classifications | None = None
    timings: Timings = field(default_factory=Timings)
    source: str | None = None  # path, or None for in-memory input
    orig_img: np.ndarray | None = field(default=None, repr=False, compare=False)
    probabilities: np.ndarray | None = field(default=None, repr=False)  # classify: (nc,) every class's probability

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: plain Python numbers, coordinates in original pixels (2 decimals).

        Each detection is {"box": {x1, y1, x2, y2}, "confidence", "class_id", "class_name"} plus, by task:
        segment "mask" (COCO RLE at the image's size: {"size": [h, w], "counts": str}) and "polygon" ([[x, y], ...]);
        pose "keypoints" ([[x, y, visibility], ...], or [x, y] pairs); obb "obb" ({"cx", "cy", "width", "height",
        "angle"}, angle in radians) and "polygon" (its 4 corners; "box" then encloses them). classify: "classes" (the top
        5: class_id, class_name, confidence) and "probs" (every class's probability, by class id).
        """
        out: dict[str, Any] = {
            "task": self.task,
            "source": self.source,
            "image": {"height": int(self.orig_shape[0]), "width": int(self.orig_shape[1])},
            "timings_ms": self.timings.to_dict(),
        }
        if self.detections is not None:
            out["detections"] = rows = [
                {
                    "box": {"x1": round(float(b[0]), 2), "y1": round(float(b[1]), 2), "x2": round(float(b[2]), 2), "y2": round(float(b[3]), 2)},
                    "confidence": round(conf, 5),
                    "class_id": cls,
                    "class_name": self.names.get(cls, str(cls)),
                }
                for b, conf, cls in self.detections
            ]
            self._task_fields(rows)
        if self.classes is not None:
            out["classes"] = [
                {"class_id": int(c), "class_name": self.names.get(int(c), str(c)), "confidence": round(float(p), 5)}
                for c, p in zip(self.classes.class_id, self.classes.confidence, strict=True)
            ]
        if self.probabilities is not None:
            out["probs"] = [round(float(p), 5) for p in self.probabilities]
        return out

    def _task_fields(self, rows: list[dict[str, Any]]) -> None:
        """Masks, keypoints and oriented boxes added to `to_dict`'s detection rows."""
        if (masks := self.masks) is not None:
            for row, rle, poly in zip(rows, masks.rle(), masks.xy, strict=True):
                row["mask"] = rle
                row["polygon"] = np.round(poly.astype(np.float64), 2).tolist()
        if (kpts := self.keypoints) is not None:
            for row, k in zip(rows, kpts.data.astype(np.float64), strict=True):
                k[:, :2] = k[:, :2].round(2)
                k[:, 2:] = k[:, 2:].round(5)
                row["keypoints"] = k.tolist()
        if (obb := self.obb) is not None:
            for row, r, corners in zip(rows, obb.xywhr, obb.xyxyxyxy, strict=True):
                cx, cy, w, h, a = (float(v) for v in r)
                row["obb"] = {"cx": round(cx, 2), "cy": round(cy, 2), "width": round(w, 2), "height": round(h, 2),
                              "angle": round(a, 6)}
                row["polygon"] = np.round(corners.astype(np.float64), 2).tolist()

    def line(self) -> str:
        """A short human line, e.g. '3 circle, 1 star' ('no detections' when empty): what the CLI tables show."""
        if self.detections is not None:
            if not len(self.detections):
                return "no detections"
            counts = Counter(int(c) for c in self.detections.class_id)
            return ", ".join(f"{n} {self._name(i)}" for i, n in sorted(counts.items()))
        if self.classes is not None and len(self.classes):
            c = int(self.classes.class_id[0])
            return f"{self._name(c)} {float(self.classes.confidence[0]):.2f}"
        return ""

    def _name(self, class_id: int) -> str:
        return self.names.get(class_id, str(class_id))

    # -- the Ultralytics way ------------------------------------------------------------------------

    @property
    def boxes(self) -> Boxes | None:
        """Ultralytics' `Results.boxes` (numpy): `.xyxy`, `.xywh`, `.xyxyn`, `.xywhn`, `.conf`, `.cls`, `.data` (n, 6);
        None for a result without upright boxes (classify, obb: see `obb`), as in Ultralytics."""
        if self.detections is None or self.task == "obb":
            return None
        return Boxes.from_detections(self.detections, self.orig_shape)

    @property
    def masks(self) -> Masks | None:
        """Ultralytics' `Results.masks` (segment): `.data` (n, h, w) uint8, `.xy`, `.xyn` polygons; `.rle()` (cvdeploy)."""
        d = self.detections
        if d is None or "masks" not in d.data:
            return None
        # Kept while the masks are the same array: its polygons and RLE are computed once (`r.masks.xy[i]` in a loop).
        view = self.__dict__.get("_masks_view")
        if view is None or view.data is not d.data["masks"]:
            view = self.__dict__["_masks_view"] = Masks(d.data["masks"], self.orig_shape)
        return view

    @property
    def keypoints(self) -> Keypoints | None:
        """Ultralytics' `Results.keypoints` (pose): `.data` (n, K, 3), `.xy`, `.xyn`, `.conf`."""
        d = self.detections
        return None if d is None or "keypoints" not in d.data else Keypoints(d.data["keypoints"], self.orig_shape)

    @property
    def obb(self) -> OBB | None:
        """Ultralytics' `Results.obb`: `.xywhr`, `.conf`, `.cls`, `.xyxyxyxy`, `.xyxyxyxyn`, `.xyxy`, `.data` (n, 7)."""
        d = self.detections
        if d is None or "xywhr" not in d.data:
            return None
        return OBB(np.concatenate([d.data["xywhr"], d.confidence[:, None], d.class_id[:, None].astype(np.float32)], 1),
                   self.orig_shape)

    @property
    def probs(self) -> Probs | None:
        """Ultralytics' `Results.probs` (classify): `.data` (nc,), `.top1`, `.top5`, `.top1conf`, `.top5conf`."""
        return None if self.probabilities is None else Probs(self.probabilities, self.orig_shape)

    @property
    def speed(self) -> dict[str, float]:
        """Milliseconds under Ultralytics' keys; decoding and queueing are in `timings` (Ultralytics leaves them out)."""
        t = self.timings
        return {"preprocess": t.preprocess, "inference": t.infer, "postprocess": t.postprocess}

    def verbose(self) -> str:
        """Ultralytics' log string: '2 circles, 1 star, ' ('(no detections), ' when empty; top-5 for classify)."""
        if self.classes is not None:
            return "".join(f"{self._name(int(c))} {float(p):.2f}, " for c, p in zip(self.classes.class_id[:5], self.classes.confidence[:5], strict=True))
        if self.detections is None or not len(self.detections):
            return "(no detections), "
        counts = Counter(int(c) for c in self.detections.class_id)
        return "".join(f"{n} {self._name(i)}{'s' * (n > 1)}, " for i, n in sorted(counts.items()))

    def summary(self, normalize: bool = False, decimals: int = 5) -> list[dict[str, Any]]:
        """Ultralytics' `Results.summary`: one dict per detection, {"name", "class", "confidence", "box": {"x1", "y1",
        "x2", "y2"}} (obb: the 4 corners x1..y4), with "segments" {"x": [...], "y": [...]} (segment) and "keypoints"
        {"x", "y", "visible"} (pose); coordinates divided by the image's width and height with `normalize`. The top-5
        classes for classify."""
        if self.classes is not None:
            return [{"name": self._name(int(c)), "class": int(c), "confidence": round(float(p), decimals)}
                    for c, p in zip(self.classes.class_id[:5], self.classes.confidence[:5], strict=True)]
        if self.detections is None:
            return []
        if not len(self.detections):
            return []
        h, w = self.orig_shape if normalize else (1, 1)
        obb, masks, kpts = self.obb, self.masks, self.keypoints
        coords = (obb.xyxyxyxy if obb is not None else self.detections.xyxy).reshape(len(self.detections), -1, 2)
        rows = []
        for i, (_, conf, cls) in enumerate(self.detections):
            box = {}
            for j, (x, y) in enumerate(coords[i].tolist()):
                box[f"x{j + 1}"], box[f"y{j + 1}"] = round(x / w, decimals), round(y / h, decimals)
            row: dict[str, Any] = {"name": self._name(cls), "class": cls, "confidence": round(conf, decimals), "box": box}
            if masks is not None:
                seg = masks.xy[i].astype(np.float64)
                row["segments"] = {"x": (seg[:, 0] / w).round(decimals).tolist(), "y": (seg[:, 1] / h).round(decimals).tolist()}
            if kpts is not None:
                k = kpts.data[i].astype(np.float64)
                row["keypoints"] = {"x": (k[:, 0] / w).round(decimals).tolist(), "y": (k[:, 1] / h).round(decimals).tolist()}
                if kpts.has_visible:
                    row["keypoints"]["visible"] = k[:, 2].round(decimals).tolist()
            rows.append(row)
        return rows

    def to_json(self, normalize: bool = False, decimals: int = 5) -> str:
        """`summary()` as a JSON string, as Ultralytics' `Results.to_json` writes it (a list of objects)."""
        return json.dumps(self.summary(normalize=normalize, decimals=decimals))

    def to_df(self, normalize: bool = False, decimals: int = 5, *, backend: str | None = None) -> Any:
        """`summary()` as a DataFrame with the columns name, class, confidence, box: pandas when installed, else polars
        (current Ultralytics returns polars; `backend="polars"` or `"pandas"` asks for one)."""
        rows = self.summary(normalize=normalize, decimals=decimals)
        if backend not in (None, "pandas", "polars"):
            raise InputError(f"to_df backend must be 'pandas' or 'polars', got {backend!r}")
        for name in (backend,) if backend else ("pandas", "polars"):
            try:
                if name == "pandas":
                    import pandas

                    columns = list(rows[0]) if rows else ["name", "class", "confidence", "box"]
                    return pandas.DataFrame(rows, columns=columns)
                import polars

                return polars.DataFrame(rows) if rows else polars.DataFrame(schema=["name", "class", "confidence", "box"])
            except ImportError:
                continue
        raise missing_package(backend or "pandas", "Result.to_df", needs=backend or "pandas or polars")

    def plot(self, conf: bool = True, line_width: int | None = None, labels: bool = True, boxes: bool = True,
             img: np.ndarray | None = None, pil: bool = False, masks: bool = True, kpt_line: bool = True,
             probs: bool = True) -> Any:
        """The image with the result drawn on it, as Ultralytics' `Results.plot`: a BGR uint8 array (a PIL RGB image with
        `pil`). `img` (BGR) replaces the image the result holds; a result without one (the server's) needs it. `masks`,
        `kpt_line` (the skeleton) and `probs` (the top classes) switch those layers off."""
        from cvdeploy.vision.draw import draw

        image = self.orig_img if img is None else img
        if image is None:
            raise InputError("this Result holds no image (only Predictor.predict and predictor(...) keep it): "
                             "pass the BGR image, result.plot(img=image)")
        out = draw(image, self, line_width=line_width, labels=labels, conf=conf, boxes=boxes, masks=masks, kpt_line=kpt_line,
                   probs=probs)
        if pil:
            from PIL import Image

            return Image.fromarray(np.ascontiguousarray(out[..., ::-1]))
        return out

    def save(self, filename: str | os.PathLike[str] | None = None, **plot_options: Any) -> str:
        """Write `plot(**plot_options)` to `filename` (default: results_<source file name>, or results_image.jpg); the
        format follows its suffix (.jpg when it has none); parent directories are made. Returns the file name, as Ultralytics does."""
        import cv2

        name = Path(filename) if filename else Path(f"results_{Path(self.source).name if self.source else 'image.jpg'}")
        if not name.suffix:
            name = name.with_suffix(".jpg")
        image = self.plot(**plot_options)
        ok, buf = False, None
        with contextlib.suppress(cv2.error):  # an unknown suffix: OpenCV raises (or returns False, by version)
            ok, buf = cv2.imencode(name.suffix, image)
        if not ok or buf is None:
            raise InputError(f"cannot write an image as {name.suffix!r} ({name}): use .jpg, .png, .bmp, .webp or .tif")
        name.absolute().parent.mkdir(parents=True, exist_ok=True)
        name.write_bytes(buf.tobytes())
        return str(name)

    def to_supervision(self) -> supervision.Detections:
        """The detections as `supervision.Detections` (xyxy, confidence, class_id, data["class_name"])."""
        from cvdeploy.integrations.supervision import to_supervision

        return to_supervision(self)

    def cpu(self) -> Result:
        """Itself: the arrays are numpy already (Ultralytics' `results[0].cpu()` habit keeps working)."""
        return self

    def numpy(self) -> Result:
        return self

    # A Result is not a list: `predictor.predict(image)[0]` must fail loudly, not index anything.
    def __getitem__(self, index: Any) -> Any:
        raise TypeError(_NOT_A_LIST)

    def __iter__(self) -> Any:
        raise TypeError(_NOT_A_LIST)
