"""The embedding index on LanceDB: rows, search, versions, the ANN index and the backfill steps.

Most tests write synthetic vectors (exact, fast); the shard tests embed real simulated frames
with a tiny model (resnet10t, 32 px).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import TINY_PARAMS

from cssl_core.config import ModelConfig
from cssl_core.data.shard import Shard
from cssl_core.learn.models import Embedder
from pipelines.backfill import run_backfill
from pipelines.index import (
    META_SCHEMA,
    ChunkEmbeddings,
    ChunkSpec,
    EmbeddingIndex,
    EmbeddingIndexError,
    FrameRows,
    HistoryEntry,
    IndexPointer,
    LiveTable,
)
from pipelines.index_build import build_index, embed_images, iter_shard_frames, read_chunk_images


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("CSSL_HOME", str(tmp_path / "home"))


def synthetic_rows(
    n: int, dim: int, seed: int = 0, prefix: str = "f", periods: tuple[str, ...] = ("p01", "p02")
) -> FrameRows:
    rng = np.random.default_rng(seed)
    meta = pa.table(
        {
            "frame_id": [f"{prefix}{i:05d}" for i in range(n)],
            "period": [periods[i % len(periods)] for i in range(n)],
            "stream_id": [f"s{i % 7}" for i in range(n)],
            "category": [None if i % 5 == 0 else f"c{i % 3}" for i in range(n)],
            "split": ["train"] * n,
            "shard_fingerprint": ["fp"] * n,
            "part": pa.array(np.zeros(n, dtype=np.int32)),
            "row": pa.array(np.arange(n, dtype=np.int64)),
        },
        schema=META_SCHEMA,
    )
    return FrameRows(meta, rng.standard_normal((n, dim)).astype(np.float32))


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_add_search_replace_and_versions(tmp_path):
    index = EmbeddingIndex(tmp_path / "index")
    rows = synthetic_rows(50, 8)
    first = index.add(rows, model_version=1)
    assert (first.inserted, first.updated) == (50, 0)
    hits = index.search(rows.embeddings[7], k=5)
    assert len(hits) == 5 and len({h.frame_id for h in hits}) == 5
    top = hits[0]
    assert top.frame_id == "f00007" and top.score == pytest.approx(1.0, abs=1e-5)
    assert (top.period, top.stream_id, top.category, top.split) == ("p02", "s0", "c1", "train")
    assert top.model_version == 1 and top.space == 1
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    # Re-adding replaces: same frame ids, new vectors, never a duplicate.
    changed = FrameRows(rows.meta, rows.embeddings[::-1].copy())
    again = index.add(changed, model_version=1)
    assert (again.inserted, again.updated) == (0, 50)
    status = index.status()
    assert status.rows == 50 and status.rows_per_version == {1: 50}
    assert index.search(rows.embeddings[7], k=1)[0].frame_id == "f00042"
    versions = [v.version for v in status.table_versions]
    assert versions == sorted(versions) and len(versions) >= 3  # create, add, update
    assert status.table_versions[-1].rows == 50
    assert status.live_table == "frames_v1" and status.tables == ("frames_v1",)


def test_version_and_shape_rules(tmp_path):
    index = EmbeddingIndex(tmp_path / "index")
    with pytest.raises(EmbeddingIndexError, match="empty: build it first"):
        index.search(np.ones(8))
    index.add(synthetic_rows(10, 8), model_version=1)
    newer = synthetic_rows(5, 8, seed=1, prefix="g")
    with pytest.raises(EmbeddingIndexError, match="not declared compatible"):
        index.add(newer, model_version=2)
    index.add(newer, model_version=2, compatible=True)
    assert index.status().rows_per_version == {1: 10, 2: 5}
    with pytest.raises(EmbeddingIndexError, match="D=6, the index table has D=8"):
        index.add(synthetic_rows(3, 6, prefix="h"), model_version=1)
    with pytest.raises(EmbeddingIndexError, match="the query has D=3"):
        index.search(np.ones(3))
    with pytest.raises(EmbeddingIndexError, match="repeats a frame_id"):
        rows = synthetic_rows(2, 8)
        FrameRows(pa.concat_tables([rows.meta, rows.meta]), np.ones((4, 8)))


def test_search_filter(tmp_path):
    index = EmbeddingIndex(tmp_path / "index")
    rows = synthetic_rows(40, 8)
    index.add(rows, model_version=1)
    hits = index.search(rows.embeddings[0], k=10, where="period = 'p02'")
    assert hits and all(h.period == "p02" for h in hits)


def test_ann_index_above_threshold(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 32))
    emb = centres[rng.integers(0, 20, 1200)] + 0.3 * rng.standard_normal((1200, 32))
    rows = synthetic_rows(1200, 32)
    rows = FrameRows(rows.meta, emb.astype(np.float32))
    small = EmbeddingIndex(tmp_path / "small", ann_min_rows=5000)
    small.add(rows, 1)
    assert small.ensure_ann_index() is False and not small.status().ann_index
    index = EmbeddingIndex(tmp_path / "index", ann_min_rows=1000)
    index.add(rows, 1)
    assert index.ensure_ann_index() is True and index.status().ann_index
    queries = rng.choice(1200, 30, replace=False)
    found = [index.search(emb[q], k=1)[0].frame_id == f"f{q:05d}" for q in queries]
    assert sum(found) >= 28  # IVF_PQ with refinement: the exact vector comes back first


def _start(index: EmbeddingIndex, order: str = "random", **kw):
    return index.start_backfill(2, dim=6, order=order, chunk_size=16, waves=2, **kw)


def test_backfill_steps_mixed_search_and_atomic_switch(tmp_path):
    index = EmbeddingIndex(tmp_path / "index")
    old = synthetic_rows(100, 8)
    index.add(old, model_version=1)
    live_versions = len(index.table_versions())
    state = _start(index)
    assert state.rows == 100 and state.chunks == 7 and state.table == "frames_v2"
    assert index.pointer().live.table == "frames_v1"  # nothing switched yet
    assert _start(index) == state  # a second start resumes the same plan
    with pytest.raises(EmbeddingIndexError, match="in progress"):
        index.start_backfill(3, dim=6)
    assert index.pending_chunks() == list(range(7))
    specs = [index.chunk_spec(i) for i in range(7)]
    assert [len(s) for s in specs] == [16] * 6 + [4]
    ids = [f for s in specs for f in s.frame_ids]
    assert sorted(ids) == sorted(old.meta["frame_id"].to_pylist())  # each row once

    rng = np.random.default_rng(1)
    new_vec = {f: rng.standard_normal(6).astype(np.float32) for f in ids}
    for s in specs[:3]:
        index.commit_chunk(
            ChunkEmbeddings(s.index, s.frame_ids, np.stack([new_vec[f] for f in s.frame_ids]))
        )
    assert index.pending_chunks() == [3, 4, 5, 6]
    progress = index.status().backfill
    assert (progress.chunks_done, progress.rows_done, progress.rows) == (3, 48, 100)
    assert index.status().rows_per_version == {1: 52, 2: 48}
    assert len(index.table_versions()) == live_versions  # the live table was not touched

    done_id, todo_id = specs[0].frame_ids[0], specs[5].frame_ids[0]
    old_of = dict(zip(old.meta["frame_id"].to_pylist(), old.embeddings, strict=True))
    with pytest.raises(EmbeddingIndexError, match="pass old_query"):
        index.search(new_vec[done_id])
    hits = index.search(new_vec[done_id], k=100, old_query=old_of[done_id])
    assert hits[0].frame_id == done_id and hits[0].space == 2 and hits[0].model_version == 2
    assert len({h.frame_id for h in hits}) == len(hits) == 100  # every frame, once
    assert {h.space for h in hits if h.frame_id in specs[1].frame_ids} == {2}
    assert {h.space for h in hits if h.frame_id in specs[6].frame_ids} == {1}
    hits = index.search(new_vec[done_id], k=3, old_query=old_of[todo_id])
    assert todo_id in [h.frame_id for h in hits[:2]]  # both lists hold a self-match (score 1)
    vecs = index.stored_vectors(done_id)
    assert np.allclose(vecs.vector, unit(new_vec[done_id]), atol=1e-6)
    assert np.allclose(vecs.old_vector, unit(old_of[done_id]), atol=1e-6)
    assert index.stored_vectors(todo_id).vector is None

    # While the backfill runs the live table is frozen; new frames join in the new space.
    with pytest.raises(EmbeddingIndexError, match="frozen"):
        index.add(synthetic_rows(2, 8, prefix="x"), model_version=1)
    extra = synthetic_rows(1, 6, seed=5, prefix="new")
    index.add(extra, model_version=2)
    # A planned frame embedded early keeps its place in the plan and its old vector.
    early = synthetic_rows(1, 6, seed=6, prefix="f")  # frame f00000, not yet re-embedded
    index.add(early, model_version=2)
    assert index.stored_vectors("f00000").old_vector is not None
    home_chunk = next(s for s in specs if "f00000" in s.frame_ids)
    assert index.chunk_spec(home_chunk.index) == home_chunk
    assert (
        index.search(extra.embeddings[0], k=1, adapter=lambda q: np.ones(8))[0].frame_id
        == "new00000"
    )

    with pytest.raises(EmbeddingIndexError, match="other frames"):
        index.commit_chunk(ChunkEmbeddings(3, specs[4].frame_ids, np.ones((16, 6))))
    assert index.finish_backfill() is False
    for s in specs[3:]:
        index.commit_chunk(
            ChunkEmbeddings(s.index, s.frame_ids, np.stack([new_vec[f] for f in s.frame_ids]))
        )
    assert index.finish_backfill() is True
    pointer = index.pointer()
    assert pointer.backfill is None and pointer.live.table == "frames_v2"
    assert pointer.live.model_version == 2 and pointer.live.dim == 6
    assert [h.table for h in pointer.history] == ["frames_v1", "frames_v2"]
    status = index.status()
    assert status.rows_per_version == {2: 101} and status.tables == ("frames_v1", "frames_v2")
    schema = index._open("frames_v2").schema
    assert "old_embedding" not in schema.names and "backfill_rank" not in schema.names
    assert index.search(new_vec[todo_id], k=1)[0].frame_id == todo_id  # no old_query needed now
    assert index.start_backfill(2, dim=6) is None  # already on version 2
    assert index._open("frames_v1").count_rows() == 100  # the old table is kept


def test_uncertainty_plan_ranks_waves_by_priority(tmp_path):
    index = EmbeddingIndex(tmp_path / "index")
    index.add(synthetic_rows(96, 8), model_version=1)
    state = index.start_backfill(
        2, dim=8, order="uncertainty", chunk_size=8, waves=4, reference_rows=32
    )
    plan = (
        index._open(state.table)
        .search()
        .select(["backfill_rank", "backfill_priority", "row"])
        .to_arrow()
        .sort_by("backfill_rank")
    )
    ranks = plan["backfill_rank"].to_pylist()
    assert ranks == list(range(96))
    prio = np.asarray(plan["backfill_priority"].to_pylist()).reshape(4, 24)
    for w in range(3):  # every row of an earlier wave is at least as uncertain
        assert prio[w].min() >= prio[w + 1].max()
    rows = np.asarray(plan["row"].to_pylist()).reshape(4, 24)
    assert all((np.diff(r) > 0).all() for r in rows)  # storage order within a wave


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two tiny models with different weights (versions 1 and 2)."""
    cfg = ModelConfig(**TINY_PARAMS["model"])
    root = tmp_path_factory.mktemp("models")
    for seed in (1, 2):
        torch.manual_seed(seed)
        Embedder(cfg).save(root / f"v{seed}")
    return root


