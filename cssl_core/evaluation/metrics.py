"""Continual-learning metrics on an accuracy matrix (pure math, no models).

Notation (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning", GEM,
Sec. 2): with periods ``1..T`` in stream order, ``R[i][j]`` is the accuracy on period ``j``'s
eval set after training through period ``i``. Entries above the diagonal (``j > i``, a period
not trained on yet) are allowed; only forward transfer reads them.

Definitions implemented here (they differ between libraries, so each one is named):

* average accuracy ``ACC`` -- GEM Sec. 2 (the same as Chaudhry et al. 2018's ``A_k``);
* forgetting -- the forgetting measure ``F_k`` of Chaudhry et al. 2018, "Riemannian Walk for
  Incremental Learning: Understanding Forgetting and Intransigence" (RWalk): the drop from
  the *best earlier* accuracy (as in Renate; Avalanche instead uses the accuracy right after
  learning the period, which is what ``bwt`` measures);
* backward transfer ``BWT`` and forward transfer ``FWT`` -- GEM Sec. 2;
* next-period accuracy ``R[t-1][t]`` -- the streaming protocol of CLEAR (Lin et al. 2021):
  what the model in production scores on a period before it is refreshed on it.

Missing entries are NaN. A metric never guesses: if an entry it reads is missing it raises
:class:`MissingAccuracy` naming the entries, so a partly evaluated run cannot pass a gate by
accident. Entries a metric does not read may be missing.

With a single trained period there is nothing to forget or transfer to: ``forgetting``,
``bwt`` and ``fwt`` return ``0.0`` there (not NaN), so logged metrics and gate comparisons
stay plain numbers from the first period on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PeriodKey = str | int


class MissingAccuracy(ValueError):
    """A metric needs an entry of the accuracy matrix that has not been filled in."""


class AccuracyMatrix:
    """``R[i][j]``: accuracy on period ``j``'s eval set after training through period ``i``.

    Rows and columns are the same period names, in stream order. Index with a period name or
    its position (``0`` is the first period). Values are fractions in ``[0, 1]``.
    """

    def __init__(
        self, periods: Sequence[str], values: np.ndarray | Sequence[Sequence[Any]] | None = None
    ) -> None:
        names = tuple(str(p) for p in periods)
        if not names:
            raise ValueError("an accuracy matrix needs at least one period")
        if len(set(names)) != len(names):
            raise ValueError(f"period names repeat: {list(names)}")
        self._periods = names
        self._index = {name: k for k, name in enumerate(names)}
        size = len(names)
        if values is None:
            self._r = np.full((size, size), np.nan, dtype=np.float64)
        else:
            rows = [list(row) for row in values]
            if len(rows) != size or any(len(row) != size for row in rows):
                raise ValueError(f"values must be {size}x{size} for {size} periods")
            arr = np.array(
                [[np.nan if v is None else float(v) for v in row] for row in rows],
                dtype=np.float64,
            ).reshape(size, size)
            _check_range(arr)
            self._r = arr

    # -- access ------------------------------------------------------------------------
    @property
    def periods(self) -> tuple[str, ...]:
        """Period names in stream order (row and column labels)."""
        return self._periods

    @property
    def values(self) -> np.ndarray:
        """A copy of the matrix as a ``(T, T)`` float array, NaN where missing."""
        return self._r.copy()

    def index(self, period: PeriodKey) -> int:
        """Position of a period, given its name or position."""
        if isinstance(period, bool):
            raise TypeError("period must be a name or an int position, not a bool")
        if isinstance(period, int):
            if not 0 <= period < len(self._periods):
                raise IndexError(f"period position {period} outside 0..{len(self._periods) - 1}")
            return period
        try:
            return self._index[period]
        except KeyError:
            known = ", ".join(self._periods)
            raise KeyError(f"unknown period {period!r}; the matrix has: {known}") from None

    def set(self, i: PeriodKey, j: PeriodKey, value: float) -> None:
        """Record the accuracy on period ``j``'s eval set after training through ``i``."""
        value = float(value)
        if not (0.0 <= value <= 1.0):
            raise ValueError(f"accuracy must be a fraction in [0, 1], got {value}")
        self._r[self.index(i), self.index(j)] = value

    def get(self, i: PeriodKey, j: PeriodKey) -> float:
        """``R[i][j]`` (NaN when missing)."""
        return float(self._r[self.index(i), self.index(j)])

    def row(self, i: PeriodKey) -> dict[str, float]:
        """Accuracies after training through ``i``, keyed by eval period (NaN when missing)."""
        r = self._r[self.index(i)]
        return {name: float(r[k]) for k, name in enumerate(self._periods)}

    def last_trained(self) -> int:
        """Position of the last row with any entry: the default ``T`` of every metric."""
        filled = np.flatnonzero(~np.isnan(self._r).all(axis=1))
        if filled.size == 0:
            raise MissingAccuracy("the accuracy matrix is empty; evaluate a trained period first")
        return int(filled[-1])

    def _row_pos(self, i: PeriodKey | None) -> int:
        return self.last_trained() if i is None else self.index(i)

    def _need(self, cells: list[tuple[int, int]], metric: str) -> None:
        missing = [(a, b) for a, b in cells if math.isnan(self._r[a, b])]
        if missing:
            shown = ", ".join(f"R[{self._periods[a]}][{self._periods[b]}]" for a, b in missing)
            raise MissingAccuracy(f"{metric} needs {shown}, which is missing")

    # -- metrics -----------------------------------------------------------------------
    def average_accuracy(self, i: PeriodKey | None = None) -> float:
        r"""Average accuracy over the periods seen so far.

        .. math:: \mathrm{ACC}_T = \frac{1}{T} \sum_{j=1}^{T} R_{T,j}

        Lopez-Paz & Ranzato 2017 (GEM) Sec. 2; ``A_k`` of Chaudhry et al. 2018 (RWalk). ``T`` is
        row ``i`` (default: the last row with any entry).
        """
        t = self._row_pos(i)
        cells = [(t, j) for j in range(t + 1)]
        self._need(cells, "average_accuracy")
        return float(np.mean([self._r[c] for c in cells]))

    def best_earlier(self, i: PeriodKey | None = None) -> dict[str, float]:
        r"""The best accuracy each earlier period ``j < T`` had before ``T``.

        .. math:: b_j^T = \max_{l \in \{j, \dots, T-1\}} R_{l,j}

        The reference of Chaudhry et al. 2018's forgetting (RWalk); empty for ``T = 1``.
        """
        t = self._row_pos(i)
        cells = [(l_, j) for j in range(t) for l_ in range(j, t)]
        self._need(cells, "best_earlier")
        return {self._periods[j]: float(self._r[j:t, j].max()) for j in range(t)}

    def per_period_forgetting(self, i: PeriodKey | None = None) -> dict[str, float]:
        r"""Forgetting of each earlier period ``j < T`` (``f_j^k`` of Chaudhry et al. 2018, RWalk).

        .. math:: f_j^T = \max_{l \in \{j, \dots, T-1\}} R_{l,j} - R_{T,j}

        The reference is the *best* accuracy period ``j`` ever had before ``T``
        (:meth:`best_earlier`), not the accuracy right after learning it. Positive means
        forgotten; negative means the model is now better on ``j`` than it ever was. Empty
        for ``T = 1``.
        """
        t = self._row_pos(i)
        cells = [(l_, j) for j in range(t) for l_ in range(j, t + 1)]
        self._need(cells, "forgetting")
        return {self._periods[j]: float(self._r[j:t, j].max() - self._r[t, j]) for j in range(t)}

    def forgetting(self, i: PeriodKey | None = None) -> float:
        r"""Average forgetting after training through ``T`` (``F_k`` of Chaudhry et al. 2018).

        .. math:: F_T = \frac{1}{T-1} \sum_{j=1}^{T-1} f_j^T

        ``0.0`` when ``T = 1`` (no earlier period, nothing forgotten).
        """
        per = self.per_period_forgetting(i)
        return float(np.mean(list(per.values()))) if per else 0.0

    def bwt(self, i: PeriodKey | None = None) -> float:
        r"""Backward transfer: how training on later periods changed earlier ones.

        .. math:: \mathrm{BWT}_T = \frac{1}{T-1} \sum_{j=1}^{T-1} \left(R_{T,j} - R_{j,j}\right)

        Lopez-Paz & Ranzato 2017 (GEM) Sec. 2. Negative means forgetting, measured from the
        accuracy right after learning each period (the diagonal). ``0.0`` when ``T = 1``.
        """
        t = self._row_pos(i)
        if t == 0:
            return 0.0
        self._need([(t, j) for j in range(t)] + [(j, j) for j in range(t)], "bwt")
        return float(np.mean([self._r[t, j] - self._r[j, j] for j in range(t)]))

    def fwt(
        self, baseline: Sequence[float] | Mapping[str, float], i: PeriodKey | None = None
    ) -> float:
        r"""Forward transfer: accuracy on a period *before* training on it, above a baseline.

        .. math:: \mathrm{FWT}_T = \frac{1}{T-1} \sum_{j=2}^{T} \left(R_{j-1,j} - \bar b_j\right)

        Lopez-Paz & Ranzato 2017 (GEM) Sec. 2, where ``b_j`` is the accuracy of a randomly
        initialised model on period ``j``'s eval set. ``baseline`` lists ``b`` for every
        period in order (or maps period name to ``b``); ``b_1`` is never read. Needs the
        entries just above the diagonal. ``0.0`` when ``T = 1``. A baseline it reads that is
        NaN or infinite raises :class:`MissingAccuracy` (a NaN would silently make FWT NaN).
        """
        t = self._row_pos(i)
        if isinstance(baseline, Mapping):
            try:
                b = [float(baseline[p]) for p in self._periods[1 : t + 1]]
            except KeyError as exc:
                raise MissingAccuracy(f"fwt: baseline has no accuracy for period {exc}") from None
            b = [math.nan, *b]
        else:
            if len(baseline) != len(self._periods):
                raise ValueError(
                    f"fwt: baseline has {len(baseline)} values, expected one per period "
                    f"({len(self._periods)})"
                )
            b = [float(x) for x in baseline]
        if t == 0:
            return 0.0
        for j in range(1, t + 1):
            if not math.isfinite(b[j]):
                raise MissingAccuracy(
                    f"fwt: baseline for period {self._periods[j]!r} is {b[j]}; evaluate a "
                    "randomly initialised model on that period first"
                )
        self._need([(j - 1, j) for j in range(1, t + 1)], "fwt")
        return float(np.mean([self._r[j - 1, j] - b[j] for j in range(1, t + 1)]))

    def next_period_accuracy(self, i: PeriodKey | None = None) -> dict[str, float]:
        r"""Accuracy on each period before training on it: what production serves until
        that period's refresh lands (the streaming protocol of CLEAR, Lin et al. 2021,
        "train on t, test on t+1").

        .. math:: N_j = R_{j-1,j}, \qquad j = 2, \dots, T

        keyed by period ``j``. Empty for ``T = 1`` (nothing served a period before the first).
        """
        t = self._row_pos(i)
        self._need([(j - 1, j) for j in range(1, t + 1)], "next_period_accuracy")
        return {self._periods[j]: float(self._r[j - 1, j]) for j in range(1, t + 1)}

    def average_next_period_accuracy(self, i: PeriodKey | None = None) -> float:
        r"""Average next-period accuracy over the periods so far.

        .. math:: \bar N_T = \frac{1}{T-1} \sum_{j=2}^{T} R_{j-1,j}

        :meth:`fwt` is this minus the average blind baseline ``\bar b``. With one period
        there is no next-period accuracy: :class:`MissingAccuracy`.
        """
        per = self.next_period_accuracy(i)
        if not per:
            raise MissingAccuracy("next-period accuracy needs at least two periods")
        return float(np.mean(list(per.values())))

    def summary(self, i: PeriodKey | None = None) -> dict[str, float]:
        """``average_accuracy``, ``forgetting`` and ``bwt`` at row ``i``, for logging."""
        return {
            "average_accuracy": self.average_accuracy(i),
            "forgetting": self.forgetting(i),
            "bwt": self.bwt(i),
        }

    # -- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: ``{"periods": [...], "R": [[float | None, ...], ...]}`` (NaN -> null)."""
        return {
            "periods": list(self._periods),
            "R": [[None if math.isnan(v) else float(v) for v in row] for row in self._r],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracyMatrix:
        """Inverse of :meth:`to_dict`."""
        try:
            periods, values = data["periods"], data["R"]
        except KeyError as exc:
            raise ValueError(f"accuracy matrix dict lacks key {exc}") from None
        return cls(periods, values)

    def to_markdown(self, digits: int = 3) -> str:
        """A Markdown table: one row per trained period, one column per eval period."""
        head = "| trained through \\ eval on | " + " | ".join(self._periods) + " |"
        rule = "|---|" + "---:|" * len(self._periods)
        lines = [head, rule]
        for name, row in zip(self._periods, self._r, strict=True):
            cells = ["" if math.isnan(v) else f"{v:.{digits}f}" for v in row]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return f"AccuracyMatrix(periods={list(self._periods)!r})"


def _check_range(arr: np.ndarray) -> None:
    finite = arr[~np.isnan(arr)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        raise ValueError("accuracies must be fractions in [0, 1]")
