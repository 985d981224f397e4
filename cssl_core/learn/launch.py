"""One period's training under ``torchrun``: a job directory in, a model directory out.

The refresh flow (and ``cssl train``) stay one process; only training fans out::

    caller (train_period_torchrun)                 torchrun: -m cssl_core.learn.launch JOB
    write_job(JOB): params, shard paths,    ──▶    every rank: join the process group, read JOB,
      parent model, replay memory                  train its rows (DDP); rank 0 writes checkpoints,
    python -m torch.distributed.run ...            then JOB/out/model + JOB/out/result.json
    progress lines (rank 0's stdout)         ◀──   elastic restart: all ranks resume the newest
    read_result(JOB) -> (Embedder, TrainResult)      checkpoint (--max-restarts)

Multi-node: every node runs the same ``torchrun`` command (:func:`torchrun_command`, with the
same ``--rdzv-endpoint`` and ``--rdzv-id``); ``JOB`` and the checkpoint directory must then be
on a filesystem all nodes share, since rank 0 may land on any node.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cssl_core.config import DistributedConfig, Params, params_from_dict
from cssl_core.data.shard import Shard
from cssl_core.data.storage import LocalStore
from cssl_core.learn import distributed as ddp
from cssl_core.learn.models import Embedder
from cssl_core.learn.trainer import StepLog, TrainingDiverged, TrainResult
from cssl_core.memory.replay import ReplayMemory

JOB_FILE = "job.json"
PARENT_DIR = "parent"
MEMORY_DIR = "memory"
OUT_DIR = "out"
MODEL_DIR = "model"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
PROGRESS = "cssl-progress "
"""Prefix of rank 0's progress lines on stdout (one JSON object each)."""


class DistributedTrainingFailed(RuntimeError):
    """torchrun exited non-zero (after its restarts) or left no result."""


# -- the job directory -------------------------------------------------------------------


def write_job(
    job_dir: Path,
    params: Params,
    period: str,
    shard: Shard,
    parent: Embedder | None,
    memory: ReplayMemory,
    history: Sequence[Shard] = (),
    checkpoint_dir: Path | None = None,
) -> Path:
    """Write everything the workers need into ``job_dir`` (created, left for the workers)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    if parent is not None:
        parent.save(job_dir / PARENT_DIR)
    if len(memory):
        memory.save(LocalStore(job_dir / MEMORY_DIR))
    spec = {
        "params": params.model_dump(mode="json"),
        "period": period,
        "shard": str(Path(shard.path).resolve()),
        "history": [str(Path(s.path).resolve()) for s in history],
        "parent": parent is not None,
        "memory_period": memory.period if len(memory) else None,
        "checkpoint_dir": str((checkpoint_dir or job_dir / "checkpoints").resolve()),
    }
    (job_dir / JOB_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    shutil.rmtree(job_dir / OUT_DIR, ignore_errors=True)
    return job_dir


def read_job(job_dir: Path) -> dict[str, Any]:
    """The job's inputs as objects: params, period, shard, parent, memory, history."""
    spec = json.loads((job_dir / JOB_FILE).read_text())
    params = params_from_dict(spec["params"], str(job_dir / JOB_FILE))
    memory = (
        ReplayMemory.load(LocalStore(job_dir / MEMORY_DIR), spec["memory_period"])
        if spec["memory_period"]
        else ReplayMemory.empty(params.replay.capacity)
    )
    return {
        "params": params,
        "period": spec["period"],
        "shard": Shard.open(spec["shard"]),
        "parent": Embedder.load(job_dir / PARENT_DIR) if spec["parent"] else None,
        "memory": memory,
        "history": [Shard.open(p) for p in spec["history"]],
        "checkpoint_dir": Path(spec["checkpoint_dir"]),
    }


def read_result(job_dir: Path) -> tuple[Embedder, TrainResult]:
    """Rank 0's model and training result (raises what the workers reported)."""
    out = job_dir / OUT_DIR
    if (out / ERROR_FILE).is_file():
        error = json.loads((out / ERROR_FILE).read_text())
        raise TrainingDiverged(error["message"])
    if not (out / RESULT_FILE).is_file():
        raise DistributedTrainingFailed(f"the workers left no result in {out}")
    raw = json.loads((out / RESULT_FILE).read_text())
    history = [StepLog(**h) for h in raw.pop("history")]
    result = TrainResult(
        **{k: raw[k] for k in ("steps", "resumed_from", "wall_seconds", "images_per_second")},
        history=history,
    )
    return Embedder.load(out / MODEL_DIR), result


# -- the launcher (caller side) ------------------------------------------------------------


