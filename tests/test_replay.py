"""ReplayMemory: selection invariants, exact reservoir sampling, versioned immutable storage."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from math import factorial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import chisquare

from cssl_core.data.images import encode_jpeg
from cssl_core.data.shard import FRAME_SCHEMA
from cssl_core.data.storage import LocalStore, ObjectStore, open_store
from cssl_core.memory import replay
from cssl_core.memory.replay import (
    ReplayBatcher,
    ReplayError,
    ReplayMemory,
    balanced_indices,
    k_center_greedy,
    latest_period,
    list_versions,
    replay_split,
    reservoir_indices,
    water_fill,
)

pytest_plugins = ["s3_server"]  # fixtures: moto_server, s3_endpoint, s3_bucket

JPEG = encode_jpeg(np.full((8, 8, 3), 128, dtype=np.uint8))
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def fid(period: str, i: int) -> str:
    return hashlib.blake2b(f"{period}/{i}".encode(), digest_size=16).hexdigest()


def frames(
    period: str,
    n: int,
    categories: list[str | None] | None = None,
    splits: list[str] | None = None,
) -> pa.Table:
    """``n`` cheap synthetic frames of one period (one shared tiny JPEG, distinct ids)."""
    rows = [
        {
            "frame_id": fid(period, i),
            "stream_id": f"stream-{i % 3}",
            "ts": T0 + timedelta(seconds=i),
            "period": period,
            "category": categories[i] if categories else None,
            "split": splits[i] if splits else "train",
            "image": JPEG,
            "width": 8,
            "height": 8,
            "source": "synthetic",
        }
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=FRAME_SCHEMA)


def cats(**counts: int) -> list[str | None]:
    out: list[str | None] = []
    for name, n in counts.items():
        out += [None if name == "none" else name] * n
    return out


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.server)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/cssl")


# -- reservoir: exact ------------------------------------------------------------------------


class ScriptedGenerator:
    """Stands in for numpy's Generator: records each ``integers`` call's upper bounds and
    answers with scripted draws, so every outcome of the algorithm can be enumerated."""

    def __init__(self, draws: list[int] | None = None) -> None:
        self.draws = list(draws or [])
        self.highs: list[int] = []

    def integers(self, low: int, high: np.ndarray) -> np.ndarray:
        assert low == 0
        high = np.atleast_1d(high)
        self.highs += high.tolist()
        if not self.draws:
            return np.zeros(len(high), dtype=np.int64)
        out, self.draws = self.draws[: len(high)], self.draws[len(high) :]
        return np.asarray(out, dtype=np.int64)


def run_stream(chunks: list[int], capacity: int, rng: ScriptedGenerator) -> list[int]:
    """Feed a stream of items 0..n-1 in chunks through ``reservoir_indices``; returns the
    item ids left in the reservoir."""
    memory: list[int] = []
    seen = 0
    for size in chunks:
        new_items = list(range(seen, seen + size))
        pool = memory + new_items
        memory = [pool[i] for i in reservoir_indices(len(memory), seen, size, capacity, rng)]
        seen += size
    return memory


@pytest.mark.parametrize(
    ("chunks", "capacity"),
    [([5], 1), ([1, 2, 2], 1), ([2, 3], 2), ([6], 3)],
)
def test_reservoir_is_exactly_uniform_by_enumeration(chunks: list[int], capacity: int) -> None:
    """Enumerate every possible draw sequence (each equally likely) and count survivors."""
    n = sum(chunks)
    probe = ScriptedGenerator()
    run_stream(chunks, capacity, probe)
    # The index for stream item i is drawn from {0, ..., i}: i + 1 outcomes, item 0 included.
    assert probe.highs == [i + 1 for i in range(capacity, n)]
    kept: Counter[int] = Counter()
    outcomes = 0
    for draws in itertools.product(*(range(h) for h in probe.highs)):
        reservoir = run_stream(chunks, capacity, ScriptedGenerator(list(draws)))
        assert len(reservoir) == capacity == len(set(reservoir))
        kept.update(reservoir)
        outcomes += 1
    assert outcomes == factorial(n) // factorial(capacity)
    # Every item survives in exactly capacity/n of the equally likely outcomes.
    assert kept == {i: outcomes * capacity // n for i in range(n)}


def test_reservoir_through_memory_updates_keeps_item_zero_with_probability_one_over_n() -> None:
    """Capacity 1, a stream of 5 frames over 3 periods (item 0 alone in the first period):
    each frame must be the survivor 1/5 of the time. Seeds are fixed, so this is exact."""
    stream = [frames("p1", 1), frames("p2", 2), frames("p3", 2)]
    ids = [f for t in stream for f in t.column("frame_id").to_pylist()]
    counts: Counter[str] = Counter()
    trials = 1500
    for seed in range(trials):
        memory = ReplayMemory.empty(1)
        for table, period in zip(stream, ("p1", "p2", "p3"), strict=True):
            memory = memory.update(table, period, "reservoir", capacity=1, seed=seed)
        assert len(memory) == 1 and memory.seen == 5
        counts[memory.table.column("frame_id")[0].as_py()] += 1
    observed = [counts[f] for f in ids]
    assert sum(observed) == trials
    assert min(observed) > 0.15 * trials  # an off-by-one draw would give item 0 zero
    assert chisquare(observed).pvalue > 1e-3


def test_reservoir_shrinking_capacity_subsamples() -> None:
    rng = np.random.default_rng(0)
    keep = reservoir_indices(10, 50, 0, 4, rng)
    assert len(keep) == 4 and len(set(keep.tolist())) == 4 and keep.max() < 10


# -- balanced --------------------------------------------------------------------------------


def test_water_fill_is_max_min_fair() -> None:
    rng = np.random.default_rng(0)
    assert water_fill({"a": 1, "b": 100, "c": 100}, 11, rng) == {"a": 1, "b": 5, "c": 5}
    assert water_fill({"a": 2, "b": 3}, 10, rng) == {"a": 2, "b": 3}
    assert water_fill({"a": 0, "b": 7}, 4, rng) == {"a": 0, "b": 4}
    uneven = water_fill({"a": 9, "b": 9, "c": 9}, 10, rng)
    assert sorted(uneven.values()) == [3, 3, 4]


def test_balanced_quotas_are_exact_per_period_and_category() -> None:
    p1 = frames("p1", 22, cats(a=10, b=10, c=2))
    p2 = frames("p2", 30, cats(a=30))
    p3 = frames("p3", 4, cats(none=4))
    m1 = ReplayMemory.empty(24).update(p1, "p1", "balanced", capacity=24, seed=3)
    assert len(m1) == 22  # everything fits
    m2 = m1.update(p2, "p2", "balanced", capacity=24, seed=3)
    m3 = m2.update(p3, "p3", "balanced", capacity=24, seed=3)

    def groups(memory: ReplayMemory) -> dict[tuple[str, str | None], int]:
        t = memory.table
        pairs = zip(t.column("period").to_pylist(), t.column("category").to_pylist(), strict=True)
        return dict(Counter(pairs))

    assert groups(m2) == {("p1", "a"): 5, ("p1", "b"): 5, ("p1", "c"): 2, ("p2", "a"): 12}
    assert groups(m3) == {
        ("p1", "a"): 4,
        ("p1", "b"): 4,
        ("p1", "c"): 2,
        ("p2", "a"): 10,
        ("p3", None): 4,
    }
    manifest = m3.manifest
    assert manifest["periods"] == {"p1": 10, "p2": 10, "p3": 4}
    assert manifest["categories"] == {"a": 14, "b": 4, "c": 2}
    assert manifest["uncategorised"] == 4
    # Old periods are subsampled from what the memory held, never re-invented.
    assert set(m3.table.column("frame_id").to_pylist()) <= set(
        m2.table.column("frame_id").to_pylist()
    ) | set(p3.column("frame_id").to_pylist())


def test_balanced_indices_leftover_slots_are_seeded() -> None:
    periods = ["x"] * 9 + ["y"] * 9 + ["z"] * 9
    categories: list[str | None] = [None] * 27
    picks = {
        tuple(balanced_indices(periods, categories, 10, np.random.default_rng(s)).tolist())
        for s in range(20)
    }
    assert len(picks) > 1  # the seed decides which period gets the extra slot
    again = balanced_indices(periods, categories, 10, np.random.default_rng(5))
    assert (
        again.tolist()
        == balanced_indices(periods, categories, 10, np.random.default_rng(5)).tolist()
    )
    assert len(again) == 10


# -- diverse ---------------------------------------------------------------------------------

CLUSTER_SIZES = [200, 120, 80, 60, 40, 30, 20, 15, 12, 10, 8, 6, 5, 4, 4, 3, 3, 2, 2, 2]


def clustered(period: str, cluster_ids: list[int], seed: int = 0) -> tuple[pa.Table, dict]:
    """Frames in 20 well-separated Gaussian clusters on the unit sphere (unequal sizes).

    Returns the table and ``frame_id -> (cluster, embedding)``."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, 32))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = [c for c in cluster_ids for _ in range(CLUSTER_SIZES[c])]
    table = frames(period, len(labels), categories=[f"c{c}" for c in labels])
    emb = centers[labels] + rng.normal(scale=0.01, size=(len(labels), 32))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    lookup = {
        f: (c, e) for f, c, e in zip(table.column("frame_id").to_pylist(), labels, emb, strict=True)
    }
    return table, lookup


