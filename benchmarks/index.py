"""Benchmark: the embedding index (build time, search latency exact vs ANN) and backfill
throughput against bare batched inference, with peak memory by archive size.

**Vectors.** ``--sizes`` synthetic vectors of dimension ``--dim`` (512: the default model's
feature size, resnet18) are written through :class:`~pipelines.index.EmbeddingIndex` (the
product's write path, 50,000 rows per call), then ``--queries`` top-10 searches run exactly
(brute force), an IVF_PQ index is built (``ensure_ann_index``: sqrt(N) partitions, dim/16
sub-vectors, cosine) and the same searches run again; recall@10 is the share of the exact top-10
the ANN search returns. The vectors are a mixture of 1,000 Gaussian clusters on the unit sphere
(cosine to the own centre about 0.7), so neighbourhoods exist as in real embeddings; queries
are fresh draws from the mixture. Uniform random vectors would make every ANN index look bad
(no structure) and every exact search look like any other.

**Backfill.** Archives of ``--frames`` real CIFAR-10 images (JPEG, 32x32, upscaled to the
model's 64 px input), in shards of 2,000 frames, are indexed with one random-init default model
(version 1), then backfilled to another (version 2) with :func:`~pipelines.backfill.run_backfill`
(plan by uncertainty, copy, read from shards, decode, embed, commit, switch: the whole run).
The bare side embeds the same frames with the same model and batch size from images already
in memory (decode + forward only). Each side runs in a fresh process with the model loaded and
one batch run untimed first; ``ratio`` = bare seconds / backfill seconds (goal >= 0.8), and the
peak RSS of the backfill process is compared across archive sizes (goal: flat).

**Backfill curve.** Retrieval quality while an index is backfilled, in priority order
(:func:`~cssl_core.evaluation.backfill_order.density_uncertainty`, what ``cssl backfill``
uses) against random orders (FastFill's comparison). Split CIFAR-10, class-incremental: an old
model is trained (SimCLR, from scratch) on p01 (airplane, automobile), the new one fine-tuned
from it on p02 (bird, cat) without distillation, so its space is not the old one's. Gallery:
the train frames of both periods; queries: their eval frames; quality is mAP@10 and top-1 with
relevant = same class (:func:`~cssl_core.evaluation.backfill_order.backfill_curve`: rows not yet
re-embedded are searched with the old model's query, as ``cssl search`` does during a
backfill). Reported: the smallest re-embedded fraction (step 0.05) whose quality reaches 95% of
the fully backfilled quality (goal <= 0.30), for the priority order and the random orders.

Run it with ``cssl bench index`` (or ``python -m benchmarks.index``) ``[--sizes 100000
1000000] [--frames 1000 4000] [--curve-steps 200]``. Torch is imported only by the measuring
functions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WRITE_ROWS = 50_000
CLUSTERS = 1_000
SHARD_FRAMES = 2_000


def _peak_rss_mb() -> float:
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


# -- vectors ------------------------------------------------------------------------------------


def _mixture(rng: Any, centres: Any, n: int) -> Any:
    import numpy as np

    dim = centres.shape[1]
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _rows(start: int, emb: Any) -> Any:
    import numpy as np
    import pyarrow as pa

    from pipelines.index import META_SCHEMA, FrameRows

    n = len(emb)
    meta = pa.table(
        {
            "frame_id": [f"{i:032x}" for i in range(start, start + n)],
            "period": ["p01"] * n,
            "stream_id": [f"s{i % 997}" for i in range(start, start + n)],
            "category": [None] * n,
            "split": ["train"] * n,
            "shard_fingerprint": ["synthetic"] * n,
            "part": pa.array(np.zeros(n, dtype=np.int32)),
            "row": pa.array(np.arange(start, start + n, dtype=np.int64)),
        },
        schema=META_SCHEMA,
    )
    return FrameRows(meta, emb)


def _latencies(index: Any, queries: Any, k: int) -> tuple[list[float], list[list[str]]]:
    times, results = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = index.search(q, k)
        times.append((time.perf_counter() - t0) * 1000)
        results.append([h.frame_id for h in hits])
    return times, results


def _pct(values: list[float], p: float) -> float:
    import numpy as np

    return float(np.percentile(values, p))


def measure_vectors(n: int, dim: int, queries: int, workdir: str, seed: int = 0) -> dict[str, Any]:
    """Build and search an index of ``n`` synthetic vectors (run in a child process)."""
    import numpy as np

    from pipelines.index import EmbeddingIndex

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    path = Path(workdir) / f"vectors-{n}"
    shutil.rmtree(path, ignore_errors=True)
    index = EmbeddingIndex(path, ann_min_rows=n + 1)  # no ANN index until asked for below
    t0 = time.perf_counter()
    for start in range(0, n, WRITE_ROWS):
        index.add(_rows(start, _mixture(rng, centres, min(WRITE_ROWS, n - start))), 1)
    build_s = time.perf_counter() - t0
    qs = _mixture(rng, centres, queries)
    index.search(qs[0], 10)  # warm-up: table open, caches
    exact_ms, exact = _latencies(index, qs, 10)
    index.ann_min_rows = n
    t0 = time.perf_counter()
    built = index.ensure_ann_index()
    ann_build_s = time.perf_counter() - t0
    index.search(qs[0], 10)
    ann_ms, ann = _latencies(index, qs, 10)
    recall = float(
        np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(ann, exact, strict=True)])
    )
    out = {
        "rows": n,
        "dim": dim,
        "queries": queries,
        "build_s": build_s,
        "build_rows_per_s": n / build_s,
        "exact_p50_ms": _pct(exact_ms, 50),
        "exact_p95_ms": _pct(exact_ms, 95),
        "ann_built": built,
        "ann_build_s": ann_build_s,
        "ann_p50_ms": _pct(ann_ms, 50),
        "ann_p95_ms": _pct(ann_ms, 95),
        "ann_recall_at_10": recall,
        "disk_mb": _dir_mb(path),
        "peak_rss_mb": _peak_rss_mb(),
    }
    shutil.rmtree(path, ignore_errors=True)
    return out


# -- backfill -----------------------------------------------------------------------------------


def make_archive(frames: int, root: Path, cifar: Path) -> list[str]:
    """Shards of ``SHARD_FRAMES`` real CIFAR-10 frames each (the first ``frames`` train rows)."""
    from datetime import UTC, datetime, timedelta

    import pyarrow.parquet as pq

    from cssl_core.data.shard import Frame, ShardWriter

    reader = pq.ParquetFile(cifar)
    batches = reader.iter_batches(SHARD_FRAMES, columns=["image", "label_name"])
    dirs, taken, t0 = [], 0, datetime(2026, 1, 1, tzinfo=UTC)
    for p, batch in enumerate(batches):
        if taken >= frames:
            break
        period = f"a{p + 1:02d}"
        with ShardWriter(root, period, eval_fraction=0.0) as writer:
            rows = batch.to_pylist()[: frames - taken]
            for i, r in enumerate(rows):
                writer.add(
                    Frame(
                        r["image"],
                        f"clip{i // 50}",
                        t0 + timedelta(seconds=i),
                        "cifar10",
                        r["label_name"],
                    )
                )
            writer.commit()
        taken += len(rows)
        dirs.append(str(root / period))
    return dirs


def _warm_model(model_dir: str, threads: int, batch_size: int) -> Any:
    import torch

    from cssl_core.learn.models import Embedder

    torch.set_num_threads(threads)
    model = Embedder.load(model_dir).eval()
    x = torch.zeros(batch_size, 3, model.cfg.input_size, model.cfg.input_size)
    with torch.inference_mode():
        model.features(x)  # warm-up: allocator, kernels
    return model


def measure_bare(
    shards: list[str], model_dir: str, batch_size: int, threads: int
) -> dict[str, Any]:
    """Batched inference of the model on the archive's frames, images already in memory."""
    from cssl_core.data.shard import Shard
    from pipelines.index_build import embed_images

    images = [img for s in shards for img in Shard.open(s).read(["image"])["image"].to_pylist()]
    model = _warm_model(model_dir, threads, batch_size)
    embed_images(model, images[:batch_size], batch_size)
    t0 = time.perf_counter()
    embed_images(model, images, batch_size)
    seconds = time.perf_counter() - t0
    return {"rows": len(images), "seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def measure_backfill(
    index_dir: str,
    shards: list[str],
    model_dir: str,
    chunk_size: int,
    batch_size: int,
    threads: int,
) -> dict[str, Any]:
    """The whole ``run_backfill`` of a version-1 index to version 2 (plan to switch)."""
    from pipelines.backfill import load_model, run_backfill

    model = _warm_model(model_dir, threads, batch_size)
    load_model(model_dir)  # the cached model run_backfill uses, loaded before timing
    del model
    before = _peak_rss_mb()
    t0 = time.perf_counter()
    report = run_backfill(
        index_dir, shards, model_dir, 2, chunk_size=chunk_size, batch_size=batch_size
    )
    seconds = time.perf_counter() - t0
    if not report.switched:
        raise RuntimeError("the benchmark backfill did not switch to version 2")
    return {
        "rows": report.rows,
        "seconds": seconds,
        "embed_seconds": report.embed_seconds,
        "chunks": report.chunks,
        "rss_before_mb": before,
        "peak_rss_mb": _peak_rss_mb(),
    }


