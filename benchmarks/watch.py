"""Stream replay: refresh every period, or only when ``watch`` says so (issue 15's goal).

The stream (``simulate.schedule``, :data:`REPLAY_SCHEDULE`) has static stretches, a sudden
switch and a gradual take-over, so the truth is known:

    p01-p04 static (mix A) | p05 sudden switch to B | p06-p07 static (B)
    | p08-p10 gradual take-over by C in steps of a third

Two policies replay it period by period, each with its own champion, replay memory and
chain of refreshed periods (:func:`replay`, pure orchestration over injected :class:`Work`):

- **always**: every period is refreshed (the monthly cron);
- **watch**: period 1 is refreshed (there is no champion); for each later period the
  product's drift check (:func:`cssl_core.evaluation.drift.drift_check`, ``drift.*``, the
  reference ``drift.reference: champion`` = the shard of the champion's period) and the
  product's decision (:func:`pipelines.triggers.decide_watch`, ``watch.max_age`` and
  ``watch.cooldown`` on a simulated clock: period ``i``'s frames are complete at the end of
  its 30 days, and a refresh starts then) decide whether it is refreshed. A skipped period
  is not part of the chain (its frames never enter the replay memory), as in the flow.

A refresh is the flow's work without the registry (:func:`refresh_period`):
:func:`cssl_core.period.run_period` (train from the champion and memory(t-1), then
memory(t)) on the policy's chain, then the candidate and the champion on every refreshed
period so far and a fresh model on the new one (what the flow's evaluate task does). Every
candidate is promoted (the gate is left out: it would change both policies alike).

Measured (:func:`summarize`):

- refreshes per policy (goal: at least 30% fewer with watch);
- **next-period accuracy**: before a period is refreshed (or skipped), the policy's champion's
  kNN accuracy on its eval split, scored by the product's evaluation
  (:func:`cssl_core.period.evaluate_model`: ``eval.knn_k``, the period's labelled train
  frames as the reference); per period and as the mean over periods 2..N, each with its 95%
  cluster-bootstrap interval over eval streams (:mod:`cssl_core.evaluation.intervals`), and
  per period the paired difference watch - always on the same frames (goal: watch's mean
  inside the always-refresh policy's interval);
- cost: one drift check end to end vs one refresh (train + memory + evaluate), medians over
  the run (goal: at most 5%).

``python -m benchmarks.watch --out DIR --set ...`` (or ``cssl bench watch``); params.yaml's
defaults are the demo size of the issue (resnet18 at 32 px, 1,000 frames per period, 30 steps
of 64); add ``--set train.num_threads=1`` on a shared machine. Simulated shards are reused
from ``DIR/stream``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cssl_core.config import Params, WatchConfig
    from cssl_core.data.shard import Shard
    from cssl_core.evaluation.outcomes import FrameOutcomes, Metric
    from cssl_core.memory.replay import ReplayMemory

REPLAY_SCHEDULE: tuple[dict[str, Any], ...] = (
    {"kind": "static", "periods": 4},
    {"kind": "sudden"},
    {"kind": "static", "periods": 2},
    {"kind": "gradual", "periods": 3},
)
POLICIES = ("always", "watch")
METRIC: Metric = "knn"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
Log = Callable[[str], None]


def replay_params(base: Params, frames_per_period: int | None = None) -> Params:
    """``base`` with the replay stream: periods ``p01..p10`` of :data:`REPLAY_SCHEDULE`."""
    from cssl_core.config import params_from_dict

    tree = base.model_dump(mode="json")
    count = sum(int(r.get("periods", 1)) for r in REPLAY_SCHEDULE)
    names = [f"p{k:02d}" for k in range(1, count + 1)]
    tree["periods"] = {n: {"previous": names[i - 1] if i else ""} for i, n in enumerate(names)}
    tree["simulate"]["schedule"] = list(REPLAY_SCHEDULE)
    if frames_per_period is not None:
        tree["simulate"]["frames_per_period"] = frames_per_period
    return params_from_dict(tree, "watch benchmark")


def truth(params: Params) -> list[str]:
    """What each period is, from the schedule: ``static``, ``sudden`` or ``gradual k/K``."""
    out: list[str] = []
    schedule = params.simulate.schedule
    if isinstance(schedule, str):
        return ["drifting"] * len(params.periods)
    for regime in schedule:
        for k in range(1, regime.periods + 1):
            out.append(regime.kind if regime.kind != "gradual" else f"gradual {k}/{regime.periods}")
    return out[: len(params.periods)]


# -- the replay: two policies over injected work (pure orchestration) ----------------------


@dataclass(frozen=True)
class Refreshed:
    """What one refresh produced and what it cost."""

    model: Any
    memory: Any
    train_seconds: float
    evaluate_seconds: float

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.evaluate_seconds


@dataclass(frozen=True)
class Check:
    """One drift check as the replay needs it."""

    drifted: bool
    mmd2: float
    p_value: float
    summary: str
    seconds: float


@dataclass(frozen=True)
class Work:
    """The heavy steps, injected so the replay logic is testable without models:
    ``refresh(chain, parent, memory)`` refreshes ``chain[-1]``; ``drift(model, period,
    reference_period)`` checks a period against the reference; ``outcomes(model, period)``
    scores a model on a period's eval frames."""

    refresh: Callable[[list[str], Any, Any], Refreshed]
    drift: Callable[[Any, str, str], Check]
    outcomes: Callable[[Any, str], FrameOutcomes]
    empty_memory: Any = None


