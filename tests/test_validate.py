"""Validation: bad input quarantined with its reason, valid frames all kept, in-place repair."""

from __future__ import annotations

import io
import json
import struct
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cssl_core.config import IngestConfig
from cssl_core.data.images import frame_id
from cssl_core.data.ingest import ingest
from cssl_core.data.shard import FRAME_SCHEMA, MANIFEST, Shard, ShardError
from cssl_core.data.validate import validate_shard


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A 1-bit PNG whose header declares ``width`` x ``height`` pixels, in 60 bytes.

    Built chunk by chunk (signature, IHDR, an empty IDAT, IEND) so the test costs nothing;
    a decoder that trusted the header would allocate 900 megapixels.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def noise_jpeg(size: int, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# Each bad input with the reason it must be quarantined for.
BAD_INPUTS = {
    "truncated.jpg": "truncated",
    "zero.jpg": "empty",
    "text.jpg": "not_an_image",
    "bomb.png": "too_many_pixels",
    "big.jpg": "too_many_bytes",
}
CFG = IngestConfig(max_image_bytes=8192, rows_per_group=16)


def bad_bytes(name: str, good: bytes) -> bytes:
    return {
        "truncated.jpg": good[: len(good) // 2],
        "zero.jpg": b"",
        "text.jpg": b"this is a text file, not a JPEG\n",
        "bomb.png": png_bomb(),
        "big.jpg": noise_jpeg(96),
    }[name]


def test_fixture_inputs_are_what_they_claim(cifar_jpegs: list[bytes]) -> None:
    assert len(png_bomb()) < 100
    assert struct.unpack(">II", png_bomb()[16:24]) == (30_000, 30_000)  # IHDR width, height
    assert len(noise_jpeg(96)) > CFG.max_image_bytes
    assert max(len(d) for d in cifar_jpegs[:8]) < CFG.max_image_bytes


def test_ingest_quarantines_each_bad_input_with_its_reason(
    cifar_jpegs: list[bytes], tmp_path: Path
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    good = cifar_jpegs[:6]
    for i, data in enumerate(good):
        (src / f"good{i}.jpg").write_bytes(data)
    (src / "good0-copy.jpg").write_bytes(good[0])  # an exact duplicate
    for name in BAD_INPUTS:
        (src / name).write_bytes(bad_bytes(name, cifar_jpegs[7]))

    report = ingest([src], "p01", tmp_path / "shards", CFG)
    assert report.stats == {
        "offered": 12,
        "kept": 6,
        "duplicates": 1,
        "quarantined": {reason: 1 for reason in sorted(BAD_INPUTS.values())},
    }
    shard = Shard.open(report.path)
    assert sorted(shard.read(["frame_id"]).column(0).to_pylist()) == sorted(map(frame_id, good))
    quarantine = shard.quarantine()
    assert quarantine is not None
    by_file = {
        Path(s).name: r
        for s, r in zip(
            quarantine.column("source").to_pylist(),
            quarantine.column("reason").to_pylist(),
            strict=True,
        )
    }
    assert by_file == BAD_INPUTS
    assert shard.manifest["duplicates_dropped"] == 1
    assert validate_shard(report.path, CFG).clean


def frame_rows(images: list[bytes], period: str = "p01") -> list[dict]:
    """FRAME_SCHEMA rows around ``images``, with distinct metadata per row."""
    t0 = datetime(2024, 3, 1, tzinfo=UTC)
    return [
        {
            "frame_id": frame_id(data),
            "stream_id": f"stream-{i % 3}",
            "ts": t0 + timedelta(seconds=i),
            "period": period,
            "category": None if i % 4 == 0 else f"cat{i % 2}",
            "split": "eval" if i % 3 == 0 else "train",
            "image": data,
            "width": 32,
            "height": 32,
            "source": f"src/{i}",
        }
        for i, data in enumerate(images)
    ]


def test_bare_parquet_dir_repaired_in_place(cifar_jpegs: list[bytes], tmp_path: Path) -> None:
    good = cifar_jpegs[:8]
    images = list(good) + [good[3]] + [bad_bytes(n, cifar_jpegs[9]) for n in BAD_INPUTS]
    rows = frame_rows(images)
    shard_dir = tmp_path / "p01"
    shard_dir.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:7], schema=FRAME_SCHEMA), shard_dir / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[7:], schema=FRAME_SCHEMA), shard_dir / "b.parquet")

    looked = validate_shard(shard_dir, CFG, repair=False)
    assert not looked.clean and not looked.repaired
    assert looked.rows == 14 and looked.valid == 8
    expected_issues = {reason: 1 for reason in BAD_INPUTS.values()} | {"duplicate": 1}
    assert looked.issues == dict(sorted(expected_issues.items()))
    assert looked.problems == ["no manifest.json (not a published shard)"]
    assert sorted(p.name for p in shard_dir.iterdir()) == ["a.parquet", "b.parquet"]

    fixed = validate_shard(shard_dir, CFG, repair=True)
    assert fixed.repaired and not fixed.clean
    assert fixed.stats == {
        "offered": 14,
        "kept": 8,
        "duplicates": 1,
        "quarantined": {reason: 1 for reason in sorted(BAD_INPUTS.values())},
    }
    shard = Shard.open(shard_dir)
    out = shard.read().to_pylist()
    keep = ["frame_id", "stream_id", "ts", "period", "category", "split", "image", "source"]
    assert [{k: r[k] for k in keep} for r in out] == [{k: r[k] for k in keep} for r in rows[:8]]
    assert sorted(shard.quarantine().column("reason").to_pylist()) == sorted(BAD_INPUTS.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
    assert validate_shard(shard_dir, CFG).clean


def _rewrite_part(part: Path, edit) -> None:
    table = pq.read_table(part)
    pq.write_table(edit(table), part)


def test_published_shard_with_bit_rot_is_repaired(cifar_jpegs: list[bytes], tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i, data in enumerate(cifar_jpegs[:20]):
        (src / f"{i:02d}.jpg").write_bytes(data)
    (src / "zz.txt").write_text("quarantined at ingest")
    report = ingest([src], "p01", tmp_path / "shards", CFG)
    shard = Shard.open(report.path)
    part = shard.part_paths()[0]
    original = pq.read_table(part)

    def corrupt(table: pa.Table) -> pa.Table:
        images = table.column("image").to_pylist()
        images[5] = images[5][:300]
        return table.set_column(table.schema.get_field_index("image"), "image", pa.array(images))

    _rewrite_part(part, corrupt)
    found = validate_shard(report.path, CFG, repair=False)
    assert found.issues == {"truncated": 1} and found.valid == 19 and not found.repaired

    fixed = validate_shard(report.path, CFG)
    assert fixed.repaired and fixed.previously_quarantined == 1
    assert fixed.manifest["num_rows"] == 19
    again = Shard.open(report.path)
    expected = original.filter(pa.array([i != 5 for i in range(original.num_rows)]))
    assert again.read().to_pylist() == expected.to_pylist()
    reasons = again.quarantine().column("reason").to_pylist()
    assert sorted(reasons) == ["not_an_image", "truncated"]
    assert validate_shard(report.path, CFG).clean


def test_duplicate_row_with_unchanged_fingerprint_is_still_repaired(
    cifar_jpegs: list[bytes], tmp_path: Path
) -> None:
    shard_dir = tmp_path / "p01"
    shard_dir.mkdir()
    rows = frame_rows(cifar_jpegs[:6])
    pq.write_table(pa.Table.from_pylist(rows, schema=FRAME_SCHEMA), shard_dir / "part.parquet")
    first = validate_shard(shard_dir, CFG)
    assert first.repaired
    fingerprint = first.manifest["fingerprint"]
    part = Shard.open(shard_dir).part_paths()[0]
    # Append a copy of row 2: the fingerprint over unique frames does not change, but the
    # part no longer matches the manifest, and the writer alone would keep the old shard.
    _rewrite_part(part, lambda t: pa.concat_tables([t, t.slice(2, 1)]))
    found = validate_shard(shard_dir, CFG, repair=False)
    assert found.issues == {"duplicate": 1}
    fixed = validate_shard(shard_dir, CFG)
    assert fixed.repaired and fixed.manifest["fingerprint"] == fingerprint
    assert Shard.open(shard_dir).read(["frame_id"]).num_rows == 6
    assert validate_shard(shard_dir, CFG).clean


def test_stale_manifest_is_a_problem(cifar_jpegs: list[bytes], tmp_path: Path) -> None:
    shard_dir = tmp_path / "p01"
    shard_dir.mkdir()
    rows = frame_rows(cifar_jpegs[:4])
    pq.write_table(pa.Table.from_pylist(rows, schema=FRAME_SCHEMA), shard_dir / "part.parquet")
    validate_shard(shard_dir, CFG)
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    manifest["splits"] = {"train": 4}
    (shard_dir / MANIFEST).write_text(json.dumps(manifest))
    found = validate_shard(shard_dir, CFG, repair=False)
    assert found.issues == {}
    assert found.problems == ["manifest splits is {'train': 4}, rows give {'eval': 2, 'train': 2}"]
    assert validate_shard(shard_dir, CFG).repaired
    assert validate_shard(shard_dir, CFG).clean


def test_clean_shard_is_left_untouched(cifar_jpegs: list[bytes], tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i, data in enumerate(cifar_jpegs[:40]):
        (src / f"{i:02d}.jpg").write_bytes(data)
    report = ingest([src], "p01", tmp_path / "shards", CFG)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in report.path.iterdir()}
    result = validate_shard(report.path, CFG)
    assert result.clean and not result.repaired and result.rows == result.valid == 40
    assert result.summary_lines()[0] == f"shard {report.path}: clean; 40 rows read, 40 valid"
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in report.path.iterdir()}
    assert after == before


def test_wrong_schema_names_the_column(cifar_jpegs: list[bytes], tmp_path: Path) -> None:
    shard_dir = tmp_path / "p01"
    shard_dir.mkdir()
    table = pa.Table.from_pylist(frame_rows(cifar_jpegs[:2]), schema=FRAME_SCHEMA)
    bad_split = table.set_column(5, "split", pa.array([1, 2], pa.int64()))
    pq.write_table(bad_split, shard_dir / "part.parquet")
    with pytest.raises(ShardError, match=r"column 'split' has type int64, expected string"):
        validate_shard(shard_dir, CFG)
    pq.write_table(table.drop_columns(["frame_id"]), shard_dir / "part.parquet")
    with pytest.raises(ShardError, match=r"missing column 'frame_id'"):
        validate_shard(shard_dir, CFG)


def test_empty_shard_is_an_error(tmp_path: Path) -> None:
    shard_dir = tmp_path / "p01"
    shard_dir.mkdir()
    with pytest.raises(ShardError, match=r"empty shard \(no Parquet parts\)"):
        validate_shard(shard_dir, CFG)
    pq.write_table(FRAME_SCHEMA.empty_table(), shard_dir / "part.parquet")
    with pytest.raises(ShardError, match=r"empty shard \(its Parquet parts hold no rows\)"):
        validate_shard(shard_dir, CFG)
    with pytest.raises(ShardError, match="no such shard directory"):
        validate_shard(tmp_path / "missing", CFG)


def test_all_rows_bad_keeps_the_old_directory(tmp_path: Path) -> None:
    shard_dir = tmp_path / "p01"
    shard_dir.mkdir()
    rows = frame_rows([b"", b"junk"])
    pq.write_table(pa.Table.from_pylist(rows, schema=FRAME_SCHEMA), shard_dir / "part.parquet")
    with pytest.raises(ShardError, match="no row decodes"):
        validate_shard(shard_dir, CFG)
    assert [p.name for p in shard_dir.iterdir()] == ["part.parquet"]
    assert [p.name for p in tmp_path.iterdir()] == ["p01"]


ODD = {
    "stream_id": "ストリーム 🎮 ünïcødé\u200b\u0301",
    "category": "caté/gorie\t'\"😺\U0010fffd",
    "source": "C:\\vidéos\\日本語 (1).mp4#t=0",
}


def test_odd_unicode_metadata_survives_ingest_and_repair(
    cifar_jpegs: list[bytes], tmp_path: Path
) -> None:
    t0 = datetime(2024, 2, 29, 23, 59, 59, 999000, tzinfo=UTC)
    src = tmp_path / "odd.parquet"
    table = pa.table(
        {
            "image": pa.array([cifar_jpegs[0], cifar_jpegs[1]], pa.binary()),
            "stream_id": [ODD["stream_id"]] * 2,
            "ts": pa.array([t0, t0], pa.timestamp("ms", tz="UTC")),
            "category": [ODD["category"], None],
            "source": [ODD["source"], ODD["source"] + "²"],
        }
    )
    pq.write_table(table, src)
    report = ingest([src], "p01", tmp_path / "shards", CFG)
    expected = [
        (ODD["stream_id"], t0, ODD["category"], ODD["source"]),
        (ODD["stream_id"], t0, None, ODD["source"] + "²"),
    ]

    def metadata() -> list[tuple]:
        rows = Shard.open(report.path).read(["stream_id", "ts", "category", "source"]).to_pylist()
        return [(r["stream_id"], r["ts"], r["category"], r["source"]) for r in rows]

    assert metadata() == expected
    assert report.manifest["categories"] == {ODD["category"]: 1}
    (report.path / MANIFEST).unlink()  # force a full rewrite through the writer
    assert validate_shard(report.path, CFG).repaired
    assert metadata() == expected