def test_build_index_from_shards_is_idempotent(tmp_path, sim_shards, tiny_models):
    shards = [sim_shards / p for p in ("p01", "p02")]
    report = build_index(shards, tiny_models / "v1", 1, tmp_path / "index")
    total = sum(Shard.open(s).num_rows for s in shards)
    assert report.rows_written == report.rows_total == total
    assert not any(s.skipped for s in report.shards)
    again = build_index(shards, tiny_models / "v1", 1, tmp_path / "index")
    assert again.rows_written == 0 and all(s.skipped for s in again.shards)
    index = EmbeddingIndex(tmp_path / "index")
    assert index.status().rows == total
    # A stored vector is the model's embedding of that frame, and its location reads it back.
    shard = Shard.open(shards[1])
    meta, images = next(iter_shard_frames(shard, 8))
    model = Embedder.load(tiny_models / "v1")
    expected = embed_images(model, images[:3])
    for i in range(3):
        stored = index.stored_vectors(meta["frame_id"][i].as_py()).vector
        np.testing.assert_allclose(stored, expected[i], atol=1e-5)


def test_run_backfill_in_process(tmp_path, sim_shards, tiny_models):
    shards = [sim_shards / p for p in ("p01", "p02", "p03")]
    build_index(shards, tiny_models / "v1", 1, tmp_path / "index")
    commits: list[int] = []
    report = run_backfill(
        tmp_path / "index",
        shards,
        tiny_models / "v2",
        2,
        chunk_size=32,
        waves=3,
        on_commit=lambda i, done: commits.append(i),
    )
    assert report.switched and report.chunks_run == report.chunks == len(commits) == 8
    index = EmbeddingIndex(tmp_path / "index")
    assert index.status().rows_per_version == {2: 240}
    shard = Shard.open(shards[2])
    meta, images = next(iter_shard_frames(shard, 4))
    expected = embed_images(Embedder.load(tiny_models / "v2"), images)
    for i in range(4):
        stored = index.stored_vectors(meta["frame_id"][i].as_py()).vector
        np.testing.assert_allclose(stored, expected[i], atol=1e-5)
    assert run_backfill(tmp_path / "index", shards, tiny_models / "v2", 2).chunks_run == 0


