"""Drift statistics: MMD² against a reference kept here and hand-computed values, the permutation
p-value over stream segments, the two-part verdict, category shares, seeded sampling, and the
end-to-end check."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from cssl_core.config import ConfigError, DriftConfig, ModelConfig, load_params
from cssl_core.data.images import encode_jpeg
from cssl_core.data.shard import FRAME_SCHEMA, Frame, Shard, ShardWriter
from cssl_core.evaluation.drift import (
    MIN_FRAMES,
    MIN_UNITS,
    CategoryShift,
    DriftError,
    category_shifts,
    drift_check,
    drift_test,
    embed_frames,
    gaussian_kernel,
    median_bandwidth,
    mmd2_unbiased,
    mmd_test,
    sample_shard,
    sample_table,
    segment_ids,
    squared_distances,
    verdict,
)
from cssl_core.learn.models import Embedder

TINY_MODEL = ModelConfig(
    backbone="resnet10t", input_size=32, projector_hidden=64, projector_dim=32, predictor_hidden=64
)


def reference_mmd2(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """Gretton et al. 2012 Eq. (3), written as the three sums with loops."""

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma**2))

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return xx + yy - 2 * xy


# -- the statistic ------------------------------------------------------------------------
def test_mmd2_matches_a_hand_computed_value() -> None:
    # X = {0, 1}, Y = {2, 3}, sigma = 1: xx = yy = e^-1/2, xy = (e^-2 + e^-4.5 + e^-1/2 + e^-2)/4.
    z = np.array([[0.0], [1.0], [2.0], [3.0]])
    got = mmd2_unbiased(gaussian_kernel(squared_distances(z), 1.0), 2)
    expected = 1.5 * math.exp(-0.5) - math.exp(-2) - 0.5 * math.exp(-4.5)
    assert got == pytest.approx(expected, abs=1e-12)
    # Distances 1, 1, 1, 2, 2, 3: the median heuristic gives 1.5.
    assert median_bandwidth(squared_distances(z)) == pytest.approx(1.5)


def test_mmd2_matches_the_reference_on_random_unequal_samples() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.5
    z = np.concatenate([x, y])
    sigma = median_bandwidth(squared_distances(z))
    got = mmd2_unbiased(gaussian_kernel(squared_distances(z), sigma), len(x))
    assert got == pytest.approx(reference_mmd2(x, y, sigma), abs=1e-12)
    pairwise = [np.linalg.norm(a - b) for a, b in itertools.combinations(z, 2)]
    assert sigma == pytest.approx(float(np.median(pairwise)), abs=1e-12)


def test_bandwidth_of_degenerate_samples_stays_usable() -> None:
    same = np.zeros((4, 2))
    assert median_bandwidth(squared_distances(same)) == 1.0
    # Most pairs coincide: the median is 0, so the mean distance is used.
    mostly = np.array([[0.0], [0.0], [0.0], [0.0], [4.0]])
    assert median_bandwidth(squared_distances(mostly)) == pytest.approx(4 * 4 / 10)


def test_mmd_test_statistic_is_the_unbiased_mmd2_and_p_value_is_a_permutation_p() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(25, 4)) + 1.0
    result = mmd_test(x, y, permutations=199, seed=0)
    z = np.concatenate([x, y])
    sigma = result.bandwidth
    assert sigma == pytest.approx(median_bandwidth(squared_distances(z)))
    assert result.mmd2 == pytest.approx(reference_mmd2(x, y, sigma), abs=1e-12)
    assert (result.new_units, result.reference_units) == (30, 25)  # every frame its own unit
    # A clear shift: no permutation reaches the observed value, p = 1 / (B + 1).
    assert result.p_value == pytest.approx(1 / 200)
    # Same seed, same answer; the p-value of one distribution is far from significant.
    assert mmd_test(x, y, 199, 0) == result
    null = mmd_test(rng.normal(size=(30, 4)), rng.normal(size=(30, 4)), 199, 0)
    assert null.p_value > 0.05


def test_permutation_null_is_the_statistic_of_relabelled_frames() -> None:
    # The vectorised statistic scipy permutes equals MMD² of the kernel with rows relabelled.
    rng = np.random.default_rng(2)
    z = rng.normal(size=(24, 3))
    kernel = gaussian_kernel(squared_distances(z), 1.3)
    for _ in range(5):
        perm = rng.permutation(24)
        relabelled = mmd2_unbiased(kernel[np.ix_(perm, perm)], 10)
        assert relabelled == pytest.approx(reference_mmd2(z[perm[:10]], z[perm[10:]], 1.3))


def test_too_few_frames_or_bad_embeddings_are_one_line_errors() -> None:
    ok = np.zeros((MIN_FRAMES, 4))
    with pytest.raises(DriftError, match=f"the new sample has 19 frames.*at least {MIN_FRAMES}"):
        mmd_test(np.zeros((19, 4)), ok)
    with pytest.raises(DriftError, match="the reference sample has 0 frames"):
        mmd_test(ok, np.zeros((0, 4)))
    with pytest.raises(DriftError, match="same D"):
        mmd_test(ok, np.zeros((MIN_FRAMES, 5)))
    bad = ok.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DriftError, match="NaN or infinite"):
        mmd_test(ok, bad)
    with pytest.raises(DriftError, match=r"new units have shape \(3,\), expected \(20,\)"):
        mmd_test(ok, ok, new_units=[0, 1, 2])


# -- the verdict --------------------------------------------------------------------------
def test_verdict_needs_significance_and_effect() -> None:
    assert verdict(0.01, 0.05, alpha=0.05, min_effect=0.01)
    assert not verdict(0.01, 0.005, alpha=0.05, min_effect=0.01)  # significant, too small
    assert not verdict(0.20, 0.50, alpha=0.05, min_effect=0.01)  # large, not significant
    assert not verdict(0.05, 0.50, alpha=0.05, min_effect=0.01)  # p must be below alpha


def test_a_large_sample_does_not_flag_a_difference_too_small_to_matter() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 4)), rng.normal(size=(600, 4))
    y[:, 0] += 0.25  # a real but small difference, which 600 frames per side resolve
    cfg = DriftConfig(min_effect=0.01, permutations=199)
    result = drift_test(y, x, cfg)
    assert result.significant and result.p_value == pytest.approx(1 / 200)
    assert 0 < result.effect < 0.01
    assert not result.drifted
    assert result.reason == "significant but smaller than min_effect"
    # The same data with no minimum effect would have triggered.
    assert drift_test(y, x, cfg.model_copy(update={"min_effect": 0.0})).drifted


def test_segments_group_a_streams_frames_by_time_window() -> None:
    streams = ["a", "a", "a", "b", "a"]
    ts = [0, 30_000, 61_000, 0, 59_999]
    units = segment_ids(streams, ts, 60)
    assert units[0] == units[1] == units[4] != units[2]  # a in [0, 60 s) vs a in [60, 120 s)
    assert len(set(units.tolist())) == 3  # and b is its own unit
    assert list(segment_ids(streams, ts, 0)) == [0, 1, 2, 3, 4]  # every frame independent
    with pytest.raises(DriftError, match="5 stream ids but 2 timestamps"):
        segment_ids(streams, ts[:2], 60)


def clustered(rng: np.random.Generator, clusters: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``clusters`` clips of ``size`` near-duplicate frames each, clip centres from N(0, I)."""
    centres = rng.normal(size=(clusters, 8))
    frames = np.repeat(centres, size, axis=0) + 0.01 * rng.normal(size=(clusters * size, 8))
    return frames, np.repeat(np.arange(clusters), size)


