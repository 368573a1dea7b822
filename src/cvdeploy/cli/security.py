"""`cvdeploy security certs DIR`: a development CA with server and client certificates."""

from __future__ import annotations

from pathlib import Path

import typer

from cvdeploy.cli.app import app, console

security_app = typer.Typer(no_args_is_help=True, help="Security tools: development certificates.")
app.add_typer(security_app, name="security")


@security_app.command("certs")
def certs(
    out: Path = typer.Argument(..., help="Directory for ca.pem, server.pem/.key, client.pem/.key (and ca.key)."),
    host: list[str] = typer.Option(["localhost", "127.0.0.1", "::1"], help="Names and addresses the server certificate covers."),
    days: int = typer.Option(30, min=1, max=825, help="Validity."),
    force: bool = typer.Option(False, help="Replace existing files."),
) -> None:
    """Create a development PKI for `cvdeploy serve --tls-cert/--tls-key [--tls-client-ca]` (not for production)."""
    from cvdeploy.security.tls import make_dev_pki

    pki = make_dev_pki(out, hosts=tuple(host), days=days, force=force)
    console.print(f"CA {pki.ca_cert}; server {pki.server_cert} + {pki.server_key} for {', '.join(host)}; "
                  f"client {pki.client_cert} + {pki.client_key}; valid {days} days; private keys are mode 600", highlight=False)
    console.print(f"serve:  cvdeploy serve BUNDLE --tls-cert {pki.server_cert} --tls-key {pki.server_key} --tls-client-ca {pki.ca_cert}",
                  highlight=False)
    console.print(f"client: curl --cacert {pki.ca_cert} --cert {pki.client_cert} --key {pki.client_key} https://127.0.0.1:8000/v2",
                  highlight=False)
