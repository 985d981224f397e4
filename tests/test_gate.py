"""The paired promotion gate on per-frame outcomes: each rule, the corrections, failing closed,
and real outcomes from real (tiny) models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cssl_core.config import ConfigError, EvalConfig, GateConfig, load_params
from cssl_core.evaluation.compatibility import CompatVerdict
from cssl_core.evaluation.outcomes import FrameOutcomes
from pipelines.gate import decide

CFG = GateConfig(margin=0.05, max_forgetting=0.10, bootstrap_samples=500)
CLUSTERS, PER_CLUSTER = 40, 10


def outcomes(acc: float, seed: int, clusters: int = CLUSTERS, ids: str = "f") -> FrameOutcomes:
    """Frames in ``clusters`` streams of PER_CLUSTER frames, exactly ``acc`` of them right,
    in an order drawn with ``seed``."""
    n = clusters * PER_CLUSTER
    right = np.zeros(n, dtype=bool)
    right[np.random.default_rng(seed).permutation(n)[: round(acc * n)]] = True
    return FrameOutcomes(
        tuple(f"{ids}{k:04d}" for k in range(n)),
        tuple(f"s{k // PER_CLUSTER:02d}" for k in range(n)),
        tuple("pong" for _ in range(n)),
        right,
        right,
    )


def flipped(base: FrameOutcomes, wrong: int, seed: int) -> FrameOutcomes:
    """``base`` with ``wrong`` of its right frames made wrong (a model worse by wrong/n)."""
    knn = base.knn.copy()
    hits = np.flatnonzero(knn)
    knn[np.random.default_rng(seed).choice(hits, size=wrong, replace=False)] = False
    return FrameOutcomes(base.frame_ids, base.clusters, base.labels, knn, knn)


CHAMPION = {"p01": outcomes(0.80, 1), "p02": outcomes(0.70, 2)}
BEST = {"p01": 0.80}


def test_first_period_promotes_and_shows_the_accuracy_with_its_interval():
    d = decide({"p01": outcomes(0.75, 3)}, None, "p01", {}, CFG)
    assert d.promote and d.failed == []
    assert d.reasons[-2].startswith("PASS champion: none yet; knn on p01 0.750 ±0.0")
    assert d.reasons[-1] == "PASS forgetting: no earlier period to forget"


def test_the_champion_itself_is_not_rejected():
    d = decide(CHAMPION, CHAMPION, "p02", BEST, CFG)
    assert d.promote, d.reasons
    assert "PASS p01 non-inferior: Δ +0.000 [+0.000, +0.000] > -0.050 (95%, 40 clusters)" in (
        d.reasons
    )
    assert d.differences["p02"].estimate == 0.0 and d.forgetting is not None
    assert d.forgetting.estimate == 0.0 and d.forgetting.high < CFG.max_forgetting


def test_a_candidate_worse_by_more_than_the_margin_is_rejected_with_its_interval():
    worse = {"p01": flipped(CHAMPION["p01"], 60, 4), "p02": CHAMPION["p02"]}  # -0.15 on p01
    d = decide(worse, CHAMPION, "p02", BEST, CFG)
    assert not d.promote
    (p01,) = [r for r in d.failed if "p01" in r]
    assert p01.startswith("FAIL p01 non-inferior: Δ -0.150 [")
    assert p01.endswith("] <= -0.050 (95%, 40 clusters)")
    assert d.differences["p01"].high < 0


def test_new_period_better_or_non_inferior():
    equal_new = {"p01": CHAMPION["p01"], "p02": CHAMPION["p02"]}
    strict = CFG.model_copy(update={"new_period": "better"})
    d = decide(equal_new, CHAMPION, "p02", BEST, strict)
    assert not d.promote
    assert d.failed == ["FAIL p02 better: Δ +0.000 [+0.000, +0.000] <= +0.000 (95%, 40 clusters)"]
    improved = dict(CHAMPION)
    improved["p02"] = flipped(CHAMPION["p02"], 0, 0)  # same outcomes, then make it better:
    knn = CHAMPION["p02"].knn.copy()
    knn[np.flatnonzero(~knn)[:60]] = True  # +0.15 on p02
    improved["p02"] = FrameOutcomes(
        CHAMPION["p02"].frame_ids, CHAMPION["p02"].clusters, CHAMPION["p02"].labels, knn, knn
    )
    assert decide(improved, CHAMPION, "p02", BEST, strict).promote


def test_too_much_forgetting_fails_on_its_upper_bound():
    d = decide(CHAMPION, CHAMPION, "p02", {"p01": 0.95}, CFG)  # forgot 0.15 since its best
    assert not d.promote
    (reason,) = d.failed
    assert reason.startswith("FAIL forgetting: +0.150 [+0.")
    assert "upper bound > max 0.100" in reason
    # Point forgetting 0.08 is under the limit, but not its upper bound on 400 frames.
    d = decide(CHAMPION, CHAMPION, "p02", {"p01": 0.88}, CFG)
    assert d.forgetting is not None and d.forgetting.estimate == pytest.approx(0.08)
    assert not d.promote and d.failed[0].startswith("FAIL forgetting: +0.080")


# -- failing closed ---------------------------------------------------------------------------


def test_a_candidate_missing_an_old_period_fails():
    d = decide({"p02": CHAMPION["p02"]}, CHAMPION, "p02", BEST, CFG)
    assert not d.promote
    assert "FAIL complete: candidate has no accuracy on p01" in d.failed


def test_a_missing_new_period_or_best_earlier_accuracy_is_named():
    d = decide({"p01": CHAMPION["p01"]}, None, "p02", BEST, CFG)
    assert d.failed == ["FAIL complete: candidate has no accuracy on p02"]
    d = decide(CHAMPION, {"p01": CHAMPION["p01"]}, "p02", BEST, CFG)
    assert d.failed == ["FAIL complete: champion has no accuracy on the new period p02"]
    d = decide({"p02": CHAMPION["p02"]}, None, "p02", BEST, CFG)
    assert d.failed == ["FAIL complete: candidate has no accuracy on p01"]
    # A period without a lineage row has no best earlier accuracy: forgetting leaves it out.
    d = decide(CHAMPION, CHAMPION, "p02", {}, CFG)
    assert d.promote and d.reasons[-1] == "PASS forgetting: no earlier period to forget"


def test_nan_never_promotes_and_the_finite_check_says_what():
    d = decide(CHAMPION, CHAMPION, "p02", {"p01": math.nan}, CFG)
    assert not d.promote
    assert d.failed == ["FAIL finite: not finite: best earlier p01=nan"]


def test_an_infinite_threshold_that_slipped_through_fails_closed():
    loose = GateConfig.model_construct(**{**CFG.model_dump(), "margin": math.inf})
    worse = {"p01": flipped(CHAMPION["p01"], 200, 5), "p02": CHAMPION["p02"]}
    d = decide(worse, CHAMPION, "p02", BEST, loose)
    assert not d.promote
    assert "gate.margin=inf" in " ".join(d.failed)


def test_non_finite_or_replaced_thresholds_are_a_configuration_error():
    for key in ("margin", "max_forgetting", "confidence"):
        for value in ("inf", "nan"):
            with pytest.raises(ConfigError, match=f"gate.{key}"):
                load_params(None, [f"gate.{key}={value}"])
    for key in ("avg_accuracy_tolerance", "new_period_tolerance"):
        with pytest.raises(ConfigError, match=f"gate.{key} was replaced by .*gate.margin"):
            load_params(None, [f"gate.{key}=0.01"])


def test_results_on_different_frames_cannot_be_paired():
    other = {"p01": outcomes(0.8, 1, ids="g"), "p02": CHAMPION["p02"]}
    d = decide(other, CHAMPION, "p02", BEST, CFG)
    assert not d.promote
    assert d.failed[0].startswith("FAIL p01 paired: the two models were scored on different")


def test_one_cluster_gives_no_interval_and_no_promotion():
    lone_champ = {"p01": outcomes(0.8, 1, clusters=1)}
    lone_cand = {"p01": flipped(lone_champ["p01"], 1, 6)}
    d = decide(lone_cand, lone_champ, "p01", {}, CFG)
    assert not d.promote
    assert d.failed[0].startswith("FAIL p01 non-inferior: Δ -0.100, no interval from 1 cluster")


# -- multiplicity ---------------------------------------------------------------------------


def test_corrections_widen_each_periods_interval():
    champion = {p: outcomes(0.7, k) for k, p in enumerate(["p01", "p02", "p03"])}
    candidate = {
        "p01": flipped(champion["p01"], 4, 7),  # -0.01: far from the margin, smallest p
        "p02": flipped(champion["p02"], 12, 8),  # -0.03
        "p03": flipped(champion["p03"], 8, 9),  # -0.02
    }
    best = {"p01": 0.7, "p02": 0.7}
    levels = {}
    for correction in ("none", "bonferroni", "holm"):
        cfg = CFG.model_copy(update={"correction": correction, "max_forgetting": 1.0})
        d = decide(candidate, champion, "p03", best, cfg)
        levels[correction] = {p: iv.confidence for p, iv in d.differences.items()}
    assert levels["none"] == {"p01": 0.95, "p02": 0.95, "p03": 0.95}
    assert levels["bonferroni"] == pytest.approx({p: 1 - 0.05 / 3 for p in candidate})
    # Holm: the smallest one-sided p-value is tested strictest, the largest at 95%.
    assert levels["holm"] == pytest.approx({"p01": 1 - 0.05 / 3, "p03": 0.975, "p02": 0.95})


# -- real outcomes from real models -------------------------------------------------------------


def test_real_models_the_champion_passes_and_a_known_worse_model_is_rejected(tmp_path: Path):
    """Per-frame outcomes from evaluate_periods on real shards: a model that sees colour (the
    category) is the champion; the candidate that sees only brightness is known to be worse."""
    import torch
    from test_evaluate import ChannelMean, write_colour_shard

    from cssl_core.data.shard import Shard
    from cssl_core.evaluation.evaluate import eval_set_from_shard, evaluate_periods

    class Brightness(torch.nn.Module):
        def features(self, x: torch.Tensor) -> torch.Tensor:
            grey = x.mean(dim=(1, 2, 3))
            return torch.stack([grey, torch.ones_like(grey)], dim=1)

    colours = {"p01": ["red", "green", "blue"], "p02": ["blue", "gold", "green"]}
    sets = {
        p: eval_set_from_shard(Shard.open(write_colour_shard(tmp_path, p, c, seed=20 + k)), 100)
        for k, (p, c) in enumerate(colours.items())
    }
    # Each colour is its own stream here (3 clusters per period), so use frames as clusters.
    ecfg = EvalConfig(knn_k=5, probe_epochs=20, cluster="frame")

    def frames(model: torch.nn.Module) -> dict[str, FrameOutcomes]:
        scores = evaluate_periods(model, sets, ecfg, input_size=32)
        return {p: s.frames for p, s in scores.items() if s.frames is not None}

    champion, worse = frames(ChannelMean()), frames(Brightness())
    assert champion["p01"].accuracy("knn") == 1.0
    best = {"p01": champion["p01"].accuracy("knn")}
    kept = decide(champion, champion, "p02", best, CFG)
    assert kept.promote, kept.reasons
    rejected = decide(worse, champion, "p02", best, CFG)
    assert not rejected.promote
    assert any(r.startswith("FAIL p01 non-inferior: Δ -") for r in rejected.failed)


def test_after_a_rejected_period_forgetting_counts_the_lineages_periods_only():
    """p02's candidate was rejected, so the lineage has no p02 row: refreshing p03, the flow's
    best earlier accuracies (registry.lineage_rows) leave p02 out and the gate can pass."""
    from cssl_core.evaluation.metrics import AccuracyMatrix
    from pipelines.registry import lineage_rows, with_row

    logged = AccuracyMatrix(["p01", "p02", "p03"], [[0.8, 0.5, None], [None] * 3, [None] * 3])
    candidate = {**CHAMPION, "p03": outcomes(0.6, 3)}
    row = {p: o.accuracy("knn") for p, o in candidate.items()}
    best = lineage_rows(with_row(logged, "p03", row)).best_earlier("p03")
    assert best == {"p01": 0.8}
    d = decide(candidate, {**CHAMPION, "p03": candidate["p03"]}, "p03", best, CFG)
    assert d.promote, d.reasons


# -- compatibility (issue 14) ----------------------------------------------------------------


def _verdict(direct: float, own: float, adapter: float | None = None) -> CompatVerdict:
    return CompatVerdict("candidate", "champion", direct, own, adapter)


def _better_on_new(gain: int) -> dict[str, FrameOutcomes]:
    """CHAMPION with ``gain`` of p02's wrong frames made right (+gain/400 on p02)."""
    knn = CHAMPION["p02"].knn.copy()
    knn[np.flatnonzero(~knn)[:gain]] = True
    p02 = FrameOutcomes(
        CHAMPION["p02"].frame_ids, CHAMPION["p02"].clusters, CHAMPION["p02"].labels, knn, knn
    )
    return {"p01": CHAMPION["p01"], "p02": p02}


