"""The promotion gate: a pure function from metrics and thresholds to a decision.

The flow calls :func:`decide` before it touches the registry, so the rule is testable on
plain numbers and every reason that led to the decision is logged and printed.
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


def _mean(values: Mapping[str, float]) -> float:
    return sum(values.values()) / len(values) if values else float("nan")


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
    the lineage. With no champion (the first period) only the sanity checks apply.
    """
    values = [*candidate.values(), forgetting]
    checks = [
        Check(
            "finite",
            all(math.isfinite(v) for v in values) and new_period in candidate,
            "all metrics finite" if all(math.isfinite(v) for v in values) else "NaN/inf metric",
        )
    ]
    cand_avg = _mean(candidate)
    checks.append(
        Check(
            "forgetting",
            forgetting <= cfg.max_forgetting,
            f"{forgetting:.3f} <= max {cfg.max_forgetting:.3f}"
            if forgetting <= cfg.max_forgetting
            else f"{forgetting:.3f} > max {cfg.max_forgetting:.3f}",
        )
    )
    if champion:
        shared = {p: champion[p] for p in candidate if p in champion}
        champ_avg = _mean(shared)
        cand_shared_avg = _mean({p: candidate[p] for p in shared})
        floor = champ_avg - cfg.avg_accuracy_tolerance
        checks.append(
            Check(
                "average accuracy",
                cand_shared_avg >= floor,
                f"candidate {cand_shared_avg:.3f} vs champion {champ_avg:.3f} "
                f"(tolerance {cfg.avg_accuracy_tolerance:.3f})",
            )
        )
        if new_period in champion and new_period in candidate:
            new_floor = champion[new_period] - cfg.new_period_tolerance
            checks.append(
                Check(
                    f"accuracy on {new_period}",
                    candidate[new_period] >= new_floor,
                    f"candidate {candidate[new_period]:.3f} vs champion {champion[new_period]:.3f}",
                )
            )
    else:
        checks.append(Check("champion", True, f"no champion yet; average {cand_avg:.3f}"))
    return GateDecision(all(c.passed for c in checks), tuple(checks))
