"""Period datasets for the continual benchmark, each written as one :class:`Shard` per period.

Every builder publishes its periods through :class:`~cssl_core.data.shard.ShardWriter` (or
:func:`~cssl_core.data.ingest.ingest`, which uses it), so the benchmark reads exactly the shards
the product reads. Builders are deterministic: the same arguments give the same frames, the
same splits and the same shard fingerprints (rebuilding an existing shard is a no-op).

* ``cifar10`` -- split CIFAR-10, *class-incremental* (van de Ven et al. 2022, "Three types
  of incremental learning"): 5 periods of 2 classes in label order (airplane+automobile,
  bird+cat, ...). Train frames come from the ``train`` split, eval frames from ``test``.
* ``cifar10-drift`` -- *data-incremental* CIFAR-10: every period holds every class, but the
  class mix drifts as a window slides around the classes (:func:`drift_mixes`). Each class's
  train (and test) images are dealt out to the periods in proportion to the class's weight
  in each period, so no image appears in two periods.
* ``stream`` -- the simulated Atari stream of :mod:`cssl_core.data.simulate`.
* ``folder:PATH`` -- a user's own data: ``PATH/<period>/<category>/<image>``, read with
  :func:`~cssl_core.data.ingest.ingest` (eval split from the content hash).

CIFAR-10 (Krizhevsky 2009) is read as JPEGs in one Parquet file (columns ``image``,
``label``, ``label_name``, ``split``, ``source_path``), found by :func:`ensure_cifar10` in this
order: ``$CSSL_CIFAR10`` when set (a Parquet file, or a torchvision ``cifar-10-batches-py``
folder); ``../shared/data/cifar10-jpeg.parquet`` beside the repository; the per-user cache
``$XDG_CACHE_HOME/cssl/cifar10-jpeg.parquet`` (``~/.cache/cssl/``), which is made once by
downloading CIFAR-10 with torchvision and converting it (:func:`write_cifar10_parquet`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cssl_core.config import PERIOD_NAME, IngestConfig, SimulateConfig
from cssl_core.data.images import encode_jpeg
from cssl_core.data.shard import Frame, Shard, ShardError, ShardWriter
from cssl_core.data.storage import atomic_path

DatasetKind = Literal["stream", "cifar10", "cifar10-drift", "folder"]
KINDS: tuple[str, ...] = ("stream", "cifar10", "cifar10-drift", "folder:PATH")
CIFAR10_ENV = "CSSL_CIFAR10"
CIFAR10_FILE = "cifar10-jpeg.parquet"
CIFAR10_BATCHES = "cifar-10-batches-py"
CIFAR10_JPEG_QUALITY = 75
"""JPEG quality of frames made from CIFAR-10's pixels (the shared export's quality)."""
CIFAR10_ROWS_PER_GROUP = 10_000
CIFAR10_CLASSES_PER_PERIOD = 2
CIFAR10_PERIODS = 5
DEFAULT_STREAM_PERIODS = 5
DRIFT_WIDTH = 1.5
"""Standard deviation (in classes, on the class circle) of the drifting class-mix window."""
DRIFT_FLOOR = 0.05
"""Weight every class keeps outside the window, relative to the window's peak of 1."""
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
PERIOD_LENGTH = timedelta(days=30)


class DatasetError(ValueError):
    """A dataset name, source or option is invalid (the message says what to change)."""


# -- the --dataset argument --------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``--dataset`` value: the kind and, for ``folder:PATH``, the folder."""

    kind: DatasetKind
    path: Path | None = None

    @property
    def label(self) -> str:
        return f"folder:{self.path}" if self.kind == "folder" else self.kind

    @property
    def slug(self) -> str:
        """A directory name for this dataset's shards."""
        return f"folder-{self.path.name}" if self.kind == "folder" and self.path else self.kind


def parse_dataset(value: str) -> DatasetSpec:
    """``stream`` | ``cifar10`` | ``cifar10-drift`` | ``folder:PATH`` -> :class:`DatasetSpec`."""
    if value in ("stream", "cifar10", "cifar10-drift"):
        return DatasetSpec(value)  # type: ignore[arg-type]
    if value.startswith("folder:") and len(value) > len("folder:"):
        return DatasetSpec("folder", Path(value[len("folder:") :]).expanduser())
    raise DatasetError(f"unknown dataset {value!r}; use one of {', '.join(KINDS)}")


