"""Progress of a running refresh, for whoever shows it (the ``cssl`` console).

The flow's train task reports every training step here; the CLI listens and draws a progress
line. The detail stays in Prefect's and MLflow's logs; with no listener (a deployment on a
worker) reporting costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainStep:
    """One finished training step of a period (``step`` counts from 1 to ``steps``)."""

    period: str
    step: int
    steps: int
    loss: float
    images_per_second: float


Listener = Callable[[TrainStep], None]
_listeners: list[Listener] = []


def report(event: TrainStep) -> None:
    for listener in list(_listeners):
        listener(event)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send every :class:`TrainStep` to ``listener`` while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
