"""SIGINT and SIGTERM as exceptions, so that interrupted work cleans up after itself.

Python turns SIGINT into ``KeyboardInterrupt`` but lets SIGTERM kill the process at once,
skipping every ``finally``: a terminated export would leave its temporary directory behind.
:func:`install` (called by the CLI) makes both signals raise :class:`Interrupted`, a
``KeyboardInterrupt``, so the cleanups of :mod:`edgediff.runtime.files` (``staged_dir``,
``write_atomic``) run for either. Short sequences that must not be cut in half (the renames
that swap a finished directory into place) run under :func:`deferred`, which holds a signal
until they are done. A signal arriving inside a long native call (an ONNX Runtime run, a
TensorRT build) takes effect when that call returns: Python runs handlers between bytecodes.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"stopping": False}


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def _raise(signum, frame):
    # Only the first signal interrupts: later ones (a second ^C, a supervisor repeating
    # SIGTERM) must not cut short the cleanup that the first one started.
    if _state["stopping"]:
        return
    _state["stopping"] = True
    raise Interrupted(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> dict:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` in the main thread; return the
    handlers they replace (for :func:`restore`). A signal the parent set to be ignored
    (``nohup``, a background job of a script) stays ignored."""
    _state["stopping"] = False
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for signum in SIGNALS:
        if previous[signum] is not signal.SIG_IGN:
            signal.signal(signum, _raise)
    return previous


def restore(previous: dict) -> None:
    """Put back the handlers :func:`install` replaced (the CLI called in-process, by tests)."""
    _state["stopping"] = True             # until then, a late signal is not raised half-way here
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def exit_quietly_on_signal() -> None:
    """From here on a signal ends the process at once with 128 + signum, without a
    traceback: for interpreter shutdown, when the work is done or cleaned up but atexit
    hooks of other libraries (torch's among them) still run and would print one."""
    _state["stopping"] = True             # a signal before the swap below is simply dropped

    def _exit(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(128 + signum)

    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _exit)


@contextlib.contextmanager
def deferred():
    """Hold SIGINT and SIGTERM while the block runs, then deliver the first one held to the
    handler that was in place (which raises, or ends the process). For a few renames that
    must happen all or not at all. Outside the main thread (where Python cannot set signal
    handlers) the block simply runs."""
    if not _main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        if previous[s] is not signal.SIG_IGN:
            signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if held:
            signal.raise_signal(held[0])
