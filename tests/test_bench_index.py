"""``cssl bench index``: the options parse without torch, and a tiny run measures what it says."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from benchmarks import index as bench


def test_import_is_torch_free_and_options_parse():
    code = "import sys, benchmarks.index; print('torch' in sys.modules, 'lancedb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--sizes", "1000", "--frames", "--queries", "5"])
    assert args.sizes == [1000] and args.frames == [] and args.queries == 5 and args.dim == 512


def test_tiny_vector_run(tmp_path, monkeypatch):
    monkeypatch.setenv("CSSL_HOME", str(tmp_path / "home"))
    row = bench.measure_vectors(3000, 32, 20, str(tmp_path))
    assert row["rows"] == 3000 and row["ann_built"] is True
    assert 0.0 <= row["ann_recall_at_10"] <= 1.0 and row["ann_recall_at_10"] > 0.5
    assert 0 < row["exact_p50_ms"] <= row["exact_p95_ms"]
    lines = bench.format_index_benchmark(
        {
            "cpu_count": 2,
            "threads": 2,
            "load_before": (1.0, 1.0, 1.0),
            "vectors": [row],
            "backfill": [],
        }
    )
    assert "3000 x 32" in lines[1] and "recall@10" in lines[1]


@pytest.mark.slow
def test_tiny_backfill_curve(tmp_path, monkeypatch):
    """Every order starts from the same all-old index and ends at the same all-new one; the
    fraction reaching 95% of the full quality is one of the measured fractions."""
    from conftest import CIFAR_PARQUET

    monkeypatch.setenv("CSSL_HOME", str(tmp_path / "home"))
    curve = bench.measure_curve(str(tmp_path), str(CIFAR_PARQUET), 40, 20, 2, 1, 2)
    assert curve["gallery"] == 80 and curve["queries"] == 40 and len(curve["fractions"]) == 21
    assert set(curve["curves"]) == {"priority", "random-0", "random-1"}
    ends = {(c["map_at_10"][0], c["map_at_10"][-1]) for c in curve["curves"].values()}
    assert len(ends) == 1
    for c in curve["curves"].values():
        assert c["reach95_map"] in curve["fractions"] and 0.0 <= c["area_map"] <= 1.0
    lines = bench.format_index_benchmark(
        {
            "cpu_count": 2,
            "threads": 1,
            "load_before": (1.0, 1.0, 1.0),
            "vectors": [],
            "backfill": [],
            "curve": curve,
        }
    )
    assert any(line.strip().startswith("priority") for line in lines)
