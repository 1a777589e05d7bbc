"""Writing outputs safely: files and directories appear whole or not at all.

Files are written to a temporary sibling and renamed into place (:func:`write_atomic`).
Directories are built in a temporary sibling by :func:`staged_dir` and swapped in with
renames; a failed build is removed, or kept under a fresh ``NAME.failed`` name for
inspection. Nothing here deletes a path it did not create, except an ``out`` that carries
the caller's marker file (a bundle's ``bundle.json``, a training run's ``train.json``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import InvalidInput, OutputExists


class CannotWrite(InvalidInput, OSError):
    """An output location that cannot be written."""


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
    if path.is_symlink() or (path.exists() and not path.is_file()):
        # a rename would replace the link or device node itself rather than write through it
        raise CannotWrite(f"{path} exists and is not a regular file; choose another output path")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:          # missing or read-only directory: the user's path, not a bug
        raise CannotWrite(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        write(tmp)
        public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def check_replaceable(out: Path, marker: str, what: str) -> None:
    """Refuse an ``out`` that is not ours to replace: a file, or a non-empty directory without
    ``marker``, so that a mistyped path never deletes a user's directory. Called before long
    work starts and again just before the swap."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{out} exists and is not a directory")
    if out.is_dir() and not (out / marker).is_file() and any(out.iterdir()):
        raise OutputExists(f"{out} exists and is not {what}; choose another --out")


def _fresh_sibling(path: Path, suffix: str) -> Path:
    """``path`` + suffix, or + suffix-2, -3, ... : a name nobody uses, never overwritten."""
    candidate, k = path.with_name(path.name + suffix), 2
    while candidate.exists() or candidate.is_symlink():
        candidate, k = path.with_name(f"{path.name}{suffix}-{k}"), k + 1
    return candidate


def replace_dir(tmp: Path, out: Path, marker: str, what: str) -> None:
    """Put the finished directory ``tmp`` at ``out`` with renames only, so readers never see a
    partial one; an existing ``out`` must pass :func:`check_replaceable`."""
    if not out.exists():
        tmp.rename(out)
        return
    check_replaceable(out, marker, what)
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    old.rmdir()                           # a unique name of ours, so no user's file is touched
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


class Stage:
    """A temporary directory beside ``out`` (see :func:`staged_dir`)."""

    def __init__(self, out: Path, tag: str):
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{tag}-"))
        public_mode(self.path, directory=True)

    def keep_failed(self, suffix: str = ".failed") -> Path:
        """Keep the stage for inspection under a fresh ``OUT.failed`` name; return it."""
        failed = _fresh_sibling(self.out, suffix)
        self.path.rename(failed)
        return failed


@contextlib.contextmanager
def staged_dir(out: str | Path, tag: str = "tmp"):
    """Yield a :class:`Stage` beside ``out``; whatever is left of it afterwards (not moved
    into place, not kept as failed) is removed, also on errors and interrupts."""
    stage = Stage(Path(out), tag)
    try:
        yield stage
    finally:
        shutil.rmtree(stage.path, ignore_errors=True)
