"""Fault 4: bad shards through the command line, as an operator would meet them.

A folder of frames mixing valid JPEGs with a truncated JPEG, a zero-byte file, a text file
named ``.jpg``, a real 30,000 x 30,000 PNG (a decompression bomb: 900 megapixels of valid
zlib data in ~100 KB), an exact duplicate and a category folder with odd Unicode in its name;
then whole shards that cannot be used (wrong Parquet schema, no parts, no rows) and a shard
whose rows are bad. Each bad frame is quarantined with its reason, each bad shard is a
one-line error (``cssl validate`` and ``cssl refresh``), and every valid frame is kept.
"""

from __future__ import annotations

import struct
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_override_list

from cssl_core.data.images import frame_id
from cssl_core.data.shard import FRAME_SCHEMA, Shard, ShardError
from pipelines.cli import EXIT_FAILED, EXIT_OK, main

ODD_CATEGORY = "Pokémon 🎮 日本語\u200b\u0301 ½"
BAD_FILES = {  # file name -> quarantine reason
    "truncated.jpg": "truncated",
    "zero.jpg": "empty",
    "notes.jpg": "not_an_image",
    "bomb.png": "too_many_pixels",
}


def real_png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A complete, valid 1-bit PNG of ``width`` x ``height`` black pixels (streamed zlib)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _bad_bytes(good: bytes) -> dict[str, bytes]:
    return {
        "truncated.jpg": good[: len(good) // 2],
        "zero.jpg": b"",
        "notes.jpg": "just some notes, not a JPEG ✓\n".encode(),
        "bomb.png": real_png_bomb(),
    }


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_the_png_bomb_is_real():
    t0 = time.perf_counter()
    bomb = real_png_bomb()
    assert len(bomb) < 200_000 and time.perf_counter() - t0 < 30
    assert struct.unpack(">II", bomb[16:24]) == (30_000, 30_000)
    width_bytes = 1 + 30_000 // 8
    assert len(zlib.decompress(bomb[41:-12])) == 30_000 * width_bytes  # all IDAT data there


def test_a_folder_of_mixed_frames_keeps_every_valid_one_and_quarantines_the_rest(
    cifar_jpegs: list[bytes], tmp_path: Path, capsys
):
    src = tmp_path / "frames"
    good = {"plain": cifar_jpegs[:6], ODD_CATEGORY: cifar_jpegs[6:10]}
    for category, images in good.items():
        (src / category).mkdir(parents=True)
        for i, data in enumerate(images):
            (src / category / f"frame-{i}.jpg").write_bytes(data)
    (src / "plain" / "frame-0 (copy).jpg").write_bytes(good["plain"][0])  # exact duplicate
    for name, data in _bad_bytes(cifar_jpegs[20]).items():
        (src / ODD_CATEGORY / name).write_bytes(data)

    out = tmp_path / "shards"
    code, stdout, err = _cli(
        capsys, "ingest", str(src), "--period", "p01", "--out", str(out), "--labels-from-dirs"
    )
    assert code == EXIT_OK, err
    shard = Shard.open(out / "p01")
    kept = shard.read(["frame_id", "category"]).to_pylist()
    want = {frame_id(d): c for c, images in good.items() for d in images}
    assert {r["frame_id"]: r["category"] for r in kept} == want  # every valid frame, once
    assert shard.manifest["duplicates_dropped"] == 1
    quarantine = shard.quarantine()
    assert quarantine is not None
    reasons = {
        Path(s).name: r
        for s, r in zip(
            quarantine.column("source").to_pylist(),
            quarantine.column("reason").to_pylist(),
            strict=True,
        )
    }
    assert reasons == BAD_FILES
    assert shard.manifest["categories"][ODD_CATEGORY] == len(good[ODD_CATEGORY])
    # The published shard is clean, and says so.
    code, stdout, err = _cli(capsys, "validate", str(out / "p01"), "--check")
    assert code == EXIT_OK, err


def _rows(images: list[bytes], period: str = "p01") -> list[dict]:
    t0 = datetime(2024, 3, 1, tzinfo=UTC)
    return [
        {
            "frame_id": frame_id(data),
            "stream_id": f"ストリーム-{i % 2}",
            "ts": t0 + timedelta(seconds=i),
            "period": period,
            "category": ODD_CATEGORY if i % 2 else "plain",
            "split": "eval" if i % 3 == 0 else "train",
            "image": data,
            "width": 32,
            "height": 32,
            "source": f"src/{i}",
        }
        for i, data in enumerate(images)
    ]


def test_a_shard_with_bad_rows_is_refused_by_refresh_and_repaired_by_validate(
    cifar_jpegs: list[bytes], tmp_path: Path, capsys, prefect_harness: None, monkeypatch
):
    monkeypatch.setenv("CSSL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    valid = cifar_jpegs[:12]
    bad = _bad_bytes(cifar_jpegs[20])
    rows = _rows([*valid, valid[3], *bad.values()])  # one duplicate row, four bad images
    shard_dir = tmp_path / "p01"
    shard_dir.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=FRAME_SCHEMA), shard_dir / "part-0.parquet")

    from pipelines.refresh import refresh

    with pytest.raises(ShardError) as refused:  # the CLI prints this message as its one line
        refresh(
            "p01",
            shard=str(shard_dir),
            overrides=[*tiny_override_list(), f"store.root={tmp_path / 'store'}"],
        )
    message = str(refused.value)
    assert "\n" not in message and "is not clean" in message, message
    assert f"cssl validate {shard_dir}" in message, message
    assert not (tmp_path / "store" / "shards").exists()  # nothing was published

    code, _, err = _cli(capsys, "validate", str(shard_dir))  # repair: quarantine the bad rows
    assert code == EXIT_OK, err
    shard = Shard.open(shard_dir)
    assert sorted(shard.read(["frame_id"]).column(0).to_pylist()) == sorted(map(frame_id, valid))
    quarantine = shard.quarantine()
    assert quarantine is not None
    assert sorted(quarantine.column("reason").to_pylist()) == sorted(BAD_FILES.values())
    assert shard.manifest["duplicates_dropped"] == 1
    assert set(shard.read(["stream_id"]).column(0).to_pylist()) == {"ストリーム-0", "ストリーム-1"}


@pytest.mark.parametrize("kind", ["wrong schema", "no parts", "no rows"])
def test_an_unusable_shard_is_a_one_line_error(
    kind: str, cifar_jpegs: list[bytes], tmp_path: Path, capsys
):
    shard_dir = tmp_path / "p01"
    shard_dir.mkdir()
    table = pa.Table.from_pylist(_rows(cifar_jpegs[:4]), schema=FRAME_SCHEMA)
    if kind == "wrong schema":
        table = table.set_column(
            table.schema.get_field_index("ts"), "ts", pa.array(["yesterday"] * 4, pa.string())
        )
        pq.write_table(table, shard_dir / "part-0.parquet")
        needles = ("column 'ts'", "expected timestamp")
    elif kind == "no rows":
        pq.write_table(FRAME_SCHEMA.empty_table(), shard_dir / "part-0.parquet")
        needles = ("empty shard",)
    else:
        needles = ("empty shard",)
    before = sorted(p.name for p in shard_dir.iterdir())
    for argv in (["validate", str(shard_dir)], ["validate", str(shard_dir), "--check"]):
        code, _, err = _cli(capsys, *argv)
        assert code == EXIT_FAILED
        _one_line_error(err, *needles)
    assert sorted(p.name for p in shard_dir.iterdir()) == before  # left as it was
