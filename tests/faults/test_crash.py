"""Fault 1: kill -9 of a training process at random steps, then rerun it.

The training runs as a separate process in its own process group (``train_driver.py``: the
refresh flow's ``cssl_core.period.train_period``; the slow variant runs the whole ``cssl
refresh``). It is killed with SIGKILL a random moment after a random step's checkpoint
appears, rerun, killed again, and finally rerun to completion. On CPU with a fixed seed the
final weights must equal those of an uninterrupted run, and each rerun must resume from the
newest checkpoint rather than start over.

Set ``CSSL_FAULT_SEED`` to replay a particular choice of kill points.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, tiny_override_list
from faultkit import cli_env, cssl_command, tiny_cli_args

from cssl_core import period as core
from cssl_core.config import load_params
from cssl_core.data.shard import Shard
from cssl_core.data.storage import LocalStore
from cssl_core.memory.replay import ReplayMemory, list_versions

REFRESH_STEP = re.compile(r"p01 train step (\d+)/\d+")
DRIVER_STEP = re.compile(r"^step (\d+)$", re.M)
DRIVER = Path(__file__).with_name("train_driver.py")


def _seed() -> int:
    return int(os.environ.get("CSSL_FAULT_SEED") or random.SystemRandom().randrange(10**6))


def _uninterrupted_weights(params_file: Path, shard: Path, extra: list[str]) -> str:
    """The weights an uninterrupted p01 training ends with (no checkpoints involved)."""
    params = load_params(params_file, extra)
    inputs = core.PeriodInputs(
        params=params,
        period="p01",
        shard=Shard.open(shard),
        memory=ReplayMemory.empty(params.replay.capacity),
    )
    model, result = core.train_period(inputs)
    assert result.resumed_from == 0
    return model.state_fingerprint()


def _run_and_kill(
    cmd: list[str],
    env: dict[str, str],
    ckpt_dir: Path,
    kill_after: int,
    rng: random.Random,
    log: Path,
) -> int:
    """Start ``cmd``, wait for the checkpoint of step ``kill_after``, sleep a random part of a
    step, kill -9 the whole process group. Returns the newest checkpointed step at the kill."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        # step_s: time between two checkpoints this process wrote (a resumed run starts with
        # the killed run's newest ones on disk; they say nothing about its step time).
        newest, seen_at, step_s = max(_checkpointed_steps(ckpt_dir), default=0), None, 0.0
        while time.monotonic() < deadline:
            steps = _checkpointed_steps(ckpt_dir)
            if steps and max(steps) > newest:
                now = time.monotonic()
                if seen_at is not None:
                    step_s = (now - seen_at) / (max(steps) - newest)
                newest, seen_at = max(steps), now
            if newest >= kill_after:
                break
            if proc.poll() is not None:
                raise AssertionError(
                    f"refresh ended (rc {proc.returncode}) before step {kill_after}:\n"
                    + log.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.01)
        else:
            raise AssertionError(f"no checkpoint of step {kill_after} within 300 s")
        # Somewhere inside the next step: a fixed delay could outlast the few remaining
        # steps of a tiny model on an idle machine and kill after training instead.
        time.sleep(rng.uniform(0.0, 0.5 * step_s))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, log.read_text(errors="replace")[-3000:]
    return max(_checkpointed_steps(ckpt_dir))


def _checkpointed_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return [int(p.stem.split("-")[1]) for p in ckpt_dir.glob("step-*.safetensors")]


def _kill_points(steps: int, kills: int) -> tuple[list[int], str]:
    seed = _seed()
    points = sorted(random.Random(seed).sample(range(1, steps - 1), kills))
    return points, f"(CSSL_FAULT_SEED={seed}, kill after steps {points})"


