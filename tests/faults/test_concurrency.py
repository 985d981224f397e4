"""Fault 6: two refreshes of the same period started together, as separate processes.

Both ``cssl refresh --period p01`` processes share one CSSL_HOME (the lock folder), one MLflow
store and one object store, as two scheduled runs on one worker machine would. Exactly one
may do the work: one registered version, one replay-memory version, one MLflow run; the other
exits non-zero at once with a one-line message that says why.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from faultkit import cli_env, cssl_command, tiny_cli_args

from cssl_core.data.storage import LocalStore
from cssl_core.memory.replay import list_versions

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_two_refreshes_of_one_period_started_together(
    tmp_path: Path, tiny_params_file: Path, sim_shards: Path
):
    store = tmp_path / "store"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = cli_env(tmp_path / "home", tracking)
    cmd = cssl_command(
        "refresh",
        "--period",
        "p01",
        "--shard",
        str(sim_shards / "p01"),
        "--params",
        str(tiny_params_file),
        *tiny_cli_args(f"store.root={store}"),
    )
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        results.append((proc.returncode, out, err))
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], [(c, e[-2000:]) for c, _, e in results]
    winner = next(r for r in results if r[0] == 0)
    loser = next(r for r in results if r[0] == 1)
    last = loser[2].strip().splitlines()[-1]
    assert last.startswith("error: another refresh of period 'p01' is running"), loser[2][-2000:]
    # (Prefect logs the failed flow run above it; the CLI's own answer is that one line.)
    assert "p01: version 1" in winner[1]

    from pipelines.mlflow_registry import MlflowRegistry

    registry = MlflowRegistry(tracking)
    assert [(v.version, v.period) for v in registry.versions()] == [(1, "p01")]
    runs = registry.client.search_runs([registry.experiment_id()])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("refresh-p01", "FINISHED")]
    assert list_versions(LocalStore(store)) == ["p01"]
    assert sorted(p.name for p in (store / "memory").iterdir()) == ["p01"]
