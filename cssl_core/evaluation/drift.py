r"""Drift statistics: do a new shard's frames come from the same distribution as a reference?

Both sides are seeded samples of frames (:func:`sample_shard`, :func:`sample_table`; the real
mix, nothing stratified) embedded with the serving model (:func:`embed_frames`: backbone
features, L2-normalised). :func:`mmd_test` compares the two embedding samples with a kernel
two-sample test: the unbiased estimate of the squared maximum mean discrepancy (MMD², Gretton
et al. 2012) under a Gaussian kernel, with a permutation p-value from
``scipy.stats.permutation_test``. :func:`drift_check` does the whole thing for a model and
two frame sources and returns a :class:`DriftResult`.

The unit of independence is a stream segment, not a frame (:func:`segment_ids`): the frames
of one clip are near-duplicates, and a test that relabels single frames treats 200 frames of
60 clips as 200 independent observations. On the simulated stream that test flagged nearly
every pair of samples from one unchanged distribution (``benchmarks/drift.py``), so the
permutation moves whole segments between the two sides.

Significance alone is not a verdict: with enough data a test flags any difference, however
small. Drift therefore needs ``p < alpha`` AND an effect size of at least ``min_effect``
(:func:`verdict`). The effect is MMD² itself, in kernel units: it estimates a property of the
two distributions, so it does not grow with the sample size (its estimate only gets less
noisy), unlike a test statistic scaled by ``n``.

When frames carry categories, :func:`category_shifts` reports each category's share in the
reference and in the new frames and the total variation distance between the two mixes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from cssl_core.config import DriftConfig
from cssl_core.data.shard import Shard

if TYPE_CHECKING:
    import torch

    from cssl_core.learn.models import Embedder

MIN_FRAMES = 20
"""Fewest frames per side: below this MMD² is too noisy to mean anything."""
MIN_UNITS = 10
"""Fewest independent units (stream segments) per side: with fewer, a couple of streams decide
the answer."""
TOP_CATEGORIES = 3
"""Categories named in the one-line summary (the result holds all of them)."""


class DriftError(ValueError):
    """A drift check cannot run on these inputs (one-line message)."""


# -- the statistic ------------------------------------------------------------------------


def squared_distances(z: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances of the rows of ``z`` (``(N, D)`` -> ``(N, N)``)."""
    sq = np.einsum("ij,ij->i", z, z)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    np.fill_diagonal(d2, 0.0)
    return np.maximum(d2, 0.0)


def median_bandwidth(d2: np.ndarray) -> float:
    r"""The median heuristic: ``sigma`` = median distance between distinct points of the pooled
    sample (Gretton et al. 2012, Sec. 8).

    It is computed on the pooled sample (both sides together), which every permutation of the
    test shares, so the kernel is the same under every relabelling and the permutation test
    stays exact. If most pairs coincide (median 0) the mean distance is used; if every point
    is the same, ``sigma = 1`` (any value gives MMD² = 0 then).
    """
    distances = np.sqrt(d2[np.triu_indices(d2.shape[0], 1)])
    sigma = float(np.median(distances))
    if sigma <= 0.0:
        sigma = float(distances.mean())
    return sigma if sigma > 0.0 else 1.0


def gaussian_kernel(d2: np.ndarray, sigma: float) -> np.ndarray:
    r"""``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))`` from squared distances."""
    return np.exp(-d2 / (2.0 * sigma * sigma))


def mmd2_unbiased(kernel: np.ndarray, n: int) -> float:
    r"""Unbiased MMD² of the first ``n`` rows (X) against the rest (Y) of a pooled kernel matrix.

    Gretton et al. 2012, "A Kernel Two-Sample Test", JMLR 13, Eq. (3) (Lemma 6), with
    ``m = |Y|``:

    .. math:: \mathrm{MMD}^2_u = \frac{1}{n(n-1)} \sum_{i \ne j} k(x_i, x_j)
              + \frac{1}{m(m-1)} \sum_{i \ne j} k(y_i, y_j)
              - \frac{2}{nm} \sum_{i, j} k(x_i, y_j)

    Its expectation is the population MMD², 0 when both samples come from one distribution
    (the estimate can then be slightly negative).
    """
    total = kernel.shape[0]
    m = total - n
    if n < 2 or m < 2:
        raise DriftError(f"MMD² needs at least 2 frames per side, got {n} and {m}")
    indicator = np.zeros((1, total))
    indicator[0, :n] = 1.0
    return float(_mmd2_batch(_off_diagonal(kernel), indicator)[0])


def _off_diagonal(kernel: np.ndarray) -> np.ndarray:
    off = kernel.copy()
    np.fill_diagonal(off, 0.0)
    return off