@dataclass
class PolicyState:
    """One policy's lineage: champion, its period and when it was made, memory, chain."""

    name: str
    champion: Any
    champion_period: str
    champion_time: datetime
    memory: Any
    chain: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, FrameOutcomes] = field(default_factory=dict)

    @property
    def refreshes(self) -> int:
        return len(self.chain)


@dataclass
class Replay:
    """Both policies after the stream, and the costs measured on the way."""

    states: dict[str, PolicyState]
    refresh_costs: list[dict[str, Any]]
    drift_seconds: list[float]


def period_end(start: datetime, length: timedelta, index: int) -> datetime:
    """When period ``index``'s frames are complete (the simulated clock of the decisions)."""
    return start + length * (index + 1)


def replay(
    names: Sequence[str],
    kinds: Sequence[str],
    watch_cfg: WatchConfig,
    work: Work,
    *,
    start: datetime,
    length: timedelta,
    log: Log = lambda _: None,
) -> Replay:
    """Replay ``names`` under both policies (see the module docstring): the first period is
    refreshed once for both; each later period is first scored with each policy's champion
    (next-period accuracy), then refreshed always, or when :func:`decide_watch` says so."""
    from pipelines.triggers import decide_watch

    log(f"refreshing {names[0]} (shared by both policies: there is no champion yet)")
    first = work.refresh([names[0]], None, work.empty_memory)
    refresh_costs = [{"policy": "both", "period": names[0], **_cost(first)}]
    drift_seconds: list[float] = []
    t0 = period_end(start, length, 0)
    states = {
        name: PolicyState(name, first.model, names[0], t0, first.memory, [names[0]])
        for name in POLICIES
    }
    for index, period in enumerate(names[1:], start=1):
        now = period_end(start, length, index)
        for state in states.values():
            outcomes = work.outcomes(state.champion, period)
            state.outcomes[period] = outcomes
            row: dict[str, Any] = {
                "period": period,
                "truth": kinds[index],
                "champion_period": state.champion_period,
                "next_period_accuracy": outcomes.accuracy(METRIC),
            }
            if state.name == "always":
                refresh = True
                row |= {"summary": "refresh (every period)", "triggers": ["calendar"]}
            else:
                check = work.drift(state.champion, period, state.champion_period)
                drift_seconds.append(check.seconds)
                decision = decide_watch(
                    watch_cfg,
                    drifted=check.drifted,
                    drift_summary=check.summary,
                    champion_version=len(state.chain),
                    champion_age=now - state.champion_time,
                    since_last_refresh=now - state.champion_time,
                )
                refresh = decision.refresh
                row |= {
                    "mmd2": check.mmd2,
                    "p_value": check.p_value,
                    "drifted": check.drifted,
                    "triggers": list(decision.triggers),
                    "summary": decision.summary,
                    "reasons": list(decision.reasons),
                }
            row["refreshed"] = refresh
            if refresh:
                chain = [*state.chain, period]
                done = work.refresh(chain, state.champion, state.memory)
                refresh_costs.append({"policy": state.name, "period": period, **_cost(done)})
                state.champion, state.memory, state.chain = done.model, done.memory, chain
                state.champion_period, state.champion_time = period, now
            state.rows.append(row)
            log(
                f"{period} ({kinds[index]}) {state.name}: next-period accuracy "
                f"{row['next_period_accuracy']:.3f}, {row['summary']}"
            )
    return Replay(states, refresh_costs, drift_seconds)


def _cost(done: Refreshed) -> dict[str, float]:
    return {
        "train_seconds": done.train_seconds,
        "evaluate_seconds": done.evaluate_seconds,
        "seconds": done.seconds,
    }


# -- the figures ---------------------------------------------------------------------------


