"""The environment a bundle was built (or is verified) in: versions, CPU model and instruction sets."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("cvdeploy", "numpy", "onnx", "onnxruntime", "opencv-python-headless", "opencv-python", "torch", "torchvision", "ultralytics", "openvino")
# The flags that decide which kernels an engine can use (AVX-512 and VNNI matter for INT8 speed).
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "asimddp")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def cpu_info() -> dict[str, object]:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "Hardware") and value.strip():
                model = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    import os

    return {"model": model, "machine": platform.machine(), "logical_cpus": os.cpu_count(),
            "flags": [f for f in CPU_FLAGS if f in flags]}


def machine_id(cpu: dict[str, object] | None = None) -> str:
    """A short id of this machine's CPU as far as engines care: model, the flags above and the logical core count."""
    import hashlib

    c = cpu or cpu_info()
    key = f"{c.get('model')}|{c.get('machine')}|{c.get('logical_cpus')}|{' '.join(sorted(c.get('flags', [])))}"  # type: ignore[arg-type]
    return hashlib.sha256(key.encode()).hexdigest()[:12]


BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def capture() -> dict[str, object]:
    """Versions are read from package metadata, so nothing heavy (torch) is imported to report them."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: v for p in PACKAGES if (v := _version(p))},
        "cpu": cpu_info(),
    }