def _mmd2_batch(off: np.ndarray, indicator: np.ndarray) -> np.ndarray:
    """:func:`mmd2_unbiased` for a batch of splits at once.

    ``off`` is the kernel matrix with a zero diagonal (``K0``); ``indicator`` is ``(B, N)``
    with 1 for X rows. With ``a`` one row of it, ``sum_XX = a K0 a``,
    ``sum_XY = a K0 1 - sum_XX`` and ``sum_YY = 1 K0 1 - 2 a K0 1 + sum_XX``: one
    ``(B, N) x (N, N)`` product per batch.
    """
    row_sums = off.sum(axis=1)
    n = indicator.sum(axis=1)
    m = indicator.shape[1] - n
    xx = np.einsum("bi,bi->b", indicator @ off, indicator)
    x_all = indicator @ row_sums
    xy = x_all - xx
    yy = row_sums.sum() - 2.0 * x_all + xx
    return xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (n * m)


def segment_ids(
    stream_ids: Sequence[str] | np.ndarray, ts_ms: Sequence[int] | np.ndarray, seconds: float
) -> np.ndarray:
    """The unit of independence of each frame, as integer codes.

    Frames of one stream a few seconds apart are near-duplicates, so they are not independent
    observations: a unit is a stream segment, ``(stream_id, floor(ts / seconds))`` (every frame
    of a stream in one ``seconds``-long window). ``seconds = 0`` makes every frame its own unit.
    """
    n = len(stream_ids)
    if len(ts_ms) != n:
        raise DriftError(f"{n} stream ids but {len(ts_ms)} timestamps")
    if seconds <= 0:
        return np.arange(n)
    window = np.floor_divide(np.asarray(ts_ms, dtype=np.int64), int(round(seconds * 1000)))
    keys = [f"{s}\x00{w}" for s, w in zip(stream_ids, window.tolist(), strict=True)]
    return np.unique(np.array(keys, dtype=object), return_inverse=True)[1].reshape(-1)


