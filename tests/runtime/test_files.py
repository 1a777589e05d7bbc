"""runtime/files.py and runtime/interrupts.py: outputs appear whole or not at all, temporary and
backup names are ours alone, a user's look-alike files are never touched, and SIGINT/SIGTERM
unwind through the cleanups (torch-free, in-process)."""
import os
import signal

import pytest

from edgediff.runtime import interrupts
from edgediff.runtime.errors import InvalidInput, OutputExists
from edgediff.runtime.files import (CannotWrite, check_replaceable, claim_sibling, replace_dir, staged_dir,
                                    write_atomic, write_atomic_all)
from edgediff.runtime.images import check_writable

import fs_snapshot  # noqa: E402  (tests/)


def snapshot(root):
    return fs_snapshot.snapshot(root, relative=True)


def user_lookalikes(root, name):
    """A user's own files and directories named like our temporaries, backups and failures."""
    for d in (f".{name}.old", f".{name}.old-x", f"{name}.failed", f"{name}.failed-2", f".{name}.tmp-x",
              f".{name}.fp16-x"):
        (root / d).mkdir()
        (root / d / "mine.txt").write_text(d)
    (root / f".{name}.tmp").write_text("a file of the user's")
    (root / f".{name}.x.tmp").write_text("another")


def a_bundle(path, text="old"):
    path.mkdir()
    (path / "bundle.json").write_text("{}")
    (path / "model.onnx").write_text(text)


@pytest.fixture
def handlers():
    """Install the CLI's handlers for one test, and put pytest's back afterwards."""
    previous = interrupts.install()
    yield
    interrupts.restore(previous)


# --- never destroy what is not ours ---------------------------------------------------------

def test_replace_dir_leaves_lookalike_backups_alone(tmp_path):
    a_bundle(tmp_path / "b")
    user_lookalikes(tmp_path, "b")
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("b/") and k != "b"}
    with staged_dir(tmp_path / "b") as stage:
        (stage.path / "bundle.json").write_text("{}")
        (stage.path / "model.onnx").write_text("new")
        replace_dir(stage.path, tmp_path / "b", "bundle.json", "a bundle")
    after = snapshot(tmp_path)
    assert (tmp_path / "b" / "model.onnx").read_text() == "new"
    assert {k: v for k, v in after.items() if not k.startswith("b/") and k != "b"} == before


def test_failed_stage_gets_a_fresh_name_and_never_overwrites(tmp_path):
    user_lookalikes(tmp_path, "b")
    before = snapshot(tmp_path)
    with staged_dir(tmp_path / "b") as stage:
        (stage.path / "model.onnx").write_text("failed attempt")
        failed = stage.keep_failed()
    assert failed.name == "b.failed-3" and (failed / "model.onnx").read_text() == "failed attempt"
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("b.failed-3")} == before


def test_claim_sibling_is_exclusive(tmp_path):
    (tmp_path / "b.failed").write_text("a file, not a directory")
    first, second = claim_sibling(tmp_path / "b", ".failed"), claim_sibling(tmp_path / "b", ".failed")
    assert (first.name, second.name) == ("b.failed-2", "b.failed-3")
    assert (tmp_path / "b.failed").read_text() == "a file, not a directory"


def test_directories_made_for_a_failed_out_are_removed(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_dir(tmp_path / "new" / "sub" / "b"):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with staged_dir(tmp_path / "new" / "sub" / "b") as stage:
        (stage.path / "bundle.json").write_text("{}")
        replace_dir(stage.path, tmp_path / "new" / "sub" / "b", "bundle.json", "a bundle")
    assert (tmp_path / "new" / "sub" / "b" / "bundle.json").is_file()


def test_stage_is_removed_on_error_and_lookalikes_stay(tmp_path):
    user_lookalikes(tmp_path, "b")
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError):
        with staged_dir(tmp_path / "b") as stage:
            (stage.path / "partial.onnx").write_text("x")
            raise RuntimeError("boom")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["link to a bundle", "dangling link", "link to a file"])
def test_symlinked_out_is_refused_not_replaced(tmp_path, kind):
    target = tmp_path / "real"
    if kind == "link to a bundle":
        a_bundle(target)
    elif kind == "link to a file":
        target.write_text("x")
    (tmp_path / "out").symlink_to(target)
    before = snapshot(tmp_path)
    with pytest.raises(OutputExists, match="symbolic link"):
        check_replaceable(tmp_path / "out", "bundle.json", "a bundle")
    with staged_dir(tmp_path / "elsewhere") as stage:
        (stage.path / "bundle.json").write_text("{}")
        with pytest.raises(OutputExists, match="symbolic link"):
            replace_dir(stage.path, tmp_path / "out", "bundle.json", "a bundle")
    assert snapshot(tmp_path) == before


def test_stage_beside_a_linked_bundle_is_made_beside_its_target(tmp_path):
    (tmp_path / "store").mkdir()
    a_bundle(tmp_path / "store" / "real")
    (tmp_path / "link").symlink_to(tmp_path / "store" / "real")
    with staged_dir(tmp_path / "link", "fp16") as stage:
        assert stage.path.parent == tmp_path / "store" and stage.path.name.startswith(".real.fp16-")
        failed = stage.keep_failed(".fp16.failed")
    assert failed == tmp_path / "store" / "real.fp16.failed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "store"]


