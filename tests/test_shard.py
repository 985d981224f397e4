"""The shard format: exact schema round trip, idempotent reruns, atomic publish under SIGKILL."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image

from cssl_core.config import IngestConfig
from cssl_core.data.images import frame_id
from cssl_core.data.shard import (
    FRAME_SCHEMA,
    Frame,
    Shard,
    ShardError,
    ShardWriter,
    eval_split_for,
    list_shards,
)
from cssl_core.data.validate import validate_shard

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def png_bytes(size: tuple[int, int] = (40, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buf, format="PNG")
    return buf.getvalue()


def write(root: Path, period: str, frames: list[Frame], **kwargs) -> dict:
    writer = ShardWriter(root, period, rows_per_group=16, **kwargs)
    with writer:
        for frame in frames:
            writer.add(frame)
        return writer.commit()


def frames_from(images: list[bytes], stream: str = "s") -> list[Frame]:
    return [
        Frame(image=d, stream_id=stream, ts=T0 + timedelta(seconds=i), source=f"src{i}")
        for i, d in enumerate(images)
    ]


def test_schema_round_trip_is_exact(cifar_jpegs: list[bytes], tmp_path: Path) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    frames = [
        Frame(cifar_jpegs[0], "cam-1", T0, "a.jpg"),
        Frame(cifar_jpegs[1], "cam-1", T0.astimezone(india), "b.jpg", category="x", split="eval"),
        Frame(png_bytes(), "cam-2", T0 + timedelta(days=400), "c.png", category="y"),
    ]
    manifest = write(tmp_path, "p01", frames, eval_fraction=0.5)
    shard = Shard.open(tmp_path / "p01")
    table = shard.read()
    assert table.schema.equals(FRAME_SCHEMA)
    rows = table.to_pylist()
    png_as_jpeg = rows[2]["image"]
    assert png_as_jpeg[:3] == b"\xff\xd8\xff"  # non-JPEG input is stored as JPEG
    images = [cifar_jpegs[0], cifar_jpegs[1], png_as_jpeg]
    ids = [frame_id(d) for d in images]
    assert rows == [
        {
            "frame_id": ids[0],
            "stream_id": "cam-1",
            "ts": T0,
            "period": "p01",
            "category": None,
            "split": eval_split_for(ids[0], 0.5),
            "image": cifar_jpegs[0],
            "width": 32,
            "height": 32,
            "source": "a.jpg",
        },
        {
            "frame_id": ids[1],
            "stream_id": "cam-1",
            "ts": T0,
            "period": "p01",
            "category": "x",
            "split": "eval",
            "image": cifar_jpegs[1],
            "width": 32,
            "height": 32,
            "source": "b.jpg",
        },
        {
            "frame_id": ids[2],
            "stream_id": "cam-2",
            "ts": T0 + timedelta(days=400),
            "period": "p01",
            "category": "y",
            "split": eval_split_for(ids[2], 0.5),
            "image": png_as_jpeg,
            "width": 40,
            "height": 24,
            "source": "c.png",
        },
    ]
    assert all(r["ts"].utcoffset() == timedelta(0) for r in rows)
    assert manifest["num_rows"] == shard.num_rows == 3
    assert manifest["categories"] == {"x": 1, "y": 1}
    assert shard.quarantine() is None


def test_idempotent_rerun_leaves_files_untouched(cifar_jpegs: list[bytes], tmp_path: Path) -> None:
    frames = frames_from(cifar_jpegs[:40])
    first = write(tmp_path, "p01", frames)
    shard_dir = tmp_path / "p01"

    def snapshot() -> dict[str, tuple[int, int]]:
        paths = [shard_dir, *shard_dir.iterdir()]
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}

    before = snapshot()
    assert len(before) == 3  # the directory, one part, the manifest
    second = write(tmp_path, "p01", frames)
    assert second["fingerprint"] == first["fingerprint"]
    assert snapshot() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p01"]  # no temporary left behind

    changed = write(tmp_path, "p01", frames[:39])
    assert changed["fingerprint"] != first["fingerprint"]
    assert Shard.open(shard_dir).num_rows == 39
    assert [p.name for p in tmp_path.iterdir()] == ["p01"]


# Writes random frames into a new version of a shard forever, after saying (once 41 frames,
# i.e. two row groups, are on disk) where its temporary directory is.
WRITER_CHILD = r"""
import itertools, sys
from datetime import datetime, timezone
import numpy as np
from cssl_core.data.images import encode_jpeg
from cssl_core.data.shard import Frame, ShardWriter

rng = np.random.default_rng(0)
writer = ShardWriter(sys.argv[1], sys.argv[2], rows_per_group=16)
for i in itertools.count():
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    writer.add(Frame(encode_jpeg(pixels), "noise", datetime.now(timezone.utc), f"noise/{i}"))
    if i == 40:
        print(writer.tmp, flush=True)
"""


def _kill_writer_mid_write(root: Path, period: str) -> Path:
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER_CHILD, str(root), period],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        tmp = Path(child.stdout.readline().strip())
        assert tmp.parent == root and tmp.name.startswith(f".{period}.tmp-")
        assert (tmp / "part-00000.parquet").is_file()  # rows are being written
        assert child.poll() is None
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    return tmp


@pytest.mark.timeout(120)
def test_killed_writer_leaves_previous_version_intact(
    cifar_jpegs: list[bytes], tmp_path: Path
) -> None:
    previous = write(tmp_path, "p01", frames_from(cifar_jpegs[:20]))
    rows_before = Shard.open(tmp_path / "p01").read().to_pylist()

    tmp = _kill_writer_mid_write(tmp_path, "p01")

    shard = Shard.open(tmp_path / "p01")
    assert shard.fingerprint == previous["fingerprint"]
    assert shard.read().to_pylist() == rows_before
    assert validate_shard(shard.path, IngestConfig(), repair=False).clean
    assert [s.path for s in list_shards(tmp_path)] == [tmp_path / "p01"]
    with pytest.raises(ShardError, match="no manifest.json"):
        Shard.open(tmp)


@pytest.mark.timeout(120)
def test_killed_first_writer_publishes_nothing(tmp_path: Path) -> None:
    tmp = _kill_writer_mid_write(tmp_path, "p01")
    assert not (tmp_path / "p01").exists()
    with pytest.raises(ShardError, match="no such shard directory"):
        Shard.open(tmp_path / "p01")
    assert list_shards(tmp_path) == []
    assert tmp.is_dir()  # the abandoned temporary is hidden, never under the period's name
