"""The Engine protocol: what every inference backend offers the Predictor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: its name, shape (None or a name for a dynamic axis) and numpy dtype."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @property
    def dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.shape)


@runtime_checkable
class Engine(Protocol):
    """A loaded model ready to run; `run` times nothing but the engine call."""

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    @property
    def provider(self) -> str: ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...