def test_required_compatibility_rejects_an_incompatible_candidate_with_the_reason():
    required = CFG.model_copy(update={"compatibility": "required"})
    d = decide(CHAMPION, CHAMPION, "p02", BEST, required, _verdict(0.20, 0.30))
    assert not d.promote
    assert d.failed == [
        "FAIL compatibility: incompatible: top-1 M[candidate][champion] 0.200 < "
        "M[champion][champion] 0.300; gate.compatibility is required (set allow_break to "
        "backfill instead)"
    ]
    # Compatible directly, or only through its adapter: promoted, and the reason says how.
    direct = decide(CHAMPION, CHAMPION, "p02", BEST, required, _verdict(0.30, 0.30))
    assert direct.promote and "PASS compatibility: compatible directly: " in direct.reasons[2]
    via = decide(CHAMPION, CHAMPION, "p02", BEST, required, _verdict(0.20, 0.30, 0.31))
    assert via.promote
    assert via.reasons[2] == (
        "PASS compatibility: compatible through its adapter: top-1 M[candidate][champion] "
        "0.200 < M[champion][champion] 0.300; through the adapter 0.310"
    )
    # Not measured: fails closed.
    d = decide(CHAMPION, CHAMPION, "p02", BEST, required)
    assert not d.promote and d.failed == [
        "FAIL compatibility: not measured: no compatibility matrix to decide on"
    ]
    # The first period has no champion, hence no index to be compatible with.
    first = decide({"p01": outcomes(0.75, 3)}, None, "p01", {}, required)
    assert first.promote and "PASS compatibility: no champion" in first.reasons[2]


def test_allow_break_promotes_an_incompatible_candidate_only_with_a_large_gain():
    breaking = CFG.model_copy(update={"break_min_gain": 0.05})
    incompatible = _verdict(0.10, 0.30)
    big = decide(_better_on_new(60), CHAMPION, "p02", BEST, breaking, incompatible)  # +0.15
    assert big.promote, big.reasons
    check = big.reasons[2]
    assert check.startswith("PASS compatibility: incompatible: top-1 M[candidate][champion] 0.100")
    assert ">= gate.break_min_gain +0.050; breaking allowed: backfill the index" in check
    small = decide(_better_on_new(4), CHAMPION, "p02", BEST, breaking, incompatible)  # +0.01
    assert not small.promote
    (reason,) = small.failed
    assert reason.startswith("FAIL compatibility: incompatible") and "< gate.break_min_gain" in (
        reason
    )
    # The default (allow_break, no minimum gain) keeps the other checks' decision.
    assert decide(CHAMPION, CHAMPION, "p02", BEST, CFG, incompatible).promote
    assert decide(CHAMPION, CHAMPION, "p02", BEST, CFG).promote