def test_relabelling_whole_segments_keeps_clustered_data_from_faking_a_shift() -> None:
    # Both sides come from one distribution of clips, but frames of a clip are near-duplicates:
    # relabelling single frames treats 150 frames as 150 observations and flags a difference
    # (a false trigger); relabelling whole clips does not.
    rng = np.random.default_rng(5)
    (x, ux), (y, uy) = clustered(rng, 15, 10), clustered(rng, 15, 10)
    frames = mmd_test(x, y, 199, 0)
    segments = mmd_test(x, y, 199, 0, new_units=ux, reference_units=uy)
    assert frames.mmd2 == segments.mmd2 and frames.p_value == pytest.approx(1 / 200)
    assert segments.p_value > 0.2 and (segments.new_units, segments.reference_units) == (15, 15)
    # A real shift of every clip is still found at the segment level.
    shifted = mmd_test(x + 1.5, y, 199, 0, new_units=ux, reference_units=uy)
    assert shifted.p_value == pytest.approx(1 / 200)
    # Explicit one-frame units are the frame-level test.
    one_each = mmd_test(x, y, 199, 0, new_units=np.arange(150), reference_units=np.arange(150))
    assert one_each == frames
    with pytest.raises(DriftError, match=f"spans only 9 independent units.*at least {MIN_UNITS}"):
        mmd_test(x, y, new_units=ux % 9, reference_units=uy)


