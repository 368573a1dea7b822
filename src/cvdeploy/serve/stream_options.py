"""A stream's options: the WebSocket handshake's query (the image API's parameters, `policy`, `in_flight`) and the
JSON options messages a client may send between frames, checked against the model with the image API's own rules."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request

from cvdeploy.errors import InputError
from cvdeploy.serve.protocol import load_json
from cvdeploy.serve.repository import LoadedModel
from cvdeploy.serve.routes_images import predict_query, request_options

POLICIES = ("block", "drop-oldest")
OPTION_KEYS = ("conf", "iou", "max_det", "classes", "annotate", "retina_masks", "policy", "in_flight")
MAX_OPTIONS_BYTES = 64 * 1024


@dataclass(frozen=True)
class Options:
    """What a client may choose for its stream: the image API's query options, the backpressure policy, and at most
    the server's in-flight frames."""

    conf: float | None = None
    iou: float | None = None
    max_det: int | None = None
    classes: str | None = None  # comma-separated class ids, as in the image API's query
    annotate: bool = False
    retina_masks: bool = False  # segment: masks at the image's own size
    policy: str = "block"
    in_flight: int = 4

    def check(self, m: LoadedModel, limit: int) -> Any:
        """The Predictor's options for these (InputError naming the option when one is out of range)."""
        if self.policy not in POLICIES:
            raise InputError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 1 <= self.in_flight <= limit:
            raise InputError(f"in_flight must be within 1..{limit} (the server's stream_max_in_flight), got {self.in_flight}")
        return request_options(m, self.conf, self.iou, self.max_det, self.classes, retina_masks=self.retina_masks)


def query_options(ws: Request, limit: int, default_policy: str) -> tuple[Options, str | None]:
    """The handshake's query: the image API's parameters (same types, same messages), `policy` and `in_flight`."""
    q = predict_query(ws)
    raw = ws.query_params.get("in_flight")
    try:
        in_flight = int(raw) if raw is not None else limit
    except ValueError:
        raise InputError(f"query parameter in_flight: expected an integer, got {raw!r}") from None
    opts = Options(q["conf"], q["iou"], q["max_det"], q["classes"], q["annotate"], q["retina_masks"],
                   ws.query_params.get("policy", default_policy), in_flight)
    return opts, q["version"]


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not 1 here


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_OPTION_TYPES: dict[str, tuple[str, Any]] = {
    "conf": ("a number or null", lambda v: v is None or _number(v)),
    "iou": ("a number or null", lambda v: v is None or _number(v)),
    "max_det": ("an integer or null", lambda v: v is None or _integer(v)),
    "classes": ("a list of class ids, a comma-separated string or null",
                lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(map(_integer, v)))),
    "annotate": ("true or false", lambda v: isinstance(v, bool)),
    "retina_masks": ("true or false", lambda v: isinstance(v, bool)),
    "policy": (f"one of {', '.join(POLICIES)}", lambda v: isinstance(v, str)),
    "in_flight": ("an integer", _integer),
}


def message_options(text: str, current: Options) -> Options:
    """An options message (a JSON object of OPTION_KEYS) over `current`; a null threshold goes back to the bundle's."""
    if len(text) > MAX_OPTIONS_BYTES:
        raise InputError(f"an options message is at most {MAX_OPTIONS_BYTES} bytes, got {len(text)}")
    doc = load_json(text, "the options message")
    if not isinstance(doc, dict):
        raise InputError(f'an options message must be a JSON object, e.g. {{"conf": 0.3, "policy": "drop-oldest"}}; got {type(doc).__name__}')
    unknown = sorted(set(doc) - set(OPTION_KEYS))
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(map(repr, unknown))}; known: {', '.join(OPTION_KEYS)}")
    out: dict[str, Any] = {}
    for key, v in doc.items():
        expected, ok = _OPTION_TYPES[key]
        if not ok(v):
            raise InputError(f"option {key}: expected {expected}, got {json.dumps(v)[:80]}")
        out[key] = ",".join(map(str, v)) if isinstance(v, list) else float(v) if key in ("conf", "iou") and v is not None else v
    return replace(current, **out)
