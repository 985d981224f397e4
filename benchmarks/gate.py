"""Benchmark: the paired gate's error rates, with real models on real eval sets.

How often does the gate (:func:`pipelines.gate.decide`) reject a candidate that is as good as
the champion, and how often does it promote one that is worse by at least the margin?

Models (the product's period code, :func:`cssl_core.period.run_stream` /
:func:`~cssl_core.period.run_period`, ``params.yaml`` as given, on the simulated stream at its
settings): a lineage ``p01 -> p02`` (seed 0) whose ``p02`` model is the champion; then
candidates for ``p03`` continued from it with the configured recipe and seeds ``--seeds``
(*equivalent* to each other: same recipe, another seed), and with damaging recipes
(:data:`WORSE_RECIPES`, seeds ``--worse-seeds``). Every model is scored on the same eval
frames of ``p01..p03`` (:func:`cssl_core.period.evaluate_model`: per-frame outcomes).

Eval sets: each trial draws a *replicate eval set* per period by resampling the period's eval
streams (the unit of independence) with replacement, the same draw for every model -- the
bootstrap's model of drawing another eval split of the same size from the same population
of streamers. The truth of a pair is its difference on the full eval split.

Pairs, each decided on every replicate with the gate's rule for ``p03``:

* ``itself``: the champion against itself (``Δ = 0`` on every frame);
* ``seed``: a ``p03`` candidate of one seed against one of another seed as the champion (every
  ordered pair): exchangeable models, true ``Δ ≈ 0`` on average;
* ``worse``: a damaged ``p03`` candidate against each seed's candidate as the champion; a
  pair counts as *worse by the margin* when its full-split ``Δ`` is ``<= -margin`` on some
  period;
* ``served``: each seed's ``p03`` candidate against the real champion (``p02``'s model): how
  often the refresh itself would be promoted (information, not an error rate).

Reported per gate setting (margins, corrections, ``new_period``, ``eval.cluster``):
equivalent candidates rejected (``itself``, ``seed``), worse-by-margin candidates promoted,
and the *boundary* rate: the share of (seed pair, period, replicate) whose lower bound clears
``0``, which under a location shift is the chance that a candidate worse by exactly the
margin on a period clears ``-margin`` there (the worst case of "worse promoted"). The rule is
applied to the bootstraps the gate itself computes (:meth:`FrameOutcomes.paired_bootstrap`,
:func:`~cssl_core.evaluation.intervals.forgetting_interval`,
:func:`pipelines.gate.interval_levels`) so that many settings share one bootstrap per trial;
``decide`` itself is run on the default setting for the first replicates and must agree on
every one (``agreement`` in the results).

``python -m benchmarks.gate --out DIR`` (see ``--help``); reruns reuse the simulated shards, the
models and their outcomes in ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.cli import _csv_floats, _csv_ints, emit_results, load_bench_params, log

if TYPE_CHECKING:
    import numpy as np

    from cssl_core.config import GateConfig, Params
    from cssl_core.evaluation.intervals import Bootstrap, Interval
    from cssl_core.evaluation.outcomes import FrameOutcomes, Metric

PERIODS = ("p01", "p02", "p03")
NEW = "p03"
CHAMPION = "champion"
WORSE_RECIPES: dict[str, tuple[str, ...]] = {
    "finetune": ("train.strategy=finetune",),
    "finetune-lr10": ("train.strategy=finetune", "train.lr=3.0"),
}
"""Damaging recipes for p03: plain fine-tuning (no replay, no distillation: forgets) and the
same at ten times the learning rate (wrecks the features)."""
MARGINS = (0.03, 0.05, 0.08, 0.1, 0.15, 0.2)
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


# -- options (torch-free: benchmarks/cli.py registers them as `cssl bench gate`) -------------


def add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cssl bench gate`` (standard library only)."""
    parser.add_argument("--out", required=True, type=Path, help="results and cache directory")
    parser.add_argument(
        "--seeds", type=_csv_ints, default=(0, 1, 2, 3, 4), help="seeds of equivalent candidates"
    )
    parser.add_argument(
        "--worse-seeds", type=_csv_ints, default=(0, 1), help="seeds of each damaging recipe"
    )
    parser.add_argument(
        "--worse-recipes",
        type=lambda v: tuple(x.strip() for x in v.split(",") if x.strip()),
        default=tuple(WORSE_RECIPES),
        metavar="NAME,NAME",
        help=f"damaging recipes to train (default: {','.join(WORSE_RECIPES)})",
    )
    parser.add_argument("--replicates", type=int, default=200, help="replicate eval sets per pair")
    parser.add_argument(
        "--margins", type=_csv_floats, default=MARGINS, metavar="M,M", help="margins to measure"
    )
    parser.add_argument(
        "--check-decide",
        type=int,
        default=20,
        help="replicates on which decide() itself runs to confirm the shared-bootstrap rule",
    )


