"""`cvdeploy protect BUNDLE -o OUT --key-file K`: encrypt (and optionally obfuscate) every variant."""

from __future__ import annotations

from pathlib import Path

import typer

from cvdeploy.cli.app import app, console
from cvdeploy.cli.security import security_app


@app.command()
def protect(
    bundle: Path = typer.Argument(..., help="The bundle to protect (left as it is)."),
    output: Path = typer.Option(..., "-o", "--output", help="The protected bundle to write."),
    key_file: Path | None = typer.Option(None, help="The model key (32 bytes, raw, hex or base64); see `cvdeploy security model-key`."),
    key_command: str | None = typer.Option(None, help="A command that prints the key (a KMS hook), instead of --key-file."),
    obfuscate: bool = typer.Option(False, help="Also rename every layer and tensor of the ONNX variants, strip doc strings and "
                                   "producer, add inert nodes (each checked to give the same outputs on the golden inputs)."),
    force: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
) -> None:
    """Encrypt every variant with AES-256-GCM; predict and serve decrypt it in memory with the same key."""
    from cvdeploy.bundle.bundle import Bundle
    from cvdeploy.security.protect import load_key, protect_bundle

    key = load_key(key_file, key_command)
    out = protect_bundle(bundle, output, key, obfuscate=obfuscate, force=force)
    console.print(f"protected bundle written to {out}; give the key to predict or serve with $CVDEPLOY_MODEL_KEY_FILE (or "
                  "$CVDEPLOY_MODEL_KEY / $CVDEPLOY_MODEL_KEY_COMMAND); it is unsigned: sign it with `cvdeploy sign` if it is to "
                  "be verified", highlight=False)
    if obfuscate:
        # Say which variants were obfuscated: OpenVINO IR is encrypted only, and a user should not believe otherwise.
        variants = Bundle.load(out, check_hashes=False).manifest.variants
        done = [n for n, v in variants.items() if (v.encryption or {}).get("obfuscated")]
        carried = [n for n in variants if n not in done]
        console.print(f"obfuscated: {', '.join(done) or 'none'} (same outputs on the golden inputs)"
                      + (f"; encrypted only: {', '.join(carried)} (OpenVINO IR is not obfuscated)" if carried else ""),
                      highlight=False, soft_wrap=True)


@security_app.command("model-key")
def model_key(
    path: Path = typer.Argument(..., help="Where to write a new random 256-bit key (mode 600)."),
    force: bool = typer.Option(False, help="Replace an existing key file."),
) -> None:
    """Create a random model key for `cvdeploy protect`."""
    from cvdeploy.security.protect import new_key_file

    console.print(f"model key written to {new_key_file(path, force)} (keep it out of the bundle and out of version control)")