# -- categories and the result ------------------------------------------------------------
def test_category_shifts_and_total_variation_are_exact() -> None:
    shifts, tv = category_shifts({"a": 1, "b": 1, "c": 2}, {"a": 3, "b": 1})
    assert shifts == (
        CategoryShift("a", 0.75, 0.25),
        CategoryShift("c", 0.0, 0.5),
        CategoryShift("b", 0.25, 0.25),
    )
    assert [s.difference for s in shifts] == [-0.5, 0.5, 0.0]
    assert tv == pytest.approx(0.5)
    assert category_shifts({}, {"a": 3}) == ((), None)


def test_result_summary_is_one_line_and_json_ready() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(40, 3)) + 2.0, rng.normal(size=(40, 3))
    result = drift_test(
        x,
        y,
        DriftConfig(permutations=99),
        new_counts={"pong": 30, "boxing": 10},
        reference_counts={"boxing": 40},
    )
    assert result.drifted and result.total_variation == pytest.approx(0.75)
    line = result.summary()
    assert "\n" not in line and line.startswith("DRIFT: significant and large enough")
    assert "pong 0%->75%" in line and "boxing 100%->25%" in line
    data = json.loads(json.dumps(result.to_dict()))
    assert data["drifted"] is True and data["significant"] is True
    assert data["category_shifts"][1] == {  # equal moves are ordered by name
        "category": "pong",
        "reference_share": 0.0,
        "new_share": 0.75,
        "difference": 0.75,
    }


# -- sampling -----------------------------------------------------------------------------
def frame_table(n: int, categories: list[str | None] | None = None) -> pa.Table:
    cats = categories or [f"g{i % 3}" for i in range(n)]
    rows = {
        "frame_id": [f"{i:04d}" for i in range(n)],
        "stream_id": [f"s{i % 7}" for i in range(n)],
        "ts": [datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i) for i in range(n)],
        "period": ["p01"] * n,
        "category": cats,
        "split": ["train"] * n,
        "image": [f"img{i}".encode() for i in range(n)],
        "width": [1] * n,
        "height": [1] * n,
        "source": ["test"] * n,
    }
    return pa.Table.from_pydict(rows, schema=FRAME_SCHEMA)


def test_sample_table_is_seeded_uniform_and_ignores_row_order() -> None:
    table = frame_table(50)
    sample = sample_table(table, 20, seed=7, source="memory p03")
    assert len(sample) == 20 == len(set(sample.images))
    assert sample.population == 50 and sample.source == "memory p03"
    assert sample.category_counts == {"g0": 17, "g1": 17, "g2": 16}  # the whole table
    for image, category, stream, ts in zip(
        sample.images, sample.categories, sample.stream_ids, sample.ts_ms, strict=True
    ):
        i = int(image[3:])
        assert (category, stream) == (f"g{i % 3}", f"s{i % 7}")
        assert ts == 1_767_225_600_000 + 1000 * i  # 2026-01-01 UTC + i seconds, in ms
    shuffled = table.take(pa.array(random.Random(0).sample(range(50), 50)))
    assert sample_table(shuffled, 20, seed=7, source="memory p03") == sample
    assert sample_table(table, 20, seed=8).images != sample.images
    # Every row can be drawn (no off-by-one at either end), and small tables are taken whole.
    seen = {img for s in range(60) for img in sample_table(frame_table(25), 20, s).images}
    assert len(seen) == 25
    assert sorted(sample_table(table, 80, 0).images) == sorted(table.column("image").to_pylist())