def test_k_center_greedy_covers_separated_clusters() -> None:
    _, lookup = clustered("p1", list(range(20)))
    emb = np.stack([e for _, e in lookup.values()])
    labels = [c for c, _ in lookup.values()]
    chosen = k_center_greedy(emb, 20, np.random.default_rng(0))
    assert len(set(chosen.tolist())) == 20
    assert {labels[i] for i in chosen} == set(range(20))


def test_diverse_covers_more_clusters_than_reservoir() -> None:
    table, lookup = clustered("p1", list(range(20)))

    def embed(t: pa.Table) -> np.ndarray:
        return np.stack([lookup[f][1] for f in t.column("frame_id").to_pylist()])

    def coverage(memory: ReplayMemory) -> int:
        return len({lookup[f][0] for f in memory.table.column("frame_id").to_pylist()})

    diverse, reservoir = [], []
    for seed in range(5):
        empty = ReplayMemory.empty(20)
        d = empty.update(table, "p1", "diverse", capacity=20, seed=seed, embed_fn=embed)
        r = empty.update(table, "p1", "reservoir", capacity=20, seed=seed)
        assert len(d) == len(r) == 20
        diverse.append(coverage(d))
        reservoir.append(coverage(r))
    assert diverse == [20] * 5
    assert np.mean(reservoir) < 13  # expected coverage of 20 uniform draws is about 7.8