def torchrun_command(
    job_dir: Path, cfg: DistributedConfig, python: str = sys.executable
) -> list[str]:
    """``python -m torch.distributed.run ... -m cssl_core.learn.launch JOB`` for ``cfg``: one node
    ``--standalone``, several nodes a c10d rendezvous at ``cfg.rdzv_endpoint``."""
    cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.nproc_per_node)]
    cmd += ["--max-restarts", str(cfg.max_restarts)]
    if cfg.nnodes == 1 and not cfg.rdzv_endpoint:
        cmd.append("--standalone")
    else:
        cmd += ["--nnodes", str(cfg.nnodes), "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", str(cfg.rdzv_endpoint), "--rdzv-id", cfg.rdzv_id]
    return [*cmd, "-m", "cssl_core.learn.launch", str(job_dir)]


def run_torchrun(
    command: Sequence[str],
    on_progress: Callable[[StepLog, float], None] | None = None,
    echo: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run torchrun, turning rank 0's progress lines into ``on_progress`` calls; any other
    output goes to ``echo`` (stderr by default). Raises when torchrun exits non-zero."""
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if line.startswith(PROGRESS):
                if on_progress is not None:
                    event = json.loads(line[len(PROGRESS) :])
                    rate = event.pop("images_per_second")
                    on_progress(StepLog(**event), rate)
                continue
            tail.append(line)
            echo(line)
        rc = proc.wait()
    if rc != 0:
        last = " | ".join(x for x in tail if x.strip())[-2000:]
        raise DistributedTrainingFailed(f"torchrun exited with {rc}: {last}")


def train_period_torchrun(
    params: Params,
    period: str,
    shard: Shard,
    parent: Embedder | None,
    memory: ReplayMemory,
    *,
    history: Sequence[Shard] = (),
    checkpoint_dir: Path | None = None,
    on_step: Callable[[StepLog, float], None] | None = None,
    job_dir: Path | None = None,
) -> tuple[Embedder, TrainResult]:
    """:func:`cssl_core.period.train_period` in ``params.distributed`` torchrun processes.

    ``job_dir`` defaults to a temporary directory, removed afterwards; checkpoints go to
    ``checkpoint_dir`` (default: inside the job directory), so a rerun resumes them.
    """
    owned = job_dir is None
    job = Path(tempfile.mkdtemp(prefix="cssl-torchrun-")) if job_dir is None else job_dir
    try:
        write_job(job, params, period, shard, parent, memory, history, checkpoint_dir)
        run_torchrun(torchrun_command(job, params.distributed), on_progress=on_step)
        return read_result(job)
    finally:
        if owned:
            shutil.rmtree(job, ignore_errors=True)


# -- the worker (torchrun side) ------------------------------------------------------------


def _progress_printer(env: ddp.DistEnv) -> Callable[[StepLog, float], None] | None:
    if not env.is_main:
        return None

    def emit(log: StepLog, images_per_second: float) -> None:
        event = {**asdict(log), "images_per_second": images_per_second}
        print(PROGRESS + json.dumps(event), flush=True)

    return emit


def run_worker(job_dir: Path) -> int:
    """One rank of the job: train, and on rank 0 publish the model and result."""
    from cssl_core.period import train_period_local

    env = ddp.env_from()
    job = read_job(job_dir)
    params: Params = job["params"]
    if params.train.num_threads:
        torch.set_num_threads(params.train.num_threads)
    device = ddp.resolve_device(params.train.device, env)
    ddp.init_process_group(env, device)
    out = job_dir / OUT_DIR
    try:
        model, result = train_period_local(
            params,
            job["period"],
            job["shard"],
            job["parent"],
            job["memory"],
            history=job["history"],
            checkpoint_dir=job["checkpoint_dir"],
            on_step=_progress_printer(env),
            device=device,
            env=env,
        )
    except TrainingDiverged as exc:  # every rank sees the same loss: stop, do not restart
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / ERROR_FILE).write_text(json.dumps({"message": str(exc)}) + "\n")
        return 0
    finally:
        ddp.destroy_process_group()
    if env.is_main:
        model.save(out / MODEL_DIR)
        payload = {
            **asdict(result),
            "world_size": env.world_size,
            "restart_count": env.restart_count,
        }
        tmp = out / f".{RESULT_FILE}.tmp"
        tmp.write_text(json.dumps(payload) + "\n")
        tmp.replace(out / RESULT_FILE)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(
            "usage: python -m cssl_core.learn.launch JOB_DIR (started by torchrun)", file=sys.stderr
        )
        return 2
    return run_worker(Path(args[0]))


if __name__ == "__main__":
    raise SystemExit(main())
