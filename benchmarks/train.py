"""Benchmark: the trainer's full step against the bare model step, and FLOP/s against peak.

**Full step** (what a period's training does): :meth:`ContinualTrainer.fit` on decode-cached
frames: draw the batch's indices (and, for the replay strategies, replay frames), make two
SimCLR views (:class:`~cssl_core.learn.augment.SimCLRAugment`), forward both views through the
model (and, for the distill strategies, the frozen teacher and the predictor), the losses,
backward, optimiser step, log. **Bare step**: the same model, teacher and optimiser on two
ready, normalised view tensors of the same batch size: forward both views, the teacher's
forward on both when the strategy distils (no grad), NT-Xent, backward, optimiser step. Their
ratio is the share of the step the trainer spends on the model (the goal is >= 0.85).

Measured per strategy (default ``finetune`` and ``distill+replay``; ``--set
train.strategy=S`` measures ``S``, ``--strategies`` any list) in the configuration the trainer
picks from ``params.train`` (``precision: auto`` is bf16 autocast on a CPU with native bf16,
``channels_last: auto`` follows it; all torch threads unless ``train.num_threads`` is set).
``--sweep`` measures every ``precision x channels_last x threads`` instead.

First, one step of each kind in each configuration runs under
:class:`torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions, forward and
backward: the FLOPs of one step; it also warms the kernels up). Then each measurement runs on
a fresh model ``warmup`` untimed and ``steps`` timed steps; the full and the bare step of a
configuration run one after the other, so a load change on the machine touches both alike.
By default the timed steps are as many as fit the ``budget`` (3 to 20, sized from the counted
steps' wall time), so the default run takes about two and a half minutes on a 2-core CPU.
Achieved FLOP/s are set against a measured ``torch.mm`` peak (square matrices; fp32 always,
bf16 when a measured configuration uses it) at the same thread count.

Frames come from the Atari stream simulator (period 0 = the replay memory, period 1 = the new
frames), JPEG-encoded at ``model.input_size`` and decoded once into the trainer's cache.

Run it with ``cssl bench train`` (or ``python -m benchmarks train``); see ``--help``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import machine
from cssl_core.config import Params, SimulateConfig, params_from_dict
from cssl_core.data.simulate import simulate_period_frames
from cssl_core.learn.losses import nt_xent
from cssl_core.learn.models import Embedder
from cssl_core.learn.strategy import strategy_spec
from cssl_core.learn.trainer import ContinualTrainer, FrameSource, resolve_precision
from cssl_core.runtime import torch_threads

PRECISIONS = ("fp32", "bf16")
CHANNELS_LAST = ("off", "on")
DEFAULT_STRATEGIES = ("finetune", "distill+replay")
DEFAULT_BUDGET_S = 150.0
MIN_STEPS, MAX_STEPS, SWEEP_STEPS = 3, 20, 20
GOAL_RATIO = 0.85
"""The full step should run at no less than this share of the bare step's images/s."""


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


@dataclass(frozen=True)
class StepConfig:
    """One configuration to measure: ``train.precision`` and ``train.channels_last`` as
    params.yaml spells them (``auto`` = what the trainer picks) and the torch thread count."""

    precision: str
    channels_last: str
    threads: int


def plan_configs(
    params: Params,
    sweep: bool,
    precisions: Sequence[str] | None = None,
    channels_last: Sequence[str] | None = None,
    threads: Sequence[int] | None = None,
) -> list[StepConfig]:
    """The configurations to measure: every axis given explicitly is used as given; the others
    are every value with ``sweep``, else the trainer's own choice from ``params.train``."""
    all_threads = params.train.num_threads or torch.get_num_threads()
    p = precisions or (PRECISIONS if sweep else (params.train.precision,))
    c = channels_last or (CHANNELS_LAST if sweep else (params.train.channels_last,))
    t = threads or (sorted({1, all_threads}) if sweep else (all_threads,))
    return [StepConfig(*combo) for combo in itertools.product(p, c, t)]


def params_for(params: Params, strategy: str, config: StepConfig, batch: int) -> Params:
    """``params`` with the strategy, precision, memory format and batch set (validated)."""
    tree = params.model_dump(mode="json")
    tree["train"].update(
        strategy=strategy,
        precision=config.precision,
        channels_last=config.channels_last,
        batch_size=batch,
    )
    return params_from_dict(tree, f"bench train ({strategy})")


def fresh_trainer(params: Params, device: torch.device, steps: int = 1) -> ContinualTrainer:
    """A trainer as a period builds it: a new model of ``params.model``, and the frozen
    teacher (a copy of it) when the strategy distils."""
    torch.manual_seed(params.train.seed)
    model = Embedder(params.model)
    teacher = model.frozen_copy() if strategy_spec(params.train.strategy).uses_distill else None
    cfg = params.train.model_copy(update={"steps": steps})
    return ContinualTrainer(cfg, params.augment, model, teacher=teacher, device=device)


