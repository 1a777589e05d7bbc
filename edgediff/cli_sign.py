"""``edgediff sign`` and ``edgediff verify``: thin commands over :mod:`edgediff.runtime.signing`
and :func:`edgediff.runtime.bundle.read_bundle`."""
from __future__ import annotations

import click

PEM = click.Path(exists=True, dir_okay=False)


@click.command("sign")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--key", "private_key", required=True, type=PEM,
              help="EC private key (PEM) to sign with; an encrypted one reads its password from $EDGEDIFF_KEY_PASSWORD.")
def sign(bundle, private_key):
    """Sign every file of a bundle (engines included) with OpenSSF model-signing; writes BUNDLE/bundle.sig."""
    from edgediff.runtime.signing import sign_bundle

    click.echo(f"signed {bundle}: wrote {sign_bundle(bundle, private_key)}")


@click.command("verify")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--public-key", type=PEM,
              help="EC public key (PEM): also require a valid signature over exactly the bundle's current files.")
def verify(bundle, public_key):
    """Check a bundle before use: manifest integrity, paths, every file's sha256, engines against
    their sidecars, and with --public-key the signature."""
    from edgediff.runtime.bundle import check_engines, read_bundle

    b = read_bundle(bundle, verify=True, public_key=public_key)
    engines = check_engines(bundle)
    signed = "signature valid" if public_key else "signature not checked (give --public-key)"
    built = f", {engines} engine(s) match their sidecars" if engines else ""
    click.echo(f"{bundle}: ok ({len(b.manifest.files)} files match bundle.json{built}; {signed})")


COMMANDS = (sign, verify)