def test_read_chunk_images_checks_frame_ids(tmp_path, sim_shards):
    shard = Shard.open(sim_shards / "p01")
    meta, images = next(iter_shard_frames(shard, 1024))
    picks = list(range(meta.num_rows))[::-7]
    spec = ChunkSpec(
        0,
        tuple(meta["frame_id"][i].as_py() for i in picks),
        (shard.fingerprint,) * len(picks),
        tuple(meta["part"][i].as_py() for i in picks),
        tuple(meta["row"][i].as_py() for i in picks),
    )
    assert read_chunk_images(spec, {shard.fingerprint: shard}) == [images[i] for i in picks]
    wrong = ChunkSpec(0, ("nope",), spec.fingerprints[:1], spec.parts[:1], spec.rows[:1])
    with pytest.raises(EmbeddingIndexError, match="changed since it was indexed"):
        read_chunk_images(wrong, {shard.fingerprint: shard})
    with pytest.raises(EmbeddingIndexError, match="pass that shard's directory"):
        read_chunk_images(spec, {})


@pytest.mark.server
def test_index_on_s3(s3_bucket):
    uri = f"s3://{s3_bucket}/index"
    index = EmbeddingIndex(uri)
    rows = synthetic_rows(40, 8)
    index.add(rows, model_version=1)
    assert index.search(rows.embeddings[3], k=1)[0].frame_id == "f00003"
    state = index.start_backfill(2, dim=8, order="random", chunk_size=16, waves=1)
    for i in index.pending_chunks():
        spec = index.chunk_spec(i)
        index.commit_chunk(ChunkEmbeddings(i, spec.frame_ids, np.ones((len(spec), 8)) + i))
    assert index.finish_backfill()
    again = EmbeddingIndex(uri)  # a fresh reader sees the switch through the pointer in S3
    assert again.pointer().live.table == state.table and again.status().rows_per_version == {2: 40}


def test_backfill_recovers_from_crashes_around_the_plan_and_the_switch(tmp_path):
    index = EmbeddingIndex(tmp_path / "index")
    index.add(synthetic_rows(40, 8), model_version=1)
    # A crash after the staging table was created but before the pointer named it leaves an
    # orphan table; the next start replaces it.
    index.db.create_table("frames_v2", data=pa.table({"junk": [1, 2, 3]}))
    state = _start(index)
    assert index._open(state.table).count_rows() == 40
    for i in index.pending_chunks():
        spec = index.chunk_spec(i)
        index.commit_chunk(ChunkEmbeddings(i, spec.frame_ids, np.ones((len(spec), 6)) + i))
    # A crash right after the pointer write leaves the backfill columns; any later run of the
    # backfill (or its finish) removes them.
    pointer = index.pointer()
    index._write_pointer(
        IndexPointer(
            LiveTable(state.table, 2, 6),
            None,
            (*pointer.history, HistoryEntry(state.table, 2, "t")),
        )
    )
    assert "old_embedding" in index._open(state.table).schema.names
    assert _start(index) is None
    assert "old_embedding" not in index._open(state.table).schema.names
    assert index.status().rows_per_version == {2: 40}
