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
from cssl_core.period import PeriodInputs

PERIODS = ("p01", "p02")


@pytest.fixture(scope="module")
def params() -> Params:
    tree = json.loads(json.dumps(TINY_PARAMS))
    tree["periods"] = {"p01": {"previous": ""}, "p02": {"previous": "p01"}}
    tree["replay"] |= {"selection": "hard"}
    return params_from_dict(tree)


def dvc_driver(params: Params, shards: Path, out: Path) -> dict[str, tuple[str, str]]:
    from cssl_core.period import memory_matches
    from pipelines.dvc_stages import memory_root, model_dir, train_stage

    got = {}
    for period in PERIODS:
        train_stage(params, period, shards, out / "models", out / "memory")
        model = Embedder.load(model_dir(out / "models", period))
        memory = ReplayMemory.load(LocalStore(memory_root(out / "memory", period)), period)
        got[period] = (model.state_fingerprint(), memory.fingerprint)
        assert memory_matches(params, memory)  # made with these replay settings...
        bigger = params.model_copy(
            update={"replay": params.replay.model_copy(update={"capacity": 64})}
        )
        assert not memory_matches(bigger, memory)  # ...and with no others
    return got


def flow_driver(
    params: Params, shards: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, tuple[str, str]]:
    from prefect.logging import disable_run_logger

    from cssl_core.config import PeriodChain
    from cssl_core.evaluation.metrics import AccuracyMatrix
    from pipelines.refresh import LineageState, select_memory, train

    monkeypatch.setenv("CSSL_HOME", str(home))
    parent, memory, history = None, ReplayMemory.empty(params.replay.capacity), []
    got = {}
    with disable_run_logger():
        for period in PERIODS:
            shard = Shard.open(shards / period)
            shards_so_far = [*history, shard]
            names = [s.period for s in shards_so_far]
            state = LineageState(
                chain=PeriodChain(tuple(names)),
                champion=None,
                parent=parent,
                memory=memory,
                published=None,
                shards=shards_so_far,
                matrix=AccuracyMatrix(names),
                low=AccuracyMatrix(names),
                high=AccuracyMatrix(names),
            )
            trained = train.fn(params, period, shard, state)
            memory = select_memory.fn(params, period, shard, state, trained, True)
            parent = trained.model
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


def test_period_inputs_refuse_a_shard_or_a_memory_of_another_period(
    params: Params, sim_shards: Path
) -> None:
    p01, p02 = (Shard.open(sim_shards / p) for p in PERIODS)
    empty = ReplayMemory.empty(params.replay.capacity)
    with pytest.raises(ValueError, match="holds period 'p01', not 'p02'"):
        PeriodInputs(params=params, period="p02", shard=p01, memory=empty)
    with pytest.raises(ValueError, match="unknown period 'p09'"):
        PeriodInputs(params=params, period="p09", shard=p01, memory=empty)
    table = p02.read(split="train")
    of_p02 = empty.update(table, "p02", "reservoir", params.replay.capacity, seed=0)
    with pytest.raises(ValueError, match="continues from 'p01', but the replay memory given"):
        PeriodInputs(params=params, period="p02", shard=p02, memory=of_p02)
    inputs = PeriodInputs(params=params, period="p02", shard=p02, memory=empty, history=[p01])
    assert inputs.history == (p01,) and inputs.steps == params.train.steps
    assert inputs.strategy.uses_distill is False  # no parent given: plain SimCLR
