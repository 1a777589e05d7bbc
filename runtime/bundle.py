"""The bundle format: a directory with ``bundle.json``, ONNX files, ``parity.json`` and
``engines/``. This module owns the format: the exporter writes manifests through it and the
runtime reads them through it. NumPy and the standard library only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
MANIFEST = "bundle.json"
_REQUIRED = ("schema_version", "family", "config", "inputs", "outputs", "prediction", "time",
             "schedule", "sample_shape", "models", "files")
DTYPES = {"float32", "float16", "int64", "int32"}


class BundleError(ValueError):
    """A bundle that is missing, malformed or altered."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: str | Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create owner-only entries; give outputs the usual umask permissions."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_atomic(path: str | Path, write) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which is then renamed into place:
    readers never see a partial file, and a failed write leaves nothing behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_replaceable(out: Path, marker: str, what: str) -> None:
    """Refuse an ``out`` that is not ours to replace: a file, or a non-empty directory without
    ``marker``, so that a mistyped path never deletes a user's directory. Called before long
    work starts and again just before the swap."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and not (out / marker).is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not {what}; choose another --out")


def replace_dir(tmp: Path, out: Path, marker: str, what: str) -> None:
    """Put the finished directory ``tmp`` at ``out`` with renames only, so readers never see a
    partial one; an existing ``out`` must pass :func:`check_replaceable`."""
    if not out.exists():
        tmp.rename(out)
        return
    check_replaceable(out, marker, what)
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | Path, data) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def io_spec(spec_inputs: tuple[str, ...], outputs: tuple[str, ...], sample_shape) -> tuple[dict, dict]:
    """Symbolic I/O declaration (DESIGN.md contract): batch is the only dynamic axis."""
    x = {"dtype": "float32", "shape": ["batch", *sample_shape]}
    known = {"x": x, "t": {"dtype": "float32", "shape": ["batch"]}, "y": {"dtype": "int64", "shape": ["batch"]}}
    return {n: known[n] for n in spec_inputs}, {n: dict(x) for n in outputs}


def finalize_manifest(directory: str | Path, manifest: dict) -> dict:
    """Hash every file in the bundle into ``files`` and write bundle.json. The manifest itself
    and ``engines/`` are left out: engines come and go per GPU and carry their own sidecar."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
                       and p.relative_to(directory).parts[0] != "engines"):
        files[path.relative_to(directory).as_posix()] = sha256_file(path)
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": files}
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


@dataclass
class Bundle:
    """A validated bundle directory."""

    path: Path
    manifest: dict

    def __getitem__(self, key):
        return self.manifest[key]

    def model_path(self, precision: str = "fp32") -> Path:
        models = self.manifest["models"]
        if precision not in models:
            raise BundleError(f"bundle {self.path} has no {precision} model (has: {', '.join(models)})")
        return self.path / models[precision]

    @property
    def input_names(self) -> list[str]:
        return list(self.manifest["inputs"])

    @property
    def output_names(self) -> list[str]:
        return list(self.manifest["outputs"])


def read_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Load and validate ``bundle.json``; with ``verify`` check every recorded file's sha256."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path} is not a bundle: no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{mpath} is not valid JSON: {exc}") from None
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{mpath} lacks required key(s): {', '.join(missing)}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise BundleError(f"{mpath} has schema version {manifest['schema_version']}; "
                          f"this edgediff reads version {SCHEMA_VERSION}")
    for name, io in {**manifest["inputs"], **manifest["outputs"]}.items():
        if io.get("dtype") not in DTYPES or not isinstance(io.get("shape"), list):
            raise BundleError(f"{mpath}: bad I/O declaration for {name!r}: {io}")
    if verify:
        _verify_files(path, manifest["files"])
    return Bundle(path, manifest)


def _verify_files(path: Path, files: dict[str, str]) -> None:
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file():
            raise BundleError(f"bundle file missing: {f}")
        if sha256_file(f) != digest:
            raise BundleError(f"bundle file altered (sha256 mismatch): {f}")
