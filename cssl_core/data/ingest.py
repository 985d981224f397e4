"""Ingestion: raw frames (video files, image folders, Parquet) into one period's shard.

Each kind of source is read as a lazy stream of :class:`~cssl_core.data.shard.Frame` objects, and
every frame goes through one :class:`~cssl_core.data.shard.ShardWriter`, which decodes it with the
configured limits, quarantines bad input with its reason, drops exact duplicates, assigns the
eval split from the content hash and publishes atomically. Nothing here holds more than one
frame (video) or one record batch (Parquet) at a time, so memory stays flat with input size.

Video frames are sampled by presentation time at ``fps`` and near-duplicate consecutive frames
are skipped by a 64-bit difference hash (dHash). Work is skipped as early as possible: a frame
that is not sampled is never converted from YUV, and a sampled frame that is a near duplicate
is only ever shrunk to its 9x8 grey thumbnail.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from math import floor
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from av.video.reformatter import VideoReformatter
from PIL import Image

from cssl_core.config import IngestConfig
from cssl_core.data.images import DecodeLimits, encode_jpeg
from cssl_core.data.shard import QUARANTINE, Frame, ShardError, ShardWriter

log = logging.getLogger(__name__)

SourceKind = Literal["video", "images", "image", "parquet"]
Progress = Callable[[str, int], None]
"""Called after every offered frame with the source being read and the frames offered so far."""

VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".ts", ".mts", ".m2ts"}
    | {".mpg", ".mpeg", ".wmv", ".3gp", ".ogv", ".y4m"}
)
IMAGE_SUFFIXES = frozenset(Image.registered_extensions())
# Files that may sit beside the parts of a Parquet dataset (Spark, Hive, cssl manifests).
_PARQUET_SIDECARS = frozenset({"_SUCCESS", "_metadata", "_common_metadata"})
_PARQUET_SIDECAR_SUFFIXES = frozenset({".json", ".crc"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STRING_COLUMNS = ("stream_id", "category", "split", "source")


# -- perceptual hash ------------------------------------------------------------------------
def dhash(thumbnail: np.ndarray) -> int:
    """64-bit difference hash of an 8x9 (rows x columns) grayscale thumbnail.

    dHash (N. Krawetz, "Kind of Like That", hackerfactor.com, 2013): bit ``8*r + c`` is 1 when
    pixel ``(r, c + 1)`` is brighter than its left neighbour ``(r, c)``. It encodes the
    direction of horizontal gradients, so it survives re-encoding, small brightness changes
    and rescaling, while a scene cut flips about half of the bits.
    """
    if thumbnail.shape != (8, 9):
        raise ValueError(f"dhash needs an 8x9 thumbnail, got shape {thumbnail.shape}")
    bits = thumbnail[:, 1:] > thumbnail[:, :-1]
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


def frame_dhash(frame: av.VideoFrame, reformatter: VideoReformatter | None = None) -> int:
    """dHash of a decoded video frame, from a 9x8 grey thumbnail scaled by libswscale.

    Pass one ``reformatter`` for a whole stream to reuse its scaler context between frames.
    """
    scaler = reformatter if reformatter is not None else VideoReformatter()
    thumb = scaler.reformat(frame, width=9, height=8, format="gray", interpolation="AREA")
    return dhash(thumb.to_ndarray())


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Output size with the shorter side ``size`` (same rounding as ``resize_shorter_side``)."""
    scale = size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# -- video ----------------------------------------------------------------------------------
def _parse_creation_time(raw: str | None) -> datetime | None:
    """Container ``creation_time`` as UTC, or None when absent, unparsable or the epoch.

    Muxers write 1970-01-01T00:00:00Z when they had no time to record, so the epoch is read
    as "absent" rather than as a real capture time.
    """
    if not raw:
        return None
    try:
        when = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when
    when = when.astimezone(UTC)
    return None if when == _EPOCH else when


def _mtime_utc(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)


def video_start_time(container: av.container.InputContainer, path: Path) -> datetime:
    """Wall-clock time of the first frame: ``creation_time`` metadata, else the file's mtime."""
    stream = container.streams.video[0]
    for meta in (container.metadata, stream.metadata):
        when = _parse_creation_time(meta.get("creation_time"))
        if when is not None:
            return when
    return _mtime_utc(path)


