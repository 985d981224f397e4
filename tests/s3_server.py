"""A real S3 API for tests: a moto server *process* on 127.0.0.1, not an in-process mock.

Use it from a test module with::

    pytest_plugins = ["s3_server"]          # or: from s3_server import moto_server, s3_endpoint

    @pytest.mark.server
    def test_something(s3_endpoint, s3_bucket): ...

Fixtures:

- ``moto_server`` (session): starts ``python -m moto.server`` on a free port, waits until it
  answers HTTP, yields a :class:`MotoServer`, kills the process at the end of the session.
- ``s3_endpoint`` (function): points the standard AWS environment at that server for one test
  (``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, dummy credentials, region, no shared config
  files, no instance metadata) and yields the endpoint URL. boto3, DVC and anything else on
  the AWS chain then talk to moto with no code change. (MLflow's artifact client also reads
  ``MLFLOW_S3_ENDPOINT_URL``; that is set too.)
- ``s3_bucket`` (function): a fresh, uniquely named bucket on that server.

Outside pytest, :func:`start_moto_server` returns a running server; call ``stop()`` after.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DUMMY_ACCESS_KEY = "testing-access-key"
DUMMY_SECRET_KEY = "testing-secret-key-do-not-leak"
REGION = "us-east-1"


@dataclass
class MotoServer:
    """A running moto server process."""

    endpoint: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate the process (kill after 10 s) and remove its log."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log_path.unlink(missing_ok=True)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def start_moto_server(timeout: float = 60.0, attempts: int = 3) -> MotoServer:
    """Start ``python -m moto.server`` on a free port and wait until it answers HTTP."""
    last_log = ""
    for _ in range(attempts):
        port = free_port()
        fd, log_name = tempfile.mkstemp(prefix="moto-server-", suffix=".log")
        os.close(fd)
        log_path = Path(log_name)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = MotoServer(f"http://127.0.0.1:{port}", process, log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if _answers(f"{server.endpoint}/moto-api/"):
                return server
            time.sleep(0.1)
        last_log = server.log_tail()
        server.stop()  # died (port taken?) or never answered: try another port
    raise RuntimeError(f"moto server did not start after {attempts} attempts; log:\n{last_log}")


def aws_test_environment(endpoint: str, config_dir: Path) -> dict[str, str]:
    """Environment variables that send the standard AWS chain to ``endpoint``."""
    missing = config_dir / "aws-config-absent"
    return {
        "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": str(missing),
        "AWS_SHARED_CREDENTIALS_FILE": str(missing),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = start_moto_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_endpoint(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    if moto_server.process.poll() is not None:
        raise RuntimeError(f"moto server exited; log:\n{moto_server.log_tail()}")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in aws_test_environment(moto_server.endpoint, tmp_path).items():
        monkeypatch.setenv(name, value)
    yield moto_server.endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    import boto3

    name = f"cssl-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name
