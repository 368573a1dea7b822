"""The server's settings, typed and validated once, with their defaults defined here alone.

Sources, each over the one before: the defaults below, a config file (`cvdeploy serve --config serve.json|.toml|.yaml`),
`CVDEPLOY_SERVE_<FIELD>` environment variables (e.g. `CVDEPLOY_SERVE_MAX_BATCH=4`), then what the caller passes
(the CLI's flags that were given, or keyword arguments in Python). A wrong value is refused with the field named.
The runtime objects (`audit`, `auth`, `public_key`) are built by the caller from their own options and set here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cvdeploy.errors import InputError

ENV_PREFIX = "CVDEPLOY_SERVE_"
MiB = 1024 * 1024


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_assignment=True)

    # batching and engines
    max_batch: int = Field(8, ge=1, description="largest batch the dynamic batcher forms")
    max_delay_ms: float = Field(5.0, ge=0, description="longest a request waits for others to join its batch")
    max_queue: int = Field(256, ge=1, description="requests a model may hold waiting; beyond, 503")
    instances: int = Field(1, ge=1, description="engine instances per model, each its own session")
    threads: int | None = Field(None, ge=0, description="engine threads per instance; None: the bundle's hint with one "
                                "instance, the cores split evenly among several")
    warmup_runs: int = Field(2, ge=0)
    # limits on what a client may send
    request_timeout_s: float = Field(30.0, gt=0, description="per-request limit (504 past it)")
    max_body_bytes: int = Field(32 * MiB, ge=1, description="largest request body (413 past it)")
    max_pixels: int = Field(40_000_000, ge=1, description="largest decoded image (decompression-bomb guard)")
    allowed_formats: tuple[str, ...] = ("jpeg", "png", "bmp", "webp", "tiff", "gif")
    max_input_scale: float = Field(4.0, gt=0, description="v2 tensors: each side at most this many times the model's size")
    # slow and idle clients, and memory (cvdeploy.serve.limits)
    header_timeout_s: float = Field(10.0, gt=0, description="a request's headers must arrive within this")
    body_timeout_s: float = Field(60.0, gt=0, description="a request's body must arrive within this (408 past it)")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="an idle keep-alive connection is closed after this")
    max_connections: int = Field(1000, ge=1, description="connections beyond are closed at once")
    max_inflight_bytes: int = Field(512 * MiB, ge=1, description="weighted request bytes held at once (503 beyond)")
    # WebSocket streams (cvdeploy.serve.routes_stream, docs/streaming.md)
    stream_max_in_flight: int = Field(4, ge=1, le=256, description="frames a stream holds at once (received, not yet answered)")
    stream_policy: str = Field("block", pattern="^(block|drop-oldest)$", description="a stream's default when its frames in "
                               "flight are at the limit: block (stop reading: TCP backpressure) or drop-oldest")
    stream_max_connections: int = Field(64, ge=1, description="open streams at once; beyond, a new one is refused (1013)")
    stream_idle_timeout_s: float = Field(60.0, gt=0, description="a stream with nothing in flight is closed after this long without a message")
    # audit (the log itself is a runtime object)
    audit_sample: float = Field(1.0, ge=0, le=1, description="share of inference requests recorded")
    audit_anchors: str | None = None
    audit_anchor_every_s: float = Field(60.0, gt=0)
    # inference I/O logging (cvdeploy.diagnose.iolog): sampled inputs and answers for `cvdeploy doctor --io-log`
    io_log: str | None = None
    io_log_sample: float = Field(0.05, ge=0, le=1)
    io_log_store: str = Field("thumbnail", pattern="^(image|thumbnail|hash)$")
    io_log_max_bytes: int = Field(256 * MiB, ge=MiB)
    # probes and logs (docs/observability.md)
    public_health: bool = Field(False, description="/v2/health/live and /v2/health/ready answer without credentials "
                                "(Kubernetes probes); every other route stays authenticated")
    log_probes: bool = Field(False, description="health probes and /metrics scrapes appear in the access log too")
    # live drift monitoring against each bundle's profile.json (cvdeploy.serve.monitor, docs/operate.md)
    drift_monitor: bool = Field(True, description="keep rolling input and prediction statistics per model version and "
                                "compare them with the bundle's baseline profile")
    drift_window: int = Field(200, ge=10, description="requests in the rolling window compared with the baseline")
    drift_sample: float = Field(0.1, ge=0, le=1, description="share of requests whose pixel statistics (brightness, "
                                "contrast, sharpness...) are computed; sizes, format and predictions are read from all")
    drift_cpu_budget: float = Field(0.05, gt=0, le=1, description="share of the time the monitor's thread may be busy (its "
                                    "wall time: it grows when cores are scarce); past it, drawn requests skip their pixel "
                                    "statistics (sizes and predictions are always read)")
    drift_every: int = Field(50, ge=1, description="new requests between two evaluations of the window")
    drift_min_requests: int = Field(50, ge=5, description="requests in the window before it is first evaluated")
    drift_consecutive: int = Field(2, ge=1, description="evaluations in a row a statistic must be serious to raise the alert")
    drift_queue: int = Field(512, ge=1, description="requests waiting for the monitor's thread; beyond, they are not monitored")
    # canary and shadow releases (cvdeploy.serve.canary, docs/operate.md)
    canary_share: float = Field(0.1, ge=0, le=1, description="share of requests routed (canary) or copied (shadow) to a candidate")
    canary_window: int = Field(200, ge=10, description="candidate requests observed before an automatic promotion")
    canary_min_requests: int = Field(50, ge=5, description="requests on each side before the candidate is judged at all")
    canary_every: int = Field(10, ge=1, description="candidate requests between two judgements")
    canary_consecutive: int = Field(2, ge=1, description="judgements in a row a prediction statistic must be serious to roll back")
    canary_max_error_increase: float = Field(0.01, ge=0, le=1, description="candidate error rate above the incumbent's by "
                                             "more than this: roll back")
    canary_max_latency_ratio: float = Field(1.5, gt=0, description="candidate median latency above this many times the "
                                            "incumbent's: roll back")
    canary_auto: bool = Field(True, description="promote and roll back on the thresholds; False: only report, decide by "
                              "the admin routes")
    shadow_queue: int = Field(64, ge=1, description="requests waiting to be replayed on a shadow candidate; beyond, not copied")
    registry_poll_s: float = Field(5.0, gt=0, description="serve --registry: seconds between two reads of the followed alias")
    # runtime objects, set by the caller
    audit: Any = Field(None, exclude=True)  # a cvdeploy.security.audit.AuditLog
    auth: Any = Field(None, exclude=True)  # a cvdeploy.security.auth.AuthPolicy (None: no authentication, keep to loopback)
    public_key: Any = Field(None, exclude=True)  # an ed25519 public key: serve only bundles it signed

    @classmethod
    def load(cls, config: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
             **overrides: Any) -> ServeSettings:
        """Defaults < `config` file < `env` (CVDEPLOY_SERVE_*; default os.environ) < `overrides` (None values ignored)."""
        values: dict[str, Any] = {}
        if config is not None:
            values.update(_read_config(Path(config)))
        environ = os.environ if env is None else env
        for key, raw in environ.items():
            if key.startswith(ENV_PREFIX):
                name = key[len(ENV_PREFIX):].lower()
                if name not in cls.model_fields or cls.model_fields[name].exclude:
                    raise InputError(f"{key}: no such server setting (known: {', '.join(_settable())})")
                values[name] = _env_value(name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or "settings"
            raise InputError(f"server setting {where}: {first.get('msg', 'invalid')} (got {first.get('input')!r})") from None

    def public(self) -> dict[str, Any]:
        """The settings a config file can hold, as JSON-ready values (for docs and `--print-config`)."""
        return self.model_dump(mode="json")


def _settable() -> list[str]:
    return [n for n, f in ServeSettings.model_fields.items() if not f.exclude]


def _env_value(name: str, raw: str) -> Any:
    if name == "allowed_formats":
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    if raw.strip().lower() in ("", "none", "null"):
        return None
    return raw  # pydantic converts and checks the type


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"server config {path} not found")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            doc: Any = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as e:  # each parser has its own error type; all mean "not a valid file of that kind"
        raise InputError(f"server config {path} cannot be read: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(doc, dict):
        raise InputError(f"server config {path} must be a mapping of settings")
    doc = doc.get("serve", doc)  # a [serve] table in a shared TOML file
    unknown = [k for k in doc if k not in _settable()]
    if unknown:
        raise InputError(f"server config {path}: unknown setting(s) {', '.join(map(str, unknown))} (known: {', '.join(_settable())})")
    return dict(doc)
