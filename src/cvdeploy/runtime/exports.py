"""Ultralytics exports as users have them: where the model file and its metadata are, and what the metadata says.

    yolo export format=onnx        model.onnx              metadata in the file (ONNX metadata_props, as strings)
    yolo export format=onnx nms=True   model.onnx          the same; output (batch, 300, 6): NMS already in the graph
    yolo export format=openvino    model_openvino_model/   model.xml + model.bin + metadata.yaml (plain YAML)

Both metadata forms carry the same keys (names, imgsz, stride, task, batch, args, end2end; pose: kpt_shape, kpt_names); `ExportMetadata.parse`
reads either, so an export opens with the settings it was exported with, never with a default that could differ.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cvdeploy.errors import ModelFormatError

METADATA_YAML = "metadata.yaml"


@dataclass(frozen=True)
class ExportMetadata:
    """What an Ultralytics export says about itself."""

    names: dict[int, str]
    imgsz: tuple[int, int]  # (height, width)
    stride: int = 32
    task: str = "detect"
    end2end: bool = False  # NMS inside the graph (nms=True, or an NMS-free head such as YOLO26's)
    batch: int = 1
    dynamic: bool = False
    half: bool = False
    version: str | None = None  # the Ultralytics version that exported it
    date: str | None = None
    kpt_shape: tuple[int, int] | None = None  # pose: keypoints per object, values per keypoint
    kpt_names: dict[int, list[str]] | None = None  # pose: keypoint names per class

    @classmethod
    def parse(cls, meta: Mapping[str, Any], where: str | os.PathLike[str]) -> ExportMetadata:
        """From metadata.yaml (native values) or ONNX metadata_props (the same values written as Python literals)."""
        try:
            names = {int(k): str(v) for k, v in _value(meta["names"]).items()}
            imgsz = [int(x) for x in _listify(_value(meta.get("imgsz", [640, 640])))]
            stride = int(float(_value(meta.get("stride", 32))))
        except (KeyError, ValueError, SyntaxError, AttributeError, TypeError) as e:
            raise ModelFormatError(
                f"{where} has no usable Ultralytics metadata (names, imgsz, stride): export it with Ultralytics or build a bundle"
            ) from e
        if len(imgsz) == 1:
            imgsz *= 2
        if len(imgsz) != 2 or min(imgsz) < 1:
            raise ModelFormatError(f"{where}: its metadata gives imgsz {imgsz}; expected one or two positive integers")
        args = _value(meta.get("args", {}))
        args = args if isinstance(args, dict) else {}
        return cls(
            names=names,
            imgsz=(imgsz[0], imgsz[1]),
            stride=stride,
            task=str(_value(meta.get("task", "detect"))),
            end2end=bool(args.get("nms")) or _truth(meta.get("end2end", False)),
            batch=int(_value(meta.get("batch", 1)) or 1),
            dynamic=bool(args.get("dynamic")),
            half=bool(args.get("half")) or args.get("quantize") == 16,  # Ultralytics 8.4 writes half=True as quantize=16
            version=None if meta.get("version") is None else str(meta["version"]),
            date=None if meta.get("date") is None else str(meta["date"]),
            kpt_shape=parse_kpt_shape(meta["kpt_shape"], where) if meta.get("kpt_shape") is not None else None,
            kpt_names=_kpt_names(meta.get("kpt_names")),
        )


@dataclass(frozen=True)
class OpenVinoExport:
    """An Ultralytics OpenVINO export: its IR files and its metadata."""

    xml: Path
    weights: Path
    metadata: ExportMetadata


def is_openvino_export(path: str | os.PathLike[str]) -> bool:
    """An `.xml` file, or a directory holding one and no bundle manifest (`*_openvino_model/`): `openvino_export` then
    says what, if anything, is missing (metadata.yaml, the .bin)."""
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() == ".xml"
    return p.is_dir() and not (p / "manifest.json").exists() and any(p.glob("*.xml"))


def openvino_export(path: str | os.PathLike[str]) -> OpenVinoExport:
    """Find the IR and read the metadata of an Ultralytics OpenVINO export (its directory or its .xml)."""
    p = Path(path)
    if p.is_dir():
        xmls = sorted(p.glob("*.xml"))
        if len(xmls) != 1:
            listing = ", ".join(x.name for x in xmls) or "none"
            raise ModelFormatError(f"{p} should hold one OpenVINO .xml model, it holds {len(xmls)} ({listing}): give the .xml to run")
        xml = xmls[0]
    else:
        xml = p
    weights = xml.with_suffix(".bin")
    if not weights.is_file():
        raise ModelFormatError(f"{xml}: its weights file {weights.name} is missing (an OpenVINO model is an .xml and a .bin)")
    meta_file = xml.parent / METADATA_YAML
    if not meta_file.is_file():
        raise ModelFormatError(
            f"{xml} has no {METADATA_YAML} beside it, so its class names, input size and task are unknown: "
            "open the directory written by `yolo export format=openvino`, or build a bundle (`cvdeploy build`)"
        )
    try:
        meta = yaml.safe_load(meta_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ModelFormatError(f"{meta_file}: not readable YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(meta, dict):
        raise ModelFormatError(f"{meta_file}: expected a mapping of Ultralytics metadata, got {type(meta).__name__}")
    return OpenVinoExport(xml, weights, ExportMetadata.parse(meta, meta_file))


def parse_kpt_shape(value: Any, where: str | os.PathLike[str] = "the model") -> tuple[int, int]:
    """A pose model's kpt_shape from its metadata ("[17, 3]" in ONNX, a list in YAML) as (keypoints, values)."""
    v = _value(value)
    try:
        k, d = (int(x) for x in v)
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"{where}: its metadata gives kpt_shape {value!r}; expected [keypoints, 2 or 3]") from e
    if k < 1 or d not in (2, 3):
        raise ModelFormatError(f"{where}: its metadata gives kpt_shape {[k, d]}; expected [keypoints, 2 or 3]")
    return k, d


def _kpt_names(value: Any) -> dict[int, list[str]] | None:
    v = _value(value)
    if not isinstance(v, dict):
        return None
    try:
        return {int(k): [str(n) for n in names] for k, names in v.items()}
    except (TypeError, ValueError):
        return None


def _value(v: Any) -> Any:
    """ONNX metadata holds Python literals as strings ("{0: 'person'}", "[640, 640]"); YAML holds the values."""
    if isinstance(v, str):
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v
    return v


def _listify(v: Any) -> list[Any]:
    return list(v) if isinstance(v, list | tuple) else [v]


def _truth(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.strip().lower() == "true")