def bare_step(
    trainer: ContinualTrainer,
    optimizer: torch.optim.Optimizer,
    v1: torch.Tensor,
    v2: torch.Tensor,
) -> torch.Tensor:
    """One model-only step on ready views: forward x2, the teacher's forward x2 when there is
    one, NT-Xent, backward, optimiser step, with the trainer's precision and memory format."""
    model, teacher = trainer.model, trainer.teacher
    dtype = trainer.autocast_dtype
    with torch.autocast(
        trainer.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
    ):
        z1 = model(v1).projection.float()
        z2 = model(v2).projection.float()
        if teacher is not None:
            with torch.no_grad():
                teacher(v1)
                teacher(v2)
        loss = nt_xent(z1, z2, trainer.cfg.temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@dataclass
class Measured:
    """One kind of step in one configuration: FLOPs of a step and its timing."""

    flops: int
    counted_step_s: float
    """Wall time of the FLOP-counted step (an over-estimate of a step: sizes the budget)."""
    step_s: float = math.nan

    def images_per_s(self, batch: int) -> float:
        return batch / self.step_s


class FullStep:
    """:meth:`ContinualTrainer.fit` on the benchmark frames, timed by its ``on_step`` hook."""

    def __init__(
        self, params: Params, frames: FrameSource, replay: FrameSource, device: torch.device
    ) -> None:
        self.params, self.frames, self.replay, self.device = params, frames, replay, device
        self.trainer = fresh_trainer(params, device)

    def count(self) -> Measured:
        t0 = time.perf_counter()
        with FlopCounterMode(display=False) as counter:
            self.trainer.fit(self.frames, self.replay, steps=1)
        return Measured(int(counter.get_total_flops()), time.perf_counter() - t0)

    def time(self, warmup: int, steps: int) -> float:
        """Seconds per step over the last ``steps`` of ``warmup + steps`` steps of one fit
        (``warmup >= 1``: the window starts when a step ends)."""
        stamps: list[float] = []
        self.trainer.on_step = lambda _log, _rate: stamps.append(time.perf_counter())
        self.trainer.fit(self.frames, self.replay, steps=warmup + steps)
        return (stamps[-1] - stamps[warmup - 1]) / steps


class BareStep:
    """:func:`bare_step` on two fixed random view batches of the trainer's batch size."""

    def __init__(self, params: Params, device: torch.device) -> None:
        self.device = device
        self.trainer = trainer = fresh_trainer(params, device)
        fmt = torch.channels_last if trainer.channels_last else torch.contiguous_format
        trainer.model.to(device).to(memory_format=fmt).train()
        if trainer.teacher is not None:
            trainer.teacher.to(device).to(memory_format=fmt).eval()
        size, batch = params.model.input_size, params.train.batch_size
        g = torch.Generator().manual_seed(1)
        views = [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]
        self.v1, self.v2 = (v.to(device).contiguous(memory_format=fmt) for v in views)
        self.optimizer = trainer.build_optimizer()

    def _step(self) -> None:
        float(bare_step(self.trainer, self.optimizer, self.v1, self.v2))  # a sync, as fit's log

    def count(self) -> Measured:
        t0 = time.perf_counter()
        with FlopCounterMode(display=False) as counter:
            self._step()
        return Measured(int(counter.get_total_flops()), time.perf_counter() - t0)

    def time(self, warmup: int, steps: int) -> float:
        for _ in range(warmup):
            self._step()
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self._step()
        return (time.perf_counter() - t0) / steps


def steps_for_budget(seconds_left: float, unit_s: float, warmup: int) -> int:
    """Timed steps per measurement so that ``(warmup + steps) * unit_s`` fits in
    ``seconds_left`` (``unit_s``: one step of every measurement), clamped to 3..20."""
    fit = math.floor(seconds_left / unit_s) - warmup if unit_s > 0 else MAX_STEPS
    return max(MIN_STEPS, min(MAX_STEPS, fit))


def run_train_benchmark(
    params: Params | None = None,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    *,
    sweep: bool = False,
    steps: int | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
    warmup: int = 2,
    batch_size: int | None = None,
    precisions: Sequence[str] | None = None,
    channels_last: Sequence[str] | None = None,
    threads: Sequence[int] | None = None,
    num_frames: int = 512,
    device: str | torch.device = "cpu",
    matmul_size: int = 2048,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure the full and bare step of each strategy in each configuration (module docs).

    ``params`` defaults to ``Params()`` (resnet18, 64 px, batch 128); ``batch_size``
    overrides ``params.train.batch_size``. ``steps`` fixes the timed steps per measurement
    (default: sized to ``budget_s``, or 20 with ``sweep``); ``progress`` gets a line per
    measurement as soon as it is taken.
    """
    t_start = time.perf_counter()
    params = params or Params()
    batch = batch_size or params.train.batch_size
    if (steps is not None and steps < 1) or warmup < 1:
        raise ValueError(f"need steps >= 1 and warmup >= 1, got {steps} and {warmup}")
    if not strategies:
        raise ValueError("no strategy to measure")
    say = progress or (lambda _line: None)
    device = torch.device(device)
    configs = plan_configs(params, sweep, precisions, channels_last, threads)
    plans = [(s, c, params_for(params, s, c, batch)) for s in strategies for c in configs]
    load_before = machine.load_average()
    size = params.model.input_size
    t_data = time.perf_counter()
    frames = FrameSource(simulated_frames(num_frames, size, 1), size)
    replay = FrameSource(simulated_frames(max(2, num_frames // 2), size, 0), size)
    data_seconds = time.perf_counter() - t_data

    def threads_of(c: StepConfig) -> Any:
        return torch_threads(c.threads if device.type == "cpu" else 0)

    # Pass 1: one FLOP-counted step of each kind in each configuration (also the first
    # warm-up, and the step times that size the timed steps to the budget).
    counted: list[tuple[Measured, Measured]] = []
    for strategy, c, p in plans:
        with threads_of(c):
            counted.append(
                (FullStep(p, frames, replay, device).count(), BareStep(p, device).count())
            )
        say(f"{strategy}, {_config_label(c)}: FLOPs counted")
    if steps is None:
        unit = sum(f.counted_step_s + b.counted_step_s for f, b in counted)
        left = budget_s - (time.perf_counter() - t_start) - 15.0  # the matmul peaks
        steps = SWEEP_STEPS if sweep else steps_for_budget(left, unit, warmup)

    # Pass 2: time each configuration's full step, then its bare step.
    rows: list[dict[str, Any]] = []
    for (strategy, c, p), (full, bare) in zip(plans, counted, strict=True):
        with threads_of(c):
            full_step = FullStep(p, frames, replay, device)
            full.step_s = full_step.time(warmup, steps)
            bare.step_s = BareStep(p, device).time(warmup, steps)
        trainer = full_step.trainer
        row = {
            "strategy": strategy,
            "precision": "bf16" if trainer.autocast_dtype is not None else "fp32",
            "channels_last": "on" if trainer.channels_last else "off",
            "threads": c.threads,
            "settings": {"precision": c.precision, "channels_last": c.channels_last},
            "teacher": trainer.teacher is not None,
            "full_images_per_s": full.images_per_s(batch),
            "bare_images_per_s": bare.images_per_s(batch),
            "full_step_s": full.step_s,
            "bare_step_s": bare.step_s,
            "ratio": bare.step_s / full.step_s,
            "full_flops_per_step": full.flops,
            "bare_flops_per_step": bare.flops,
        }
        rows.append(row)
        say(
            f"{strategy}, {_config_name(row)}: full {row['full_images_per_s']:.1f} img/s, "
            f"bare {row['bare_images_per_s']:.1f} img/s"
        )

    used = sorted({"fp32", *(r["precision"] for r in rows)}, key=PRECISIONS.index)
    peak_threads = max(c.threads for c in configs) if device.type == "cpu" else 0
    with torch_threads(peak_threads):
        peaks = {
            p: matmul_peak(
                torch.bfloat16 if p == "bf16" else torch.float32, matmul_size, device=device
            )
            for p in used
        }
    return {
        "model": params.model.backbone,
        "input_size": size,
        "batch_size": batch,
        "replay_ratio": params.train.replay_ratio,
        "steps": steps,
        "warmup": warmup,
        "budget_s": None if sweep else budget_s,
        "sweep": sweep,
        "device": str(device),
        "machine": {
            **machine.describe(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": resolve_precision("auto", torch.device("cpu")) is not None,
            "load_average_before": load_before,
            "load_average_after": machine.load_average(),
        },
        "data_seconds": data_seconds,
        "matmul": {"size": matmul_size, "threads": peak_threads, "peak_per_s": peaks},
        "strategies": [
            _summarise(s, [r for r in rows if r["strategy"] == s], peaks) for s in strategies
        ],
        "wall_s": time.perf_counter() - t_start,
    }


def _summarise(
    strategy: str, rows: list[dict[str, Any]], peaks: dict[str, float]
) -> dict[str, Any]:
    """A strategy's best full and best bare configuration, their ratio and FLOP/s."""
    best_full = max(rows, key=lambda r: r["full_images_per_s"])
    best_bare = max(rows, key=lambda r: r["bare_images_per_s"])
    full_per_s = best_full["full_flops_per_step"] / best_full["full_step_s"]
    bare_per_s = best_bare["bare_flops_per_step"] / best_bare["bare_step_s"]
    ratio = best_full["full_images_per_s"] / best_bare["bare_images_per_s"]
    return {
        "strategy": strategy,
        "configs": rows,
        "best_full": best_full,
        "best_bare": best_bare,
        "ratio": ratio,
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio >= GOAL_RATIO,
        "flops": {
            "full_per_step": best_full["full_flops_per_step"],
            "bare_per_step": best_bare["bare_flops_per_step"],
            "full_per_s": full_per_s,
            "bare_per_s": bare_per_s,
            "full_share_of_peak": full_per_s / peaks[best_full["precision"]],
            "bare_share_of_peak": bare_per_s / peaks[best_bare["precision"]],
        },
    }


def _config_label(c: StepConfig) -> str:
    return f"precision {c.precision}, channels_last {c.channels_last}, {c.threads} thr"


def _config_name(c: dict[str, Any]) -> str:
    cl = "channels_last" if c["channels_last"] == "on" else "contiguous"
    return f"{c['precision']:>4} {cl:<13} {c['threads']} thr"


def format_train_benchmark(result: dict[str, Any]) -> list[str]:
    """Human-readable lines for :func:`run_train_benchmark`'s result."""
    m, mm = result["machine"], result["matmul"]
    emulated = ", ".join(f"{k}={v}" for k, v in m["emulation"].items())
    lines = [
        f"train step: {result['model']} {result['input_size']} px, batch "
        f"{result['batch_size']} (replay ratio {result['replay_ratio']} where replayed), "
        f"{result['steps']} timed steps after {result['warmup']} warm-up per measurement, "
        f"{result['device']}",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['cpu_kind']}"
        + (f" [{emulated}]" if emulated else "")
        + f", torch {m['torch']} ({m['cpu_capability']}), load average "
        f"{m['load_average_before']:.2f} -> {m['load_average_after']:.2f}, wall "
        f"{result['wall_s']:.0f} s",
        f"{'strategy':<15} {'configuration':<28} {'full img/s':>10} {'bare img/s':>10} "
        f"{'full/bare':>9}",
    ]
    for s in result["strategies"]:
        for c in s["configs"]:
            lines.append(
                f"{s['strategy']:<15} {_config_name(c):<28} {c['full_images_per_s']:>10.1f} "
                f"{c['bare_images_per_s']:>10.1f} {c['ratio']:>9.3f}"
            )
    lines.append(
        f"matmul peak ({mm['size']}^2, {mm['threads']} thr): "
        + ", ".join(f"{p} {v / 1e9:.1f} GFLOP/s" for p, v in mm["peak_per_s"].items())
    )
    for s in result["strategies"]:
        f, bf = s["flops"], s["best_full"]
        verdict = "met" if s["goal_met"] else "missed"
        lines.append(
            f"{s['strategy']}: full/bare {s['ratio']:.3f} (goal >= {s['goal_ratio']}: {verdict}); "
            f"{f['full_per_step'] / result['batch_size'] / 1e9:.2f} GFLOP/image; full "
            f"{f['full_per_s'] / 1e9:.1f} GFLOP/s = {100 * f['full_share_of_peak']:.1f}% and "
            f"bare {f['bare_per_s'] / 1e9:.1f} GFLOP/s = {100 * f['bare_share_of_peak']:.1f}% "
            f"of the {bf['precision']} peak"
        )
    return lines


def strategies_to_measure(
    params: Params, explicit: Sequence[str] | None, overrides: Sequence[str]
) -> tuple[str, ...]:
    """``--strategies`` when given; else ``train.strategy`` when ``--set`` names it; else
    ``finetune`` and ``distill+replay``."""
    from cssl_core.config import apply_overrides

    if explicit:
        return tuple(explicit)
    if "strategy" in apply_overrides({}, list(overrides)).get("train", {}):
        return (params.train.strategy,)
    return DEFAULT_STRATEGIES


def run_from_args(params: Params, args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark for the options of :func:`benchmarks.cli.add_train_arguments`;
    progress lines go to stderr."""
    from benchmarks.cli import progress

    return run_train_benchmark(
        params,
        strategies_to_measure(params, args.strategies, args.set or ()),
        sweep=args.sweep,
        steps=args.steps,
        budget_s=args.budget,
        warmup=args.warmup,
        batch_size=args.batch_size,
        precisions=args.precisions,
        channels_last=args.channels_last,
        threads=args.threads,
        num_frames=args.frames,
        matmul_size=args.matmul_size,
        device=args.device,
        progress=progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.train``: the same as ``cssl bench train``."""
    from benchmarks.cli import main as bench_main

    return bench_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
