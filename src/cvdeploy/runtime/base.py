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


def check_feeds(inputs: list[TensorSpec], feeds: dict[str, np.ndarray]) -> None:
    """Refuse feeds whose names, ranks, fixed dimensions or dtypes do not match the model's inputs."""
    from cvdeploy.errors import InputError

    expected = {i.name: i for i in inputs}
    if set(feeds) != set(expected):
        raise InputError(f"model inputs are {sorted(expected)}, got {sorted(feeds)}")
    for name, arr in feeds.items():
        spec = expected[name]
        if arr.ndim != len(spec.shape) or any(isinstance(d, int) and d != a for d, a in zip(spec.shape, arr.shape, strict=True)):
            raise InputError(f"input {name!r}: expected shape {list(spec.shape)}, got {list(arr.shape)}")
        if str(arr.dtype) != spec.dtype:
            raise InputError(f"input {name!r}: expected dtype {spec.dtype}, got {arr.dtype}")


class EngineBase:
    """What every engine class shares: the input and output specs it read at load time, and no metadata of its own
    unless it overrides `metadata`. Subclasses set `_inputs` and `_outputs` in `__init__`."""

    _inputs: list[TensorSpec]
    _outputs: list[TensorSpec]

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    @property
    def metadata(self) -> dict[str, str]:
        return {}


@runtime_checkable
class Engine(Protocol):
    """A loaded model ready to run; `run` times nothing but the engine call."""

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    @property
    def provider(self) -> str: ...

    @property
    def precision(self) -> str:
        """The float precision the engine really computes at ("as stored": the graph's own types)."""
        ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...