def cmd_gate(args: argparse.Namespace) -> int:
    return run_from_args(args)


# -- models and outcomes ------------------------------------------------------------------


def measure_params(base: Params) -> Params:
    """``base`` with the periods ``p01..p03`` (each continuing from the one before)."""
    from cssl_core.config import params_from_dict

    tree = base.model_dump(mode="json")
    tree["periods"] = {p: {"previous": PERIODS[k - 1] if k else ""} for k, p in enumerate(PERIODS)}
    return params_from_dict(tree, "gate benchmark")


def _with(params: Params, overrides: Iterable[str]) -> Params:
    from cssl_core.config import apply_overrides, params_from_dict

    tree = apply_overrides(params.model_dump(mode="json"), list(overrides))
    return params_from_dict(tree, "gate benchmark")


def models_and_outcomes(
    out: Path,
    params: Params,
    seeds: Sequence[int],
    worse_seeds: Sequence[int],
    log: Callable[[str], None],
    worse_recipes: Sequence[str] = tuple(WORSE_RECIPES),
) -> tuple[dict[str, dict[str, FrameOutcomes]], dict[str, Any]]:
    """Train (or reuse) every model and score it on the eval splits of p01..p03: outcomes by
    model name (``lineage-p01``, ``champion``, ``seed-<k>``, ``<recipe>-<k>``) and period,
    and how long each training took. Each model's outcomes are kept in
    ``out/models/<name>.parquet`` under a key of the settings and the shards, so an
    interrupted run resumes; the lineage's models are kept for the candidates."""
    import pyarrow.parquet as pq

    from benchmarks.drift import build_stream, training_hash
    from cssl_core import period as core
    from cssl_core.data.storage import LocalStore, atomic_path, atomic_write_json
    from cssl_core.evaluation.outcomes import outcomes_from_table, outcomes_table
    from cssl_core.learn.models import Embedder
    from cssl_core.memory.replay import ReplayMemory

    shards = build_stream(out / "shards", params, log)
    key = {
        "training": training_hash(params),
        "eval": params.eval.model_dump(mode="json"),
        "shards": [s.fingerprint for s in shards],
    }
    cache = out / "models"
    stamp = cache / "key.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == key):
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        atomic_write_json(stamp, key)
    timings_file = cache / "train_seconds.json"
    seconds: dict[str, float] = (
        json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    )
    eval_sets: dict[str, Any] = {}
    results: dict[str, dict[str, FrameOutcomes]] = {}

    def scored(name: str, make: Callable[[], Any], timed: bool = True) -> None:
        path = cache / f"{name}.parquet"
        if path.is_file():
            results[name] = outcomes_from_table(pq.read_table(path))[name]
            return
        started = time.perf_counter()
        model = make()
        if timed:
            seconds[name] = time.perf_counter() - started
            atomic_write_json(timings_file, seconds)
        if not eval_sets:
            eval_sets.update(core.eval_sets_for(shards, params))
        scores = core.evaluate_model(model, eval_sets, params)
        results[name] = {p: s.frames for p, s in scores.items() if s.frames is not None}
        with atomic_path(path) as tmp:
            pq.write_table(outcomes_table({name: results[name]}), tmp)
        log(f"{name}: knn " + ", ".join(f"{p} {s.knn:.3f}" for p, s in scores.items()))

    lineage_dir = cache / "lineage"
    if not (lineage_dir / "p02.model").is_dir():
        started = time.perf_counter()
        lineage = list(core.run_stream(params, shards[:2]))
        seconds["lineage p01+p02"] = time.perf_counter() - started
        atomic_write_json(timings_file, seconds)
        for r, p in zip(lineage, PERIODS[:2], strict=True):
            r.model.save(lineage_dir / f"{p}.model")
        lineage[1].memory.save(LocalStore(lineage_dir / "memory"), "p02", replace=True)
    parents = {p: Embedder.load(lineage_dir / f"{p}.model") for p in PERIODS[:2]}
    memory = ReplayMemory.load(LocalStore(lineage_dir / "memory"), "p02")
    scored("lineage-p01", lambda: parents["p01"], timed=False)
    scored(CHAMPION, lambda: parents["p02"], timed=False)
    recipes: list[tuple[str, tuple[str, ...]]] = [
        (f"seed-{k}", (f"train.seed={k}",)) for k in seeds
    ]
    recipes += [
        (f"{name}-{k}", (*WORSE_RECIPES[name], f"train.seed={k}"))
        for name in worse_recipes
        for k in worse_seeds
    ]
    for name, overrides in recipes:

        def make(overrides: tuple[str, ...] = overrides) -> Any:
            inputs = core.PeriodInputs(
                params=_with(params, overrides),
                period=NEW,
                shard=shards[2],
                memory=memory,
                parent=parents["p02"],
                history=tuple(shards[:2]),
            )
            model, _ = core.train_period(inputs)
            return model.to("cpu")

        scored(name, make)
    return results, {"key": key, "train_seconds": seconds}