def test_diverse_combines_memory_with_the_new_period() -> None:
    t1, l1 = clustered("p1", list(range(10)))
    t2, l2 = clustered("p2", list(range(10, 20)))
    lookup = {**l1, **l2}
    calls: list[int] = []

    def embed(t: pa.Table) -> np.ndarray:
        calls.append(t.num_rows)
        return np.stack([lookup[f][1] for f in t.column("frame_id").to_pylist()])

    m1 = ReplayMemory.empty(20).update(t1, "p1", "diverse", capacity=20, seed=0, embed_fn=embed)
    m2 = m1.update(t2, "p2", "diverse", capacity=20, seed=0, embed_fn=embed)
    assert calls == [t1.num_rows, 20 + t2.num_rows]
    assert {lookup[f][0] for f in m2.table.column("frame_id").to_pylist()} == set(range(20))
    # A shard larger than the candidate pool: only memory + pool rows are embedded.
    big, big_lookup = clustered("p2", list(range(20)), seed=1)
    lookup |= big_lookup
    m1.update(big, "p2", "diverse", capacity=20, seed=0, embed_fn=embed, candidate_pool=60)
    assert calls[-1] == 20 + 60 < big.num_rows


# -- hard ------------------------------------------------------------------------------------


def test_hard_keeps_the_highest_scores_balanced_by_period() -> None:
    p1, p2 = frames("p1", 40), frames("p2", 40)
    rng = np.random.default_rng(1)
    score = dict(zip(p1.column("frame_id").to_pylist(), rng.uniform(0, 1, 40), strict=True))
    score |= dict(zip(p2.column("frame_id").to_pylist(), rng.uniform(5, 6, 40), strict=True))
    seen_rows: list[int] = []

    def score_fn(t: pa.Table) -> np.ndarray:
        seen_rows.append(t.num_rows)
        return np.array([score[f] for f in t.column("frame_id").to_pylist()])

    def top(table: pa.Table, k: int) -> set[str]:
        ids = table.column("frame_id").to_pylist()
        return set(sorted(ids, key=lambda f: -score[f])[:k])

    m1 = ReplayMemory.empty(10).update(p1, "p1", "hard", capacity=10, seed=0, score_fn=score_fn)
    assert set(m1.table.column("frame_id").to_pylist()) == top(p1, 10)
    m2 = m1.update(p2, "p2", "hard", capacity=10, seed=0, score_fn=score_fn, candidate_pool=40)
    # p2 scores are all higher, yet p1 keeps its quota: its own top 5.
    assert set(m2.table.column("frame_id").to_pylist()) == top(p1, 5) | top(p2, 5)
    m3 = m1.update(p2, "p2", "hard", capacity=10, seed=0, score_fn=score_fn, candidate_pool=15)
    assert seen_rows[-1] == 10 + 15
    assert m3.manifest["periods"] == {"p1": 5, "p2": 5}


