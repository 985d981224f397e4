"""Stream replay: refresh every period, or only when ``watch`` says so (issue 15's goal).

The stream (``simulate.schedule``, :data:`REPLAY_SCHEDULE`) has static stretches, a sudden
switch and a gradual take-over, so the truth is known:

    p01-p04 static (mix A) | p05 sudden switch to B | p06-p07 static (B)
    | p08-p10 gradual take-over by C in steps of a third

Two policies replay it period by period, each with its own champion, replay memory and
chain of refreshed periods:

- **always**: every period is refreshed (the monthly cron);
- **watch**: period 1 is refreshed (there is no champion); for each later period the
  product's drift check (:func:`cssl_core.evaluation.drift.drift_check`, ``drift.*``, the
  reference ``drift.reference: champion`` = the shard of the champion's period) and the
  product's decision (:func:`pipelines.watch.decide_watch`, ``watch.max_age`` and
  ``watch.cooldown`` on a simulated clock: period ``i``'s frames are complete at the end of
  its 30 days, and a refresh starts then) decide whether it is refreshed. A skipped period
  is not part of the chain (its frames never enter the replay memory), as in the flow.

A refresh is the flow's work without the registry: :func:`cssl_core.period.run_period`
(train from the champion and memory(t-1), then memory(t)) on the policy's chain, then the
candidate and the champion on every refreshed period so far and a fresh model on the new
one (what the flow's evaluate task does). Every candidate is promoted (the gate is left out:
it would change both policies alike, and its rules are being changed in WP-E).

Measured:

- refreshes per policy (goal: at least 30% fewer with watch);
- **next-period accuracy**: before a period is refreshed (or skipped), the policy's champion's
  weighted-kNN accuracy on its eval split (the product's kNN: ``eval.knn_k``, the period's
  labelled train frames as the reference); the mean over periods 2..N, with a 95% cluster
  bootstrap interval over eval streams (each period's streams resampled with replacement),
  and the paired difference watch - always on the same resamples (goal: watch's mean inside
  the always-refresh policy's interval);
- cost: one drift check end to end vs one refresh (train + memory + evaluate), medians over
  the run (goal: at most 5%).

``python -m benchmarks.watch --out DIR --set ...`` (or ``cssl bench watch``); the demo size of
the issue is ``--set model.backbone=resnet18 --set model.input_size=32 --set
simulate.size=32 --set simulate.frames_per_period=1000 --set train.steps=30 --set
train.batch_size=64``. Simulated shards are reused from ``DIR/stream``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cssl_core.config import Params
    from cssl_core.data.shard import Shard
    from cssl_core.learn.models import Embedder
    from cssl_core.memory.replay import ReplayMemory

REPLAY_SCHEDULE: tuple[dict[str, Any], ...] = (
    {"kind": "static", "periods": 4},
    {"kind": "sudden"},
    {"kind": "static", "periods": 2},
    {"kind": "gradual", "periods": 3},
)
POLICIES = ("always", "watch")
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


# -- next-period accuracy, per eval frame ------------------------------------------------


@dataclass(frozen=True)
class EvalFrames:
    """One period's eval set as the product builds it, plus each eval frame's stream."""

    period: str
    eval_set: Any  # cssl_core.evaluation.evaluate.EvalSet
    streams: np.ndarray  # the stream of each labelled eval frame (the bootstrap's cluster)


def eval_frames(shard: Shard, params: Params) -> EvalFrames:
    """The period's eval set (:func:`cssl_core.period.eval_sets_for`) and the stream of each
    of its eval frames (the eval set lists them in ``frame_id`` order, labelled ones only)."""
    from cssl_core import period as core

    eval_set = core.eval_sets_for([shard], params)[shard.period]
    meta = shard.read(["frame_id", "stream_id", "category"], split="eval").sort_by("frame_id")
    streams = [
        s
        for s, c in zip(
            meta.column("stream_id").to_pylist(), meta.column("category").to_pylist(), strict=True
        )
        if c is not None
    ]
    if len(streams) != len(eval_set.test_labels):
        raise ValueError(f"{shard.period}: eval frames and streams disagree")
    return EvalFrames(shard.period, eval_set, np.array(streams, dtype=str))


def knn_correct(model: Embedder, frames: EvalFrames, params: Params) -> np.ndarray:
    """Whether the product's weighted kNN (``eval.knn_k``/``knn_temperature``, the period's
    labelled train frames as the reference) gets each eval frame's category right."""
    from cssl_core.evaluation.evaluate import encode_labels, extract_features, knn_predict

    es = frames.eval_set
    codes, classes = encode_labels([*es.train_labels, *es.test_labels])
    n = len(es.train_labels)
    feats = extract_features(model, [*es.train_images, *es.test_images], params.model.input_size)
    preds = knn_predict(
        feats[:n],
        codes[:n],
        feats[n:],
        k=params.eval.knn_k,
        temperature=params.eval.knn_temperature,
        num_classes=len(classes),
    )
    return preds.numpy() == codes[n:]