# -- replicate eval sets ------------------------------------------------------------------


@dataclass(frozen=True)
class Resampler:
    """Draws replicate eval sets of one period: its streams with replacement, every frame of a
    drawn stream kept; the k-th draw of a stream becomes the stream ``<id>#<k>`` (frames
    renamed alike), so repeated streams stay distinct clusters."""

    clusters: tuple[str, ...]
    frames_of: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, outcomes: FrameOutcomes) -> Resampler:
        import numpy as np

        ids = np.asarray(outcomes.clusters)
        names = tuple(sorted(set(outcomes.clusters)))
        return cls(names, tuple(np.flatnonzero(ids == c) for c in names))

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, len(self.clusters), len(self.clusters))

    def apply(self, outcomes: FrameOutcomes, drawn: np.ndarray, by_frame: bool) -> FrameOutcomes:
        """``outcomes`` on the drawn streams (``by_frame``: each frame its own cluster, what
        ``eval.cluster: frame`` would assume)."""
        import numpy as np

        from cssl_core.evaluation.outcomes import FrameOutcomes

        rows = np.concatenate([self.frames_of[c] for c in drawn])
        draw_of = np.concatenate([np.full(self.frames_of[c].size, k) for k, c in enumerate(drawn)])
        frame_ids = tuple(
            f"{outcomes.frame_ids[i]}#{k}" for i, k in zip(rows, draw_of, strict=True)
        )
        clusters = (
            frame_ids
            if by_frame
            else tuple(f"{outcomes.clusters[i]}#{k}" for i, k in zip(rows, draw_of, strict=True))
        )
        labels = tuple(outcomes.labels[i] for i in rows)
        return FrameOutcomes(frame_ids, clusters, labels, outcomes.knn[rows], outcomes.linear[rows])


# -- the gate's rule on shared bootstraps ------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One gate setting to measure."""

    name: str
    cfg: GateConfig
    by_frame: bool = False


def settings(base: GateConfig, margins: Sequence[float]) -> list[Setting]:
    """The margin sweep (base correction and new_period), then at the base margin: each
    other correction, ``new_period: better``, and frame-level clusters."""
    out = [Setting(f"margin {m:.2f}", base.model_copy(update={"margin": m})) for m in margins]
    for correction in ("none", "bonferroni", "holm"):
        if correction != base.correction:
            cfg = base.model_copy(update={"correction": correction})
            out.append(Setting(f"margin {base.margin:.2f}, {correction}", cfg))
    better = "better" if base.new_period == "non_inferior" else "non_inferior"
    cfg = base.model_copy(update={"new_period": better})
    out.append(Setting(f"margin {base.margin:.2f}, new_period {better}", cfg))
    out.append(Setting(f"margin {base.margin:.2f}, eval.cluster frame", base, by_frame=True))
    return out


