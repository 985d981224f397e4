"""Stopping a running command cleanly on SIGTERM or SIGINT (Kubernetes preemption, Ctrl-C).

The CLI wraps the verbs that run flows in :func:`handling_signals`. A signal then

- during training (inside :func:`graceful_training`): asks the training to stop after the
  current step (the rerun resumes from the newest checkpoint) and gives it
  :data:`GRACE_SECONDS`; a second signal, or the end of the grace period, stops at once;
- anywhere else: raises :class:`Interrupted` at once, which fails the flow run (the MLflow run
  is marked FAILED on the way out).

Prefect replaces the SIGTERM handler while a flow runs (to mark the run crashed);
:func:`graceful_training` puts the stop request back in place for the length of the
training, and Prefect's own handler hands the signal back to :func:`handling_signals`'s
afterwards.
"""

from __future__ import annotations

import _thread
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)
GRACE_SECONDS = 15.0

_requested: list[int] = []  # the signals received, in order
_installed = False
_watchdog: threading.Timer | None = None


class Interrupted(KeyboardInterrupt):
    """The command was asked to stop by a signal (a KeyboardInterrupt, so that nothing on
    the way out mistakes it for an ordinary error and carries on)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def requested() -> int | None:
    """The first stop signal received, or None."""
    return _requested[0] if _requested else None


def stop_requested() -> bool:
    """Whether the running work should stop (the trainer's ``should_stop``)."""
    return bool(_requested)


def reset() -> None:
    cancel_watchdog()
    _requested.clear()


def cancel_watchdog() -> None:
    """The command is on its way out (cleaning up): the grace timer has done its job."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.cancel()
        _watchdog = None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _requested.append(signum)
    raise Interrupted(signum)


def _ask_to_stop(signum: int, frame: FrameType | None) -> None:
    global _watchdog
    first = not _requested
    _requested.append(signum)
    if not first:
        raise Interrupted(signum)
    # If the step does not end in time, deliver the signal again: this handler then raises.
    _watchdog = threading.Timer(GRACE_SECONDS, _thread.interrupt_main, args=(signum,))
    _watchdog.daemon = True
    _watchdog.start()


@contextmanager
def handling_signals() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT stop this process cleanly (see the module
    docstring); the previous handlers come back afterwards. Main thread only."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)
    _installed = True
    try:
        yield
    finally:
        _installed = False
        cancel_watchdog()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def graceful_training() -> Iterator[None]:
    """While the block trains, a stop signal asks the trainer to stop after its step."""
    if not _installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, _ask_to_stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