def test_empty_or_tiny_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DriftError, match=f"replay memory has no frames; .*at least {MIN_FRAMES}"):
        sample_table(FRAME_SCHEMA.empty_table(), 50, 0, source="replay memory")
    with pytest.raises(DriftError, match="new table has only 5 frames"):
        drift_check(Embedder(TINY_MODEL), frame_table(5), frame_table(40), DriftConfig())
    with pytest.raises(DriftError, match="has no stream_id, ts column"):
        sample_table(frame_table(40).drop_columns(["stream_id", "ts"]), 20, 0)
    with pytest.raises(DriftError, match="sample size 10 is below the minimum of 20"):
        sample_table(frame_table(40), 10, 0)
    # A shard whose train split is empty (every frame held out for evaluation).
    with ShardWriter(tmp_path, "p01") as writer:
        for i in range(3):
            image = encode_jpeg(Image.new("RGB", (8, 8), (40 * i, 0, 0)))
            writer.add(Frame(image, "s", datetime(2026, 1, 1, tzinfo=UTC), "test", split="eval"))
        writer.commit()
    with pytest.raises(DriftError, match=r"p01 \(train split\) has no frames"):
        sample_shard(Shard.open(tmp_path / "p01"), 50, 0)


def test_sample_shard_reads_only_the_chosen_frames_of_a_split(sim_shards: Path) -> None:
    shard = Shard.open(sim_shards / "p01")
    meta = shard.read(split="train")
    sample = sample_shard(shard, 30, seed=0)
    assert len(sample) == 30 and sample.population == meta.num_rows
    by_image = dict(
        zip(meta.column("image").to_pylist(), meta.column("category").to_pylist(), strict=True)
    )
    assert all(
        by_image[img] == cat for img, cat in zip(sample.images, sample.categories, strict=True)
    )
    assert sample.category_counts == dict(
        sorted(Counter(meta.column("category").to_pylist()).items())
    )
    assert sample == sample_table(meta, 30, 0, source=sample.source)
    streams = dict(
        zip(meta.column("image").to_pylist(), meta.column("stream_id").to_pylist(), strict=True)
    )
    assert [streams[img] for img in sample.images] == list(sample.stream_ids)


# -- end to end ---------------------------------------------------------------------------
def test_drift_check_end_to_end_on_simulated_shards(sim_shards: Path) -> None:
    torch.manual_seed(0)
    model = Embedder(TINY_MODEL)
    # 80-frame periods hold a handful of clips: too few stream segments for the default test
    # (a clear error), so this runs the frame-level test.
    p01, p03 = Shard.open(sim_shards / "p01"), Shard.open(sim_shards / "p03")
    with pytest.raises(DriftError, match="independent units.*drift.segment_seconds=0"):
        drift_check(model, p03, p01, DriftConfig(sample_size=40))
    cfg = DriftConfig(sample_size=40, permutations=199, min_effect=0.01, segment_seconds=0)
    feats = embed_frames(model, sample_shard(p01, 40, 0).images)
    assert feats.shape == (40, model.num_features) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)

    shifted = drift_check(model, p03, p01, cfg)
    assert shifted.drifted and shifted.new_frames == shifted.reference_frames == 40
    assert shifted.new_units == shifted.reference_units == 40
    assert shifted.total_variation is not None and shifted.total_variation > 0.3
    # One shard against a sample of itself (the reference side draws with seed + 1).
    same = drift_check(model, p01, p01.read(split="train"), cfg)
    assert not same.drifted and same.total_variation == 0.0


# -- configuration ------------------------------------------------------------------------
def test_drift_section_defaults_and_bad_values() -> None:
    cfg = load_params(None, []).drift
    assert cfg == DriftConfig() and cfg.reference == "champion" and cfg.segment_seconds == 60
    for override, key in (
        ("drift.sample_size=10", "drift.sample_size"),
        ("drift.alpha=1.5", "drift.alpha"),
        ("drift.min_effect=-0.1", "drift.min_effect"),
        ("drift.reference=yesterday", "drift.reference"),
        ("drift.segment_seconds=-1", "drift.segment_seconds"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_params(None, [override])
    # Drift settings decide whether to refresh, not what a refresh makes: not in the hash.
    tuned = load_params(None, ["drift.alpha=0.01", "drift.min_effect=0.05"])
    assert tuned.config_hash() == load_params(None, []).config_hash()
