"""The replay memory: a small, versioned, immutable sample of past training frames.

After each period ``t`` the memory becomes ``memory(t) = select(memory(t-1) ∪ train(t))``
and is published through an :class:`~cssl_core.data.storage.ObjectStore`::

    memory/<period>/part-00000.parquet   frames (the shard's FRAME_SCHEMA, train split only)
    memory/<period>/manifest.json        written LAST; a version exists iff its manifest does

An interrupted save leaves parts without a manifest: the version stays invisible, the
previous version stays the latest, and the next save of that period clears the leftovers.
A published version never changes: saving the same content again is a no-op (the content
fingerprint matches), saving different content under the same period raises, unless the
caller replaces a version it found stale (``save(..., replace=True)``).

The manifest records the config that made the memory (``selection_config``: selection,
capacity, seed, and for the model-scored selections the pool size and what the score
depends on) and, for those, the selecting model's fingerprint (``selected_by``), so a memory
is reused only by a config that would have made it (:meth:`ReplayMemory.made_with`). A
manifest from before these fields loads as a memory of unknown config.

Selection strategies (``ReplayConfig.selection``):

- ``reservoir``: Vitter's Algorithm R over every train frame seen so far (``seen`` is carried
  in the manifest), so each frame of the stream is in memory with probability
  ``capacity / seen``.
- ``balanced``: equal quota per period, and within a period per category (max-min fair
  "water-filling": a group with fewer frames than its share gives the rest to the others;
  ties for the last slots are broken by the seeded generator). Frames within a group are
  a seeded uniform sample.
- ``diverse``: k-center greedy (Sener & Savarese, 2018) in embedding space over the memory
  plus a random candidate pool of the new frames; like MinRed (Purushwalkam et al., 2022)
  it keeps mutually distant, non-redundant frames. Cost O((capacity + pool) x capacity x D).
- ``hard``: the frames with the highest per-frame SSL loss (``score_fn``) over the memory plus
  the candidate pool, *balanced by period*: each period first gets its balanced quota (as in
  ``balanced``), then keeps its top-scoring frames. Without the quotas one period (the
  newest, or the one the current model forgot most) could take the whole memory.

Every random choice comes from a generator seeded by ``(seed, period)``, so an update is a
deterministic function of its inputs.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cssl_core.data.shard import FRAME_SCHEMA, ShardError, check_schema
from cssl_core.data.storage import ObjectStore, StoreError, validate_key

SCHEMA_VERSION = 1
MEMORY_PREFIX = "memory"
MANIFEST_NAME = "manifest.json"
TRAIN_SPLIT = "train"
SELECTIONS = ("reservoir", "balanced", "diverse", "hard")
Selection = Literal["reservoir", "balanced", "diverse", "hard"]
EmbedFn = Callable[[pa.Table], np.ndarray]
ScoreFn = Callable[[pa.Table], np.ndarray]

_PART_RE = re.compile(r"^part-\d{5}\.parquet$")
_PERIOD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # as config.Period.name
_NO_CATEGORY = "\x00none"  # group key for frames without a category
K = TypeVar("K")


class ReplayError(ValueError):
    """A replay memory is invalid, missing, or would be overwritten (one-line message)."""


# -- pure selection math (indices in, indices out) ------------------------------------------


def reservoir_indices(
    num_memory: int, seen: int, num_new: int, capacity: int, rng: np.random.Generator
) -> np.ndarray:
    """Vitter's Algorithm R, continued from a reservoir of ``num_memory`` after ``seen`` items.

    Rows are indexed ``0..num_memory-1`` (the current reservoir, in slot order) then
    ``num_memory..num_memory+num_new-1`` (the new items, in stream order). Returns the
    indices of the new reservoir, in slot order.

    Algorithm R (Vitter, 1985, "Random sampling with a reservoir", ACM TOMS 11(1)): item
    ``i`` (0-based position in the whole stream) fills a free slot while the reservoir has
    room; otherwise draw ``j`` uniformly from ``{0, ..., i}`` (inclusive: ``i + 1``
    outcomes) and, if ``j < capacity``, the item replaces slot ``j``. Each item then survives
    with probability ``capacity / n`` after ``n`` items. All draws are made with one call
    ``rng.integers(0, highs)`` with ``highs[t] = i_t + 1``.

    If ``capacity`` shrank below ``num_memory`` the reservoir is first subsampled uniformly
    (a uniform subset of a uniform sample is uniform). If it grew, free slots are filled by
    the next items, which over-represents them until the stream moves on (Algorithm R has
    no way to recover items it already discarded).
    """
    if capacity < 1:
        raise ReplayError(f"capacity must be >= 1, got {capacity}")
    if seen < num_memory:
        raise ReplayError(f"seen={seen} is smaller than the memory size {num_memory}")
    slots = np.arange(num_memory, dtype=np.int64)
    if num_memory > capacity:
        slots = np.sort(rng.choice(num_memory, size=capacity, replace=False))
    fill = min(capacity - len(slots), num_new)
    slots = np.concatenate([slots, num_memory + np.arange(fill, dtype=np.int64)])
    rest = np.arange(fill, num_new, dtype=np.int64)
    if len(rest) == 0:
        return slots
    highs = seen + rest + 1  # stream position i = seen + t; j ~ U{0, ..., i}
    draws = np.asarray(rng.integers(0, highs), dtype=np.int64)
    hit = draws < capacity
    targets, items = draws[hit][::-1], (num_memory + rest[hit])[::-1]
    # Several items may replace the same slot; the last one (in stream order) wins.
    first_in_reversed = np.unique(targets, return_index=True)[1]
    slots[targets[first_in_reversed]] = items[first_in_reversed]
    return slots


def water_fill(available: Mapping[K, int], capacity: int, rng: np.random.Generator) -> dict[K, int]:
    """Max-min fair quotas: split ``capacity`` equally over groups, capped by availability.

    A group with fewer items than its share keeps all of them and the surplus is shared by
    the others, repeatedly. When fewer slots remain than groups with room, the generator picks
    which groups get one more. Groups are processed in the mapping's order (pass them sorted
    for determinism). ``sum(quotas) == min(capacity, sum(available))``.
    """
    quotas = {key: 0 for key in available}
    remaining = capacity
    active = [key for key, n in available.items() if n > 0]
    while remaining > 0 and active:
        share = remaining // len(active)
        if share == 0:
            for i in np.sort(rng.choice(len(active), size=remaining, replace=False)):
                quotas[active[int(i)]] += 1
            break
        for key in active:
            give = min(share, available[key] - quotas[key])
            quotas[key] += give
            remaining -= give
        active = [key for key in active if quotas[key] < available[key]]
    return quotas


def balanced_indices(
    periods: Sequence[str],
    categories: Sequence[str | None],
    capacity: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Equal quota per period, then per category within each period; uniform within groups.

    ``periods[i]`` and ``categories[i]`` describe row ``i``; returns the sorted kept rows.
    Frames without a category form one group of their own.
    """
    by_group: dict[str, dict[str, list[int]]] = {}
    for i, (period, category) in enumerate(zip(periods, categories, strict=True)):
        group = _NO_CATEGORY if category is None else category
        by_group.setdefault(period, {}).setdefault(group, []).append(i)
    period_sizes = {p: sum(map(len, by_group[p].values())) for p in sorted(by_group)}
    kept: list[np.ndarray] = []
    for period, quota in water_fill(period_sizes, capacity, rng).items():
        groups = by_group[period]
        sizes = {g: len(groups[g]) for g in sorted(groups)}
        for group, q in water_fill(sizes, quota, rng).items():
            rows = np.asarray(groups[group], dtype=np.int64)
            kept.append(rows if q == len(rows) else rng.choice(rows, size=q, replace=False))
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def k_center_greedy(embeddings: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-center selection (Sener & Savarese, 2018, ICLR, Algorithm 1).

    Starting from one seeded random point, repeatedly add
    ``u = argmax_{i not in S} min_{j in S} d(x_i, x_j)`` with the cosine distance
    ``d(x, y) = 1 - x·y`` on L2-normalised rows. This is a 2-approximation of the
    minimax-radius cover. Cost O(N k D) time and O(N) extra memory for N rows; returns
    the chosen row indices in selection order (all rows when ``k >= N``).
    """
    n = embeddings.shape[0]
    if k >= n:
        return np.arange(n, dtype=np.int64)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = int(rng.integers(0, n))
    min_dist = np.full(n, np.inf, dtype=np.float64)
    for step in range(k):
        if step:
            chosen[step] = int(np.argmax(min_dist))
        center = embeddings[chosen[step]]
        min_dist = np.minimum(min_dist, 1.0 - embeddings @ center)
        min_dist[chosen[step]] = -np.inf  # stays -inf: chosen rows are never picked again
    return chosen


def top_score_by_period(
    periods: Sequence[str],
    scores: np.ndarray,
    tiebreak: Sequence[str],
    capacity: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Balanced quota per period (:func:`water_fill`), then the highest scores in each.

    Equal scores are ordered by ``tiebreak`` (the frame ids), so the result is deterministic.
    Returns the sorted kept rows.
    """
    by_period: dict[str, list[int]] = {}
    for i, period in enumerate(periods):
        by_period.setdefault(period, []).append(i)
    sizes = {p: len(by_period[p]) for p in sorted(by_period)}
    kept: list[np.ndarray] = []
    for period, quota in water_fill(sizes, capacity, rng).items():
        rows = by_period[period]
        order = sorted(rows, key=lambda i: (-float(scores[i]), tiebreak[i]))
        kept.append(np.asarray(order[:quota], dtype=np.int64))
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


# -- table helpers ----------------------------------------------------------------------------


def _generator(seed: int, period: str) -> np.random.Generator:
    """A generator that depends on (seed, period) only."""
    words = np.frombuffer(hashlib.sha256(period.encode()).digest()[:16], dtype=np.uint32)
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, words)]))


