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


keys_app = typer.Typer(no_args_is_help=True, help="API keys: create (shown once), list, revoke.")
security_app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    store: Path = typer.Option(..., help="The key store (SQLite; created mode 600)."),
    principal: str = typer.Option(..., help="Who the key is for."),
    role: str = typer.Option(..., help="viewer, predictor, operator or admin."),
    ttl_days: float = typer.Option(90, min=0.01, help="Days until the key expires."),
) -> None:
    """Create an API key; the key is printed once and stored only as an argon2id hash."""
    from cvdeploy.security.auth import KeyStore

    key_id, key = KeyStore(store).create(principal, role, ttl_days=ttl_days)
    console.print(f"key id {key_id} for {principal} ({role}), expires in {ttl_days:g} days. The key (shown once):", highlight=False)
    print(key)


@keys_app.command("list")
def keys_list(store: Path = typer.Option(..., help="The key store.")) -> None:
    """Key ids, principals, roles, expiry and revocation (never the secrets)."""
    import time

    from cvdeploy.security.auth import KeyStore

    for k in KeyStore(store).list():
        state = "revoked" if k["revoked"] else ("expired" if k["expires"] and k["expires"] < time.time() else "active")
        console.print(f"{k['key_id']}  {k['principal']:<16} {k['role']:<10} {state}", highlight=False)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(...), store: Path = typer.Option(..., help="The key store.")) -> None:
    """Revoke a key at once (the server checks the store on every request)."""
    from cvdeploy.security.auth import KeyStore

    KeyStore(store).revoke(key_id)
    console.print(f"key {key_id} revoked")


@security_app.command("totp-enrol")
def totp_enrol(store: Path = typer.Option(..., help="The key store."), principal: str = typer.Option(...)) -> None:
    """Enrol a principal in TOTP (RFC 6238): prints the secret and an otpauth:// URI for an authenticator app."""
    from cvdeploy.security.auth import KeyStore

    secret = KeyStore(store).enrol_totp(principal)
    console.print(f"TOTP secret for {principal}: {secret}", highlight=False)
    print(f"otpauth://totp/cvdeploy:{principal}?secret={secret}&issuer=cvdeploy&algorithm=SHA1&digits=6&period=30")
