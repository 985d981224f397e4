"""The gate benchmark's measurement (benchmarks/gate.py): replicate eval sets, the gate's rule on
shared bootstraps, and the error-rate counts, on per-frame outcomes built by hand (the models
themselves are the product's; training them belongs to ``cssl bench gate`` runs, not the suite).
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import gate as bench
from cssl_core.config import GateConfig
from cssl_core.evaluation.outcomes import FrameOutcomes


def _outcomes(correct: np.ndarray, clip_frames: int = 1) -> FrameOutcomes:
    n = correct.size
    return FrameOutcomes(
        frame_ids=tuple(f"f{k:04d}" for k in range(n)),
        clusters=tuple(f"s{k // clip_frames:04d}" for k in range(n)),
        labels=tuple("game" for _ in range(n)),
        knn=correct.copy(),
        linear=correct.copy(),
    )


def _models(n: int = 400, clip_frames: int = 1) -> dict[str, dict[str, FrameOutcomes]]:
    """Champion and two same-recipe seeds at about 0.7 on every period; one damaged model that
    gets p01 wrong 60% of the time more than the others (worse by far more than any margin)."""
    rng = np.random.default_rng(3)
    base = {p: rng.random(n) < 0.7 for p in bench.PERIODS}
    models = {}
    for name, flip in (("lineage-p01", 0.0), (bench.CHAMPION, 0.0), ("seed-0", 0.05)):
        models[name] = {
            p: _outcomes(base[p] ^ (rng.random(n) < flip), clip_frames) for p in bench.PERIODS
        }
    models["seed-1"] = {p: _outcomes(base[p] ^ (rng.random(n) < 0.05), clip_frames) for p in base}
    worse = {p: base[p].copy() for p in base}
    worse["p01"] &= rng.random(n) < 0.4
    models["finetune-0"] = {p: _outcomes(worse[p], clip_frames) for p in base}
    return models


def _run(models: dict[str, dict[str, FrameOutcomes]], replicates: int = 4) -> dict:
    cfg = GateConfig(margin=0.05, bootstrap_samples=200)
    return bench.run_trials(models, (0, 1), cfg, (0.05, 0.1), replicates, 2, lambda _m: None)


def test_resampler_keeps_every_frame_of_a_drawn_stream_and_renames_repeats() -> None:
    outcomes = _outcomes(np.array([True, False, True, True, False, False]), clip_frames=2)
    sampler = bench.Resampler.of(outcomes)
    assert sampler.clusters == ("s0000", "s0001", "s0002")
    drawn = np.array([2, 0, 2])
    rep = sampler.apply(outcomes, drawn, by_frame=False)
    assert rep.clusters == ("s0002#0", "s0002#0", "s0000#1", "s0000#1", "s0002#2", "s0002#2")
    assert rep.knn.tolist() == [False, False, True, False, False, False]
    by_frame = sampler.apply(outcomes, drawn, by_frame=True)
    assert by_frame.clusters == by_frame.frame_ids and len(set(by_frame.clusters)) == 6


def test_the_champion_itself_is_never_rejected_and_a_far_worse_model_never_promoted() -> None:
    result = _run(_models())
    counts = result["counts"]["margin 0.05"]
    assert counts["trials"]["itself"] == 4 and counts["promoted"]["itself"] == 4
    assert result["deltas"]["finetune-0 vs seed-0"]["p01"] < -0.3
    assert counts["worse_by_margin"] == [0, 2 * 4]
    assert result["agreement"]["same"] == result["agreement"]["checked"] > 0
    rows = {row["setting"]: row for row in bench.summarise(result)}
    assert rows["margin 0.05"]["itself_rejected"]["rate"] == 0.0
    assert rows["margin 0.05"]["worse_promoted"]["n"] == 8
    assert rows["margin 0.05"]["worse_promoted"]["high"] < 0.5


def test_one_frame_streams_share_the_stream_bootstraps_with_the_frame_setting() -> None:
    result = _run(_models(clip_frames=1))
    assert result["one_frame_streams"]
    counts = result["counts"]
    assert counts["margin 0.05, eval.cluster frame"] == counts["margin 0.05"]
    clipped = _run(_models(clip_frames=4))
    assert not clipped["one_frame_streams"]


def test_rate_is_a_share_with_its_wilson_interval() -> None:
    r = bench.rate(0, 100)
    assert r["rate"] == 0.0 and r["low"] == 0.0 and r["high"] == pytest.approx(0.037, abs=1e-3)
    assert np.isnan(bench.rate(0, 0)["rate"])
