"""Benchmark: the drift check's false triggers, its power against the size of a shift, its cost.

The stream (:data:`MEASURE_SCHEDULE`, simulated with ``simulate.schedule``): four periods with
one game mix A (``p01``-``p04``, a static stretch), a sudden switch to four new games B
(``p05``), then a gradual take-over by four more new games C in steps of 25% of the frames
(``p06``-``p09``). One model is trained with the product's trainer
(:func:`cssl_core.period.train_period`, ``train.*`` of ``params.yaml``) on ``p01`` only -- the
champion that would be serving when A gives way to B -- and every measurement uses it.

Every period's train split is embedded once (:func:`cssl_core.evaluation.drift.embed_frames`);
each trial then draws fresh seeded samples of ``n`` frames per side from those embeddings and
runs the test the product runs (:func:`cssl_core.evaluation.drift.drift_test`, stream segments
of ``drift.segment_seconds`` as the unit; ``--segment-seconds 60,0`` also measures the
frame-level test). Drawing from embedded periods is the same as embedding drawn frames (the
embedding of a frame does not depend on what else is in the batch), and it lets the trials
share one feature pass.

Conditions (``trials`` samples each):

* no shift, **time halves**: the first vs the second half (by timestamp) of one period, every
  period (different clips of the same streamers and games: what two weeks of one month are);
* no shift, **random halves**: one static period's stream segments split at random into two
  halves (exchangeable units, so this checks the test's calibration);
* no shift, **static pairs**: two different periods of the static stretch (every pair);
* **power**: reference from one static period; new frames ``(1 - s) n`` from another static
  period and ``s n`` from ``p05`` (games the reference has never shown), for each share ``s``;
* **stream shifts**: each period after the static stretch against the period before it;
* **cumulative shifts**: each period of the gradual stretch against ``p05``, the period the
  model would last have been refreshed on (a gradual shift adds up until it is found).

A trial triggers when ``p < drift.alpha`` AND effect ``>= drift.min_effect``. Reported: the
trigger rates, the significance-only rates (what a test without a minimum effect would do),
and the distribution of effect sizes, from which ``drift.min_effect`` is chosen.

Cost: :func:`cssl_core.evaluation.drift.drift_check` end to end (sample two shards from disk,
decode, embed, test) at ``drift.sample_size``, against the wall time of training the model
of one period at the same settings (a lower bound of one refresh, which also evaluates,
updates the memory and registers).

Run it with ``python -m benchmarks.drift --out DIR`` (see ``--help``); reruns reuse the
simulated shards, the model and the embeddings in ``DIR``.
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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cssl_core.config import DriftConfig, Params
    from cssl_core.data.shard import Shard
    from cssl_core.learn.models import Embedder

MEASURE_SCHEDULE: tuple[dict[str, Any], ...] = (
    {"kind": "static", "periods": 4},
    {"kind": "sudden"},
    {"kind": "gradual", "periods": 4},
)
STATIC_PERIODS = ("p01", "p02", "p03", "p04")
SHIFTED_PERIOD = "p05"
SHARES = (0.05, 0.1, 0.2, 0.4, 1.0)
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


# -- inputs: the stream, the model, the embeddings -----------------------------------------


def measure_params(base: Params, frames_per_period: int | None = None) -> Params:
    """``base`` with the measurement stream: periods ``p01..p09`` and :data:`MEASURE_SCHEDULE`."""
    from cssl_core.config import params_from_dict

    tree = base.model_dump(mode="json")
    count = sum(int(r.get("periods", 1)) for r in MEASURE_SCHEDULE)
    names = [f"p{k:02d}" for k in range(1, count + 1)]
    tree["periods"] = {n: {"previous": names[i - 1] if i else ""} for i, n in enumerate(names)}
    tree["simulate"]["schedule"] = list(MEASURE_SCHEDULE)
    if frames_per_period is not None:
        tree["simulate"]["frames_per_period"] = frames_per_period
    return params_from_dict(tree, "drift benchmark")


def build_stream(root: Path, params: Params, log: Callable[[str], None]) -> list[Shard]:
    """Simulate every period of ``params`` into ``root/<period>``; reused when ``stream.json``
    records the same simulator settings."""
    from cssl_core.data.shard import Shard
    from cssl_core.data.simulate import simulate_period
    from cssl_core.data.storage import atomic_write_json

    names = params.period_names
    stamp = root / "stream.json"
    wanted = {"simulate": params.simulate.model_dump(mode="json"), "periods": names}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return [Shard.open(root / n) for n in names]
    for index, name in enumerate(names):
        started = time.perf_counter()
        simulate_period(root, name, index, len(names), params.simulate)
        log(f"simulated {name} ({time.perf_counter() - started:.0f} s)")
    atomic_write_json(root / "stream.json", wanted)
    return [Shard.open(root / n) for n in names]


def training_hash(params: Params) -> str:
    """A hash of the settings that decide the trained model (model, augment, train)."""
    import hashlib

    blob = json.dumps(
        params.model_dump(mode="json", include={"model", "augment", "train"}), sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trained_model(
    out: Path, params: Params, shard: Shard, log: Callable[[str], None]
) -> tuple[Embedder, dict[str, Any]]:
    """The model of the first period (plain SimCLR from scratch, ``train.*``), trained once
    and kept in ``out/model`` with its training time."""
    from cssl_core.data.storage import atomic_write_json
    from cssl_core.learn.models import Embedder
    from cssl_core.memory.replay import ReplayMemory
    from cssl_core.period import PeriodInputs, train_period

    stamp = out / "model.json"
    key = {"training": training_hash(params), "shard": shard.fingerprint}
    if stamp.is_file():
        info = json.loads(stamp.read_text())
        if info.get("key") == key:
            return Embedder.load(out / "model"), info
    log(f"training the model on {shard.period} ({params.train.steps} steps)")
    load_before = os.getloadavg()[0]
    inputs = PeriodInputs(
        params=params,
        period=shard.period,
        shard=shard,
        memory=ReplayMemory.empty(params.replay.capacity),
    )
    model, result = train_period(inputs)
    model.save(out / "model")
    info = {
        "key": key,
        "period": shard.period,
        "steps": result.steps,
        "train_seconds": result.wall_seconds,
        "final_loss": result.final_loss,
        "loadavg_1min": [load_before, os.getloadavg()[0]],
    }
    atomic_write_json(stamp, info)
    log(f"trained in {result.wall_seconds:.0f} s")
    return model, info


@dataclass(frozen=True)
class EmbeddedPeriod:
    """Every train frame of one period: L2-normalised features, categories, streams, times."""

    period: str
    features: np.ndarray
    categories: np.ndarray
    stream_ids: np.ndarray
    ts_ms: np.ndarray


def embed_period(
    cache: Path, model: Embedder, shard: Shard, log: Callable[[str], None]
) -> EmbeddedPeriod:
    """Embed a shard's train split once (cached per model and shard fingerprint)."""
    import pyarrow.compute as pc

    from cssl_core.data.storage import atomic_path
    from cssl_core.evaluation.drift import embed_frames

    name = f"{shard.period}-{model.state_fingerprint()[:12]}-{shard.fingerprint[:12]}-v2.npz"
    path = cache / name
    if not path.is_file():
        started = time.perf_counter()
        table = shard.read(["frame_id", "stream_id", "category", "ts", "image"], split="train")
        table = table.sort_by("frame_id")
        feats = embed_frames(model, table.column("image").to_pylist())
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                features=feats,
                categories=np.array(table.column("category").to_pylist(), dtype=str),
                stream_ids=np.array(table.column("stream_id").to_pylist(), dtype=str),
                ts_ms=pc.cast(table.column("ts"), "int64").to_numpy(),
            )
        log(f"embedded {shard.period}: {len(feats)} frames ({time.perf_counter() - started:.0f} s)")
    with np.load(path) as data:
        return EmbeddedPeriod(
            shard.period, data["features"], data["categories"], data["stream_ids"], data["ts_ms"]
        )


