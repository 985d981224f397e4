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

**When to backfill** (:func:`backfill_decision`). Every registered version carries the registry
tag ``cssl.compat`` (``direct``, ``adapter`` or ``none``): whether it is compatible with the
champion it replaced, its ``parent_version``. A version ``T`` is compatible with an index built
by version ``L`` when ``T == L`` or every version on ``T``'s lineage back to ``L`` is tagged
``direct`` or ``adapter`` (:func:`compatibility`); a missing tag counts as unknown, so not
compatible, and so does a ``T`` whose lineage does not reach ``L`` (a rollback). The refresh
flow calls :func:`backfill_if_needed` after a promotion; it backfills only when
``index.backfill_on_promotion`` is on (off by default: a backfill re-embeds the whole archive,
a cost the refresh should not take on unasked, and an index that was not backfilled keeps
answering in its own version's space; ``cssl index status`` says when it lags @champion).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cssl_core.data.shard import MANIFEST, Shard, ShardError
from cssl_core.data.storage import atomic_write_text
from cssl_core.runtime import environ_restored
from pipelines.index import (
    ChunkEmbeddings,
    ChunkSpec,
    EmbeddingIndex,
    EmbeddingIndexError,
    Order,
)
from pipelines.index_build import embed_images, read_chunk_images
from pipelines.settings import state_dir

if TYPE_CHECKING:
    from cssl_core.config import Params
    from pipelines.registry import ModelRegistry, VersionInfo

COMPAT_TAG = "cssl.compat"
COMPATIBLE_VIA = ("direct", "adapter")


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
    local worker gets ``cpu_count // workers`` torch threads. Without ``PREFECT_API_URL`` every
    Dask worker process would start a temporary Prefect server of its own (tens of seconds
    each), so the workers are pointed at the server this process uses
    (:func:`prefect_api_for_workers`). ``workers=1`` with no address runs the flow on Prefect's
    default task runner (threads of this process), with no Dask cluster."""
    index = EmbeddingIndex(index_uri)
    local = workers == 1 and not address
    threads = None if address or local else max(1, (os.cpu_count() or 1) // max(workers, 1))
    runner = None if local else dask_task_runner(workers, address)
    run = backfill if runner is None else backfill.with_options(task_runner=runner)
    with prefect_api_for_workers(needed=not local), environ_restored(DASK_SPAWN_ENVIRON):
        return run(
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


# What a local Dask cluster writes into this process's environment for its worker processes
# (distributed.nanny.pre-spawn-environ): left there, every later subprocess (torchrun, DVC)
# would run torch on one thread, slower and not bit-identical to a refresh run without it.
DASK_SPAWN_ENVIRON = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MALLOC_TRIM_THRESHOLD_",
)


@contextmanager
def prefect_api_for_workers(needed: bool = True) -> Iterator[None]:
    """While the block runs, ``PREFECT_API_URL`` names the Prefect server this process uses
    (the temporary one started here when there is none), so Dask worker processes report to
    it instead of each starting a server of its own."""
    if not needed or os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        server = SubprocessASGIServer()
        if not server.running:
            from pipelines.prefect_server import start_local_server

            start_local_server()
        url = server.api_url
    os.environ["PREFECT_API_URL"] = str(url)
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


# -- what the CLI and the refresh flow need around a backfill -----------------------------------


@dataclass(frozen=True)
class Compatibility:
    """Whether queries embedded by ``target_version`` may search an index built by
    ``live_version`` (``via``: ``same``, ``direct``, ``adapter`` or ``none``)."""

    live_version: int
    target_version: int
    compatible: bool
    via: str
    reason: str
    steps: tuple[tuple[int, str], ...] = ()
    """When compatible: ``(version, cssl.compat tag)`` from ``target_version`` down to the
    child of ``live_version`` (empty for the same version)."""


def compatibility(registry: ModelRegistry, live_version: int, target_version: int) -> Compatibility:
    """Follow ``target_version``'s lineage (``parent_version``) back to ``live_version``: the
    two are compatible when every version on the way carries ``cssl.compat`` = ``direct`` or
    ``adapter`` (``adapter`` when any step needs the adapter). A missing tag is unknown, so
    not compatible; so is a lineage that never reaches ``live_version``."""
    if target_version == live_version:
        return Compatibility(live_version, target_version, True, "same", "the same version")
    path: list[VersionInfo] = []  # target, its parent, ... down to the child of live
    current: int | None = target_version
    while current is not None and current != live_version and len(path) <= 10_000:
        path.append(registry.get(current))
        current = path[-1].lineage.parent_version
    if current != live_version:
        return Compatibility(
            live_version,
            target_version,
            False,
            "none",
            f"version {live_version} is not in version {target_version}'s lineage",
        )
    via = "direct"
    for info in path:
        tag = info.tags.get(COMPAT_TAG, "")
        if tag not in COMPATIBLE_VIA:
            what = f"{COMPAT_TAG}={tag}" if tag else f"no {COMPAT_TAG} tag (unknown)"
            return Compatibility(
                live_version,
                target_version,
                False,
                "none",
                f"version {info.version} carries {what}",
            )
        via = "adapter" if tag == "adapter" else via
    return Compatibility(
        live_version,
        target_version,
        True,
        via,
        f"every version from {live_version} to {target_version} is compatible ({via})",
        tuple((info.version, info.tags[COMPAT_TAG]) for info in path),
    )


def query_map(compat: Compatibility, load: Callable[[int], Any]) -> Callable[[Any], Any]:
    """``compat.target_version``'s embeddings -> ``compat.live_version``'s space: the identity
    along ``direct`` steps, each ``adapter`` step's saved adapter (``cssl_core.learn.compat``)
    applied in turn, target first. ``load(version)`` gives a version's ``Embedder`` (the
    caller's, so a model it already holds is not loaded again). Takes and returns float32
    arrays ``(D,)`` or ``(N, D)``, L2-normalised. An error when the two are not compatible."""
    from cssl_core.learn.compat import query_adapter

    if not compat.compatible:
        raise ValueError(
            f"version {compat.target_version}'s embeddings cannot be mapped into version "
            f"{compat.live_version}'s space: {compat.reason}"
        )
    maps = [query_adapter(load(version)) for version, tag in compat.steps if tag == "adapter"]

    def apply(query: Any) -> Any:
        for step in maps:
            query = step(query)
        return query

    return apply


def embedder_dir(registry: ModelRegistry, version: int) -> Path:
    """A local copy of ``version``'s embedder directory, downloaded once per registry and
    version into ``CSSL_HOME/cache/models`` (a backfill's workers and a resumed backfill
    load it from there)."""
    from cssl_core.learn.models import CONFIG_FILE

    key = hashlib.sha256(registry.uri.encode()).hexdigest()[:12]
    root = state_dir() / "cache" / "models" / f"{key}-v{version}"
    marker = root / "embedder.txt"
    if marker.is_file() and (root / marker.read_text().strip() / CONFIG_FILE).is_file():
        return root / marker.read_text().strip()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=root.parent)).resolve()
    try:
        rel = registry.download_embedder(version, tmp).relative_to(tmp)
        atomic_write_text(tmp / "embedder.txt", str(rel))
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / rel


def index_shards(
    index: EmbeddingIndex, given: Sequence[str | Path] = (), store_root: str | None = None
) -> list[Shard]:
    """The shards holding the images of the index's rows: ``given`` directories first, then
    where each shard was indexed from (``shards.json``), then the period's shard in the store
    at ``store_root`` when its fingerprint matches. One line naming what is missing."""
    found = open_shards(given)
    sources = index.shard_sources()
    missing = []
    for fp in sorted(index.fingerprints() - set(found)):
        source = sources.get(fp)
        shard = _shard_at(Path(source.path), fp) if source else None
        if shard is None and source is not None and store_root:
            shard = _stored(store_root, source.period, fp)
        if shard is None:
            where = f"{source.period} (indexed from {source.path})" if source else fp[:12]
            missing.append(where)
        else:
            found[fp] = shard
    if missing:
        raise EmbeddingIndexError(
            f"the index holds frames of shards that are not found: {', '.join(missing)}; "
            "give their directories with --shard"
        )
    return list(found.values())


def _shard_at(path: Path, fingerprint: str) -> Shard | None:
    if not (path / MANIFEST).is_file():
        return None
    try:
        shard = Shard.open(path)
    except ShardError:
        return None
    return shard if shard.fingerprint == fingerprint else None


def _stored(store_root: str, period: str, fingerprint: str) -> Shard | None:
    from cssl_core import period as core
    from cssl_core.data.storage import open_store

    try:
        shard = core.stored_shard(open_store(store_root), period, state_dir() / "cache" / "shards")
    except ShardError:
        return None
    return shard if shard.fingerprint == fingerprint else None


@dataclass(frozen=True)
class BackfillDecision:
    """Whether the index must be backfilled to ``version``, why, and the run when one ran."""

    version: int
    backfill: bool
    reason: str
    report: BackfillReport | None = None


def backfill_decision(
    registry: ModelRegistry, index: EmbeddingIndex, version: int
) -> BackfillDecision:
    """Backfill when the index exists and ``version`` is not compatible with its live
    version (:func:`compatibility`), or when a backfill to ``version`` was interrupted."""
    pointer = index.pointer()
    if pointer.live is None:
        return BackfillDecision(version, False, f"there is no index at {index.uri}")
    b = pointer.backfill
    if b is not None:
        if b.target_version == version:
            return BackfillDecision(version, True, f"resuming the backfill to version {version}")
        return BackfillDecision(
            version,
            False,
            f"a backfill to version {b.target_version} is in progress; finish it first "
            f"(cssl backfill --to {b.target_version})",
        )
    live = pointer.live.model_version
    compat = compatibility(registry, live, version)
    if compat.compatible:
        return BackfillDecision(
            version,
            False,
            f"version {version} is compatible with the index's version {live} ({compat.via})",
        )
    return BackfillDecision(
        version,
        True,
        f"version {version} is not compatible with the index's version {live}: {compat.reason}",
    )


def backfill_if_needed(
    registry_uri: str, index_uri: str | None, version: int, params: Params
) -> BackfillDecision:
    """After ``version`` was promoted: backfill the index at ``index_uri`` (default
    ``CSSL_HOME/index``) to it when ``index.backfill_on_promotion`` is on and
    :func:`backfill_decision` says so, with the :func:`backfill` flow on ``index.workers``
    Dask workers (or the cluster at ``index.dask_address``). Shards are found as
    :func:`index_shards` finds them, with the store at ``store.root``."""
    from pipelines.registry import open_registry

    if not params.index.backfill_on_promotion:
        return BackfillDecision(version, False, "index.backfill_on_promotion is off")
    registry = open_registry(registry_uri)
    index = EmbeddingIndex(index_uri)
    decision = backfill_decision(registry, index, version)
    log = _logger()
    log.info(f"index {index.uri}: {decision.reason}")
    if not decision.backfill:
        return decision
    try:
        report = run_distributed_backfill(
            index.uri,
            [str(s.path) for s in index_shards(index, store_root=params.store.root)],
            embedder_dir(registry, version),
            version,
            workers=params.index.workers,
            address=params.index.dask_address,
        )
    except Exception as exc:
        raise EmbeddingIndexError(
            f"version {version} was promoted, but backfilling the index {index.uri} failed "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            f"`cssl backfill --to {version}` resumes it"
        ) from exc
    log.info(
        f"index {index.uri}: backfilled {report.rows} rows to version {version} "
        f"(switched: {report.switched})"
    )
    return replace(decision, report=report)


def _logger() -> Any:
    """The Prefect run logger inside a flow, else this module's logger."""
    import logging

    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow or task run context
        return logging.getLogger(__name__)
