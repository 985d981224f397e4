r"""``cssl bench compat``: backward compatibility of a lineage under each ``compat.mode``.

For every dataset and seed, the periods run through :func:`cssl_core.period.run_stream` (the
product's period loop) with ``train.strategy`` from the preset, once per training mode, all
continuing from one shared first period (period 1 has no parent, so no mode changes it):

- ``adapter`` trains the backbone exactly as ``none`` does (the adapter is fitted after
  training and never touches the backbone; ``tests/test_compat_train.py`` checks the weights
  are bit-identical), so ONE run gives both the ``none`` lineage (the models' own features)
  and the ``adapter`` lineage (new queries through the adapters, chained back to older
  versions: ``A_j+1 ∘ ... ∘ A_i`` maps version ``i`` into version ``j``);
- ``align`` is a run of its own (the alignment term changes the backbone).

Retrieval (:mod:`cssl_core.evaluation.compatibility`): queries = up to
``bench.compat_frames_per_period`` labelled eval frames of every period, gallery = as many
labelled train (reference) frames of every period; cosine top-1 and mAP@10. For every earlier
version ``j < i`` of the lineage: ``M[i, j]`` against ``M[j, j]`` (CL2R's criterion; average
compatibility AC = share of pairs with ``M[i, j] >= M[j, j]``), and the instance-level
top-1 of each pair (a query frame's version-``i`` embedding finds its own version-``j``
embedding among every query frame's: near-duplicate search across versions,
:func:`~cssl_core.evaluation.compatibility.instance_top1`). New/new quality is
``M[T, T]`` of the final model against ``none``'s. The gate metric is the kNN accuracy of
the final model on every period's eval split, as the difference to ``none`` with a paired,
stratified cluster-bootstrap interval (:func:`benchmarks.continual.stratified_difference`),
per seed and pooled over the seeds.

This module's top level imports only the standard library (``cssl --help`` stays instant).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.cli import _csv, _seeds

MODES = ("none", "adapter", "align")
Log = Callable[[str], None]


def add_compat_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cssl bench compat`` (``--params``/``--set``/``--json`` come from cssl)."""
    p.add_argument(
        "--datasets",
        type=_csv,
        default=("stream", "cifar10"),
        help="comma-separated datasets (default stream,cifar10)",
    )
    p.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="comma-separated (0,1,2)")
    p.add_argument("--periods", type=int, default=3, help="periods per lineage (default 3)")
    p.add_argument(
        "--modes", type=_csv, default=MODES, help="comma-separated compat modes (all three)"
    )
    p.add_argument(
        "--preset", default="default", help="benchmarks/presets/<name>.yaml (default: default)"
    )
    p.add_argument("--out", required=True, type=Path, help="results directory")