# -- pure planning (indices in, indices out) ---------------------------------------------


def period_names(count: int) -> list[str]:
    """``p01``, ``p02``, ... (zero-padded so name order is stream order)."""
    width = max(2, len(str(count)))
    return [f"p{k:0{width}d}" for k in range(1, count + 1)]


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``weights`` (Hamilton's method).

    Each entry gets ``floor(total * w_k / sum(w))``; the slots left go to the largest
    fractional parts (ties to the lower index), so the rounding is exact and deterministic.
    """
    w = np.asarray(weights, dtype=np.float64)
    if total < 0 or w.ndim != 1 or w.size == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError("largest_remainder needs non-negative weights with a positive sum")
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    left = total - int(counts.sum())
    order = np.lexsort((np.arange(w.size), -(exact - counts)))
    counts[order[:left]] += 1
    return counts


def class_incremental_plan(num_classes: int, per_period: int) -> list[list[int]]:
    """Class codes of each period: ``[[0, 1], [2, 3], ...]`` (label order, disjoint)."""
    if per_period < 1 or num_classes % per_period:
        raise ValueError(f"{num_classes} classes do not split into groups of {per_period}")
    return [list(range(s, s + per_period)) for s in range(0, num_classes, per_period)]


def drift_mixes(
    num_periods: int, num_classes: int, width: float = DRIFT_WIDTH, floor: float = DRIFT_FLOOR
) -> np.ndarray:
    r"""Class mix of each period, ``(T, C)``, rows summing to 1: a window sliding round the classes.

    Classes sit on a circle; period ``t``'s window is centred at ``mu_t = t * C / T`` and

    .. math:: w_{t,c} \propto \mathrm{floor} + \exp\!\left(-\frac{d(c, \mu_t)^2}{2\,\sigma^2}\right)

    with ``d`` the circular distance and ``sigma = width``. Every class keeps at least the
    floor weight, so each period holds every class (data-incremental), while the dominant
    classes change from period to period.
    """
    if num_periods < 1 or num_classes < 1 or width <= 0 or floor < 0:
        raise ValueError("drift_mixes needs num_periods, num_classes, width > 0 and floor >= 0")
    classes = np.arange(num_classes, dtype=np.float64)
    centres = np.arange(num_periods, dtype=np.float64) * num_classes / num_periods
    diff = np.abs(classes[None, :] - centres[:, None]) % num_classes
    dist = np.minimum(diff, num_classes - diff)
    w = floor + np.exp(-(dist**2) / (2 * width**2))
    return w / w.sum(axis=1, keepdims=True)


def deal_by_mix(
    labels: np.ndarray, mixes: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Deal the rows of each class out to the periods, in proportion to its mix weight.

    Class ``c``'s rows are shuffled, then cut into consecutive pieces of sizes
    ``largest_remainder(mixes[:, c], n_c)``: every row goes to exactly one period. Returns
    each period's row indices, sorted.
    """
    periods: list[list[np.ndarray]] = [[] for _ in range(mixes.shape[0])]
    for c in range(mixes.shape[1]):
        rows = rng.permutation(np.flatnonzero(labels == c))
        sizes = largest_remainder(mixes[:, c], len(rows))
        for t, piece in enumerate(np.split(rows, np.cumsum(sizes)[:-1])):
            periods[t].append(piece)
    return [np.sort(np.concatenate(p)) for p in periods]


def stratified_cap(
    indices: np.ndarray, labels: np.ndarray, cap: int | None, rng: np.random.Generator
) -> np.ndarray:
    """At most ``cap`` of ``indices``, keeping each class's share (largest remainder), sorted.

    Within a class the kept rows are a uniform sample without replacement. ``cap=None`` or a
    cap at least ``len(indices)`` keeps everything.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if cap is None or cap >= len(indices):
        return np.sort(indices)
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    classes, counts = np.unique(labels[indices], return_counts=True)
    quotas = largest_remainder(counts.astype(np.float64), cap)
    kept = [
        rng.choice(indices[labels[indices] == c], size=int(q), replace=False)
        for c, q in zip(classes, quotas, strict=True)
    ]
    return np.sort(np.concatenate(kept))


# -- CIFAR-10 ----------------------------------------------------------------------------


def shared_cifar10_path() -> Path:
    """``../shared/data/cifar10-jpeg.parquet`` beside the repository (the team's copy)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / CIFAR10_FILE


def cifar10_cache_path() -> Path:
    """``$XDG_CACHE_HOME/cssl/cifar10-jpeg.parquet`` (``~/.cache/cssl/...`` by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "cssl" / CIFAR10_FILE


def default_cifar10_source() -> Path:
    """Where CIFAR-10 is read from: ``$CSSL_CIFAR10`` when set; else the shared copy beside
    the repository when it exists; else the per-user cache (which :func:`ensure_cifar10`
    fills). Finds, never downloads."""
    env = os.environ.get(CIFAR10_ENV)
    if env:
        return Path(env).expanduser()
    shared = shared_cifar10_path()
    return shared if shared.is_file() else cifar10_cache_path()


def ensure_cifar10() -> Path:
    """:func:`default_cifar10_source`, downloaded into the per-user cache first if it is not
    there yet (CIFAR-10 with torchvision, converted by :func:`write_cifar10_parquet`; about
    170 MB fetched once, a 20 MB file kept). One clear line when that is impossible."""
    path = default_cifar10_source()
    if path.exists():
        return path
    if os.environ.get(CIFAR10_ENV):
        raise DatasetError(
            f"${CIFAR10_ENV} is {path}, which does not exist: point it at a {CIFAR10_FILE} "
            f"or a torchvision folder holding {CIFAR10_BATCHES}, or unset it to use "
            f"{shared_cifar10_path()} or the download cache {cifar10_cache_path()}"
        )
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):  # one download when sessions race
        if path.is_file():
            return path
        download = path.parent / "cifar10-download"
        try:
            data = download_cifar10(download)
        except (OSError, RuntimeError) as exc:
            cause = str(exc).splitlines()[0] if str(exc) else ""
            raise DatasetError(
                f"CIFAR-10 is not at ${CIFAR10_ENV}, {shared_cifar10_path()} or {path}, and "
                f"downloading it failed ({exc.__class__.__name__}: {cause}): set {CIFAR10_ENV} "
                f"to a {CIFAR10_FILE}, or run once with network access"
            ) from None
        write_cifar10_parquet(data, path)
        shutil.rmtree(download, ignore_errors=True)
    return path


def download_cifar10(root: Path) -> Cifar10:
    """CIFAR-10 fetched by torchvision into ``root`` (``root/cifar-10-batches-py``)."""
    from torchvision.datasets import CIFAR10

    for train in (True, False):
        CIFAR10(str(root), train=train, download=True)
    return _cifar10_from_torchvision(root)


def write_cifar10_parquet(data: Cifar10, path: Path) -> Path:
    """Write CIFAR-10 as the JPEG Parquet the benchmarks and tests read, atomically.

    Rows: the ``train`` split then ``test``, each by class, then in the dataset's order;
    ``source_path`` is ``<split>/<class>/<k>.jpg`` (``k``: the row's index within its split
    and class); ``image`` the frame's JPEG bytes (:data:`CIFAR10_JPEG_QUALITY` when made
    from pixels); ``label`` the class code (int16).
    """
    images: list[bytes] = []
    labels: list[int] = []
    splits: list[str] = []
    sources: list[str] = []
    for split in ("train", "test"):
        codes = data.labels[split]
        for code in range(len(data.classes)):
            for k, i in enumerate(np.flatnonzero(codes == code).tolist()):
                images.append(data.image(split, i))
                labels.append(code)
                splits.append(split)
                sources.append(f"{split}/{data.classes[code]}/{k:04d}.jpg")
    table = pa.table(
        {
            "image": pa.array(images, pa.binary()),
            "label": pa.array(labels, pa.int16()),
            "label_name": pa.array([data.classes[c] for c in labels], pa.string()),
            "split": pa.array(splits, pa.string()),
            "source_path": pa.array(sources, pa.string()),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=CIFAR10_ROWS_PER_GROUP)
    return path


@dataclass
class Cifar10:
    """CIFAR-10 held in memory: labels per split and a way to get any row's JPEG bytes."""

    classes: list[str]
    labels: dict[str, np.ndarray]
    """``{"train": (50000,), "test": (10000,)}`` class codes."""
    _image: Callable[[str, int], bytes]
    sources: dict[str, list[str]] = field(default_factory=dict)

    def image(self, split: str, index: int) -> bytes:
        return self._image(split, index)

    def source(self, split: str, index: int) -> str:
        names = self.sources.get(split)
        return f"cifar10:{names[index]}" if names else f"cifar10:{split}/{index:05d}"


def load_cifar10(source: str | Path | None = None) -> Cifar10:
    """Read CIFAR-10 from the JPEG Parquet export or a torchvision ``cifar-10-batches-py`` folder.

    A folder may be the ``cifar-10-batches-py`` folder itself or its parent (torchvision's
    ``root``). Without ``source``, :func:`ensure_cifar10` finds (or downloads) it; a given
    ``source`` that is missing is an error naming the fix.
    """
    path = Path(source).expanduser() if source is not None else ensure_cifar10()
    if path.is_file() and path.suffix == ".parquet":
        return _cifar10_from_parquet(path)
    if path.is_dir():
        root = path.parent if path.name == CIFAR10_BATCHES else path
        if (root / CIFAR10_BATCHES).is_dir():
            return _cifar10_from_torchvision(root)
    raise DatasetError(
        f"CIFAR-10 not found at {path}: point ${CIFAR10_ENV} at cifar10-jpeg.parquet or at a "
        f"torchvision folder holding {CIFAR10_BATCHES} (nothing is downloaded)"
    )


def _cifar10_from_parquet(path: Path) -> Cifar10:
    table = pq.read_table(path, columns=["image", "label", "label_name", "split", "source_path"])
    labels = np.asarray(table.column("label").to_numpy(), dtype=np.int64)
    names = table.column("label_name").to_pylist()
    split = np.asarray(table.column("split").to_pylist())
    classes = [""] * (int(labels.max()) + 1)
    for code, name in zip(labels.tolist(), names, strict=True):
        classes[code] = name
    images = table.column("image")
    sources = table.column("source_path").to_pylist()
    rows = {s: np.flatnonzero(split == s) for s in ("train", "test")}
    if not len(rows["train"]) or not len(rows["test"]):
        raise DatasetError(f"{path}: expected rows with split 'train' and 'test'")
    return Cifar10(
        classes=classes,
        labels={s: labels[r] for s, r in rows.items()},
        _image=lambda s, i: images[int(rows[s][i])].as_py(),
        sources={s: [sources[int(k)] for k in r] for s, r in rows.items()},
    )


def _cifar10_from_torchvision(root: Path) -> Cifar10:
    from torchvision.datasets import CIFAR10

    sets = {
        "train": CIFAR10(str(root), train=True, download=False),
        "test": CIFAR10(str(root), train=False, download=False),
    }
    return Cifar10(
        classes=list(sets["train"].classes),
        labels={s: np.asarray(d.targets, dtype=np.int64) for s, d in sets.items()},
        _image=lambda s, i: encode_jpeg(np.asarray(sets[s].data[i]), CIFAR10_JPEG_QUALITY),
    )


# -- writing shards ----------------------------------------------------------------------


@dataclass(frozen=True)
class BenchDataset:
    """A benchmark dataset: its shards in stream order and how they were made."""

    spec: DatasetSpec
    shards: list[Shard]
    description: dict[str, Any]

    @property
    def periods(self) -> list[str]:
        return [s.period for s in self.shards]


def _write_cifar_period(
    root: Path, period: str, index: int, data: Cifar10, rows: dict[str, np.ndarray]
) -> Shard:
    """One period's shard. Every image is its own ``stream_id`` (``cifar10/<split>/<index>``):
    CIFAR-10's images are independent, so each is a unit of the bootstrap (one shared stream
    id made every period one cluster, and every interval undefined)."""
    start = EPOCH + index * PERIOD_LENGTH
    with ShardWriter(root, period, eval_fraction=0.0) as writer:
        k = 0
        for split, shard_split in (("train", "train"), ("test", "eval")):
            for i in rows[split].tolist():
                writer.add(
                    Frame(
                        image=data.image(split, i),
                        stream_id=f"cifar10/{split}/{i}",
                        ts=start + timedelta(seconds=k),
                        source=data.source(split, i),
                        category=data.classes[int(data.labels[split][i])],
                        split=shard_split,
                    )
                )
                k += 1
        writer.commit()
    return Shard.open(root / period)


def build_cifar10(
    root: str | Path,
    *,
    source: str | Path | None = None,
    drift: bool = False,
    num_periods: int | None = None,
    period_order: Sequence[str] | None = None,
    train_cap: int | None = None,
    eval_cap: int | None = None,
    seed: int = 0,
) -> BenchDataset:
    """Split CIFAR-10 into period shards under ``root`` (class-incremental, or drifting mix).

    Periods are named ``p01..p05``. Class-incremental (``drift=False``): period ``k`` holds
    classes ``2k-2`` and ``2k-1`` (all their train rows, and their test rows as the eval
    split). Drift (``drift=True``): :func:`drift_mixes` over 5 periods, rows dealt out with
    :func:`deal_by_mix`. ``train_cap``/``eval_cap`` keep at most that many frames per period
    (stratified by class, :func:`stratified_cap`). ``period_order`` reorders or selects
    periods by name; ``num_periods`` then keeps the first N. ``seed`` fixes every draw.
    """
    data = load_cifar10(source)
    n_classes = len(data.classes)
    rng = np.random.default_rng(seed)
    if drift:
        mixes = drift_mixes(CIFAR10_PERIODS, n_classes)
        dealt = {s: deal_by_mix(data.labels[s], mixes, rng) for s in ("train", "test")}
        plan = [{s: dealt[s][t] for s in dealt} for t in range(CIFAR10_PERIODS)]
        about: dict[str, Any] = {"protocol": "data-incremental (drifting class mix)"}
        about["class_mix"] = {
            name: dict(zip(data.classes, row.round(4).tolist(), strict=True))
            for name, row in zip(period_names(CIFAR10_PERIODS), mixes, strict=True)
        }
    else:
        groups = class_incremental_plan(n_classes, CIFAR10_CLASSES_PER_PERIOD)
        plan = [
            {s: np.flatnonzero(np.isin(data.labels[s], g)) for s in ("train", "test")}
            for g in groups
        ]
        about = {
            "protocol": "class-incremental",
            "classes": {
                name: [data.classes[c] for c in g]
                for name, g in zip(period_names(len(groups)), groups, strict=True)
            },
        }
    names = period_names(len(plan))
    chosen = select_periods(names, period_order, num_periods)
    root = Path(root)
    shards = []
    for name in chosen:
        t = names.index(name)
        rows = {
            "train": stratified_cap(
                plan[t]["train"], data.labels["train"], train_cap, rng_for(seed, t, 0)
            ),
            "test": stratified_cap(
                plan[t]["test"], data.labels["test"], eval_cap, rng_for(seed, t, 1)
            ),
        }
        shards.append(_write_cifar_period(root, name, t, data, rows))
    about.update(
        train_cap=train_cap,
        eval_cap=eval_cap,
        seed=seed,
        source=str(Path(source).expanduser() if source is not None else default_cifar10_source()),
    )
    return BenchDataset(DatasetSpec("cifar10-drift" if drift else "cifar10"), shards, about)


def rng_for(seed: int, period_index: int, stream: int) -> np.random.Generator:
    """A generator for one (seed, period, purpose): caps do not depend on other periods."""
    return np.random.default_rng([seed, period_index, stream])


def select_periods(
    available: Sequence[str], order: Sequence[str] | None, count: int | None
) -> list[str]:
    """Periods to run: ``order`` (names, each at most once) or ``available``, then the first N."""
    names = list(available)
    if order:
        unknown = [p for p in order if p not in names]
        if unknown:
            raise DatasetError(
                f"--period-order names unknown periods {unknown}; available: {', '.join(names)}"
            )
        if len(set(order)) != len(order):
            raise DatasetError(f"--period-order repeats a period: {list(order)}")
        names = list(order)
    if count is not None:
        if not 1 <= count <= len(names):
            raise DatasetError(f"--periods {count}: this dataset has {len(names)} periods")
        names = names[:count]
    return names


# -- the simulated stream ----------------------------------------------------------------


def build_stream(
    root: str | Path,
    cfg: SimulateConfig,
    *,
    num_periods: int | None = None,
    period_order: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> BenchDataset:
    """Simulate ``num_periods`` (default 5) periods of the Atari stream as shards ``p01..``.

    Period ``pK`` is always the K-th period of a ``num_periods``-long simulated stream (its
    games follow :func:`~cssl_core.data.simulate.game_schedule`); ``period_order`` reorders or
    selects among them, and only the chosen periods are simulated. A period is reused when
    ``root/.<period>.simulate.json`` records the same simulator settings, index and stream
    length (simulating is the costly part of a rerun); delete ``root`` after changing the
    simulator's code.
    """
    from cssl_core.data.simulate import simulate_period
    from cssl_core.data.storage import atomic_write_json

    total = num_periods or DEFAULT_STREAM_PERIODS
    names = period_names(total)
    chosen = select_periods(names, period_order, None)
    root = Path(root)
    shards = []
    for name in chosen:
        stamp = root / f".{name}.simulate.json"
        wanted = {"simulate": cfg.model_dump(mode="json"), "index": names.index(name)}
        wanted["periods"] = total
        if not (stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == wanted):
            stamp.unlink(missing_ok=True)
            simulate_period(root, name, names.index(name), total, cfg, progress=progress)
            atomic_write_json(stamp, wanted)
        shards.append(Shard.open(root / name))
    about = {"protocol": "simulated stream (drifting game mix)", "simulate": cfg.model_dump()}
    return BenchDataset(DatasetSpec("stream"), shards, about)


# -- a user's folder ---------------------------------------------------------------------


def folder_periods(path: Path) -> list[str]:
    """The period folders directly under ``path`` (non-hidden), sorted by name."""
    if not path.is_dir():
        raise DatasetError(f"folder:{path}: not a directory (expected PATH/<period>/<category>/)")
    names = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DatasetError(f"folder:{path}: no period folders (expected PATH/<period>/<category>/)")
    bad = [n for n in names if not _is_period_name(n)]
    if bad:
        raise DatasetError(
            f"folder:{path}: period folder names {bad} must match {PERIOD_NAME} (rename them)"
        )
    return names


def _is_period_name(name: str) -> bool:
    return re.match(PERIOD_NAME, name) is not None


def build_folder(
    root: str | Path,
    path: str | Path,
    cfg: IngestConfig,
    *,
    num_periods: int | None = None,
    period_order: Sequence[str] | None = None,
) -> BenchDataset:
    """Ingest ``path/<period>/<category>/<image>`` as one shard per period.

    Periods are the sorted folder names, or ``period_order``; ``num_periods`` keeps the first
    N. Categories come from the folder below the period; the eval split is
    ``cfg.eval_fraction`` of frames chosen by content hash (the product's ingest path).
    """
    from cssl_core.data.ingest import ingest

    path = Path(path).expanduser()
    chosen = select_periods(folder_periods(path), period_order, num_periods)
    root = Path(root)
    shards, reports = [], {}
    for name in chosen:
        report = ingest([path / name], name, root, cfg, labels_from_dirs=True)
        reports[name] = report.stats
        shard = Shard.open(root / name)
        if not shard.manifest.get("categories"):
            raise DatasetError(f"folder:{path}/{name}: no category folders with images")
        shards.append(shard)
    about = {"protocol": "user folders", "path": str(path), "ingest": reports}
    return BenchDataset(DatasetSpec("folder", path), shards, about)


# -- one entry point ---------------------------------------------------------------------


def build_dataset(
    spec: DatasetSpec,
    root: str | Path,
    *,
    simulate: SimulateConfig,
    ingest_cfg: IngestConfig,
    num_periods: int | None = None,
    period_order: Sequence[str] | None = None,
    train_cap: int | None = None,
    eval_cap: int | None = None,
    seed: int = 0,
) -> BenchDataset:
    """Build (or rebuild, idempotently) the shards of ``spec`` under ``root/<slug>/``."""
    where = Path(root) / spec.slug
    if spec.kind in ("cifar10", "cifar10-drift"):
        return build_cifar10(
            where,
            drift=spec.kind == "cifar10-drift",
            num_periods=num_periods,
            period_order=period_order,
            train_cap=train_cap,
            eval_cap=eval_cap,
            seed=seed,
        )
    if spec.kind == "stream":
        return build_stream(where, simulate, num_periods=num_periods, period_order=period_order)
    if spec.path is None:
        raise DatasetError("folder dataset needs a path: --dataset folder:PATH")
    try:
        return build_folder(
            where, spec.path, ingest_cfg, num_periods=num_periods, period_order=period_order
        )
    except ShardError as exc:
        raise DatasetError(str(exc)) from None
