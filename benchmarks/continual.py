"""Benchmark: does continual refresh stay close to full retraining at a fraction of the cost?

For every strategy (``finetune``, ``replay``, ``distill``, ``distill+replay``, ``joint``) and
every seed, the periods of one dataset (:mod:`benchmarks.datasets`) run in stream order through
:func:`cssl_core.period.run_stream` -- :func:`cssl_core.period.run_period`, the function the
product's refresh flow and DVC stages call, in a loop -- with the previous period's model as
parent and the replay memory of the previous period (updated after every period, whatever the
strategy, as the product does). Every strategy gets the same backbone, schedule, steps per
period and seed; ``joint`` retrains from scratch on all periods so far with ``t`` times the
steps, exactly as the product does (that is its cost).

Measured per run:

* accuracy matrices ``R`` (kNN and linear probe, :func:`cssl_core.period.evaluate_model`):
  after period ``t`` the model is scored on periods ``1..t+1`` (``bench.eval_scope: next``;
  ``all`` scores every period), so ``R`` holds the lower triangle plus the superdiagonal that
  forward transfer reads; a randomly initialised model of the same seed gives FWT's baseline;
* average accuracy, forgetting (Chaudhry et al. 2018), BWT and FWT (Lopez-Paz & Ranzato 2017)
  from :class:`cssl_core.evaluation.metrics.AccuracyMatrix`;
* backward compatibility (Shen et al. 2020, BCT,
  :func:`cssl_core.evaluation.evaluate.compatibility_top1`):
  the final model's features of every period's eval frames query a gallery of every period's
  reference frames embedded by the period-1 model, against the period-1 model querying
  its own gallery;
* cost: cumulative training wall seconds (:attr:`TrainResult.wall_seconds`, the optimisation
  loop only) and estimated FLOPs, one training step counted with
  :class:`torch.utils.flop_counter.FlopCounterMode` (forward and backward, teacher included)
  times the steps run. Step cost does not depend on the data, so it is counted once for the
  first period and once for a later one per strategy.

Period 1 does not depend on the strategy: it trains as plain SimCLR from the seed's
initialisation for all of them (no parent, no memory; ``joint`` has no history yet,
:meth:`cssl_core.learn.strategy.StrategySpec.for_period`), and its replay memory depends only
on the replay settings, so it is run and evaluated once per seed and its cost is charged to
every strategy.

Goals checked (means over seeds, on ``gate.metric``): ``distill+replay`` average accuracy at
least ``finetune``'s + 5 points; its forgetting at most half of ``finetune``'s; its average
accuracy within 3 points of ``joint`` at no more than 40% of ``joint``'s cumulative FLOPs.
Each is reported as measured pass/miss; presets are sized for time, never tuned on the eval
splits.

Run it with ``python -m benchmarks.continual --dataset cifar10 --out DIR`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from benchmarks.cli import PRESETS, PRESETS_DIR
from benchmarks.datasets import BenchDataset, build_dataset, parse_dataset
from cssl_core.config import (
    DEFAULT_PARAMS_FILE,
    ConfigError,
    Params,
    apply_overrides,
    params_from_dict,
)
from cssl_core.data.shard import Shard
from cssl_core.data.storage import atomic_path, atomic_write_json, atomic_write_text
from cssl_core.evaluation.intervals import Interval, accuracy_interval, cluster_totals
from cssl_core.evaluation.metrics import AccuracyMatrix
from cssl_core.evaluation.outcomes import FrameOutcomes, Metric
from cssl_core.learn.strategy import STRATEGY_NAMES

STRATEGIES: tuple[str, ...] = STRATEGY_NAMES
METRICS: tuple[Metric, ...] = ("knn", "linear")
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
CANDIDATE, LOWER, UPPER = "distill+replay", "finetune", "joint"
GOAL_GAIN = 0.05
"""Average-accuracy gain over ``finetune`` the candidate must reach (5 points)."""
GOAL_FORGETTING_RATIO = 0.5
"""The candidate's forgetting must be at most this fraction of ``finetune``'s."""
GOAL_JOINT_GAP = 0.03
"""The candidate may be at most this far below ``joint``'s average accuracy (3 points)."""
GOAL_COMPUTE_RATIO = 0.4
"""...at no more than this fraction of ``joint``'s cumulative estimated FLOPs."""
GOAL_CELL_HALF_WIDTH = 0.03
"""Widest 95% interval half-width allowed for any accuracy in R."""

Log = Callable[[str], None]


class BenchError(ValueError):
    """A benchmark option is invalid (one line, says what to change)."""


class BenchConfig(BaseModel):
    """The ``bench:`` section of a preset (not part of ``params.yaml``): dataset sizes and
    evaluation scope. Override with ``--set bench.KEY=VALUE``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    train_frames_per_period: int | None = Field(
        None, ge=1, description="cap on train frames per CIFAR period (stratified by class)"
    )
    eval_frames_per_period: int | None = Field(
        None, ge=1, description="cap on eval (test) frames per CIFAR period"
    )
    data_seed: int = Field(0, description="seed of the dataset split and caps (not the runs)")
    eval_scope: Literal["next", "all"] = Field(
        "next", description="after period t score periods 1..t+1 (next) or every period (all)"
    )
    compat_frames_per_period: int = Field(
        500, ge=1, description="reference and eval frames per period in the compatibility test"
    )


@dataclass(frozen=True)
class BenchSetup:
    """Everything one benchmark invocation needs (what the command line parses into)."""

    dataset: str
    out: Path
    strategies: tuple[str, ...] = STRATEGIES
    seeds: tuple[int, ...] = (0,)
    periods: int | None = None
    preset: str = "default"
    period_order: tuple[str, ...] | None = None
    params_path: Path | None = None
    overrides: tuple[str, ...] = ()


# -- configuration -----------------------------------------------------------------------


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` merged into ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def preset_path(name: str) -> Path:
    """``presets/<name>.yaml`` in the repository."""
    if name not in PRESETS:
        raise BenchError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS_DIR / f"{name}.yaml"


def resolve_config(
    preset: str, params_path: Path | None = None, overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], BenchConfig]:
    """The params tree (``params.yaml`` < preset < ``--set``) and the ``bench:`` section.

    The base is ``params_path``, else ``./params.yaml`` when present, else the embedded
    defaults. ``--set bench.KEY=V`` goes to :class:`BenchConfig`, anything else to params.
    The tree is validated here (so a bad key fails before any work); its ``periods`` are
    replaced by the dataset's periods later.
    """
    if params_path is None and Path(DEFAULT_PARAMS_FILE).is_file():
        params_path = Path(DEFAULT_PARAMS_FILE)
    base = _read_yaml(params_path, "params file") if params_path is not None else {}
    layer = _read_yaml(preset_path(preset), "preset")
    bench_tree = layer.pop("bench", {}) or {}
    tree = deep_merge(base, layer)
    bench_sets = [o[len("bench.") :] for o in overrides if o.startswith("bench.")]
    param_sets = [o for o in overrides if not o.startswith("bench.")]
    tree = apply_overrides(tree, param_sets)
    params_from_dict(tree, f"preset {preset}")
    try:
        bench = BenchConfig.model_validate(apply_overrides(bench_tree, bench_sets))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"bench.{where}: {first['msg']}") from None
    return tree, bench


def params_for(tree: Mapping[str, Any], periods: Sequence[str]) -> Params:
    """Validate ``tree`` with its ``periods`` set to the dataset's chain."""
    chained = dict(tree)
    chained["periods"] = {
        p: {"previous": periods[k - 1] if k else ""} for k, p in enumerate(periods)
    }
    return params_from_dict(chained, "benchmark params")


