"""PNG figures of an :class:`~cssl_core.evaluation.metrics.AccuracyMatrix`.

matplotlib is imported inside each function and drawn on an Agg canvas attached to a bare
``Figure`` (no pyplot, no global backend switch), so importing ``cssl_core`` stays cheap
and plotting works in headless workers. Files are written atomically: a temporary file in
the same directory, then ``os.replace``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cssl_core.data.storage import atomic_path
from cssl_core.evaluation.metrics import AccuracyMatrix

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_atomic(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _bounds(
    R: AccuracyMatrix, low: AccuracyMatrix | None, high: AccuracyMatrix | None
) -> tuple[np.ndarray, np.ndarray]:
    """The interval bounds as arrays shaped like ``R`` (NaN where not given)."""
    nan = np.full_like(R.values, np.nan)
    for bound in (low, high):
        if bound is not None and bound.periods != R.periods:
            raise ValueError("interval bounds must cover the same periods as the matrix")
    return (low.values if low else nan), (high.values if high else nan)


MAX_ANNOTATED_INTERVALS = 8
"""Up to this many periods, heatmap cells also show their interval's half-width."""


def plot_accuracy_matrix(
    R: AccuracyMatrix,
    path: str | Path,
    title: str = "Accuracy matrix R[i][j]",
    low: AccuracyMatrix | None = None,
    high: AccuracyMatrix | None = None,
) -> Path:
    """Heatmap of ``R`` (rows: trained through, columns: eval set), each value annotated.

    Missing entries are left blank. The colour scale is fixed to ``[0, 1]`` so figures of
    different runs compare by eye. With interval bounds ``low``/``high`` and at most
    :data:`MAX_ANNOTATED_INTERVALS` periods (where the text still fits), a cell also shows
    ``±`` its half-width. Returns the written path.
    """
    values = R.values
    lo, hi = _bounds(R, low, high)
    with_intervals = len(R.periods) <= MAX_ANNOTATED_INTERVALS
    size = len(R.periods)
    side = 1.6 + 0.75 * size
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_xticks(range(size), labels=R.periods, rotation=45, ha="right")
    ax.set_yticks(range(size), labels=R.periods)
    ax.set_xlabel("evaluated on period j")
    ax.set_ylabel("trained through period i")
    ax.set_title(title)
    for i in range(size):
        for j in range(size):
            v = values[i, j]
            if not math.isnan(v):
                colour = "black" if v > 0.6 else "white"
                text = f"{v:.2f}"
                if with_intervals and not (math.isnan(lo[i, j]) or math.isnan(hi[i, j])):
                    text += f"\n±{max(v - lo[i, j], hi[i, j] - v):.2f}"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
    return _save_atomic(fig, path)


def plot_accuracy_curves(
    R: AccuracyMatrix,
    path: str | Path,
    title: str = "Accuracy on each period's eval set",
    low: AccuracyMatrix | None = None,
    high: AccuracyMatrix | None = None,
) -> Path:
    """One line per eval period ``j``: ``R[i][j]`` as training proceeds through ``i``.

    The part of a line at ``i >= j`` (after the period was trained on) is solid; entries
    before it (``i < j``, what forward transfer reads) are dotted. A marker sits on the
    diagonal ``R[j][j]``. With interval bounds ``low``/``high``, every point that has both
    gets an error bar from its low to its high bound. Returns the written path.
    """
    values = R.values
    lo, hi = _bounds(R, low, high)
    size = len(R.periods)
    fig = _new_figure(max(5.0, 1.2 + 0.8 * size), 4.0)
    ax = fig.add_subplot()
    x = np.arange(size)
    for j, name in enumerate(R.periods):
        col = values[:, j]
        if np.isnan(col).all():
            continue
        line = ax.plot(x[j:], col[j:], marker="o", markersize=3, label=name)[0]
        if j > 0 and not np.isnan(col[: j + 1]).all():
            ax.plot(x[: j + 1], col[: j + 1], linestyle=":", color=line.get_color())
        if not math.isnan(col[j]):
            ax.plot([j], [col[j]], marker="D", color=line.get_color())
        bars = ~(np.isnan(col) | np.isnan(lo[:, j]) | np.isnan(hi[:, j]))
        if bars.any():
            offset = 0.04 * (j - (size - 1) / 2)  # keep the bars of different lines apart
            ax.errorbar(
                x[bars] + offset,
                col[bars],
                yerr=np.vstack([col[bars] - lo[bars, j], hi[bars, j] - col[bars]]),
                fmt="none",
                ecolor=line.get_color(),
                elinewidth=1,
                capsize=2,
                alpha=0.7,
            )
    ax.set_xticks(x, labels=R.periods, rotation=45, ha="right")
    ax.set_xlabel("trained through period")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="eval set", fontsize=8, loc="best")
    return _save_atomic(fig, path)
