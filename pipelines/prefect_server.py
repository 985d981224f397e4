"""Prefect's temporary local server, started once per command with time to spare.

With no ``PREFECT_API_URL``, Prefect 3 starts a temporary API server (a uvicorn subprocess)
the first time a flow runs, and waits ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
(Prefect's default: 20 s) for it. On a busy 2-core machine that is not always enough. The CLI
starts it itself before the first flow, with a generous timeout (``pipelines/__init__.py``
sets the default, a user's own setting wins) and one retry; every flow of the command (each
period of ``cssl demo``) then uses the same server. Prefect stops it when the process exits,
after its log and event workers have sent what they hold (stopping it earlier would leave them
retrying against a closed port for a minute).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

ATTEMPTS = 2
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class _NoRunLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(RUN_LOGGERS)


_NO_RUN_LINES = _NoRunLines()


@contextmanager
def quiet_console() -> Iterator[None]:
    """Keep flow- and task-run lines (states, and failures with their tracebacks) off the
    console while the block runs; they still go to Prefect's API, where the UI shows them.
    The command prints progress, decisions and a one-line error instead."""
    import prefect.main  # noqa: F401 - configures Prefect's logging (as `from prefect import flow`)
    from prefect.logging.handlers import PrefectConsoleHandler

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    for handler in handlers:
        handler.addFilter(_NO_RUN_LINES)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(_NO_RUN_LINES)


class PrefectServerUnavailable(RuntimeError):
    """The temporary Prefect server did not start (one-line message with what to set)."""


@dataclass
class LocalServer:
    """The temporary server this command started (None of it when an API URL is set)."""

    server: Any = None  # prefect.server.api.server.SubprocessASGIServer

    @property
    def api_url(self) -> str | None:
        return str(self.server.api_url) if self.server is not None else None

    @property
    def pid(self) -> int | None:
        process = self.server.server_process if self.server is not None else None
        return int(process.pid) if process is not None else None

    def stop(self) -> None:
        if self.server is not None:
            drain_prefect_clients()
            self.server.stop()
            self.server = None


def drain_prefect_clients(timeout: float = 10.0) -> None:
    """Send what Prefect's event and log workers still hold while the server is up: drained
    after it stops, they retry against a closed port at exit (a minute of warnings, and a
    stopped command that does not end). Best effort: the command's own outcome is decided."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception:  # noqa: BLE001 - a failed flush must not replace the command's result
            continue


def startup_timeout() -> int:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    return int(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())


def start_local_server(
    attempts: int = ATTEMPTS, on_start: Callable[[int, int], None] | None = None
) -> LocalServer:
    """Start the temporary server unless ``PREFECT_API_URL`` points at one; retry once.
    ``on_start`` hears the try (from 1) and its timeout before each try (a progress line)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return LocalServer()
    timeout = startup_timeout()
    for attempt in range(1, attempts + 1):
        if on_start is not None:
            on_start(attempt, timeout)
        server = SubprocessASGIServer()
        try:
            server.start(timeout=timeout)
        except RuntimeError:
            server.stop()  # ends the process that did not answer; the next try starts anew
            continue
        return LocalServer(server)
    raise PrefectServerUnavailable(
        f"the temporary Prefect server did not answer within {timeout} s ({attempts} tries; "
        "the machine may be busy): set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=600, "
        "or run `prefect server start` elsewhere and set "
        "PREFECT_API_URL=http://127.0.0.1:4200/api"
    )
