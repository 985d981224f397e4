"""Backfill: re-embed every row of the embedding index with a new model version.

Two drivers of the same steps (:class:`~pipelines.index.EmbeddingIndex` holds the state):

1. plan -- ``start_backfill`` ranks the live rows (most uncertain first) into chunks and copies
   them to a staging table; a rerun resumes the plan in progress;
2. embed -- each pending chunk's frames are read from their shards and embedded
   (:func:`embed_chunk`: stateless, the model is loaded from a local directory);
3. commit -- one writer commits each chunk's embeddings in one table commit, in plan order;
4. switch -- ``finish_backfill`` flips the live pointer once every row is on the new version.

:func:`run_backfill` runs the steps in this process (chunks one after another). The Prefect flow
:func:`backfill` maps step 2 over chunks on a Dask cluster (``prefect-dask``'s
``DaskTaskRunner``): a local cluster of ``workers`` processes by default, or an existing cluster
given by its scheduler address, which is how it scales past one machine (each worker needs the
model directory and the shards at the same paths, e.g. a shared filesystem). Steps 1, 3 and 4 run
in the flow's process: the index has one writer.

Why Dask: embedding a chunk is stateless (frames in, vectors out) and chunks are independent,
which is a task map; Dask's distributed scheduler is what Prefect maps tasks onto across
machines, with results sent back to the flow, and it is small (29 MB; Ray's runner is 268 MB and
slower to start). torchrun data-parallel inference would need a rendezvous, equal shares per
rank and a collective write path; a failed rank fails the whole job, where a failed Dask task is
retried alone, and new chunks can go to whichever worker is free.

Throughput: a chunk reads only the Parquet row groups holding its frames (the plan orders rows
within a wave by storage), decodes and embeds in batches, and sends back float32 vectors; the
writer's commit is an update of the chunk's rows. Memory per worker is one chunk of images and
features; the flow holds at most ``window`` chunks of vectors.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from cssl_core.data.shard import Shard
from pipelines.index import (
    ChunkEmbeddings,
    ChunkSpec,
    EmbeddingIndex,
    EmbeddingIndexError,
    Order,
)
from pipelines.index_build import embed_images, read_chunk_images


@dataclass(frozen=True)
class BackfillReport:
    """What a backfill run did."""

    index_uri: str
    target_version: int
    source_version: int | None
    rows: int
    chunks: int
    chunks_committed_before: int
    chunks_run: int
    switched: bool
    seconds: float
    embed_seconds: float
    order: str
    workers: tuple[str, ...] = ()  # host:pid of the processes that embedded chunks

    @property
    def rows_per_s(self) -> float:
        return self.rows * self.chunks_run / max(self.chunks, 1) / max(self.seconds, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# One model per worker process, reloaded only when another directory is asked for.
_MODEL_CACHE: dict[tuple[str, str], Any] = {}


def load_model(model_dir: str | Path, device: str = "cpu") -> Any:
    """``Embedder.load(model_dir)`` in eval mode, cached in this process."""
    from cssl_core.learn.models import Embedder

    key = (str(Path(model_dir).absolute()), device)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = Embedder.load(model_dir, device=device).eval()
    return _MODEL_CACHE[key]


def open_shards(shards: Sequence[str | Path | Shard]) -> dict[str, Shard]:
    """Shards by content fingerprint (how index rows name the shard that holds their image)."""
    out: dict[str, Shard] = {}
    for item in shards:
        shard = item if isinstance(item, Shard) else Shard.open(item)
        out[shard.fingerprint] = shard
    return out


def embed_chunk(
    spec: ChunkSpec,
    model_dir: str | Path,
    shard_dirs: dict[str, str],
    batch_size: int = 128,
    device: str = "cpu",
    threads: int | None = None,
) -> ChunkEmbeddings:
    """A chunk's new embeddings: read its frames from the shards (``fingerprint -> directory``)
    and embed them with the model in ``model_dir``. Stateless: any worker can run any chunk."""
    from cssl_core.runtime import torch_threads

    start = time.perf_counter()
    with torch_threads(threads):  # restored after: a chunk run in-process must not leave it
        model = load_model(model_dir, device)
        shards = {fp: Shard.open(path) for fp, path in shard_dirs.items()}
        images = read_chunk_images(spec, shards)
        emb = embed_images(model, images, batch_size, device)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return ChunkEmbeddings(spec.index, spec.frame_ids, emb, time.perf_counter() - start, worker)


class _Run:
    """One run of a backfill: plan (or resume), commit chunks, switch, report. The writer
    side shared by :func:`run_backfill` and the :func:`backfill` flow."""

    def __init__(
        self,
        index: EmbeddingIndex,
        model_dir: str | Path,
        version: int,
        order: Order,
        chunk_size: int,
        waves: int,
        seed: int,
    ) -> None:
        self.index, self.version, self.order = index, version, order
        self.start = time.perf_counter()
        live = index.pointer().live
        self.source_version = live.model_version if live else None
        dim = int(load_model(model_dir).num_features)
        self.state = index.start_backfill(
            version,
            dim,
            order=order,
            chunk_size=chunk_size,
            waves=waves,
            seed=seed,
        )
        self.pending = index.pending_chunks() if self.state else []
        self.done = self.state.chunks - len(self.pending) if self.state else 0
        self.embed_s = 0.0
        self.workers: set[str] = set()

    def commit(self, chunk: ChunkEmbeddings) -> None:
        self.index.commit_chunk(chunk)
        self.embed_s += chunk.seconds
        self.workers.add(chunk.worker)
        self.done += 1

    def finish(self) -> BackfillReport:
        switched = self.index.finish_backfill() if self.state else False
        s = self.state
        return BackfillReport(
            self.index.uri,
            self.version,
            self.source_version,
            s.rows if s else 0,
            s.chunks if s else 0,
            s.chunks - len(self.pending) if s else 0,
            len(self.pending),
            switched,
            time.perf_counter() - self.start,
            self.embed_s,
            s.order if s else self.order,
            tuple(sorted(self.workers)),
        )


def run_backfill(
    index_uri: str | Path | None,
    shards: Sequence[str | Path | Shard],
    model_dir: str | Path,
    version: int,
    *,
    order: Order = "uncertainty",
    chunk_size: int = 512,
    waves: int = 20,
    seed: int = 0,
    batch_size: int = 128,
    device: str = "cpu",
    on_commit: Callable[[int, int], None] | None = None,
) -> BackfillReport:
    """Backfill the index to ``version`` in this process, one chunk after another. Resumable:
    rerun after any interruption and only the chunks not yet committed are embedded; a run
    on an index already on ``version`` does nothing. ``on_commit(chunk, chunks_done)`` is
    called after each commit (progress)."""
    index = EmbeddingIndex(index_uri)
    shard_dirs = {fp: str(s.path) for fp, s in open_shards(shards).items()}
    with index.writer():
        run = _Run(index, model_dir, version, order, chunk_size, waves, seed)
        for i in run.pending:
            run.commit(embed_chunk(index.chunk_spec(i), model_dir, shard_dirs, batch_size, device))
            if on_commit is not None:
                on_commit(i, run.done)
        return run.finish()


# -- the distributed flow ----------------------------------------------------------------------


@task(cache_policy=NO_CACHE)
def embed_chunk_task(
    spec: ChunkSpec,
    model_dir: str,
    shard_dirs: dict[str, str],
    batch_size: int,
    device: str,
    threads: int | None,
) -> ChunkEmbeddings:
    return embed_chunk(spec, model_dir, shard_dirs, batch_size, device, threads)


@flow(name="backfill")
def backfill(
    index_uri: str,
    shards: list[str],
    model_dir: str,
    version: int,
    order: str = "uncertainty",
    chunk_size: int = 512,
    waves: int = 20,
    seed: int = 0,
    batch_size: int = 128,
    device: str = "cpu",
    threads_per_worker: int | None = None,
    window: int = 4,
) -> BackfillReport:
    """Re-embed the index at ``index_uri`` with the model in ``model_dir`` (registry version
    ``version``), the embedding mapped over chunks on the flow's task runner (Dask; see
    :func:`run_distributed_backfill`). This process plans, commits chunks in plan order (at most
    ``window`` chunks in flight) and switches the live pointer at the end. Resumable like
    :func:`run_backfill`."""
    if order not in ("uncertainty", "random"):
        raise EmbeddingIndexError(f"order must be 'uncertainty' or 'random', got {order!r}")
    index = EmbeddingIndex(index_uri)
    shard_dirs = {fp: str(s.path.absolute()) for fp, s in open_shards(shards).items()}
    model_dir = str(Path(model_dir).absolute())
    with index.writer():
        run = _Run(index, model_dir, version, cast(Order, order), chunk_size, waves, seed)
        pending = deque(run.pending)
        in_flight: deque[Any] = deque()
        while pending or in_flight:
            while pending and len(in_flight) < max(1, window):
                spec = index.chunk_spec(pending.popleft())
                in_flight.append(
                    embed_chunk_task.submit(
                        spec, model_dir, shard_dirs, batch_size, device, threads_per_worker
                    )
                )
            run.commit(in_flight.popleft().result())  # in plan order
        return run.finish()


def dask_task_runner(workers: int = 2, address: str | None = None) -> Any:
    """A Dask task runner: the cluster at ``address`` (``tcp://host:8786``), or a local one of
    ``workers`` single-threaded processes."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    if workers < 1:
        raise EmbeddingIndexError(f"workers must be >= 1, got {workers}")
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
    )


def run_distributed_backfill(
    index_uri: str | Path | None,
    shards: Sequence[str | Path],
    model_dir: str | Path,
    version: int,
    *,
    workers: int = 2,
    address: str | None = None,
    order: Order = "uncertainty",
    chunk_size: int = 512,
    waves: int = 20,
    seed: int = 0,
    batch_size: int = 128,
    device: str = "cpu",
    window: int | None = None,
) -> BackfillReport:
    """Run the :func:`backfill` flow on a Dask cluster (see :func:`dask_task_runner`). Each
    local worker gets ``cpu_count // workers`` torch threads. Point ``PREFECT_API_URL`` at a
    Prefect server first: without one, every Dask worker process starts its own temporary
    Prefect server (tens of seconds each)."""
    index = EmbeddingIndex(index_uri)
    threads = None if address else max(1, (os.cpu_count() or 1) // max(workers, 1))
    runner = dask_task_runner(workers, address)
    return backfill.with_options(task_runner=runner)(
        index.uri,
        [str(s) for s in shards],
        str(model_dir),
        version,
        order=order,
        chunk_size=chunk_size,
        waves=waves,
        seed=seed,
        batch_size=batch_size,
        device=device,
        threads_per_worker=threads,
        window=window or 2 * workers,
    )
