"""The bundle format: a directory with ``bundle.json``, ONNX files, ``parity.json`` and
``engines/``. This module owns the format: the exporter writes manifests through it and the
runtime reads them through it (as a typed :class:`~edgediff.runtime.manifest.Manifest`).
NumPy and the standard library only.

Integrity (docs/architecture.md §4.2): ``files`` maps every file of the bundle (but
``bundle.json``, ``bundle.sig`` and ``engines/``) to its sha256, and ``bundle.json`` records
its own canonical hash under ``integrity`` (sorted keys, compact, ASCII; the record itself
left out). :func:`read_bundle` refuses, before anything runs, a manifest that was edited,
a path that leaves the bundle (symlinks resolved), a model, external-data file or tokenizer
file that ``files`` does not cover, and a file whose bytes changed. The hash catches careless
edits and swapped files; against a deliberate forger, who can recompute it, the bundle is
signed (:mod:`.signing`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput
from .files import sha256_file, write_json_atomic
from .manifest import INTEGRITY, SCHEMA_VERSION, Manifest, ManifestError

MANIFEST = "bundle.json"
SIGNATURE = "bundle.sig"            # written by `edgediff sign` (runtime/signing.py)
ENGINES = "engines"                 # TensorRT engines: built per GPU, each with a sidecar
MAX_MANIFEST_BYTES = 16 << 20
RETRIES = 3                         # re-reads when a writer changed the bundle under the reader
RACE_GRACE_S = 0.02                 # a writer's renames + manifest write take far less
PARITY = "parity"                   # `edgediff parity` reports: derived, rewritten at every run

__all__ = ["MANIFEST", "SCHEMA_VERSION", "SIGNATURE", "Bundle", "BundleAltered", "BundleError", "check_engines",
           "finalize_manifest", "hash_bundle_files", "io_spec", "manifest_digest", "read_bundle", "write_manifest"]


class BundleError(InvalidInput):
    """A bundle that is missing, malformed or altered."""


class BundleAltered(BundleError):
    """A file (bundle.json included) whose bytes are not those recorded, or missing: an edit,
    a swap, or a writer that was still at work while we read."""


def io_spec(spec_inputs: tuple[str, ...], outputs: tuple[str, ...], sample_shape,
            features: dict | None = None) -> tuple[dict, dict]:
    """Symbolic I/O declaration (docs/architecture.md contract): batch is the only dynamic axis.
    ``features`` declares extra inputs computed by a companion graph (ddm_cond's condition features)."""
    x = {"dtype": "float32", "shape": ["batch", *sample_shape]}
    known = {"x": x, "t": {"dtype": "float32", "shape": ["batch"]}, "y": {"dtype": "int64", "shape": ["batch"]},
             "x_self_cond": dict(x),      # self-conditioning: the previous step's x0 estimate
             **(features or {})}
    return {n: known[n] for n in spec_inputs}, {n: dict(x) for n in outputs}


# --- writing -------------------------------------------------------------------------------
def manifest_digest(raw: dict) -> str:
    """sha256 of the manifest's canonical JSON, the ``integrity`` record left out: the same for
    any formatting of the same content, different for any change of a value."""
    body = {k: v for k, v in raw.items() if k != INTEGRITY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _unhashed(rel: Path) -> bool:
    return rel.as_posix() in (MANIFEST, SIGNATURE) or rel.parts[0] in (ENGINES, PARITY)


def hash_bundle_files(directory: str | Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``directory`` that ``files`` covers."""
    directory = Path(directory)
    return {path.relative_to(directory).as_posix(): sha256_file(path)
            for path in sorted(directory.rglob("*"))
            if path.is_file() and not _unhashed(path.relative_to(directory))}


def write_manifest(directory: str | Path, manifest: Manifest) -> dict:
    """Write ``manifest`` as bundle.json (atomically) with its integrity record; ``files`` must
    already be right (:func:`finalize_manifest` hashes them). Returns the dict written."""
    raw = json.loads(json.dumps(manifest.replace(schema_version=SCHEMA_VERSION).to_dict()))   # JSON's view
    raw[INTEGRITY] = {"manifest_sha256": manifest_digest(raw)}
    write_json_atomic(Path(directory) / MANIFEST, raw)
    return raw


def finalize_manifest(directory: str | Path, manifest: Manifest, files: dict[str, str] | None = None) -> Manifest:
    """Hash every file in the bundle into ``files`` (or take ``files``, hashed by the caller
    before it moved them in) and write bundle.json with its integrity record. The manifest,
    the signature, ``engines/`` and ``parity/`` are left out: engines come and go per GPU and
    carry their own sidecar (a signature covers them, see runtime/signing.py); ``parity/``
    holds the reports `edgediff parity` writes about a sealed bundle, rewritten at every run."""
    files = hash_bundle_files(directory) if files is None else dict(sorted(files.items()))
    manifest = manifest.replace(files=files, schema_version=SCHEMA_VERSION)
    write_manifest(directory, manifest)
    return manifest


# --- reading -------------------------------------------------------------------------------
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


def read_bundle(path: str | Path, verify: bool = True, public_key: str | Path | None = None) -> Bundle:
    """Load and validate ``bundle.json``. With ``verify`` (the default) also check its
    integrity record and every recorded file's sha256, and that every model, external-data
    and tokenizer file is among them; with ``public_key`` (a PEM file) first check the
    bundle's signature (:mod:`.signing`). Raises :class:`BundleError`, one line.

    A writer (export over the bundle, add-precision ...) may change the bundle while it is
    read: a mismatch seen while the directory or its bundle.json changed is not reported as
    an alteration; the read starts again (a few times, then says the bundle keeps changing)."""
    path = Path(path)
    if public_key is not None:
        from .signing import verify_signature

        verify_signature(path, public_key)
    for _ in range(RETRIES):
        before = _snapshot(path)
        try:
            return _read(path, verify)
        except BundleAltered:
            if not verify or not _changed(path, before):
                raise
    raise BundleError(f"{path} kept changing while it was read (an export or add-* command writing it?); "
                      "try again when it has finished")


def _snapshot(path: Path):
    """What a writer changes: the directory (export swaps it) and bundle.json (rewritten by
    atomic rename: a new inode each time)."""
    try:
        d, m = os.stat(path), os.stat(path / MANIFEST)
    except OSError:
        return None
    return d.st_dev, d.st_ino, m.st_ino, m.st_mtime_ns, m.st_size


def _changed(path: Path, before) -> bool:
    if _snapshot(path) != before:
        return True
    time.sleep(RACE_GRACE_S)        # the writer may be between moving its files and writing bundle.json
    return _snapshot(path) != before


def _read(path: Path, verify: bool) -> Bundle:
    mpath = path / MANIFEST
    raw = _load_json(path, mpath)
    try:
        manifest = Manifest.from_dict(raw, str(mpath))
    except ManifestError as exc:
        raise BundleError(str(exc)) from None
    record = _integrity_record(raw, mpath)
    _check_containment(path, manifest)
    if verify:
        _check_coverage(path, manifest)
        _check_integrity(raw, record, manifest, mpath)
        _verify_files(path, manifest)
    return Bundle(path, manifest)


def _load_json(path: Path, mpath: Path):
    try:
        if not mpath.is_file():
            raise BundleError(f"{path} is not a bundle: no {MANIFEST}")
        size = mpath.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{mpath} is {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES} bytes")
        data = mpath.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {mpath}: {exc.strerror or exc}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{mpath} is not UTF-8 text (bad byte at offset {exc.start})") from None
    except RecursionError:
        raise BundleError(f"{mpath} is nested too deeply to be a manifest") from None
    except ValueError as exc:       # JSONDecodeError, and integers too long to convert
        raise BundleError(f"{mpath} is not valid JSON: {' '.join(str(exc).split())[:200]}") from None


def _integrity_record(raw: dict, mpath: Path) -> str | None:
    record = raw.get(INTEGRITY)
    if record is None:
        return None
    digest = record.get("manifest_sha256") if isinstance(record, dict) else None
    if not isinstance(digest, str) or len(record) != 1 or len(digest) != 64:
        raise BundleError(f"{mpath}: {INTEGRITY} must be {{\"manifest_sha256\": <sha256 hex>}}")
    return digest


def _check_integrity(raw: dict, record: str | None, manifest: Manifest, mpath: Path) -> None:
    if record is None:
        if manifest.schema_version < 3:
            raise BundleError(f"{mpath} was written by an older edgediff (schema {manifest.schema_version}) "
                              "without a manifest hash, so edits to it cannot be detected; re-export the bundle")
        raise BundleAltered(f"{mpath} has no {INTEGRITY} record: it was edited or written by hand; re-export the bundle")
    try:
        actual = manifest_digest(raw)
    except (RecursionError, ValueError) as exc:
        raise BundleError(f"{mpath} cannot be hashed: {exc}") from None
    if actual != record:
        raise BundleAltered(f"{mpath} was altered after it was written (its canonical sha256 differs from its "
                            f"{INTEGRITY} record); re-export the bundle or re-run the command that wrote it")


def _inside(root: Path, rel: str) -> bool:
    try:
        (root / rel).resolve().relative_to(root)
        return True
    except ValueError:
        return False


def _check_containment(path: Path, manifest: Manifest) -> None:
    """Every named path stays inside the bundle once symlinks are resolved (the manifest
    checked the syntax: relative, normalised)."""
    try:
        root = path.resolve()
        named = [*manifest.all_model_files, *manifest.files, *manifest.referenced_dirs]
        outside = [rel for rel in named if not _inside(root, rel)]
    except (OSError, RuntimeError) as exc:      # symlink loops, names too long for the file system
        raise BundleError(f"{path}: cannot resolve a path of the manifest: {exc}") from None
    if outside:
        raise BundleError(f"{path}: path(s) leave the bundle through a symlink: {', '.join(sorted(outside)[:5])}")


def _check_coverage(path: Path, manifest: Manifest) -> None:
    """Everything the runtime opens is hashed: models, their external data, tokenizer files."""
    files = manifest.files
    wanted = list(manifest.all_model_files)
    try:
        wanted += [rel + ".data" for rel in manifest.all_model_files if (path / (rel + ".data")).exists()]
        for d in manifest.referenced_dirs:
            if not (path / d).is_dir() or not any(f.startswith(d + "/") for f in files):
                raise BundleAltered(f"{path}: tokenizer directory {d} is missing or not covered by the manifest's hashes")
            wanted += [p.relative_to(path).as_posix() for p in (path / d).rglob("*") if p.is_file()]
    except OSError as exc:
        raise BundleError(f"{path}: cannot list the bundle's files: {exc.strerror or exc}") from None
    unlisted = sorted(set(wanted) - set(files))
    if unlisted:
        raise BundleAltered(f"{path}: file(s) not covered by the manifest's hashes: {', '.join(unlisted[:5])}")


def _verify_files(path: Path, manifest: Manifest) -> None:
    for rel, digest in manifest.files.items():
        f = path / rel
        try:
            if not f.is_file():
                raise BundleAltered(f"bundle file missing: {f}")
            if sha256_file(f) != digest:
                raise BundleAltered(f"bundle file altered (sha256 mismatch): {f}")
        except OSError as exc:
            raise BundleError(f"cannot read bundle file {f}: {exc.strerror or exc}") from None


def check_engines(path: str | Path) -> int:
    """Every TensorRT engine under ``engines/`` has a sidecar and the bytes it records (what
    the TensorRT backend checks again before it loads one); returns how many. Engines are not
    in ``files``: they are built per GPU after export, each vouched for by its sidecar."""
    from .engines import PRECISIONS, EngineError, engine_candidates, read_sidecar

    engines = sorted({p for precision in PRECISIONS for p in engine_candidates(path, precision)})
    for engine in engines:
        try:
            recorded = read_sidecar(engine).get("engine_sha256")
            actual = sha256_file(engine)
        except (EngineError, OSError, ValueError, AttributeError) as exc:   # no/garbled sidecar
            raise BundleAltered(f"{engine}: {' '.join(str(exc).split()) or 'unreadable sidecar'}") from None
        if actual != recorded:
            raise BundleAltered(f"{engine} does not match its sidecar's sha256 (partial copy or altered); rebuild it")
    return len(engines)
