"""What a continual-training strategy means: the one place that knows it.

``train.strategy`` names one of :data:`STRATEGIES`. Every driver (the Prefect flow, the DVC
stages, ``cssl bench continual``) and the trainer ask the :class:`StrategySpec` what to do
instead of comparing names:

| strategy         | replay | distill | from scratch | steps in period t (0-based) |
|------------------|--------|---------|--------------|-----------------------------|
| `finetune`       | no     | no      | no           | steps                       |
| `replay`         | yes    | no      | no           | steps                       |
| `distill`        | no     | yes     | no           | steps                       |
| `distill+replay` | yes    | yes     | no           | steps                       |
| `joint`          | no     | no      | yes          | steps x (t + 1)             |

``from scratch`` (``joint``) ignores the parent and the replay memory and retrains a fresh
model on the train splits of every period so far: the quality upper bound and the cost
baseline. The first period has no parent, so there is nothing to distill from or replay:
:meth:`StrategySpec.for_period` derives that effective behaviour (plain SimCLR from the
seed's initialisation) without touching the configuration.

This module imports nothing heavy: ``cssl_core.config`` validates ``train.strategy`` with it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class StrategySpec:
    """One strategy's behaviour.

    ``uses_replay``: mix replay-memory frames into every batch (``train.replay_ratio``).
    ``uses_distill``: distil toward the frozen parent (``train.distill_loss``).
    ``from_scratch``: start from a fresh model and train on every period so far.
    """

    name: str
    uses_replay: bool
    uses_distill: bool
    from_scratch: bool
    summary: str

    def steps_for(self, period_index: int, base_steps: int) -> int:
        """Training steps of the period at ``period_index`` (0-based): a from-scratch strategy
        retrains on all ``t + 1`` periods so far, so it gets ``t + 1`` times ``base_steps``."""
        if period_index < 0:
            raise ValueError(f"period_index must be >= 0, got {period_index}")
        return base_steps * (period_index + 1) if self.from_scratch else base_steps

    @property
    def trains_on_history(self) -> bool:
        """Whether the earlier periods' train splits are part of this period's frames."""
        return self.from_scratch

    def for_period(self, has_parent: bool) -> StrategySpec:
        """The behaviour for one period: without a parent (the first period) there is no
        teacher and no memory, so every strategy trains plain SimCLR from scratch."""
        if has_parent:
            return self
        return replace(self, uses_replay=False, uses_distill=False, from_scratch=True)


STRATEGIES: dict[str, StrategySpec] = {
    spec.name: spec
    for spec in (
        StrategySpec(
            "finetune", False, False, False, "fine-tune the parent on the new period alone"
        ),
        StrategySpec("replay", True, False, False, "fine-tune with replay-memory frames"),
        StrategySpec("distill", False, True, False, "fine-tune with distillation to the parent"),
        StrategySpec("distill+replay", True, True, False, "distillation and replay (the default)"),
        StrategySpec("joint", False, False, True, "retrain from scratch on every period so far"),
    )
}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)
"""Every strategy's name, in table order (``train.strategy`` accepts exactly these)."""


def strategy_spec(name: str) -> StrategySpec:
    """The spec of ``name``; a one-line error naming the valid choices otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; train.strategy is one of {', '.join(STRATEGY_NAMES)}"
        ) from None