def _conform(table: pa.Table, where: str) -> pa.Table:
    """Select and cast the FRAME_SCHEMA columns, rejecting wrong types and nulls."""
    try:
        check_schema(table.schema, where)
    except ShardError as exc:
        raise ReplayError(str(exc)) from None
    table = table.select(FRAME_SCHEMA.names)
    for field in FRAME_SCHEMA:
        if not field.nullable and table.column(field.name).null_count:
            raise ReplayError(f"{where}: column {field.name!r} has null values")
    return table.cast(FRAME_SCHEMA)


def _canonical(table: pa.Table) -> pa.Table:
    """Rows in a content-defined order, so the same frames give the same bytes."""
    keys = [("period", "ascending"), ("frame_id", "ascending"), ("stream_id", "ascending")]
    return table.sort_by([*keys, ("ts", "ascending")]).combine_chunks()


def fingerprint(table: pa.Table) -> str:
    """SHA-256 over (period, frame_id, category, stream_id, ts) of every row, in order.

    ``frame_id`` is the content hash of the image, so this identifies the memory's content.
    """
    h = hashlib.sha256()
    cols = [table.column(c).to_pylist() for c in ("period", "frame_id", "category", "stream_id")]
    ts = pc.cast(table.column("ts"), pa.int64()).to_pylist()
    for period, fid, category, stream, t in zip(*cols, ts, strict=True):
        cat = "\x00" if category is None else category
        h.update(f"{period}\t{fid}\t{cat}\t{stream}\t{t}\n".encode())
    return h.hexdigest()


