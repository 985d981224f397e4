"""Benchmark: does continual refresh stay close to full retraining at a fraction of the cost?

For every strategy (``finetune``, ``replay``, ``distill``, ``distill+replay``, ``joint``) and
every seed, the periods of one dataset (:mod:`benchmarks.datasets`) are trained in stream order
with :func:`cssl_core.period.train_period` -- the function the product's refresh flow and DVC
stages call -- with the previous period's model as parent and the replay memory updated by
:func:`cssl_core.period.next_memory`. Every strategy gets the same backbone, schedule, steps
per period and seed; ``joint`` retrains from scratch on all periods so far with ``t`` times
the steps, exactly as the product does (that is its cost).

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

Period 1 does not depend on the strategy: ``train_period`` trains it as plain SimCLR from the
seed's initialisation for all of them (no parent, no memory; ``joint`` has no history yet), so
it is trained and evaluated once per seed and its cost is charged to every strategy.

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
from benchmarks.datasets import BenchDataset, DatasetError, build_dataset, parse_dataset
from cssl_core.config import (
    DEFAULT_PARAMS_FILE,
    ConfigError,
    Params,
    apply_overrides,
    params_from_dict,
)
from cssl_core.data.shard import Shard
from cssl_core.data.storage import atomic_path, atomic_write_json, atomic_write_text
from cssl_core.evaluation.metrics import AccuracyMatrix

STRATEGIES: tuple[str, ...] = ("finetune", "replay", "distill", "distill+replay", "joint")
METRICS = ("knn", "linear")
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
    """What training one period cost and produced."""

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

    @property
    def flops(self) -> float:
        return self.flops_per_step * self.steps


@dataclass
class Run:
    """One strategy and seed: its accuracy matrices, compatibility and cost."""

    strategy: str
    seed: int
    R: dict[str, AccuracyMatrix]
    periods: list[PeriodRecord] = field(default_factory=list)
    compatibility: dict[str, float] = field(default_factory=dict)

    def metrics(self, baseline: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """Final-row metrics of both accuracy matrices plus cumulative cost."""
        out: dict[str, float] = {}
        for m, R in self.R.items():
            out[f"avg_acc_{m}"] = R.average_accuracy()
            out[f"forgetting_{m}"] = R.forgetting()
            out[f"bwt_{m}"] = R.bwt()
            out[f"fwt_{m}"] = R.fwt({p: baseline[p][m] for p in R.periods})
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


def count_step_flops(
    params: Params,
    period: str,
    shard: Shard,
    parent: Any,
    memory: Any,
    history: Sequence[Shard],
    device: Any = None,
) -> float:
    """FLOPs of one training step of this period, counted on a throwaway one-step run.

    Runs :func:`train_period` with ``train.steps=1`` under ``FlopCounterMode`` (matmuls and
    convolutions, forward and backward; the frozen teacher's forward for the distill
    strategies) and divides by the steps it ran (``joint`` runs ``t`` steps per ``steps``).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from cssl_core.learn.trainer import steps_for
    from cssl_core.period import train_period

    one = params.model_copy(update={"train": params.train.model_copy(update={"steps": 1})})
    steps = steps_for(params.train.strategy, 1, params.period_index(period))
    with FlopCounterMode(display=False) as counter:
        train_period(one, period, shard, parent, memory, history=history, device=device)
    return counter.get_total_flops() / steps


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

    Training runs on ``device`` (default CPU); models are scored on the CPU, where
    :func:`~cssl_core.period.evaluate_model` extracts features.
    """
    from cssl_core.learn.trainer import USES_REPLAY
    from cssl_core.memory.replay import ReplayMemory
    from cssl_core.period import evaluate_model, next_memory, train_period

    strategy = params.train.strategy
    names = [s.period for s in shards]
    R = {m: AccuracyMatrix(names) for m in METRICS}
    run = Run(strategy, ctx.seed, R)
    memory = ReplayMemory.empty(params.replay.capacity)
    parent = first_model = None
    for t, shard in enumerate(shards):
        period, history = shard.period, list(shards[:t])
        key = ("*" if t == 0 else strategy, t > 0)
        if key not in flops_cache:
            flops_cache[key] = count_step_flops(
                params, period, shard, parent, memory, history, device
            )
        if t == 0 and ctx.first is not None:
            model, record, scores = (ctx.first[k] for k in ("model", "record", "scores"))
            record = copy.copy(record)
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            model, result = train_period(
                params, period, shard, parent, memory, history=history, device=device
            )
            model.to("cpu")
            period_wall, period_cpu = time.perf_counter() - t0, time.process_time() - c0
            t0 = time.perf_counter()
            wanted = eval_periods(names, t, bench.eval_scope)
            scores = evaluate_model(model, {p: ctx.eval_sets[p] for p in wanted}, params)
            record = PeriodRecord(
                period=period,
                steps=result.steps,
                train_wall_s=result.wall_seconds,
                period_wall_s=period_wall,
                period_cpu_s=period_cpu,
                images_per_second=result.images_per_second,
                final_loss=result.final_loss,
                flops_per_step=flops_cache[key],
                memory_frames=len(memory),
                eval_wall_s=time.perf_counter() - t0,
            )
            if t == 0:
                ctx.first = {"model": model, "record": record, "scores": scores}
        for p, s in scores.items():
            for m in METRICS:
                R[m].set(period, p, float(getattr(s, m)))
        run.periods.append(record)
        log(
            f"  {strategy} seed {ctx.seed} {period}: {record.steps} steps "
            f"{record.train_wall_s:.1f}s train, {record.eval_wall_s:.1f}s eval, "
            f"kNN avg {R['knn'].average_accuracy(period):.3f}"
        )
        if strategy in USES_REPLAY and t < len(shards) - 1:
            memory = next_memory(params, memory, shard, model, period)
        if t == 0:
            first_model = model
        parent = model
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
    log(f"building dataset {spec.label} under {out / 'data'}")
    t0 = time.perf_counter()
    data = build_dataset(
        spec,
        out / "data",
        simulate=base.simulate,
        ingest_cfg=base.ingest,
        num_periods=setup.periods,
        period_order=setup.period_order,
        train_cap=bench.train_frames_per_period,
        eval_cap=bench.eval_frames_per_period,
        seed=bench.data_seed,
    )
    data_wall = time.perf_counter() - t0
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
        seeded = with_run(params, setup.strategies[0], seed)
        eval_sets = eval_sets_for(data.shards, seeded)
        random_scores = evaluate_model(new_model(seeded), eval_sets, seeded)
        baselines[seed] = {
            p: {m: float(getattr(s, m)) for m in METRICS} for p, s in random_scores.items()
        }
        ctx = SeedContext(seed, eval_sets, baselines[seed])
        for strategy in setup.strategies:
            log(f"{strategy} seed {seed} ({time.perf_counter() - started:.0f}s elapsed)")
            run = run_strategy(
                with_run(params, strategy, seed), data.shards, ctx, bench, flops_cache, log, device
            )
            runs.append(run)
            _write_json(
                out / "runs" / f"{_slug(strategy)}_seed{seed}.json", run.to_dict(baselines[seed])
            )
    results = assemble_results(setup, data, params, bench, machine, runs, baselines, data_wall)
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


def assemble_results(
    setup: BenchSetup,
    data: BenchDataset,
    params: Params,
    bench: BenchConfig,
    machine: dict[str, Any],
    runs: Sequence[Run],
    baselines: Mapping[int, Mapping[str, Mapping[str, float]]],
    data_wall: float,
) -> dict[str, Any]:
    """Everything measured, as one JSON-safe dict (see ``results.json``)."""
    run_dicts = [r.to_dict(baselines[r.seed]) for r in runs]
    summary: dict[str, dict[str, Any]] = {}
    for strategy in setup.strategies:
        mine = [d["metrics"] for d in run_dicts if d["strategy"] == strategy]
        summary[strategy] = {k: mean_std([m[k] for m in mine]) for k in mine[0]}
    metric = params.gate.metric
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
            "shards": {
                s.period: {
                    k: s.manifest[k]
                    for k in (
                        "num_rows",
                        "splits",
                        "categories",
                        "fingerprint",
                        "duplicates_dropped",
                    )
                }
                for s in data.shards
            },
        },
        "config": {
            "params": params.model_dump(mode="json"),
            "config_hash": params.config_hash(),
            "bench": bench.model_dump(mode="json"),
            "primary_metric": metric,
        },
        "random_baseline": {str(seed): b for seed, b in baselines.items()},
        "runs": run_dicts,
        "summary": summary,
        "goals": check_goals(summary, metric),
    }


def check_goals(summary: Mapping[str, Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    """``distill+replay`` against ``finetune`` and ``joint`` (means over seeds): pass or miss.

    A goal whose reference strategy was not run is reported as ``not measured``.
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
        ok = value >= bound if higher_is_better else value <= bound
        goals.append(
            {
                "goal": name,
                "measured": value,
                "target": bound,
                "unit": unit,
                "comparison": ">=" if higher_is_better else "<=",
                "status": "pass" if ok else "miss",
            }
        )

    acc, forg = f"avg_acc_{metric}", f"forgetting_{metric}"
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
    if CANDIDATE in summary and LOWER in summary and mean(LOWER, forg) <= 0:
        goals[1]["note"] = "finetune forgot nothing here, so this goal cannot separate them"
    return goals