def test_a_frames_hard_score_does_not_depend_on_the_batching(cifar_jpegs: list[bytes]) -> None:
    """The same frame scores the same whatever the batch size and its position: 20 frames
    scored in one batch, in batches of 6 (a partial last batch of 2) and shuffled in
    batches of 7. A per-batch NT-Xent scales with log(2B - 1), so the partial batch's
    frames would look easy and never be kept."""
    import torch

    from cssl_core.config import AugmentConfig, ModelConfig
    from cssl_core.data.images import frame_id
    from cssl_core.learn.losses import nt_xent
    from cssl_core.learn.models import Embedder
    from cssl_core.learn.scoring import nt_xent_against_all, ssl_loss_per_frame

    torch.manual_seed(0)
    model = Embedder(
        ModelConfig(
            backbone="resnet10t",
            input_size=32,
            projector_hidden=64,
            projector_dim=32,
            predictor_hidden=64,
        )
    )
    images = cifar_jpegs[:20]
    table = pa.table({"frame_id": [frame_id(b) for b in images], "image": images})

    def scores(t: pa.Table, batch_size: int) -> np.ndarray:
        return ssl_loss_per_frame(model, AugmentConfig(), t, 0.2, seed=3, batch_size=batch_size)

    whole = scores(table, 256)
    assert whole.shape == (20,) and np.isfinite(whole).all()
    np.testing.assert_allclose(scores(table, 6), whole, rtol=1e-4, atol=1e-5)
    order = np.random.default_rng(0).permutation(20)
    np.testing.assert_allclose(scores(table.take(order), 7), whole[order], rtol=1e-4, atol=1e-5)
    assert len(set(np.round(whole, 4))) > 10  # frames do differ: the test can see a mix-up
    # The score is NT-Xent with the whole scored set as one batch, however it is blocked.
    z1, z2 = torch.randn(2, 1500, 8, generator=torch.Generator().manual_seed(0))
    reference = nt_xent(z1, z2, 0.2, reduction="none").reshape(2, -1).mean(0)
    torch.testing.assert_close(nt_xent_against_all(z1, z2, 0.2), reference)


# -- invariants for every strategy -------------------------------------------------------------


