"""Benchmark: data-parallel scaling of the training step from 1 to N processes (torchrun, DDP).

Strong scaling: the global batch stays ``train.batch_size`` (strategy ``distill+replay``,
frames of the Atari stream simulator decoded once into the trainer's cache) and ``N``
processes split it (:mod:`cssl_core.learn.distributed`: global-batch losses, global BatchNorm, DDP
gradient all-reduce). Every configuration runs the same worker under ``torchrun --standalone``
(one process too, so start-up and the code path are the same), with ``threads`` torch threads
per process, and is timed over its last ``steps`` of ``warmup + steps`` steps as images of
the global batch per second. Reported per process count::

    efficiency(N) = rate(N) / (N * rate(1))        (1.0 = perfect linear scaling)

and, as the honest CPU baseline, one process with ``N x threads`` threads: on a CPU the
cores can also go to intra-op threads of a single process.

Run it with ``cssl bench scaling [--procs 1 2] [--steps 10] [--threads 1] [--json]``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cssl_core.config import Params, params_from_dict


def scaling_efficiency(rate_1: float, rate_n: float, n: int) -> float:
    """Share of linear speed-up reached by ``n`` processes: ``rate_n / (n * rate_1)``."""
    if rate_1 <= 0 or n < 1:
        raise ValueError(f"need rate_1 > 0 and n >= 1, got {rate_1} and {n}")
    return rate_n / (n * rate_1)


def load_average() -> float:
    """The 1-minute load average (what ``uptime`` shows first)."""
    return os.getloadavg()[0]


# -- the worker (one torchrun job) ---------------------------------------------------------


def run_worker(spec_path: Path, out_path: Path) -> None:
    """Train ``warmup + steps`` steps as this torchrun rank; rank 0 writes the timing."""
    from benchmarks.train import simulated_frames
    from cssl_core.learn import distributed as ddp
    from cssl_core.learn.models import Embedder
    from cssl_core.learn.trainer import ContinualTrainer, FrameSource

    spec = json.loads(spec_path.read_text())
    params = params_from_dict(spec["params"])
    torch.set_num_threads(spec["threads"])
    env = ddp.env_from()
    device = torch.device("cpu")
    ddp.init_process_group(env, device)
    size = params.model.input_size
    frames = FrameSource(simulated_frames(spec["frames"], size, 1), size)
    replay = FrameSource(simulated_frames(max(2, spec["frames"] // 2), size, 0), size)
    cfg = params.train.model_copy(
        update={"strategy": "distill+replay", "steps": spec["warmup"] + spec["steps"]}
    )
    torch.manual_seed(cfg.seed)
    model = Embedder(params.model)
    trainer = ContinualTrainer(
        cfg,
        params.augment,
        model,
        teacher=model.frozen_copy(),
        device=device,
        rank=env.rank,
        world_size=env.world_size,
    )
    stamps: list[float] = []
    trainer.on_step = lambda _log, _rate: stamps.append(time.perf_counter())
    try:
        trainer.fit(frames, replay)
    finally:
        ddp.destroy_process_group()
    warmup = spec["warmup"]
    seconds = (stamps[-1] - stamps[warmup - 1]) / (len(stamps) - warmup)
    if env.is_main:
        result = {"world_size": env.world_size, "step_s": seconds}
        result["images_per_s"] = cfg.batch_size / seconds
        out_path.write_text(json.dumps(result) + "\n")


# -- the driver ----------------------------------------------------------------------------


def run_config(spec: dict[str, Any], procs: int, threads: int, workdir: Path) -> dict[str, Any]:
    """One torchrun job of ``procs`` processes with ``threads`` threads each."""
    spec_path = workdir / f"spec-{procs}x{threads}.json"
    out_path = workdir / f"result-{procs}x{threads}.json"
    spec_path.write_text(json.dumps({**spec, "threads": threads}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(procs), "-m", "benchmarks.scaling"]
    cmd += ["--worker", str(spec_path), str(out_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    load_before = load_average()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun ({procs} x {threads}) failed: {proc.stderr[-2000:]}")
    result = json.loads(out_path.read_text())
    return {
        "procs": procs,
        "threads": threads,
        **result,
        "load_before": load_before,
        "load_after": load_average(),
    }


def run_scaling_benchmark(
    params: Params | None = None,
    procs: Sequence[int] = (1, 2),
    threads: int = 1,
    steps: int = 10,
    warmup: int = 3,
    frames: int = 512,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure every process count and the one-process thread baselines (module docstring)."""
    params = params or Params()
    if steps < 1 or warmup < 1 or 1 not in procs:
        raise ValueError("need steps >= 1, warmup >= 1, and 1 among the process counts")
    spec = {
        "params": params.model_dump(mode="json"),
        "steps": steps,
        "warmup": warmup,
        "frames": frames,
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cssl-bench-scaling-") as tmp:
        plan = [(n, threads) for n in procs]
        plan += [(1, n * threads) for n in procs if n > 1]
        for n, t in plan:
            rows.append(run_config(spec, n, t, Path(tmp)))
            if progress is not None:
                progress(rows[-1])
    base = next(r for r in rows if r["procs"] == 1 and r["threads"] == threads)
    for r in rows:
        cores = r["procs"] * r["threads"]
        r["speedup"] = r["images_per_s"] / base["images_per_s"]
        r["efficiency"] = scaling_efficiency(base["images_per_s"], r["images_per_s"], cores)
    return {
        "model": params.model.backbone,
        "input_size": params.model.input_size,
        "batch_size": params.train.batch_size,
        "precision": params.train.precision,
        "steps": steps,
        "warmup": warmup,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
        },
        "rows": rows,
    }


def format_scaling_benchmark(result: dict[str, Any]) -> list[str]:
    lines = [
        f"scaling: {result['model']} {result['input_size']} px, global batch "
        f"{result['batch_size']} (distill+replay, precision {result['precision']}), "
        f"{result['steps']} timed steps after {result['warmup']} warm-up; "
        f"{result['machine']['cores']} cores, torch {result['machine']['torch']}",
        f"{'processes x threads':<20} {'img/s':>8} {'s/step':>8} {'speed-up':>9} "
        f"{'efficiency':>10} {'load before/after':>18}",
    ]
    for r in result["rows"]:
        name = f"{r['procs']} x {r['threads']}"
        lines.append(
            f"{name:<20} {r['images_per_s']:>8.1f} {r['step_s']:>8.3f} {r['speedup']:>9.2f} "
            f"{r['efficiency']:>10.2f} {r['load_before']:>8.2f} / {r['load_after']:<8.2f}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 3 and args[0] == "--worker":
        run_worker(Path(args[1]), Path(args[2]))
        return 0
    print("usage: cssl bench scaling (this module's --worker mode is for torchrun)")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