def _check_samples(new: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(new, dtype=np.float64)
    y = np.asarray(reference, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise DriftError(f"embeddings must be (N, D) with the same D, got {x.shape} and {y.shape}")
    for name, z in (("new", x), ("reference", y)):
        if z.shape[0] < MIN_FRAMES:
            raise DriftError(
                f"the {name} sample has {z.shape[0]} frames; a drift check needs at least "
                f"{MIN_FRAMES} per side"
            )
        if not np.isfinite(z).all():
            raise DriftError(f"the {name} embeddings contain NaN or infinite values")
    return x, y


def _units(units: Sequence[int] | np.ndarray | None, count: int, side: str) -> np.ndarray:
    if units is None:
        return np.arange(count)
    codes = np.asarray(units)
    if codes.shape != (count,):
        raise DriftError(f"{side} units have shape {codes.shape}, expected ({count},)")
    codes = np.unique(codes, return_inverse=True)[1].reshape(-1)
    if codes.max() + 1 < MIN_UNITS:
        raise DriftError(
            f"the {side} sample spans only {codes.max() + 1} independent units (stream "
            f"segments); the test needs at least {MIN_UNITS} per side: sample more streams, "
            "or set drift.segment_seconds=0 to count every frame as independent"
        )
    return codes


@dataclass(frozen=True)
class MMDTest:
    """The outcome of :func:`mmd_test`."""

    mmd2: float
    p_value: float
    bandwidth: float
    new_units: int
    reference_units: int


def mmd_test(
    new: np.ndarray,
    reference: np.ndarray,
    permutations: int = 1000,
    seed: int = 0,
    *,
    new_units: Sequence[int] | np.ndarray | None = None,
    reference_units: Sequence[int] | np.ndarray | None = None,
) -> MMDTest:
    """Kernel two-sample test of two embedding samples (``(n, D)`` and ``(m, D)``).

    Statistic and effect: :func:`mmd2_unbiased` over all frames, with a Gaussian kernel whose
    bandwidth is :func:`median_bandwidth` of the pooled sample. p-value:
    ``scipy.stats.permutation_test`` over ``permutations`` random relabellings (one-sided:
    large MMD² is evidence of a difference), ``(1 + #{MMD²_perm >= MMD²}) / (1 + B)``.

    What is relabelled is the unit of independence: ``new_units`` / ``reference_units`` give
    each frame's unit (:func:`segment_ids`) and whole units move between the sides, so
    near-duplicate frames of one clip cannot pose as independent evidence (relabelling single
    frames of clustered data flags nearly any two samples). Without units every frame is its
    own unit. Each side needs at least :data:`MIN_UNITS` units.
    """
    x, y = _check_samples(new, reference)
    n, m = len(x), len(y)
    ux = _units(new_units, n, "new")
    uy = _units(reference_units, m, "reference") + ux.max() + 1
    unit_of_frame = np.concatenate([ux, uy])
    total_units = int(unit_of_frame.max()) + 1
    d2 = squared_distances(np.concatenate([x, y]))
    sigma = median_bandwidth(d2)
    off = _off_diagonal(gaussian_kernel(d2, sigma))

    def statistic(iu: np.ndarray, _: np.ndarray, axis: int = -1) -> np.ndarray:
        # Vectorised: iu holds the new side's units, (k,) observed or (batch, k) permuted.
        rows = np.atleast_2d(iu).astype(np.int64)
        chosen = np.zeros((rows.shape[0], total_units))
        np.put_along_axis(chosen, rows, 1.0, axis=1)
        values = _mmd2_batch(off, chosen[:, unit_of_frame])
        return values if np.ndim(iu) > 1 else values[0]

    result = stats.permutation_test(
        (np.unique(ux), np.unique(uy)),
        statistic,
        permutation_type="independent",
        vectorized=True,
        n_resamples=permutations,
        alternative="greater",
        batch=200,
        rng=np.random.default_rng(seed),
    )
    return MMDTest(
        mmd2=float(result.statistic),
        p_value=float(result.pvalue),
        bandwidth=sigma,
        new_units=int(ux.max()) + 1,
        reference_units=int(uy.max() - ux.max()),
    )


def verdict(p_value: float, effect: float, alpha: float, min_effect: float) -> bool:
    """Drift when the difference is both significant (``p < alpha``) and large enough
    (``effect >= min_effect``)."""
    return p_value < alpha and effect >= min_effect


# -- categories ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CategoryShift:
    """One category's share of the labelled frames in the reference and in the new frames."""

    category: str
    reference_share: float
    new_share: float

    @property
    def difference(self) -> float:
        """``new_share - reference_share`` (positive: the category grew)."""
        return self.new_share - self.reference_share


def category_shifts(
    new_counts: Mapping[str, int], reference_counts: Mapping[str, int]
) -> tuple[tuple[CategoryShift, ...], float | None]:
    r"""Each category's share on both sides, largest move first, and the total variation
    distance ``TV = 1/2 sum_c |p_new(c) - p_ref(c)|`` (0: same mix, 1: no category shared).

    Shares are over labelled frames. With no labelled frame on either side there is nothing
    to compare: ``((), None)``. Ties are ordered by category name.
    """
    n_new, n_ref = sum(new_counts.values()), sum(reference_counts.values())
    if n_new == 0 or n_ref == 0:
        return (), None
    shifts = [
        CategoryShift(c, reference_counts.get(c, 0) / n_ref, new_counts.get(c, 0) / n_new)
        for c in set(new_counts) | set(reference_counts)
    ]
    shifts.sort(key=lambda s: (-abs(s.difference), s.category))
    tv = 0.5 * sum(abs(s.difference) for s in shifts)
    return tuple(shifts), float(tv)


# -- the result ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftResult:
    """The outcome of one drift check. ``mmd2`` is both the test statistic and the effect size
    (:func:`mmd2_unbiased`, kernel units); ``*_units`` count the independent stream segments
    each side's frames came from."""

    mmd2: float
    p_value: float
    alpha: float
    min_effect: float
    drifted: bool
    new_frames: int
    reference_frames: int
    new_units: int
    reference_units: int
    bandwidth: float
    permutations: int
    category_shifts: tuple[CategoryShift, ...] = ()
    total_variation: float | None = None

    @property
    def effect(self) -> float:
        return self.mmd2

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha

    @property
    def reason(self) -> str:
        """Why the verdict is what it is, in a few words."""
        if self.drifted:
            return "significant and large enough"
        if not self.significant:
            return "not significant"
        return "significant but smaller than min_effect"

    def summary(self) -> str:
        """One line for a person: verdict, effect, p-value, sample sizes, top moved categories."""
        head = "DRIFT" if self.drifted else "no drift"
        line = (
            f"{head}: {self.reason}; MMD² {self.mmd2:.4f} (min {self.min_effect:g}), "
            f"p={self.p_value:.3g} (alpha {self.alpha:g}); {self.new_frames} new frames "
            f"({self.new_units} segments) vs {self.reference_frames} reference "
            f"({self.reference_units})"
        )
        if self.total_variation is not None:
            moved = ", ".join(
                f"{s.category} {s.reference_share:.0%}->{s.new_share:.0%}"
                for s in self.category_shifts[:TOP_CATEGORIES]
                if s.difference != 0
            )
            line += f"; category TV {self.total_variation:.2f}" + (f" ({moved})" if moved else "")
        return line

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (``--json``, MLflow)."""
        out = asdict(self)
        out["category_shifts"] = [
            {**asdict(s), "difference": s.difference} for s in self.category_shifts
        ]
        out["effect"] = self.effect
        out["significant"] = self.significant
        out["reason"] = self.reason
        out["summary"] = self.summary()
        return out


def drift_test(
    new: np.ndarray,
    reference: np.ndarray,
    cfg: DriftConfig,
    *,
    new_units: Sequence[int] | np.ndarray | None = None,
    reference_units: Sequence[int] | np.ndarray | None = None,
    new_counts: Mapping[str, int] | None = None,
    reference_counts: Mapping[str, int] | None = None,
) -> DriftResult:
    """Test two embedding samples (:func:`mmd_test`, relabelling the given units) and give the
    verdict of ``cfg`` (:func:`verdict`); no model involved. Category counts, when given for
    both sides, add :func:`category_shifts`."""
    test = mmd_test(
        new,
        reference,
        cfg.permutations,
        cfg.seed,
        new_units=new_units,
        reference_units=reference_units,
    )
    shifts, tv = category_shifts(new_counts or {}, reference_counts or {})
    return DriftResult(
        mmd2=test.mmd2,
        p_value=test.p_value,
        alpha=cfg.alpha,
        min_effect=cfg.min_effect,
        drifted=verdict(test.p_value, test.mmd2, cfg.alpha, cfg.min_effect),
        new_frames=len(new),
        reference_frames=len(reference),
        new_units=test.new_units,
        reference_units=test.reference_units,
        bandwidth=test.bandwidth,
        permutations=cfg.permutations,
        category_shifts=shifts,
        total_variation=tv,
    )


# -- samples of frames --------------------------------------------------------------------


@dataclass(frozen=True)
class FrameSample:
    """A seeded sample of frames, with the category counts of the whole source it came from.

    ``category_counts`` counts every labelled frame of the source (not only the sample), so
    category shares are exact while the test runs on the sample.
    """

    images: tuple[bytes, ...]
    categories: tuple[str | None, ...]
    stream_ids: tuple[str, ...]
    ts_ms: tuple[int, ...]
    category_counts: dict[str, int]
    population: int
    source: str

    def __len__(self) -> int:
        return len(self.images)

    def units(self, segment_seconds: float) -> np.ndarray:
        """Each frame's unit of independence (:func:`segment_ids`)."""
        return segment_ids(self.stream_ids, self.ts_ms, segment_seconds)


def _choose(population: int, size: int, seed: int, source: str) -> np.ndarray:
    if size < MIN_FRAMES:
        raise DriftError(f"sample size {size} is below the minimum of {MIN_FRAMES} frames")
    if population < MIN_FRAMES:
        what = "no frames" if population == 0 else f"only {population} frames"
        raise DriftError(f"{source} has {what}; a drift check needs at least {MIN_FRAMES} per side")
    if population <= size:
        return np.arange(population)
    return np.sort(np.random.default_rng(seed).choice(population, size=size, replace=False))


def _counts(categories: Sequence[str | None]) -> dict[str, int]:
    return dict(sorted(Counter(c for c in categories if c is not None).items()))


_META = ["frame_id", "stream_id", "ts", "category"]


def _sample(meta: pa.Table, chosen: np.ndarray, images: list[bytes], source: str) -> FrameSample:
    """A :class:`FrameSample` of the ``chosen`` rows of ``meta`` (in ``frame_id`` order)."""
    categories = meta.column("category").to_pylist()
    picked = meta.take(pa.array(chosen, type=pa.int64()))
    ts_ms = picked.column("ts").cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64())
    return FrameSample(
        images=tuple(images),
        categories=tuple(picked.column("category").to_pylist()),
        stream_ids=tuple(picked.column("stream_id").to_pylist()),
        ts_ms=tuple(ts_ms.to_pylist()),
        category_counts=_counts(categories),
        population=meta.num_rows,
        source=source,
    )


def sample_table(table: pa.Table, size: int, seed: int, source: str = "table") -> FrameSample:
    """A uniform sample (without replacement) of ``size`` rows of a frame table (a shard's
    rows or a replay memory's ``table``, :data:`~cssl_core.data.shard.FRAME_SCHEMA`); all rows
    when it has fewer.

    Rows are put in ``frame_id`` order first, so the sample does not depend on how the table
    is stored. Nothing is stratified: the sample reflects the table's real mix.
    """
    missing = [c for c in [*_META, "image"] if c not in table.column_names]
    if missing:
        raise DriftError(f"{source} has no {', '.join(missing)} column (not a frame table)")
    table = table.sort_by("frame_id")
    chosen = _choose(table.num_rows, size, seed, source)
    images = table.column("image").take(pa.array(chosen, type=pa.int64())).to_pylist()
    return _sample(table.select(_META), chosen, images, source)


def sample_shard(shard: Shard, size: int, seed: int, split: str | None = "train") -> FrameSample:
    """A seeded sample of ``size`` frames of a shard's ``split`` (``None``: every frame).

    The default is the train split, because the replay memory (the other reference) holds
    only train frames: both references are then compared like with like. A split has the
    shard's game mix (the simulator and ``cssl ingest`` split within every category). Only
    the small columns are read to choose; images are read for the chosen rows only.
    """
    source = f"shard {shard.path}" + (f" ({split} split)" if split else "")
    meta = shard.read(_META, split=split).sort_by("frame_id")
    chosen = _choose(meta.num_rows, size, seed, source)
    ids = meta.column("frame_id").to_pylist()
    keep = pa.array([ids[i] for i in chosen], type=pa.string())
    images: dict[str, bytes] = {}
    for batch in shard.iter_batches(["frame_id", "image"], split=split):
        batch = batch.filter(pc.is_in(batch.column("frame_id"), value_set=keep))
        images.update(
            zip(
                batch.column("frame_id").to_pylist(), batch.column("image").to_pylist(), strict=True
            )
        )
    return _sample(meta, chosen, [images[ids[i]] for i in chosen], source)


# -- embedding and the end-to-end check ---------------------------------------------------


def embed_frames(
    model: Embedder,
    images: Sequence[bytes],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """L2-normalised backbone features of encoded frames, float32 ``(N, D)``.

    The production embedding (:func:`cssl_core.evaluation.evaluate.extract_features`, fp32,
    the serving transform), normalised so distances compare directions, as cosine retrieval
    downstream does; the kernel bandwidth then lives on a fixed scale (distances in [0, 2]).
    """
    import torch.nn.functional as F

    from cssl_core.evaluation.evaluate import extract_features

    feats = extract_features(
        model, list(images), model.cfg.input_size, batch_size=batch_size, device=device
    )
    return F.normalize(feats, dim=1).numpy()


Frames: TypeAlias = Shard | pa.Table | FrameSample
"""What a drift check compares: a shard, a frame table (e.g. a replay memory's) or a sample."""


def _as_sample(frames: Frames, size: int, seed: int, side: str) -> FrameSample:
    if isinstance(frames, FrameSample):
        if len(frames) < MIN_FRAMES:
            raise DriftError(
                f"the {side} sample ({frames.source}) has {len(frames)} frames; a drift check "
                f"needs at least {MIN_FRAMES} per side"
            )
        return frames
    if isinstance(frames, Shard):
        return sample_shard(frames, size, seed)
    if isinstance(frames, pa.Table):
        return sample_table(frames, size, seed, source=f"{side} table")
    raise TypeError(f"{side} frames must be a Shard, a pyarrow Table or a FrameSample")


def drift_check(
    model: Embedder,
    new_frames: Frames,
    reference_frames: Frames,
    cfg: DriftConfig,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> DriftResult:
    """Is ``new_frames`` drawn from the distribution of ``reference_frames``, as ``model`` sees it?

    A shard or a frame table (e.g. a replay memory's ``table``) is sampled first:
    ``cfg.sample_size`` frames, seed ``cfg.seed`` for the new side and ``cfg.seed + 1`` for
    the reference (so one source passed twice gives two different samples). Both samples are
    embedded with ``model`` (:func:`embed_frames`), tested with :func:`mmd_test` relabelling
    stream segments of ``cfg.segment_seconds`` and judged by :func:`verdict`; categories, when
    present, give :func:`category_shifts` over the whole sources. An empty or tiny side is a
    :class:`DriftError` naming it.
    """
    new = _as_sample(new_frames, cfg.sample_size, cfg.seed, "new")
    reference = _as_sample(reference_frames, cfg.sample_size, cfg.seed + 1, "reference")
    x = embed_frames(model, new.images, batch_size=batch_size, device=device)
    y = embed_frames(model, reference.images, batch_size=batch_size, device=device)
    return drift_test(
        x,
        y,
        cfg,
        new_units=new.units(cfg.segment_seconds),
        reference_units=reference.units(cfg.segment_seconds),
        new_counts=new.category_counts,
        reference_counts=reference.category_counts,
    )
