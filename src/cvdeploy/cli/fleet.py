"""`cvdeploy fleet publish|serve|agent|status`: signed updates for a fleet of devices (docs/fleet.md)."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cvdeploy.cli.app import app, console, err_console, fail

if TYPE_CHECKING:
    from cvdeploy.fleet.protocol import StatusReport

fleet_app = typer.Typer(no_args_is_help=True, help="Fleet updates: publish signed bundle versions on an update server; "
                        "device agents install them into A/B slots, verify and try them, and commit or roll back by themselves.")
app.add_typer(fleet_app, name="fleet")

_ROOT = typer.Option(..., "--root", envvar="CVDEPLOY_FLEET_ROOT", help="The update server's directory.")
_CHANNEL = typer.Option("stable", "--channel", help="The channel (a name devices follow).")
_TOKEN_FILE = typer.Option(None, "--token-file", help="The fleet token (default: $CVDEPLOY_FLEET_TOKEN, else ROOT/fleet.token).")


def _say(text: str, *, err: bool = False) -> None:
    (err_console if err else console).print(text, highlight=False, soft_wrap=True, markup=False)


@fleet_app.command("publish")
def publish(
    bundle: Path = typer.Argument(..., help="The signed bundle to publish (`cvdeploy sign`)."),
    root: Path = _ROOT,
    key: Path = typer.Option(..., "--key", help="The publisher's ed25519 public key (PEM): the bundle must be signed by it. "
                             "Pinned in ROOT at the first publish; devices pin the same key."),
    channel: str = _CHANNEL,
    version: str | None = typer.Option(None, "--version", help="The version's name (default: BUNDLE-NAME-<manifest sha256 "
                                       "prefix>); a published version never changes."),
    as_json: bool = typer.Option(False, "--json", help="Print the channel document as JSON on stdout."),
) -> None:
    """Add a signed bundle version to the update server's directory and point CHANNEL at it (refuses an unsigned,
    wrongly signed or altered bundle)."""
    from cvdeploy.fleet.publish import FleetRoot

    doc = FleetRoot(root).publish(bundle, key, channel=channel, version=version)
    if as_json:
        print(doc.model_dump_json(indent=2), flush=True)
        return
    size = sum(f.size for f in doc.files)
    _say(f"published {doc.version} ({doc.bundle}, {len(doc.files)} signed files, {size / 1e6:.1f} MB) on channel "
         f"{doc.channel!r} of {root}; manifest sha256 {doc.manifest_sha256}")


@fleet_app.command("serve")
def serve(
    root: Path = _ROOT,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8700, help="Port to listen on."),
    token_file: Path | None = _TOKEN_FILE,
    tls_cert: Path | None = typer.Option(None, help="Server certificate (PEM): serve HTTPS only, TLS 1.2 or newer."),
    tls_key: Path | None = typer.Option(None, help="The certificate's private key (PEM)."),
    tls_client_ca: Path | None = typer.Option(None, help="CA (PEM) that device certificates must be signed by: mutual TLS."),
    log_level: str = typer.Option("warning", help="uvicorn's log level (shown with --verbose)."),
) -> None:
    """Serve ROOT's channels, versions and files to device agents, and record their reports (fleet token required)."""
    import uvicorn

    from cvdeploy.fleet.publish import load_token
    from cvdeploy.fleet.server import create_fleet_app
    from cvdeploy.serve.app import uvicorn_config

    if not root.is_dir():
        raise fail(f"--root {root} is not a directory: publish a bundle into it first (`cvdeploy fleet publish`)")
    token = load_token(token_file, root=root, create=True)
    config = uvicorn_config(create_fleet_app(root, token), host, port, tls_cert=str(tls_cert) if tls_cert else None,
                            tls_key=str(tls_key) if tls_key else None,
                            tls_client_ca=str(tls_client_ca) if tls_client_ca else None, log_level=log_level)
    where = "ROOT/fleet.token" if token_file is None else str(token_file)
    _say(f"fleet update server for {root} on {'https' if tls_cert else 'http'}://{host}:{port} (token: {where})", err=True)
    uvicorn.Server(config).run()


