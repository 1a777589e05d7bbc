"""Writing outputs safely: files and directories appear whole or not at all.

Files are written to a temporary sibling and renamed into place (:func:`write_atomic`).
Several files that belong together (a PNG grid and its .npz) are all written to temporary
siblings first and renamed only when every one succeeded (:func:`write_atomic_all`).
Directories are built in a temporary sibling by :func:`staged_dir` and swapped in with
renames; a failed build is removed, or kept under a fresh ``NAME.failed`` name for
inspection. Every temporary or backup name is made unique by this process
(``.NAME.tmp-XXXX``, ``.NAME.old-XXXX``, ``NAME.failed``/``NAME.failed-N`` claimed with an
exclusive ``mkdir``), so a user's file of a similar name is never touched. Nothing here
deletes a path it did not create, except an ``out`` that carries the caller's marker file (a
bundle's ``bundle.json``, a training run's ``train.json``). An ``out`` that is a symbolic
link is refused rather than replaced by a directory. The renames that swap a result into
place run under :func:`~edgediff.runtime.interrupts.deferred`, so SIGINT/SIGTERM never cut
them in half.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import EdgediffError, InvalidInput, OutputExists
from .interrupts import deferred


class CannotWrite(InvalidInput, OSError):
    """An output location that cannot be written."""


def read_json(path: str | Path):
    """The JSON value in the file at ``path``; one-line InvalidInput when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"cannot read {path} as JSON: {exc}") from None


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


def check_regular_target(path: str | Path) -> Path:
    """``path`` may be written by rename only if it is absent or a regular file: renaming over
    a symbolic link would replace the link (not write through it), over a directory fails."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        kind = "a symbolic link" if path.is_symlink() else "not a regular file"
        raise CannotWrite(f"{path} exists and is {kind}; choose another output path")
    return path


def _temp_beside(path: Path) -> Path:
    """A new, empty temporary file of ours beside ``path`` (same filesystem, so it renames)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:          # missing or read-only directory: the user's path, not a bug
        raise CannotWrite(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    return Path(tmp)


def write_atomic(path: str | Path, write) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which is then renamed into place:
    readers never see a partial file, and a failed or interrupted write leaves nothing behind."""
    write_atomic_all({path: write})


def write_atomic_all(writers: dict) -> None:
    """Write several files as one: ``{path: write}``, each ``write(tmp)`` filling a temporary
    sibling of its path; only when all succeeded are they renamed into place (together, under
    :func:`deferred`), so a failure in the last leaves none of them, and no temporary file."""
    paths = [check_regular_target(p) for p in writers]
    temps: list[Path] = []
    try:
        for path, write in zip(paths, writers.values()):
            with deferred():                  # the name is recorded before a signal can strike
                temps.append(_temp_beside(path))
            write(temps[-1])
            public_mode(temps[-1])
        with deferred():
            for tmp, path in zip(temps, paths):
                os.replace(tmp, path)
            temps.clear()
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, data) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def check_replaceable(out: Path, marker: str, what: str) -> None:
    """Refuse an ``out`` that is not ours to replace: a file, a symbolic link (replacing it
    would put a directory where the link was, and following it would write elsewhere than
    asked), or a non-empty directory without ``marker``, so that a mistyped path never
    deletes a user's directory. Called before long work starts and again just before the swap."""
    given, out = out, Path(os.path.abspath(out))
    if os.path.realpath(out) in (os.getcwd(), *map(str, Path(os.getcwd()).parents)):
        raise OutputExists(f"{out} is the current directory or one above it; choose another --out")
    if out.is_symlink():
        raise OutputExists(f"{given} is a symbolic link; give the directory it points to "
                           f"({os.path.realpath(out)}) or another --out")
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{given} exists and is not a directory")
    if out.is_dir() and not (out / marker).is_file() and any(out.iterdir()):
        raise OutputExists(f"{given} exists and is not {what}; choose another --out")


def claim_sibling(path: Path, suffix: str) -> Path:
    """Create and return an empty directory ``path`` + suffix, or + suffix-2, -3, ...: the
    first name nobody uses. ``mkdir`` is exclusive, so the name is ours even against a
    concurrent process, and a directory renamed onto it (which replaces only an empty one)
    can never overwrite anything of a user's."""
    k = 1
    while True:
        candidate = path.with_name(path.name + suffix + ("" if k == 1 else f"-{k}"))
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            k += 1


def replace_dir(tmp: Path, out: Path, marker: str, what: str) -> None:
    """Put the finished directory ``tmp`` at ``out`` with renames only, so readers never see a
    partial one; an existing ``out`` must pass :func:`check_replaceable`. The old ``out`` goes
    to a fresh ``.OUT.old-XXXX`` of ours before it is deleted, and the swap is not interrupted."""
    out = Path(os.path.abspath(out))
    check_replaceable(out, marker, what)
    with deferred():
        if not out.exists():
            tmp.rename(out)
            return
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        out.rename(old)                   # onto our own empty directory: nothing else is replaced
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)


