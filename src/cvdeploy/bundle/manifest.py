"""The bundle's manifest: a schema-versioned description of everything a deployment needs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cvdeploy.vision.letterbox import LetterboxSpec
from cvdeploy.vision.postprocess import DetectOptions

SCHEMA_VERSION = 1
Task = Literal["detect", "classify", "segment", "pose", "obb"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorInfo(_Model):
    name: str
    shape: list[int | None]  # None: dynamic axis
    dtype: str


class PreprocessSpec(_Model):
    """How an image becomes the network input; identical at build, verify and serve time."""

    imgsz: tuple[int, int]  # (height, width)
    stride: int = 32
    pad_value: int = 114
    rect: bool = True
    scaleup: bool = True
    channel_order: Literal["RGB", "BGR"] = "RGB"
    scale: float = 255.0
    # letterbox: cv2 INTER_LINEAR resize and padding (detect, segment, pose, obb); center_crop: Ultralytics' classify
    # transforms (the shorter side resized with Pillow's antialiased bilinear filter, the centre cropped to imgsz).
    resize: Literal["letterbox", "center_crop"] = "letterbox"
    interpolation: Literal["linear", "pil_bilinear"] = "linear"
    decoder: Literal["opencv-imread-color"] = "opencv-imread-color"  # EXIF applied, alpha dropped, 8-bit

    def letterbox(self) -> LetterboxSpec:
        return LetterboxSpec(
            imgsz=self.imgsz, stride=self.stride, pad_value=self.pad_value, rect=self.rect,
            scaleup=self.scaleup, channel_order=self.channel_order, scale=self.scale, mode=self.resize,
        )

    @classmethod
    def for_task(cls, task: str, imgsz: tuple[int, int], stride: int = 32) -> PreprocessSpec:
        """What Ultralytics' predictor does for `task`: classify center-crops, every other task letterboxes."""
        if task == "classify":
            return cls(imgsz=imgsz, stride=stride, rect=False, resize="center_crop", interpolation="pil_bilinear")
        return cls(imgsz=imgsz, stride=stride)


class PostprocessSpec(_Model):
    conf: float = Field(0.25, ge=0, le=1)
    iou: float = Field(0.7, ge=0, le=1)
    max_det: int = Field(300, ge=1)
    end2end: bool = False  # NMS already inside the graph (rows of x1, y1, x2, y2, conf, class)

    def options(self) -> DetectOptions:
        return DetectOptions(conf=self.conf, iou=self.iou, max_det=self.max_det)


class OutputParity(_Model):
    """Difference between a variant's output and the source model's on the golden inputs."""

    max_abs: float
    mean_abs: float
    max_rel: float
    max_abs_scores: float | None = None  # box tasks: class-score channels only; classify: the probabilities
    max_abs_boxes: float | None = None  # box tasks: box channels, in input pixels
    max_abs_extra: float | None = None  # segment: mask coefficients, pose: keypoints (input pixels, visibility), obb: angle
    max_abs_scaled: float | None = None  # outputs without scores (segment prototypes): max_abs / the output's largest |value|

    @property
    def worst(self) -> float:
        """The figure the tolerance applies to: the class-score difference; for an output without scores, its difference
        relative to its own range (prototypes), else its whole difference."""
        if self.max_abs_scores is not None:
            return self.max_abs_scores
        return self.max_abs if self.max_abs_scaled is None else self.max_abs_scaled


class ParityReport(_Model):
    reference: str  # what the variant was compared against, e.g. "torch (source .pt)"
    tolerance_scores: float
    passed: bool
    outputs: dict[str, OutputParity]
    provider: str | None = None  # the engine and execution provider that ran the check
    engine_precision: str | None = None  # the float precision the engine reported it ran at (OpenVINO: f32, bf16, f16)

    @property
    def worst(self) -> float:
        """The largest difference the tolerance was held to, over every output."""
        return max(o.worst for o in self.outputs.values())


class Variant(_Model):
    file: str  # relative to the bundle root
    format: Literal["onnx", "openvino", "ncnn", "tflite"] = "onnx"
    precision: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"
    engine: Literal["onnxruntime", "openvino", "ncnn", "litert"] = "onnxruntime"
    sha256: str
    size_bytes: int
    companions: dict[str, str] = Field(default_factory=dict)  # other files of the variant (OpenVINO .bin) -> sha256
    parity: ParityReport | None = None
    metrics: dict[str, float] = Field(default_factory=dict)  # map50_95, map50, latency_ms_b1, box_agreement, ...
    quantization: dict[str, Any] | None = None  # INT8: the recipe, every candidate tried with its figures, and why it won
    training: dict[str, Any] | None = None  # cvdeploy compress: method, data, epochs, seed, wall time, pruning figures
    encryption: dict[str, Any] | None = None  # protected bundles: AES-256-GCM nonce, plaintext hash (never the key)