# --- files written together -----------------------------------------------------------------

def test_second_writer_failing_leaves_neither_file(tmp_path):
    (tmp_path / "a.png").write_text("previous grid")
    user_lookalikes(tmp_path, "a.png")
    before = snapshot(tmp_path)

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic_all({tmp_path / "a.png": lambda tmp: open(tmp, "w").write("new"), tmp_path / "b.npz": fail})
    assert snapshot(tmp_path) == before


def test_interrupt_while_writing_leaves_no_temporary(tmp_path):
    def interrupted(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "x.npz", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_both_files_appear_together(tmp_path):
    write_atomic_all({tmp_path / "a": lambda t: open(t, "w").write("1"),
                      tmp_path / "b": lambda t: open(t, "w").write("2")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "a").st_mode & 0o777 == 0o666 & ~mask     # not mkstemp's owner-only 0o600


CHECK_WRITABLE = [
    ("is a directory", lambda p: p.mkdir(), "not a regular file"),
    ("is a symbolic link", lambda p: p.symlink_to(p.parent / "elsewhere.png"), "symbolic link"),
    ("parent is a file", None, "is not a directory"),
]


@pytest.mark.parametrize("case, make, message", CHECK_WRITABLE, ids=[c[0] for c in CHECK_WRITABLE])
def test_check_writable_refuses_before_anything_is_written(tmp_path, case, make, message):
    path = tmp_path / "out.png"
    if make is None:
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "sub" / "out.png"
    else:
        make(path)
    before = snapshot(tmp_path)
    with pytest.raises(InvalidInput, match=message):
        check_writable(path)
    assert snapshot(tmp_path) == before


def test_check_writable_creates_nothing(tmp_path):
    check_writable(tmp_path / "new" / "dir" / "out.png")
    assert list(tmp_path.iterdir()) == []


# --- interrupts ------------------------------------------------------------------------------

@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_unwinds_through_the_stage_cleanup(tmp_path, handlers, signum, code):
    a_bundle(tmp_path / "b")
    before = snapshot(tmp_path)
    with pytest.raises(interrupts.Interrupted) as exc:
        with staged_dir(tmp_path / "b") as stage:
            (stage.path / "model.onnx").write_text("partial")
            signal.raise_signal(signum)
            pytest.fail("the signal did not interrupt")
    assert exc.value.exit_code == code and isinstance(exc.value, KeyboardInterrupt)
    assert snapshot(tmp_path) == before


def test_only_the_first_signal_interrupts(tmp_path, handlers):
    done = []
    with pytest.raises(interrupts.Interrupted):
        try:
            signal.raise_signal(signal.SIGTERM)
        finally:                               # the cleanup a second signal must not cut short
            signal.raise_signal(signal.SIGINT)
            done.append(True)
    assert done == [True]


def test_deferred_holds_a_signal_until_the_block_is_done(handlers):
    steps = []
    with pytest.raises(interrupts.Interrupted) as exc:
        with interrupts.deferred():
            steps.append("rename 1")
            signal.raise_signal(signal.SIGTERM)
            steps.append("rename 2")
    assert steps == ["rename 1", "rename 2"] and exc.value.exit_code == 143


def test_deferred_without_the_cli_handlers_delivers_keyboard_interrupt():
    steps, before = [], signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            signal.raise_signal(signal.SIGINT)
            steps.append("still running")
    assert steps == ["still running"]
    assert signal.getsignal(signal.SIGINT) is before


def test_swap_interrupted_midway_completes(tmp_path, handlers, monkeypatch):
    """A signal between the two renames of replace_dir is held: the new bundle is in place and
    no .b.old-* is left, instead of a missing bundle."""
    a_bundle(tmp_path / "b")
    real_rename = type(tmp_path).rename

    def rename(self, target):
        result = real_rename(self, target)
        if ".old-" in str(target):
            signal.raise_signal(signal.SIGTERM)
        return result

    monkeypatch.setattr(type(tmp_path), "rename", rename)
    with pytest.raises(interrupts.Interrupted):
        with staged_dir(tmp_path / "b") as stage:
            a_bundle(stage.path / "x", "new")
            replace_dir(stage.path / "x", tmp_path / "b", "bundle.json", "a bundle")
    assert (tmp_path / "b" / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_cannot_write_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CannotWrite, match="cannot write"):
        write_atomic(tmp_path / "f" / "x.png", lambda t: None)


def test_a_signal_while_the_stage_is_made_leaves_no_stage(tmp_path, monkeypatch):
    """The signal is held while the stage directory is made and delivered as that block ends:
    the cleanup must already be armed then (a CI run left such a stage behind)."""
    import signal

    from edgediff.runtime import files

    made = files.Stage.__init__

    def init_then_signal(self, out, tag):
        made(self, out, tag)
        signal.raise_signal(signal.SIGINT)          # held by deferred(), raised at its end

    monkeypatch.setattr(files.Stage, "__init__", init_then_signal)
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(tmp_path / "b"):
            pytest.fail("the body must not run")
    assert list(tmp_path.iterdir()) == []
