"""One period's training under ``torchrun``: a job directory in, a model directory out.

The refresh flow (and ``cssl train``) stay one process; only training fans out::

    caller (train_torchrun)                        torchrun: -m cssl_core.learn.launch JOB
    write_job(JOB, PeriodInputs): params,    ──▶   every rank: join the process group,
      shard paths, parent model, memory            read_job(JOB) -> the same PeriodInputs,
    python -m torch.distributed.run ...            train its rows (DDP); rank 0 writes
                                                   checkpoints, then JOB/out/model + result.json
    progress lines (rank 0's stdout)         ◀──   elastic restart: all ranks resume the newest
    read_result(JOB) -> (Embedder, TrainResult)      checkpoint (--max-restarts)

Stopping: when the caller's ``should_stop`` says yes, torchrun gets SIGTERM and passes it to
the ranks, whose handler asks the trainer to stop after the current step; rank 0 checkpoints
it and the caller raises :class:`~cssl_core.learn.trainer.TrainingInterrupted`.

Multi-node: every node runs the same ``torchrun`` command (:func:`torchrun_command`, with the
same ``--rdzv-endpoint`` and ``--rdzv-id``); ``JOB`` and the checkpoint directory must then be
on a filesystem all nodes share, since rank 0 may land on any node.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from cssl_core.config import DistributedConfig, PeriodChain, params_from_dict
from cssl_core.data.shard import Shard
from cssl_core.data.storage import LocalStore, atomic_write_json
from cssl_core.learn import distributed as ddp
from cssl_core.learn.job import OnStep, PeriodInputs, ShouldStop, train_in_process
from cssl_core.learn.models import Embedder
from cssl_core.learn.trainer import StepLog, TrainingDiverged, TrainingInterrupted, TrainResult
from cssl_core.memory.replay import ReplayMemory

JOB_FILE = "job.json"
PARENT_DIR = "parent"
MEMORY_DIR = "memory"
OUT_DIR = "out"
MODEL_DIR = "model"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
INTERRUPTED_FILE = "interrupted.json"
PROGRESS = "cssl-progress "
"""Prefix of rank 0's progress lines on stdout (one JSON object each)."""


class DistributedTrainingFailed(RuntimeError):
    """torchrun exited non-zero (after its restarts) or left no result."""


class JobFile(BaseModel):
    """``job.json``: :class:`~cssl_core.learn.job.PeriodInputs` with its objects as paths
    (the parent model and the replay memory are saved inside the job directory)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    params: dict[str, Any]
    period: str
    chain: list[str]
    shard: str
    history: list[str]
    parent_dir: str | None
    memory_dir: str | None
    memory_period: str | None
    checkpoint_dir: str


# -- the job directory -------------------------------------------------------------------


def write_job(job_dir: Path, inputs: PeriodInputs) -> Path:
    """Write ``inputs`` into ``job_dir`` (created, left for the workers): the parent model
    and the replay memory as files, everything else in ``job.json``. Without a checkpoint
    directory the job gets one inside ``job_dir``, so an elastic restart can resume."""
    job_dir.mkdir(parents=True, exist_ok=True)
    if inputs.parent is not None:
        inputs.parent.save(job_dir / PARENT_DIR)
    memory_dir = None
    if len(inputs.memory):
        inputs.memory.save(LocalStore(job_dir / MEMORY_DIR))
        memory_dir = str((job_dir / MEMORY_DIR).resolve())
    job = JobFile(
        params=inputs.params.model_dump(mode="json"),
        period=inputs.period,
        chain=list(inputs.place.periods),
        shard=str(Path(inputs.shard.path).resolve()),
        history=[str(Path(s.path).resolve()) for s in inputs.history],
        parent_dir=str((job_dir / PARENT_DIR).resolve()) if inputs.parent is not None else None,
        memory_dir=memory_dir,
        memory_period=inputs.memory.period if len(inputs.memory) else None,
        checkpoint_dir=str((inputs.checkpoint_dir or job_dir / "checkpoints").resolve()),
    )
    atomic_write_json(job_dir / JOB_FILE, job.model_dump(mode="json"))
    shutil.rmtree(job_dir / OUT_DIR, ignore_errors=True)
    return job_dir


def read_job(job_dir: Path) -> PeriodInputs:
    """The :class:`PeriodInputs` that :func:`write_job` wrote (one-line error if invalid)."""
    where = job_dir / JOB_FILE
    try:
        job = JobFile.model_validate_json(where.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as exc:
        raise DistributedTrainingFailed(f"{where}: not a readable job file ({exc})") from None
    params = params_from_dict(job.params, str(where))
    memory = (
        ReplayMemory.load(LocalStore(Path(job.memory_dir)), job.memory_period)
        if job.memory_dir and job.memory_period
        else ReplayMemory.empty(params.replay.capacity)
    )
    return PeriodInputs(
        params=params,
        period=job.period,
        shard=Shard.open(job.shard),
        memory=memory,
        parent=Embedder.load(job.parent_dir) if job.parent_dir else None,
        history=tuple(Shard.open(p) for p in job.history),
        checkpoint_dir=Path(job.checkpoint_dir),
        chain=PeriodChain(tuple(job.chain)),
    )


def read_result(job_dir: Path) -> tuple[Embedder, TrainResult]:
    """Rank 0's model and training result (raises what the workers reported)."""
    out = job_dir / OUT_DIR
    if (out / ERROR_FILE).is_file():
        error = json.loads((out / ERROR_FILE).read_text())
        raise TrainingDiverged(error["message"])
    if (out / INTERRUPTED_FILE).is_file():
        info = json.loads((out / INTERRUPTED_FILE).read_text())
        checkpoint = Path(info["checkpoint"]) if info["checkpoint"] else None
        raise TrainingInterrupted(info["step"], info["total_steps"], checkpoint)
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
    on_progress: OnStep | None = None,
    echo: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
    should_stop: ShouldStop | None = None,
) -> None:
    """Run torchrun, turning rank 0's progress lines into ``on_progress`` calls; any other
    output goes to ``echo`` (stderr by default). When ``should_stop`` says yes (polled every
    0.2 s), torchrun gets SIGTERM, which it passes on to the ranks. Raises when torchrun
    exits non-zero."""
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        if should_stop is not None:
            threading.Thread(target=_stop_on_request, args=(proc, should_stop), daemon=True).start()
        if proc.stdout is None:
            raise DistributedTrainingFailed("torchrun started without an output pipe")
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


