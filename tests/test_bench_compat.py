"""``cssl bench compat`` on the smoke preset: every mode measured on one lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.cli import main


@pytest.mark.slow
def test_bench_compat_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out"
    argv = ["compat", "--datasets", "stream", "--seeds", "0", "--preset", "smoke"]
    assert main([*argv, "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["stream"]
    assert set(summary) == {"none", "adapter", "align"}
    for mode in summary.values():
        assert 0.0 <= mode["average_compatibility"] <= 1.0 and mode["pairs"] == 3
    # The adapter never changes the backbone: its own quality is none's, exactly.
    assert summary["adapter"]["new_new_top1_vs_none"] == 0.0
    assert summary["adapter"]["knn_diff_vs_none"]["estimate"] == 0.0
    cell = json.loads((out / "runs" / "stream_seed0.json").read_text())
    assert set(cell["retrieval"]["adapter"]) == {"1,1", "2,2", "2,1", "3,3", "3,2", "3,1"}
    # Instance level: a version finds every frame's own embedding; across versions, a share.
    for mode in ("none", "adapter", "align"):
        m = cell["retrieval"][mode]
        assert all(m[f"{i},{i}"]["instance"] == 1.0 for i in (1, 2, 3))
        assert all(0.0 <= m[k]["instance"] <= 1.0 for k in ("2,1", "3,2", "3,1"))
        assert 0.0 <= summary[mode]["instance_top1"] <= 1.0
    assert "instance top-1" in (out / "results.md").read_text()
    assert (out / "results.md").read_text().startswith("Preset smoke")
    # A second call keeps the finished cell instead of training again.
    assert main([*argv, "--out", str(out)]) == 0
    assert "kept from" in capsys.readouterr().err
