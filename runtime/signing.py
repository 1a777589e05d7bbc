"""Signing bundles with the OpenSSF ``model-signing`` library: elliptic-curve keys, offline.

``sign_bundle`` hashes every file of the bundle (SHA-256 per file, ``bundle.json``, parity.json
and ``engines/`` included) except the signature ``bundle.sig`` itself and the ``parity/``
reports, which ``edgediff parity`` rewrites on every run (derived evidence, like a cache: a
check run after signing must not break the signature; they are not in ``files`` either)
into model-signing's in-toto statement and signs it with a PEM private key; the signature is
a Sigstore bundle (JSON) written to ``BUNDLE/bundle.sig``. ``verify_signature`` checks it with
the PEM public key and recomputes every hash: any file added, removed or changed since
signing fails, so engines built afterwards (``edgediff build``) need a re-sign, which the
message says. The verdict is the library's; when it refuses, the signed file list (the
statement's ``resources``) is compared with the disk only to say what changed.

Needs the ``sign`` extra (``pip install 'edgediff[sign]'``); nothing else in the runtime does.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from .bundle import MANIFEST, PARITY, SIGNATURE, BundleError, read_bundle
from .errors import MissingExtra
from .files import sha256_file, write_atomic

PASSWORD_ENV = "EDGEDIFF_KEY_PASSWORD"      # the private key's password, if the PEM is encrypted


class SignatureError(BundleError):
    """A bundle that is unsigned, signed by another key, or changed since it was signed."""


def _library():
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as exc:
        raise MissingExtra(f"signing needs model-signing, which is not installed or incomplete ({exc.name}): "
                           "pip install 'edgediff[sign]'") from None
    return hashing, signing, verifying


def _hashing(hashing):
    """Every file, SHA-256 each; symlinks refused; the signature itself and parity/ left out."""
    return (hashing.Config().use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
            .set_ignored_paths(paths=[SIGNATURE, PARITY], ignore_git_paths=False))


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def sign_bundle(path: str | Path, private_key: str | Path, password: str | None = None) -> Path:
    """Sign the bundle at ``path`` with the PEM EC ``private_key``; returns ``path/bundle.sig``.
    The bundle must verify first (its manifest hash and every file's sha256): a signature
    vouches for what edgediff wrote, never for an edited bundle."""
    path = Path(path)
    read_bundle(path, verify=True)
    hashing, signing, _ = _library()
    password = password if password is not None else os.environ.get(PASSWORD_ENV)
    try:
        config = signing.Config().use_elliptic_key_signer(private_key=Path(private_key), password=password)
    except Exception as exc:        # noqa: BLE001 -- cryptography's many ways to reject a key
        raise SignatureError(f"cannot use private key {private_key}: {_one_line(exc)} "
                             f"(an EC key in PEM; set {PASSWORD_ENV} if it is encrypted)") from None
    with tempfile.TemporaryDirectory() as tmp:      # outside the bundle: it is being hashed
        sig = Path(tmp) / SIGNATURE
        try:
            config.set_hashing_config(_hashing(hashing)).sign(path, sig)
        except ValueError as exc:   # a symlink or unreadable file in the bundle
            raise SignatureError(f"cannot sign {path}: {_one_line(exc)}") from None
        data = sig.read_bytes()
    write_atomic(path / SIGNATURE, lambda tmp: Path(tmp).write_bytes(data))
    return path / SIGNATURE


def verify_signature(path: str | Path, public_key: str | Path) -> None:
    """Raise :class:`SignatureError` unless ``path/bundle.sig`` is a valid signature by the
    key of the PEM ``public_key`` over exactly the bundle's current files."""
    path = Path(path)
    sig = path / SIGNATURE
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path} is not a bundle: no {MANIFEST}")
    if not sig.is_file():
        raise SignatureError(f"{path} is not signed (no {SIGNATURE}); sign it with: edgediff sign {path} --key KEY.pem")
    hashing, _, verifying = _library()
    try:
        config = verifying.Config().use_elliptic_key_verifier(public_key=Path(public_key))
    except Exception as exc:        # noqa: BLE001 -- not a PEM, not an EC key, unsupported curve
        raise SignatureError(f"cannot use public key {public_key}: {_one_line(exc)} (an EC public key in PEM)") from None
    try:
        with contextlib.redirect_stdout(sys.stderr):       # the library prints its warnings
            config.set_hashing_config(_hashing(hashing)).verify(path, sig)
    except Exception as exc:        # noqa: BLE001 -- any failure means "not verified"; fail closed
        raise SignatureError(_explain(path, sig, public_key, exc)) from None


def _signed_files(sig: Path) -> dict[str, str] | None:
    """name -> sha256 from the signature's statement (unauthenticated: for messages only)."""
    try:
        envelope = json.loads(sig.read_text())["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"]))
        return {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _current_files(path: Path) -> dict[str, str]:
    rel = lambda p: p.relative_to(path).as_posix()       # noqa: E731
    return {rel(p): sha256_file(p) for p in sorted(path.rglob("*"))
            if p.is_file() and rel(p) != SIGNATURE and rel(p).split("/")[0] != PARITY}


def _explain(path: Path, sig: Path, public_key, exc: Exception) -> str:
    signed = _signed_files(sig)
    try:
        now = _current_files(path)
    except OSError:
        now = None
    if signed is None or now is None or signed == now:
        return f"{path}: its signature does not verify with {public_key} ({_one_line(exc, 200)})"
    added = sorted(set(now) - set(signed))
    missing = sorted(set(signed) - set(now))
    changed = sorted(n for n in set(now) & set(signed) if now[n] != signed[n])
    parts = [f"{what} {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
             for what, names in (("added", added), ("changed", changed), ("missing", missing)) if names]
    engines_only = all(n.startswith("engines/") for n in added + changed + missing)
    why = ("engines built after signing are not covered: " if engines_only
           else "if these changes are yours, ")
    return f"{path} changed since it was signed ({'; '.join(parts)}); {why}re-sign it with: edgediff sign {path} --key KEY.pem"
