"""``cssl bench index``: the options parse without torch, and a tiny run measures what it says."""

from __future__ import annotations

import argparse
import subprocess
import sys

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
