"""The promotion gate: a pure function from metrics and thresholds to a decision.

The flow calls :func:`decide` before it touches the registry, so the rule is testable on
plain numbers and every reason that led to the decision is logged and printed.

The gate fails closed: a comparison it cannot make is a failed check, never a skipped one.
The candidate must have a finite accuracy on every period the champion has plus the new
period; the champion must have one on the new period; the thresholds must be finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from cssl_core.config import GateConfig


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.detail}"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def reasons(self) -> list[str]:
        return [str(c) for c in self.checks]

    @property
    def failed(self) -> list[str]:
        return [str(c) for c in self.checks if not c.passed]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _names(periods: list[str]) -> str:
    return ", ".join(periods)


def _completeness(
    candidate: Mapping[str, float], champion: Mapping[str, float] | None, new_period: str
) -> Check:
    """Every period the decision needs is there: the candidate's row covers the champion's
    periods and the new one; the champion's covers the new one."""
    needed = [*(champion or {}), *([] if champion and new_period in champion else [new_period])]
    missing = [p for p in dict.fromkeys(needed) if p not in candidate]
    problems = []
    if missing:
        problems.append(f"candidate has no accuracy on {_names(missing)}")
    if champion is not None and new_period not in champion:
        problems.append(f"champion has no accuracy on the new period {new_period}")
    if problems:
        return Check("complete", False, "; ".join(problems))
    periods = list(dict.fromkeys([*candidate, *(champion or {})]))
    return Check("complete", True, f"accuracies on every period ({_names(periods)})")


def _finiteness(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    forgetting: float,
    cfg: GateConfig,
) -> Check:
    values = {f"candidate {p}": v for p, v in candidate.items()}
    values |= {f"champion {p}": v for p, v in (champion or {}).items()}
    values["forgetting"] = forgetting
    values |= {
        "gate.avg_accuracy_tolerance": cfg.avg_accuracy_tolerance,
        "gate.new_period_tolerance": cfg.new_period_tolerance,
        "gate.max_forgetting": cfg.max_forgetting,
    }
    bad = [f"{name}={value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        return Check("finite", False, "not finite: " + ", ".join(bad))
    return Check("finite", True, f"all {len(values)} metrics and thresholds finite")


def decide(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    new_period: str,
    forgetting: float,
    cfg: GateConfig,
) -> GateDecision:
    """Decide whether the candidate replaces the champion.

    ``candidate`` and ``champion`` map every eval period so far (the new one included) to the
    accuracy of that model on it; ``forgetting`` is the candidate's Chaudhry forgetting over
    the lineage. With no champion (the first period) only the sanity checks apply. The
    average accuracy is compared over the champion's periods, on which both were evaluated.
    """
    checks = [
        _completeness(candidate, champion, new_period),
        _finiteness(candidate, champion, forgetting, cfg),
    ]
    ok = forgetting <= cfg.max_forgetting
    checks.append(
        Check(
            "forgetting",
            ok,
            f"{forgetting:.3f} {'<=' if ok else '>'} max {cfg.max_forgetting:.3f}",
        )
    )
    if champion:
        shared = [p for p in champion if p in candidate]
        champ_avg = _mean([champion[p] for p in shared])
        cand_avg = _mean([candidate[p] for p in shared])
        checks.append(
            Check(
                "average accuracy",
                cand_avg >= champ_avg - cfg.avg_accuracy_tolerance,
                f"candidate {cand_avg:.3f} vs champion {champ_avg:.3f} "
                f"(tolerance {cfg.avg_accuracy_tolerance:.3f})",
            )
        )
        if new_period in champion and new_period in candidate:
            floor = champion[new_period] - cfg.new_period_tolerance
            checks.append(
                Check(
                    f"accuracy on {new_period}",
                    candidate[new_period] >= floor,
                    f"candidate {candidate[new_period]:.3f} vs champion {champion[new_period]:.3f}",
                )
            )
    else:
        average = _mean(list(candidate.values()))
        checks.append(Check("champion", True, f"no champion yet; average {average:.3f}"))
    return GateDecision(all(c.passed for c in checks), tuple(checks))
