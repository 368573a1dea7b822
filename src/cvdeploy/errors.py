"""The exceptions cvdeploy raises; each carries a message a user can act on.

    CvdeployError                 base: anything cvdeploy refuses, with a one-line reason
    ├── InputError                bad input from a caller (missing file, wrong shape, bad option)
    │   └── ImageDecodeError      bytes that are not a supported, sane image
    ├── BundleError               a bundle that is incomplete, tampered with or of an unknown schema
    ├── ModelFormatError          a model file cvdeploy cannot read
    ├── EngineError               the inference engine failed to load or run a model
    ├── ServerBusyError           the server cannot take this request now (retry later: 503)
    └── MissingDependencyError    an optional extra is needed for this action
"""

from __future__ import annotations


class CvdeployError(Exception):
    """Base class: the message is meant for the user, in one line."""


class InputError(CvdeployError, ValueError):
    """The caller gave something cvdeploy cannot use."""


class ImageDecodeError(InputError):
    """An image could not be decoded, or breaks a limit (size, format)."""


class BundleError(CvdeployError):
    """A bundle is incomplete, tampered with, or of an unknown schema."""


class ModelFormatError(CvdeployError):
    """A model file is of a format cvdeploy cannot read."""


class EngineError(CvdeployError):
    """The inference engine failed to load or run the model."""


class ServerBusyError(CvdeployError):
    """The server is at a limit (bytes in flight, queue): the request was not started; retry later."""


class MissingDependencyError(CvdeployError, ImportError):
    """An optional dependency (an extra) is needed for this action."""

    def __init__(self, package: str, extra: str, action: str) -> None:
        super().__init__(f"{action} needs {package}: install it with `pip install 'cvdeploy[{extra}]'`")
        self.package, self.extra = package, extra