def with_run(params: Params, strategy: str, seed: int) -> Params:
    """``params`` for one run: ``train.strategy`` and ``train.seed`` set, re-validated."""
    tree = params.model_dump(mode="json")
    tree["train"]["strategy"] = strategy
    tree["train"]["seed"] = seed
    return params_from_dict(tree, f"run {strategy} seed {seed}")


# -- one run -----------------------------------------------------------------------------


@dataclass
class PeriodRecord:
    """What training one period cost and produced (``memory_frames``: the replay memory the
    period trained with; ``weights_sha256`` and ``memory_fingerprint``: the model and replay
    memory it produced, comparable with the flow's registry tags and the DVC outputs)."""

    period: str
    steps: int
    train_wall_s: float
    period_wall_s: float
    period_cpu_s: float
    images_per_second: float
    final_loss: float
    flops_per_step: float
    memory_frames: int
    eval_wall_s: float
    weights_sha256: str = ""
    memory_fingerprint: str = ""

    @property
    def flops(self) -> float:
        return self.flops_per_step * self.steps


@dataclass
class Run:
    """One strategy and seed: its accuracy matrices, compatibility and cost."""

    strategy: str
    seed: int
    R: dict[Metric, AccuracyMatrix]
    periods: list[PeriodRecord] = field(default_factory=list)
    compatibility: dict[str, float] = field(default_factory=dict)
    outcomes: dict[tuple[str, str], FrameOutcomes] = field(default_factory=dict)
    """Per-frame results behind each cell ``R[row][col]``: ``(row, col) -> outcomes``."""

    def metrics(self, baseline: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """Final-row metrics of both accuracy matrices plus cumulative cost."""
        out: dict[str, float] = {}
        for m, R in self.R.items():
            out[f"avg_acc_{m}"] = R.average_accuracy()
            out[f"forgetting_{m}"] = R.forgetting()
            out[f"bwt_{m}"] = R.bwt()
            out[f"fwt_{m}"] = R.fwt({p: baseline[p][m] for p in R.periods})
            if len(R.periods) > 1:
                out[f"next_{m}"] = R.average_next_period_accuracy()
        out["compat_new_vs_old"] = self.compatibility["new_vs_old"]
        out["compat_old_vs_old"] = self.compatibility["old_vs_old"]
        out["train_wall_s"] = sum(p.train_wall_s for p in self.periods)
        out["period_wall_s"] = sum(p.period_wall_s for p in self.periods)
        out["period_cpu_s"] = sum(p.period_cpu_s for p in self.periods)
        out["eval_wall_s"] = sum(p.eval_wall_s for p in self.periods)
        out["train_steps"] = float(sum(p.steps for p in self.periods))
        out["est_flops"] = sum(p.flops for p in self.periods)
        return out

    def to_dict(self, baseline: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "seed": self.seed,
            "metrics": self.metrics(baseline),
            "R": {m: R.to_dict() for m, R in self.R.items()},
            "compatibility": self.compatibility,
            "periods": [{**vars(p), "flops": p.flops} for p in self.periods],
        }


def count_step_flops(inputs: Any, device: Any = None) -> float:
    """FLOPs of one training step of this period, counted on a throwaway one-step run.

    Trains ``inputs`` (:class:`~cssl_core.period.PeriodInputs`) with ``train.steps=1``
    through :func:`~cssl_core.period.train_period` under ``FlopCounterMode`` (matmuls and
    convolutions, forward and backward; the frozen teacher's forward for the distill
    strategies and ``compat.mode: align``; no memory update, no adapter fit) and divides by
    the steps it ran (``joint`` runs ``t`` steps per ``steps``).
    """

    from torch.utils.flop_counter import FlopCounterMode

    from cssl_core.period import train_period

    params = inputs.params
    update: dict[str, Any] = {"train": params.train.model_copy(update={"steps": 1})}
    if params.compat.mode == "adapter":  # fitted once after training: a period's cost, not a step's
        update["compat"] = params.compat.model_copy(update={"mode": "none"})
    one = params.model_copy(update=update)
    one_step = dataclasses.replace(inputs, params=one, checkpoint_dir=None)
    with FlopCounterMode(display=False) as counter:
        train_period(one_step, device=device)
    return counter.get_total_flops() / one_step.steps


@dataclass
class SeedContext:
    """What every strategy of one seed shares: eval sets, period 1, the compat gallery."""

    seed: int
    eval_sets: dict[str, Any]
    baseline: dict[str, dict[str, float]]
    first: dict[str, Any] | None = None
    gallery: dict[str, Any] | None = None


def eval_periods(periods: Sequence[str], t: int, scope: str) -> list[str]:
    """Periods scored after training period ``t`` (0-based): ``1..t+1`` or all."""
    return list(periods) if scope == "all" else list(periods[: t + 2])


def run_strategy(
    params: Params,
    shards: Sequence[Shard],
    ctx: SeedContext,
    bench: BenchConfig,
    flops_cache: dict[tuple[str, bool], float],
    log: Log,
    device: Any = None,
) -> Run:
    """Train every period with ``params.train.strategy`` and score it (see module docs).

    The periods run through :func:`cssl_core.period.run_stream`, the product's period loop
    (model and replay memory of every period, whatever the strategy). Training runs on
    ``device`` (default CPU); models come back on the CPU, where
    :func:`~cssl_core.period.evaluate_model` extracts features.
    """
    from cssl_core.memory.replay import ReplayMemory
    from cssl_core.period import PeriodInputs, evaluate_model, run_stream

    strategy = params.train.strategy
    names = [s.period for s in shards]
    R = {m: AccuracyMatrix(names) for m in METRICS}
    run = Run(strategy, ctx.seed, R)
    first = ctx.first["result"] if ctx.first is not None else None
    stream = run_stream(params, shards, first=first, device=device)
    memory = ReplayMemory.empty(params.replay.capacity)
    parent = first_model = None
    for t, shard in enumerate(shards):
        period = shard.period
        key = ("*" if t == 0 else strategy, t > 0)
        if key not in flops_cache:
            inputs = PeriodInputs(
                params=params,
                period=period,
                shard=shard,
                memory=memory,
                parent=parent,
                history=tuple(shards[:t]),
            )
            flops_cache[key] = count_step_flops(inputs, device)
        t0, c0 = time.perf_counter(), time.process_time()
        result = next(stream)
        if t == 0 and ctx.first is not None:
            record, scores = copy.copy(ctx.first["record"]), ctx.first["scores"]
        else:
            period_wall, period_cpu = time.perf_counter() - t0, time.process_time() - c0
            t0 = time.perf_counter()
            wanted = eval_periods(names, t, bench.eval_scope)
            scores = evaluate_model(result.model, {p: ctx.eval_sets[p] for p in wanted}, params)
            record = PeriodRecord(
                period=period,
                steps=result.train.steps,
                train_wall_s=result.train.wall_seconds,
                period_wall_s=period_wall,
                period_cpu_s=period_cpu,
                images_per_second=result.train.images_per_second,
                final_loss=result.train.final_loss,
                flops_per_step=flops_cache[key],
                memory_frames=len(memory),
                eval_wall_s=time.perf_counter() - t0,
                weights_sha256=result.model.state_fingerprint(),
                memory_fingerprint=result.memory.fingerprint,
            )
            if t == 0:
                ctx.first = {"result": result, "record": record, "scores": scores}
        for p, s in scores.items():
            for m in METRICS:
                R[m].set(period, p, float(getattr(s, m)))
            if s.frames is not None:
                run.outcomes[(period, p)] = s.frames
        run.periods.append(record)
        log(
            f"  {strategy} seed {ctx.seed} {period}: {record.steps} steps "
            f"{record.train_wall_s:.1f}s train, {record.eval_wall_s:.1f}s eval, "
            f"kNN avg {R['knn'].average_accuracy(period):.3f}"
        )
        if t == 0:
            first_model = result.model
        parent, memory = result.model, result.memory
    run.compatibility = compatibility(first_model, parent, ctx, params, bench)
    return run


def compatibility(
    old: Any, new: Any, ctx: SeedContext, params: Params, bench: BenchConfig
) -> dict[str, float]:
    """BCT test: ``M(new, old)`` and ``M(old, old)`` over every period's frames.

    Gallery: up to ``bench.compat_frames_per_period`` labelled reference (train) frames of
    each period, embedded by ``old`` (the period-1 model). Queries: as many eval frames of
    each period, embedded by ``new`` (the final model) and by ``old``.
    """
    from cssl_core.evaluation.evaluate import compatibility_top1, encode_labels, extract_features

    size, cap = params.model.input_size, bench.compat_frames_per_period
    if ctx.gallery is None:
        g_img, g_lab, q_img, q_lab = [], [], [], []
        for es in ctx.eval_sets.values():
            g = [(i, y) for i, y in zip(es.train_images, es.train_labels, strict=True) if y][:cap]
            q = [(i, y) for i, y in zip(es.test_images, es.test_labels, strict=True) if y][:cap]
            g_img += [i for i, _ in g]
            g_lab += [y for _, y in g]
            q_img += [i for i, _ in q]
            q_lab += [y for _, y in q]
        codes, _ = encode_labels([*g_lab, *q_lab])
        g_old = extract_features(old, g_img, size)
        q_old = extract_features(old, q_img, size)
        yg, yq = codes[: len(g_lab)], codes[len(g_lab) :]
        ctx.gallery = {
            "g_old": g_old,
            "q_old": q_old,
            "q_img": q_img,
            "yg": yg,
            "yq": yq,
            "old_vs_old": compatibility_top1(q_old, g_old, yq, yg),
        }
    gal = ctx.gallery
    q_new = gal["q_old"] if new is old else extract_features(new, gal["q_img"], size)
    new_vs_old = compatibility_top1(q_new, gal["g_old"], gal["yq"], gal["yg"])
    return {
        "new_vs_old": new_vs_old,
        "old_vs_old": gal["old_vs_old"],
        "gallery_frames": float(len(gal["yg"])),
        "query_frames": float(len(gal["yq"])),
    }


# -- the whole benchmark -----------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model, cores, threads, library versions, load and date: what a timing depends on."""
    import timm
    import torch
    import torchvision

    from cssl_core.learn.trainer import resolve_precision

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    bf16 = resolve_precision("auto", torch.device("cpu")) is not None
    return {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": bf16,
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": list(os.getloadavg()),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
    }


def run_benchmark(setup: BenchSetup, log: Log = lambda _: None) -> dict[str, Any]:
    """Run every strategy x seed on one dataset; write the results into ``setup.out``.

    Returns the ``results.json`` content. Raises :class:`BenchError`, ``ConfigError`` or
    ``DatasetError`` with a one-line message on bad input, before any training.
    """
    import torch

    unknown = [s for s in setup.strategies if s not in STRATEGIES]
    if unknown or not setup.strategies:
        raise BenchError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if len(set(setup.strategies)) != len(setup.strategies) or not setup.seeds:
        raise BenchError("--strategies must not repeat and --seeds needs at least one seed")
    spec = parse_dataset(setup.dataset)
    tree, bench = resolve_config(setup.preset, setup.params_path, setup.overrides)
    base = params_for(tree, ["p01"])
    threads = torch.get_num_threads()
    if base.train.num_threads:
        torch.set_num_threads(base.train.num_threads)
    try:
        return _run_all(setup, spec, tree, bench, base, log)
    finally:
        torch.set_num_threads(threads)


def _run_all(
    setup: BenchSetup,
    spec: Any,
    tree: dict[str, Any],
    bench: BenchConfig,
    base: Params,
    log: Log,
) -> dict[str, Any]:
    import torch

    from cssl_core.period import eval_sets_for, evaluate_model, new_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(setup.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    machine["train_device"] = str(device)
    t0 = time.perf_counter()
    datasets: dict[int, BenchDataset] = {}
    for seed in setup.seeds:
        # The stream is simulated per seed (another seed, another stream); other datasets
        # are the same data for every seed.
        per_seed = spec.kind == "stream"
        if not per_seed and datasets:
            datasets[seed] = next(iter(datasets.values()))
            continue
        root = out / "data" / (f"seed{seed}" if per_seed else "")
        log(f"building dataset {spec.label} under {root}")
        datasets[seed] = build_dataset(
            spec,
            root,
            simulate=base.simulate.model_copy(update={"seed": seed}) if per_seed else base.simulate,
            ingest_cfg=base.ingest,
            num_periods=setup.periods,
            period_order=setup.period_order,
            train_cap=bench.train_frames_per_period,
            eval_cap=bench.eval_frames_per_period,
            seed=bench.data_seed,
        )
    data_wall = time.perf_counter() - t0
    data = datasets[setup.seeds[0]]
    params = params_for(tree, data.periods)
    log(
        f"periods {', '.join(data.periods)} ({data_wall:.1f}s); strategies "
        f"{', '.join(setup.strategies)}; seeds {', '.join(map(str, setup.seeds))}"
    )
    runs: list[Run] = []
    baselines: dict[int, dict[str, dict[str, float]]] = {}
    flops_cache: dict[tuple[str, bool], float] = {}
    started = time.perf_counter()
    for seed in setup.seeds:
        shards = datasets[seed].shards
        seeded = with_run(params, setup.strategies[0], seed)
        eval_sets = eval_sets_for(shards, seeded)
        random_scores = evaluate_model(new_model(seeded), eval_sets, seeded)
        baselines[seed] = {
            p: {m: float(getattr(s, m)) for m in METRICS} for p, s in random_scores.items()
        }
        ctx = SeedContext(seed, eval_sets, baselines[seed])
        for strategy in setup.strategies:
            log(f"{strategy} seed {seed} ({time.perf_counter() - started:.0f}s elapsed)")
            run = run_strategy(
                with_run(params, strategy, seed), shards, ctx, bench, flops_cache, log, device
            )
            runs.append(run)
            stem = out / "runs" / f"{_slug(strategy)}_seed{seed}"
            _write_json(stem.with_suffix(".json"), run.to_dict(baselines[seed]))
            write_outcomes(stem.with_name(stem.name + "_outcomes.parquet"), run)
    results = assemble_results(setup, datasets, params, bench, machine, runs, baselines, data_wall)
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["machine"]["bench_wall_s"] = time.perf_counter() - started + data_wall
    write_outputs(out, results, runs)
    return results


def _slug(strategy: str) -> str:
    return strategy.replace("+", "-")


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {
        "mean": float(arr.mean()),
        "std": std,
        "n": int(arr.size),
        "values": [float(v) for v in arr],
    }


def _shard_info(data: BenchDataset) -> dict[str, Any]:
    keys = ("num_rows", "splits", "categories", "fingerprint", "duplicates_dropped")
    return {s.period: {k: s.manifest[k] for k in keys} for s in data.shards}


# -- paired comparisons (same seed, same data, same eval frames) ---------------------------

Stratum = tuple[np.ndarray, np.ndarray, np.ndarray]
"""``(correct_a, correct_b, clusters)`` of two models on one eval set (frame by frame)."""


def stratified_difference(
    strata: Sequence[Stratum],
    *,
    offset: float = 0.0,
    negate: bool = False,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    r"""The mean over eval sets of a paired accuracy difference, with its cluster-bootstrap
    interval:

    .. math:: \hat\Delta = \frac{1}{S} \sum_{s=1}^{S} (\hat a^A_s - \hat a^B_s)

    (``offset - \hat\Delta`` with ``negate``). Each eval set ``s`` (a period of one seed) is
    a stratum: a replicate draws its clusters with replacement, on their own per stratum,
    and scores both models on the same draw (percentile interval, ``scipy.stats.bootstrap``).
    Pooling the seeds' eval sets this way gives the eval-sampling uncertainty of the
    difference for the trained models at hand; the spread across seeds is reported beside it.
    """
    from scipy import stats

    totals = [cluster_totals(clusters, a, b) for a, b, clusters in strata]
    diffs = [t.hits[0] - t.hits[1] for t in totals]
    sign = -1.0 if negate else 1.0
    per_set = [d.sum() / t.n_frames for d, t in zip(diffs, totals, strict=True)]
    estimate = offset + sign * float(np.mean(per_set))
    n_clusters = sum(t.n_clusters for t in totals)
    n_frames = sum(t.n_frames for t in totals)
    if any(t.n_clusters < 2 for t in totals):
        return Interval(estimate, math.nan, math.nan, confidence, n_clusters, n_frames)

    def statistic(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
        per = [
            d[i].sum(axis=axis) / t.frames[i].sum(axis=axis)
            for d, t, i in zip(diffs, totals, idx, strict=True)
        ]
        return offset + sign * np.mean(per, axis=0)

    result = stats.bootstrap(
        tuple(np.arange(t.n_clusters) for t in totals),
        statistic,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        batch=max(1, 2_000_000 // n_clusters),
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return Interval(estimate, float(ci.low), float(ci.high), confidence, n_clusters, n_frames)


def _final_cells(run: Run) -> list[tuple[str, str]]:
    last = run.R["knn"].periods[-1]
    return [(last, p) for p in run.R["knn"].periods]


def paired_comparisons(
    runs: Sequence[Run],
    strategies: Sequence[str],
    reference: str = LOWER,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every strategy against ``reference`` (``finetune``), paired by seed and eval frame
    (over the seeds both were run with).

    Per strategy and metric (kNN, linear): the difference in final average accuracy, in
    forgetting (the best earlier accuracies ``b_j`` taken as measured, as constants, so only
    the final row is resampled) and in average next-period accuracy ``R[j-1][j]``; each with
    its pooled paired cluster-bootstrap interval (:func:`stratified_difference`, one stratum
    per seed and period) and the per-seed differences (their spread is the run-to-run
    variation the bootstrap does not see). Plus the ratio of cumulative compute (estimated
    FLOPs and measured train wall seconds) to the reference's, per seed.
    """
    by = {(r.strategy, r.seed): r for r in runs}
    seeds = sorted({r.seed for r in runs})
    if reference not in strategies:
        return {}
    out: dict[str, Any] = {}
    boot = {"n_resamples": n_resamples, "seed": seed}
    for strategy in strategies:
        if strategy == reference:
            continue
        shared = [k for k in seeds if (strategy, k) in by and (reference, k) in by]
        pairs = [(by[(strategy, k)], by[(reference, k)]) for k in shared]
        if not pairs or any(not a.outcomes or not b.outcomes for a, b in pairs):
            continue
        entry: dict[str, Any] = {}
        for m in METRICS:
            entry[m] = _metric_differences(pairs, m, boot)
        entry["compute"] = {
            key: mean_std([_cost(a, key) / max(_cost(b, key), 1e-12) for a, b in pairs])
            for key in ("est_flops", "train_wall_s")
        }
        out[strategy] = entry
    return out


def _cost(run: Run, key: str) -> float:
    """Cumulative ``est_flops`` or ``train_wall_s`` of a run."""
    if key == "est_flops":
        return float(sum(p.flops for p in run.periods))
    return float(sum(p.train_wall_s for p in run.periods))


def _metric_differences(
    pairs: Sequence[tuple[Run, Run | None]], m: Metric, boot: Mapping[str, Any]
) -> dict[str, Any]:
    """Average accuracy, forgetting and next-period accuracy of ``a`` minus ``b`` for each
    ``(a, b)`` pair of runs of one seed, pooled over the pairs (:func:`stratified_difference`)
    and per seed. ``b`` ``None``: ``a``'s own values (a reference that is always wrong and
    forgot nothing), so the interval is that of the strategy's metric itself."""

    def strata(cells_of: Callable[[Run], list[tuple[str, str]]]) -> list[list[Stratum]]:
        per_seed = []
        for a, b in pairs:
            rows = []
            for cell in cells_of(a):
                fa = a.outcomes[cell]
                if b is None:
                    other = np.zeros(len(fa.frame_ids), dtype=bool)
                else:
                    fb = b.outcomes[cell]
                    fa.check_paired(fb, f"{a.strategy} and {b.strategy} on {cell}")
                    other = fb.correct(m)
                rows.append((fa.correct(m), other, np.asarray(fa.clusters)))
            per_seed.append(rows)
        return per_seed

    def report(per_seed: list[list[Stratum]], offsets: list[float], negate: bool) -> dict:
        pooled = stratified_difference(
            [s for rows in per_seed for s in rows],
            offset=float(np.mean(offsets)),
            negate=negate,
            **boot,
        )
        seeds = [
            stratified_difference(rows, offset=o, negate=negate, **boot).estimate
            for rows, o in zip(per_seed, offsets, strict=True)
        ]
        return {"pooled": pooled.to_dict(), "per_seed": mean_std(seeds)}

    out: dict[str, Any] = {"avg_acc": report(strata(_final_cells), [0.0] * len(pairs), False)}
    periods = pairs[0][0].R[m].periods
    if len(periods) > 1:
        last = periods[-1]
        earlier = [(last, p) for p in periods[:-1]]
        offsets = []
        for a, b in pairs:
            ba = a.R[m].best_earlier()
            bb = b.R[m].best_earlier() if b is not None else dict.fromkeys(ba, 0.0)
            offsets.append(float(np.mean([ba[p] - bb[p] for p in periods[:-1]])))
        out["forgetting"] = report(strata(lambda _r: earlier), offsets, True)
        nxt = [(periods[j - 1], periods[j]) for j in range(1, len(periods))]
        out["next"] = report(strata(lambda _r: nxt), [0.0] * len(pairs), False)
    return out


def strategy_intervals(
    runs: Sequence[Run], strategies: Sequence[str], *, n_resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Per strategy and metric: final average accuracy, forgetting and average next-period
    accuracy, the mean over seeds with its 95% cluster-bootstrap interval (eval clips
    resampled within each period of each seed; the trained models held fixed) and the
    per-seed values' mean ± std (the run-to-run spread the bootstrap does not see)."""
    boot = {"n_resamples": n_resamples, "seed": seed}
    out: dict[str, Any] = {}
    for strategy in strategies:
        mine = sorted((r for r in runs if r.strategy == strategy), key=lambda r: r.seed)
        if mine and all(r.outcomes for r in mine):
            pairs: list[tuple[Run, Run | None]] = [(r, None) for r in mine]
            out[strategy] = {m: _metric_differences(pairs, m, boot) for m in METRICS}
    return out


def cell_intervals(
    runs: Sequence[Run], *, n_resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """The 95% cluster-bootstrap interval of every cell of every run's R (both metrics):
    ``runs[strategy][seed][metric][row][col]`` and the widest half-width over all of them."""
    table: dict[str, Any] = {}
    widest: dict[str, Any] = {"half_width": 0.0, "where": None}
    for run in runs:
        for m in METRICS:
            for (row, col), frames in run.outcomes.items():
                iv = accuracy_interval(
                    frames.correct(m), frames.clusters, n_resamples=n_resamples, seed=seed
                )
                cell = table.setdefault(run.strategy, {}).setdefault(str(run.seed), {})
                cell.setdefault(m, {}).setdefault(row, {})[col] = iv.to_dict()
                if iv.defined and iv.half_width > widest["half_width"]:
                    widest = {
                        "half_width": iv.half_width,
                        "where": f"{run.strategy} seed {run.seed} {m} R[{row}][{col}] = {iv}",
                    }
    return {"runs": table, "widest": widest}


def write_outcomes(path: Path, run: Run) -> Path:
    """Every cell's per-frame outcomes of one run as Parquet (``row``, ``col`` and the
    columns of :data:`cssl_core.evaluation.outcomes.OUTCOME_SCHEMA`), so intervals can be
    recomputed from the files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for (row, col), frames in run.outcomes.items():
        t = frames.to_table()
        n = t.num_rows
        t = t.add_column(0, "col", pa.array([col] * n)).add_column(0, "row", pa.array([row] * n))
        tables.append(t)
    if tables:
        with atomic_path(path) as tmp:
            pq.write_table(pa.concat_tables(tables), tmp)
    return path


def load_run(path: Path) -> Run:
    """A run back from its files: ``runs/<strategy>_seed<k>.json`` and, beside it,
    ``..._outcomes.parquet`` (:func:`write_outcomes`), so intervals and paired differences
    can be recomputed, or runs of separate invocations (same data, same seeds) compared."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    data = _read_json(path)
    R = {m: AccuracyMatrix.from_dict(data["R"][m]) for m in METRICS}
    fields = {f.name for f in dataclasses.fields(PeriodRecord)}
    periods = [PeriodRecord(**{k: v for k, v in p.items() if k in fields}) for p in data["periods"]]
    run = Run(data["strategy"], int(data["seed"]), R, periods, dict(data["compatibility"]))
    table_path = path.with_name(path.stem + "_outcomes.parquet")
    if table_path.is_file():
        table = pq.read_table(table_path)
        cells = zip(table.column("row").to_pylist(), table.column("col").to_pylist(), strict=True)
        for row, col in dict.fromkeys(cells):
            mask = pc.and_(pc.equal(table["row"], row), pc.equal(table["col"], col))
            run.outcomes[(row, col)] = FrameOutcomes.from_table(table.filter(mask))
    return run


def _read_json_file(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BenchError(f"{path}: cannot read it ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise BenchError(f"{path}: not a file of bench continual")
    return data


def _read_json(path: Path) -> dict[str, Any]:
    """A run file (``runs/<strategy>_seed<k>.json``)."""
    data = _read_json_file(path)
    if "R" not in data or "strategy" not in data:
        raise BenchError(f"{path}: not a run file of bench continual")
    return data


def assemble_results(
    setup: BenchSetup,
    datasets: Mapping[int, BenchDataset],
    params: Params,
    bench: BenchConfig,
    machine: dict[str, Any],
    runs: Sequence[Run],
    baselines: Mapping[int, Mapping[str, Mapping[str, float]]],
    data_wall: float,
) -> dict[str, Any]:
    """Everything measured, as one JSON-safe dict (see ``results.json``)."""
    data = datasets[setup.seeds[0]]
    run_dicts = [r.to_dict(baselines[r.seed]) for r in runs]
    metric = params.gate.metric
    pooled = pooled_results(
        runs,
        run_dicts,
        setup.strategies,
        metric,
        n_resamples=params.gate.bootstrap_samples,
        seed=params.gate.bootstrap_seed,
    )
    return {
        "benchmark": "continual",
        "schema_version": 1,
        "command": {
            "dataset": setup.dataset,
            "strategies": list(setup.strategies),
            "periods": setup.periods,
            "seeds": list(setup.seeds),
            "preset": setup.preset,
            "period_order": list(setup.period_order) if setup.period_order else None,
            "params": str(setup.params_path) if setup.params_path else None,
            "set": list(setup.overrides),
            "out": str(setup.out),
        },
        "machine": machine,
        "dataset": {
            "name": data.spec.label,
            "periods": data.periods,
            "description": data.description,
            "build_wall_s": data_wall,
            "shards": _shard_info(data),
            "shards_by_seed": {str(seed): _shard_info(d) for seed, d in datasets.items()},
        },
        "config": {
            "params": params.model_dump(mode="json"),
            "config_hash": params.config_hash(),
            "bench": bench.model_dump(mode="json"),
            "primary_metric": metric,
        },
        "random_baseline": {str(seed): b for seed, b in baselines.items()},
        "runs": run_dicts,
        **pooled,
    }


def pooled_results(
    runs: Sequence[Run],
    run_dicts: Sequence[Mapping[str, Any]],
    strategies: Sequence[str],
    metric: str,
    *,
    n_resamples: int,
    seed: int,
) -> dict[str, Any]:
    """``summary`` (mean ± std over seeds of each run's metrics), ``intervals``,
    ``comparisons``, ``cell_intervals`` and ``goals`` of a set of runs."""
    summary: dict[str, dict[str, Any]] = {}
    for strategy in strategies:
        mine = [d["metrics"] for d in run_dicts if d["strategy"] == strategy]
        summary[strategy] = {k: mean_std([m[k] for m in mine]) for k in mine[0]}
    comparisons = paired_comparisons(runs, strategies, n_resamples=n_resamples, seed=seed)
    cells = cell_intervals(runs, n_resamples=n_resamples, seed=seed)
    return {
        "summary": summary,
        "intervals": strategy_intervals(runs, strategies, n_resamples=n_resamples, seed=seed),
        "comparisons": comparisons,
        "cell_intervals": cells,
        "goals": check_goals(summary, metric, comparisons, cells),
    }


def combine(dirs: Sequence[Path], out: Path) -> dict[str, Any]:
    """Pool the runs of separate ``bench continual`` invocations (e.g. one process per seed)
    into one ``results.json`` / ``results.md`` under ``out``, with no training: the
    per-strategy intervals, the paired differences and the goals over every run.

    Each directory holds ``runs/<strategy>_seed<k>.json`` and their outcomes; at least one
    holds a ``results.json`` (dataset, configuration, machine: taken from the first). Every
    ``results.json`` must have the same dataset, periods and configuration hash, no
    ``(strategy, seed)`` may repeat, and a seed's period 1 must be the same model in every run
    (the runs really share it). Each run keeps the metrics it was written with (FWT from its
    own run's random baseline).
    """
    found = [Path(d) / RESULTS_JSON for d in dirs if (Path(d) / RESULTS_JSON).is_file()]
    if not found:
        raise BenchError(f"combine needs a {RESULTS_JSON} in at least one of {list(dirs)}")
    heads = [_read_json_file(f) for f in found]
    base = heads[0]
    for head, f in zip(heads, found, strict=True):
        same = (
            head["dataset"]["name"] == base["dataset"]["name"]
            and head["dataset"]["periods"] == base["dataset"]["periods"]
            and head["config"]["config_hash"] == base["config"]["config_hash"]
        )
        if not same:
            raise BenchError(f"{f}: another dataset, periods or configuration than {found[0]}")
    runs: list[Run] = []
    run_dicts: list[dict[str, Any]] = []
    for d in dirs:
        for f in sorted((Path(d) / "runs").glob("*_seed*.json")):
            runs.append(load_run(f))
            run_dicts.append(_read_json(f))
    keys = [(r.strategy, r.seed) for r in runs]
    if not runs or len(set(keys)) != len(keys):
        raise BenchError(f"combine needs runs and no (strategy, seed) twice; got {keys}")
    for k in {r.seed for r in runs}:
        firsts = {r.periods[0].weights_sha256 for r in runs if r.seed == k}
        if len(firsts) > 1:
            raise BenchError(f"seed {k}: period 1 differs between runs (not the same data/code)")
    strategies = [s for s in STRATEGIES if s in {r.strategy for r in runs}]
    order = sorted(range(len(runs)), key=lambda i: (runs[i].seed, strategies.index(keys[i][0])))
    runs = [runs[i] for i in order]
    run_dicts = [run_dicts[i] for i in order]
    params = base["config"]["params"]
    pooled = pooled_results(
        runs,
        run_dicts,
        strategies,
        base["config"]["primary_metric"],
        n_resamples=params["gate"]["bootstrap_samples"],
        seed=params["gate"]["bootstrap_seed"],
    )
    baselines = {k: v for head in heads for k, v in head["random_baseline"].items()}
    results = {
        **base,
        "command": {
            **base["command"],
            "seeds": sorted({r.seed for r in runs}),
            "strategies": strategies,
            "out": str(out),
            "combined_from": [str(d) for d in dirs],
        },
        "random_baseline": baselines,
        "runs": run_dicts,
        **pooled,
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / RESULTS_JSON, results)
    atomic_write_text(out / RESULTS_MD, format_markdown(results))
    return results


def check_goals(
    summary: Mapping[str, Mapping[str, Any]],
    metric: str,
    comparisons: Mapping[str, Any] | None = None,
    cells: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Issue 13's goals for ``distill+replay`` against ``finetune`` and ``joint``: pass or miss.

    With ``comparisons`` (:func:`paired_comparisons`) accuracy against ``finetune`` is judged
    on the paired difference and its pooled cluster-bootstrap interval (above zero; the
    stretch goal +5 points on the estimate), and next-period accuracy must not be shown below
    finetune's; without them, on the means over seeds. Forgetting, ``joint`` and compute are
    judged on the means over seeds, precision on the widest 95% interval of any cell of R
    (``cells``, :func:`cell_intervals`). A goal whose reference strategy was not run is
    reported as ``not measured``.
    """

    def mean(strategy: str, key: str) -> float:
        return float(summary[strategy][key]["mean"])

    goals: list[dict[str, Any]] = []

    def add(
        name: str,
        needs: str,
        measured: Callable[[], float],
        target: Callable[[], float],
        higher_is_better: bool,
        unit: str,
        interval: Mapping[str, Any] | None = None,
        strict: bool = False,
    ) -> None:
        if CANDIDATE not in summary or needs not in summary:
            goals.append(
                {
                    "goal": name,
                    "status": "not measured",
                    "reason": f"needs strategies {CANDIDATE} and {needs}",
                }
            )
            return
        value, bound = measured(), target()
        if value is None or not math.isfinite(value):
            goals.append(
                {
                    "goal": name,
                    "status": "not measured",
                    "reason": "no interval (fewer than 2 eval clusters in a period)",
                }
            )
            return
        if higher_is_better:
            ok = value > bound if strict else value >= bound
        else:
            ok = value < bound if strict else value <= bound
        goal = {
            "goal": name,
            "measured": value,
            "target": bound,
            "unit": unit,
            "comparison": (">" if higher_is_better else "<") + ("" if strict else "="),
            "status": "pass" if ok else "miss",
        }
        if interval is not None:
            goal["interval"] = dict(interval)
        goals.append(goal)

    acc, forg = f"avg_acc_{metric}", f"forgetting_{metric}"
    paired = (comparisons or {}).get(CANDIDATE, {}).get(metric, {})
    if "avg_acc" in paired:
        pooled = paired["avg_acc"]["pooled"]
        add(
            f"average accuracy ({metric}) above finetune's: paired 95% interval's lower bound > 0",
            LOWER,
            lambda: pooled["low"],
            lambda: 0.0,
            True,
            "fraction",
            pooled,
            strict=True,
        )
        add(
            f"stretch: average accuracy ({metric}) >= finetune's + {GOAL_GAIN * 100:.0f} "
            "points (paired difference)",
            LOWER,
            lambda: pooled["estimate"],
            lambda: GOAL_GAIN,
            True,
            "fraction",
            pooled,
        )
    else:
        add(
            f"average accuracy ({metric}) >= finetune + {GOAL_GAIN * 100:.0f} points",
            LOWER,
            lambda: mean(CANDIDATE, acc),
            lambda: mean(LOWER, acc) + GOAL_GAIN,
            True,
            "fraction",
        )
    add(
        f"forgetting ({metric}) <= {GOAL_FORGETTING_RATIO:g} x finetune's",
        LOWER,
        lambda: mean(CANDIDATE, forg),
        lambda: GOAL_FORGETTING_RATIO * mean(LOWER, forg),
        False,
        "fraction",
    )
    if CANDIDATE in summary and LOWER in summary and mean(LOWER, forg) <= 0:
        goals[-1]["note"] = "finetune forgot nothing here, so this goal cannot separate them"
    if "next" in paired:
        nxt = paired["next"]["pooled"]
        add(
            f"next-period accuracy ({metric}) not below finetune's: paired 95% interval's "
            "upper bound >= 0",
            LOWER,
            lambda: nxt["high"],
            lambda: 0.0,
            True,
            "fraction",
            nxt,
        )
    add(
        f"average accuracy ({metric}) within {GOAL_JOINT_GAP * 100:.0f} points of joint",
        UPPER,
        lambda: mean(CANDIDATE, acc),
        lambda: mean(UPPER, acc) - GOAL_JOINT_GAP,
        True,
        "fraction",
    )
    add(
        f"cumulative compute <= {GOAL_COMPUTE_RATIO:.0%} of joint's (est. FLOPs)",
        UPPER,
        lambda: mean(CANDIDATE, "est_flops") / mean(UPPER, "est_flops"),
        lambda: GOAL_COMPUTE_RATIO,
        False,
        "ratio",
    )
    add(
        f"cumulative train wall <= {GOAL_COMPUTE_RATIO:.0%} of joint's (measured)",
        UPPER,
        lambda: mean(CANDIDATE, "train_wall_s") / mean(UPPER, "train_wall_s"),
        lambda: GOAL_COMPUTE_RATIO,
        False,
        "ratio",
    )
    widest = (cells or {}).get("widest", {})
    if widest.get("where"):
        goals.append(
            {
                "goal": "every accuracy in R (every run, both metrics): 95% interval <= "
                f"±{GOAL_CELL_HALF_WIDTH:.2f}",
                "measured": widest["half_width"],
                "target": GOAL_CELL_HALF_WIDTH,
                "unit": "fraction",
                "comparison": "<=",
                "status": "pass" if widest["half_width"] <= GOAL_CELL_HALF_WIDTH else "miss",
                "note": f"widest: {widest['where']}",
            }
        )
    return goals


# -- outputs -----------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, allow_nan=False)


def _pm(stat: Mapping[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _signed(iv: Mapping[str, Any], scale: float = 100.0) -> str:
    """A difference in points with its exact bounds: ``+1.2 [-0.8, +3.1]``."""
    if iv.get("low") is None or iv.get("high") is None:
        return f"{iv['estimate'] * scale:+.1f} [no interval]"
    return f"{iv['estimate'] * scale:+.1f} [{iv['low'] * scale:+.1f}, {iv['high'] * scale:+.1f}]"


def _comparison_lines(comparisons: Mapping[str, Any], metric: str, n_seeds: int) -> list[str]:
    """The paired differences against finetune, as a Markdown table."""
    if not comparisons:
        return []
    lines = [
        "",
        f"### Paired differences against {LOWER} (same seed, same data, same eval frames)",
        "",
        "Δ in points, strategy minus finetune: the estimate pooled over seeds and periods "
        "with its 95% cluster-bootstrap interval (eval clips resampled within each period of "
        f"each seed, both models on the same draw), then the mean ± std of the {n_seeds} "
        "per-seed differences (training-run spread, which the bootstrap does not include). "
        f"Forgetting and next-period on {metric}. Compute: ratio to finetune's cumulative "
        "estimated FLOPs.",
        "",
        "| strategy | Δ avg kNN | Δ avg linear | Δ forgetting | Δ next-period | "
        "compute / finetune |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def cell(entry: Mapping[str, Any] | None) -> str:
        if not entry:
            return ""
        return f"{_signed(entry['pooled'])}; {_pm(entry['per_seed'])}"

    for strategy, c in comparisons.items():
        lines.append(
            f"| {strategy} | {cell(c['knn']['avg_acc'])} | {cell(c['linear']['avg_acc'])} | "
            f"{cell(c[metric].get('forgetting'))} | {cell(c[metric].get('next'))} | "
            f"{_pm(c['compute']['est_flops'], 1.0, 2)} |"
        )
    return lines


def _interval_lines(intervals: Mapping[str, Any], metric: str, n_seeds: int) -> list[str]:
    """Each strategy's metrics with their 95% intervals, as a Markdown table."""
    if not intervals:
        return []
    lines = [
        "",
        "### Each strategy with its 95% interval",
        "",
        "In points: the mean over seeds with its 95% cluster-bootstrap interval (eval clips "
        f"resampled within each period of each seed, models held fixed), then the {n_seeds} "
        f"per-seed values' mean ± std. Forgetting and next-period on {metric}.",
        "",
        "| strategy | avg kNN | avg linear | forgetting | next-period |",
        "|---|---:|---:|---:|---:|",
    ]

    def cell(entry: Mapping[str, Any] | None) -> str:
        if not entry:
            return ""
        iv = entry["pooled"]
        if iv.get("low") is None or iv.get("high") is None:
            return f"{iv['estimate'] * 100:.1f} [no interval]"
        return (
            f"{iv['estimate'] * 100:.1f} [{iv['low'] * 100:.1f}, {iv['high'] * 100:.1f}]; "
            f"{_pm(entry['per_seed'])}"
        )

    for strategy, c in intervals.items():
        lines.append(
            f"| {strategy} | {cell(c['knn']['avg_acc'])} | {cell(c['linear']['avg_acc'])} | "
            f"{cell(c[metric].get('forgetting'))} | {cell(c[metric].get('next'))} |"
        )
    return lines


def _matrix_with_intervals(R: AccuracyMatrix, cells: Mapping[str, Any]) -> str:
    """R as Markdown with each cell's 95% half-width: ``0.612 ±0.027``."""
    names = list(R.periods)
    lines = ["| after \\ on | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in names:
        out = []
        for col in names:
            iv = cells.get(row, {}).get(col)
            if iv is None:
                out.append("")
            elif iv.get("low") is None:
                out.append(f"{iv['estimate']:.3f}")
            else:
                half = max(iv["estimate"] - iv["low"], iv["high"] - iv["estimate"])
                out.append(f"{iv['estimate']:.3f} ±{half:.3f}")
        lines.append(f"| {row} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def format_markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: the table per strategy, the goals and the configuration, in Markdown."""
    cfg, ds, mach = results["config"], results["dataset"], results["machine"]
    p, metric = cfg["params"], cfg["primary_metric"]
    seeds = results["command"]["seeds"]
    lines = [
        "# Continual refresh benchmark",
        "",
        f"## Dataset: {ds['name']}",
        "",
        f"{ds['description'].get('protocol', '')}; periods {', '.join(ds['periods'])}; "
        f"train/eval frames per period: "
        + ", ".join(
            f"{k} {v['splits'].get('train', 0)}/{v['splits'].get('eval', 0)}"
            for k, v in ds["shards"].items()
        )
        + ".",
        "",
        f"Preset `{results['command']['preset']}`: {p['model']['backbone']} at "
        f"{p['model']['input_size']} px (small stem: {p['model']['small_input_stem']}), "
        f"{p['train']['steps']} steps/period (joint: t x), batch {p['train']['batch_size']}, "
        f"{p['train']['optimizer']} lr {p['train']['lr']}, precision {p['train']['precision']}, "
        f"replay {p['replay']['selection']} capacity {p['replay']['capacity']}, "
        f"distill {p['train']['distill_loss']}; seeds {', '.join(map(str, seeds))}.",
        "",
        f"Mean ± std over {len(seeds)} seed(s). Accuracies, forgetting, BWT and FWT in points "
        f"(%); forgetting, BWT and FWT on {metric} accuracy. Compatibility: top-1 retrieval "
        "of the final model's queries in the period-1 model's gallery (BCT), with the "
        "period-1 model's own score (old/old) beside it.",
        "",
        "| strategy | final avg kNN | final avg linear | forgetting | next-period | BWT | FWT | "
        "compatibility new/old (old/old) | train wall s | est. TFLOPs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for strategy, s in results["summary"].items():
        nxt = s.get(f"next_{metric}")
        lines.append(
            f"| {strategy} | {_pm(s['avg_acc_knn'])} | {_pm(s['avg_acc_linear'])} | "
            f"{_pm(s[f'forgetting_{metric}'])} | {_pm(nxt) if nxt else ''} | "
            f"{_pm(s[f'bwt_{metric}'])} | "
            f"{_pm(s[f'fwt_{metric}'])} | {_pm(s['compat_new_vs_old'])} "
            f"({s['compat_old_vs_old']['mean'] * 100:.1f}) | "
            f"{_pm(s['train_wall_s'], 1.0, 0)} | {_pm(s['est_flops'], 1e-12, 2)} |"
        )
    lines += _interval_lines(results.get("intervals", {}), metric, len(seeds))
    lines += _comparison_lines(results.get("comparisons", {}), metric, len(seeds))
    lines += [
        "",
        f"### Goals: {CANDIDATE} vs {LOWER} and {UPPER} (measured, not tuned)",
        "",
        "| goal | measured | target | result |",
        "|---|---:|---:|---|",
    ]
    for g in results["goals"]:
        if g["status"] == "not measured":
            lines.append(f"| {g['goal']} | | | not measured ({g['reason']}) |")
            continue
        scale = 100.0 if g["unit"] == "fraction" else 1.0
        fmt = ".1f" if g["unit"] == "fraction" else ".2f"
        note = f" ({g['note']})" if "note" in g else ""
        shown = f"{g['measured'] * scale:{fmt}}"
        if "interval" in g:
            shown = f"{_signed(g['interval'])} (Δ [95% interval], points)"
        lines.append(
            f"| {g['goal']} | {shown} | "
            f"{g['comparison']} {g['target'] * scale:{fmt}} | {g['status']}{note} |"
        )
    lines += [
        "",
        "Presets are sized for the time budget; no setting was chosen by looking at the eval "
        "splits, which are CIFAR-10's test images for the CIFAR datasets.",
        "",
        f"### Accuracy matrices R[i][j] ({metric}, seed {seeds[0]}; ± is the 95% "
        "cluster-bootstrap half-width)",
        "",
    ]
    cells = results.get("cell_intervals", {}).get("runs", {})
    for run in results["runs"]:
        if run["seed"] == seeds[0]:
            R = AccuracyMatrix.from_dict(run["R"][metric])
            mine = cells.get(run["strategy"], {}).get(str(run["seed"]), {}).get(metric)
            table = _matrix_with_intervals(R, mine) if mine else R.to_markdown()
            lines += [f"**{run['strategy']}**", "", table, ""]
    lines += [
        "### Machine",
        "",
        f"{mach['cpu_model']}, {mach['cpu_cores']} cores ({mach['torch_threads']} torch "
        f"threads), native bf16: {mach['cpu_native_bf16']}, CUDA: {mach['cuda']}; torch "
        f"{mach['torch']}, timm {mach['timm']}, Python {mach['python']}; {mach['date']}; load "
        f"average at start {mach['load_average_start'][0]:.1f}, end "
        f"{mach.get('load_average_end', [math.nan])[0]:.1f}; benchmark wall "
        f"{mach.get('bench_wall_s', math.nan):.0f} s; commit {mach['git_commit']}.",
        "",
    ]
    return "\n".join(lines)


def write_outputs(out: Path, results: Mapping[str, Any], runs: Sequence[Run]) -> list[Path]:
    """``results.json``, ``results.md`` and the figures of the first seed."""
    from cssl_core.evaluation.plots import plot_accuracy_curves, plot_accuracy_matrix

    _write_json(out / RESULTS_JSON, results)
    atomic_write_text(out / RESULTS_MD, format_markdown(results))
    written = [out / RESULTS_JSON, out / RESULTS_MD]
    first_seed = results["command"]["seeds"][0]
    mine = [r for r in runs if r.seed == first_seed]
    for run in mine:
        name = _slug(run.strategy)
        for m, R in run.R.items():
            written.append(
                plot_accuracy_matrix(
                    R,
                    out / f"matrix_{name}_{m}.png",
                    title=f"{run.strategy}: R[i][j] ({m}, seed {first_seed})",
                )
            )
        written.append(
            plot_accuracy_curves(
                run.R["knn"],
                out / f"curves_{name}_knn.png",
                title=f"{run.strategy}: kNN accuracy per period (seed {first_seed})",
            )
        )
    written.append(plot_average_accuracy(mine, out / "average_accuracy.png"))
    return written


def plot_average_accuracy(runs: Sequence[Run], path: Path) -> Path:
    """Average kNN accuracy over the periods seen so far, after each period, per strategy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for run in runs:
        R = run.R["knn"]
        ax.plot(
            range(len(R.periods)),
            [R.average_accuracy(p) for p in R.periods],
            marker="o",
            label=run.strategy,
        )
    names = runs[0].R["knn"].periods if runs else ()
    ax.set_xticks(range(len(names)), labels=names)
    ax.set_xlabel("trained through period")
    ax.set_ylabel("average kNN accuracy on periods seen")
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# -- command line ------------------------------------------------------------------------


def setup_from_args(args: argparse.Namespace) -> BenchSetup:
    params = getattr(args, "params", None)
    return BenchSetup(
        dataset=args.dataset,
        out=Path(args.out),
        strategies=tuple(args.strategies) if args.strategies else STRATEGIES,
        seeds=tuple(args.seeds),
        periods=args.periods,
        preset=args.preset,
        period_order=tuple(args.period_order) if args.period_order else None,
        params_path=Path(params) if params else None,
        overrides=tuple(getattr(args, "set", None) or ()),
    )


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """A few human lines: one per strategy, then the goals."""
    metric = results["config"]["primary_metric"]
    lines = []
    for strategy, s in results["summary"].items():
        lines.append(
            f"{strategy:>15}: avg {metric} {_pm(s[f'avg_acc_{metric}'])}, forgetting "
            f"{_pm(s[f'forgetting_{metric}'])}, train {s['train_wall_s']['mean']:.0f}s, "
            f"{s['est_flops']['mean'] / 1e12:.2f} TFLOPs"
        )
    for strategy, c in results.get("comparisons", {}).items():
        paired = c[metric]["avg_acc"]["pooled"]
        lines.append(f"{strategy:>15}: avg {metric} minus {LOWER}'s {_signed(paired)} points")
    for g in results["goals"]:
        lines.append(f"goal {g['status']}: {g['goal']}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.continual``, the same as ``cssl bench continual``: exit 0 when
    the benchmark ran (goals may miss), 1 on an error (one line on stderr), 2 on bad usage."""
    from benchmarks.cli import main as bench_main

    return bench_main(["continual", *(sys.argv[1:] if argv is None else argv)])


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed arguments (``cssl bench continual`` calls this)."""
    from benchmarks.cli import emit_results, log

    if getattr(args, "combine", None):
        results = combine(args.combine, Path(args.out))
    elif not args.dataset:
        raise BenchError("--dataset is required (or --combine DIR ... to pool earlier runs)")
    else:
        results = run_benchmark(setup_from_args(args), log)
    emit_results(args, results, summary_lines(results), Path(args.out) / RESULTS_MD)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
