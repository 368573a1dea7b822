"""`cvdeploy serve`: the inference server on uvicorn."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import typer

from cvdeploy.cli.app import app, fail


@app.command()
def serve(
    bundles: list[Path] = typer.Argument(None, help="Bundles to serve (each as version 1 of the model named in its manifest)."),
    repository: Path | None = typer.Option(None, help="A model repository: DIR/<model>/<version>/ bundles."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 exposes the server to the network)."),
    port: int = typer.Option(8000, min=0, max=65535),
    config: Path | None = typer.Option(None, help="Server settings from a file (JSON, TOML or YAML; names as in "
                                       "`cvdeploy.serve.settings.ServeSettings`); CVDEPLOY_SERVE_* variables and flags override it."),
    max_batch: int | None = typer.Option(None, min=1, help="Largest batch the dynamic batcher forms [default: 8]."),
    max_delay_ms: float | None = typer.Option(None, min=0.0, help="Longest a request waits for others to join its batch [default: 5]."),
    instances: int | None = typer.Option(None, min=1, help="Engine instances per model, each with its own session, running batches "
                                         "in parallel [default: 1]."),
    threads: int | None = typer.Option(None, min=0, help="Engine threads per instance (default: the bundle's tuned setting "
                                       "for one instance, the cores split evenly among several)."),
    max_queue: int | None = typer.Option(None, min=1, help="Requests a model may hold waiting; beyond, 503 with Retry-After [default: 256]."),
    timeout: float | None = typer.Option(None, min=0.1, help="Per-request timeout in seconds (504 past it) [default: 30]."),
    max_body_mb: float | None = typer.Option(None, min=0.001, help="Largest request body (413 past it) [default: 32]."),
    max_megapixels: float | None = typer.Option(None, min=0.01, help="Largest decoded image (decompression-bomb guard) [default: 40]."),
    header_timeout: float | None = typer.Option(None, min=0.1, help="Seconds a request's headers may take to arrive; the "
                                                "connection is closed past it (slow-header clients) [default: 10]."),
    body_timeout: float | None = typer.Option(None, min=0.1, help="Seconds a request's body may take to arrive (408 past it) "
                                              "[default: 60]."),
    keep_alive_timeout: float | None = typer.Option(None, min=0.1, help="Seconds an idle keep-alive connection is kept open "
                                                    "[default: 5]."),
    max_connections: int | None = typer.Option(None, min=1, help="Open connections at most; new ones beyond are closed at once "
                                               "[default: 1000]."),
    max_inflight_mb: float | None = typer.Option(None, min=1.0, help="Request memory held at once (bodies weighted by what they "
                                                 "become: JSON x12, binary x3); beyond, 503 with Retry-After [default: 512]."),
    log_level: str = typer.Option("info", help="Log level (critical, error, warning, info, debug, trace). Every log line is JSON on "
                                  "stderr; the access log is on at every level (see docs/observability.md)."),
    log_probes: bool = typer.Option(False, "--log-probes", help="Also log health probes and /metrics scrapes in the access log "
                                    "(left out by default). Also CVDEPLOY_SERVE_LOG_PROBES=1."),
    public_health: bool = typer.Option(False, "--public-health", help="/v2/health/live and /v2/health/ready answer without "
                                       "credentials (Kubernetes probes); every other route stays authenticated. Also "
                                       "CVDEPLOY_SERVE_PUBLIC_HEALTH=1."),
    tls_cert: Path | None = typer.Option(None, help="Server certificate (PEM): serve HTTPS only, TLS 1.2 or newer."),
    tls_key: Path | None = typer.Option(None, help="The certificate's private key (PEM)."),
    tls_client_ca: Path | None = typer.Option(None, help="CA (PEM) that client certificates must be signed by: mutual TLS."),
    audit_log: Path | None = typer.Option(None, help="Record inference access and model lifecycle in this tamper-evident log (SQLite)."),
    audit_key_file: Path | None = typer.Option(None, help="The audit log's key (32 bytes; see `cvdeploy security model-key`)."),
    audit_sample: float | None = typer.Option(None, min=0.0, max=1.0, help="Share of inference requests recorded [default: 1]."),
    audit_anchors: Path | None = typer.Option(None, help="Append a signed anchor of the audit log to this file (kept apart from "
                                              "the log) at start, every --audit-anchor-every seconds and at shutdown."),
    audit_anchor_every: float | None = typer.Option(None, min=1.0, help="Seconds between audit anchors [default: 60]."),
    auth_keys: Path | None = typer.Option(None, help="Require authentication: the API key store (`cvdeploy security keys`)."),
    jwt_secret_file: Path | None = typer.Option(None, help="Also accept JWTs signed with this HMAC secret (or PEM public key)."),
    jwt_algorithm: str = typer.Option("HS256", help="The one JWT algorithm accepted (HS256, RS256, ES256, ...)."),
    jwt_audience: str = typer.Option("cvdeploy", help="Required JWT audience."),
    jwt_issuer: str | None = typer.Option(None, help="Required JWT issuer."),
    auth_policy: Path | None = typer.Option(None, help="JSON policy: roles, mfa_required, rate_per_s, burst, trusted_proxies."),
    public_key: Path | None = typer.Option(None, help="Serve only bundles signed with the matching private key "
                                           "(`cvdeploy sign`); unsigned or wrongly signed bundles are refused, at start and on reload."),
    key_file: Path | None = typer.Option(None, help="The model key of protected bundles (else $CVDEPLOY_MODEL_KEY_FILE, "
                                         "$CVDEPLOY_MODEL_KEY or $CVDEPLOY_MODEL_KEY_COMMAND)."),
    log_io: Path | None = typer.Option(None, help="Record sampled requests (input, answer, timings, anomalies) in this directory, "
                                       "for `cvdeploy doctor --io-log` (see docs/io-log.md)."),
    log_io_sample: float | None = typer.Option(None, min=0.0, max=1.0, help="Share of requests recorded [default: 0.05]; "
                                               "NaN outputs and black or saturated inputs are always recorded."),
    log_io_store: str | None = typer.Option(None, help="What is kept of each recorded input: image, thumbnail or hash "
                                            "[default: thumbnail]."),
    log_io_max_mb: float | None = typer.Option(None, min=1.0, help="The I/O log's size bound; the oldest records go first "
                                               "[default: 256]."),
    registry: str | None = typer.Option(None, help="The model registry of --model (a path or sqlite:/// URL; default "
                                        "$CVDEPLOY_REGISTRY, else ./cvdeploy-registry)."),
    model: list[str] = typer.Option(None, "--model", help="Serve a registry alias, NAME@ALIAS (repeatable): the bundle it points "
                                    "at now, then every version it is moved to (promote, rollback), swapped in without a "
                                    "restart; polled every registry_poll_s seconds [default: 5]."),
    canary: str | None = typer.Option(None, help="Start a release of this candidate bundle once the model is loaded: BUNDLE "
                                      "(with one model served) or MODEL=BUNDLE. See docs/operate.md."),
    canary_share: float | None = typer.Option(None, min=0.0, max=1.0, help="Share of requests routed (canary) or copied "
                                              "(shadow) to the candidate [default: 0.1]."),
    canary_mode: str = typer.Option("canary", help="canary: the candidate answers its share; shadow: it runs on copies "
                                    "and never answers."),
    no_drift_monitor: bool = typer.Option(False, "--no-drift-monitor", help="Do not compare live traffic with the bundles' "
                                          "baseline profiles (CVDEPLOY_SERVE_DRIFT_MONITOR=0)."),
    workers: int = typer.Option(1, min=1, help="Server processes on the one port (SO_REUSEPORT: the kernel spreads connections), "
                                "each with its own models and engines, the cores split among them: for many-core machines."),
    reuse_port: bool = typer.Option(False, "--reuse-port", hidden=True, help="Bind with SO_REUSEPORT (what --workers gives each worker)."),
    ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve (a local Ray, or the cluster in $RAY_ADDRESS): replicas, "
                             "batching, autoscaling; see docs/ray-serve.md."),
    replicas: int = typer.Option(1, min=1, help="With --ray: replicas per model."),
) -> None:
    """Serve bundles over HTTP: Open Inference Protocol v2 (Triton clients work), an image API and /metrics."""
    try:
        import uvicorn

        from cvdeploy.serve.app import build_repository, create_app, uvicorn_config
        from cvdeploy.serve.settings import MiB, ServeSettings
    except ImportError as e:
        raise fail(f"serving needs {e.name}: install it with `pip install 'cvdeploy[serve]'`") from None
    levels = ("critical", "error", "warning", "info", "debug", "trace")
    if log_level.lower() not in levels:
        raise fail(f"--log-level {log_level!r}: one of {', '.join(levels)}")

    def scaled(value: float | None, unit: float) -> int | None:
        return None if value is None else int(value * unit)

    # Flags not given are None: the config file, CVDEPLOY_SERVE_* and then ServeSettings' own defaults decide.
    settings = ServeSettings.load(
        config, max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue, instances=instances, threads=threads,
        request_timeout_s=timeout, max_body_bytes=scaled(max_body_mb, MiB), max_pixels=scaled(max_megapixels, 1e6),
        audit_sample=audit_sample, header_timeout_s=header_timeout, body_timeout_s=body_timeout,
        keep_alive_timeout_s=keep_alive_timeout, max_connections=max_connections, max_inflight_bytes=scaled(max_inflight_mb, MiB),
        audit_anchors=str(audit_anchors) if audit_anchors is not None else None, audit_anchor_every_s=audit_anchor_every,
        io_log=str(log_io) if log_io is not None else None, io_log_sample=log_io_sample, io_log_store=log_io_store,
        io_log_max_bytes=scaled(log_io_max_mb, MiB), public_health=public_health or None, log_probes=log_probes or None,
        canary_share=canary_share, drift_monitor=False if no_drift_monitor else None)
    if audit_log is not None:
        from cvdeploy.security.audit import AuditLog
        from cvdeploy.security.protect import load_key

        if audit_key_file is None:
            raise fail("--audit-log needs --audit-key-file (the key that authenticates the log's chain)")
        settings.audit = AuditLog(audit_log, load_key(audit_key_file))
    elif settings.audit_anchors is not None:
        raise fail("--audit-anchors needs --audit-log")
    if auth_keys is not None or jwt_secret_file is not None or auth_policy is not None:
        from cvdeploy.security.auth import AuthPolicy, JwtConfig, KeyStore

        store = KeyStore(auth_keys) if auth_keys is not None else None
        jwt_cfg = None
        if jwt_secret_file is not None:
            if not jwt_secret_file.is_file():
                raise fail(f"--jwt-secret-file: {jwt_secret_file} not found")
            jwt_cfg = JwtConfig(jwt_secret_file.read_bytes().strip(), (jwt_algorithm,), jwt_audience, jwt_issuer)
        settings.auth = AuthPolicy.from_file(auth_policy, store, jwt_cfg) if auth_policy else AuthPolicy(store, jwt_cfg)
    if public_key is not None:
        from cvdeploy.bundle.signing import load_public_key

        settings.public_key = load_public_key(public_key)
    if key_file is not None:
        import os

        from cvdeploy.security.protect import KEY_FILE_ENV

        if not key_file.is_file():
            raise fail(f"--key-file: {key_file} not found")
        os.environ[KEY_FILE_ENV] = str(key_file)  # where every Predictor of this process reads a protected bundle's key
    if ray:
        if repository is not None or workers > 1 or tls_cert or auth_keys or jwt_secret_file or auth_policy or audit_log or log_io:
            raise fail("--ray serves the bundles given as arguments, without --repository, --workers, TLS, authentication, "
                       "audit or I/O logging (Ray's proxy does not run cvdeploy's middleware: see docs/ray-serve.md)")
        if not bundles:
            raise fail("--ray needs at least one bundle")
        from cvdeploy.deploy.ray_serve import run as run_on_ray  # without ray: one `error:` line (MissingDependencyError)

        run_on_ray([str(b) for b in bundles], host=host, port=port, replicas=replicas, max_batch_size=settings.max_batch,
                   batch_wait_timeout_s=settings.max_delay_ms / 1000, num_cpus_per_replica=float(settings.threads or 1),
                   settings=settings)
        return
    repo = build_repository([str(b) for b in bundles or []], str(repository) if repository else None, settings,
                            registry=registry, follow=model or None)
    if canary is not None:
        target, sep, candidate = canary.rpartition("=")
        if not sep and len(repo.sources()) != 1:
            raise fail(f"--canary BUNDLE needs one served model; with {len(repo.sources())}, give MODEL=BUNDLE")
        if canary_mode not in ("canary", "shadow"):
            raise fail(f"--canary-mode {canary_mode!r}: canary or shadow")
        repo.pending_releases.append({"name": target if sep else repo.sources()[0], "bundle": candidate, "mode": canary_mode})
    repo.preflight()  # a wrong or missing key, a tampered bundle: one line now, not a failed start
    from cvdeploy.logs import server_logs

    log = logging.getLogger("cvdeploy.serve")
    if workers > 1:
        if audit_log is not None:
            raise fail("--workers > 1 with --audit-log: the audit chain has one writer; run one worker per log, or --workers 1")
        if canary is not None:
            raise fail("--workers > 1 with --canary: each worker would judge the candidate on its own share; use --workers 1")
        if log_io is not None:
            raise fail("--workers > 1 with --log-io: one I/O log directory has one writer; run one worker per directory")
        if port == 0:
            raise fail("--workers > 1 needs a fixed --port (every worker binds the same one)")
        with server_logs(log_level, capture_native=False):  # the workers' own lines pass through untouched
            code = _supervise(workers, settings.instances, threads)
        raise typer.Exit(code)
    # A worker (--reuse-port) warms its models before it serves: the kernel must not hand it a connection before then
    # (its socket, bound now, holds them in its queue). A single server listens at once and warms in the background.
    sockets = [_reuse_port_socket(host, port)] if reuse_port else None
    config = uvicorn_config(create_app(repo, background=not reuse_port), host, port, tls_cert=str(tls_cert) if tls_cert else None,
                            tls_key=str(tls_key) if tls_key else None, tls_client_ca=str(tls_client_ca) if tls_client_ca else None,
                            log_level=log_level, settings=settings)
    scheme = "https" if tls_cert else "http"
    with server_logs(log_level):
        log.info("serving %s on %s://%s:%d%s", ", ".join(repo.sources()), scheme, host, port, " with mutual TLS" if tls_client_ca else "",
                 extra={"models": repo.sources(), "public_health": settings.public_health, "auth": settings.auth is not None})
        uvicorn.Server(config).run(sockets=sockets)


def _reuse_port_socket(host: str, port: int) -> Any:
    """A listening socket that other processes may bind too (SO_REUSEPORT): the kernel spreads new connections."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if not hasattr(socket, "SO_REUSEPORT"):
        raise fail("--workers needs SO_REUSEPORT (Linux, BSD, macOS)")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise fail(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def _worker_argv(threads_each: int | None) -> list[str]:
    """This command's own arguments for a worker: without --workers, with --reuse-port (and the threads it may use)."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        if a.startswith("--workers="):
            continue
        args.append(a)
    if threads_each is not None and not any(a == "--threads" or a.startswith("--threads=") for a in args):
        args += ["--threads", str(threads_each)]
    return [sys.executable, "-m", "cvdeploy", *args, "--reuse-port"]


def _supervise(workers: int, instances: int, threads: int | None) -> int:
    """Start `workers` copies of this server on the same port; forward SIGINT/SIGTERM; when one ends, end the others."""
    import os
    import signal
    import subprocess
    import time

    each = None if threads is not None else max(1, (os.cpu_count() or 1) // (workers * instances))
    procs = [subprocess.Popen(_worker_argv(each)) for _ in range(workers)]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("cvdeploy.serve").info("%d workers (pids %s), %s engine thread(s) per instance", workers,
                                             ", ".join(str(p.pid) for p in procs), each or threads)
    code = 0
    while any(p.poll() is None for p in procs):
        ended = [p for p in procs if p.poll() is not None]
        if ended and not stopping:  # one worker died: a half-served port is worse than none
            code = next((p.returncode for p in ended if p.returncode), 1)
            stop(signal.SIGTERM, None)
        time.sleep(0.2)
    return 0 if stopping else code
