"""Data-parallel training under torchrun (gloo on CPU): a DDP step equals the single-process
step on the same global batch, ranks stay identical, an elastic restart resumes exactly, and
``train_period`` (the training of ``run_period``) fans out through torchrun and back.

The torchrun tests start real ``torchrun --standalone --nproc-per-node 2`` jobs of
``dist_worker.py`` (the training case is ``dist_case.py``: real CIFAR-10 frames, resnet10t at
32 px, fp32); each job runs once per session and several tests read its files.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import BIN, TINY_PARAMS
from dist_case import frames, grads, train_cfg, trainer, weights
from safetensors.torch import load_file

from cssl_core.config import (
    AugmentConfig,
    ConfigError,
    DistributedConfig,
    ModelConfig,
    Params,
    load_params,
    params_from_dict,
)
from cssl_core.data.shard import Shard
from cssl_core.learn import distributed as ddp
from cssl_core.learn.augment import SimCLRAugment
from cssl_core.learn.job import train_in_process
from cssl_core.learn.launch import torchrun_command
from cssl_core.learn.models import Embedder
from cssl_core.memory.replay import ReplayMemory
from cssl_core.period import PeriodInputs, new_model, train_period
from cssl_core.runtime import torch_threads

HERE = Path(__file__).resolve().parent
LOSSES = ("predictor", "nt_xent", "feature")
SMALL_MODEL = ModelConfig(input_size=32, projector_hidden=64, projector_dim=32, predictor_hidden=64)


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=timeout)


def rel_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], ref: dict) -> float:
    """``|a - b| / |b - ref|`` over the floating-point tensors: the gap between two runs as a
    share of how far training moved the weights."""
    keys = [k for k in b if b[k].is_floating_point()]
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in keys) ** 0.5
    den = sum(float(((b[k] - ref[k]) ** 2).sum()) for k in keys) ** 0.5
    return num / den


# -- pure pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize(("n_new", "n_replay", "world"), [(9, 3, 2), (8, 0, 2), (10, 5, 3)])
def test_rank_rows_partition_the_global_batch_and_global_order_restores_it(
    n_new: int, n_replay: int, world: int
) -> None:
    held = [ddp.rank_rows(n_new, n_replay, r, world) for r in range(world)]
    together = torch.cat(held)
    assert sorted(together.tolist()) == list(range(n_new + n_replay))
    assert [len(h) for h in held] == ddp.rank_sizes(n_new, n_replay, world)
    assert torch.equal(
        together[ddp.global_order(n_new, n_replay, world)], torch.arange(n_new + n_replay)
    )
    # each rank holds new rows first, then replay rows
    for h in held:
        is_new = h < n_new
        assert not (is_new[1:] & ~is_new[:-1]).any()
    assert torch.equal(ddp.rank_rows(n_new, n_replay, 0, 1), torch.arange(n_new + n_replay))


def test_sliced_augmentation_parameters_give_the_rows_of_the_global_views() -> None:
    """A rank augmenting its rows with the sliced global parameters gets exactly those rows
    of the global batch's views (the per-sample augmentation has no cross-row coupling)."""
    aug = SimCLRAugment(AugmentConfig(blur_p=0.5), 32)
    x = (torch.rand(7, 3, 40, 40, generator=torch.Generator().manual_seed(0)) * 255).byte()
    params = aug.sample(7, 40, 40, torch.Generator().manual_seed(1))
    whole = aug.view(x, params)
    rows = ddp.rank_rows(5, 2, 1, 2)
    part = aug.view(x[rows], ddp.slice_rows(params, rows))
    torch.testing.assert_close(part, whole[rows], atol=1e-6, rtol=0)


def test_combined_moments_of_groups_are_those_of_their_union() -> None:
    g = torch.Generator().manual_seed(0)
    groups = [torch.randn(n, 5, generator=g, dtype=torch.float64) * 3 + 1 for n in (7, 2, 4)]
    stats = [torch.var_mean(x, dim=0, correction=0) for x in groups]
    mean, var = ddp.combine_moments(
        torch.stack([m for _, m in stats]),
        torch.stack([v for v, _ in stats]),
        torch.tensor([[float(len(x))] for x in groups], dtype=torch.float64),
    )
    want_var, want_mean = torch.var_mean(torch.cat(groups), dim=0, correction=0)
    torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, want_var, rtol=1e-12, atol=1e-12)


def test_env_and_device_from_torchruns_variables() -> None:
    env = ddp.env_from(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "TORCHELASTIC_RESTART_COUNT": "2"}
    )
    assert (env.rank, env.world_size, env.local_rank, env.restart_count) == (3, 4, 1, 2)
    assert not env.is_main and env.active
    assert ddp.env_from({}) == ddp.DistEnv()
    assert ddp.resolve_device("cpu", env).type == "cpu"
    assert ddp.backend_for(torch.device("cpu")) == "gloo"
    assert ddp.backend_for(torch.device("cuda", 0)) == "nccl"


