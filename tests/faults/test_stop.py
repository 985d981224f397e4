"""Stopping cleanly: SIGTERM to a running ``cssl refresh`` (how Kubernetes preempts a pod).

The refresh runs as a real process in its own session, with no Prefect API set, so it starts
its own temporary Prefect server. SIGTERM arrives during training: the command must exit
non-zero within the grace period, leave no process of its session behind (the server
included), mark its MLflow run FAILED and keep a checkpoint; the rerun resumes from it and
finishes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from faultkit import cli_env, cssl_command, tiny_cli_args

GRACE_S = 20


def _checkpointed_steps(ckpt_dir: Path) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in ckpt_dir.glob("step-*.safetensors")]


def _session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


@pytest.mark.slow
def test_sigterm_during_training_stops_cleanly_and_the_rerun_resumes(
    tmp_path: Path, tiny_params_file: Path, sim_shards: Path
):
    steps = 40
    home, store = tmp_path / "home", tmp_path / "store"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The first periodic checkpoint (step 15) says training runs; the stop then writes its own
    # checkpoint of the step it stopped after (the trainer's should_stop), not waiting for 30.
    every = 15
    extra = [f"train.steps={steps}", f"train.checkpoint_every={every}", f"store.root={store}"]
    cmd = cssl_command(
        "refresh",
        "--period",
        "p01",
        "--shard",
        str(sim_shards / "p01"),
        "--params",
        str(tiny_params_file),
        "--json",
        *tiny_cli_args(*extra),
    )
    env = cli_env(home, tracking)
    env.pop("PREFECT_API_URL", None)  # the command starts (and must stop) its own server
    env.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL")  # the console a user sees
    ckpt_dir = home / "checkpoints" / "p01"
    log = tmp_path / "first.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 600
        while not _checkpointed_steps(ckpt_dir) and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        assert _checkpointed_steps(ckpt_dir), "no training step within 10 minutes"
        os.kill(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        code = proc.wait(timeout=GRACE_S + 10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text(errors="replace")
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert took <= GRACE_S, f"took {took:.1f} s to stop"
    assert "stopped by SIGTERM" in out.splitlines()[-1], out[-3000:]
    time.sleep(1)
    assert _session_processes(proc.pid) == [], "processes of the command outlived it"
    stopped_at = max(_checkpointed_steps(ckpt_dir))
    assert every < stopped_at < steps, f"no checkpoint of the stopped step ({stopped_at})"

    from pipelines.mlflow_registry import MlflowRegistry

    registry = MlflowRegistry(tracking)
    runs = registry.client.search_runs([registry.experiment_id()])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert registry.versions() == []

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout)
    assert summary["resumed_from"] == stopped_at
    assert (summary["version"], summary["promoted"]) == (1, True)


def test_a_step_that_outlasts_the_grace_period_is_interrupted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first signal only asks training to stop; when the step does not end within
    ``GRACE_SECONDS`` the watchdog delivers the signal again and the command stops at once."""
    from pipelines import stopping

    monkeypatch.setattr(stopping, "GRACE_SECONDS", 0.5)
    stopping.reset()
    start = time.monotonic()
    with pytest.raises(stopping.Interrupted) as stopped:
        with stopping.handling_signals(), stopping.graceful_training():
            os.kill(os.getpid(), signal.SIGTERM)
            while time.monotonic() - start < 30:  # a step that never checks should_stop
                time.sleep(0.05)
    assert stopped.value.signum == signal.SIGTERM
    assert stopping.stop_requested()
    assert time.monotonic() - start < 10
    stopping.reset()