def cluster_bootstrap(
    outcomes: Sequence[tuple[np.ndarray, np.ndarray]], samples: int, seed: int
) -> np.ndarray:
    r"""Bootstrap replicates of the mean over periods of each period's accuracy, resampling
    each period's clusters (eval streams) with replacement: ``(samples,)``.

    ``outcomes`` is, per period, ``(correct, clusters)`` for every eval frame. In replicate
    ``b`` period ``p``'s clusters get multinomial counts ``w`` and its accuracy is
    :math:`\sum_c w_c\,\mathrm{hits}_c / \sum_c w_c\,n_c`. The same ``seed`` gives the same
    resamples for any ``correct`` on the same clusters, so two policies are compared paired.
    """
    rng = np.random.default_rng(seed)
    total = np.zeros(samples)
    for correct, clusters in outcomes:
        names, idx = np.unique(clusters, return_inverse=True)
        hits = np.bincount(idx, weights=correct.astype(float), minlength=len(names))
        sizes = np.bincount(idx, minlength=len(names)).astype(float)
        weights = rng.multinomial(len(names), np.full(len(names), 1 / len(names)), size=samples)
        total += (weights @ hits) / (weights @ sizes)
    return total / max(1, len(outcomes))


def interval(replicates: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates."""
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(low), float(high)


# -- the policies ------------------------------------------------------------------------


@dataclass
class PolicyState:
    """One policy's lineage: champion, its period and when it was made, memory, chain."""

    name: str
    champion: Embedder
    champion_period: str
    champion_time: datetime
    memory: ReplayMemory
    chain: list[str]
    refreshes: int = 1
    rows: list[dict[str, Any]] = field(default_factory=list)
    correct: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Refreshed:
    model: Embedder
    memory: ReplayMemory
    train_seconds: float
    evaluate_seconds: float

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.evaluate_seconds


def refresh_period(
    params: Params,
    shards: dict[str, Shard],
    chain: list[str],
    parent: Embedder | None,
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


def run_replay(out: Path, params: Params, *, bootstrap: int, seed: int, log: Log) -> dict[str, Any]:
    """Replay the stream under both policies; the figures (see the module docstring)."""
    from benchmarks.drift import build_stream
    from cssl_core.data.simulate import EPOCH, PERIOD_LENGTH
    from cssl_core.evaluation.drift import drift_check
    from cssl_core.memory.replay import ReplayMemory
    from pipelines.triggers import decide_watch

    started = time.perf_counter()
    load_start = os.getloadavg()
    names = params.period_names
    kinds = truth(params)
    stream = build_stream(out / "stream", params, log)
    shards = {s.period: s for s in stream}
    frames = {p: eval_frames(shards[p], params) for p in names}

    def period_end(index: int) -> datetime:
        return EPOCH + PERIOD_LENGTH * (index + 1)

    log(f"refreshing {names[0]} (shared by both policies: there is no champion yet)")
    first = refresh_period(
        params, shards, [names[0]], None, ReplayMemory.empty(params.replay.capacity)
    )
    refresh_costs = [{"policy": "both", "period": names[0], **_cost(first)}]
    drift_costs: list[float] = []
    states = {
        name: PolicyState(name, first.model, names[0], period_end(0), first.memory, [names[0]])
        for name in POLICIES
    }
    for index, period in enumerate(names[1:], start=1):
        now = period_end(index)
        for state in states.values():
            correct = knn_correct(state.champion, frames[period], params)
            state.correct[period] = correct
            row: dict[str, Any] = {
                "period": period,
                "truth": kinds[index],
                "champion_period": state.champion_period,
                "next_period_accuracy": float(correct.mean()),
            }
            if state.name == "always":
                refresh, reasons = True, ["every period is refreshed"]
            else:
                t0 = time.perf_counter()
                result = drift_check(
                    state.champion, shards[period], shards[state.champion_period], params.drift
                )
                drift_costs.append(time.perf_counter() - t0)
                decision = decide_watch(
                    params.watch,
                    drifted=result.drifted,
                    drift_summary=result.summary(),
                    champion_version=len(state.chain),
                    champion_age=now - state.champion_time,
                    since_last_refresh=now - state.champion_time,
                )
                refresh, reasons = decision.refresh, list(decision.reasons)
                row |= {
                    "mmd2": result.mmd2,
                    "p_value": result.p_value,
                    "drifted": result.drifted,
                    "triggers": list(decision.triggers),
                    "summary": decision.summary,
                }
            row |= {"refreshed": refresh, "reasons": reasons}
            if refresh:
                chain = [*state.chain, period]
                done = refresh_period(params, shards, chain, state.champion, state.memory)
                refresh_costs.append({"policy": state.name, "period": period, **_cost(done)})
                state.champion, state.memory, state.chain = done.model, done.memory, chain
                state.champion_period, state.champion_time = period, now
                state.refreshes += 1
            state.rows.append(row)
            log(
                f"{period} ({kinds[index]}) {state.name}: next-period accuracy "
                f"{row['next_period_accuracy']:.3f}, {'refresh' if refresh else 'skip'}"
                + (f" ({row['summary']})" if "summary" in row else "")
            )
    return summarize(
        params,
        states,
        frames,
        refresh_costs,
        drift_costs,
        bootstrap=bootstrap,
        seed=seed,
        conditions={
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "cpu": platform.processor() or platform.machine(),
            "avx512_bf16": _cpu_flag("avx512_bf16"),
            "cpus": os.cpu_count(),
            "wall_seconds": time.perf_counter() - started,
            "finished": datetime.now().isoformat(timespec="seconds"),
        },
    )


def _cost(done: Refreshed) -> dict[str, float]:
    return {
        "train_seconds": done.train_seconds,
        "evaluate_seconds": done.evaluate_seconds,
        "seconds": done.seconds,
    }


def _cpu_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def summarize(
    params: Params,
    states: dict[str, PolicyState],
    frames: dict[str, EvalFrames],
    refresh_costs: list[dict[str, Any]],
    drift_costs: list[float],
    *,
    bootstrap: int,
    seed: int,
    conditions: dict[str, Any],
) -> dict[str, Any]:
    """Refresh counts, next-period accuracy with intervals, costs, and the goals."""
    periods = [r["period"] for r in states["always"].rows]
    replicates = {
        name: cluster_bootstrap(
            [(s.correct[p], frames[p].streams) for p in periods], bootstrap, seed
        )
        for name, s in states.items()
    }
    means = {
        name: float(np.mean([s.correct[p].mean() for p in periods])) for name, s in states.items()
    }
    always_ci = interval(replicates["always"])
    diff = replicates["watch"] - replicates["always"]
    refresh_s = statistics.median(c["seconds"] for c in refresh_costs)
    drift_s = statistics.median(drift_costs) if drift_costs else float("nan")
    counts = {name: s.refreshes for name, s in states.items()}
    fewer = 1 - counts["watch"] / counts["always"]
    return {
        "periods": [states["always"].rows[0]["champion_period"], *periods],
        "truth": truth(params),
        "refreshes": counts,
        "fewer_refreshes": fewer,
        "next_period_accuracy": {
            name: {"mean": means[name], "interval95": list(interval(replicates[name]))}
            for name in states
        },
        "difference_watch_minus_always": {
            "mean": means["watch"] - means["always"],
            "interval95": list(interval(diff)),
        },
        "cost": {
            "drift_check_median_s": drift_s,
            "refresh_median_s": refresh_s,
            "ratio": drift_s / refresh_s,
            "drift_checks": drift_costs,
            "refreshes": refresh_costs,
        },
        "goals": {
            "fewer_refreshes_30pct": fewer >= 0.30,
            "accuracy_within_always_interval": always_ci[0] <= means["watch"] <= always_ci[1],
            "drift_check_at_most_5pct": drift_s / refresh_s <= 0.05,
        },
        "rows": {name: s.rows for name, s in states.items()},
        "settings": {
            "model": params.model.model_dump(mode="json"),
            "train": {k: getattr(params.train, k) for k in ("strategy", "steps", "batch_size")},
            "simulate": params.simulate.model_dump(mode="json"),
            "drift": params.drift.model_dump(mode="json"),
            "watch": params.watch.model_dump(mode="json"),
            "bootstrap": bootstrap,
            "seed": seed,
        },
        "conditions": conditions,
    }


def markdown(results: dict[str, Any]) -> str:
    """The results as the tables of ``results.md``."""
    acc = results["next_period_accuracy"]
    diff = results["difference_watch_minus_always"]
    cost = results["cost"]
    lines = [
        "| policy | refreshes | next-period kNN accuracy (mean of periods 2..N) | 95% cluster CI |",
        "|---|---:|---:|---|",
    ]
    for name in POLICIES:
        low, high = acc[name]["interval95"]
        lines.append(
            f"| {name} | {results['refreshes'][name]} | {acc[name]['mean']:.3f} | "
            f"[{low:.3f}, {high:.3f}] |"
        )
    low, high = diff["interval95"]
    lines += [
        "",
        f"watch - always: {diff['mean']:+.3f} [{low:+.3f}, {high:+.3f}] (paired, same resamples); "
        f"{results['fewer_refreshes']:.0%} fewer refreshes",
        "",
        "| period | truth | always: acc | watch: champion of | acc | decision | MMD² | p |",
        "|---|---|---:|---|---:|---|---:|---:|",
    ]
    for a, w in zip(results["rows"]["always"], results["rows"]["watch"], strict=True):
        lines.append(
            f"| {a['period']} | {a['truth']} | {a['next_period_accuracy']:.3f} | "
            f"{w['champion_period']} | {w['next_period_accuracy']:.3f} | {w['summary']} | "
            f"{w['mmd2']:.4f} | {w['p_value']:.3g} |"
        )
    lines += [
        "",
        f"cost: drift check median {cost['drift_check_median_s']:.1f} s, refresh median "
        f"{cost['refresh_median_s']:.1f} s (train + memory + evaluate): "
        f"{cost['ratio']:.1%}",
        "",
        "goals: "
        + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in results["goals"].items()),
    ]
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed arguments (``cssl bench watch`` calls this)."""
    from cssl_core.config import ConfigError, load_params
    from cssl_core.data.storage import atomic_write_json, atomic_write_text
    from cssl_core.evaluation.drift import DriftError

    def log(msg: str) -> None:
        print(f"[{datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)

    try:
        base = load_params(getattr(args, "params", None), tuple(getattr(args, "set", None) or ()))
        params = replay_params(base, args.frames_per_period)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        results = run_replay(out, params, bootstrap=args.bootstrap, seed=args.seed, log=log)
    except (ConfigError, DriftError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    atomic_write_json(out / RESULTS_JSON, results, indent=2, default=str)
    atomic_write_text(out / RESULTS_MD, markdown(results) + "\n")
    if getattr(args, "json", False):
        print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=2, default=str))
    else:
        print(markdown(results))
        print(f"results: {out / RESULTS_MD}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.watch ...`` = ``python -m benchmarks watch ...``."""
    from benchmarks.cli import main as bench_main

    return bench_main(["watch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