def iter_video_frames(
    path: str | Path,
    fps: float,
    dedup_max_distance: int | None,
    category: str | None = None,
    jpeg_quality: int = 90,
    size: int | None = None,
    *,
    counts: Counter[str] | None = None,
) -> Iterator[Frame]:
    """Decode a video with PyAV and yield JPEG frames sampled at ``fps``, near duplicates skipped.

    Sampling is by presentation time: the first frame at or after each multiple of ``1/fps``
    (counted from the stream's start) is taken, so a 5.24 s clip sampled at 2 fps gives
    ``floor(5.24 * 2) + 1 = 11`` frames. A sampled frame whose dHash is within
    ``dedup_max_distance`` bits of the last *kept* frame is skipped (``None`` turns this off).
    With ``size`` the frame is scaled by libswscale so its shorter side is ``size`` before it
    becomes RGB. ``ts`` is :func:`video_start_time` plus the frame's offset in the stream.

    ``counts`` (optional) receives ``decoded``, ``sampled``, ``near_duplicate`` and
    ``decode_error`` tallies. A decode error mid-stream ends this video (the frames before it
    are kept, the error is logged and counted); a file PyAV cannot open is a :class:`ShardError`.
    """
    path = Path(path)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    tally: Counter[str] = counts if counts is not None else Counter()
    step = Fraction(fps).limit_denominator(1_000_000) ** -1
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise ShardError(f"{path}: cannot open as a video ({exc})") from None
    with container:
        if not container.streams.video:
            raise ShardError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start_ts = video_start_time(container, path)
        time_base = stream.time_base or Fraction(1, 1000)
        start_pts = stream.start_time
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        thumb_scaler, rgb_scaler = VideoReformatter(), VideoReformatter()
        next_t: Fraction | None = None
        last_hash: int | None = None
        index = -1
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.error.FFmpegError as exc:
                tally["decode_error"] += 1
                log.warning("%s: decoding stopped after %d frames: %s", path, index + 1, exc)
                break
            index += 1
            tally["decoded"] += 1
            if frame.pts is None:
                t = Fraction(index) / Fraction(rate)
            else:
                if start_pts is None:
                    start_pts = frame.pts
                t = (frame.pts - start_pts) * Fraction(time_base)
            if next_t is not None and t < next_t:
                continue
            next_t = (floor(t / step) + 1) * step
            tally["sampled"] += 1
            if dedup_max_distance is not None:
                fingerprint = frame_dhash(frame, thumb_scaler)
                if last_hash is not None and hamming(fingerprint, last_hash) <= dedup_max_distance:
                    tally["near_duplicate"] += 1
                    continue
                last_hash = fingerprint
            width, height = frame.width, frame.height
            if size is not None:
                width, height = shorter_side_size(width, height, size)
            rgb = rgb_scaler.reformat(
                frame, width=width, height=height, format="rgb24", interpolation="AREA"
            ).to_ndarray()
            yield Frame(
                image=encode_jpeg(rgb, jpeg_quality),
                stream_id=path.stem,
                ts=start_ts + timedelta(seconds=float(t)),
                source=str(path),
                category=category,
            )


