"""The promotion gate: a pure function from paired per-frame results to a decision.

Candidate and champion are scored on the *same* eval frames of every period so far, so the
gate tests the paired difference of their accuracies, period by period, with a cluster
bootstrap (:mod:`cssl_core.evaluation.intervals`: clusters -- streams by default -- are
resampled once and both models are scored on the draw). The candidate is promoted only when:

* on every earlier period it is **non-inferior**: the lower bound of ``Δ = acc(candidate) -
  acc(champion)`` is above ``-gate.margin``;
* on the new period it is **better** (lower bound above 0, ``gate.new_period: better``) or
  non-inferior (``non_inferior``);
* the upper bound of its **forgetting** (Chaudhry et al. 2018, against the lineage's best
  earlier accuracies, taken as logged) is at most ``gate.max_forgetting``;
* every input is there and finite, and every interval is defined (at least two clusters);
* it is **compatible** with the champion's index (``gate.compatibility: required``):
  ``M[candidate][champion] >= M[champion][champion]`` on retrieval top-1, with its own
  embedding or through its query-side adapter
  (:class:`~cssl_core.evaluation.compatibility.CompatVerdict`); with ``allow_break`` an
  incompatible candidate passes this check only when the lower bound of its gain on the new
  period is at least ``gate.break_min_gain`` (any gain when that is unset): the index must
  then be backfilled.

Each bound is that of a two-sided ``gate.confidence`` interval, a one-sided test at level
``α = (1 - confidence) / 2``. All tests must pass (an intersection-union test, Berger 1982),
so without correction the chance of promoting a candidate that is worse by the margin on some
period is still at most ``α``; ``gate.correction`` can make each period's test stricter
(Bonferroni: ``α / m`` for ``m`` periods tested; Holm: the period with the ``k``-th smallest
bootstrap p-value at ``α / (m - k + 1)``), which lowers that chance further and rejects more
equivalent candidates. The flow calls :func:`decide` before it touches the registry, and
every reason is printed and logged with its difference and interval, e.g.
``PASS p02 non-inferior: Δ +0.012 [-0.008, +0.031] > -0.030 (95%, 8 clusters)``.

The gate fails closed: a comparison it cannot make is a failed check, never a skipped one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from cssl_core.config import GateConfig
from cssl_core.evaluation.compatibility import CompatVerdict
from cssl_core.evaluation.intervals import Bootstrap, Interval, forgetting_interval
from cssl_core.evaluation.outcomes import FrameOutcomes, FramesDiffer


@dataclass(frozen=True)
class Check:
    """One rule of the gate: its name, whether it passed, and what it saw. ``interval`` is
    the tested difference (or forgetting) with its interval, where there is one."""

    name: str
    passed: bool
    detail: str
    interval: Interval | None = None

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.detail}"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    checks: tuple[Check, ...] = field(default_factory=tuple)
    differences: Mapping[str, Interval] = field(default_factory=dict)
    """Per period, candidate minus champion with the interval the gate tested."""
    forgetting: Interval | None = None
    """The candidate's forgetting with the interval the gate tested."""

    @property
    def reasons(self) -> list[str]:
        return [str(c) for c in self.checks]

    @property
    def failed(self) -> list[str]:
        return [str(c) for c in self.checks if not c.passed]


def _names(periods: list[str]) -> str:
    return ", ".join(periods)


def _pct(confidence: float) -> str:
    return f"{100 * confidence:.4g}%"


def _completeness(
    candidate: Mapping[str, FrameOutcomes],
    champion: Mapping[str, FrameOutcomes] | None,
    new_period: str,
    best_earlier: Mapping[str, float],
) -> Check:
    """Every period the decision needs is there: the candidate's results cover the
    champion's periods, the new one and every period its forgetting is measured on; the
    champion's cover the new one."""
    needed = [*(champion or {}), new_period, *best_earlier]
    missing = [p for p in dict.fromkeys(needed) if p not in candidate]
    problems = []
    if missing:
        problems.append(f"candidate has no accuracy on {_names(missing)}")
    if champion is not None and new_period not in champion:
        problems.append(f"champion has no accuracy on the new period {new_period}")
    if new_period in best_earlier:
        problems.append(f"the new period {new_period} has no earlier accuracy to forget")
    if problems:
        return Check("complete", False, "; ".join(problems))
    periods = list(dict.fromkeys([*candidate, *(champion or {})]))
    return Check("complete", True, f"accuracies on every period ({_names(periods)})")


