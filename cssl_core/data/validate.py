"""Validation of a shard: decode every image, check the manifest, repair in place if asked.

A published shard is *clean* when every row decodes within the configured limits, no frame id
repeats, every split is ``train`` or ``eval``, each row's ``frame_id`` is the hash of its
image and its ``width``/``height`` the decoded size, and the manifest agrees with the rows
(rows per part, totals per split and category, and the fingerprint recomputed from the rows).

Anything else (a Parquet directory without a manifest, bad rows, a stale manifest) is
rewritten through :class:`~cssl_core.data.shard.ShardWriter` when ``repair=True``: rows are streamed
from the old directory into a hidden sibling, bad rows go to the quarantine file with their
reason, duplicates are dropped and counted, valid rows keep their split, category, ts,
stream_id and source, and the new directory replaces the old one only once it is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cssl_core.config import IngestConfig
from cssl_core.data.images import DecodeLimits, ImageRejected, decode_image, frame_id
from cssl_core.data.shard import (
    MANIFEST,
    QUARANTINE,
    SPLITS,
    Frame,
    Shard,
    ShardError,
    ShardWriter,
    check_schema,
)
from cssl_core.data.storage import atomic_write_json

_CHECK_COLUMNS = ["frame_id", "period", "category", "split", "image", "width", "height"]
_REWRITE_COLUMNS = ["stream_id", "ts", "category", "split", "image", "source"]
_QUARANTINE_COLUMNS = ["stream_id", "ts", "category", "source", "image", "reason", "detail"]
_BAD_SPLIT_DETAIL = re.compile(r"^split '([^']*)' not in")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class ValidationReport:
    """What :func:`validate_shard` found and did.

    ``issues`` counts bad rows per reason (the decode reasons of
    :data:`cssl_core.data.images.REASONS`, ``bad_split``, ``duplicate``); ``problems`` lists
    one-line findings about the shard as a whole (missing or stale manifest, mismatched ids).
    ``clean`` is about the shard as it was found; ``repaired`` says it was rewritten, in which
    case ``manifest`` and ``stats`` are the new shard's.
    """

    path: Path
    rows: int
    valid: int
    issues: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    repaired: bool = False
    manifest: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    previously_quarantined: int = 0

    @property
    def clean(self) -> bool:
        return not self.issues and not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "clean": self.clean,
            "repaired": self.repaired,
            "rows": self.rows,
            "valid": self.valid,
            "issues": self.issues,
            "problems": self.problems,
            "previously_quarantined": self.previously_quarantined,
            "manifest": self.manifest,
            "stats": self.stats,
        }

    def summary_lines(self) -> list[str]:
        if self.clean:
            state = "clean"
        elif self.repaired:
            state = "repaired"
        else:
            state = "NOT clean (run with repair to rewrite it)"
        lines = [f"shard {self.path}: {state}; {self.rows} rows read, {self.valid} valid"]
        lines += [f"  {reason}: {n}" for reason, n in sorted(self.issues.items())]
        lines += [f"  problem: {p}" for p in self.problems]
        if self.repaired and self.manifest is not None:
            lines.append(
                f"  rewritten: {self.manifest['num_rows']} rows, "
                f"fingerprint {self.manifest['fingerprint'][:12]}, previously quarantined rows "
                f"re-checked: {self.previously_quarantined}"
            )
        return lines


@dataclass
class _Scan:
    """The result of reading a shard directory once, without changing it."""

    parts: list[Path]
    quarantine: Path | None
    manifest: dict[str, Any] | None
    rows: int = 0
    valid: int = 0
    issues: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


def _parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({exc})") from None


def _locate(
    path: Path, problems: list[str]
) -> tuple[list[Path], Path | None, dict[str, Any] | None]:
    """Parts, quarantine file and manifest of a shard or of a bare Parquet directory.

    An unreadable manifest is a problem (the directory is then read like a bare one); a
    manifest that lists a missing part is a :class:`ShardError` (rows are lost, nothing to
    repair from).
    """
    if not path.is_dir():
        raise ShardError(f"{path}: no such shard directory")
    manifest_path = path / MANIFEST
    if manifest_path.is_file():
        try:
            json.loads(manifest_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            problems.append(f"{MANIFEST} is not valid JSON")
        else:
            shard = Shard.open(path)
            name = shard.manifest.get("quarantine_file")
            quarantine = None
            if name:
                if (path / name).is_file():
                    quarantine = path / name
                else:
                    problems.append(f"manifest lists quarantine file {name!r}, which is missing")
            return shard.part_paths(), quarantine, shard.manifest
    else:
        problems.append(f"no {MANIFEST} (not a published shard)")
    parts = sorted(
        p
        for p in path.glob("*.parquet")
        if p.is_file() and not p.name.startswith(".") and p.name != QUARANTINE
    )
    quarantine = path / QUARANTINE if (path / QUARANTINE).is_file() else None
    return parts, quarantine, None


def _decode_check(data: bytes | None, limits: DecodeLimits) -> tuple[str | None, tuple[int, int]]:
    """``(reason, size)``: the rejection reason (None when it decodes) and the decoded size."""
    try:
        img = decode_image(data, limits)
    except ImageRejected as exc:
        return exc.reason, (0, 0)
    return None, img.size


def _scan(path: Path, limits: DecodeLimits, workers: int) -> _Scan:
    """Read every row once: decode each image, recompute ids and the fingerprint."""
    problems: list[str] = []
    parts, quarantine, manifest = _locate(path, problems)
    if not parts:
        raise ShardError(f"{path}: empty shard (no Parquet parts)")
    scan = _Scan(parts, quarantine, manifest, problems=problems)
    period = manifest["period"] if manifest is not None else None
    expected_rows = {p["file"]: p["num_rows"] for p in manifest["parts"]} if manifest else {}
    files = [_parquet(part) for part in parts]
    for part, reader in zip(parts, files, strict=True):
        check_schema(reader.schema_arrow, str(part))
    if quarantine is not None:
        qschema = _parquet(quarantine).schema_arrow
        missing = [c for c in _QUARANTINE_COLUMNS if qschema.get_field_index(c) < 0]
        if missing:
            raise ShardError(f"{quarantine}: missing quarantine column {missing[0]!r}")
    if sum(reader.metadata.num_rows for reader in files) == 0:
        raise ShardError(f"{path}: empty shard (its Parquet parts hold no rows)")

    seen: set[bytes] = set()
    fingerprint = hashlib.sha256()
    splits: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    id_mismatch = size_mismatch = period_mismatch = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for part, reader in zip(parts, files, strict=True):
            part_rows = reader.metadata.num_rows
            want = expected_rows.get(part.name)
            if want is not None and want != part_rows:
                scan.problems.append(
                    f"{part.name}: manifest says {want} rows, file has {part_rows}"
                )
            for batch in reader.iter_batches(64, columns=_CHECK_COLUMNS):
                cols = {name: batch.column(name).to_pylist() for name in _CHECK_COLUMNS}
                results = pool.map(lambda d: _decode_check(d, limits), cols["image"])
                for i, (reason, size) in enumerate(results):
                    scan.rows += 1
                    split = cols["split"][i]
                    if reason is None and split not in SPLITS:
                        reason = "bad_split"
                    if reason is not None:
                        scan.issues[reason] += 1
                        continue
                    fid = frame_id(cols["image"][i])
                    key = bytes.fromhex(fid)
                    if key in seen:
                        scan.issues["duplicate"] += 1
                        continue
                    seen.add(key)
                    scan.valid += 1
                    id_mismatch += fid != cols["frame_id"][i]
                    size_mismatch += size != (cols["width"][i], cols["height"][i])
                    if period is not None:
                        period_mismatch += cols["period"][i] != period
                    category = cols["category"][i]
                    fingerprint.update(f"{fid}\t{split}\t{category or ''}\n".encode())
                    splits[split] += 1
                    if category is not None:
                        categories[category] += 1
    if id_mismatch:
        scan.problems.append(f"{id_mismatch} rows whose frame_id is not the hash of their image")
    if size_mismatch:
        scan.problems.append(f"{size_mismatch} rows whose width/height differ from the image")
    if period_mismatch:
        scan.problems.append(f"{period_mismatch} rows whose period is not {period!r}")
    if manifest is not None and not scan.issues:
        _compare_manifest(manifest, scan, fingerprint.hexdigest(), splits, categories)
    return scan


def _compare_manifest(
    manifest: dict[str, Any],
    scan: _Scan,
    fingerprint: str,
    splits: Counter[str],
    categories: Counter[str],
) -> None:
    """Add a problem for each manifest field that disagrees with the rows."""
    checks = [
        ("num_rows", scan.valid, manifest.get("num_rows")),
        ("splits", dict(sorted(splits.items())), manifest.get("splits")),
        ("categories", dict(sorted(categories.items())), manifest.get("categories")),
        ("fingerprint", fingerprint, manifest.get("fingerprint")),
    ]
    for name, actual, recorded in checks:
        if actual != recorded:
            scan.problems.append(f"manifest {name} is {recorded!r}, rows give {actual!r}")


def _rows(reader: pq.ParquetFile, columns: list[str]) -> Iterator[dict[str, Any]]:
    for batch in reader.iter_batches(256, columns=columns):
        yield from batch.to_pylist()


def _ts(value: datetime | None) -> datetime:
    if value is None:
        return _EPOCH
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _rewrite(
    path: Path, scan: _Scan, cfg: IngestConfig, limits: DecodeLimits
) -> tuple[dict[str, Any], ShardWriter, int]:
    """Stream every row (and every previously quarantined row) of ``path`` into a new shard
    that replaces it. Valid frames keep their bytes and metadata: no resize here."""
    writer = ShardWriter(
        path.parent,
        path.name,
        eval_fraction=cfg.eval_fraction,
        limits=limits,
        size=None,
        jpeg_quality=cfg.jpeg_quality,
        rows_per_group=cfg.rows_per_group,
        rows_per_part=cfg.rows_per_part,
        max_group_bytes=cfg.max_group_bytes,
    )
    requarantined = 0
    with writer:
        for part in scan.parts:
            for row in _rows(_parquet(part), _REWRITE_COLUMNS):
                writer.add(
                    Frame(
                        image=row["image"] or b"",
                        stream_id=row["stream_id"] or "",
                        ts=_ts(row["ts"]),
                        source=row["source"] or str(part),
                        category=row["category"],
                        split=row["split"],
                    )
                )
        if scan.quarantine is not None:
            # Offered again so nothing is lost; the writer re-derives each reason. A frame
            # quarantined for its split keeps that split so it is quarantined again.
            for row in _rows(_parquet(scan.quarantine), _QUARANTINE_COLUMNS):
                split = None
                if row["reason"] == "bad_split":
                    match = _BAD_SPLIT_DETAIL.match(row["detail"] or "")
                    split = match.group(1) if match else "unknown"
                writer.add(
                    Frame(
                        image=row["image"] or b"",
                        stream_id=row["stream_id"] or "",
                        ts=_ts(row["ts"]),
                        source=row["source"] or str(scan.quarantine),
                        category=row["category"],
                        split=split,
                    )
                )
                requarantined += 1
        if writer.stats.kept == 0:
            writer.abort()
            raise ShardError(
                f"{path}: no row decodes, nothing to keep; the shard was left as it was"
            )
        if scan.manifest is not None:
            # The writer keeps an existing shard whose manifest has the same fingerprint; a
            # repair must replace it, so mark the old manifest stale first. If we crash after
            # this line the old shard is still readable and fails validation again.
            stale = dict(scan.manifest, fingerprint=f"stale:{scan.manifest.get('fingerprint')}")
            atomic_write_json(path / MANIFEST, stale, sort_keys=True)
        manifest = writer.commit()
    return manifest, writer, requarantined


def validate_shard(
    path: str | Path, cfg: IngestConfig, repair: bool = True, *, workers: int | None = None
) -> ValidationReport:
    """Decode every image of the shard at ``path`` and check its manifest; repair if asked.

    A clean shard is left untouched (``report.clean``). Otherwise, with ``repair=True`` the
    shard is rewritten in place (``report.repaired``) through the writer with the decode limits
    of ``cfg``; with ``repair=False`` nothing changes. A wrong column type or a missing column
    is a one-line :class:`ShardError` naming the column; so is a shard with no rows. Images are
    decoded by ``workers`` threads (default: one per CPU; Pillow decodes without the GIL).
    """
    path = Path(path)
    limits = DecodeLimits(cfg.max_image_bytes, cfg.max_image_pixels)
    scan = _scan(path, limits, workers or os.cpu_count() or 1)
    report = ValidationReport(
        path=path,
        rows=scan.rows,
        valid=scan.valid,
        issues=dict(sorted(scan.issues.items())),
        problems=scan.problems,
        manifest=scan.manifest,
    )
    if report.clean or not repair:
        return report
    manifest, writer, requarantined = _rewrite(path, scan, cfg, limits)
    report.repaired = True
    report.manifest = manifest
    report.stats = writer.stats.as_dict()
    report.previously_quarantined = requarantined
    return report