# -- image folders --------------------------------------------------------------------------
def _read_bounded(path: Path, max_bytes: int | None) -> bytes:
    """Read a file, at most ``max_bytes + 1`` bytes (enough for the writer to reject it)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(-1 if max_bytes is None else max_bytes + 1)
    except OSError as exc:
        raise ShardError(f"{path}: cannot read ({exc.strerror or exc})") from None


def iter_image_folder(
    path: str | Path,
    labels_from_dirs: bool = False,
    *,
    category: str | None = None,
    max_bytes: int | None = None,
) -> Iterator[Frame]:
    """Yield every non-hidden file under ``path`` (recursively, sorted) as a frame.

    Files are not filtered by extension: a non-image reaches the writer and is quarantined
    with its reason instead of vanishing. Hidden files and folders (``.name``) are skipped.
    With ``labels_from_dirs`` the category is the first folder below ``path`` (files directly
    in ``path`` get ``category``). ``stream_id`` is ``path``'s name plus the file's folder,
    ``ts`` the file's mtime (UTC). ``max_bytes`` bounds how much of one file is read.
    """
    root = Path(path)
    if not root.is_dir():
        raise ShardError(f"{root}: not a directory")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        rel_dir = here.relative_to(root)
        stream_id = "/".join((root.name, *rel_dir.parts))
        label = rel_dir.parts[0] if labels_from_dirs and rel_dir.parts else category
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            file = here / name
            if not file.is_file():
                continue
            yield Frame(
                image=_read_bounded(file, max_bytes),
                stream_id=stream_id,
                ts=_mtime_utc(file),
                source=str(file),
                category=label,
            )


def _iter_single_image(path: Path, category: str | None, max_bytes: int | None) -> Iterator[Frame]:
    yield Frame(
        image=_read_bounded(path, max_bytes),
        stream_id=path.parent.name or path.stem,
        ts=_mtime_utc(path),
        source=str(path),
        category=category,
    )


# -- Parquet --------------------------------------------------------------------------------
def parquet_files(path: Path) -> list[Path]:
    """The Parquet files of a file or a directory (recursive, sorted, hidden and the
    quarantine file of a cssl shard left out)."""
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*.parquet")
        if p.is_file()
        and p.name != QUARANTINE
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _image_column(schema: pa.Schema, where: Path) -> str:
    """How to read ``image``: ``"binary"`` or ``"struct"`` (a ``{bytes, path}`` struct as
    Hugging Face datasets write). Anything else is a one-line :class:`ShardError`."""
    idx = schema.get_field_index("image")
    if idx < 0:
        names = ", ".join(schema.names) or "none"
        raise ShardError(
            f"{where}: missing column 'image' (encoded image bytes); columns are: {names}"
        )
    t = schema.field(idx).type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_struct(t):
        sub = t.get_field_index("bytes")
        if sub >= 0 and (pa.types.is_binary(t[sub].type) or pa.types.is_large_binary(t[sub].type)):
            return "struct"
    raise ShardError(f"{where}: column 'image' has type {t}, expected binary (encoded image bytes)")


def _optional_columns(schema: pa.Schema, where: Path) -> list[str]:
    """The optional metadata columns present, each checked for its type."""
    present = []
    for name in _STRING_COLUMNS:
        idx = schema.get_field_index(name)
        if idx >= 0:
            t = schema.field(idx).type
            if not _is_string(t):
                raise ShardError(f"{where}: column {name!r} has type {t}, expected string")
            present.append(name)
    idx = schema.get_field_index("ts")
    if idx >= 0:
        t = schema.field(idx).type
        if not pa.types.is_timestamp(t):
            raise ShardError(f"{where}: column 'ts' has type {t}, expected timestamp")
        present.append("ts")
    return present


def _as_utc(value: datetime | None, default: datetime) -> datetime:
    if value is None:
        return default
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def iter_parquet(
    path: str | Path, *, category: str | None = None, batch_size: int = 256
) -> Iterator[Frame]:
    """Yield the rows of a Parquet file (or a directory of them) as frames, batch by batch.

    The only required column is ``image`` (encoded bytes; binary, large binary, or a struct
    with a ``bytes`` field). ``stream_id``, ``ts``, ``category``, ``split`` and ``source`` are
    used when present; otherwise ``stream_id`` is the file's stem, ``ts`` its mtime, ``source``
    ``<file>#row=<n>`` and ``category`` the given default. A ``split`` other than train/eval is
    quarantined by the writer as ``bad_split``; a null split is assigned from the content hash.
    """
    root = Path(path)
    files = parquet_files(root)
    if not files:
        raise ShardError(f"{root}: no .parquet files")
    for file in files:
        try:
            reader = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as exc:
            raise ShardError(f"{file}: not a readable Parquet file ({exc})") from None
        with reader:
            schema = reader.schema_arrow
            image_kind = _image_column(schema, file)
            optional = _optional_columns(schema, file)
            mtime = _mtime_utc(file)
            row = 0
            for batch in reader.iter_batches(batch_size, columns=["image", *optional]):
                images = batch.column("image")
                if image_kind == "struct":
                    images = pc.struct_field(images, "bytes")
                cols: dict[str, list[Any]] = {
                    name: batch.column(name).to_pylist() for name in optional
                }
                for i, data in enumerate(images.to_pylist()):
                    stream_id = cols["stream_id"][i] if "stream_id" in cols else None
                    source = cols["source"][i] if "source" in cols else None
                    label = cols["category"][i] if "category" in cols else None
                    yield Frame(
                        image=data or b"",
                        stream_id=stream_id if stream_id is not None else file.stem,
                        ts=_as_utc(cols["ts"][i] if "ts" in cols else None, mtime),
                        source=source if source is not None else f"{file}#row={row + i}",
                        category=label if label is not None else category,
                        split=cols["split"][i] if "split" in cols else None,
                    )
                row += batch.num_rows


# -- dispatch -------------------------------------------------------------------------------
def _is_parquet_dir(path: Path) -> bool:
    """A directory is a Parquet dataset when it holds ``.parquet`` files and nothing else
    but sidecars (manifests, ``_SUCCESS``, checksums); otherwise it is an image folder."""
    found = False
    for _dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            suffix = Path(name).suffix.lower()
            if suffix == ".parquet":
                found = True
            elif name not in _PARQUET_SIDECARS and suffix not in _PARQUET_SIDECAR_SUFFIXES:
                return False
    return found


_IMAGE_DEMUXER = re.compile(r"(^|,)(image2|[a-z0-9]+_pipe)(,|$)")


def _probe_video(path: Path) -> bool:
    """True when PyAV opens ``path`` as a container with a video stream (not a still image)."""
    try:
        with av.open(str(path)) as container:
            return bool(container.streams.video) and not _IMAGE_DEMUXER.search(
                container.format.name
            )
    except (av.error.FFmpegError, OSError):
        return False


def source_kind(source: str | Path) -> SourceKind:
    """What a source is: ``video``, ``images`` (a folder), ``image`` (one file) or ``parquet``.

    A missing source is a :class:`ShardError`. Files are told apart by extension, and a file
    with an unknown extension by probing it with PyAV; whatever is neither video nor Parquet
    is offered to the writer as an image (and quarantined there if it is not one).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise ShardError(f"source {str(source)!r} does not exist")
    if path.is_dir():
        return "parquet" if _is_parquet_dir(path) else "images"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    return "video" if _probe_video(path) else "image"


