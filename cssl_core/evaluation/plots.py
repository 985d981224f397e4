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


def plot_accuracy_matrix(
    R: AccuracyMatrix, path: str | Path, title: str = "Accuracy matrix R[i][j]"
) -> Path:
    """Heatmap of ``R`` (rows: trained through, columns: eval set), each value annotated.

    Missing entries are left blank. The colour scale is fixed to ``[0, 1]`` so figures of
    different runs compare by eye. Returns the written path.
    """
    values = R.values
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
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color=colour, fontsize=9)
    return _save_atomic(fig, path)


def plot_accuracy_curves(
    R: AccuracyMatrix, path: str | Path, title: str = "Accuracy on each period's eval set"
) -> Path:
    """One line per eval period ``j``: ``R[i][j]`` as training proceeds through ``i``.

    The part of a line at ``i >= j`` (after the period was trained on) is solid; entries
    before it (``i < j``, what forward transfer reads) are dotted. A marker sits on the
    diagonal ``R[j][j]``. Returns the written path.
    """
    values = R.values
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
    ax.set_xticks(x, labels=R.periods, rotation=45, ha="right")
    ax.set_xlabel("trained through period")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="eval set", fontsize=8, loc="best")
    return _save_atomic(fig, path)
