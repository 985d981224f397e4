"""When a new period's frames start a refresh: the watch flow's decision, a pure function.

:func:`decide_watch` takes the drift check's verdict, the champion's age and the time since
the last refresh started, all measured by the caller at one moment, and the ``watch:``
settings, and says whether to refresh, what asked for it, and why, one line per reason. The
flow (:mod:`pipelines.watch`) and the stream-replay benchmark (``benchmarks/watch.py``, on a
simulated clock) take the same decision with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from cssl_core.config import WatchConfig, format_duration

Trigger = Literal["no_champion", "drift", "max_age", "force"]


@dataclass(frozen=True)
class WatchDecision:
    """Whether to start a refresh, what asked for one, and why, one line per reason.

    ``triggers`` lists what asked for a refresh even when the cooldown held it back;
    ``held_by_cooldown`` says it did.
    """

    refresh: bool
    triggers: tuple[Trigger, ...]
    reasons: tuple[str, ...]
    held_by_cooldown: bool = False

    @property
    def action(self) -> str:
        return "refresh" if self.refresh else "skip"

    @property
    def summary(self) -> str:
        """One line: the action and the trigger (or what kept it from starting)."""
        asked = ", ".join(t.replace("_", " ") for t in self.triggers)
        if self.refresh:
            return f"refresh ({asked})"
        if self.held_by_cooldown:
            return f"skip: cooldown ({asked} asked for a refresh, but one started recently)"
        return "skip: no drift, and @champion is within its maximum age"


def human(delta: timedelta) -> str:
    """A duration for people: ``45 s``, ``12 min``, ``5.0 h``, ``3.2 d``."""
    seconds = delta.total_seconds()
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def decide_watch(
    cfg: WatchConfig,
    *,
    drifted: bool | None,
    drift_summary: str = "",
    champion_version: int | None = None,
    champion_age: timedelta | None = None,
    since_last_refresh: timedelta | None = None,
    force: bool = False,
) -> WatchDecision:
    """Start a refresh when it is forced, or when there is no champion, drift is found, or the
    champion is older than ``cfg.max_age`` -- and, unless forced, no refresh started within
    ``cfg.cooldown``.

    ``drifted`` is the drift check's verdict (None: no check, there is no champion);
    ``champion_age`` is the time since ``@champion`` was registered (None: unknown or no
    champion); ``since_last_refresh`` is the time since the last refresh started (None: none
    ever did). The ages are measured by the caller at one moment, so this is a pure function.
    """
    triggers: list[Trigger] = []
    reasons: list[str] = []
    if force:
        triggers.append("force")
        reasons.append("forced by the user (the cooldown does not apply)")
    if champion_version is None:
        triggers.append("no_champion")
        reasons.append("no @champion yet: the first period has nothing to compare with")
    else:
        if drifted:
            triggers.append("drift")
        reasons.append(f"drift check: {drift_summary}" if drift_summary else "no drift check")
        max_age = format_duration(cfg.max_age)
        if champion_age is None:
            reasons.append(f"@champion (version {champion_version}): registration time unknown")
        elif champion_age > cfg.max_age:
            triggers.append("max_age")
            reasons.append(
                f"@champion (version {champion_version}) was registered {human(champion_age)} "
                f"ago: older than watch.max_age {max_age}"
            )
        else:
            reasons.append(
                f"@champion (version {champion_version}) was registered {human(champion_age)} "
                f"ago: within watch.max_age {max_age}"
            )
    cooldown = format_duration(cfg.cooldown)
    cooling = since_last_refresh is not None and since_last_refresh < cfg.cooldown
    if since_last_refresh is None:
        reasons.append("no refresh has started before")
    else:
        relation = "within" if cooling else "longer than"
        reasons.append(
            f"the last refresh started {human(since_last_refresh)} ago: {relation} "
            f"watch.cooldown {cooldown}"
        )
    held = bool(triggers) and cooling and not force
    return WatchDecision(bool(triggers) and not held, tuple(triggers), tuple(reasons), held)
