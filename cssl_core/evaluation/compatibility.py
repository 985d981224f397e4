r"""Compatibility of embedding models: retrieval quality of every (query model, gallery model)
pair, and the CL2R criteria read from it (pure math on features; no models, no I/O).

Downstream teams search an *index*: gallery frames embedded once by some model version. When a
new version embeds the queries, the question is whether its embeddings can be compared with
the old gallery (backward compatibility, Shen et al. CVPR 2020, "Towards Backward-Compatible
Representation Learning", BCT) or whether the gallery must be re-embedded (backfilled).

Retrieval protocol (BCT Sec. 3.1; CL2R, Biondi et al. 2023, "CL2R: Compatible Lifelong
Learning Representations", ACM TOMM, Sec. 5): queries and gallery are disjoint frame sets (here:
eval frames and train frames); each query ranks the whole gallery by cosine similarity of the
L2-normalised features, ties broken by gallery position (the earlier item ranks first). A
gallery item is *relevant* to a query when both have the same category. Queries without a
category are skipped; gallery items without a category are never relevant.

The compatibility matrix over named models (e.g. ``champion``, ``candidate``, ``index``) is

.. math:: M[q][g] = \mathrm{quality}(\phi_q(\text{queries}),\ \phi_g(\text{gallery}))

for top-1 accuracy and for mAP@k (:func:`retrieval_quality`). Pairs whose features have
different dimensions cannot be compared at all: their cell is NaN with the reason.

Matplotlib is imported only inside :func:`plot_compatibility_matrix`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np

if TYPE_CHECKING:  # torch is imported where the math runs: `cssl report` reads matrices only
    import torch

Metric = Literal["top1", "map"]
FeatureArray: TypeAlias = "torch.Tensor | np.ndarray"
Labels = Sequence[str | None] | np.ndarray

_METRIC_NAMES: dict[str, str] = {"top1": "top-1", "map": "mAP@k"}
# Similarity scores computed per block stay below this many elements (float32: 64 MiB).
_BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class RetrievalQuality:
    """Retrieval quality of one (query features, gallery features) pair.

    ``top1``: share of labelled queries whose first-ranked gallery item is relevant.
    ``map_at_k``: mean over labelled queries of AP@k (see :func:`retrieval_quality`).
    ``queries``: the number of labelled queries both are averaged over.
    """

    top1: float
    map_at_k: float
    k: int
    queries: int


def encode_joint_labels(query_labels: Labels, gallery_labels: Labels) -> tuple[np.ndarray, ...]:
    """Category labels of queries and gallery -> integer codes in one shared code space.

    Strings (``None`` = unlabelled) are coded by their position in the sorted set of all
    categories; an integer array is taken as codes already, negatives meaning unlabelled.
    Unlabelled entries get ``-1``. Returns ``(query_codes, gallery_codes)``.
    """
    q, g = _as_label_list(query_labels), _as_label_list(gallery_labels)
    if isinstance(q, np.ndarray) and isinstance(g, np.ndarray):
        return np.where(q < 0, -1, q), np.where(g < 0, -1, g)
    if isinstance(q, np.ndarray) or isinstance(g, np.ndarray):
        raise TypeError("query and gallery labels must both be strings or both be integer codes")
    classes = sorted({x for x in (*q, *g) if x is not None})
    lookup = {name: code for code, name in enumerate(classes)}

    def codes(labels: list[str | None]) -> np.ndarray:
        return np.array([-1 if x is None else lookup[x] for x in labels], dtype=np.int64)

    return codes(q), codes(g)


def _as_label_list(labels: Labels) -> np.ndarray | list[str | None]:
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu":
        return labels.astype(np.int64).reshape(-1)
    out = list(labels)
    if out and all(isinstance(x, (int, np.integer)) for x in out):
        return np.asarray(out, dtype=np.int64)
    for x in out:
        if x is not None and not isinstance(x, str):
            raise TypeError(f"labels must be category strings (or None) or int codes, got {x!r}")
    return out


def _normalised(x: FeatureArray, name: str) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()  # e.g. a view of an Arrow buffer; torch wants writable memory
    t = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return F.normalize(t, dim=1)


def retrieval_quality(
    query_feats: FeatureArray,
    gallery_feats: FeatureArray,
    query_labels: Labels,
    gallery_labels: Labels,
    k: int = 10,
) -> RetrievalQuality:
    r"""Top-1 accuracy and mAP@k of cosine retrieval of ``query_feats`` in ``gallery_feats``.

    For a labelled query ``q`` the gallery is ranked by ``cos(q, g)`` (descending; equal
    scores keep gallery order). With ``rel_i = 1`` when the item at rank ``i`` has ``q``'s
    category, ``P(i) = (1/i) \sum_{j \le i} rel_j`` and ``R_q`` the number of relevant items
    in the whole gallery:

    .. math::

        \mathrm{top1} = \frac{1}{|Q|} \sum_{q \in Q} rel_1(q), \qquad
        \mathrm{AP@k}(q) = \frac{1}{\min(k, R_q)} \sum_{i=1}^{k} P(i)\, rel_i(q), \qquad
        \mathrm{mAP@k} = \frac{1}{|Q|} \sum_{q \in Q} \mathrm{AP@k}(q)

    over the labelled queries ``Q``. The normaliser ``min(k, R_q)`` is the most relevant items
    a top-k list can hold, so AP@k is 1 exactly when the first ``min(k, R_q)`` ranks are all
    relevant (the TREC/Kaggle "MAP@k" convention). A labelled query whose category has no
    gallery item (``R_q = 0``) scores 0 in both metrics, as no ranking can retrieve it.
    When the gallery has fewer than ``k`` items, the whole gallery is ranked.

    Complexity: every query ranks the full gallery (a stable sort, so ties are exact), in
    blocks of queries that keep the similarity block under 16M elements.
    """
    import torch

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    query = _normalised(query_feats, "query_feats")
    gallery = _normalised(gallery_feats, "gallery_feats")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query features have D={query.shape[1]} but the gallery D={gallery.shape[1]}: "
            "the two models embed into different spaces and cannot be compared"
        )
    q_codes, g_codes = encode_joint_labels(query_labels, gallery_labels)
    if len(q_codes) != query.shape[0] or len(g_codes) != gallery.shape[0]:
        raise ValueError(
            f"{len(q_codes)} query labels for {query.shape[0]} queries and {len(g_codes)} "
            f"gallery labels for {gallery.shape[0]} gallery items"
        )
    keep = np.flatnonzero(q_codes >= 0)
    if keep.size == 0:
        raise ValueError("no query has a category: retrieval quality needs labelled queries")
    query, q_codes = query[torch.as_tensor(keep)], q_codes[keep]

    def similarity(rows: slice) -> torch.Tensor:
        return query[rows] @ gallery.T

    return _quality_from_similarity(similarity, len(keep), q_codes, g_codes, k)


def instance_top1(new_feats: FeatureArray, old_feats: FeatureArray) -> float:
    r"""Instance-level compatibility: row ``i`` of both arrays is one frame, embedded by a new
    and an old model (the new one mapped into the old space, if it is mapped). The share of
    frames whose new embedding is at least as close (cosine) to the frame's own old embedding
    as to any other frame's:

    .. math::

        \frac{1}{N} \sum_i \left[\cos(n_i, o_i) \ge \max_{j \ne i} \cos(n_i, o_j)\right]

    1 for a model against itself (ties count as found: a duplicate frame is not a miss).
    This is what near-duplicate search across versions needs; the category-level ``M[new,
    old]`` of :func:`retrieval_quality` can be high while this is near 0.
    """
    import torch

    new = _normalised(new_feats, "new_feats")
    old = _normalised(old_feats, "old_feats")
    if new.shape != old.shape:
        raise ValueError(
            f"new and old features must be the same frames in the same space, got shapes "
            f"{tuple(new.shape)} and {tuple(old.shape)}"
        )
    n = new.shape[0]
    block = max(1, _BLOCK_ELEMENTS // n)
    found = 0
    for start in range(0, n, block):
        rows = torch.arange(start, min(start + block, n))
        sim = new[rows] @ old.T
        own = sim[torch.arange(len(rows)), rows]
        found += int((sim.max(dim=1).values <= own).sum())
    return found / n


def _quality_from_similarity(
    similarity: Any, n_queries: int, q_codes: np.ndarray, g_codes: np.ndarray, k: int
) -> RetrievalQuality:
    """Top-1 and mAP@k from ``similarity(rows) -> (len(rows), N_gallery)`` per query block."""
    import torch

    n_gallery = len(g_codes)
    k_eff = min(k, n_gallery)
    gallery_codes = torch.as_tensor(g_codes)
    relevant_total = np.bincount(g_codes[g_codes >= 0], minlength=int(q_codes.max()) + 1)
    r_q = torch.as_tensor(relevant_total[q_codes], dtype=torch.float64)
    ranks = torch.arange(1, k_eff + 1, dtype=torch.float64)
    block = max(1, _BLOCK_ELEMENTS // max(n_gallery, 1))
    hits = 0.0
    ap_sum = 0.0
    for start in range(0, n_queries, block):
        rows = slice(start, min(start + block, n_queries))
        sim = similarity(rows)
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k_eff]
        codes = torch.as_tensor(q_codes[rows]).unsqueeze(1)
        rel = (gallery_codes[order] == codes).to(torch.float64)
        hits += float(rel[:, 0].sum())
        precision = rel.cumsum(dim=1) / ranks
        norm = torch.clamp(r_q[rows], max=float(k))
        ap = torch.where(norm > 0, (precision * rel).sum(dim=1) / norm.clamp_min(1.0), 0.0)
        ap_sum += float(ap.sum())
    return RetrievalQuality(hits / n_queries, ap_sum / n_queries, k, n_queries)


# -- the matrix --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompatibilityEntry:
    """One cell ``M[query_model][gallery_model]``; NaN values come with a ``reason``."""

    query_model: str
    gallery_model: str
    top1: float
    map_at_k: float
    reason: str | None = None

    @property
    def comparable(self) -> bool:
        return self.reason is None


class CompatibilityMatrix:
    r"""``M[q][g]``: retrieval quality, queries embedded by model ``q`` and the gallery by ``g``.

    Rows are query models, columns gallery models; usually the same names in lineage order
    (oldest first), but a query-only row (e.g. ``candidate+adapter``, new features mapped
    into the old space) is allowed. Each cell holds top-1 and mAP@k
    (:func:`retrieval_quality`), or NaN and a reason when the pair cannot be compared.

    Criteria (CL2R, Biondi et al. 2023, Sec. 3 and 5.2; the empirical compatibility criterion
    of BCT, Shen et al. 2020, Sec. 3.1, written there with a strict ``>``; here ``>=`` as the
    project's issue states it, so a model identical to its predecessor is compatible):

    * ``new`` is compatible with ``old`` when :math:`M[new][old] \ge M[old][old]`: querying
      the old index with the new model is at least as good as with the old model.
    * average compatibility over a lineage :math:`\phi_1, \dots, \phi_T` (oldest first), the
      share of ordered (new, old) pairs that are compatible,

      .. math:: AC = \frac{2}{T(T-1)} \sum_{i=2}^{T} \sum_{j=1}^{i-1}
                \mathbb{1}\left[M[i][j] \ge M[j][j]\right]

    * average multi-model accuracy, the mean of the lower triangle with the diagonal,

      .. math:: AM = \frac{2}{T(T+1)} \sum_{i=1}^{T} \sum_{j=1}^{i} M[i][j]
    """

    def __init__(
        self,
        query_models: Sequence[str],
        gallery_models: Sequence[str],
        top1: np.ndarray | Sequence[Sequence[float | None]],
        map_at_k: np.ndarray | Sequence[Sequence[float | None]],
        k: int,
        reasons: Mapping[tuple[str, str], str] | None = None,
        queries: int = 0,
    ) -> None:
        self._q = _names(query_models, "query models")
        self._g = _names(gallery_models, "gallery models")
        self._top1 = _grid(top1, len(self._q), len(self._g), "top1")
        self._map = _grid(map_at_k, len(self._q), len(self._g), "map_at_k")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.queries = int(queries)
        self._reasons: dict[tuple[str, str], str] = {}
        for (q, g), why in (reasons or {}).items():
            self._reasons[(q, g)] = str(why)
        for i, q in enumerate(self._q):
            for j, g in enumerate(self._g):
                missing = math.isnan(self._top1[i, j]) or math.isnan(self._map[i, j])
                if missing and (q, g) not in self._reasons:
                    raise ValueError(f"M[{q}][{g}] is NaN without a reason")

    @classmethod
    def compute(
        cls,
        query_feats: Mapping[str, FeatureArray],
        gallery_feats: Mapping[str, FeatureArray],
        query_labels: Labels,
        gallery_labels: Labels,
        k: int = 10,
    ) -> CompatibilityMatrix:
        """Fill every cell from features of the *same* query frames and the *same* gallery
        frames under each model (rows of each array in the order of the labels)."""
        if not query_feats or not gallery_feats:
            raise ValueError(
                "a compatibility matrix needs at least one query and one gallery model"
            )
        qs, gs = list(query_feats), list(gallery_feats)
        top1 = np.full((len(qs), len(gs)), np.nan)
        mapk = np.full((len(qs), len(gs)), np.nan)
        reasons: dict[tuple[str, str], str] = {}
        queries = 0
        for i, q in enumerate(qs):
            qf = query_feats[q]
            for j, g in enumerate(gs):
                gf = gallery_feats[g]
                dq, dg = int(np.shape(qf)[-1]), int(np.shape(gf)[-1])
                if dq != dg:
                    reasons[(q, g)] = f"{q} embeds in D={dq}, {g} in D={dg}: not comparable"
                    continue
                quality = retrieval_quality(qf, gf, query_labels, gallery_labels, k)
                top1[i, j], mapk[i, j] = quality.top1, quality.map_at_k
                queries = quality.queries
        return cls(qs, gs, top1, mapk, k, reasons, queries)

    # -- access ---------------------------------------------------------------------------------
    @property
    def query_models(self) -> tuple[str, ...]:
        return self._q

    @property
    def gallery_models(self) -> tuple[str, ...]:
        return self._g

    def values(self, metric: Metric = "top1") -> np.ndarray:
        """A copy of the ``(len(query_models), len(gallery_models))`` grid of one metric."""
        return (self._top1 if _metric(metric) == "top1" else self._map).copy()

    def entry(self, query_model: str, gallery_model: str) -> CompatibilityEntry:
        i, j = (
            self._pos(self._q, query_model, "query"),
            self._pos(self._g, gallery_model, "gallery"),
        )
        return CompatibilityEntry(
            query_model,
            gallery_model,
            float(self._top1[i, j]),
            float(self._map[i, j]),
            self._reasons.get((query_model, gallery_model)),
        )

    def value(self, query_model: str, gallery_model: str, metric: Metric = "top1") -> float:
        e = self.entry(query_model, gallery_model)
        return e.top1 if _metric(metric) == "top1" else e.map_at_k

    @staticmethod
    def _pos(names: tuple[str, ...], name: str, what: str) -> int:
        try:
            return names.index(name)
        except ValueError:
            raise KeyError(f"no {what} model {name!r}; the matrix has {list(names)}") from None

    # -- criteria -------------------------------------------------------------------------------
    def is_compatible(self, new: str, old: str, metric: Metric = "top1") -> bool:
        """``M[new][old] >= M[old][old]``; ``False`` when either cell is not comparable."""
        cross, own = self.value(new, old, metric), self.value(old, old, metric)
        return not (math.isnan(cross) or math.isnan(own)) and cross >= own

    def _lineage(self, lineage: Sequence[str] | None) -> list[str]:
        names = list(lineage) if lineage is not None else [m for m in self._q if m in self._g]
        if len(names) < 2:
            raise ValueError(f"compatibility over a lineage needs at least two models, got {names}")
        return names

    def average_compatibility(
        self, lineage: Sequence[str] | None = None, metric: Metric = "top1"
    ) -> float:
        """CL2R's AC: share of ordered (new, old) pairs of ``lineage`` (oldest first; default
        the models that are both query and gallery models, in row order) with
        ``M[new][old] >= M[old][old]``. Pairs that are not comparable count as incompatible."""
        names = self._lineage(lineage)
        pairs = [(names[i], names[j]) for i in range(1, len(names)) for j in range(i)]
        return sum(self.is_compatible(new, old, metric) for new, old in pairs) / len(pairs)

    def average_multimodel_accuracy(
        self, lineage: Sequence[str] | None = None, metric: Metric = "top1"
    ) -> float:
        """CL2R's AM: mean of ``M[i][j]`` over ``j <= i`` of ``lineage`` (oldest first); NaN
        when a cell it reads is not comparable."""
        names = self._lineage(lineage)
        cells = [
            self.value(names[i], names[j], metric) for i in range(len(names)) for j in range(i + 1)
        ]
        return float(np.mean(cells))

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (NaN -> null); :meth:`from_dict` reads it back."""

        def grid(a: np.ndarray) -> list[list[float | None]]:
            return [[None if math.isnan(v) else float(v) for v in row] for row in a]

        return {
            "k": self.k,
            "queries": self.queries,
            "query_models": list(self._q),
            "gallery_models": list(self._g),
            "top1": grid(self._top1),
            "map_at_k": grid(self._map),
            "reasons": [
                {"query_model": q, "gallery_model": g, "reason": why}
                for (q, g), why in sorted(self._reasons.items())
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompatibilityMatrix:
        try:
            reasons = {(r["query_model"], r["gallery_model"]): r["reason"] for r in data["reasons"]}
            return cls(
                data["query_models"],
                data["gallery_models"],
                data["top1"],
                data["map_at_k"],
                data["k"],
                reasons,
                data.get("queries", 0),
            )
        except KeyError as exc:
            raise ValueError(f"compatibility matrix dict lacks key {exc}") from None

    def to_markdown(self, digits: int = 3) -> str:
        """One table, rows = query model, columns = gallery model, cells ``top-1 / mAP@k``;
        not comparable cells read ``n/a`` and their reasons follow the table."""
        head = f"| query \\ gallery (top-1 / mAP@{self.k}) | " + " | ".join(self._g) + " |"
        lines = [head, "|---|" + "---:|" * len(self._g)]
        for i, q in enumerate(self._q):
            cells = []
            for j in range(len(self._g)):
                a, b = self._top1[i, j], self._map[i, j]
                cells.append("n/a" if math.isnan(a) else f"{a:.{digits}f} / {b:.{digits}f}")
            lines.append(f"| {q} | " + " | ".join(cells) + " |")
        for (q, g), why in sorted(self._reasons.items()):
            lines.append(f"\nn/a M[{q}][{g}]: {why}")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return (
            f"CompatibilityMatrix(query_models={list(self._q)!r}, "
            f"gallery_models={list(self._g)!r}, k={self.k})"
        )


def _metric(metric: str) -> str:
    if metric not in _METRIC_NAMES:
        raise ValueError(f"metric must be one of {sorted(_METRIC_NAMES)}, got {metric!r}")
    return metric


def _names(names: Sequence[str], what: str) -> tuple[str, ...]:
    out = tuple(str(n) for n in names)
    if not out:
        raise ValueError(f"{what}: at least one name is needed")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} repeat: {list(out)}")
    return out


def _grid(values: Any, rows: int, cols: int, name: str) -> np.ndarray:
    table = [list(r) for r in values]
    if len(table) != rows or any(len(r) != cols for r in table):
        raise ValueError(f"{name} must be {rows}x{cols}")
    arr = np.array(
        [[np.nan if v is None else float(v) for v in r] for r in table], dtype=np.float64
    ).reshape(rows, cols)
    finite = arr[~np.isnan(arr)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        raise ValueError(f"{name} values must be fractions in [0, 1]")
    return arr


# -- figure ------------------------------------------------------------------------------------


def plot_compatibility_matrix(
    matrix: CompatibilityMatrix, path: str | Path, title: str = "Compatibility matrix M[q][g]"
) -> Path:
    """Two heatmaps side by side (top-1 and mAP@k), rows = query model, columns = gallery
    model, each value annotated; cells that are not comparable are blank and read ``n/a``.
    The colour scale is fixed to ``[0, 1]``. Written atomically; returns ``path``."""
    from cssl_core.evaluation.plots import _new_figure, _save_atomic

    nq, ng = len(matrix.query_models), len(matrix.gallery_models)
    width = 2 * (1.8 + 0.9 * ng) + 1.0
    fig = _new_figure(width, 1.6 + 0.7 * nq)
    axes = fig.subplots(1, 2)
    image = None
    for ax, metric in zip(axes, ("top1", "map"), strict=True):
        values = matrix.values(metric)  # type: ignore[arg-type]
        image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(ng), labels=matrix.gallery_models, rotation=45, ha="right")
        ax.set_yticks(range(nq), labels=matrix.query_models)
        ax.set_xlabel("gallery embedded by")
        ax.set_ylabel("queries embedded by")
        ax.set_title("top-1" if metric == "top1" else f"mAP@{matrix.k}")
        for i in range(nq):
            for j in range(ng):
                v = values[i, j]
                text, colour = (
                    ("n/a", "black")
                    if math.isnan(v)
                    else (f"{v:.2f}", "black" if v > 0.6 else "white")
                )
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
    assert image is not None  # two panels drawn
    fig.colorbar(image, ax=list(axes), label="retrieval quality")
    fig.suptitle(title)
    return _save_atomic(fig, path)


# -- the verdict on one candidate -------------------------------------------------------------

CompatKind = Literal["direct", "adapter", "none"]
"""How a new version can search its predecessor's index: with its own embedding (``direct``),
only through its query-side adapter (``adapter``), or not at all (``none``)."""


@dataclass(frozen=True)
class CompatVerdict:
    """Whether ``new`` can search an index ``old`` embedded, from one matrix (``metric``).

    ``direct`` is ``M[new][old]``, ``own`` is ``M[old][old]`` and ``adapter`` is
    ``M[new via adapter][old]`` (None without an adapter into ``old``'s space). The kind is
    ``direct`` when ``M[new][old] >= M[old][old]``, else ``adapter`` when the adapter row
    satisfies the same inequality, else ``none`` (CL2R's criterion, see
    :class:`CompatibilityMatrix`). A cell that is not comparable (NaN) satisfies nothing.
    """

    new: str
    old: str
    direct: float
    own: float
    adapter: float | None = None
    metric: Metric = "top1"

    @property
    def kind(self) -> CompatKind:
        def at_least_own(value: float | None) -> bool:
            return (
                value is not None
                and not math.isnan(value)
                and not math.isnan(self.own)
                and (value >= self.own)
            )

        if at_least_own(self.direct):
            return "direct"
        if at_least_own(self.adapter):
            return "adapter"
        return "none"

    def describe(self) -> str:
        """``M[candidate][champion] 0.251 < M[champion][champion] 0.277; via adapter 0.281``."""
        name = _METRIC_NAMES[self.metric]
        rel = ">=" if self.kind == "direct" else "<"
        text = (
            f"{name} M[{self.new}][{self.old}] {self.direct:.3f} {rel} "
            f"M[{self.old}][{self.old}] {self.own:.3f}"
        )
        if self.adapter is not None:
            text += f"; through the adapter {self.adapter:.3f}"
        return text

    def to_dict(self) -> dict[str, Any]:
        def num(v: float | None) -> float | None:
            return None if v is None or math.isnan(v) else float(v)

        return {
            "new": self.new,
            "old": self.old,
            "metric": self.metric,
            "direct": num(self.direct),
            "own": num(self.own),
            "adapter": num(self.adapter),
            "kind": self.kind,
        }


def compat_verdict(
    matrix: CompatibilityMatrix,
    new: str,
    old: str,
    adapter_row: str | None = None,
    metric: Metric = "top1",
) -> CompatVerdict:
    """The :class:`CompatVerdict` of ``new`` against ``old`` read from ``matrix``;
    ``adapter_row`` names the query-only row of ``new``'s features mapped into ``old``'s space
    (absent or None: no adapter)."""
    adapter = None
    if adapter_row is not None and adapter_row in matrix.query_models:
        adapter = matrix.value(adapter_row, old, metric)
    return CompatVerdict(
        new, old, matrix.value(new, old, metric), matrix.value(old, old, metric), adapter, metric
    )


def restrict_row(
    matrix: CompatibilityMatrix, row: str, keep: Sequence[str], reason: str
) -> CompatibilityMatrix:
    """A copy of ``matrix`` whose row ``row`` keeps only the columns ``keep``; its other cells
    become not comparable with ``reason`` (e.g. an adapter row, meaningful only against the
    model whose space the adapter maps into)."""
    data = matrix.to_dict()
    i = data["query_models"].index(row)
    reasons = list(data["reasons"])
    for j, g in enumerate(data["gallery_models"]):
        if g in keep:
            continue
        data["top1"][i][j] = None
        data["map_at_k"][i][j] = None
        reasons = [r for r in reasons if (r["query_model"], r["gallery_model"]) != (row, g)]
        reasons.append({"query_model": row, "gallery_model": g, "reason": reason})
    data["reasons"] = reasons
    return CompatibilityMatrix.from_dict(data)
