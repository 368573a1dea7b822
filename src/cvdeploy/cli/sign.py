"""`cvdeploy sign BUNDLE --key KEY`: an ed25519 signature of the bundle; `cvdeploy security sign-key PATH`: a key pair."""

from __future__ import annotations

from pathlib import Path

import typer

from cvdeploy.cli.app import app, console
from cvdeploy.cli.security import security_app


@app.command()
def sign(
    bundle: Path = typer.Argument(..., help="The bundle to sign (a protected bundle too: sign it after `cvdeploy protect`)."),
    key: Path = typer.Option(..., "--key", help="The ed25519 private key (PEM), from `cvdeploy security sign-key`."),
) -> None:
    """Sign the bundle's manifest (which holds every file's sha256) with ed25519; writes BUNDLE/signature.json."""
    from cvdeploy.bundle.bundle import set_bundle_modes
    from cvdeploy.bundle.signing import public_key_path, sign_bundle

    sig = sign_bundle(bundle, key)
    set_bundle_modes(bundle)  # signature.json as open (or private) as the bundle it signs, whatever the umask
    console.print(f"signed {bundle} with key {sig.key_fingerprint}: {bundle / 'signature.json'} written. Check it with "
                  f"`cvdeploy verify {bundle} --public-key {public_key_path(key)}`. Commands that rewrite the manifest (bench tune, "
                  "adding variants) remove the signature: sign again after them", highlight=False, soft_wrap=True)


@security_app.command("sign-key")
def sign_key(
    path: Path = typer.Argument(..., help="Where to write the new ed25519 private key (PEM, mode 600); the public key goes to PATH.pub."),
    force: bool = typer.Option(False, help="Replace existing key files."),
) -> None:
    """Create an ed25519 key pair for `cvdeploy sign` (private) and `verify --public-key` (public)."""
    from cvdeploy.bundle.signing import key_fingerprint, load_public_key, new_signing_key

    private, public = new_signing_key(path, force)
    console.print(f"private key {private} (mode 600: keep it where bundles are signed, out of bundles and version control); "
                  f"public key {public} (give it to the machines that verify); fingerprint {key_fingerprint(load_public_key(public))}",
                  highlight=False)
