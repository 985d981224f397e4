"""The shard: one period's frames as Parquet, published atomically with a manifest.

Layout of one shard (``<root>/<period>/``)::

    part-00000.parquet     frames, row groups of ``rows_per_group`` rows (streaming reads)
    part-00001.parquet     ...
    quarantine.parquet     frames rejected by validation, each with its reason (if any)
    manifest.json          written last: row counts, content fingerprint, schema version

A shard is written into a hidden sibling directory and renamed into place only when every
part and the manifest are on disk, so a crash never leaves a half shard under the period's
name. Writing the same frames again is a no-op (the fingerprint matches), so reruns are
idempotent and the bytes on disk stay stable for DVC.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cssl_core.data.images import (
    DecodeLimits,
    ImageRejected,
    decode_image,
    encode_jpeg,
    frame_id,
    is_jpeg,
    resize_shorter_side,
)
from cssl_core.data.storage import atomic_write_json

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.parquet"
SPLITS = ("train", "eval")

FRAME_SCHEMA = pa.schema(
    [
        pa.field("frame_id", pa.string(), nullable=False),
        pa.field("stream_id", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("period", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=True),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ],
    metadata={b"cssl_schema_version": str(SCHEMA_VERSION).encode()},
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("stream_id", pa.string()),
        pa.field("ts", pa.timestamp("ms", tz="UTC")),
        pa.field("category", pa.string()),
        pa.field("source", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
    ]
)


class ShardError(ValueError):
    """A shard is missing, empty, inconsistent or has the wrong schema."""


@dataclass
class Frame:
    """One raw frame on its way into a shard.

    ``split`` is assigned from the content hash when left ``None``; ``width``/``height`` and
    ``frame_id`` are always computed by the writer from the decoded image.
    """

    image: bytes
    stream_id: str
    ts: datetime
    source: str
    category: str | None = None
    split: str | None = None


@dataclass
class ShardStats:
    """What happened to the frames offered to a writer."""

    kept: int = 0
    duplicates: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)

    @property
    def offered(self) -> int:
        return self.kept + self.duplicates + sum(self.quarantined.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "offered": self.offered,
            "kept": self.kept,
            "duplicates": self.duplicates,
            "quarantined": dict(sorted(self.quarantined.items())),
        }


def eval_split_for(fid: str, eval_fraction: float) -> str:
    """Stable split from the content hash: the same frame always lands in the same split."""
    bucket = int(fid[:8], 16) / 0x1_0000_0000
    return "eval" if bucket < eval_fraction else "train"


def check_schema(schema: pa.Schema, where: str) -> None:
    """Raise a one-line :class:`ShardError` naming the first column that does not match."""
    for expected in FRAME_SCHEMA:
        idx = schema.get_field_index(expected.name)
        if idx < 0:
            raise ShardError(f"{where}: missing column {expected.name!r}")
        actual = schema.field(idx).type
        if actual != expected.type:
            raise ShardError(
                f"{where}: column {expected.name!r} has type {actual}, expected {expected.type}"
            )


class ShardWriter:
    """Stream frames into a new shard; ``commit()`` validates nothing further and publishes.

    Every offered frame is decoded (with byte and pixel limits). Rejected frames go to the
    quarantine file with their reason; frames whose content hash was already written are
    dropped and counted. Memory holds one row group (at most ``rows_per_group`` rows or
    ``max_group_bytes`` of encoded images, whichever comes first) plus the seen frame ids.
    """

    def __init__(
        self,
        root: str | Path,
        period: str,
        *,
        eval_fraction: float = 0.2,
        limits: DecodeLimits = DecodeLimits(),
        size: int | None = None,
        jpeg_quality: int = 90,
        rows_per_group: int = 1024,
        rows_per_part: int = 65536,
        max_group_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.root = Path(root)
        self.period = period
        self.final = self.root / period
        self.tmp = self.root / f".{period}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)
        self.eval_fraction = eval_fraction
        self.limits = limits
        self.size = size
        self.jpeg_quality = jpeg_quality
        self.rows_per_group = rows_per_group
        self.rows_per_part = rows_per_part
        self.max_group_bytes = max_group_bytes
        self._buffered_bytes = 0
        self.stats = ShardStats()
        self._seen: set[bytes] = set()
        self._rows: list[dict[str, Any]] = []
        self._quarantine: list[dict[str, Any]] = []
        self._quarantine_writer: pq.ParquetWriter | None = None
        self._part_writer: pq.ParquetWriter | None = None
        self._part_rows = 0
        self._parts: list[dict[str, Any]] = []
        self._fingerprint = hashlib.sha256()
        self._splits: Counter[str] = Counter()
        self._categories: Counter[str] = Counter()
        self._closed = False

    # -- adding frames -------------------------------------------------------------------
    def add(self, frame: Frame) -> str:
        """Offer one frame. Returns ``"kept"``, ``"duplicate"`` or the quarantine reason."""
        try:
            img = decode_image(frame.image, self.limits)
            if frame.split is not None and frame.split not in SPLITS:
                raise ImageRejected("bad_split", f"split {frame.split!r} not in {SPLITS}")
        except ImageRejected as exc:
            self._quarantine_row(frame, exc.reason, exc.detail)
            return exc.reason
        data = frame.image
        if self.size is not None and min(img.size) != self.size:
            img = resize_shorter_side(img, self.size)
            data = encode_jpeg(img, self.jpeg_quality)
        elif not is_jpeg(data):
            data = encode_jpeg(img, self.jpeg_quality)
        fid = frame_id(data)
        key = bytes.fromhex(fid)
        if key in self._seen:
            self.stats.duplicates += 1
            return "duplicate"
        self._seen.add(key)
        split = frame.split or eval_split_for(fid, self.eval_fraction)
        self._rows.append(
            {
                "frame_id": fid,
                "stream_id": frame.stream_id,
                "ts": frame.ts,
                "period": self.period,
                "category": frame.category,
                "split": split,
                "image": data,
                "width": img.size[0],
                "height": img.size[1],
                "source": frame.source,
            }
        )
        self._fingerprint.update(f"{fid}\t{split}\t{frame.category or ''}\n".encode())
        self._splits[split] += 1
        if frame.category is not None:
            self._categories[frame.category] += 1
        self.stats.kept += 1
        self._buffered_bytes += len(data)
        if len(self._rows) >= self.rows_per_group or self._buffered_bytes >= self.max_group_bytes:
            self._flush_rows()
        return "kept"

    def _quarantine_row(self, frame: Frame, reason: str, detail: str) -> None:
        self.stats.quarantined[reason] += 1
        self._quarantine.append(
            {
                "stream_id": frame.stream_id,
                "ts": frame.ts,
                "category": frame.category,
                "source": frame.source,
                "image": frame.image or b"",
                "reason": reason,
                "detail": detail[:500],
            }
        )
        if len(self._quarantine) >= self.rows_per_group:
            self._flush_quarantine()

    def _flush_rows(self) -> None:
        if not self._rows:
            return
        if self._part_writer is None:
            name = f"part-{len(self._parts):05d}.parquet"
            self._part_writer = pq.ParquetWriter(self.tmp / name, FRAME_SCHEMA)
            self._parts.append({"file": name, "num_rows": 0})
        table = pa.Table.from_pylist(self._rows, schema=FRAME_SCHEMA)
        self._part_writer.write_table(table, row_group_size=self.rows_per_group)
        self._parts[-1]["num_rows"] += table.num_rows
        self._part_rows += table.num_rows
        self._rows = []
        self._buffered_bytes = 0
        if self._part_rows >= self.rows_per_part:
            self._part_writer.close()
            self._part_writer = None
            self._part_rows = 0

    def _flush_quarantine(self) -> None:
        if not self._quarantine:
            return
        if self._quarantine_writer is None:
            self._quarantine_writer = pq.ParquetWriter(self.tmp / QUARANTINE, QUARANTINE_SCHEMA)
        self._quarantine_writer.write_table(
            pa.Table.from_pylist(self._quarantine, schema=QUARANTINE_SCHEMA)
        )
        self._quarantine = []

    # -- publishing ----------------------------------------------------------------------
    def commit(self) -> dict[str, Any]:
        """Write the manifest and publish the shard atomically; returns the manifest."""
        if self._closed:
            raise ShardError("shard writer already closed")
        self._flush_rows()
        self._flush_quarantine()
        for writer in (self._part_writer, self._quarantine_writer):
            if writer is not None:
                writer.close()
        self._closed = True
        if self.stats.kept == 0:
            self.abort()
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.stats.quarantined.items()))
            detail = f" (quarantined: {reasons})" if reasons else ""
            raise ShardError(f"shard {self.period}: no valid frames to write{detail}")
        fingerprint = self._fingerprint.hexdigest()
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "period": self.period,
            "num_rows": self.stats.kept,
            "splits": dict(sorted(self._splits.items())),
            "categories": dict(sorted(self._categories.items())),
            "parts": self._parts,
            "fingerprint": fingerprint,
            "duplicates_dropped": self.stats.duplicates,
            "quarantined": dict(sorted(self.stats.quarantined.items())),
            "quarantine_file": QUARANTINE if self.stats.quarantined else None,
        }
        atomic_write_json(self.tmp / MANIFEST, manifest, sort_keys=True)
        _publish_dir(self.tmp, self.final, fingerprint)
        return manifest

    def abort(self) -> None:
        """Discard everything written so far; the published shard (if any) is untouched."""
        self._closed = True
        for writer in (self._part_writer, self._quarantine_writer):
            try:
                if writer is not None:
                    writer.close()
            except Exception:  # noqa: BLE001 - best effort while discarding
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None and not self._closed:
            self.abort()


def _publish_dir(tmp: Path, final: Path, fingerprint: str) -> None:
    """Rename ``tmp`` to ``final``; keep an identical existing shard; swap a different one."""
    existing = final / MANIFEST
    if existing.is_file():
        try:
            same = json.loads(existing.read_text())["fingerprint"] == fingerprint
        except (ValueError, KeyError):
            same = False
        if same:
            shutil.rmtree(tmp)
            return
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@dataclass(frozen=True)
class Shard:
    """A published shard, opened through its manifest."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> Shard:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise ShardError(f"{path}: no such shard directory")
        if not manifest_path.is_file():
            raise ShardError(f"{path}: no {MANIFEST} (not a published shard; run cssl validate)")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError:
            raise ShardError(f"{manifest_path}: not valid JSON") from None
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ShardError(f"{path}: schema version {version}, this cssl reads {SCHEMA_VERSION}")
        for part in manifest["parts"]:
            name = part["file"]
            if "/" in name or name.startswith(".") or not (path / name).is_file():
                raise ShardError(f"{path}: manifest lists missing or invalid part {name!r}")
        return cls(path, manifest)

    @property
    def period(self) -> str:
        return str(self.manifest["period"])

    @property
    def num_rows(self) -> int:
        return int(self.manifest["num_rows"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    def part_paths(self) -> list[Path]:
        return [self.path / p["file"] for p in self.manifest["parts"]]

    def iter_batches(
        self,
        columns: list[str] | None = None,
        split: str | None = None,
        batch_size: int = 1024,
    ) -> Iterator[pa.RecordBatch]:
        """Stream record batches (optionally one split), one row group at a time."""
        read_cols = columns
        if split is not None and columns is not None and "split" not in columns:
            read_cols = [*columns, "split"]
        for part in self.part_paths():
            for batch in pq.ParquetFile(part).iter_batches(batch_size, columns=read_cols):
                if split is not None:
                    batch = batch.filter(pc.equal(batch.column("split"), split))
                    if columns is not None and "split" not in columns:
                        batch = batch.select(columns)
                if batch.num_rows:
                    yield batch

    def read(self, columns: list[str] | None = None, split: str | None = None) -> pa.Table:
        """Read the whole shard (or one split) into memory."""
        batches = list(self.iter_batches(columns, split))
        if not batches:
            schema = (
                FRAME_SCHEMA
                if columns is None
                else pa.schema([FRAME_SCHEMA.field(c) for c in columns])
            )
            return schema.empty_table()
        return pa.Table.from_batches(batches)

    def quarantine(self) -> pa.Table | None:
        name = self.manifest.get("quarantine_file")
        return pq.read_table(self.path / name) if name else None


def list_shards(root: str | Path) -> list[Shard]:
    """Every published shard directly under ``root``, in period-name order."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [
        Shard.open(p)
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
    ]


def utc_from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
