"""Filling the embedding index from shards: frames with their location, their embeddings, and
``build_index`` (what ``cssl index build`` calls).

Each row of the index records where its image lives (the shard's fingerprint, the part file's
position in the shard manifest, the row in that file), so a backfill reads exactly the Parquet
row groups holding a chunk's frames (:func:`read_chunk_images`) and checks every frame id
against what it reads.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cssl_core.data.shard import Shard
from pipelines.index import (
    ANN_MIN_ROWS,
    COMMIT_ROWS,
    META_SCHEMA,
    ChunkSpec,
    EmbeddingIndex,
    EmbeddingIndexError,
    FrameRows,
    ShardSource,
)

if TYPE_CHECKING:
    from cssl_core.learn.models import Embedder


# -- frames from shards ---------------------------------------------------------------------------


_FRAME_COLUMNS = ["frame_id", "period", "stream_id", "category", "split", "image"]


def iter_shard_frames(
    shard: Shard, batch_size: int = 256
) -> Iterator[tuple[pa.Table, list[bytes]]]:
    """A shard's frames as ``(metadata rows in META_SCHEMA, JPEG bytes)`` batches, with each
    frame's location (part position in the manifest, row in that part)."""
    for part_no, path in enumerate(shard.part_paths()):
        offset = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size, columns=_FRAME_COLUMNS):
            n = batch.num_rows
            meta = pa.table(
                {
                    "frame_id": batch.column("frame_id"),
                    "period": batch.column("period"),
                    "stream_id": batch.column("stream_id"),
                    "category": batch.column("category"),
                    "split": batch.column("split"),
                    "shard_fingerprint": pa.array([shard.fingerprint] * n, pa.string()),
                    "part": pa.array(np.full(n, part_no, dtype=np.int32)),
                    "row": pa.array(np.arange(offset, offset + n, dtype=np.int64)),
                },
                schema=META_SCHEMA,
            )
            offset += n
            yield meta, batch.column("image").to_pylist()


def read_chunk_images(spec: ChunkSpec, shards: dict[str, Shard]) -> list[bytes]:
    """The JPEG bytes of a chunk's frames, in the chunk's order. Each needed Parquet row group
    is read once; every frame id is checked against the row it is read from."""
    images: list[bytes | None] = [None] * len(spec)
    wanted: dict[tuple[str, int], list[int]] = {}
    for i, key in enumerate(zip(spec.fingerprints, spec.parts, strict=True)):
        wanted.setdefault(key, []).append(i)
    for (fp, part), members in wanted.items():
        shard = shards.get(fp)
        if shard is None:
            raise EmbeddingIndexError(
                f"frames of the index come from a shard with fingerprint {fp[:12]}..., which is "
                "not among the shards given: pass that shard's directory"
            )
        pf = pq.ParquetFile(shard.part_paths()[part])
        starts = np.cumsum(
            [0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        )
        by_group: dict[int, list[int]] = {}
        for i in members:
            g = int(np.searchsorted(starts, spec.rows[i], side="right") - 1)
            by_group.setdefault(g, []).append(i)
        for g, idx in by_group.items():
            table = pf.read_row_group(g, columns=["frame_id", "image"])
            fids, data = table.column("frame_id"), table.column("image")
            for i in idx:
                j = spec.rows[i] - int(starts[g])
                if not 0 <= j < table.num_rows or fids[j].as_py() != spec.frame_ids[i]:
                    raise EmbeddingIndexError(
                        f"{shard.path} part {part} row {spec.rows[i]} does not hold frame "
                        f"{spec.frame_ids[i]}: the shard changed since it was indexed"
                    )
                images[i] = data[j].as_py()
    return [img for img in images if img is not None]


def embed_images(
    model: Embedder, images: Sequence[bytes], batch_size: int = 256, device: str = "cpu"
) -> np.ndarray:
    """L2-normalised backbone features of encoded frames, float32 ``(N, D)``: the same
    embedding the registered MLflow model's ``predict`` returns."""
    from cssl_core.evaluation.evaluate import extract_features

    feats = extract_features(model, list(images), model.cfg.input_size, batch_size, device)
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return feats.numpy().astype(np.float32)


# -- what the CLI verbs call -----------------------------------------------------------------------


@dataclass(frozen=True)
class ShardBuild:
    period: str
    fingerprint: str
    rows: int
    skipped: bool


@dataclass(frozen=True)
class BuildReport:
    """What ``build_index`` did."""

    index_uri: str
    table: str
    model_version: int
    shards: tuple[ShardBuild, ...]
    rows_written: int
    rows_total: int
    ann_index: bool
    seconds: float


def build_index(
    shards: Sequence[str | Path | Shard],
    model_dir: str | Path,
    version: int,
    index_uri: str | Path | None = None,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    compatible: bool = False,
    ann_min_rows: int = ANN_MIN_ROWS,
) -> BuildReport:
    """Embed every frame of ``shards`` with the model saved in ``model_dir`` (registry version
    ``version``) and index them. A shard whose frames are all indexed with this version
    already is skipped, so a rerun costs nothing; a partly indexed one is redone (rows are
    replaced, never duplicated)."""
    from cssl_core.learn.models import Embedder

    start = time.perf_counter()
    index = EmbeddingIndex(index_uri, ann_min_rows=ann_min_rows)
    model = Embedder.load(model_dir, device=device).eval()
    pointer = index.pointer()
    if pointer.live is not None and pointer.backfill is None:
        live, dim = pointer.live, int(model.num_features)
        if version != live.model_version and not compatible:
            raise EmbeddingIndexError(
                f"the index {index.uri} is in version {live.model_version}'s space and version "
                f"{version} is not declared compatible with it: build with version "
                f"{live.model_version}, or backfill the index to version {version} first"
            )
        if dim != live.dim:
            raise EmbeddingIndexError(
                f"model version {version} embeds D={dim}, the index {index.uri} stores "
                f"D={live.dim}: backfill the index to version {version} instead"
            )
    done: list[ShardBuild] = []
    written = 0
    with index.writer():
        opened = [item if isinstance(item, Shard) else Shard.open(item) for item in shards]
        index.record_shards(
            [ShardSource(s.fingerprint, s.period, str(Path(s.path).absolute())) for s in opened]
        )
        for shard in opened:
            if index.rows_of_shard(shard.fingerprint, version) == shard.num_rows:
                done.append(ShardBuild(shard.period, shard.fingerprint, 0, True))
                continue
            rows = 0
            for meta, images in iter_shard_frames(shard, COMMIT_ROWS):
                emb = embed_images(model, images, batch_size, device)
                index.add(FrameRows(meta, emb), version, compatible=compatible)
                rows += meta.num_rows
            done.append(ShardBuild(shard.period, shard.fingerprint, rows, False))
            written += rows
        ann = index.ensure_ann_index() if written else index.status().ann_index
    status = index.status()
    return BuildReport(
        index.uri,
        status.live_table or "",
        version,
        tuple(done),
        written,
        status.rows,
        ann,
        time.perf_counter() - start,
    )