class Stage:
    """A temporary directory beside ``out`` (see :func:`staged_dir`). For an ``out`` that is a
    symbolic link (an existing bundle being added to through a link) the stage is made beside
    the directory it points to, on the same filesystem, so the files can be renamed into it."""

    def __init__(self, out: Path, tag: str):
        # absolute, so that "." (a bundle named from inside it) has a name and a parent
        self.out = Path(os.path.realpath(out) if out.is_symlink() else os.path.abspath(out))
        self.made = [d for d in reversed(self.out.parents) if not d.exists()]   # top first
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.{tag}-"))
        public_mode(self.path, directory=True)

    def keep_failed(self, suffix: str = ".failed") -> Path:
        """Keep the stage for inspection under a fresh ``OUT.failed`` name; return it."""
        with deferred():
            failed = claim_sibling(self.out, suffix)
            os.replace(self.path, failed)
        return failed


@contextlib.contextmanager
def staged_dir(out: str | Path, tag: str = "tmp"):
    """Yield a :class:`Stage` beside ``out``; whatever is left of it afterwards (not moved
    into place, not kept as failed) is removed, also on errors, SIGINT and SIGTERM (see
    :mod:`edgediff.runtime.interrupts`)."""
    stage = None
    try:
        # no stage exists that the cleanup below does not know of; a signal held while it is
        # made is delivered as the block ends, already inside this try (CI caught a stage left
        # behind when the creation stood before it)
        with deferred():
            stage = Stage(Path(out), tag)
        yield stage
    finally:
        if stage is not None:
            with deferred():
                shutil.rmtree(stage.path, ignore_errors=True)
                for d in reversed(stage.made):    # directories made for ``out``, if nothing went in
                    with contextlib.suppress(OSError):
                        d.rmdir()


@contextlib.contextmanager
def built_whole(out: str | Path, marker: str, what: str):
    """Yield a private path ``work`` (inside a stage beside ``out``) to build a directory at in
    several steps (export, then FP16, then an autoencoder ...); only when the whole block
    succeeds does ``work`` replace ``out``. So an interrupt or a failing later step leaves
    ``out`` as it was. What a failed step kept for inspection beside ``work`` (``NAME.failed``,
    ``NAME.fp16.failed`` ...) is moved beside ``out`` under fresh names, and the error's
    message is changed to say where."""
    out = Path(os.path.abspath(out))
    check_replaceable(out, marker, what)
    with staged_dir(out) as stage:
        work = stage.path / out.name
        try:
            yield work
        except EdgediffError as exc:
            _move_kept(exc, stage.path, work, out)
            raise
        replace_dir(work, out, marker, what)


def _move_kept(exc: Exception, stage: Path, work: Path, out: Path) -> None:
    with deferred():
        for kept in sorted(stage.iterdir()):
            if kept == work or not kept.name.startswith(out.name):
                continue
            dest = claim_sibling(out, kept.name[len(out.name):])
            os.replace(kept, dest)
            exc.args = tuple(a.replace(str(kept), str(dest)) if isinstance(a, str) else a for a in exc.args)
    # the private bundle is about to vanish: name the user's OUT instead
    exc.args = tuple(a.replace(str(work), str(out)) if isinstance(a, str) else a for a in exc.args)