# -- trials ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Population:
    """Rows of one embedded period that a side of a trial is drawn from."""

    data: EmbeddedPeriod
    rows: np.ndarray
    label: str


def whole(data: EmbeddedPeriod) -> Population:
    return Population(data, np.arange(len(data.features)), data.period)


def time_halves(data: EmbeddedPeriod) -> tuple[Population, Population]:
    """The frames before and from the median timestamp of a period (two weeks vs two weeks)."""
    order = np.argsort(data.ts_ms, kind="stable")
    half = len(order) // 2
    return (
        Population(data, np.sort(order[:half]), f"{data.period} first half"),
        Population(data, np.sort(order[half:]), f"{data.period} second half"),
    )


def random_halves(
    data: EmbeddedPeriod, segment_seconds: float, seed: int
) -> tuple[Population, Population]:
    """A period's stream segments split at random into two halves: exchangeable units by
    construction, so they check the test's calibration (false positives at rate ``alpha``)."""
    from cssl_core.evaluation.drift import segment_ids

    units = segment_ids(data.stream_ids, data.ts_ms, segment_seconds)
    count = int(units.max()) + 1
    first = np.random.default_rng([seed, count]).permutation(count)[: count // 2]
    in_first = np.isin(units, first)
    return (
        Population(data, np.flatnonzero(in_first), f"{data.period} random half A"),
        Population(data, np.flatnonzero(~in_first), f"{data.period} random half B"),
    )


def draw(population: Population, size: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices of a uniform sample without replacement (all rows if there are fewer)."""
    rows = population.rows
    if len(rows) <= size:
        return rows
    return rows[np.sort(rng.choice(len(rows), size=size, replace=False))]


@dataclass(frozen=True)
class Side:
    """One side of a trial: features, category counts, and each frame's stream and time."""

    features: np.ndarray
    counts: dict[str, int]
    stream_ids: np.ndarray
    ts_ms: np.ndarray


def side(parts: Sequence[tuple[Population, np.ndarray]]) -> Side:
    """Concatenate drawn rows of one or more populations into one side of a trial."""
    cats: dict[str, int] = {}
    for p, rows in parts:
        for c in p.data.categories[rows]:
            cats[str(c)] = cats.get(str(c), 0) + 1
    return Side(
        np.concatenate([p.data.features[rows] for p, rows in parts]),
        cats,
        np.concatenate([p.data.stream_ids[rows] for p, rows in parts]),
        np.concatenate([p.data.ts_ms[rows] for p, rows in parts]),
    )


@dataclass(frozen=True)
class Condition:
    """One experimental condition: how to build the two sides of a trial."""

    kind: str  # "halves" | "static" | "power" | "stream"
    label: str
    shift: bool  # whether the truth is a shift
    build: Callable[[int, np.random.Generator], tuple[Side, Side]]
    share: float | None = None


def conditions(
    embedded: dict[str, EmbeddedPeriod], shares: Sequence[float], segment_seconds: float
) -> list[Condition]:
    """Every condition of the benchmark (see the module docstring); random halves split the
    stream segments of ``segment_seconds``."""
    out: list[Condition] = []
    splits = [("halves", p, time_halves(d)) for p, d in embedded.items()]
    splits += [
        ("random", p, random_halves(embedded[p], segment_seconds, 0)) for p in STATIC_PERIODS
    ]
    for kind, period, (first, second) in splits:

        def halves(n: int, rng: np.random.Generator, a=first, b=second) -> tuple[Side, Side]:
            return side([(b, draw(b, n, rng))]), side([(a, draw(a, n, rng))])

        out.append(Condition(kind, f"{period} {kind}", False, halves))
    static = [whole(embedded[p]) for p in STATIC_PERIODS]
    for i, ref in enumerate(static):
        for new in static[i + 1 :]:

            def pair(n: int, rng: np.random.Generator, a=ref, b=new) -> tuple[Side, Side]:
                return side([(b, draw(b, n, rng))]), side([(a, draw(a, n, rng))])

            out.append(Condition("static", f"{new.label} vs {ref.label}", False, pair))
    shifted = whole(embedded[SHIFTED_PERIOD])
    for share in shares:

        def power(n: int, rng: np.random.Generator, s: float = share) -> tuple[Side, Side]:
            a, b = rng.choice(len(static), size=2, replace=False)
            k = int(round(s * n))
            new = [(static[b], draw(static[b], n - k, rng)), (shifted, draw(shifted, k, rng))]
            return side([p for p in new if len(p[1])]), side([(static[a], draw(static[a], n, rng))])

        out.append(Condition("power", f"{share:.0%} new games", True, power, share))
    names = list(embedded)
    start = names.index(STATIC_PERIODS[-1])
    for prev, cur in zip(names[start:], names[start + 1 :], strict=False):
        a, b = whole(embedded[prev]), whole(embedded[cur])

        def step(n: int, rng: np.random.Generator, a=a, b=b) -> tuple[Side, Side]:
            return side([(b, draw(b, n, rng))]), side([(a, draw(a, n, rng))])

        out.append(Condition("stream", f"{cur} vs {prev}", True, step))
    # Against the period of the last refresh (the sudden shift) instead of the previous one:
    # a gradual shift accumulates until it is found.
    anchor = whole(embedded[SHIFTED_PERIOD])
    for cur in names[names.index(SHIFTED_PERIOD) + 2 :]:
        b = whole(embedded[cur])

        def since(n: int, rng: np.random.Generator, a=anchor, b=b) -> tuple[Side, Side]:
            return side([(b, draw(b, n, rng))]), side([(a, draw(a, n, rng))])

        out.append(Condition("cumulative", f"{cur} vs {SHIFTED_PERIOD}", True, since))
    return out


def run_trials(
    embedded: dict[str, EmbeddedPeriod],
    shares: Sequence[float],
    sizes: Sequence[int],
    segment_seconds: Sequence[float],
    trials: int,
    cfg: DriftConfig,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Run every condition ``trials`` times per sample size and unit; one row per test."""
    from cssl_core.evaluation.drift import drift_test, segment_ids

    rows: list[dict[str, Any]] = []
    for seconds in segment_seconds:
        conds = conditions(embedded, shares, seconds)
        for n in sizes:
            started = time.perf_counter()
            for c_index, cond in enumerate(conds):
                for t in range(trials):
                    rng = np.random.default_rng([cfg.seed, n, c_index, t])
                    new, ref = cond.build(n, rng)
                    tic = time.perf_counter()
                    result = drift_test(
                        new.features,
                        ref.features,
                        cfg.model_copy(update={"seed": cfg.seed + t}),
                        new_units=segment_ids(new.stream_ids, new.ts_ms, seconds),
                        reference_units=segment_ids(ref.stream_ids, ref.ts_ms, seconds),
                        new_counts=new.counts,
                        reference_counts=ref.counts,
                    )
                    rows.append(
                        {
                            "n": n,
                            "segment_seconds": seconds,
                            "kind": cond.kind,
                            "condition": cond.label,
                            "shift": cond.shift,
                            "share": cond.share,
                            "trial": t,
                            "p_value": result.p_value,
                            "effect": result.effect,
                            "units": [result.new_units, result.reference_units],
                            "total_variation": result.total_variation,
                            "seconds": time.perf_counter() - tic,
                        }
                    )
            log(
                f"n={n}, segments {seconds:g} s: {len(conds) * trials} trials in "
                f"{time.perf_counter() - started:.0f} s"
            )
    return rows


# -- cost --------------------------------------------------------------------------------


def time_drift_check(
    model: Embedder, new: Shard, reference: Shard, params: Params, repeats: int
) -> dict[str, Any]:
    """Wall seconds of :func:`drift_check` end to end at ``drift.sample_size`` (each repeat
    with its own seed, so nothing is cached between them)."""
    from cssl_core.evaluation.drift import drift_check, drift_test, embed_frames, sample_shard

    seconds = []
    summary = ""
    for r in range(max(1, repeats)):
        cfg = params.drift.model_copy(update={"seed": params.drift.seed + 100 + r})
        tic = time.perf_counter()
        summary = drift_check(model, new, reference, cfg).summary()
        seconds.append(time.perf_counter() - tic)
    # Where the time goes, stage by stage (once).
    cfg = params.drift
    tic = time.perf_counter()
    samples = [sample_shard(new, cfg.sample_size, 0), sample_shard(reference, cfg.sample_size, 1)]
    sampled = time.perf_counter()
    x, y = (embed_frames(model, s.images) for s in samples)
    embedded = time.perf_counter()
    drift_test(
        x,
        y,
        cfg,
        new_units=samples[0].units(cfg.segment_seconds),
        reference_units=samples[1].units(cfg.segment_seconds),
    )
    tested = time.perf_counter()
    return {
        "seconds": seconds,
        "median_seconds": statistics.median(seconds),
        "stages_seconds": {
            "sample (read + choose)": sampled - tic,
            "embed (decode + forward)": embedded - sampled,
            "test (MMD + permutations)": tested - embedded,
        },
        "sample_size": params.drift.sample_size,
        "new": new.period,
        "reference": reference.period,
        "example": summary,
        "loadavg_1min": os.getloadavg()[0],
    }


# -- summaries ---------------------------------------------------------------------------


def rates(rows: Sequence[dict[str, Any]], alpha: float, min_effect: float) -> dict[str, float]:
    """Share of tests that are significant, and that trigger (significant and large enough)."""
    if not rows:
        return {"tests": 0, "significant": float("nan"), "triggered": float("nan")}
    sig = [r["p_value"] < alpha for r in rows]
    trig = [s and r["effect"] >= min_effect for s, r in zip(sig, rows, strict=True)]
    return {
        "tests": len(rows),
        "significant": float(np.mean(sig)),
        "triggered": float(np.mean(trig)),
    }


def effect_quantiles(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    e = np.array([r["effect"] for r in rows], dtype=float)
    if not e.size:
        return {}
    return {
        "min": float(e.min()),
        "p05": float(np.quantile(e, 0.05)),
        "median": float(np.median(e)),
        "p95": float(np.quantile(e, 0.95)),
        "max": float(e.max()),
    }


def unit_label(seconds: float) -> str:
    return f"segments of {seconds:g} s" if seconds > 0 else "single frames"


def summarise(rows: Sequence[dict[str, Any]], alpha: float, min_effect: float) -> dict[str, Any]:
    """Rates and effect quantiles per sample size, unit and condition group."""
    out: dict[str, Any] = {}
    for seconds in sorted({r["segment_seconds"] for r in rows}, reverse=True):
        for n in sorted({r["n"] for r in rows}):
            mine = [r for r in rows if r["n"] == n and r["segment_seconds"] == seconds]
            groups: dict[str, list[dict[str, Any]]] = {
                "no shift (all)": [r for r in mine if not r["shift"]],
                "no shift: random halves": [r for r in mine if r["kind"] == "random"],
                "no shift: time halves": [r for r in mine if r["kind"] == "halves"],
                "no shift: static pairs": [r for r in mine if r["kind"] == "static"],
            }
            for share in sorted({r["share"] for r in mine if r["kind"] == "power"}):
                groups[f"power: {share:.0%} new games"] = [
                    r for r in mine if r["kind"] == "power" and r["share"] == share
                ]
            for kind in ("stream", "cumulative"):
                for label in sorted({r["condition"] for r in mine if r["kind"] == kind}):
                    groups[f"{kind}: {label}"] = [r for r in mine if r["condition"] == label]
            out[f"n={n} per side, unit: {unit_label(seconds)}"] = {
                name: {
                    **rates(g, alpha, min_effect),
                    "effect": effect_quantiles(g),
                    "units": float(np.mean([np.mean(r["units"]) for r in g])) if g else 0.0,
                    "total_variation": float(
                        np.mean([r["total_variation"] or 0.0 for r in g]) if g else float("nan")
                    ),
                    "test_seconds": float(np.median([r["seconds"] for r in g])) if g else 0.0,
                }
                for name, g in groups.items()
            }
    return out


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables (what docs/benchmarks.md quotes)."""
    lines = [
        "# Drift check benchmark",
        "",
        f"- when: {results['when']}, host: {results['host']}",
        f"- load (1-min average) at start/end: {results['loadavg']}",
        f"- stream: {results['stream']}",
        f"- model: {results['model']}",
        f"- alpha {results['alpha']}, min_effect {results['min_effect']}, "
        f"permutations {results['permutations']}, {results['trials']} trials per condition",
        "",
    ]
    for key, groups in results["summary"].items():
        lines += [
            f"## {key}",
            "",
            "| condition | tests | significant | triggered | MMD² min / median / p95 / max "
            "| units/side | mean TV | s/test |",
            "|---|---:|---:|---:|---|---:|---:|---:|",
        ]
        for name, g in groups.items():
            e = g["effect"]
            eff = (
                f"{e['min']:.4f} / {e['median']:.4f} / {e['p95']:.4f} / {e['max']:.4f}"
                if e
                else "-"
            )
            lines.append(
                f"| {name} | {g['tests']} | {g['significant']:.0%} | {g['triggered']:.0%} | "
                f"{eff} | {g['units']:.0f} | {g['total_variation']:.2f} | "
                f"{g['test_seconds']:.2f} |"
            )
        lines.append("")
    cost = results.get("cost")
    if cost:
        lines += [
            "## Cost",
            "",
            f"- one drift check ({cost['sample_size']} frames per side, {cost['new']} vs "
            f"{cost['reference']}, end to end): median {cost['median_seconds']:.1f} s "
            f"of {[round(s, 1) for s in cost['seconds']]} (load {cost['loadavg_1min']:.1f}); "
            + ", ".join(f"{k} {v:.1f} s" for k, v in cost["stages_seconds"].items()),
            f"- training one period ({results['model_info']['steps']} steps): "
            f"{results['model_info']['train_seconds']:.0f} s "
            f"(load {results['model_info']['loadavg_1min']})",
            f"- ratio: {cost['ratio_to_training']:.1%} of training alone (goal <= 5% of a "
            "refresh, which also evaluates, updates the memory and registers)",
            f"- example: {cost['example']}",
            "",
        ]
    return "\n".join(lines)


# -- driver ------------------------------------------------------------------------------


def run_benchmark(
    out: Path,
    params: Params,
    *,
    frames_per_period: int | None,
    sizes: Sequence[int],
    segment_seconds: Sequence[float],
    trials: int,
    shares: Sequence[float],
    timing_repeats: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Build (or reuse) the inputs in ``out``, time one drift check, run every trial, and
    write ``results.json`` (with every test) and ``results.md``."""
    from cssl_core.data.storage import atomic_write_json, atomic_write_text

    loads = [os.getloadavg()[0]]
    mp = measure_params(params, frames_per_period)
    shards = build_stream(out / "shards", mp, log)
    model, model_info = trained_model(out, mp, shards[0], log)
    embedded = {s.period: embed_period(out / "embeddings", model, s, log) for s in shards}
    by_period = {s.period: s for s in shards}
    cost = time_drift_check(
        model, by_period[STATIC_PERIODS[1]], by_period[STATIC_PERIODS[0]], mp, timing_repeats
    )
    cost["ratio_to_training"] = cost["median_seconds"] / model_info["train_seconds"]
    log(f"one drift check: {cost['median_seconds']:.1f} s ({cost['ratio_to_training']:.1%})")
    rows = run_trials(embedded, shares, sizes, segment_seconds, trials, mp.drift, log)
    loads.append(os.getloadavg()[0])
    results = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "host": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or '?'})",
        "loadavg": [round(x, 1) for x in loads],
        "stream": (
            f"{len(shards)} periods x {mp.simulate.frames_per_period} frames "
            f"(train split embedded), schedule {list(MEASURE_SCHEDULE)}"
        ),
        "model": (
            f"{mp.model.backbone} at {mp.model.input_size} px, trained {model_info['steps']} "
            f"steps on {model_info['period']} (first period: plain SimCLR from scratch)"
        ),
        "model_info": model_info,
        "alpha": mp.drift.alpha,
        "min_effect": mp.drift.min_effect,
        "permutations": mp.drift.permutations,
        "trials": trials,
        "sizes": list(sizes),
        "summary": summarise(rows, mp.drift.alpha, mp.drift.min_effect),
        "cost": cost,
        "rows": rows,
    }
    atomic_write_json(out / RESULTS_JSON, results)
    atomic_write_text(out / RESULTS_MD, markdown(results))
    return results


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed arguments (``cssl bench drift`` calls this)."""
    from benchmarks.cli import emit_results, load_bench_params, log

    params = load_bench_params(args)
    results = run_benchmark(
        Path(args.out),
        params,
        frames_per_period=args.frames_per_period,
        sizes=args.sample_sizes or [params.drift.sample_size],
        segment_seconds=args.segment_seconds or [params.drift.segment_seconds],
        trials=args.trials,
        shares=args.shares,
        timing_repeats=args.timing_repeats,
        log=log,
    )
    summary = {k: v for k, v in results.items() if k != "rows"}
    emit_results(args, summary, [markdown(results)], Path(args.out) / RESULTS_MD)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.drift ...`` = ``python -m benchmarks drift ...``."""
    from benchmarks.cli import main as bench_main

    return bench_main(["drift", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