# -- outputs -----------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, allow_nan=False)


def _pm(stat: Mapping[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


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
        "| strategy | final avg kNN | final avg linear | forgetting | BWT | FWT | "
        "compatibility new/old (old/old) | train wall s | est. TFLOPs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for strategy, s in results["summary"].items():
        lines.append(
            f"| {strategy} | {_pm(s['avg_acc_knn'])} | {_pm(s['avg_acc_linear'])} | "
            f"{_pm(s[f'forgetting_{metric}'])} | {_pm(s[f'bwt_{metric}'])} | "
            f"{_pm(s[f'fwt_{metric}'])} | {_pm(s['compat_new_vs_old'])} "
            f"({s['compat_old_vs_old']['mean'] * 100:.1f}) | "
            f"{_pm(s['train_wall_s'], 1.0, 0)} | {_pm(s['est_flops'], 1e-12, 2)} |"
        )
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
        lines.append(
            f"| {g['goal']} | {g['measured'] * scale:{fmt}} | "
            f"{g['comparison']} {g['target'] * scale:{fmt}} | {g['status']}{note} |"
        )
    lines += [
        "",
        "Presets are sized for the time budget; no setting was chosen by looking at the eval "
        "splits, which are CIFAR-10's test images for the CIFAR datasets.",
        "",
        f"### Accuracy matrices R[i][j] ({metric}, seed {seeds[0]})",
        "",
    ]
    for run in results["runs"]:
        if run["seed"] == seeds[0]:
            R = AccuracyMatrix.from_dict(run["R"][metric])
            lines += [f"**{run['strategy']}**", "", R.to_markdown(), ""]
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

    def log(msg: str) -> None:
        print(f"[{datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)

    try:
        results = run_benchmark(setup_from_args(args), log)
    except (BenchError, ConfigError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in summary_lines(results):
        print(line)
    print(f"results: {Path(args.out) / RESULTS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
