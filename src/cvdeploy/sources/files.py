"""Still images as a source: files (from paths, directories and globs) and fetched URLs, decoded in order."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from cvdeploy.errors import CvdeployError
from cvdeploy.sources.base import Frame, Source
from cvdeploy.vision.image import DecodeLimits, load_image

ErrorHandler = Callable[[str, CvdeployError], None]


class Images(Source):
    """Still images, decoded one by one in the caller's thread (decoding is the only reading there is).

    With `on_error`, an image that cannot be read is reported to it and skipped; without, its error is raised.
    """

    kind = "image"

    def __init__(self, name: str, items: Sequence[tuple[str, Callable[[], np.ndarray]]], *,
                 on_error: ErrorHandler | None = None) -> None:
        super().__init__(name)
        self.items = list(items)
        self.total = len(self.items)
        self.on_error = on_error
        self._next = 0

    @classmethod
    def from_paths(cls, name: str, paths: Sequence[str | os.PathLike[str]], *, limits: DecodeLimits = DecodeLimits(),
                   on_error: ErrorHandler | None = None) -> Images:
        def loader(p: str | os.PathLike[str]) -> Callable[[], np.ndarray]:
            return lambda: load_image(p, limits=limits)

        return cls(name, [(str(p), loader(p)) for p in paths], on_error=on_error)

    def start(self) -> Images:
        return self

    def read(self, n: int = 1) -> list[Frame]:
        frames: list[Frame] = []
        while len(frames) < n and self._next < len(self.items) and not self._closed:
            name, load = self.items[self._next]
            self._next += 1
            t0 = time.perf_counter()
            try:
                image = load()
            except CvdeployError as e:
                if self.on_error is None:
                    raise
                self.stats.bad += 1
                self.on_error(name, e)
                continue
            self.stats.read += 1
            if self.size is None:
                self.size = (image.shape[1], image.shape[0])
            frames.append(Frame(image, name, 0, None, None, "image", (time.perf_counter() - t0) * 1000.0))
        return frames

    def close(self) -> None:
        self._closed = True
