"""Ctrl-C in the `spp` process: a run ends either done (exit 0: its result published and printed) or interrupted
(exit 130: "spp: interrupted", nothing published), never both, and never with a traceback.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives. Two kinds of place
made that go wrong:
- after the outcome is decided: while the result is printed, while the command returns, in atexit handlers and
  in the interpreter's teardown (which resets SIGINT to its default, so a late Ctrl-C killed a finished run:
  exit 130 in the shell after a complete result, or "Exception ignored in atexit callback ... KeyboardInterrupt");
- inside a finalizer (a `__del__`, a weakref callback, such as torch's teardown of a model), where Python cannot
  raise it: it prints "Exception ignored in ..." with a traceback and the run carries on as if not interrupted.

`console_process()` wraps the console script's run (spp_cli/cli.py main) and fixes both: a KeyboardInterrupt that
lands in a finalizer is raised again in the main thread's own code (silently), and once `outcome_decided()` is
called SIGINT is ignored until the process has exited. The outcome is decided when the command's final output is
in place (each stage calls `output_published()` right after its final publish, so a Ctrl-C while it tidies up and
returns cannot turn a complete output into "interrupted"), and at the latest when the CLI prints the result or the
error. A stage that is one step of `spp run` publishes inside `more_to_come()`: a Ctrl-C after it still interrupts
the run (the next stage resumes from there). Called in-process (tests, notebooks) without `console_process()`,
neither changes anything.
"""

from __future__ import annotations

import _thread
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = {"console": False, "decided": False, "more_to_come": 0}
REDELIVERY_DELAY_S = 0.01  # after the finalizer and the hook have returned; one landing in a finalizer again repeats


@contextmanager
def console_process() -> Iterator[None]:
    """Around the whole run of the `spp` console script; SIGINT stays ignored after it (the process is exiting).

    Does nothing when SIGINT is not Python's default handler (ignored by whoever started spp, such as a shell's
    background job, or handled by a program that embeds it) or when not on the main thread."""
    if threading.current_thread() is not threading.main_thread() or (
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    previous_hook = sys.unraisablehook
    _state.update(console=True, decided=False)
    sys.unraisablehook = _redeliver_interrupts(previous_hook)
    try:
        yield
    finally:
        outcome_decided()
        sys.unraisablehook = previous_hook


def outcome_decided() -> None:
    """The run's outcome is fixed (its result is published and being printed, or its error or interrupt line is
    being written): from here to the exit a Ctrl-C can change nothing, so it is ignored (console script only)."""
    if _state["console"] and not _state["decided"]:
        _state["decided"] = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def output_published() -> None:
    """A stage's final output is in place (its atomic publish is done): the run is done whatever follows, unless
    the stage is one step of a longer run (inside `more_to_come()`)."""
    if not _state["more_to_come"]:
        outcome_decided()


@contextmanager
def more_to_come() -> Iterator[None]:
    """Around a stage that `spp run` runs before other work: its publish does not decide the run's outcome."""
    _state["more_to_come"] += 1
    try:
        yield
    finally:
        _state["more_to_come"] -= 1


def _redeliver_interrupts(previous_hook):
    """sys.unraisablehook that raises a KeyboardInterrupt swallowed by a finalizer again, in the main thread's
    own code (where the CLI turns it into exit 130), instead of printing it; other unraisables as before."""

    def hook(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            if not _state["decided"]:  # raised here, it would be swallowed again: raise it once the hook returned
                timer = threading.Timer(REDELIVERY_DELAY_S, _thread.interrupt_main)
                timer.daemon = True
                timer.start()
            return
        previous_hook(unraisable)

    return hook
