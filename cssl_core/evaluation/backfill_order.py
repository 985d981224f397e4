"""Which index rows to re-embed first when a new model replaces an incompatible one, and the
retrieval quality of the half-backfilled index (pure math on features).

FastFill (Jaeckle et al. ICLR 2023, "FastFill: Efficient Compatible Model Update", Sec. 4)
backfills the gallery in order of decreasing *uncertainty*, so retrieval quality rises faster
than in random order, and measures it as the backfilling curve: quality against the share of
the gallery re-embedded. Its uncertainty is supervised (a head trained to predict the error of
the old-to-new feature transformation). Our models are self-supervised and the order must be
chosen before the new model has run, so the uncertainty here reads only the *old* embeddings:

* :func:`density_uncertainty`: one minus the mean cosine similarity of a row to its ``k``
  nearest neighbours in a reference sample of the old embeddings. Content the old model was
  trained on forms tight neighbourhoods; rows in sparse regions are what it embeds least
  confidently -- typically frames unlike anything before its training period, i.e. the drift
  the new version was trained for. They go first. Label-agnostic: no category is read.
* :func:`random_order`: the comparison FastFill reports against.

:func:`backfill_curve` computes the curve for any order, with the same search the index runs
during a backfill: a query embedded by the new model is scored against re-embedded rows
directly and against the remaining old rows through an adapter (or the old model's query),
and the two lists are merged by score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cssl_core.evaluation.compatibility import (
    FeatureArray,
    Labels,
    Metric,
    RetrievalQuality,
    _normalised,
    _quality_from_similarity,
    encode_joint_labels,
)

_BLOCK_ELEMENTS = 1 << 22  # similarities per block (16 MiB of float32)


def density_uncertainty(
    embeddings: FeatureArray,
    reference: FeatureArray,
    k: int = 10,
    exclude: np.ndarray | Sequence[int] | None = None,
) -> np.ndarray:
    r"""Label-agnostic uncertainty of each row of ``embeddings`` from its old-space neighbourhood.

    .. math:: u_i = 1 - \frac{1}{k} \sum_{r \in N_k(i)} \cos(x_i, r)

    where ``N_k(i)`` are the ``k`` reference rows most similar to ``x_i`` (all of them when
    the reference has fewer usable rows). ``exclude[i]`` is the position of row ``i`` itself
    in ``reference`` (``-1`` when it is not there), so a row never counts as its own
    neighbour. Values lie in ``[0, 2]``; larger means sparser, i.e. more uncertain.
    Memory is one block of similarities (at most 4M elements, 16 MiB) at a time.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = _normalised(embeddings, "embeddings")
    ref = _normalised(reference, "reference")
    if x.shape[1] != ref.shape[1]:
        raise ValueError(f"embeddings have D={x.shape[1]}, the reference D={ref.shape[1]}")
    n, m = x.shape[0], ref.shape[0]
    skip = np.full(n, -1, dtype=np.int64) if exclude is None else np.asarray(exclude, np.int64)
    if skip.shape != (n,) or skip.max(initial=-1) >= m:
        raise ValueError(f"exclude must hold one reference position (or -1) per row ({n})")
    usable = m - 1 if (skip >= 0).any() else m
    if usable < 1:
        raise ValueError("the reference sample needs at least one row besides the row itself")
    kk = min(k, usable)
    out = np.empty(n, dtype=np.float32)
    block = max(1, _BLOCK_ELEMENTS // m)
    for start in range(0, n, block):
        stop = min(start + block, n)
        sim = x[start:stop] @ ref.T
        own = torch.as_tensor(skip[start:stop])
        rows = torch.nonzero(own >= 0).flatten()
        sim[rows, own[rows]] = -torch.inf
        top = sim.topk(kk, dim=1).values
        out[start:stop] = (1.0 - top.mean(dim=1)).numpy()
    return out


def priority_order(uncertainty: np.ndarray | Sequence[float]) -> np.ndarray:
    """Row positions by decreasing uncertainty (equal values keep row order): the order in
    which a backfill re-embeds rows."""
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    if not np.isfinite(u).all():
        raise ValueError("uncertainty contains NaN or infinite values")
    return np.argsort(-u, kind="stable")


def random_order(n: int, seed: int = 0) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` (numpy's PCG64 seeded with ``seed``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return np.random.default_rng(seed).permutation(n)


@dataclass(frozen=True)
class BackfillCurve:
    """Retrieval quality of the index after re-embedding ``fractions`` of its rows."""

    fractions: tuple[float, ...]
    top1: tuple[float, ...]
    map_at_k: tuple[float, ...]
    k: int

    def values(self, metric: Metric = "map") -> tuple[float, ...]:
        if metric not in ("top1", "map"):
            raise ValueError(f"metric must be 'top1' or 'map', got {metric!r}")
        return self.top1 if metric == "top1" else self.map_at_k

    def area(self, metric: Metric = "map") -> float:
        r"""FastFill's area under the backfilling curve, normalised by the fraction range:
        :math:`\frac{1}{f_n - f_0} \int_{f_0}^{f_n} Q(f)\, df` (trapezoid rule)."""
        f = np.asarray(self.fractions)
        span = f[-1] - f[0]
        if span <= 0:
            raise ValueError("the curve needs at least two distinct fractions")
        return float(np.trapezoid(self.values(metric), f) / span)

    def fraction_to_reach(self, share: float = 0.95, metric: Metric = "map") -> float:
        """The smallest measured fraction whose quality is at least ``share`` of the fully
        backfilled quality (the value at fraction 1.0, which the curve must contain)."""
        if 1.0 not in self.fractions:
            raise ValueError("the curve has no point at fraction 1.0 (fully backfilled)")
        values = self.values(metric)
        full = values[self.fractions.index(1.0)]
        return min(f for f, v in zip(self.fractions, values, strict=True) if v >= share * full)


def backfill_curve(
    order: np.ndarray | Sequence[int],
    query_new: FeatureArray,
    query_old: FeatureArray,
    gallery_new: FeatureArray,
    gallery_old: FeatureArray,
    query_labels: Labels,
    gallery_labels: Labels,
    fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    k: int = 10,
) -> BackfillCurve:
    r"""Retrieval quality while the gallery is re-embedded in ``order``.

    At fraction ``f`` the first :math:`\lfloor f N \rceil` gallery rows of ``order`` carry
    their new embedding and are scored :math:`\cos(q_{new}, g_{new})`; the others keep the old
    one and are scored :math:`\cos(q_{old}, g_{old})`, where ``query_old`` is the query in the
    old space (the new query through an adapter, or the old model's embedding of the query).
    Each query ranks the merged list by score, exactly as the index searches during a
    backfill, and :func:`~cssl_core.evaluation.compatibility.retrieval_quality`'s top-1 and
    mAP@k are taken. ``gallery_new`` may have another dimension than ``gallery_old``.
    """
    qn, qo = _normalised(query_new, "query_new"), _normalised(query_old, "query_old")
    gn, go = _normalised(gallery_new, "gallery_new"), _normalised(gallery_old, "gallery_old")
    n = gn.shape[0]
    if go.shape[0] != n or qo.shape[0] != qn.shape[0]:
        raise ValueError("new and old features must cover the same queries and gallery rows")
    if qn.shape[1] != gn.shape[1] or qo.shape[1] != go.shape[1]:
        raise ValueError("query_new/gallery_new and query_old/gallery_old must share dimensions")
    perm = np.asarray(order, dtype=np.int64)
    if sorted(perm.tolist()) != list(range(n)):
        raise ValueError(f"order must be a permutation of the {n} gallery rows")
    q_codes, g_codes = encode_joint_labels(query_labels, gallery_labels)
    keep = np.flatnonzero(q_codes >= 0)
    if keep.size == 0:
        raise ValueError("no query has a category: retrieval quality needs labelled queries")
    idx = torch.as_tensor(keep)
    qn, qo, q_codes = qn[idx], qo[idx], q_codes[keep]
    points: list[RetrievalQuality] = []
    fracs = tuple(float(f) for f in fractions)
    if not fracs or any(not 0.0 <= f <= 1.0 for f in fracs) or list(fracs) != sorted(fracs):
        raise ValueError("fractions must be increasing values in [0, 1]")
    for f in fracs:
        is_new = torch.zeros(n, dtype=torch.bool)
        is_new[torch.as_tensor(perm[: round(f * n)])] = True

        def similarity(rows: slice, is_new: torch.Tensor = is_new) -> torch.Tensor:
            return torch.where(is_new, qn[rows] @ gn.T, qo[rows] @ go.T)

        points.append(_quality_from_similarity(similarity, len(keep), q_codes, g_codes, k))
    return BackfillCurve(fracs, tuple(p.top1 for p in points), tuple(p.map_at_k for p in points), k)
