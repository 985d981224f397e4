"""The three drivers run the same period loop: two periods through the DVC stage functions,
the benchmark's loop (``cssl bench continual``'s ``run_strategy``) and the Prefect flow's
train+memory task (its body, ``.fn``) end with bit-identical weights and replay memories.

The memory is selected with ``hard`` so it depends on the model too, and the strategy
(``distill+replay``) uses every piece: parent, teacher, replay and the memory update.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_PARAMS

from cssl_core.config import Params, params_from_dict
from cssl_core.data.shard import Shard
from cssl_core.data.storage import LocalStore
from cssl_core.learn.models import Embedder
from cssl_core.memory.replay import ReplayMemory

PERIODS = ("p01", "p02")


@pytest.fixture(scope="module")
def params() -> Params:
    tree = json.loads(json.dumps(TINY_PARAMS))
    tree["periods"] = {"p01": {"previous": ""}, "p02": {"previous": "p01"}}
    tree["replay"] |= {"selection": "hard"}
    return params_from_dict(tree)


def dvc_driver(params: Params, shards: Path, out: Path) -> dict[str, tuple[str, str]]:
    from pipelines.dvc_stages import memory_root, model_dir, train_stage

    got = {}
    for period in PERIODS:
        train_stage(params, period, shards, out / "models", out / "memory")
        model = Embedder.load(model_dir(out / "models", period))
        memory = ReplayMemory.load(LocalStore(memory_root(out / "memory", period)), period)
        got[period] = (model.state_fingerprint(), memory.fingerprint)
    return got


def flow_driver(
    params: Params, shards: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, tuple[str, str]]:
    from prefect.logging import disable_run_logger

    from pipelines.refresh import train

    monkeypatch.setenv("CSSL_HOME", str(home))
    parent, memory, history = None, ReplayMemory.empty(params.replay.capacity), []
    got = {}
    with disable_run_logger():
        for period in PERIODS:
            shard = Shard.open(shards / period)
            parent, _, memory = train.fn(params, period, shard, parent, memory, history)
            history.append(shard)
            got[period] = (parent.state_fingerprint(), memory.fingerprint)
    return got


def bench_driver(params: Params, shards: Path) -> dict[str, tuple[str, str]]:
    from benchmarks import continual as bc
    from cssl_core.period import eval_sets_for

    chain = [Shard.open(shards / p) for p in PERIODS]
    ctx = bc.SeedContext(params.train.seed, eval_sets_for(chain, params), baseline={})
    run = bc.run_strategy(params, chain, ctx, bc.BenchConfig(), {}, log=lambda _: None)
    return {r.period: (r.weights_sha256, r.memory_fingerprint) for r in run.periods}


def test_the_flow_the_dvc_stages_and_the_benchmark_agree_bit_for_bit(
    params: Params, sim_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dvc = dvc_driver(params, sim_shards, tmp_path / "dvc")
    flow = flow_driver(params, sim_shards, tmp_path / "home", monkeypatch)
    bench = bench_driver(params, sim_shards)
    assert dvc == flow == bench
    assert len({w for w, _ in dvc.values()}) == 2  # two different models, two memories
    assert len({m for _, m in dvc.values()}) == 2