@dataclass
class SourceSummary:
    """What one source contributed: frames offered to the writer, and what was skipped before."""

    source: str
    kind: SourceKind
    offered: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    """Video tallies before the writer: decoded, sampled, near_duplicate, decode_error."""


@dataclass
class IngestReport:
    """The outcome of :func:`ingest`: the published shard, its manifest and the writer stats."""

    path: Path
    manifest: dict[str, Any]
    stats: dict[str, Any]
    sources: list[SourceSummary] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "manifest": self.manifest,
            "stats": self.stats,
            "sources": [vars(s) for s in self.sources],
        }

    def summary_lines(self) -> list[str]:
        m, s = self.manifest, self.stats
        splits = ", ".join(f"{k} {v}" for k, v in m["splits"].items())
        lines = [
            f"shard {m['period']} at {self.path}: {m['num_rows']} frames ({splits}), "
            f"fingerprint {m['fingerprint'][:12]}",
            f"offered {s['offered']}: kept {s['kept']}, duplicates dropped {s['duplicates']}, "
            f"quarantined {sum(s['quarantined'].values())}",
        ]
        for reason, n in s["quarantined"].items():
            lines.append(f"  quarantined {reason}: {n}")
        if m["categories"]:
            cats = ", ".join(f"{k} {v}" for k, v in m["categories"].items())
            lines.append(f"categories: {cats}")
        for src in self.sources:
            extra = "".join(f", {k} {v}" for k, v in src.counts.items())
            lines.append(f"  {src.kind} {src.source}: offered {src.offered}{extra}")
        return lines


def _frames_for(
    source: str,
    kind: SourceKind,
    cfg: IngestConfig,
    labels_from_dirs: bool,
    category: str | None,
    counts: Counter[str],
) -> Iterator[Frame]:
    path = Path(source).expanduser()
    if kind == "video":
        return iter_video_frames(
            path,
            cfg.fps,
            cfg.dedup_max_distance,
            category=category,
            jpeg_quality=cfg.jpeg_quality,
            size=cfg.size,
            counts=counts,
        )
    if kind == "images":
        return iter_image_folder(
            path, labels_from_dirs, category=category, max_bytes=cfg.max_image_bytes
        )
    if kind == "image":
        return _iter_single_image(path, category, cfg.max_image_bytes)
    return iter_parquet(path, category=category, batch_size=min(256, cfg.rows_per_group))


def ingest(
    sources: Iterable[str | Path],
    period: str,
    out: str | Path,
    cfg: IngestConfig,
    *,
    labels_from_dirs: bool = False,
    category: str | None = None,
    progress: Progress | None = None,
) -> IngestReport:
    """Read every source into one shard published at ``out/period``.

    ``out`` is the shards root (``<store>/shards``). Sources may mix kinds (see
    :func:`source_kind`); all are checked to exist before anything is written. ``category``
    labels every frame that gets no label from its folder (``labels_from_dirs``) or its
    Parquet ``category`` column. The eval split is ``cfg.eval_fraction`` of frames, chosen by
    content hash, so reruns put the same frames in eval. On any error the writer is aborted
    and the previously published shard (if any) stays as it was.
    """
    names = [str(s) for s in sources]
    if not names:
        raise ShardError("ingest needs at least one source")
    kinds = [source_kind(s) for s in names]
    summaries = [SourceSummary(s, k) for s, k in zip(names, kinds, strict=True)]
    writer = ShardWriter(
        out,
        period,
        eval_fraction=cfg.eval_fraction,
        limits=DecodeLimits(cfg.max_image_bytes, cfg.max_image_pixels),
        size=cfg.size,
        jpeg_quality=cfg.jpeg_quality,
        rows_per_group=cfg.rows_per_group,
        rows_per_part=cfg.rows_per_part,
        max_group_bytes=cfg.max_group_bytes,
    )
    offered = 0
    with writer:
        for summary in summaries:
            counts: Counter[str] = Counter()
            for frame in _frames_for(
                summary.source, summary.kind, cfg, labels_from_dirs, category, counts
            ):
                writer.add(frame)
                summary.offered += 1
                offered += 1
                if progress is not None:
                    progress(summary.source, offered)
            summary.counts = dict(counts)
        manifest = writer.commit()
    return IngestReport(Path(out) / period, manifest, writer.stats.as_dict(), summaries)