def cmd_compat(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments; results in ``--out``, summary on stdout."""

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = run_benchmark(
        datasets=args.datasets,
        seeds=args.seeds,
        periods=args.periods,
        modes=args.modes,
        preset=args.preset,
        out=args.out,
        params_path=Path(args.params) if getattr(args, "params", None) else None,
        overrides=tuple(getattr(args, "set", None) or ()),
        log=log,
    )
    if getattr(args, "json", False):
        print(json.dumps(results["summary"], indent=2))
    else:
        print(format_markdown(results))
    return 0


# -- the measurement ---------------------------------------------------------------------


def run_benchmark(
    *,
    datasets: Sequence[str],
    seeds: Sequence[int],
    periods: int,
    modes: Sequence[str],
    preset: str,
    out: Path,
    params_path: Path | None = None,
    overrides: Sequence[str] = (),
    log: Log = lambda _: None,
) -> dict[str, Any]:
    """Every dataset x seed (see the module docstring); writes ``results.json`` and
    ``results.md`` into ``out`` and returns the results. A cell already in ``out/runs`` with
    the same preset, overrides, periods and modes is read back, not rerun (so a stopped run
    resumes, and cells run by separate processes are assembled by one more call)."""
    import torch

    from benchmarks.continual import machine_info, resolve_config

    bad = [m for m in modes if m not in MODES]
    if bad or not modes or "none" not in modes:
        raise ValueError(f"--modes takes {', '.join(MODES)} and must include none, got {modes}")
    if periods < 2:
        raise ValueError(f"--periods must be >= 2 to have an earlier version, got {periods}")
    tree, bench = resolve_config(preset, params_path, overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(tree.get("train", {}).get("num_threads") or 1)))
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    started = time.perf_counter()
    cells: list[dict[str, Any]] = []
    setting = {"preset": preset, "overrides": list(overrides), "periods": periods}
    setting["modes"] = list(modes)
    try:
        for dataset in datasets:
            for seed in seeds:
                path = out / "runs" / f"{dataset}_seed{seed}.json"
                done = json.loads(path.read_text()) if path.is_file() else None
                if done is not None and done.get("setting") == setting:
                    log(f"{dataset} seed {seed}: kept from {path}")
                    cells.append(done)
                    continue
                cell = _run_cell(dataset, seed, periods, modes, tree, bench, out, log)
                cell["setting"] = setting
                cells.append(cell)
                _write_json(path, cell)
    finally:
        torch.set_num_threads(threads)
    machine["load_average_end"] = list(os.getloadavg())
    machine["bench_wall_s"] = time.perf_counter() - started
    results = {
        "preset": preset,
        "overrides": list(overrides),
        "periods": periods,
        "seeds": list(seeds),
        "modes": list(modes),
        "machine": machine,
        "cells": cells,
        "summary": summarize(cells, modes),
    }
    _write_json(out / "results.json", results)
    (out / "results.md").write_text(format_markdown(results), encoding="utf-8")
    return results


def _run_cell(
    dataset: str,
    seed: int,
    periods: int,
    modes: Sequence[str],
    tree: Mapping[str, Any],
    bench: Any,
    out: Path,
    log: Log,
) -> dict[str, Any]:
    """One dataset and seed: the shared first period, one run per training mode, the
    retrieval matrices and the kNN outcomes."""
    from benchmarks.continual import params_for, stratified_difference, with_run
    from benchmarks.datasets import build_dataset, parse_dataset
    from cssl_core.config import params_from_dict
    from cssl_core.period import eval_sets_for, evaluate_model, run_period, run_stream

    t0 = time.perf_counter()
    spec = parse_dataset(dataset)
    base = params_for(tree, ["p01"])
    per_seed = spec.kind == "stream"
    data = build_dataset(
        spec,
        out / "data" / (f"seed{seed}" if per_seed else ""),
        simulate=base.simulate.model_copy(update={"seed": seed}) if per_seed else base.simulate,
        ingest_cfg=base.ingest,
        num_periods=periods,
        train_cap=bench.train_frames_per_period,
        eval_cap=bench.eval_frames_per_period,
        seed=bench.data_seed,
    )
    shards = data.shards[:periods]
    chained = params_for(tree, [s.period for s in shards])
    params = with_run(chained, chained.train.strategy, seed)
    if spec.kind != "stream" and params.eval.cluster == "stream":
        # CIFAR's test images are independent draws ingested as one stream: the frame is the
        # bootstrap unit (one cluster would give no interval).
        params = params.model_copy(
            update={"eval": params.eval.model_copy(update={"cluster": "frame"})}
        )

    def with_mode(mode: str) -> Any:
        dumped = params.model_dump(mode="json")
        dumped["compat"]["mode"] = mode
        return params_from_dict(dumped, f"compat.mode={mode}")

    from cssl_core.learn.job import PeriodInputs
    from cssl_core.memory.replay import ReplayMemory

    first = run_period(
        PeriodInputs(
            params=params,
            period=shards[0].period,
            shard=shards[0],
            memory=ReplayMemory.empty(params.replay.capacity),
        )
    )
    train_modes = ["adapter"] + (["align"] if "align" in modes else [])
    lineages: dict[str, list[Any]] = {}
    train_s: dict[str, float] = {}
    for mode in train_modes:
        t = time.perf_counter()
        results = list(run_stream(with_mode(mode), shards, first=first))
        lineages[mode] = [r.model for r in results]
        train_s[mode] = time.perf_counter() - t
        log(f"{dataset} seed {seed}: trained {mode} in {train_s[mode]:.0f}s")
    eval_sets = eval_sets_for(shards, params)
    retrieval = _retrieval(lineages, eval_sets, bench.compat_frames_per_period, params)
    knn = {mode: evaluate_model(models[-1], eval_sets, params) for mode, models in lineages.items()}
    cell: dict[str, Any] = {
        "dataset": dataset,
        "seed": seed,
        "strategy": params.train.strategy,
        "periods": [s.period for s in shards],
        "train_wall_s": train_s,
        "retrieval": retrieval,
        "knn": {},
    }
    reference = knn["adapter"]  # the none lineage's final model (same backbone)
    for mode in modes:
        scores = knn["align"] if mode == "align" else reference
        strata = _strata(scores, reference)
        diff = stratified_difference(strata, seed=seed)
        cell["knn"][mode] = {
            "per_period": {p: float(s.knn) for p, s in scores.items()},
            "average": float(sum(s.knn for s in scores.values()) / len(scores)),
            "diff_vs_none": diff.to_dict(),
            "strata": [
                {"correct": a.tolist(), "reference": b.tolist(), "clusters": list(c)}
                for a, b, c in strata
            ],
        }
    cell["wall_s"] = time.perf_counter() - t0
    log(f"{dataset} seed {seed}: done in {cell['wall_s']:.0f}s")
    return cell


def _strata(scores: Mapping[str, Any], reference: Mapping[str, Any]) -> list[Any]:
    """``(correct, reference correct, clusters)`` of every period: paired kNN outcomes."""
    import numpy as np

    out = []
    for p, s in scores.items():
        mine, ref = s.frames, reference[p].frames
        if mine is None or ref is None:
            raise ValueError(f"period {p}: no per-frame outcomes to pair")
        out.append((mine.correct("knn"), ref.correct("knn"), np.asarray(mine.clusters)))
    return out


def _retrieval(
    lineages: Mapping[str, list[Any]], eval_sets: Mapping[str, Any], cap: int, params: Any
) -> dict[str, Any]:
    """Per mode: every ``M[i, j]`` (``j <= i``) of the lineage, top-1 and mAP@10, and the
    instance-level top-1 (the query frames' own old embeddings found, ``instance_top1``)."""
    import torch.nn.functional as F

    from cssl_core.evaluation.compatibility import instance_top1, retrieval_quality
    from cssl_core.evaluation.evaluate import extract_features

    q_img, q_lab, g_img, g_lab = [], [], [], []
    for es in eval_sets.values():
        q = [(i, y) for i, y in zip(es.test_images, es.test_labels, strict=True) if y][:cap]
        g = [(i, y) for i, y in zip(es.train_images, es.train_labels, strict=True) if y][:cap]
        q_img += [i for i, _ in q]
        q_lab += [y for _, y in q]
        g_img += [i for i, _ in g]
        g_lab += [y for _, y in g]
    size = params.model.input_size
    cache: dict[str, tuple[Any, Any]] = {}

    def feats(model: Any) -> tuple[Any, Any]:
        key = model.state_fingerprint()
        if key not in cache:
            cache[key] = (
                extract_features(model, q_img, size),
                extract_features(model, g_img, size),
            )
        return cache[key]

    def quality(q: Any, g: Any) -> dict[str, float]:
        r = retrieval_quality(q, g, q_lab, g_lab, k=10)
        return {"top1": r.top1, "map": r.map_at_k}

    out: dict[str, Any] = {"queries": len(q_lab), "gallery": len(g_lab)}
    views = {"none": "adapter", "adapter": "adapter", "align": "align"}
    for mode, source in views.items():
        if source not in lineages:
            continue
        models = lineages[source]
        cells: dict[str, dict[str, float]] = {}
        for i, new in enumerate(models):
            q_new = feats(new)[0]
            for j in range(i, -1, -1):
                if mode == "adapter" and j < i:
                    # map version j+1's space into version j's: chain the adapters down.
                    adapter = models[j + 1]
                    q_new = adapter.to_parent_space(F.normalize(q_new, dim=1)).detach()
                query = q_new if j < i else feats(new)[0]
                cells[f"{i + 1},{j + 1}"] = {
                    **quality(query, feats(models[j])[1]),
                    "instance": instance_top1(query, feats(models[j])[0]),
                }
        out[mode] = cells
    return out


# -- summary -----------------------------------------------------------------------------


def summarize(cells: Sequence[Mapping[str, Any]], modes: Sequence[str]) -> dict[str, Any]:
    """Per dataset and mode: average compatibility over seeds and pairs, the worst
    ``M[i, j] - M[j, j]``, new/new quality vs none, and the kNN difference pooled over
    seeds (strata = periods x seeds)."""
    import numpy as np

    from benchmarks.continual import stratified_difference

    summary: dict[str, Any] = {}
    for dataset in dict.fromkeys(c["dataset"] for c in cells):
        mine = [c for c in cells if c["dataset"] == dataset]
        per_mode: dict[str, Any] = {}
        for mode in modes:
            pairs, margins, new_new, new_new_map, instance = [], [], [], [], []
            for c in mine:
                m = c["retrieval"][mode]
                own = c["retrieval"]["none"] if mode == "adapter" else m
                t = len(c["periods"])
                for i in range(2, t + 1):
                    for j in range(1, i):
                        cross = m[f"{i},{j}"]["top1"]
                        ref = own[f"{j},{j}"]["top1"]
                        pairs.append(cross >= ref)
                        margins.append(cross - ref)
                        instance.append(m[f"{i},{j}"].get("instance", math.nan))
                new_new.append(own[f"{t},{t}"]["top1"])
                new_new_map.append(own[f"{t},{t}"]["map"])
            ref_new = [
                c["retrieval"]["none"][f"{len(c['periods'])},{len(c['periods'])}"] for c in mine
            ]
            strata = [
                (np.array(s["correct"]), np.array(s["reference"]), _clusters(c["dataset"], s))
                for c in mine
                for s in c["knn"][mode]["strata"]
            ]
            pooled = stratified_difference(strata, seed=0)
            per_mode[mode] = {
                "average_compatibility": float(np.mean(pairs)),
                "pairs": len(pairs),
                "worst_margin_top1": float(min(margins)),
                "mean_margin_top1": float(np.mean(margins)),
                "new_new_top1": float(np.mean(new_new)),
                "new_new_map": float(np.mean(new_new_map)),
                "instance_top1": float(np.mean(instance)),
                "new_new_top1_vs_none": float(
                    np.mean(new_new) - np.mean([r["top1"] for r in ref_new])
                ),
                "new_new_map_vs_none": float(
                    np.mean(new_new_map) - np.mean([r["map"] for r in ref_new])
                ),
                "knn_average": float(np.mean([c["knn"][mode]["average"] for c in mine])),
                "knn_diff_vs_none": pooled.to_dict(),
                "knn_diff_vs_none_per_seed": [
                    stratified_difference(
                        [
                            (
                                np.array(s["correct"]),
                                np.array(s["reference"]),
                                _clusters(c["dataset"], s),
                            )
                            for s in c["knn"][mode]["strata"]
                        ],
                        seed=c["seed"],
                    ).to_dict()
                    for c in mine
                ],
            }
        summary[dataset] = per_mode
    return summary


def _clusters(dataset: str, stratum: Mapping[str, Any]) -> Any:
    """The bootstrap units of one stored stratum: its clusters, except for a dataset of
    independent images stored as one stream (CIFAR), whose frames are the units."""
    import numpy as np

    clusters = np.array(stratum["clusters"])
    if dataset != "stream" and len(set(clusters.tolist())) < 2:
        return np.arange(len(clusters))
    return clusters


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.1f}"


def format_markdown(results: Mapping[str, Any]) -> str:
    """The summary table (points = percentage points) and each cell's matrix."""
    lines = [
        f"Preset {results['preset']} {' '.join(results['overrides'])}; {results['periods']} "
        f"periods; seeds {', '.join(map(str, results['seeds']))}.",
        "",
        "| dataset | mode | AC (top-1) | worst M[i,j]-M[j,j] | mean M[i,j]-M[j,j] | "
        "new/new top-1 (vs none) | new/new mAP@10 (vs none) | instance top-1 (new, old) | "
        "kNN avg | kNN - none [95% CI] |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for dataset, per_mode in results["summary"].items():
        for mode, s in per_mode.items():
            d = s["knn_diff_vs_none"]
            lines.append(
                f"| {dataset} | {mode} | {s['average_compatibility']:.2f} ({s['pairs']} pairs) | "
                f"{_pct(s['worst_margin_top1'])} | {_pct(s['mean_margin_top1'])} | "
                f"{s['new_new_top1']:.3f} ({_pct(s['new_new_top1_vs_none'])}) | "
                f"{s['new_new_map']:.3f} ({_pct(s['new_new_map_vs_none'])}) | "
                f"{s.get('instance_top1', math.nan):.3f} | {s['knn_average']:.3f} | "
                f"{_pct(d['estimate'])} [{_pct(d['low'])}, {_pct(d['high'])}] |"
            )
    lines.append("")
    for c in results["cells"]:
        lines.append(f"{c['dataset']} seed {c['seed']} (top-1 M[i,j], rows i = query version):")
        for mode in results["modes"]:
            m = c["retrieval"][mode]
            row = ", ".join(f"M[{k}]={v['top1']:.3f}" for k, v in m.items())
            lines.append(f"- {mode}: {row}")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, obj: Any) -> None:
    from cssl_core.data.storage import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)