def _finiteness(
    candidate: Mapping[str, FrameOutcomes],
    champion: Mapping[str, FrameOutcomes] | None,
    best_earlier: Mapping[str, float],
    cfg: GateConfig,
) -> Check:
    values = {f"candidate {p}": o.accuracy(cfg.metric) for p, o in candidate.items()}
    values |= {f"champion {p}": o.accuracy(cfg.metric) for p, o in (champion or {}).items()}
    values |= {f"best earlier {p}": float(v) for p, v in best_earlier.items()}
    values |= {
        "gate.margin": cfg.margin,
        "gate.max_forgetting": cfg.max_forgetting,
        "gate.confidence": cfg.confidence,
    }
    bad = [f"{name}={value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        return Check("finite", False, "not finite: " + ", ".join(bad))
    return Check("finite", True, f"all {len(values)} metrics and thresholds finite")


def interval_levels(
    boots: Mapping[str, Bootstrap], thresholds: Mapping[str, float], cfg: GateConfig
) -> dict[str, float]:
    """The two-sided confidence of each period's interval after the multiplicity correction
    (one-sided level ``α = (1 - confidence) / 2`` shared out over the ``m`` periods);
    ``thresholds`` are the bounds each period's lower bound must clear (Holm orders the
    periods by the bootstrap p-value of clearing them)."""
    m = len(boots)
    tail = 1.0 - cfg.confidence
    if cfg.correction == "none" or m <= 1:
        return {p: cfg.confidence for p in boots}
    if cfg.correction == "bonferroni":
        return {p: 1.0 - tail / m for p in boots}
    # Holm: the k-th smallest one-sided p-value (k = 0, 1, ...) is tested at α / (m - k).
    p_values = {p: b.share_at_or_below(thresholds[p]) for p, b in boots.items()}
    order = sorted(boots, key=lambda p: (p_values[p], p))
    return {p: 1.0 - tail / (m - k) for k, p in enumerate(order)}


def _paired_checks(
    candidate: Mapping[str, FrameOutcomes],
    champion: Mapping[str, FrameOutcomes],
    new_period: str,
    cfg: GateConfig,
) -> tuple[list[Check], dict[str, Interval]]:
    periods = [p for p in champion if p in candidate]
    boots: dict[str, Bootstrap] = {}
    checks: list[Check] = []
    for p in periods:
        try:
            boots[p] = candidate[p].paired_bootstrap(
                champion[p],
                cfg.metric,
                n_resamples=cfg.bootstrap_samples,
                seed=cfg.bootstrap_seed,
            )
        except FramesDiffer as exc:
            checks.append(Check(f"{p} paired", False, str(exc)))
    better = cfg.new_period == "better"
    thresholds = {p: 0.0 if (p == new_period and better) else -cfg.margin for p in boots}
    levels = interval_levels(boots, thresholds, cfg)
    differences: dict[str, Interval] = {}
    for p, boot in boots.items():
        iv = boot.interval(levels[p])
        differences[p] = iv
        kind = "better" if p == new_period and better else "non-inferior"
        where = f"({_pct(iv.confidence)}, {iv.n_clusters} clusters)"
        if not iv.defined:
            detail = (
                f"Δ {iv.estimate:+.3f}, no interval from {iv.n_clusters} cluster; the eval "
                "split needs frames from at least 2 streams (or eval.cluster: frame if its "
                "frames are independent)"
            )
            checks.append(Check(f"{p} {kind}", False, detail, iv))
            continue
        ok = iv.low > thresholds[p]
        detail = f"Δ {iv.signed()} {'>' if ok else '<='} {thresholds[p]:+.3f} {where}"
        checks.append(Check(f"{p} {kind}", ok, detail, iv))
    return checks, differences


def _forgetting_check(
    candidate: Mapping[str, FrameOutcomes],
    new_period: str,
    best_earlier: Mapping[str, float],
    cfg: GateConfig,
) -> Check:
    earlier = list(best_earlier)
    iv = forgetting_interval(
        [(candidate[p].correct(cfg.metric), candidate[p].clusters) for p in earlier],
        [best_earlier[p] for p in earlier],
        confidence=cfg.confidence,
        n_resamples=cfg.bootstrap_samples,
        seed=cfg.bootstrap_seed,
    )
    if not earlier:
        return Check("forgetting", True, "no earlier period to forget", iv)
    if not iv.defined:
        return Check("forgetting", False, f"{iv.estimate:+.3f}, no interval", iv)
    ok = iv.high <= cfg.max_forgetting
    detail = (
        f"{iv.signed()}, upper bound {'<=' if ok else '>'} max {cfg.max_forgetting:.3f} "
        f"({_pct(iv.confidence)}, best earlier accuracies as logged)"
    )
    return Check("forgetting", ok, detail, iv)


def compatibility_check(
    verdict: CompatVerdict | None,
    has_champion: bool,
    new_gain: Interval | None,
    cfg: GateConfig,
) -> Check:
    """The compatibility rule (see the module docstring). ``verdict`` compares the candidate
    with the champion (None: not measured, which fails closed unless ``allow_break`` takes
    any gain); ``new_gain`` is the paired difference on the new period the gate tested."""
    if not has_champion:
        return Check("compatibility", True, "no champion: no index to be compatible with")
    any_gain = cfg.compatibility == "allow_break" and cfg.break_min_gain is None
    if verdict is None:
        if any_gain:
            return Check(
                "compatibility", True, "not measured; breaking allowed (gate.break_min_gain unset)"
            )
        return Check("compatibility", False, "not measured: no compatibility matrix to decide on")
    kind = verdict.kind
    if kind != "none":
        how = "directly" if kind == "direct" else "through its adapter"
        return Check("compatibility", True, f"compatible {how}: {verdict.describe()}")
    detail = f"incompatible: {verdict.describe()}"
    if cfg.compatibility == "required":
        return Check(
            "compatibility",
            False,
            f"{detail}; gate.compatibility is required (set allow_break to backfill instead)",
        )
    if any_gain:
        return Check("compatibility", True, f"{detail}; breaking allowed: backfill the index")
    floor = float(cfg.break_min_gain or 0.0)
    if new_gain is None or not new_gain.defined:
        return Check("compatibility", False, f"{detail}; no gain interval to justify a break")
    ok = new_gain.low >= floor
    return Check(
        "compatibility",
        ok,
        f"{detail}; gain on the new period {new_gain.signed()} "
        f"{'>=' if ok else '<'} gate.break_min_gain {floor:+.3f}"
        + ("; breaking allowed: backfill the index" if ok else ""),
        new_gain,
    )


def decide(
    candidate: Mapping[str, FrameOutcomes],
    champion: Mapping[str, FrameOutcomes] | None,
    new_period: str,
    best_earlier: Mapping[str, float],
    cfg: GateConfig,
    compatibility: CompatVerdict | None = None,
) -> GateDecision:
    """Decide whether the candidate replaces the champion (see the module docstring).

    ``candidate`` and ``champion`` map every eval period so far (the new one included) to
    that model's per-frame outcomes on it; the two must cover the same frames per period.
    ``best_earlier`` maps each earlier period that forgetting is measured on (the lineage's:
    a period no version of which passed the gate has no best accuracy and is left out) to the
    lineage's best accuracy on it before this period (``AccuracyMatrix.best_earlier`` over
    ``registry.lineage_rows``, from logged metrics); a NaN there fails closed. With no
    champion (the first period) only completeness, finiteness and forgetting apply.
    ``compatibility`` is the candidate's verdict against the champion (from the refresh's
    compatibility matrix; see :func:`compatibility_check`).
    Deterministic: the bootstrap is seeded with ``cfg.bootstrap_seed``.
    """
    checks = [
        _completeness(candidate, champion, new_period, best_earlier),
        _finiteness(candidate, champion, best_earlier, cfg),
    ]
    if not all(c.passed for c in checks):
        return GateDecision(False, tuple(checks))
    differences: dict[str, Interval] = {}
    if champion:
        paired, differences = _paired_checks(candidate, champion, new_period, cfg)
        checks += paired
    else:
        new = candidate[new_period].interval(
            cfg.metric,
            confidence=cfg.confidence,
            n_resamples=cfg.bootstrap_samples,
            seed=cfg.bootstrap_seed,
        )
        checks.append(Check("champion", True, f"none yet; {cfg.metric} on {new_period} {new}"))
    forgetting = _forgetting_check(candidate, new_period, best_earlier, cfg)
    checks.append(forgetting)
    # listed after completeness and finiteness; decided here, where the new period's gain is known
    checks.insert(
        2, compatibility_check(compatibility, bool(champion), differences.get(new_period), cfg)
    )
    return GateDecision(
        all(c.passed for c in checks), tuple(checks), differences, forgetting.interval
    )