def summarize(
    run: Replay,
    kinds: Sequence[str],
    *,
    bootstrap: int,
    seed: int,
    settings: dict[str, Any] | None = None,
    conditions: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Refresh counts, next-period accuracy with cluster-bootstrap intervals (per period, the
    mean over periods, the paired per-period difference), costs, and the goals."""
    from cssl_core.evaluation.intervals import average_accuracy_interval

    states = run.states
    periods = [r["period"] for r in states["always"].rows]
    accuracy: dict[str, Any] = {}
    for name, s in states.items():
        mean = average_accuracy_interval(
            [(s.outcomes[p].correct(METRIC), s.outcomes[p].clusters) for p in periods],
            n_resamples=bootstrap,
            seed=seed,
        )
        per_period = {
            p: s.outcomes[p].interval(METRIC, n_resamples=bootstrap, seed=seed).to_dict()
            for p in periods
        }
        accuracy[name] = {"mean": mean.to_dict(), "periods": per_period}
    watch, always = states["watch"], states["always"]
    difference = {
        p: watch.outcomes[p]
        .difference(always.outcomes[p], METRIC, n_resamples=bootstrap, seed=seed)
        .to_dict()
        for p in periods
    }
    refresh_s = statistics.median(c["seconds"] for c in run.refresh_costs)
    train_s = statistics.median(c["train_seconds"] for c in run.refresh_costs)
    drift_s = statistics.median(run.drift_seconds) if run.drift_seconds else float("nan")
    counts = {name: s.refreshes for name, s in states.items()}
    fewer = 1 - counts["watch"] / counts["always"]
    always_mean = accuracy["always"]["mean"]
    watch_mean = accuracy["watch"]["mean"]["estimate"]
    return {
        "periods": [always.chain[0], *periods],
        "truth": list(kinds),
        "refreshes": counts,
        "refreshed_periods": {name: list(s.chain) for name, s in states.items()},
        "fewer_refreshes": fewer,
        "next_period_accuracy": accuracy,
        "difference_watch_minus_always": difference,
        "cost": {
            "drift_check_median_s": drift_s,
            "refresh_median_s": refresh_s,
            "train_median_s": train_s,
            "ratio": drift_s / refresh_s,
            "ratio_to_train": drift_s / train_s,
            "drift_checks_s": list(run.drift_seconds),
            "refreshes": run.refresh_costs,
        },
        "goals": {
            "fewer_refreshes_30pct": fewer >= 0.30,
            "accuracy_within_always_interval": always_mean["low"]
            <= watch_mean
            <= always_mean["high"],
            "drift_check_at_most_5pct": drift_s / refresh_s <= 0.05,
        },
        "rows": {name: s.rows for name, s in states.items()},
        "settings": settings or {},
        "conditions": conditions or {},
    }


def markdown(results: dict[str, Any]) -> str:
    """The results as the tables of ``results.md``."""
    acc = results["next_period_accuracy"]
    cost = results["cost"]
    lines = [
        "| policy | refreshes | periods refreshed | next-period kNN accuracy, mean of periods "
        "2..N [95% cluster-bootstrap CI] |",
        "|---|---:|---|---|",
    ]
    for name in POLICIES:
        m = acc[name]["mean"]
        lines.append(
            f"| {name} | {results['refreshes'][name]} | "
            f"{', '.join(results['refreshed_periods'][name])} | "
            f"{m['estimate']:.3f} [{m['low']:.3f}, {m['high']:.3f}] |"
        )
    lines += [
        "",
        f"{results['fewer_refreshes']:.0%} fewer refreshes with watch",
        "",
        "| period | truth | always: served | acc [CI] | watch: served | acc [CI] | "
        "watch - always [CI] | watch's decision | MMD² | p |",
        "|---|---|---|---|---|---|---|---|---:|---:|",
    ]
    for a, w in zip(results["rows"]["always"], results["rows"]["watch"], strict=True):
        p = a["period"]
        ia, iw = acc["always"]["periods"][p], acc["watch"]["periods"][p]
        d = results["difference_watch_minus_always"][p]
        lines.append(
            f"| {p} | {a['truth']} | {a['champion_period']} | {_ci(ia)} | "
            f"{w['champion_period']} | {_ci(iw)} | {_ci(d, sign=True)} | {w['summary']} | "
            f"{w['mmd2']:.4f} | {w['p_value']:.3g} |"
        )
    lines += [
        "",
        f"cost: drift check median {cost['drift_check_median_s']:.1f} s; refresh median "
        f"{cost['refresh_median_s']:.1f} s (train + memory {cost['train_median_s']:.1f} s, "
        f"+ evaluate): {cost['ratio']:.1%} of a refresh ({cost['ratio_to_train']:.1%} of its "
        "training)",
        "",
        "goals: "
        + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in results["goals"].items()),
    ]
    return "\n".join(lines)


def _ci(i: dict[str, Any], sign: bool = False) -> str:
    fmt = "+.3f" if sign else ".3f"
    if i["low"] is None:
        return f"{i['estimate']:{fmt}}"
    return f"{i['estimate']:{fmt}} [{i['low']:{fmt}}, {i['high']:{fmt}}]"


# -- the heavy work: the product's refresh, drift check and evaluation ---------------------


def refresh_period(
    params: Params,
    shards: dict[str, Shard],
    chain: list[str],
    parent: Any,
    memory: ReplayMemory,
) -> Refreshed:
    """The flow's refresh of ``chain[-1]`` without the registry: ``run_period`` on the chain,
    then candidate and champion on every period of the chain and a fresh model on the new
    one (the flow's evaluate task)."""
    from cssl_core import period as core
    from cssl_core.config import PeriodChain

    period = chain[-1]
    t0 = time.perf_counter()
    inputs = core.PeriodInputs(
        params=params,
        period=period,
        shard=shards[period],
        memory=memory,
        parent=parent,
        history=tuple(shards[p] for p in chain[:-1]),
        chain=PeriodChain(tuple(chain)),
    )
    result = core.run_period(inputs)
    t1 = time.perf_counter()
    sets = core.eval_sets_for([shards[p] for p in chain], params)
    core.evaluate_model(result.model, sets, params)
    if parent is not None:
        core.evaluate_model(parent, sets, params)
    core.evaluate_model(core.new_model(params), {period: sets[period]}, params)
    return Refreshed(result.model, result.memory, t1 - t0, time.perf_counter() - t1)


def product_work(params: Params, shards: dict[str, Shard]) -> Work:
    """The replay's steps as the product runs them on ``shards``."""
    from cssl_core import period as core
    from cssl_core.evaluation.drift import drift_check
    from cssl_core.memory.replay import ReplayMemory

    sets = core.eval_sets_for(list(shards.values()), params)

    def drift(model: Any, period: str, reference: str) -> Check:
        t0 = time.perf_counter()
        result = drift_check(model, shards[period], shards[reference], params.drift)
        seconds = time.perf_counter() - t0
        return Check(result.drifted, result.mmd2, result.p_value, result.summary(), seconds)

    def outcomes(model: Any, period: str) -> FrameOutcomes:
        frames = core.evaluate_model(model, {period: sets[period]}, params)[period].frames
        if frames is None:
            raise ValueError(f"{period}: the evaluation kept no per-frame outcomes")
        return frames

    def refresh(chain: list[str], parent: Any, memory: Any) -> Refreshed:
        return refresh_period(params, shards, chain, parent, memory)

    return Work(refresh, drift, outcomes, ReplayMemory.empty(params.replay.capacity))


def run_replay(out: Path, params: Params, *, bootstrap: int, seed: int, log: Log) -> dict[str, Any]:
    """Simulate the stream, replay it under both policies and summarize (module docstring)."""
    import torch

    from benchmarks.drift import build_stream
    from cssl_core.data.simulate import EPOCH, PERIOD_LENGTH

    if params.train.num_threads:  # evaluation and drift checks too, not only training
        torch.set_num_threads(params.train.num_threads)
    started = time.perf_counter()
    load_start = os.getloadavg()
    kinds = truth(params)
    stream = build_stream(out / "stream", params, log)
    shards = {s.period: s for s in stream}
    run = replay(
        params.period_names,
        kinds,
        params.watch,
        product_work(params, shards),
        start=EPOCH,
        length=PERIOD_LENGTH,
        log=log,
    )
    settings = {
        "model": params.model.model_dump(mode="json"),
        "train": {
            k: getattr(params.train, k)
            for k in ("strategy", "steps", "batch_size", "num_threads", "seed")
        },
        "simulate": params.simulate.model_dump(mode="json"),
        "drift": params.drift.model_dump(mode="json"),
        "watch": params.watch.model_dump(mode="json"),
        "eval": params.eval.model_dump(mode="json"),
        "bootstrap": bootstrap,
        "seed": seed,
    }
    conditions = {
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "cpu": platform.processor() or platform.machine(),
        "avx512_bf16": _cpu_flag("avx512_bf16"),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - started,
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    return summarize(
        run, kinds, bootstrap=bootstrap, seed=seed, settings=settings, conditions=conditions
    )


def _cpu_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed arguments (``cssl bench watch`` calls this)."""
    from benchmarks.cli import emit_results, load_bench_params, log
    from cssl_core.data.storage import atomic_write_json, atomic_write_text

    params = replay_params(load_bench_params(args), args.frames_per_period)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_replay(out, params, bootstrap=args.bootstrap, seed=args.seed, log=log)
    atomic_write_json(out / RESULTS_JSON, results, default=_json_default)
    atomic_write_text(out / RESULTS_MD, markdown(results) + "\n")
    summary = {k: v for k, v in results.items() if k != "rows"}
    emit_results(args, summary, [markdown(results)], out / RESULTS_MD)
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.watch ...`` = ``python -m benchmarks watch ...``."""
    from benchmarks.cli import main as bench_main

    return bench_main(["watch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