@dataclass(frozen=True)
class Trial:
    """One pair on one replicate: the paired bootstraps per period and the forgetting interval
    (at the base confidence), shared by every setting."""

    boots: dict[str, Bootstrap]
    forgetting: Interval


def trial(
    cand: Mapping[str, FrameOutcomes],
    champ: Mapping[str, FrameOutcomes],
    best: Mapping[str, float],
    cfg: GateConfig,
) -> Trial:
    from cssl_core.evaluation.intervals import forgetting_interval

    boots = {
        p: cand[p].paired_bootstrap(
            champ[p], cfg.metric, n_resamples=cfg.bootstrap_samples, seed=cfg.bootstrap_seed
        )
        for p in PERIODS
    }
    earlier = [p for p in PERIODS if p != NEW]
    forgetting = forgetting_interval(
        [(cand[p].correct(cfg.metric), cand[p].clusters) for p in earlier],
        [best[p] for p in earlier],
        confidence=cfg.confidence,
        n_resamples=cfg.bootstrap_samples,
        seed=cfg.bootstrap_seed,
    )
    return Trial(boots, forgetting)


def promotes(t: Trial, cfg: GateConfig) -> bool:
    """The gate's rule (pipelines/gate.py) on a trial's bootstraps for setting ``cfg``."""
    from pipelines.gate import interval_levels

    better = cfg.new_period == "better"
    thresholds = {p: 0.0 if (p == NEW and better) else -cfg.margin for p in t.boots}
    levels = interval_levels(t.boots, thresholds, cfg)
    for p, boot in t.boots.items():
        iv = boot.interval(levels[p])
        if not iv.defined or not iv.low > thresholds[p]:
            return False
    return t.forgetting.defined and t.forgetting.high <= cfg.max_forgetting


def clears_zero(t: Trial, cfg: GateConfig) -> list[bool]:
    """Per period: the lower bound at the setting's level is above 0 (for the boundary rate)."""
    from pipelines.gate import interval_levels

    levels = interval_levels(t.boots, dict.fromkeys(t.boots, 0.0), cfg)
    return [t.boots[p].interval(levels[p]).low > 0 for p in t.boots]


# -- the measurement ----------------------------------------------------------------------


def full_deltas(
    results: Mapping[str, Mapping[str, FrameOutcomes]], cand: str, champ: str, metric: Metric
) -> dict[str, float]:
    return {
        p: float(results[cand][p].correct(metric).mean() - results[champ][p].correct(metric).mean())
        for p in PERIODS
    }


def pairs(results: Mapping[str, Any], seeds: Sequence[int]) -> list[tuple[str, str, str]]:
    """``(kind, candidate, champion)`` of every pair measured."""
    seed_names = [f"seed-{k}" for k in seeds]
    worse = [n for n in results if n not in (CHAMPION, "lineage-p01", *seed_names)]
    out = [("itself", CHAMPION, CHAMPION)]
    out += [("seed", a, b) for a in seed_names for b in seed_names if a != b]
    out += [("worse", w, b) for w in worse for b in seed_names]
    out += [("served", a, CHAMPION) for a in seed_names]
    return out


def best_earlier(
    results: Mapping[str, Mapping[str, FrameOutcomes]], metric: Metric
) -> dict[str, float]:
    """The lineage's best accuracy on p01 and p02 before p03 (as the registry would hold it)."""
    from cssl_core.evaluation.metrics import AccuracyMatrix

    R = AccuracyMatrix(list(PERIODS))
    for row, name in (("p01", "lineage-p01"), ("p02", CHAMPION)):
        for p in PERIODS:
            R.set(row, p, results[name][p].accuracy(metric))
    return R.best_earlier(NEW)


