"""Benchmark: the trainer's full step against the bare model step, and FLOP/s against peak.

**Full step** (what a period's training does): :meth:`ContinualTrainer.fit` with strategy
``distill+replay`` on decode-cached frames: draw the batch's indices and replay frames, make
two SimCLR views (:class:`~cssl_core.learn.augment.SimCLRAugment`), forward both views through the
model, run the frozen teacher on both views, predictor distillation + NT-Xent, backward,
optimiser step, log. **Bare step**: the same model, teacher and optimiser on two ready,
normalised view tensors: forward both views, teacher forward on both (no grad), NT-Xent,
backward, optimiser step. Their ratio is the share of time the trainer spends on the model.

Every configuration in ``precision x channels_last x threads`` is measured (both steps, one
after the other, so a load change on the machine touches both alike); the best of each is
reported, with the ratio of the two bests. FLOPs of one step of each are counted with
:class:`torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions, forward and
backward) and set against a measured ``torch.mm`` peak (square matrices, fp32 and bf16) at the
same thread count.

Frames come from the Atari stream simulator (period 0 = the replay memory, period 1 = the new
frames), JPEG-encoded at ``model.input_size`` and decoded once into the trainer's cache.

Run it with ``python -m benchmarks.train [--steps 20] [--batch-size 128] [--json]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from cssl_core.config import Params, SimulateConfig, TrainConfig
from cssl_core.data.simulate import simulate_period_frames
from cssl_core.learn.losses import nt_xent
from cssl_core.learn.models import Embedder
from cssl_core.learn.trainer import ContinualTrainer, FrameSource, resolve_precision

PRECISIONS = ("fp32", "bf16")
CHANNELS_LAST = ("off", "on")


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(threads)`` (0 = leave as is), then restore."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def simulated_frames(count: int, size: int, period_index: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEG frames of the simulator's period ``period_index`` at ``size`` px."""
    cfg = SimulateConfig(frames_per_period=count, size=size, seed=seed)
    return [f.image for f in simulate_period_frames(cfg, period_index + 1, period_index)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    dtype: torch.dtype, n: int = 2048, repeats: int = 10, device: str | torch.device = "cpu"
) -> float:
    """Best-of-three FLOP/s of ``torch.mm`` on two ``n x n`` matrices (``2 n^3`` per call)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    for _ in range(2):
        torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        _sync(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t0))
    return best


def _train_cfg(
    params: Params, precision: str, channels_last: str, batch: int, steps: int
) -> TrainConfig:
    return params.train.model_copy(
        update={
            "strategy": "distill+replay",
            "precision": precision,
            "channels_last": channels_last,
            "batch_size": batch,
            "steps": steps,
        }
    )


def _fresh_trainer(params: Params, cfg: TrainConfig, device: torch.device) -> ContinualTrainer:
    torch.manual_seed(cfg.seed)
    model = Embedder(params.model)
    return ContinualTrainer(cfg, params.augment, model, teacher=model.frozen_copy(), device=device)


def full_step_rate(
    params: Params,
    cfg: TrainConfig,
    frames: FrameSource,
    replay: FrameSource,
    warmup: int,
    device: torch.device,
) -> tuple[float, float]:
    """``(images/s, seconds/step)`` of ``fit`` over its last ``cfg.steps - warmup`` steps."""
    trainer = _fresh_trainer(params, cfg, device)
    stamps: list[float] = []
    trainer.on_step = lambda _log, _rate: stamps.append(time.perf_counter())
    trainer.fit(frames, replay)
    timed = len(stamps) - warmup
    seconds = (stamps[-1] - stamps[warmup - 1]) / timed
    return cfg.batch_size / seconds, seconds


def bare_step(
    trainer: ContinualTrainer,
    optimizer: torch.optim.Optimizer,
    v1: torch.Tensor,
    v2: torch.Tensor,
) -> torch.Tensor:
    """One model-only step on ready views: forward x2, teacher forward x2, NT-Xent, backward,
    optimiser step. Uses the trainer's model, teacher, precision and memory format."""
    model, teacher = trainer.model, trainer.teacher
    assert teacher is not None
    dtype = trainer.autocast_dtype
    with torch.autocast(
        trainer.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
    ):
        z1 = model(v1).projection.float()
        z2 = model(v2).projection.float()
        with torch.no_grad():
            teacher(v1)
            teacher(v2)
        loss = nt_xent(z1, z2, trainer.cfg.temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _bare_setup(
    params: Params, cfg: TrainConfig, device: torch.device
) -> tuple[ContinualTrainer, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    trainer = _fresh_trainer(params, cfg, device)
    fmt = torch.channels_last if trainer.channels_last else torch.contiguous_format
    model = trainer.model.to(device, memory_format=fmt)
    assert trainer.teacher is not None
    trainer.teacher.to(device, memory_format=fmt).eval()
    model.train()
    size = params.model.input_size
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(cfg.batch_size, 3, size, size, generator=g) for _ in range(2)]
    v1, v2 = (v.to(device).contiguous(memory_format=fmt) for v in views)
    return trainer, trainer.build_optimizer(), v1, v2


def bare_step_rate(
    params: Params, cfg: TrainConfig, warmup: int, steps: int, device: torch.device
) -> tuple[float, float]:
    """``(images/s, seconds/step)`` of :func:`bare_step` over ``steps`` steps after warm-up."""
    trainer, optimizer, v1, v2 = _bare_setup(params, cfg, device)
    for _ in range(warmup):
        float(bare_step(trainer, optimizer, v1, v2))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        float(bare_step(trainer, optimizer, v1, v2))  # a sync per step, as the trainer's log
    seconds = (time.perf_counter() - t0) / steps
    return cfg.batch_size / seconds, seconds


def count_step_flops(
    params: Params,
    cfg: TrainConfig,
    frames: FrameSource,
    replay: FrameSource,
    device: torch.device,
) -> tuple[int, int]:
    """``(full, bare)`` FLOPs of one step, counted by ``FlopCounterMode``."""
    one = cfg.model_copy(update={"steps": 1})
    trainer = _fresh_trainer(params, one, device)
    with FlopCounterMode(display=False) as counter:
        trainer.fit(frames, replay)
    full = int(counter.get_total_flops())
    trainer, optimizer, v1, v2 = _bare_setup(params, one, device)
    with FlopCounterMode(display=False) as counter:
        bare_step(trainer, optimizer, v1, v2)
    return full, int(counter.get_total_flops())


def run_train_benchmark(
    params: Params | None = None,
    steps: int = 20,
    batch_size: int | None = None,
    warmup: int = 3,
    precisions: Sequence[str] = PRECISIONS,
    channels_last: Sequence[str] = CHANNELS_LAST,
    threads: Sequence[int] = (1, 2),
    num_frames: int = 512,
    device: str | torch.device = "cpu",
    matmul_size: int = 2048,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure the full and bare step in every configuration; see the module docstring.

    ``params`` defaults to ``Params()`` (resnet18, 64 px, batch 128); ``batch_size``
    overrides ``params.train.batch_size``. Each configuration runs ``warmup + steps`` steps
    of each kind and is timed over the last ``steps``; ``progress`` gets each configuration's
    row as soon as it is measured.
    """
    params = params or Params()
    batch = batch_size or params.train.batch_size
    if steps < 1 or warmup < 1:
        raise ValueError(f"steps and warmup must be >= 1, got {steps} and {warmup}")
    device = torch.device(device)
    size = params.model.input_size
    t_data = time.perf_counter()
    frames = FrameSource(simulated_frames(num_frames, size, 1), size)
    replay = FrameSource(simulated_frames(max(2, num_frames // 2), size, 0), size)
    data_seconds = time.perf_counter() - t_data
    load_before = os.getloadavg()

    configs: list[dict[str, Any]] = []
    for precision, cl, n_threads in itertools.product(precisions, channels_last, threads):
        cfg = _train_cfg(params, precision, cl, batch, warmup + steps)
        with torch_threads(n_threads if device.type == "cpu" else 0):
            full_rate, full_s = full_step_rate(params, cfg, frames, replay, warmup, device)
            bare_rate, bare_s = bare_step_rate(params, cfg, warmup, steps, device)
        configs.append(
            {
                "precision": precision,
                "channels_last": cl,
                "threads": n_threads,
                "full_images_per_s": full_rate,
                "bare_images_per_s": bare_rate,
                "full_step_s": full_s,
                "bare_step_s": bare_s,
                "ratio": full_rate / bare_rate,
            }
        )
        if progress is not None:
            progress(configs[-1])
    best_full = max(configs, key=lambda c: c["full_images_per_s"])
    best_bare = max(configs, key=lambda c: c["bare_images_per_s"])

    # FLOPs and peak at the best full configuration's precision and thread count.
    best_cfg = _train_cfg(params, best_full["precision"], best_full["channels_last"], batch, 1)
    with torch_threads(best_full["threads"] if device.type == "cpu" else 0):
        full_flops, bare_flops = count_step_flops(params, best_cfg, frames, replay, device)
        peaks = {
            p: matmul_peak(
                torch.bfloat16 if p == "bf16" else torch.float32, matmul_size, device=device
            )
            for p in precisions
        }
    peak = peaks[best_full["precision"]]
    full_flops_s = full_flops / best_full["full_step_s"]
    bare_flops_s = bare_flops / best_bare["bare_step_s"]
    return {
        "model": params.model.backbone,
        "input_size": size,
        "batch_size": batch,
        "steps": steps,
        "warmup": warmup,
        "strategy": "distill+replay",
        "replay_ratio": params.train.replay_ratio,
        "device": str(device),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": resolve_precision("auto", torch.device("cpu")) is not None,
            "load_average_before": load_before[0],
            "load_average_after": os.getloadavg()[0],
        },
        "data_seconds": data_seconds,
        "configs": configs,
        "best_full": best_full,
        "best_bare": best_bare,
        "ratio": best_full["full_images_per_s"] / best_bare["bare_images_per_s"],
        "flops": {
            "full_per_step": full_flops,
            "bare_per_step": bare_flops,
            "full_per_s": full_flops_s,
            "bare_per_s": bare_flops_s,
            "matmul_size": matmul_size,
            "matmul_peak_per_s": peaks,
            "full_share_of_peak": full_flops_s / peak,
            "bare_share_of_peak": bare_flops_s / peaks[best_bare["precision"]],
        },
    }


def _config_name(c: dict[str, Any]) -> str:
    cl = "channels_last" if c["channels_last"] == "on" else "contiguous"
    return f"{c['precision']:>4} {cl:<13} {c['threads']} thr"


def format_train_benchmark(result: dict[str, Any]) -> list[str]:
    """Human-readable lines for :func:`run_train_benchmark`'s result."""
    m, f = result["machine"], result["flops"]
    lines = [
        f"train step: {result['model']} {result['input_size']} px, batch "
        f"{result['batch_size']} ({result['strategy']}, replay ratio {result['replay_ratio']}), "
        f"{result['steps']} timed steps after {result['warmup']} warm-up, {result['device']}",
        f"machine: {m['cores']} cores, {m['cpu_capability']}, native bf16 {m['native_bf16']}, "
        f"torch {m['torch']}, load average {m['load_average_before']:.2f} -> "
        f"{m['load_average_after']:.2f}",
        f"{'configuration':<28} {'full img/s':>10} {'bare img/s':>10} {'full/bare':>9}",
    ]
    for c in result["configs"]:
        lines.append(
            f"{_config_name(c):<28} {c['full_images_per_s']:>10.1f} "
            f"{c['bare_images_per_s']:>10.1f} {c['ratio']:>9.3f}"
        )
    bf, bb = result["best_full"], result["best_bare"]
    lines += [
        f"best full: {_config_name(bf)}: {bf['full_images_per_s']:.1f} img/s "
        f"({bf['full_step_s']:.3f} s/step)",
        f"best bare: {_config_name(bb)}: {bb['bare_images_per_s']:.1f} img/s "
        f"({bb['bare_step_s']:.3f} s/step)",
        f"full / bare (best vs best): {result['ratio']:.3f}",
        f"FLOPs/step: full {f['full_per_step'] / 1e9:.1f} G, bare {f['bare_per_step'] / 1e9:.1f} G;"
        f" achieved full {f['full_per_s'] / 1e9:.1f} GFLOP/s, bare {f['bare_per_s'] / 1e9:.1f} "
        "GFLOP/s",
        "matmul peak ("
        + f"{f['matmul_size']}^2): "
        + ", ".join(f"{p} {v / 1e9:.1f} GFLOP/s" for p, v in f["matmul_peak_per_s"].items())
        + f"; full at {100 * f['full_share_of_peak']:.1f}% and bare at "
        f"{100 * f['bare_share_of_peak']:.1f}% of peak",
    ]
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's own options (``cssl bench train`` and ``python -m`` share them)."""
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument(
        "--channels-last", nargs="+", default=list(CHANNELS_LAST), choices=CHANNELS_LAST
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--frames", type=int, default=512, help="simulated frames (new)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the peak mm")
    parser.add_argument("--device", default="cpu")


def run_from_args(params: Params, args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark for parsed :func:`add_arguments` options; progress goes to stderr."""
    return run_train_benchmark(
        params,
        steps=args.steps,
        batch_size=args.batch_size,
        warmup=args.warmup,
        precisions=args.precisions,
        channels_last=args.channels_last,
        threads=args.threads,
        num_frames=args.frames,
        matmul_size=args.matmul_size,
        device=args.device,
        progress=lambda row: print(
            f"{_config_name(row)}: full {row['full_images_per_s']:.1f} img/s, bare "
            f"{row['bare_images_per_s']:.1f} img/s",
            file=sys.stderr,
            flush=True,
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    from cssl_core.config import apply_overrides, load_params, params_from_dict

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None, help="params.yaml (default: built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="override, e.g. model.backbone=resnet10t (repeatable)",
    )
    add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.params:
        params = load_params(args.params, args.overrides)
    else:  # the built-in defaults, not a params.yaml that happens to be in the directory
        params = params_from_dict(apply_overrides({}, args.overrides), "defaults")
    result = run_from_args(params, args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(format_train_benchmark(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
