"""The exceptions cvdeploy raises; each carries a message a user can act on.

    CvdeployError                     base: anything cvdeploy refuses, with a one-line reason
    ├── InputError                    bad input from a caller (missing file, wrong shape, bad option)        400
    │   ├── ImageDecodeError          bytes that are not a supported, sane image                             400
    │   ├── PayloadTooLargeError      a body larger than the server allows                                   413
    │   ├── SourceError               a video, stream, URL or webcam that cannot be opened or read           400
    │   └── OutputNotRepresentableError  a valid request whose answer cannot take the asked form (NaN in JSON) 422
    ├── NotFoundError                 a model, version or feature this server does not have                  404
    ├── AuthError                     refused by authentication, authorization or a rate limit     its status
    ├── RequestTimeoutError           the client did not send its request in time                           408
    ├── ClientAbortError              the client went away before its request was read           (logged 499)
    ├── ServerBusyError               the server cannot take this request now: retry later                  503
    │   └── QueueFullError            a model's batch queue is full                                          503
    ├── DeadlineError                 the server could not answer within the request timeout                 504
    ├── BundleError                   a bundle that is incomplete, tampered with or of an unknown schema
    ├── ModelFormatError              a model file cvdeploy cannot read
    ├── EngineError                   the inference engine failed to load or run a model
    └── MissingDependencyError        an optional extra is needed for this action

The HTTP statuses on the right are applied in one place, `cvdeploy.serve.http.status_of`; no built-in
exception stands for a status anywhere in the package.
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


class SourceError(InputError):
    """A source that cannot be opened or read: a URL that times out or answers 404, a video with no decodable frame,
    a stream that never starts or dropped for good, a webcam that cannot be opened."""


class PayloadTooLargeError(InputError):
    """A request body (or what it inflates to) is larger than the server's limit."""


class OutputNotRepresentableError(InputError):
    """The request was valid, but its answer cannot be written in the asked form (NaN or inf in JSON)."""


class NotFoundError(CvdeployError):
    """A model, a version or a feature that this server does not have."""


class AuthError(CvdeployError):
    """Refused by authentication (401), authorization (403), a rate limit (429), a malformed credential request (400)
    or a busy hashing pool (503). `detail` is for the audit log, never for the client."""

    def __init__(self, status: int, message: str, audit_detail: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.detail, self.retry_after = status, message, audit_detail, retry_after


class RequestTimeoutError(CvdeployError):
    """The client did not send its request (its body) within the server's timeout."""


class ClientAbortError(CvdeployError):
    """The client disconnected before its request was read: nothing to answer, logged as a client abort."""


class ServerBusyError(CvdeployError):
    """The server is at a limit (bytes in flight, queue): the request was not started; retry later."""


class QueueFullError(ServerBusyError):
    """A model's batch queue holds its maximum of waiting requests."""


class DeadlineError(CvdeployError):
    """The server could not answer within the request timeout."""


class MissingDependencyError(CvdeployError, ImportError):
    """An optional dependency (an extra) is needed for this action."""

    def __init__(self, package: str, extra: str, action: str) -> None:
        super().__init__(f"{action} needs {package}: install it with `pip install 'cvdeploy[{extra}]'`")
        self.package, self.extra = package, extra