def run_trials(
    results: Mapping[str, Mapping[str, FrameOutcomes]],
    seeds: Sequence[int],
    base: GateConfig,
    margins: Sequence[float],
    replicates: int,
    check_decide: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Every pair on every replicate eval set under every setting; counts per (setting, kind)."""
    import numpy as np

    from pipelines.gate import decide

    measured = settings(base, margins)
    best = best_earlier(results, base.metric)
    resamplers = {p: Resampler.of(results[CHAMPION][p]) for p in PERIODS}
    all_pairs = pairs(results, seeds)
    deltas = {(c, h): full_deltas(results, c, h, base.metric) for _, c, h in all_pairs}
    counts: dict[str, dict[str, Any]] = {
        s.name: {"promoted": {}, "trials": {}, "boundary": [0, 0], "worse_by_margin": [0, 0]}
        for s in measured
    }
    agree = [0, 0]
    # One-frame streams (the simulator's eval clips): frame clusters are the stream clusters,
    # so the frame-level setting reuses the stream-level bootstraps (the same draws).
    singletons = all(f.size == 1 for r in resamplers.values() for f in r.frames_of)
    started = time.perf_counter()
    for r in range(replicates):
        rng = np.random.default_rng([base.bootstrap_seed, r])
        drawn = {p: resamplers[p].draw(rng) for p in PERIODS}
        shared: dict[tuple[str, str], Trial] = {}
        for by_frame in (False, True):
            group = [s for s in measured if s.by_frame == by_frame]
            reps = {
                name: {p: resamplers[p].apply(o[p], drawn[p], by_frame) for p in PERIODS}
                for name, o in results.items()
            }
            for kind, cand, champ in all_pairs:
                if by_frame and singletons:
                    t = shared[(cand, champ)]
                else:
                    t = shared[(cand, champ)] = trial(reps[cand], reps[champ], best, base)
                worst = min(deltas[(cand, champ)].values())
                for s in group:
                    c = counts[s.name]
                    ok = promotes(t, s.cfg)
                    c["promoted"][kind] = c["promoted"].get(kind, 0) + int(ok)
                    c["trials"][kind] = c["trials"].get(kind, 0) + 1
                    if kind == "worse" and worst <= -s.cfg.margin:
                        c["worse_by_margin"][0] += int(ok)
                        c["worse_by_margin"][1] += 1
                    if kind == "seed":
                        hits = clears_zero(t, s.cfg)
                        c["boundary"][0] += sum(hits)
                        c["boundary"][1] += len(hits)
                if not by_frame and r < check_decide:
                    d = decide(reps[cand], reps[champ], NEW, best, base)
                    agree[0] += int(d.promote == promotes(t, base))
                    agree[1] += 1
        if (r + 1) % max(1, replicates // 10) == 0:
            log(f"replicate {r + 1}/{replicates} ({time.perf_counter() - started:.0f} s)")
    return {
        "counts": counts,
        "agreement": {"same": agree[0], "checked": agree[1]},
        "best_earlier": best,
        "deltas": {f"{c} vs {h}": d for (c, h), d in deltas.items()},
        "pairs": {kind: sum(1 for k, _, _ in all_pairs if k == kind) for kind, _, _ in all_pairs},
        "settings": {
            s.name: s.cfg.model_dump(mode="json") | {"by_frame": s.by_frame} for s in measured
        },
        "trial_seconds": time.perf_counter() - started,
        "one_frame_streams": singletons,
    }


def rate(hits: int, n: int) -> dict[str, float | int]:
    """A share with its 95% Wilson interval (trials within a pair are not independent, so
    read it as a lower bound on the uncertainty)."""
    from scipy.stats import binomtest

    if n == 0:
        return {"rate": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    ci = binomtest(hits, n).proportion_ci(0.95, method="wilson")
    return {"rate": hits / n, "low": float(ci.low), "high": float(ci.high), "n": n}


def summarise(trials: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, c in trials["counts"].items():
        p, n = c["promoted"], c["trials"]
        rows.append(
            {
                "setting": name,
                "itself_rejected": rate(n["itself"] - p["itself"], n["itself"]),
                "seed_rejected": rate(n["seed"] - p["seed"], n["seed"]),
                "worse_promoted": rate(*c["worse_by_margin"]),
                "boundary_promoted": rate(*c["boundary"]),
                "served_promoted": rate(p.get("served", 0), n.get("served", 0)),
            }
        )
    return rows


def _pct(r: Mapping[str, float | int]) -> str:
    if not r["n"]:
        return "n/a"
    return f"{100 * r['rate']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"


def markdown(results: Mapping[str, Any]) -> str:
    lines = [
        "# Gate error rates (cssl bench gate)",
        "",
        f"- when: {results['when']}; host: {results['host']}; load {results['loadavg']}",
        f"- models: {results['models']}",
        f"- eval splits: {results['eval']}",
        f"- replicates: {results['replicates']} per pair; pairs {results['trials']['pairs']}; "
        f"gate bootstrap {results['bootstrap_samples']} resamples",
        f"- decide() agreed with the shared-bootstrap rule on "
        f"{results['trials']['agreement']['same']}/{results['trials']['agreement']['checked']}"
        " trials",
        "",
        "| setting | champion itself rejected | same recipe, other seed rejected | "
        "worse by >= margin promoted | boundary (worse by exactly margin) promoted | "
        "refresh vs real champion promoted |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["summary"]:
        lines.append(
            f"| {row['setting']} | {_pct(row['itself_rejected'])} | {_pct(row['seed_rejected'])} "
            f"| {_pct(row['worse_promoted'])} | {_pct(row['boundary_promoted'])} | "
            f"{_pct(row['served_promoted'])} |"
        )
    lines += ["", "Full-split differences (candidate - champion) per pair:", ""]
    for pair, d in results["trials"]["deltas"].items():
        lines.append(f"- {pair}: " + ", ".join(f"{p} {v:+.3f}" for p, v in d.items()))
    return "\n".join(lines) + "\n"


def run_benchmark(
    out: Path,
    params: Params,
    *,
    seeds: Sequence[int],
    worse_seeds: Sequence[int],
    replicates: int,
    margins: Sequence[float],
    check_decide: int,
    log: Callable[[str], None],
    worse_recipes: Sequence[str] = tuple(WORSE_RECIPES),
) -> dict[str, Any]:
    from cssl_core.data.storage import atomic_write_json, atomic_write_text

    if len(seeds) < 2:
        raise ValueError("--seeds needs at least two seeds (pairs of equivalent candidates)")
    unknown = [r for r in worse_recipes if r not in WORSE_RECIPES]
    if unknown:
        raise ValueError(f"--worse-recipes: unknown {unknown}; choose from {list(WORSE_RECIPES)}")
    loads = [os.getloadavg()[0]]
    mp = measure_params(params)
    results, info = models_and_outcomes(out, mp, seeds, worse_seeds, log, worse_recipes)
    trials = run_trials(results, seeds, mp.gate, margins, replicates, check_decide, log)
    loads.append(os.getloadavg()[0])
    first = results[CHAMPION]
    payload = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "host": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or '?'})",
        "loadavg": [round(x, 1) for x in loads],
        "models": (
            f"{mp.model.backbone} at {mp.model.input_size} px, {mp.train.steps} steps of "
            f"{mp.train.batch_size}, strategy {mp.train.strategy}; lineage p01->p02 (seed 0), "
            f"p03 candidates: seeds {list(seeds)}, damaged {list(worse_recipes)} x seeds "
            f"{list(worse_seeds)}"
        ),
        "eval": ", ".join(
            f"{p}: {len(first[p])} frames in {first[p].n_clusters} streams" for p in PERIODS
        ),
        "simulate": mp.simulate.model_dump(mode="json"),
        "train_seconds": info["train_seconds"],
        "replicates": replicates,
        "bootstrap_samples": mp.gate.bootstrap_samples,
        "gate": mp.gate.model_dump(mode="json"),
        "trials": trials,
        "summary": summarise(trials),
    }
    atomic_write_json(out / RESULTS_JSON, payload)
    atomic_write_text(out / RESULTS_MD, markdown(payload))
    return payload


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed arguments (``cssl bench gate`` calls this)."""
    results = run_benchmark(
        Path(args.out),
        load_bench_params(args),
        seeds=args.seeds,
        worse_seeds=args.worse_seeds,
        replicates=args.replicates,
        margins=args.margins,
        check_decide=args.check_decide,
        log=log,
        worse_recipes=getattr(args, "worse_recipes", tuple(WORSE_RECIPES)),
    )
    emit_results(args, results["summary"], [markdown(results)], Path(args.out) / RESULTS_MD)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.gate ...``, the same as ``cssl bench gate``."""
    from benchmarks.cli import main as bench_main

    return bench_main(["gate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