def _counts(table: pa.Table) -> tuple[dict[str, int], dict[str, int], int]:
    periods = Counter(table.column("period").to_pylist())
    categories = Counter(table.column("category").to_pylist())
    uncategorised = categories.pop(None, 0)
    return dict(sorted(periods.items())), dict(sorted(categories.items())), uncategorised


def _check_period(period: str) -> str:
    if not isinstance(period, str) or not _PERIOD_RE.match(period):
        raise ReplayError(f"invalid period name {period!r}: use letters, digits, '.', '_', '-'")
    return period


def version_prefix(period: str) -> str:
    """``memory/<period>/``: where one version's parts and manifest live."""
    return f"{MEMORY_PREFIX}/{_check_period(period)}/"


def manifest_key(period: str) -> str:
    return version_prefix(period) + MANIFEST_NAME


def _embeddings(embed_fn: EmbedFn, table: pa.Table) -> np.ndarray:
    emb = np.asarray(embed_fn(table), dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != table.num_rows:
        raise ReplayError(
            f"embed_fn returned shape {emb.shape}, expected ({table.num_rows}, D) for the rows"
        )
    if not np.isfinite(emb).all():
        raise ReplayError("embed_fn returned non-finite embeddings")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ReplayError("embed_fn returned an all-zero embedding (cannot normalise)")
    return emb / norms  # the contract says L2-normalised; renormalising makes it exact


def _scores(score_fn: ScoreFn, table: pa.Table) -> np.ndarray:
    scores = np.asarray(score_fn(table), dtype=np.float64).reshape(-1)
    if scores.shape[0] != table.num_rows:
        raise ReplayError(f"score_fn returned {scores.shape[0]} scores for {table.num_rows} rows")
    if not np.isfinite(scores).all():
        raise ReplayError("score_fn returned non-finite scores")
    return scores


# -- what a selection depends on ---------------------------------------------------------------

POOL_SELECTIONS = ("diverse", "hard")
"""Selections that score a candidate pool with the current model (``embed_fn``/``score_fn``)."""


def selection_config(
    selection: str,
    capacity: int,
    seed: int,
    candidate_pool: int,
    scoring: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a selection depends on besides the frames and the model, as recorded in a
    memory's manifest (``selection_config``): a memory is reused only by a config that gives
    the same dict. ``candidate_pool`` and ``scoring`` (what ``embed_fn``/``score_fn`` depend
    on, e.g. the loss temperature and the augmentation) count only for the selections that
    score a pool (:data:`POOL_SELECTIONS`)."""
    pooled = selection in POOL_SELECTIONS
    return json.loads(
        json.dumps(
            {
                "selection": selection,
                "capacity": capacity,
                "seed": seed,
                "candidate_pool": candidate_pool if pooled else None,
                "scoring": dict(scoring) if pooled and scoring else None,
            },
            sort_keys=True,
        )
    )


# -- the memory --------------------------------------------------------------------------------


class ReplayMemory:
    """One immutable version of the replay memory: a frame table plus its manifest.

    Build the first one with :meth:`empty`, then :meth:`update` once per period (each call
    returns a new memory and leaves this one untouched), :meth:`save` it, and
    :meth:`load` it back in the next period.
    """

    def __init__(self, table: pa.Table, manifest: Mapping[str, Any]) -> None:
        self._table = table
        self._manifest = dict(manifest)

    def __repr__(self) -> str:
        return (
            f"ReplayMemory(period={self.period!r}, rows={len(self)}, capacity={self.capacity}, "
            f"selection={self.selection!r})"
        )

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def empty(cls, capacity: int) -> ReplayMemory:
        """The memory before the first period: no frames, no period."""
        if capacity < 1:
            raise ReplayError(f"capacity must be >= 1, got {capacity}")
        table = FRAME_SCHEMA.empty_table()
        return cls(table, _content_manifest(table, [], capacity, None, 0, 0, None))

    # -- read-only views -------------------------------------------------------------------
    @property
    def table(self) -> pa.Table:
        """The frames (FRAME_SCHEMA, train split), in canonical (period, frame_id) order."""
        return self._table

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest; ``parts`` is present once the version is saved/loaded."""
        return json.loads(json.dumps(self._manifest))

    @property
    def period(self) -> str | None:
        return self._manifest["period"]

    @property
    def parent(self) -> str | None:
        return self._manifest["parent"]

    @property
    def capacity(self) -> int:
        return int(self._manifest["capacity"])

    @property
    def selection(self) -> str | None:
        return self._manifest["selection"]

    @property
    def selection_config(self) -> dict[str, Any] | None:
        """The config that made this memory (:func:`selection_config`); None for an empty
        memory and for a manifest written before the field existed (unknown config)."""
        config = self._manifest.get("selection_config")
        return json.loads(json.dumps(config)) if config is not None else None

    def made_with(self, config: Mapping[str, Any]) -> bool:
        """Whether this memory was selected with ``config`` (a :func:`selection_config`);
        False when its config is unknown, so the caller rebuilds it."""
        recorded = self.selection_config
        return recorded is not None and recorded == json.loads(json.dumps(dict(config)))

    @property
    def seen(self) -> int:
        """How many train frames were offered to this memory over its whole history."""
        return int(self._manifest["seen"])

    @property
    def fingerprint(self) -> str:
        return str(self._manifest["fingerprint"])

    def __len__(self) -> int:
        return self._table.num_rows

    # -- update ------------------------------------------------------------------------------
    def update(
        self,
        new_frames: pa.Table,
        period: str,
        selection: Selection | str,
        capacity: int,
        seed: int,
        embed_fn: EmbedFn | None = None,
        score_fn: ScoreFn | None = None,
        candidate_pool: int = 4096,
        scoring: Mapping[str, Any] | None = None,
        selected_by: str | None = None,
    ) -> ReplayMemory:
        """``select(self ∪ train(new_frames))``: a NEW memory for ``period``; self is unchanged.

        ``new_frames`` is the period's shard (FRAME_SCHEMA); only its ``train`` rows are
        considered and all of them must belong to ``period``. ``embed_fn`` (``diverse``) maps
        a table to L2-normalised ``(rows, D)`` embeddings; ``score_fn`` (``hard``) maps a
        table to per-frame losses ``(rows,)``, higher = harder. Both are called once, on the
        memory plus at most ``candidate_pool`` seeded-random new frames. ``scoring`` (what
        those functions depend on besides the model) goes into the manifest's
        ``selection_config``, and ``selected_by`` (the model's fingerprint) into its
        ``selected_by``, for the selections that score a pool.
        """
        _check_period(period)
        if selection not in SELECTIONS:
            raise ReplayError(f"unknown selection {selection!r}; use one of {list(SELECTIONS)}")
        if capacity < 1:
            raise ReplayError(f"capacity must be >= 1, got {capacity}")
        if candidate_pool < 1:
            raise ReplayError(f"candidate_pool must be >= 1, got {candidate_pool}")
        if seed < 0:
            raise ReplayError(f"seed must be >= 0, got {seed}")
        if period in self._manifest["history"]:
            raise ReplayError(f"memory already contains period {period!r}; update each period once")
        new = _conform(new_frames, f"new frames for period {period}")
        new = new.filter(pc.equal(new.column("split"), TRAIN_SPLIT))
        others = set(new.column("period").unique().to_pylist()) - {period}
        if others:
            raise ReplayError(f"new frames for period {period!r} include periods {sorted(others)}")

        rng = _generator(seed, period)
        num_memory, num_new = len(self), new.num_rows
        pool = pa.concat_tables([self._table, new])
        if selection == "reservoir":
            keep = reservoir_indices(num_memory, self.seen, num_new, capacity, rng)
        elif selection == "balanced":
            periods = pool.column("period").to_pylist()
            keep = balanced_indices(periods, pool.column("category").to_pylist(), capacity, rng)
        else:
            candidates = np.arange(num_new, dtype=np.int64)
            if num_new > candidate_pool:
                candidates = np.sort(rng.choice(num_new, size=candidate_pool, replace=False))
            rows = np.concatenate([np.arange(num_memory, dtype=np.int64), num_memory + candidates])
            scored = pool.take(rows)
            if selection == "diverse":
                if embed_fn is None:
                    raise ReplayError("selection 'diverse' needs embed_fn (frames -> embeddings)")
                if len(rows) <= capacity:
                    keep = rows
                else:
                    keep = rows[k_center_greedy(_embeddings(embed_fn, scored), capacity, rng)]
            else:
                if score_fn is None:
                    raise ReplayError("selection 'hard' needs score_fn (frames -> per-frame loss)")
                chosen = top_score_by_period(
                    scored.column("period").to_pylist(),
                    _scores(score_fn, scored),
                    scored.column("frame_id").to_pylist(),
                    capacity,
                    rng,
                )
                keep = rows[chosen]
        table = _canonical(pool.take(np.sort(keep)))
        pooled = selection in POOL_SELECTIONS
        manifest = _content_manifest(
            table,
            [*self._manifest["history"], period],
            capacity,
            selection,
            seed,
            self.seen + num_new,
            candidate_pool if pooled else None,
        )
        manifest["selection_config"] = selection_config(
            selection, capacity, seed, candidate_pool, scoring
        )
        manifest["selected_by"] = selected_by if pooled else None
        return ReplayMemory(table, manifest)

    # -- sampling for training ---------------------------------------------------------------
    def sample(self, n: int, generator: np.random.Generator) -> pa.Table:
        """``n`` rows drawn uniformly: without replacement when ``n <= len(self)``.

        When ``n`` exceeds the memory, every row appears once (shuffled) and the rest are
        drawn with replacement. An empty memory can only give ``n == 0``.
        """
        if n < 0:
            raise ReplayError(f"cannot sample {n} rows")
        size = len(self)
        if n == 0:
            return self._table.slice(0, 0)
        if size == 0:
            raise ReplayError(f"cannot sample {n} rows from an empty replay memory")
        if n <= size:
            idx = generator.choice(size, size=n, replace=False)
        else:
            extra = generator.integers(0, size, size=n - size)
            idx = np.concatenate([generator.permutation(size), extra])
        return self._table.take(idx)

    # -- persistence -------------------------------------------------------------------------
    def save(
        self,
        store: ObjectStore,
        period: str | None = None,
        rows_per_part: int = 4096,
        *,
        replace: bool = False,
    ) -> dict[str, Any]:
        """Publish this version under ``memory/<period>/``; returns the published manifest.

        Parts first, manifest last. An existing version with the same fingerprint makes this
        a no-op; one with a different fingerprint raises :class:`ReplayError`. With
        ``replace`` (the caller decided the published version is stale, e.g. made with
        another selection config) a version that differs in content or manifest is
        withdrawn first (its manifest deleted, so it is invisible, never half replaced) and
        this one is published in its place.
        """
        if self.period is None:
            raise ReplayError("an empty memory has no period; call update() before save()")
        if period is not None and period != self.period:
            raise ReplayError(f"this memory is for period {self.period!r}, not {period!r}")
        if rows_per_part < 1:
            raise ReplayError(f"rows_per_part must be >= 1, got {rows_per_part}")
        prefix, key = version_prefix(self.period), manifest_key(self.period)
        if store.exists(key):
            published = read_manifest(store, self.period)
            same_content = published["fingerprint"] == self.fingerprint
            if same_content and (not replace or _same_version(published, self._manifest)):
                return published
            if replace:
                store.delete(key)
            else:
                raise ReplayError(
                    f"{store.key_uri(key)} already holds different content (fingerprint "
                    f"{published['fingerprint'][:12]} != {self.fingerprint[:12]}); versions are "
                    "immutable, so rerun with the inputs that made it or save under a new period"
                )
        for leftover in store.list(prefix):  # an interrupted save left invisible parts
            store.delete(leftover)
        parts = []
        for i, start in enumerate(range(0, len(self), rows_per_part)):
            chunk = self._table.slice(start, rows_per_part)
            buf = io.BytesIO()
            pq.write_table(chunk, buf, row_group_size=1024)
            data = buf.getvalue()
            name = f"part-{i:05d}.parquet"
            store.put_bytes(prefix + name, data)
            parts.append(
                {
                    "key": name,
                    "num_rows": chunk.num_rows,
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
        manifest = {**self._manifest, "parts": parts}
        _write_manifest(store, key, manifest)
        return manifest

    @staticmethod
    def exists(store: ObjectStore, period: str) -> bool:
        """Whether a published version for ``period`` exists."""
        return store.exists(manifest_key(period))

    @classmethod
    def load(cls, store: ObjectStore, period: str) -> ReplayMemory:
        """Read and verify one published version (manifest, part keys and hashes, rows)."""
        manifest = read_manifest(store, period)
        prefix = version_prefix(period)
        tables = []
        for part in manifest["parts"]:
            key = prefix + part["key"]
            data = store.get_bytes(key)
            if hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise ReplayError(f"{store.key_uri(key)}: content does not match its manifest hash")
            try:
                table = pq.read_table(io.BytesIO(data))
            except (pa.ArrowException, OSError) as exc:
                raise ReplayError(f"{store.key_uri(key)}: unreadable Parquet ({exc})") from None
            table = _conform(table, store.key_uri(key))
            if table.num_rows != part["num_rows"]:
                raise ReplayError(
                    f"{store.key_uri(key)}: {table.num_rows} rows, manifest says {part['num_rows']}"
                )
            tables.append(table)
        table = pa.concat_tables(tables) if tables else FRAME_SCHEMA.empty_table()
        table = table.combine_chunks()
        where = store.key_uri(manifest_key(period))
        if table.num_rows != manifest["num_rows"]:
            raise ReplayError(
                f"{where}: {table.num_rows} rows, manifest says {manifest['num_rows']}"
            )
        if fingerprint(table) != manifest["fingerprint"]:
            raise ReplayError(f"{where}: frames do not match the manifest fingerprint")
        if set(table.column("split").unique().to_pylist()) - {TRAIN_SPLIT}:
            raise ReplayError(f"{where}: holds non-train frames")
        return cls(table, manifest)


class ReplayBatcher:
    """Draws the replay part of each training batch.

    With ``replay_ratio = r`` a batch of ``B`` holds ``num_replay = min(round(r B), len(memory))``
    memory frames (sampled without replacement, so no frame appears twice in a batch, which
    would make an identical pair a false negative for NT-Xent) and ``num_new = B - num_replay``
    frames of the new shard; ``num_new >= 1`` always.
    """

    def __init__(
        self,
        memory: ReplayMemory,
        batch_size: int,
        replay_ratio: float,
        generator: np.random.Generator,
    ) -> None:
        self.memory = memory
        self.num_new, self.num_replay = replay_split(batch_size, replay_ratio, len(memory))
        self.generator = generator

    def draw(self) -> pa.Table:
        """The replay rows of the next batch (``num_replay`` rows, possibly zero)."""
        return self.memory.sample(self.num_replay, self.generator)

    def __iter__(self) -> Iterator[pa.Table]:
        while True:
            yield self.draw()


def replay_split(batch_size: int, replay_ratio: float, memory_size: int) -> tuple[int, int]:
    """``(num_new, num_replay)`` for one batch; see :class:`ReplayBatcher`."""
    if batch_size < 2:
        raise ReplayError(f"batch_size must be >= 2, got {batch_size}")
    if not 0.0 <= replay_ratio < 1.0:
        raise ReplayError(f"replay_ratio must be in [0, 1), got {replay_ratio}")
    num_replay = min(int(round(batch_size * replay_ratio)), memory_size, batch_size - 1)
    return batch_size - num_replay, num_replay


# -- manifests and versions ---------------------------------------------------------------------


def _content_manifest(
    table: pa.Table,
    history: list[str],
    capacity: int,
    selection: str | None,
    seed: int,
    seen: int,
    candidate_pool: int | None,
) -> dict[str, Any]:
    periods, categories, uncategorised = _counts(table)
    return {
        "schema_version": SCHEMA_VERSION,
        "period": history[-1] if history else None,
        "parent": history[-2] if len(history) > 1 else None,
        "history": history,
        "generation": len(history),
        "capacity": capacity,
        "selection": selection,
        "seed": seed,
        "candidate_pool": candidate_pool,
        "num_rows": table.num_rows,
        "seen": seen,
        "periods": periods,
        "categories": categories,
        "uncategorised": uncategorised,
        "fingerprint": fingerprint(table),
    }


def _same_version(published: Mapping[str, Any], manifest: Mapping[str, Any]) -> bool:
    """Whether a published manifest describes ``manifest``'s version (parts aside)."""
    return {k: v for k, v in published.items() if k != "parts"} == json.loads(
        json.dumps(dict(manifest))
    )


def _write_manifest(store: ObjectStore, key: str, manifest: Mapping[str, Any]) -> None:
    store.put_bytes(key, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def _is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def read_manifest(store: ObjectStore, period: str) -> dict[str, Any]:
    """Read and validate ``memory/<period>/manifest.json``; :class:`ReplayError` if invalid."""
    key = manifest_key(period)
    where = store.key_uri(key)
    try:
        raw = store.get_bytes(key)
    except StoreError as exc:
        raise ReplayError(f"no replay memory for period {period!r} ({exc})") from None
    try:
        m = json.loads(raw)
    except ValueError:
        raise ReplayError(f"{where}: not valid JSON") from None

    def bad(what: str) -> ReplayError:
        return ReplayError(f"{where}: {what}")

    if not isinstance(m, dict):
        raise bad("manifest must be a JSON object")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise bad(f"schema version {m.get('schema_version')!r}, this cssl reads {SCHEMA_VERSION}")
    if m.get("period") != period:
        raise bad(f"manifest is for period {m.get('period')!r}")
    history = m.get("history")
    if not isinstance(history, list) or not history or history[-1] != period:
        raise bad("history must list the periods folded in, ending with this one")
    if m.get("parent") != (history[-2] if len(history) > 1 else None):
        raise bad("parent does not match history")
    if m.get("generation") != len(history):
        raise bad("generation must equal the length of history")
    if m.get("selection") not in SELECTIONS:
        raise bad(f"unknown selection {m.get('selection')!r}")
    for name, minimum in (("capacity", 1), ("num_rows", 0), ("seen", 0)):
        if not _is_int(m.get(name), minimum):
            raise bad(f"{name} must be an integer >= {minimum}")
    if m["num_rows"] > m["capacity"] or m["num_rows"] > m["seen"]:
        raise bad(f"num_rows {m['num_rows']} exceeds capacity or seen")
    if not isinstance(m.get("fingerprint"), str):
        raise bad("fingerprint missing")
    parts = m.get("parts")
    if not isinstance(parts, list):
        raise bad("parts must be a list")
    for part in parts:
        if not isinstance(part, dict) or not isinstance(part.get("key"), str):
            raise bad("each part needs a key")
        if not _PART_RE.match(part["key"]):
            raise bad(f"invalid part key {part['key']!r}")
        validate_key(version_prefix(period) + part["key"])
        if not _is_int(part.get("num_rows"), 1) or not isinstance(part.get("sha256"), str):
            raise bad(f"part {part['key']!r} needs num_rows >= 1 and sha256")
    if sum(p["num_rows"] for p in parts) != m["num_rows"]:
        raise bad("part row counts do not add up to num_rows")
    return m


def list_versions(store: ObjectStore) -> list[str]:
    """Periods with a published memory version, oldest first (by generation, then name)."""
    found = []
    for key in store.list(f"{MEMORY_PREFIX}/"):
        segments = key.split("/")
        if len(segments) != 3 or segments[2] != MANIFEST_NAME or not _PERIOD_RE.match(segments[1]):
            continue
        try:
            m = json.loads(store.get_bytes(key))
            generation = int(m["generation"])
        except (ValueError, KeyError, TypeError):
            raise ReplayError(f"{store.key_uri(key)}: unreadable manifest") from None
        found.append((generation, segments[1]))
    return [period for _, period in sorted(found)]


def latest_period(store: ObjectStore) -> str | None:
    """The newest published version's period, or ``None`` when there is none."""
    versions = list_versions(store)
    return versions[-1] if versions else None