def _stop_on_request(proc: subprocess.Popen[str], should_stop: ShouldStop) -> None:
    while proc.poll() is None:
        if should_stop():
            proc.send_signal(signal.SIGTERM)
            return
        time.sleep(0.2)


def train_torchrun(
    inputs: PeriodInputs,
    *,
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
    job_dir: Path | None = None,
) -> tuple[Embedder, TrainResult]:
    """Train ``inputs``' period in ``params.distributed`` torchrun processes; the same
    result as :func:`~cssl_core.learn.job.train_in_process` on the same global batches.

    ``job_dir`` defaults to a temporary directory, removed afterwards. Checkpoints go to
    ``inputs.checkpoint_dir`` (default: inside the job directory, so elastic restarts still
    resume), and a rerun with the same inputs resumes them.
    """
    owned = job_dir is None
    job = Path(tempfile.mkdtemp(prefix="cssl-torchrun-")) if job_dir is None else job_dir
    try:
        write_job(job, inputs)
        try:
            run_torchrun(
                torchrun_command(job, inputs.params.distributed),
                on_progress=on_step,
                should_stop=should_stop,
            )
        except DistributedTrainingFailed:
            if (job / OUT_DIR / INTERRUPTED_FILE).is_file():
                read_result(job)  # raises TrainingInterrupted with rank 0's checkpoint
            raise
        return read_result(job)
    finally:
        if owned:
            shutil.rmtree(job, ignore_errors=True)


# -- the worker (torchrun side) ------------------------------------------------------------


def _progress_printer(env: ddp.DistEnv) -> OnStep | None:
    if not env.is_main:
        return None

    def emit(log: StepLog, images_per_second: float) -> None:
        event = {**asdict(log), "images_per_second": images_per_second}
        print(PROGRESS + json.dumps(event), flush=True)

    return emit


def run_worker(job_dir: Path) -> int:
    """One rank of the job: train, and on rank 0 publish the model and result.

    SIGTERM (torchrun passes on the caller's) asks the trainer to stop after the current
    step; rank 0 then records the checkpointed step in ``out/interrupted.json``. A diverged
    or interrupted run exits 0, so torchrun does not restart it.
    """
    env = ddp.env_from()
    inputs = read_job(job_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if inputs.params.train.num_threads:
        torch.set_num_threads(inputs.params.train.num_threads)
    device = ddp.resolve_device(inputs.params.train.device, env)
    ddp.init_process_group(env, device)
    out = job_dir / OUT_DIR
    try:
        model, result = train_in_process(
            inputs,
            on_step=_progress_printer(env),
            should_stop=stop.is_set,
            device=device,
            env=env,
        )
    except TrainingDiverged as exc:  # every rank sees the same loss: stop, do not restart
        if env.is_main:
            atomic_write_json(out / ERROR_FILE, {"message": str(exc)})
        return 0
    except TrainingInterrupted as exc:  # every rank stops after the same step
        if env.is_main:
            checkpoint = str(exc.checkpoint) if exc.checkpoint else None
            info = {"step": exc.step, "total_steps": exc.total_steps, "checkpoint": checkpoint}
            atomic_write_json(out / INTERRUPTED_FILE, info)
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
        atomic_write_json(out / RESULT_FILE, payload)
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
