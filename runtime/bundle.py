"""The bundle format: a directory with ``bundle.json``, ONNX files, ``parity.json`` and
``engines/``. This module owns the format: the exporter writes manifests through it and the
runtime reads them through it (as a typed :class:`~edgediff.runtime.manifest.Manifest`).
NumPy and the standard library only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput
from .files import sha256_file, write_json_atomic
from .manifest import SCHEMA_VERSION, Manifest, ManifestError

MANIFEST = "bundle.json"

__all__ = ["MANIFEST", "SCHEMA_VERSION", "Bundle", "BundleError", "finalize_manifest", "io_spec", "read_bundle"]


class BundleError(InvalidInput):
    """A bundle that is missing, malformed or altered."""


def io_spec(spec_inputs: tuple[str, ...], outputs: tuple[str, ...], sample_shape,
            features: dict | None = None) -> tuple[dict, dict]:
    """Symbolic I/O declaration (docs/architecture.md contract): batch is the only dynamic axis.
    ``features`` declares extra inputs computed by a companion graph (ddm_cond's condition features)."""
    x = {"dtype": "float32", "shape": ["batch", *sample_shape]}
    known = {"x": x, "t": {"dtype": "float32", "shape": ["batch"]}, "y": {"dtype": "int64", "shape": ["batch"]},
             "x_self_cond": dict(x),      # self-conditioning: the previous step's x0 estimate
             **(features or {})}
    return {n: known[n] for n in spec_inputs}, {n: dict(x) for n in outputs}


def finalize_manifest(directory: str | Path, manifest: Manifest) -> Manifest:
    """Hash every file in the bundle into ``files`` and write bundle.json. The manifest itself
    and ``engines/`` are left out: engines come and go per GPU and carry their own sidecar."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
                       and p.relative_to(directory).parts[0] != "engines"):
        files[path.relative_to(directory).as_posix()] = sha256_file(path)
    manifest = manifest.replace(files=files, schema_version=SCHEMA_VERSION)
    write_json_atomic(directory / MANIFEST, manifest.to_dict())
    return manifest


@dataclass
class Bundle:
    """A validated bundle directory."""

    path: Path
    manifest: Manifest

    def model_path(self, precision: str = "fp32", component: str = "denoiser") -> Path:
        models = self.manifest.component(component).models
        if precision not in models:
            what = "model" if component == "denoiser" else component
            raise BundleError(f"bundle {self.path} has no {precision} {what} (has: {', '.join(models)})")
        return self.path / models[precision]

    @property
    def input_names(self) -> list[str]:
        return self.manifest.input_names

    @property
    def output_names(self) -> list[str]:
        return self.manifest.output_names


def read_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Load and validate ``bundle.json``; with ``verify`` check every recorded file's sha256
    and that every model file is among them."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path} is not a bundle: no {MANIFEST}")
    try:
        raw = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath} is not valid JSON: {exc}") from None
    try:
        manifest = Manifest.from_dict(raw, str(mpath))
    except ManifestError as exc:
        raise BundleError(str(exc)) from None
    if verify:
        _verify_files(path, manifest)
    return Bundle(path, manifest)


def _verify_files(path: Path, manifest: Manifest) -> None:
    unlisted = sorted(set(manifest.all_model_files) - set(manifest.files))
    if unlisted:
        raise BundleError(f"{path}: model file(s) not covered by the manifest's hashes: {', '.join(unlisted)}")
    for rel, digest in manifest.files.items():
        f = path / rel
        if not f.is_file():
            raise BundleError(f"bundle file missing: {f}")
        if sha256_file(f) != digest:
            raise BundleError(f"bundle file altered (sha256 mismatch): {f}")