@fleet_app.command("agent")
def agent(
    device_dir: Path = typer.Option(..., "--device-dir", envvar="CVDEPLOY_FLEET_DEVICE_DIR", help="The device's directory: "
                                    "slots, pointer (DEVICE/current: what the device serves), downloads."),
    server: str = typer.Option(..., "--server", envvar="CVDEPLOY_FLEET_SERVER", help="The update server's URL."),
    public_key: Path = typer.Option(..., "--public-key", envvar="CVDEPLOY_FLEET_PUBLIC_KEY",
                                    help="The publisher's ed25519 public key (PEM), installed on the device: the only key "
                                         "an update may be signed by."),
    device_id: str | None = typer.Option(None, "--device-id", help="This device's name in reports (default: the host name)."),
    channel: str = _CHANNEL,
    token_file: Path | None = typer.Option(None, "--token-file", help="The fleet token (default: $CVDEPLOY_FLEET_TOKEN)."),
    samples: Path | None = typer.Option(None, "--samples", help="A directory of local images for the canary (5 or more)."),
    canary_images: int = typer.Option(32, min=1, help="At most this many sample images are predicted by each version."),
    fail_on: str = typer.Option("serious", help="Roll back when a prediction statistic drifts this much: serious or warning."),
    ca: Path | None = typer.Option(None, "--ca", help="CA (PEM) of the server's TLS certificate, for a private CA."),
    once: bool = typer.Option(False, "--once", help="Poll once, install what is new, and exit (status 0 unless the update "
                              "failed, was refused or was rolled back)."),
    interval: float = typer.Option(300.0, min=0.1, help="Seconds between polls (±10 %), without --once."),
    retries: int = typer.Option(3, min=0, help="Tries per download within one poll (each continues where the last stopped)."),
    max_file_mb: int = typer.Option(4096, min=1, help="Size limit of a file whose size the signed manifest does not record "
                                    "(golden cases, profile); variant files are held to their signed size."),
    as_json: bool = typer.Option(False, "--json", help="Print each poll's final report as one JSON line on stdout."),
) -> None:
    """Poll the update server; install, verify, try, and commit or roll back each new version by itself."""
    from cvdeploy.fleet.agent import Agent, AgentSettings
    from cvdeploy.fleet.publish import load_token

    if fail_on not in ("serious", "warning"):
        raise fail(f"--fail-on {fail_on!r}: serious or warning")
    settings: dict[str, Any] = {"device_id": device_id} if device_id else {}
    a = Agent(AgentSettings(device_dir=device_dir, server=server, token=load_token(token_file), public_key=public_key,
                            channel=channel, samples=samples, canary_images=canary_images, fail_on=fail_on, ca=ca,
                            retries=retries, max_file_mb=max_file_mb, **settings),
              on_report=lambda r: _say(_line(r), err=True))

    def done(report: StatusReport | None) -> None:
        if report is not None and as_json:
            print(report.model_dump_json(), flush=True)

    if once:
        report = a.poll_once()
        done(report)
        if report.state in ("failed", "refused", "rolled-back"):
            raise typer.Exit(1)
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # finish the step at hand, then exit 0
    with contextlib.suppress(KeyboardInterrupt):
        a.run(interval, stop, on_poll=done)


def _line(r: StatusReport) -> str:
    what = r.version or r.active_version or "-"
    extra = f" ({r.reason})" if r.reason else ""
    moved = f"; {r.files_downloaded} file(s) downloaded, {r.bytes_downloaded} bytes, {r.files_reused} reused" \
        if r.state in ("committed", "rolled-back", "refused") and (r.files_downloaded or r.files_reused) else ""
    return f"{r.device}: {r.state} {what}{moved}{extra}"


@fleet_app.command("status")
def status(
    root: Path | None = typer.Option(None, "--root", envvar="CVDEPLOY_FLEET_ROOT", help="Read the reports from the server's "
                                     "directory."),
    server: str | None = typer.Option(None, "--server", help="Or ask a running update server (needs the fleet token)."),
    token_file: Path | None = _TOKEN_FILE,
    ca: Path | None = typer.Option(None, "--ca", help="CA (PEM) of the server's TLS certificate."),
    as_json: bool = typer.Option(False, "--json", help="Print the reports as JSON on stdout."),
) -> None:
    """Each device's last report: state, version, what it serves, why."""
    from cvdeploy.cli.output import fit_table

    if (root is None) == (server is None):
        raise fail("give --root DIR (the server's directory) or --server URL")
    if root is not None:
        from cvdeploy.fleet.publish import FleetRoot

        store = FleetRoot(root)
        reports = store.reports()
        channels = {c.channel: c.version for c in store.channels()}
    else:
        from cvdeploy.fleet.download import Fetcher
        from cvdeploy.fleet.protocol import StatusReport
        from cvdeploy.fleet.publish import load_token

        with Fetcher(server, load_token(token_file), "status", ca=ca, retries=1) as fetch:  # type: ignore[arg-type]
            reports = [StatusReport.model_validate(d) for d in json.loads(fetch.get_bytes("/devices", 64 << 20))]
            channels = json.loads(fetch.get_bytes("/channels", 1 << 20))
    if as_json:
        print(json.dumps({"channels": channels, "devices": [r.model_dump(mode="json") for r in reports]}, indent=2), flush=True)
        return
    for name, version in channels.items():
        _say(f"channel {name}: {version}")
    if not reports:
        _say("no device has reported yet")
        return
    rows = [[r.device, r.state, r.version or "-", r.active_version or "-", r.received_at or r.at] for r in reports]
    console.print(fit_table(console, [("device", "left"), ("state", "left"), ("version", "left"), ("serving", "left"),
                                      ("reported", "left")], rows))
    for r in reports:  # below the table: a reason can be long, and a cell is never cut
        if r.reason:
            _say(f"{r.device}: {r.reason}")
    counts: dict[str, int] = {}
    for r in reports:
        counts[r.state] = counts.get(r.state, 0) + 1
    _say(f"{len(reports)} device(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