def measure_build(
    index_dir: str, shards: list[str], model_dir: str, batch_size: int, threads: int
) -> dict[str, Any]:
    """``build_index`` of the archive with the version-1 model."""
    from pipelines.index_build import build_index

    _warm_model(model_dir, threads, batch_size)
    t0 = time.perf_counter()
    report = build_index(shards, model_dir, 1, index_dir, batch_size=batch_size)
    return {
        "rows": report.rows_written,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": _peak_rss_mb(),
    }


def measure_curve(
    workdir: str,
    cifar: str,
    train_frames: int,
    eval_frames: int,
    steps: int,
    threads: int,
    random_orders: int,
    seed: int = 0,
) -> dict[str, Any]:
    """The backfill curve of a priority order and of random orders (see the module doc)."""
    import numpy as np
    import torch

    from benchmarks.datasets import build_cifar10
    from cssl_core.config import params_from_dict
    from cssl_core.evaluation.backfill_order import (
        backfill_curve,
        density_uncertainty,
        priority_order,
        random_order,
    )
    from cssl_core.learn.job import PeriodInputs, train_in_process
    from cssl_core.memory.replay import ReplayMemory
    from pipelines.index_build import embed_images

    torch.set_num_threads(threads)
    data = build_cifar10(
        Path(workdir) / "curve-shards",
        source=cifar,
        num_periods=2,
        train_cap=train_frames,
        eval_cap=eval_frames,
        seed=seed,
    )
    params = params_from_dict(
        {
            "periods": {"p01": {"previous": ""}, "p02": {"previous": "p01"}},
            "model": {"backbone": "resnet10t", "input_size": 32},
            "train": {
                "strategy": "finetune",
                "steps": steps,
                "batch_size": 128,
                "warmup_steps": max(1, steps // 10),
                "precision": "fp32",
                "num_threads": threads,
                "seed": seed,
            },
        }
    )
    t0 = time.perf_counter()
    old, _ = train_in_process(
        PeriodInputs(
            params=params,
            period="p01",
            shard=data.shards[0],
            memory=ReplayMemory.empty(params.replay.capacity),
        )
    )
    new, _ = train_in_process(
        PeriodInputs(
            params=params,
            period="p02",
            shard=data.shards[1],
            memory=ReplayMemory.empty(params.replay.capacity),
            parent=old,
        )
    )
    train_s = time.perf_counter() - t0
    old.eval()
    new.eval()
    sides = {}
    for split in ("train", "eval"):
        tables = [s.read(["image", "category"], split=split) for s in data.shards]
        images = [img for t in tables for img in t["image"].to_pylist()]
        labels = [c for t in tables for c in t["category"].to_pylist()]
        sides[split] = (embed_images(old, images), embed_images(new, images), labels)
    g_old, g_new, g_labels = sides["train"]
    q_old, q_new, q_labels = sides["eval"]
    n = len(g_old)
    fractions = tuple(round(f, 2) for f in np.linspace(0.0, 1.0, 21))
    priority = priority_order(density_uncertainty(g_old, g_old, 10, exclude=np.arange(n)))
    orders = {"priority": priority}
    orders |= {f"random-{i}": random_order(n, seed + i) for i in range(random_orders)}
    curves = {}
    for name, order in orders.items():
        c = backfill_curve(order, q_new, q_old, g_new, g_old, q_labels, g_labels, fractions)
        curves[name] = {
            "map_at_10": list(c.map_at_k),
            "top1": list(c.top1),
            "reach95_map": c.fraction_to_reach(0.95, "map"),
            "reach95_top1": c.fraction_to_reach(0.95, "top1"),
            "area_map": c.area("map"),
        }
    randoms = [v for k, v in curves.items() if k.startswith("random")]
    return {
        "gallery": n,
        "queries": len(q_old),
        "steps": steps,
        "train_seconds": train_s,
        "fractions": list(fractions),
        "curves": curves,
        "random_reach95_map_mean": float(np.mean([r["reach95_map"] for r in randoms]))
        if randoms
        else None,
    }


_CHILD = (
    "import json, sys; from benchmarks import index as b; "
    "print(json.dumps(getattr(b, sys.argv[1])(*json.loads(sys.argv[2]))))"
)


def _in_child(name: str, *args: Any, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``name(*args)`` (a function of this module) in a fresh interpreter; its JSON."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, name, json.dumps(args)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_index_benchmark(
    sizes: Sequence[int] = (100_000, 1_000_000),
    frames: Sequence[int] = (1_000, 4_000),
    *,
    dim: int = 512,
    queries: int = 200,
    chunk_size: int = 512,
    batch_size: int = 128,
    threads: int | None = None,
    repeats: int = 2,
    backbone: str = "resnet18",
    input_size: int = 64,
    workdir: Path | None = None,
    cifar: Path | None = None,
    log: Any = None,
    curve_steps: int = 200,
    curve_train_frames: int = 2000,
    curve_eval_frames: int = 500,
    random_orders: int = 3,
) -> dict[str, Any]:
    """The three parts; ``sizes`` or ``frames`` may be empty and ``curve_steps`` 0 to skip
    one. Bare and backfill runs alternate ``repeats`` times per archive (each backfill on a
    fresh copy of the built index); the fastest of each side is reported with the medians."""
    from benchmarks.datasets import default_cifar10_source

    threads = threads or os.cpu_count() or 1
    say = log or (lambda msg: None)
    result: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "repeats": repeats,
        "model": {"backbone": backbone, "input_size": input_size},
        "load_before": os.getloadavg(),
        "vectors": [],
        "backfill": [],
        "curve": None,
    }
    with tempfile.TemporaryDirectory(prefix="cssl-bench-index-", dir=workdir) as tmp:
        home = Path(tmp)
        env = {**os.environ, "CSSL_HOME": str(home / "home")}
        for n in sizes:
            say(f"vectors: {n} x {dim}")
            result["vectors"].append(_in_child("measure_vectors", n, dim, queries, tmp, env=env))
        if frames:
            models = _save_models(home, backbone, input_size)
            source = Path(cifar) if cifar else default_cifar10_source()
            for f in frames:
                say(f"backfill: archive of {f} frames")
                shards = make_archive(f, home / f"archive-{f}", source)
                built = home / f"index-{f}-built"
                build = _in_child(
                    "measure_build", str(built), shards, models[0], batch_size, threads, env=env
                )
                bares, fills = [], []
                for r in range(repeats):
                    run = home / f"index-{f}-run{r}"
                    shutil.copytree(built, run)
                    args = (shards, models[1], batch_size, threads)
                    bares.append(_in_child("measure_bare", *args, env=env))
                    fill_args = (str(run), shards, models[1], chunk_size, batch_size, threads)
                    fills.append(_in_child("measure_backfill", *fill_args, env=env))
                    shutil.rmtree(run)
                bare, fill = _best(bares), _best(fills)
                result["backfill"].append(
                    {
                        "frames": f,
                        "build": build,
                        "bare": bare,
                        "backfill": fill,
                        "ratio": bare["seconds"] / fill["seconds"],
                        "ratio_median": bare["median_seconds"] / fill["median_seconds"],
                    }
                )
        if curve_steps > 0:
            say(f"backfill curve: two models of {curve_steps} steps on split CIFAR-10")
            source = Path(cifar) if cifar else default_cifar10_source()
            result["curve"] = _in_child(
                "measure_curve",
                tmp,
                str(source),
                curve_train_frames,
                curve_eval_frames,
                curve_steps,
                threads,
                random_orders,
                env=env,
            )
    if len(result["backfill"]) > 1:
        first, last = result["backfill"][0], result["backfill"][-1]
        result["backfill_peak_rss_growth_mb"] = (
            last["backfill"]["peak_rss_mb"] - first["backfill"]["peak_rss_mb"]
        )
    result["load_after"] = os.getloadavg()
    return result


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run (least disturbed by other load), with the median and the highest peak."""
    import statistics

    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["median_seconds"] = statistics.median(r["seconds"] for r in runs)
    best["all_seconds"] = [round(r["seconds"], 2) for r in runs]
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return best


def _save_models(root: Path, backbone: str, input_size: int) -> list[str]:
    import torch

    from cssl_core.config import ModelConfig
    from cssl_core.learn.models import Embedder

    cfg = ModelConfig(backbone=backbone, input_size=input_size)
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out.append(str(Embedder(cfg).save(root / f"model-v{seed}")))
    return out


def format_index_benchmark(result: dict[str, Any]) -> list[str]:
    load = " ".join(f"{x:.1f}" for x in result["load_before"])
    model = result.get("model", {})
    lines = [
        f"{result['cpu_count']} CPUs, {result['threads']} torch threads, load {load}; backfill "
        f"model {model.get('backbone')} at {model.get('input_size')} px"
    ]
    for v in result["vectors"]:
        lines.append(
            f"{v['rows']:>9} x {v['dim']}: build {v['build_s']:.1f} s "
            f"({v['build_rows_per_s']:.0f} rows/s, {v['disk_mb']:.0f} MB) | exact top-10 p50 "
            f"{v['exact_p50_ms']:.1f} ms p95 {v['exact_p95_ms']:.1f} ms | IVF_PQ build "
            f"{v['ann_build_s']:.1f} s, p50 {v['ann_p50_ms']:.1f} ms p95 {v['ann_p95_ms']:.1f} ms, "
            f"recall@10 {v['ann_recall_at_10']:.3f}"
        )
    for b in result["backfill"]:
        bare, fill = b["bare"], b["backfill"]
        lines.append(
            f"{b['frames']:>6} frames: bare {bare['rows'] / bare['seconds']:.1f} frames/s | "
            f"backfill {fill['rows'] / fill['seconds']:.1f} frames/s ({fill['seconds']:.1f} s, "
            f"embedding {fill['embed_seconds']:.1f} s, peak RSS {fill['peak_rss_mb']:.0f} MB) | "
            f"ratio {b['ratio']:.2f} (medians {b['ratio_median']:.2f}) | build "
            f"{b['build']['rows'] / b['build']['seconds']:.1f} frames/s"
        )
    if "backfill_peak_rss_growth_mb" in result:
        growth = result["backfill_peak_rss_growth_mb"]
        lines.append(f"backfill peak RSS growth, largest vs smallest archive: {growth:+.0f} MB")
    curve = result.get("curve")
    if curve:
        lines.append(
            f"backfill curve ({curve['gallery']} gallery rows, {curve['queries']} queries, "
            f"models of {curve['steps']} steps): mAP@10 / top-1 at fractions "
            + " ".join(f"{f:.2f}" for f in curve["fractions"][::4])
        )
        for name, c in curve["curves"].items():
            maps = " ".join(f"{v:.3f}" for v in c["map_at_10"][::4])
            lines.append(
                f"  {name:<10} mAP@10 {maps} | 95% of full reached at {c['reach95_map']:.2f} "
                f"(mAP) {c['reach95_top1']:.2f} (top-1), area {c['area_map']:.3f}"
            )
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (``cssl bench index`` and ``python -m benchmarks.index``;
    ``--json`` comes from the caller: ``cssl``'s common options, or :func:`main`)."""
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=[100_000, 1_000_000], help="synthetic vector counts"
    )
    parser.add_argument("--dim", type=int, default=512, help="vector dimension (resnet18: 512)")
    parser.add_argument("--queries", type=int, default=200, help="searches per measurement")
    parser.add_argument(
        "--frames", type=int, nargs="*", default=[1_000, 4_000], help="backfill archive sizes"
    )
    parser.add_argument("--chunk-size", type=int, default=512, help="backfill rows per chunk")
    parser.add_argument("--batch-size", type=int, default=128, help="inference batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--repeats", type=int, default=2, help="bare and backfill runs each")
    parser.add_argument("--backbone", default="resnet18", help="model of the backfill part")
    parser.add_argument("--input-size", type=int, default=64, help="its input size")
    parser.add_argument("--workdir", type=Path, default=None, help="temporary files here")
    parser.add_argument(
        "--curve-steps", type=int, default=200, help="training steps per curve model (0: skip)"
    )
    parser.add_argument("--curve-train-frames", type=int, default=2000, help="per period")
    parser.add_argument("--curve-eval-frames", type=int, default=500, help="per period")
    parser.add_argument("--random-orders", type=int, default=3, help="random orders compared")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed :func:`add_arguments` options; progress goes to stderr."""
    from benchmarks.cli import emit, log

    result = run_index_benchmark(
        args.sizes,
        args.frames,
        dim=args.dim,
        queries=args.queries,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        threads=args.threads,
        repeats=args.repeats,
        backbone=args.backbone,
        input_size=args.input_size,
        workdir=args.workdir,
        curve_steps=args.curve_steps,
        curve_train_frames=args.curve_train_frames,
        curve_eval_frames=args.curve_eval_frames,
        random_orders=args.random_orders,
        log=log,
    )
    emit(args, result, format_index_benchmark(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.index ...`` = ``python -m benchmarks index ...``."""
    from benchmarks.cli import main as bench_main

    return bench_main(["index", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