class RuntimeHint(_Model):
    """Engine settings `cvdeploy bench tune` found fastest on one machine; the Predictor applies them."""

    variant: str
    intra_op_threads: int = Field(0, ge=0)
    inter_op_threads: int = Field(0, ge=0)
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    engine: Literal["onnxruntime", "openvino"] = "onnxruntime"
    ov_hint: Literal["LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"] | None = None  # OpenVINO variants
    ov_threads: int = Field(0, ge=0)
    batch: int = Field(1, ge=1)
    concurrency: int = Field(1, ge=1)
    objective: Literal["latency", "throughput"] = "latency"
    tuned_ms: float  # the winner's median per request, in fresh rounds against the default after the search
    default_ms: float  # the engine's default settings, in those same rounds
    cpu: str = ""  # where it was measured: a hint for another machine is only a hint
    tuned_at: str = ""


class LatencyRecord(_Model):
    """Batch-1 latencies of the variants, measured interleaved on one machine; the Predictor chooses from the record of
    the machine it runs on, never from another machine's."""

    machine: str  # cvdeploy.bundle.environment.machine_id(): CPU model, flags and core count
    cpu: str = ""
    flags: list[str] = Field(default_factory=list)
    variants: dict[str, float]  # variant -> median ms at batch 1
    input_shape: list[int] = Field(default_factory=list)
    how: str = ""  # "build" or "bench tune"
    measured_at: str = ""


class GoldenCase(_Model):
    file: str
    sha256: str
    input_shape: list[int]
    description: str = ""


class ProfileInfo(_Model):
    """The baseline data profile (`cvdeploy.diagnose.profile.DataProfile` as JSON): the controlled set's image statistics and
    the source variant's predictions on it, written by the build (`cvdeploy.build.profile_step`) for drift checks."""

    file: str
    sha256: str
    images: int
    variant: str  # whose predictions it holds
    source: str = ""  # where its images came from


class SourceInfo(_Model):
    file: str
    sha256: str
    format: Literal["pt", "onnx", "openvino"]
    exporter: str | None = None  # e.g. "ultralytics 8.4.190"
    golden_images: str = ""  # where the golden inputs came from


class TaskInfo(_Model):
    """What reading a task's outputs needs beyond the class names (Ultralytics' export metadata and training data)."""

    kpt_shape: tuple[int, int] | None = None  # pose: keypoints per object, values per keypoint (2: x, y; 3: + visibility)
    kpt_names: dict[int, list[str]] | None = None  # pose: keypoint names per class
    flip_idx: list[int] | None = None  # pose: the keypoint each one becomes in a left-right flip (from the training data)
    mask_channels: int | None = None  # segment: prototype masks (mask coefficients per detection)


class Manifest(_Model):
    schema_version: int = SCHEMA_VERSION
    name: str
    task: Task
    names: dict[int, str]
    task_info: TaskInfo | None = None  # pose and segment details; None for detect, obb and classify
    input: TensorInfo
    outputs: list[TensorInfo]
    preprocess: PreprocessSpec
    postprocess: PostprocessSpec = PostprocessSpec()
    variants: dict[str, Variant]
    default_variant: str
    golden: list[GoldenCase] = Field(default_factory=list)
    source: SourceInfo
    environment: dict[str, object] = Field(default_factory=dict)
    runtime: list[RuntimeHint] = Field(default_factory=list)  # from `cvdeploy bench tune`, one per variant
    latencies: list[LatencyRecord] = Field(default_factory=list)  # one per machine the variants were timed on
    profile: ProfileInfo | None = None  # None: built without a controlled set (--data), so no images to profile
    created_at: str
    cvdeploy_version: str
    # sha256 of the canonical manifest without this field (bundle.canonical_manifest_bytes): every writer sets it and
    # Bundle.load refuses a manifest edited by hand. None: written before the hash existed, still loadable.
    content_sha256: str | None = None

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"schema_version {v} is not supported by this cvdeploy (it reads version {SCHEMA_VERSION})")
        return v

    @field_validator("variants")
    @classmethod
    def _some_variant(cls, v: dict[str, Variant]) -> dict[str, Variant]:
        if not v:
            raise ValueError("a bundle needs at least one variant")
        return v

    @model_validator(mode="before")
    @classmethod
    def _classify_center_crops(cls, data: Any) -> Any:
        """A classify model is center-cropped, never letterboxed (Ultralytics' classify predictor): a manifest that
        does not say so (a plain .onnx read by `Bundle.from_onnx`) gets the classify preprocessing."""
        if not isinstance(data, dict) or data.get("task") != "classify":
            return data
        pre = data.get("preprocess")
        if isinstance(pre, PreprocessSpec) and "resize" not in pre.model_fields_set:
            data = {**data, "preprocess": PreprocessSpec.for_task("classify", pre.imgsz, pre.stride)}
        elif isinstance(pre, dict) and "resize" not in pre:
            data = {**data, "preprocess": {**pre, "resize": "center_crop", "interpolation": "pil_bilinear", "rect": False}}
        return data

    @model_validator(mode="after")
    def _default_is_a_variant(self) -> Manifest:
        if self.default_variant not in self.variants:
            raise ValueError(f"default_variant {self.default_variant!r} is not one of the variants ({', '.join(self.variants)})")
        return self
