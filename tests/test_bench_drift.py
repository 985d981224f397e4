"""The drift benchmark's trial construction and summaries, on synthetic embedded periods."""

from __future__ import annotations

import argparse
import subprocess
import sys
import zlib
from collections import Counter

import numpy as np
import pytest

from benchmarks.cli import add_drift_arguments
from benchmarks.drift import (
    SHIFTED_PERIOD,
    STATIC_PERIODS,
    EmbeddedPeriod,
    conditions,
    measure_params,
    random_halves,
    rates,
    time_halves,
)
from cssl_core.config import Params


def period(name: str, games: list[str], n: int = 60, offset: float = 0.0) -> EmbeddedPeriod:
    """``n`` frames in clips of 3 (one stream per clip, 1 s apart), clips minutes apart."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    cats = np.array([games[i % len(games)] for i in range(n)])
    feats = rng.normal(size=(n, 4)) + offset
    streams = np.array([f"{name}-s{i // 3}" for i in range(n)])
    ts = np.array([(i // 3) * 600_000 + (i % 3) * 1000 for i in range(n)], dtype=np.int64)
    return EmbeddedPeriod(name, feats, cats, streams, ts)


@pytest.fixture
def embedded() -> dict[str, EmbeddedPeriod]:
    out = {p: period(p, ["a", "b"]) for p in STATIC_PERIODS}
    out[SHIFTED_PERIOD] = period(SHIFTED_PERIOD, ["c", "d"], offset=3.0)
    out["p06"] = period("p06", ["c", "e"], offset=3.0)
    out["p07"] = period("p07", ["e", "f"], offset=3.0)
    return out


def test_time_halves_split_at_the_median_timestamp() -> None:
    data = period("p01", ["a"], n=9)
    first, second = time_halves(data)
    assert len(first.rows) == 4 and len(second.rows) == 5
    assert data.ts_ms[first.rows].max() < data.ts_ms[second.rows].min()
    assert sorted([*first.rows, *second.rows]) == list(range(9))


def test_random_halves_split_whole_segments() -> None:
    data = period("p01", ["a"], n=30)  # 10 clips of 3 frames
    first, second = random_halves(data, segment_seconds=60, seed=0)
    assert len(first.rows) == len(second.rows) == 15
    assert not set(data.stream_ids[first.rows]) & set(data.stream_ids[second.rows])
    again, _ = random_halves(data, 60, 0)
    assert list(again.rows) == list(first.rows)


def test_conditions_cover_controls_power_and_stream_shifts(
    embedded: dict[str, EmbeddedPeriod],
) -> None:
    conds = conditions(embedded, shares=(0.25, 1.0), segment_seconds=60)
    kinds = Counter(c.kind for c in conds)
    # time halves of every period, random halves of the static ones, every static pair, one
    # power condition per share, every step after the static stretch, every period from p07
    # against p05.
    assert kinds == {
        "halves": 7,
        "random": 4,
        "static": 6,
        "power": 2,
        "stream": 3,
        "cumulative": 1,
    }
    assert all(c.shift == (c.kind in ("power", "stream", "cumulative")) for c in conds)
    rng = np.random.default_rng(0)
    quarter = next(c for c in conds if c.kind == "power" and c.share == 0.25)
    new, ref = quarter.build(20, rng)
    assert len(new.features) == len(ref.features) == 20
    assert new.counts["c"] + new.counts["d"] == 5  # round(0.25 * 20) frames of new games
    assert set(ref.counts) == {"a", "b"}
    full = next(c for c in conds if c.kind == "power" and c.share == 1.0)
    new, _ = full.build(20, rng)
    assert set(new.counts) == {"c", "d"}
    step = next(c for c in conds if c.label == "p06 vs p05")
    new, ref = step.build(10, rng)
    assert set(new.counts) <= {"c", "e"} and set(ref.counts) <= {"c", "d"}
    since = next(c for c in conds if c.kind == "cumulative")
    new, ref = since.build(10, rng)
    assert since.label == "p07 vs p05" and set(ref.counts) <= {"c", "d"}


def test_rates_count_significance_and_triggers_separately() -> None:
    rows = [
        {"p_value": 0.01, "effect": 0.02},
        {"p_value": 0.01, "effect": 0.001},
        {"p_value": 0.30, "effect": 0.05},
        {"p_value": 0.50, "effect": 0.0},
    ]
    assert rates(rows, alpha=0.05, min_effect=0.01) == {
        "tests": 4,
        "significant": 0.5,
        "triggered": 0.25,
    }


def test_measurement_stream_has_a_static_stretch_then_shifts() -> None:
    params = measure_params(Params(), frames_per_period=100)
    assert params.period_names == [f"p{k:02d}" for k in range(1, 10)]
    assert params.simulate.frames_per_period == 100
    from cssl_core.data.simulate import game_schedule

    schedule = game_schedule(params.simulate, 9)
    assert schedule[0] == schedule[1] == schedule[2] == schedule[3]
    assert set(schedule[4]).isdisjoint(schedule[3])
    assert all(schedule[t] != schedule[t + 1] for t in range(4, 8))


def test_options_parse_and_importing_the_module_loads_no_torch() -> None:
    parser = argparse.ArgumentParser()
    add_drift_arguments(parser)
    args = parser.parse_args(["--out", "x", "--sample-sizes", "100,200", "--shares", "0.1,1"])
    assert args.sample_sizes == (100, 200) and args.shares == (0.1, 1.0)
    code = "import sys, benchmarks.drift; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
