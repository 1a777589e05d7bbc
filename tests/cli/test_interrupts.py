"""SIGINT and SIGTERM against real `edgediff` processes: export, add-precision and generate end
with exit 130 / 143 and the one line "interrupted", no traceback, no temporary left, and the
destination (an existing bundle, previous outputs, a user's look-alike files) untouched."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fs_snapshot import snapshot  # (tests/)

SCRIPT = Path(sys.executable).parent / "edgediff"
SIGNALS = [pytest.param(signal.SIGTERM, 143, id="SIGTERM"), pytest.param(signal.SIGINT, 130, id="SIGINT")]


def command(*args):
    if SCRIPT.is_file():
        return [str(SCRIPT), *args]
    return [sys.executable, "-c", "from edgediff.entry import main; main()", *args]





def start(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command(*args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(pattern, proc, cwd, timeout=120.0):
    """Wait until the process has made a file matching ``pattern`` (its stage)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if [p for p in glob.glob(os.path.join(cwd, pattern)) if not p.endswith("-user")]:
            return
        if proc.poll() is not None:
            pytest.fail(f"finished before its stage appeared: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {pattern} within {timeout} s")


def stop(proc, signum):
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def assert_interrupted(code, expected, err):
    assert code == expected, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1] == "interrupted" and lines.count("interrupted") == 1, err


def lookalikes(root, name):
    """A user's files named like edgediff's temporaries, backups and failures."""
    for d in (f".{name}.old", f".{name}.tmp-user", f"{name}.failed", f".{name}.fp16-user"):
        (root / d).mkdir()
        (root / d / "mine.txt").write_text(d)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgediff.export.bundle import export_bundle
    from edgediff.export.models import FAMILIES

    out = tmp_path_factory.mktemp("bundle") / "uvit"
    export_bundle("uvit", FAMILIES["uvit"].configs["tiny"], out, log=lambda m: None)
    return out


def read_until(proc, text, timeout=120.0):
    """Read the process's stderr up to the line containing ``text``; return what was read."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            pytest.fail(f"ended before {text!r}: {''.join(seen)}")
        seen.append(line)
        if text in line:
            return "".join(seen)
    pytest.fail(f"no {text!r} within {timeout} s")


@pytest.mark.parametrize("phase", ["exporting", "validating"])
@pytest.mark.parametrize("signum, code", SIGNALS)
def test_export_interrupted_leaves_the_existing_bundle(bundle, tmp_path, signum, code, phase):
    shutil.copytree(bundle, tmp_path / "X")
    lookalikes(tmp_path, "X")
    before = snapshot(tmp_path)
    proc = start(["export", "--family", "uvit", "--size", "tiny", "--out", "X"], tmp_path)
    seen = read_until(proc, phase)            # printed inside the export's stage
    assert glob.glob(str(tmp_path / ".X.tmp-*" / ".X.tmp-*"))
    got, out, err = stop(proc, signum)
    assert_interrupted(got, code, seen + err)
    assert snapshot(tmp_path) == before


# add-precision, and export's FP16 step (export --precision fp16 is one change: the FP32
# bundle it made first is not installed either): the existing bundle X stays as it was.
FP16_STEPS = [(["add-precision", "X", "--precision", "fp16"], ".X.fp16-*"),
              (["export", "--family", "uvit", "--size", "tiny", "--out", "X", "--precision", "fp16"],
               ".X.tmp-*/.X.fp16-*")]


@pytest.mark.parametrize("args, stage", FP16_STEPS, ids=["add-precision", "export-fp16-step"])
@pytest.mark.parametrize("signum, code", SIGNALS)
def test_fp16_step_interrupted_leaves_the_existing_bundle(bundle, tmp_path, signum, code, args, stage):
    pytest.importorskip("modelopt")
    shutil.copytree(bundle, tmp_path / "X")
    lookalikes(tmp_path, "X")
    before = snapshot(tmp_path)
    proc = start(args, tmp_path)
    wait_for(stage, proc, tmp_path)
    got, out, err = stop(proc, signum)
    assert_interrupted(got, code, err)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("signum, code", SIGNALS)
def test_generate_interrupted_keeps_previous_outputs(bundle, tmp_path, signum, code):
    (tmp_path / "g.png").write_bytes(b"previous grid")
    (tmp_path / "s.npz").write_bytes(b"previous archive")
    (tmp_path / ".g.png.tmp").write_text("the user's")
    before = snapshot(tmp_path)
    proc = start(["generate", str(bundle), "-n", "20000", "--steps", "200", "--out", "g.png", "--npz", "s.npz"],
                 tmp_path)
    time.sleep(3.0)                           # past the imports and the bundle check, into sampling
    assert proc.poll() is None, proc.communicate()
    got, out, err = stop(proc, signum)
    assert_interrupted(got, code, err)
    assert "wrote" not in out
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_sigint_while_importing_is_one_line(tmp_path, delay):
    """Early: while the CLI's modules or torch are imported (Python's startup itself is over
    by then on any machine this suite runs on)."""
    proc = start(["export", "--family", "uvit", "--size", "tiny", "--out", "X"], tmp_path)
    time.sleep(delay)
    if proc.poll() is not None:
        pytest.skip("finished first")
    got, out, err = stop(proc, signal.SIGINT)
    assert_interrupted(got, 130, err)
    assert list(tmp_path.iterdir()) == []


def test_signal_during_interpreter_shutdown_is_quiet(tmp_path):
    """A ^C while other libraries' atexit hooks run (torch registers some) ends the process
    with 130 and no traceback."""
    code = ("import atexit, sys, time\n"
            "def slow():\n"
            "    print('shutting down', file=sys.stderr, flush=True)\n"
            "    time.sleep(60)\n"
            "atexit.register(slow)\n"
            "sys.argv = ['edgediff', 'families']\n"
            "from edgediff.cli import console\n"
            "console()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().strip() == "shutting down"
    got, out, err = stop(proc, signal.SIGINT)
    assert got == 130 and "Traceback" not in err and "Exception ignored" not in err, err
    assert "dit" in out                        # the command itself completed


def test_a_signal_while_a_c_extension_initialises_is_an_interrupt(monkeypatch, capsys):
    """onnxruntime turns an exception raised while its C module initialises (our SIGTERM)
    into ImportError("initialization failed"): still the one line and 143, no traceback."""
    from edgediff import cli as cli_mod
    from edgediff.runtime.interrupts import Interrupted

    def failing(*a, **k):
        try:
            raise Interrupted(signal.SIGTERM)
        except Interrupted as exc:
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(cli_mod.cli, "main", failing)
    assert cli_mod._run(["generate"]) == 143
    assert capsys.readouterr().err == "interrupted\n"