def unit_embed(t: pa.Table) -> np.ndarray:
    ids = t.column("frame_id").to_pylist()
    rows = [np.frombuffer(bytes.fromhex(f)[:16], dtype=np.uint8).astype(float) - 127.5 for f in ids]
    emb = np.stack(rows)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def hash_score(t: pa.Table) -> np.ndarray:
    return np.array([int(f[:6], 16) for f in t.column("frame_id").to_pylist()], dtype=float)


@pytest.mark.parametrize("selection", ["reservoir", "balanced", "diverse", "hard"])
def test_capacity_train_only_purity_and_determinism(selection: str) -> None:
    kwargs = {"embed_fn": unit_embed, "score_fn": hash_score, "candidate_pool": 25}
    sizes = {"p1": 7, "p2": 40, "p3": 3, "p4": 60}
    splits = {p: ["eval" if i % 4 == 0 else "train" for i in range(n)] for p, n in sizes.items()}
    shards = {p: frames(p, n, cats(a=n // 2, b=n - n // 2), splits[p]) for p, n in sizes.items()}

    def run(seed: int) -> list[ReplayMemory]:
        memory, out = ReplayMemory.empty(16), []
        for period, shard in shards.items():
            memory = memory.update(shard, period, selection, capacity=16, seed=seed, **kwargs)
            out.append(memory)
        return out

    versions = run(seed=7)
    seen = 0
    for memory, period in zip(versions, shards, strict=True):
        seen += splits[period].count("train")
        assert len(memory) <= 16
        assert memory.seen == seen and memory.period == period
        assert set(memory.table.column("split").to_pylist()) <= {"train"}
        assert memory.manifest["num_rows"] == len(memory)
        assert sum(memory.manifest["periods"].values()) == len(memory)
        assert len(set(memory.table.column("frame_id").to_pylist())) == len(memory)
    assert len(versions[-1]) == 16
    assert [m.parent for m in versions] == [None, "p1", "p2", "p3"]
    # update() never changes the memory it was called on.
    first = versions[0]
    assert first.fingerprint == replay.fingerprint(first.table) and len(first) == 5
    # Same seed, same memory; the fingerprint identifies the content.
    assert [m.fingerprint for m in run(seed=7)] == [m.fingerprint for m in versions]
    if selection in ("reservoir", "balanced"):
        assert run(seed=8)[-1].fingerprint != versions[-1].fingerprint


def test_update_rejects_bad_input() -> None:
    memory = ReplayMemory.empty(5).update(frames("p1", 3), "p1", "reservoir", capacity=5, seed=0)
    with pytest.raises(ReplayError, match="already contains period 'p1'"):
        memory.update(frames("p1", 3), "p1", "reservoir", capacity=5, seed=0)
    # A period that left no frame in memory (here: no train frames) still counts as folded in.
    no_train = frames("p0", 2, splits=["eval", "eval"])
    m0 = ReplayMemory.empty(5).update(no_train, "p0", "reservoir", capacity=5, seed=0)
    later = m0.update(frames("p1", 3), "p1", "reservoir", capacity=5, seed=0)
    assert (len(m0), m0.seen, later.manifest["periods"]) == (0, 0, {"p1": 3})
    assert later.manifest["history"] == ["p0", "p1"]
    with pytest.raises(ReplayError, match="already contains period 'p0'"):
        later.update(no_train, "p0", "reservoir", capacity=5, seed=0)
    with pytest.raises(ReplayError, match="include periods \\['p1'\\]"):
        memory.update(frames("p1", 3), "p2", "reservoir", capacity=5, seed=0)
    with pytest.raises(ReplayError, match="unknown selection 'fifo'"):
        memory.update(frames("p2", 3), "p2", "fifo", capacity=5, seed=0)
    with pytest.raises(ReplayError, match="needs embed_fn"):
        memory.update(frames("p2", 9), "p2", "diverse", capacity=5, seed=0)
    with pytest.raises(ReplayError, match="needs score_fn"):
        memory.update(frames("p2", 3), "p2", "hard", capacity=5, seed=0)
    with pytest.raises(ReplayError, match="invalid period name"):
        memory.update(frames("p2", 3), "../p2", "reservoir", capacity=5, seed=0)
    with pytest.raises(ReplayError, match="missing column 'image'"):
        memory.update(frames("p2", 3).drop_columns(["image"]), "p2", "reservoir", 5, 0)
    with pytest.raises(ReplayError, match="shape"):
        memory.update(frames("p2", 9), "p2", "diverse", 5, 0, embed_fn=lambda t: np.ones((2, 3)))


# -- sampling ----------------------------------------------------------------------------------


def test_sample_and_batcher() -> None:
    memory = ReplayMemory.empty(50).update(frames("p1", 30), "p1", "reservoir", 50, seed=0)
    drawn = memory.sample(20, np.random.default_rng(0))
    ids = drawn.column("frame_id").to_pylist()
    assert len(ids) == 20 == len(set(ids))
    assert ids == memory.sample(20, np.random.default_rng(0)).column("frame_id").to_pylist()
    over = memory.sample(45, np.random.default_rng(1)).column("frame_id").to_pylist()
    assert len(over) == 45 and set(over) == set(memory.table.column("frame_id").to_pylist())
    assert memory.sample(0, np.random.default_rng(0)).num_rows == 0
    with pytest.raises(ReplayError, match="empty replay memory"):
        ReplayMemory.empty(3).sample(1, np.random.default_rng(0))

    assert replay_split(128, 0.5, 1000) == (64, 64)
    assert replay_split(128, 0.5, 10) == (118, 10)
    assert replay_split(128, 0.0, 1000) == (128, 0)
    assert replay_split(2, 0.9, 1000) == (1, 1)
    batcher = ReplayBatcher(
        memory, batch_size=16, replay_ratio=0.25, generator=np.random.default_rng(2)
    )
    batch = next(iter(batcher))
    assert (batcher.num_new, batcher.num_replay, batch.num_rows) == (12, 4, 4)
    assert batch.schema == FRAME_SCHEMA


# -- persistence ---------------------------------------------------------------------------


def three_periods() -> Iterator[ReplayMemory]:
    memory = ReplayMemory.empty(12)
    for period, n in (("p1", 10), ("p2", 9), ("p3", 11)):
        memory = memory.update(frames(period, n), period, "reservoir", capacity=12, seed=1)
        yield memory


def test_memory_round_trip(store: ObjectStore) -> None:
    assert latest_period(store) is None and list_versions(store) == []
    saved = []
    for memory in three_periods():
        manifest = memory.save(store, memory.period, rows_per_part=5)
        saved.append(memory)
        assert manifest["parts"][0] == {
            "key": "part-00000.parquet",
            "num_rows": 5,
            "sha256": manifest["parts"][0]["sha256"],
        }
        assert sum(p["num_rows"] for p in manifest["parts"]) == len(memory)
    assert list_versions(store) == ["p1", "p2", "p3"]
    assert latest_period(store) == "p3"
    assert store.list("memory/p3/") == [
        "memory/p3/manifest.json",
        "memory/p3/part-00000.parquet",
        "memory/p3/part-00001.parquet",
        "memory/p3/part-00002.parquet",
    ]
    for memory in saved:
        loaded = ReplayMemory.load(store, memory.period)
        assert loaded.table.equals(memory.table)
        assert loaded.fingerprint == memory.fingerprint
        assert {k: v for k, v in loaded.manifest.items() if k != "parts"} == memory.manifest
    manifest = json.loads(store.get_bytes("memory/p2/manifest.json"))
    assert (manifest["period"], manifest["parent"], manifest["generation"]) == ("p2", "p1", 2)
    assert manifest["history"] == ["p1", "p2"]
    assert (manifest["capacity"], manifest["selection"], manifest["seen"]) == (12, "reservoir", 19)
    assert (
        manifest["num_rows"] == 12 and manifest["periods"]["p1"] + manifest["periods"]["p2"] == 12
    )
    # The next period continues from the loaded memory exactly as from the in-process one.
    nxt = ReplayMemory.load(store, "p3").update(frames("p4", 4), "p4", "reservoir", 12, seed=1)
    assert (
        nxt.fingerprint == saved[-1].update(frames("p4", 4), "p4", "reservoir", 12, 1).fingerprint
    )


def test_a_memory_records_the_selection_config_that_made_it(tmp_path: Path) -> None:
    """A memory is reused only by a config that would have made it: the manifest records the
    selection config (and, for model-scored selections, the selecting model), a memory made
    with another selection or capacity does not match, and a manifest from before the field
    existed matches nothing (unknown config: rebuild)."""
    store = LocalStore(tmp_path)
    config = replay.selection_config("reservoir", capacity=4, seed=0, candidate_pool=25)
    m1 = ReplayMemory.empty(4).update(frames("p1", 10), "p1", "reservoir", capacity=4, seed=0)
    assert m1.selection_config == config and m1.made_with(config)
    assert not m1.made_with(replay.selection_config("reservoir", 5, 0, 25))
    assert not m1.made_with(replay.selection_config("balanced", 4, 0, 25))
    # the pool size and scoring only count for the selections that use them
    assert m1.made_with(replay.selection_config("reservoir", 4, 0, 99, scoring={"t": 0.2}))
    scoring = {"temperature": 0.2}
    hard = ReplayMemory.empty(4).update(
        frames("p1", 10),
        "p1",
        "hard",
        4,
        0,
        score_fn=hash_score,
        scoring=scoring,
        selected_by="model-sha",
    )
    assert hard.made_with(replay.selection_config("hard", 4, 0, 4096, scoring=scoring))
    assert not hard.made_with(replay.selection_config("hard", 4, 0, 4096, {"temperature": 0.5}))
    assert hard.manifest["selected_by"] == "model-sha"

    m1.save(store)
    assert ReplayMemory.load(store, "p1").made_with(config)
    key = tmp_path / "memory" / "p1" / "manifest.json"
    old = json.loads(key.read_text())
    del old["selection_config"]  # a manifest written before the field existed
    key.write_text(json.dumps(old))
    legacy = ReplayMemory.load(store, "p1")
    assert legacy.selection_config is None and not legacy.made_with(config)


def test_replace_publishes_a_memory_made_with_another_config(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    reservoir = ReplayMemory.empty(4).update(frames("p1", 10), "p1", "reservoir", 4, seed=0)
    balanced = ReplayMemory.empty(6).update(frames("p1", 10), "p1", "balanced", 6, seed=0)
    reservoir.save(store)
    with pytest.raises(ReplayError, match="already holds different content"):
        balanced.save(store)
    published = balanced.save(store, replace=True)
    loaded = ReplayMemory.load(store, "p1")
    assert loaded.fingerprint == balanced.fingerprint == published["fingerprint"]
    assert loaded.made_with(replay.selection_config("balanced", 6, 0, 4096))
    assert store.list("memory/p1/") == ["memory/p1/manifest.json", "memory/p1/part-00000.parquet"]
    # same frames, other config (a bigger capacity keeps the same 10 frames): the manifest is
    # rewritten with replace, left alone without it
    bigger = ReplayMemory.empty(20).update(frames("p1", 10), "p1", "reservoir", 20, seed=0)
    same = ReplayMemory.empty(30).update(frames("p1", 10), "p1", "reservoir", 30, seed=0)
    bigger.save(store, replace=True)
    assert same.fingerprint == bigger.fingerprint
    assert same.save(store)["capacity"] == 20
    assert same.save(store, replace=True)["capacity"] == 30
    assert ReplayMemory.load(store, "p1").made_with(replay.selection_config("reservoir", 30, 0, 1))


def test_interrupted_save_keeps_previous_version(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    m1, m2, _ = three_periods()
    m1.save(store)

    def crash(*_: object) -> None:
        raise RuntimeError("killed before the manifest was written")

    monkeypatch.setattr(replay, "_write_manifest", crash)
    with pytest.raises(RuntimeError, match="killed"):
        m2.save(store, rows_per_part=2)
    monkeypatch.undo()
    assert len(store.list("memory/p2/")) == 6  # parts on disk, but no manifest: invisible
    assert latest_period(store) == "p1" and list_versions(store) == ["p1"]
    assert not ReplayMemory.exists(store, "p2")
    assert ReplayMemory.load(store, "p1").fingerprint == m1.fingerprint
    with pytest.raises(ReplayError, match="no replay memory for period 'p2'"):
        ReplayMemory.load(store, "p2")
    # The retry publishes and clears the leftovers of the crashed attempt.
    m2.save(store, rows_per_part=100)
    assert store.list("memory/p2/") == ["memory/p2/manifest.json", "memory/p2/part-00000.parquet"]
    assert latest_period(store) == "p2"
    assert ReplayMemory.load(store, "p2").fingerprint == m2.fingerprint


def test_versions_are_immutable(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    m1 = ReplayMemory.empty(4).update(frames("p1", 10), "p1", "reservoir", capacity=4, seed=0)
    published = m1.save(store)
    part = tmp_path / "memory" / "p1" / "part-00000.parquet"
    before = part.stat().st_mtime_ns
    assert m1.save(store, "p1") == published  # idempotent rerun: no-op
    assert part.stat().st_mtime_ns == before
    other = ReplayMemory.empty(4).update(frames("p1", 10), "p1", "reservoir", capacity=4, seed=9)
    assert other.fingerprint != m1.fingerprint
    with pytest.raises(ReplayError, match="already holds different content"):
        other.save(store)
    assert ReplayMemory.load(store, "p1").fingerprint == m1.fingerprint
    with pytest.raises(ReplayError, match="no period"):
        ReplayMemory.empty(4).save(store)
    with pytest.raises(ReplayError, match="not 'p2'"):
        m1.save(store, "p2")


def test_load_rejects_tampered_versions(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    m1 = ReplayMemory.empty(4).update(frames("p1", 10), "p1", "reservoir", capacity=4, seed=0)
    good = m1.save(store)
    key = "memory/p1/manifest.json"

    def with_manifest(**changes: object) -> None:
        store.put_bytes(key, json.dumps({**good, **changes}).encode())

    part = dict(good["parts"][0])
    cases = [
        ({"parts": [{**part, "key": "../../../etc/passwd"}]}, "invalid part key"),
        ({"parts": [{**part, "key": "part-00000.parquet/../x"}]}, "invalid part key"),
        ({"parts": [{**part, "sha256": "0" * 64}]}, "does not match its manifest hash"),
        ({"num_rows": 3, "parts": [{**part, "num_rows": 3}]}, "3 rows, manifest says 3|rows"),
        ({"fingerprint": "f" * 64}, "do not match the manifest fingerprint"),
        ({"period": "p9"}, "manifest is for period 'p9'"),
        ({"num_rows": 9}, "exceeds capacity"),
        ({"schema_version": 99}, "schema version 99"),
        ({"parent": "p0"}, "parent does not match history"),
    ]
    for changes, message in cases:
        with_manifest(**changes)
        with pytest.raises(ReplayError, match=message):
            ReplayMemory.load(store, "p1")
    store.put_bytes(key, b"{not json")
    with pytest.raises(ReplayError, match="not valid JSON"):
        ReplayMemory.load(store, "p1")
    with pytest.raises(ReplayError, match="unreadable manifest"):
        latest_period(store)
    with pytest.raises(ReplayError, match="invalid period name"):
        ReplayMemory.load(store, "p1/../p0")


def test_version_with_no_frames_round_trips(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    m0 = ReplayMemory.empty(3).update(frames("p0", 2, splits=["eval"] * 2), "p0", "balanced", 3, 0)
    manifest = m0.save(store)
    assert (manifest["num_rows"], manifest["parts"]) == (0, [])
    loaded = ReplayMemory.load(store, "p0")
    assert len(loaded) == 0 and loaded.table.schema == FRAME_SCHEMA
    assert latest_period(store) == "p0"