def test_alone_the_collectives_are_the_identity_and_global_bn_is_batchnorm() -> None:
    x = torch.randn(6, 4, requires_grad=True)
    assert ddp.to_global_batch(x, 4, 2) is x
    bn = torch.nn.Sequential(torch.nn.BatchNorm1d(4))
    converted = ddp.convert_batchnorm(bn, torch.device("cpu"))
    assert isinstance(converted[0], ddp.GlobalBatchNorm)
    assert converted[0].weight is bn[0].weight  # same parameters: the optimiser sees them
    ref = torch.nn.BatchNorm1d(4)
    torch.testing.assert_close(converted(x), ref(x))
    assert set(converted.state_dict()) == {f"0.{k}" for k in ref.state_dict()}


@pytest.mark.parametrize("backbone", ["regnetx_002", "resnet10t"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_batchnorm_conversion_keeps_every_backbone_exact(backbone: str, device: str) -> None:
    """Both conversion paths (global BN on CPU, SyncBatchNorm on GPUs; the model stays on the
    CPU, alone a converted layer is plain BN) give the original model's outputs in train and
    eval mode. regnetx_002 uses timm's BatchNormAct2d (BN with a fused activation), which a
    plain BN in its place would silently drop."""
    cfg = SMALL_MODEL.model_copy(update={"backbone": backbone})
    torch.manual_seed(0)
    original = Embedder(cfg)
    converted = ddp.convert_batchnorm(copy.deepcopy(original), torch.device(device))
    kinds = {type(m).__name__ for m in converted.modules()}
    assert not kinds & {"BatchNorm1d", "BatchNorm2d", "BatchNormAct2d"}, kinds
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for train in (True, False):
        original.train(train)
        converted.train(train)
        want, got = original(x), converted(x)
        torch.testing.assert_close(got.features, want.features, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.projection, want.projection, atol=1e-6, rtol=1e-6)
    assert set(converted.state_dict()) == set(original.state_dict())


def test_batchnorm_conversion_refuses_a_batchnorm_it_cannot_convert_exactly() -> None:
    from timm.layers.split_batchnorm import SplitBatchNorm2d

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), SplitBatchNorm2d(4, num_splits=2))
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="SplitBatchNorm2d"):
            ddp.convert_batchnorm(model, torch.device(device))


def test_the_gpu_jpeg_path_resizes_and_crops_like_the_cpu_path(cifar_jpegs: list[bytes]) -> None:
    """``_decode_jpeg_gpu`` run with torchvision's CPU decoder: same frames as
    ``decode_batch``'s CPU path (the GPU itself is not available here)."""
    from cssl_core.data.images import _decode_jpeg_gpu, decode_batch

    frames = cifar_jpegs[:6]
    for size in (32, 24):
        got = _decode_jpeg_gpu(frames, size, torch.device("cpu"))
        assert got is not None and torch.equal(got, decode_batch(frames, size))
    assert _decode_jpeg_gpu([b"not a jpeg"], 24, torch.device("cpu")) is None


def test_train_compile_wraps_the_training_forward_and_is_off_by_default() -> None:
    assert not train_cfg().compile
    plain = trainer(train_cfg()).build_forward()
    compiled = trainer(train_cfg(compile=True)).build_forward()
    assert type(plain).__name__ == "TwoViews"
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled._orig_mod.model is not None


def test_torchrun_command_standalone_and_multi_node() -> None:
    job = Path("/jobs/p01")
    one = torchrun_command(job, DistributedConfig(nproc_per_node=4), python="py")
    assert one[:3] == ["py", "-m", "torch.distributed.run"]
    assert "--standalone" in one and one[one.index("--nproc-per-node") + 1] == "4"
    assert one[-3:] == ["-m", "cssl_core.learn.launch", str(job)]
    cfg = DistributedConfig(nproc_per_node=8, nnodes=2, rdzv_endpoint="head:29400", rdzv_id="p01")
    many = torchrun_command(job, cfg, python="py")
    assert "--standalone" not in many
    for flag, value in [
        ("--nnodes", "2"),
        ("--rdzv-backend", "c10d"),
        ("--rdzv-endpoint", "head:29400"),
        ("--rdzv-id", "p01"),
        ("--max-restarts", "1"),
    ]:
        assert many[many.index(flag) + 1] == value


def test_distributed_config_needs_an_endpoint_for_nodes_and_does_not_change_the_hash() -> None:
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        load_params(None, ["distributed.nnodes=2"])
    two = load_params(None, ["distributed.nproc_per_node=2"])
    assert two.distributed.launches_processes and not Params().distributed.launches_processes
    assert two.config_hash() == Params().config_hash()  # placement, not the model


