"""Fault injectors for the fault-injection suite: real sockets and real server processes.

- :class:`FaultProxy`: a TCP proxy in front of an HTTP server (the moto S3 server) that can be
  switched, while clients talk through it, between forwarding (``up``), dropping every
  connection (``drop``: accepted, then closed with nothing sent) and answering every request
  with ``503 Service Unavailable`` (``503``). Leaving ``up`` cuts the live connections too, so
  a client's pooled keep-alive connection sees the outage at once.
- :class:`MlflowProcess`: an ``mlflow server`` process on a fixed port with a SQLite backend
  and artifacts proxied to S3 (through a :class:`FaultProxy`), that a test can kill -9 and
  start again on the same port with the same state.
- :func:`tiny_cli_args`, :func:`cli_env`: run ``cssl`` as a separate process on the tiny
  settings of ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # conftest and s3_server live one level up
    sys.path.insert(0, str(TESTS))

from conftest import BIN, REPO, stop_process, tiny_override_list, wait_for_http  # noqa: E402
from s3_server import aws_test_environment, free_port  # noqa: E402

MODES = ("up", "drop", "503")
_503_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
    b"<Message>injected outage</Message></Error>"
)


class FaultProxy:
    """A switchable TCP proxy to ``upstream`` (``http://host:port``) on 127.0.0.1."""

    def __init__(self, upstream: str) -> None:
        url = urlparse(upstream)
        self.upstream = (url.hostname or "127.0.0.1", int(url.port or 80))
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._mode = "up"
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._closed = False
        self.forwarded = 0  # connections forwarded upstream
        self.refused = 0  # connections dropped or answered 503 while down
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    # -- control -------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        with self._lock:
            self._mode = mode
            live, self._live = list(self._live), set()
        if mode != "up":
            for sock in live:
                _close(sock)

    def up_after(self, seconds: float) -> threading.Timer:
        """Switch back to ``up`` after ``seconds`` (the outage ends on its own)."""
        timer = threading.Timer(seconds, self.set_mode, args=("up",))
        timer.daemon = True
        timer.start()
        return timer

    @contextmanager
    def outage(self, mode: str = "drop") -> Iterator[FaultProxy]:
        self.set_mode(mode)
        try:
            yield self
        finally:
            self.set_mode("up")

    def close(self) -> None:
        self._closed = True
        self.set_mode("drop")
        _close(self._listener)

    # -- the proxy -------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        mode = self._mode
        if mode == "drop":
            self.refused += 1
            _close(client)
            return
        if mode == "503":
            self.refused += 1
            self._answer_503(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _close(client)
            return
        with self._lock:
            if self._mode != "up":  # switched while connecting
                self.refused += 1
                _close(client)
                _close(upstream)
                return
            self._live.update((client, upstream))
            self.forwarded += 1
        pump = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        pump.start()
        _pump(client, upstream)
        pump.join(timeout=5)
        with self._lock:
            self._live.discard(client)
            self._live.discard(upstream)

    @staticmethod
    def _answer_503(client: socket.socket) -> None:
        client.settimeout(2)
        try:
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = client.recv(4096)
                if not chunk:
                    break
                data += chunk
            client.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(_503_BODY)}\r\n".encode()
                + b"Connection: close\r\n\r\n"
                + _503_BODY
            )
        except OSError:
            pass
        finally:
            _close(client)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _close(src)
        _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


# -- an MLflow tracking server that can die -------------------------------------------------


class MlflowProcess:
    """``mlflow server`` on a fixed port, SQLite backend, artifacts proxied to
    ``s3://<bucket>/artifacts`` at ``s3_endpoint`` (a :class:`FaultProxy`)."""

    def __init__(self, root: Path, bucket: str, s3_endpoint: str) -> None:
        self.root = root
        self.bucket = bucket
        self.s3_endpoint = s3_endpoint
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.kills = 0
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        env = {**os.environ, **aws_test_environment(self.s3_endpoint, self.root)}
        with open(self.log, "ab") as fh:
            self.process = subprocess.Popen(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{self.root / 'mlflow.db'}",
                    "--artifacts-destination",
                    f"s3://{self.bucket}/artifacts",
                ],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # kill() takes the server's worker processes too
            )
        wait_for_http(f"{self.uri}/health", self.process, self.log, timeout=180)

    def kill(self) -> None:
        """kill -9 the server and its workers (a crash, not a shutdown)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            self.kills += 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _port_open(self.port):
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                try:
                    os.killpg(self.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            stop_process(self.process)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# -- the CLI as a separate process ----------------------------------------------------------


def tiny_cli_args(*extra: str) -> list[str]:
    """``--set`` arguments for the tiny settings of conftest (plus ``extra`` overrides)."""
    out: list[str] = []
    for item in [*tiny_override_list(), *extra]:
        out += ["--set", item]
    return out


def cli_env(home: Path, tracking_uri: str, **extra: str) -> dict[str, str]:
    """Environment for a ``cssl`` subprocess: its own CSSL_HOME and MLflow store, the current
    Prefect API (the session's test harness) when there is one, quiet and short retries."""
    env = {
        **os.environ,
        "CSSL_HOME": str(home),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONUNBUFFERED": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # The CLI keeps Prefect's task lines off the console; the fault tests read them.
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO",
    }
    try:
        from prefect.settings import PREFECT_API_URL

        api = PREFECT_API_URL.value()
        if api:
            env["PREFECT_API_URL"] = api
    except Exception:  # noqa: BLE001 - no Prefect settings: the CLI starts its own server
        pass
    env.update(extra)
    return env


def cssl_command(*args: str) -> list[str]:
    return [str(BIN / "cssl"), *args]


def files_under(*roots: Path) -> Iterable[Path]:
    for root in roots:
        if root.is_file():
            yield root
        elif root.is_dir():
            yield from (p for p in sorted(root.rglob("*")) if p.is_file())


__all__ = [
    "REPO",
    "FaultProxy",
    "MlflowProcess",
    "cli_env",
    "cssl_command",
    "files_under",
    "tiny_cli_args",
]