def _kill_then_finish(
    cmd: list[str],
    env: dict[str, str],
    ckpt_dir: Path,
    steps: int,
    points: list[int],
    why: str,
    logs: Path,
    after_kill: Callable[[], None] | None = None,
) -> tuple[list[int], str]:
    """Kill ``cmd`` after each kill point's checkpoint, then run it to the end. Returns the
    newest checkpointed step at each kill and the final run's output."""
    rng = random.Random(why)
    resumed_at = [0]
    for n, point in enumerate(points):
        target = max(point, resumed_at[-1] + 1)  # a step this run has yet to checkpoint
        if target >= steps:
            break
        at_kill = _run_and_kill(cmd, env, ckpt_dir, target, rng, logs / f"killed-{n}.log")
        assert at_kill >= target, why
        resumed_at.append(at_kill)
        if after_kill is not None:
            after_kill()
    assert len(resumed_at) > 1, why
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{why}\n{out[-3000:]}"
    return resumed_at[1:], out


def test_kill_9_of_the_training_process_at_random_steps_then_rerun(
    tmp_path: Path, tiny_params_file: Path, sim_shards: Path
):
    steps = 8
    points, why = _kill_points(steps, kills=2)
    overrides = [*tiny_override_list(), f"train.steps={steps}", "train.checkpoint_every=1"]
    ckpt_dir, out_file = tmp_path / "ckpt", tmp_path / "result.txt"
    cmd = [
        sys.executable,
        str(DRIVER),
        str(tiny_params_file),
        str(sim_shards / "p01"),
        str(ckpt_dir),
        str(out_file),
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    kills, out = _kill_then_finish(cmd, env, ckpt_dir, steps, points, why, tmp_path)
    logged = [int(m.group(1)) for m in DRIVER_STEP.finditer(out)]
    assert logged == list(range(kills[-1] + 1, steps + 1)), (why, logged)
    resumed_from, weights = out_file.read_text().split()
    assert int(resumed_from) == kills[-1], why
    want = _uninterrupted_weights(tiny_params_file, sim_shards / "p01", overrides)
    assert weights == want, f"resumed weights differ from an uninterrupted run {why}"


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_kill_9_of_a_refresh_at_random_steps_then_rerun_registers_the_same_weights(
    tmp_path: Path, tiny_params_file: Path, sim_shards: Path
):
    steps = 8
    points, why = _kill_points(steps, kills=2)
    extra = [f"train.steps={steps}", "train.checkpoint_every=1"]
    store, home = tmp_path / "store", tmp_path / "home"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = cssl_command(
        "refresh",
        "--period",
        "p01",
        "--shard",
        str(sim_shards / "p01"),
        "--params",
        str(tiny_params_file),
        *tiny_cli_args(*extra, f"store.root={store}"),
    )
    ckpt_dir = home / "checkpoints" / "p01"
    env = cli_env(home, tracking)

    def nothing_published() -> None:  # killed mid-period: no version, memory or champion
        from pipelines.mlflow_registry import MlflowRegistry

        registry = MlflowRegistry(tracking)
        assert registry.versions() == [] and registry.champion() is None, why
        assert not (store / "memory").exists() or list_versions(LocalStore(store)) == [], why

    kills, out = _kill_then_finish(
        cmd, env, ckpt_dir, steps, points, why, tmp_path, after_kill=nothing_published
    )
    # The final run resumed from the newest checkpoint: its first logged step follows it.
    logged = [int(m.group(1)) for m in REFRESH_STEP.finditer(out)]
    assert logged == list(range(kills[-1] + 1, steps + 1)), (why, logged)

    from pipelines.mlflow_registry import MlflowRegistry

    registry = MlflowRegistry(tracking)
    versions = registry.versions()
    assert [(v.version, v.period) for v in versions] == [(1, "p01")], why
    assert registry.champion() is not None and registry.champion().version == 1
    want = _uninterrupted_weights(
        tiny_params_file, sim_shards / "p01", [*tiny_override_list(), *extra, f"store.root={store}"]
    )
    assert versions[0].tags["weights_sha256"] == want, f"resumed weights differ {why}"
    assert list_versions(LocalStore(store)) == ["p01"]