def test_scaling_efficiency_is_the_share_of_linear_speed_up() -> None:
    from benchmarks.scaling import scaling_efficiency

    assert scaling_efficiency(100.0, 200.0, 2) == 1.0
    assert scaling_efficiency(100.0, 150.0, 2) == 0.75
    assert scaling_efficiency(100.0, 80.0, 2) == 0.4  # slower with two: below one half
    with pytest.raises(ValueError):
        scaling_efficiency(0.0, 1.0, 2)


def test_cli_flags_become_distributed_overrides() -> None:
    from pipelines.cli import _params, build_parser

    args = build_parser().parse_args(
        [
            "refresh",
            "--period",
            "p01",
            "--nproc-per-node",
            "4",
            "--nnodes",
            "2",
            "--rdzv-endpoint",
            "head:29400",
        ]
    )
    d = _params(args).distributed
    assert (d.nproc_per_node, d.nnodes, d.rdzv_endpoint) == (4, 2, "head:29400")
    args = build_parser().parse_args(["train", "--period", "p01", "--nproc-per-node", "2"])
    assert _params(args).distributed.nproc_per_node == 2


# -- two processes under torchrun ------------------------------------------------------------


@pytest.fixture(scope="module")
def equivalence_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp-equivalence")
    proc = torchrun("dist_worker.py", "equivalence", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict[str, torch.Tensor] | list[float]]:
    """The same case in this process (rank 0 of 1): one step per loss, then the period."""
    new, old = frames()
    ref: dict = {}
    with torch_threads(1):  # as each rank runs; the count is restored for the tests after
        for loss in LOSSES:
            t = trainer(train_cfg(distill_loss=loss))
            result = t.fit(new, old)
            ref[f"grads-{loss}"], ref[f"loss-{loss}"] = grads(t.model), result.history[0].loss
        t = trainer(train_cfg(steps=4))
        ref["initial"] = weights(t.model)
        t.fit(new, old)
        ref["period"] = weights(t.model)
    return ref


@pytest.mark.parametrize("loss", LOSSES)
def test_one_ddp_step_has_the_single_process_loss_and_gradients(
    equivalence_run: Path, single_process: dict, loss: str
) -> None:
    expected = single_process[f"grads-{loss}"]
    head = {"predictor": "grad.predictor.", "feature": "grad.feature_predictor."}.get(loss)
    assert any(k.startswith("grad.classifier.") for k in expected)
    assert head is None or any(k.startswith(head) for k in expected)
    for rank in (0, 1):
        got = load_file(str(equivalence_run / f"step-{loss}-rank{rank}.safetensors"))
        log = json.loads((equivalence_run / f"step-{loss}-rank{rank}.json").read_text())
        assert log["loss"] == pytest.approx(single_process[f"loss-{loss}"], abs=1e-5)
        assert log["distill"] > 0 and log["classifier"] > 0
        assert set(got) == set(expected)
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_after_a_short_period_both_ranks_hold_the_same_weights_as_one_process(
    equivalence_run: Path, single_process: dict
) -> None:
    w0 = load_file(str(equivalence_run / "period-rank0.safetensors"))
    w1 = load_file(str(equivalence_run / "period-rank1.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # bit-identical replicas
    ref, initial = single_process["period"], single_process["initial"]
    assert rel_distance(w0, ref, initial) < 5e-3
    assert rel_distance(initial, ref, initial) == pytest.approx(1.0)  # training moved them


def test_a_killed_rank_is_restarted_and_the_job_resumes_from_the_checkpoint(
    tmp_path: Path,
) -> None:
    """Rank 1 SIGKILLs itself after step 3 (checkpoints every 2 steps): torchrun restarts
    both ranks, which resume at step 2 and end bit-identical to an uninterrupted run."""
    proc = torchrun("--max-restarts", "1", "dist_worker.py", "kill", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exitcode: -9" in proc.stderr or "Signals.SIGKILL" in proc.stderr
    for rank in (0, 1):
        info = json.loads((tmp_path / f"kill-rank{rank}.json").read_text())
        assert info == {"resumed_from": 2, "restart_count": 1, "steps_run": [2, 3, 4, 5]}
        resumed = load_file(str(tmp_path / f"resumed-rank{rank}.safetensors"))
        whole = load_file(str(tmp_path / f"whole-rank{rank}.safetensors"))
        assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert (tmp_path / "ckpt" / "step-000006.safetensors").is_file()


def test_train_period_with_two_processes_runs_torchrun_and_matches_one_process(
    sim_shards: Path, tmp_path: Path
) -> None:
    """The flow's path: ``train_period`` with ``distributed.nproc_per_node: 2`` launches
    torchrun, streams rank 0's progress, and returns rank 0's model."""
    tree = json.loads(json.dumps(TINY_PARAMS))
    tree["train"] |= {"steps": 2, "channels_last": "off"}
    params = params_from_dict(tree)
    two = params_from_dict({**tree, "distributed": {"nproc_per_node": 2}})
    shard = Shard.open(sim_shards / "p01")
    memory = ReplayMemory.empty(params.replay.capacity)
    seen: list[int] = []
    inputs = PeriodInputs(
        params=two, period="p01", shard=shard, memory=memory, checkpoint_dir=tmp_path / "ckpt"
    )
    model, result = train_period(
        inputs, on_step=lambda log, rate: seen.append(log.step) if rate > 0 else None
    )
    assert seen == [0, 1] and result.steps == 2 and result.resumed_from == 0
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000002.safetensors"]
    local, _ = train_in_process(
        PeriodInputs(params=params, period="p01", shard=shard, memory=memory)
    )
    got, ref, init = (m.state_dict() for m in (model, local, new_model(params)))
    assert rel_distance(got, ref, init) < 5e-3
    assert rel_distance(init, ref, init) == pytest.approx(1.0)


@pytest.mark.slow
def test_a_torchrun_period_asked_to_stop_checkpoints_and_resumes_bit_identical(
    sim_shards: Path, tmp_path: Path
) -> None:
    """``should_stop`` in the caller: torchrun gets SIGTERM, passes it to both ranks, which
    agree on one step, checkpoint it (rank 0) and exit; the caller raises
    TrainingInterrupted. The rerun resumes there and ends bit-identical to an uninterrupted
    two-process run."""
    from cssl_core.period import TrainingInterrupted

    tree = json.loads(json.dumps(TINY_PARAMS))
    tree["train"] |= {"steps": 6, "channels_last": "off", "checkpoint_every": 50}
    tree["distributed"] = {"nproc_per_node": 2}
    params = params_from_dict(tree)
    shard = Shard.open(sim_shards / "p01")

    def inputs(ckpt: Path) -> PeriodInputs:
        memory = ReplayMemory.empty(params.replay.capacity)
        return PeriodInputs(
            params=params, period="p01", shard=shard, memory=memory, checkpoint_dir=ckpt
        )

    whole, _ = train_period(inputs(tmp_path / "whole"))
    seen: list[int] = []
    with pytest.raises(TrainingInterrupted) as info:
        train_period(
            inputs(tmp_path / "ckpt"),
            on_step=lambda log, _rate: seen.append(log.step),
            should_stop=lambda: len(seen) >= 1,
        )
    k = info.value.step
    assert 1 <= k < 6 and info.value.checkpoint == tmp_path / "ckpt" / f"step-{k:06d}.safetensors"
    assert info.value.checkpoint.is_file()
    resumed, result = train_period(inputs(tmp_path / "ckpt"))
    assert result.resumed_from == k and result.steps == 6
    assert resumed.state_fingerprint() == whole.state_fingerprint()


@pytest.mark.slow
def test_cssl_refresh_with_nproc_per_node_2_trains_under_torchrun(
    sim_shards: Path, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    env = {"CSSL_HOME": str(tmp_path / "home"), "PATH": str(BIN), "HOME": str(tmp_path)}
    cmd = [
        str(BIN / "cssl"),
        "--json",
        "--debug",  # the flow's task log on stderr: torchrun's own lines go there (log_prints)
        "refresh",
        "--period",
        "p01",
        "--shard",
        str(sim_shards / "p01"),
        "--nproc-per-node",
        "2",
        *[a for o in tiny_overrides for a in ("--set", o)],
        "--set",
        f"store.root={tmp_path / 'store'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["period"] == "p01" and summary["version"] == 1 and summary["promoted"]
    assert "OMP_NUM_THREADS environment variable for each process" in proc.stderr  # torchrun


@pytest.mark.slow
def test_bench_scaling_measures_each_process_count_and_the_thread_baseline() -> None:
    from benchmarks.scaling import format_scaling_benchmark, run_scaling_benchmark

    tree = json.loads(json.dumps(TINY_PARAMS))
    result = run_scaling_benchmark(params_from_dict(tree), steps=1, warmup=1, frames=32)
    rows = {(r["procs"], r["threads"]): r for r in result["rows"]}
    assert set(rows) == {(1, 1), (2, 1), (1, 2)}
    assert rows[(1, 1)]["speedup"] == 1.0 and rows[(1, 1)]["efficiency"] == 1.0
    two = rows[(2, 1)]
    assert two["world_size"] == 2 and two["images_per_s"] > 0
    assert two["efficiency"] == pytest.approx(two["speedup"] / 2)
    assert len(format_scaling_benchmark(result)) == 2 + len(rows)
