"""Data-parallel training under ``torchrun``: the process group, DDP, and global-batch collectives.

``torchrun`` starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
(and ``MASTER_ADDR``/``MASTER_PORT``). Every rank derives the SAME description of the global
batch from ``(seed, step)``: frame indices, replay draw, augmentation parameters. Each rank then
decodes, augments and runs the model on its own rows only (:func:`rank_rows`), and the outputs
are gathered with gradients and put back in global order (:func:`to_global_batch`). So:

- every loss sees exactly the global batch a single process would (NT-Xent's negatives come
  from all ranks, as in SimCLR's multi-device training);
- BatchNorm normalises over the global batch (:class:`GlobalBatchNorm`; SimCLR's "global BN"),
  so activations equal the single-process ones;
- DDP's gradient average equals the single-process gradient. Every rank computes the same
  global loss ``L``; the backward of :func:`all_gather_rows` sums the gradient that each rank
  computed for the gathered rows (an all-reduce) and keeps the rank's own rows, so rank ``r``
  holds ``world_size * dL/dtheta`` restricted to its rows, and DDP's mean over ranks is
  ``sum_r dL/dtheta|rows_r = dL/dtheta``.

Without a process group (``world_size == 1``) every function here is the identity.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job (torchrun's environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints and results."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def env_from(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Read torchrun's variables; a plain process is rank 0 of 1."""
    return DistEnv(
        rank=int(environ.get("RANK", 0)),
        world_size=int(environ.get("WORLD_SIZE", 1)),
        local_rank=int(environ.get("LOCAL_RANK", 0)),
        restart_count=int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
    )


def resolve_device(choice: str, env: DistEnv) -> torch.device:
    """``cuda``/``auto`` with a GPU: this rank's GPU (``cuda:LOCAL_RANK``); otherwise the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no GPU")
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float = 600) -> None:
    """Join torchrun's process group (no-op for a single process or when already joined)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.active and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
        # One key space per elastic attempt: a restarted group must never read the addresses
        # the previous attempt's (dead) processes published in the agent's store.
        store = dist.PrefixStore(f"cssl/attempt-{env.restart_count}", store)
        dist.init_process_group(
            backend_for(device),
            store=store,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# -- which rows of the global batch a rank holds (pure) ------------------------------------


def rank_rows(n_new: int, n_replay: int, rank: int, world_size: int) -> Tensor:
    """Global rows held by ``rank``: an interleaved slice of the new frames (rows
    ``0..n_new-1``) and of the replay frames (rows ``n_new..``), as a DistributedSampler
    would give. ``world_size == 1`` gives every row in order."""
    new = torch.arange(n_new)[rank::world_size]
    replay = n_new + torch.arange(n_replay)[rank::world_size]
    return torch.cat([new, replay])


def rank_sizes(n_new: int, n_replay: int, world_size: int) -> list[int]:
    """Rows per rank, in rank order (every rank can compute every other rank's size)."""
    return [len(rank_rows(n_new, n_replay, r, world_size)) for r in range(world_size)]


def global_order(n_new: int, n_replay: int, world_size: int) -> Tensor:
    """Permutation ``p`` with ``gathered[p]`` in global row order, where ``gathered`` is the
    ranks' rows concatenated in rank order."""
    held = torch.cat([rank_rows(n_new, n_replay, r, world_size) for r in range(world_size)])
    return torch.argsort(held)


def slice_rows(obj: Any, rows: Tensor) -> Any:
    """Index every tensor field of a dataclass (e.g. augmentation parameters) by ``rows``."""
    updates = {
        f.name: getattr(obj, f.name)[rows]
        for f in dataclasses.fields(obj)
        if torch.is_tensor(getattr(obj, f.name))
    }
    return dataclasses.replace(obj, **updates)


# -- collectives with gradients ------------------------------------------------------------


class _GatherRows(torch.autograd.Function):
    """All-gather rows of different counts; backward all-reduces and keeps own rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: tuple[int, ...]) -> Tensor:
        rank = dist.get_rank()
        ctx.sizes, ctx.rank = sizes, rank
        longest = max(sizes)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_rows(x: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate every rank's ``x`` (rank ``r`` holds ``sizes[r]`` rows) on every rank,
    differentiably (see the module docstring for the gradient)."""
    if not _active():
        return x
    if x.shape[0] != sizes[dist.get_rank()]:
        raise ValueError(f"rank {dist.get_rank()} holds {x.shape[0]} rows, expected {sizes}")
    return _GatherRows.apply(x, tuple(sizes))


def to_global_batch(x: Tensor, n_new: int, n_replay: int) -> Tensor:
    """This rank's rows -> the whole global batch in global row order (identity alone)."""
    if not _active():
        return x
    world = dist.get_world_size()
    gathered = all_gather_rows(x, rank_sizes(n_new, n_replay, world))
    return gathered[global_order(n_new, n_replay, world).to(gathered.device)]


def combine_moments(means: Tensor, variances: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of a union of groups from each group's own (Chan et al.'s
    parallel formula): ``(W, C)`` means and biased variances, ``(W, 1)`` row counts ->
    ``(C,)`` mean ``sum n_i m_i / N`` and variance ``sum n_i (v_i + (m_i - m)^2) / N``.
    Differentiable; exact in real arithmetic, and stable (no ``E[x^2] - E[x]^2``)."""
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    return mean, var


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch across ranks.

    Each rank computes its rows' mean and biased variance per channel; one differentiable
    all-gather shares them (with the row counts), and :func:`combine_moments` gives the
    global batch's, so a step costs one collective forward and one backward per layer.
    Running statistics are updated with the unbiased variance, as
    :class:`torch.nn.BatchNorm2d` does. Works with any backend (gloo on CPU); on GPUs
    :func:`convert_batchnorm` uses torch's fused ``SyncBatchNorm`` instead. Alone, or in eval
    mode, it is a plain BatchNorm. The state-dict keys are BatchNorm's.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _active()):
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        local_var, local_mean = torch.var_mean(xf, dim=dims, correction=0)
        count = local_mean.new_full((1,), x.numel() / channels)
        stats = torch.cat([local_mean, local_var, count])[None]
        every = all_gather_rows(stats, [1] * dist.get_world_size())
        means, variances = every[:, :channels], every[:, channels : 2 * channels]
        counts = every[:, 2 * channels :].detach()
        mean, var = combine_moments(means, variances, counts)
        batches, running_mean, running_var = (
            self.num_batches_tracked,
            self.running_mean,
            self.running_var,
        )
        if (
            self.track_running_stats
            and batches is not None
            and running_mean is not None
            and running_var is not None
        ):
            n = float(counts.sum())
            with torch.no_grad():
                batches.add_(1)
                tracked = float(batches)
                m = 1.0 / tracked if self.momentum is None else self.momentum
                running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (n / max(1.0, n - 1))
                running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = (xf - mean.reshape(shape)) * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y.to(x.dtype)


class GlobalBatchNormAct2d(GlobalBatchNorm):
    """timm's ``BatchNormAct2d`` (BatchNorm, then dropout and a fused activation) with the
    global batch's statistics: :class:`GlobalBatchNorm`, then the original ``drop`` and
    ``act`` modules (carried over by :func:`convert_batchnorm`)."""

    def __init__(self, *args: Any, drop: nn.Module, act: nn.Module, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop, self.act = drop, act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ALREADY_GLOBAL = (GlobalBatchNorm, nn.SyncBatchNorm)


def _check_convertible(module: nn.Module) -> None:
    """Every BatchNorm in ``module`` must be one this module converts exactly: torch's plain
    BatchNorm layers and timm's ``BatchNormAct2d``. Anything else (a subclass with its own
    forward) would silently lose what its forward adds, so it is refused by name."""
    from timm.layers import BatchNormAct2d

    for name, child in module.named_modules():
        if not isinstance(child, nn.modules.batchnorm._BatchNorm):
            continue
        if type(child) in (*_PLAIN_BN, BatchNormAct2d) or isinstance(child, _ALREADY_GLOBAL):
            continue
        raise ValueError(
            f"cannot make {name or 'the model'} ({type(child).__name__}) a global-batch "
            "BatchNorm exactly; train this backbone with one process (distributed.nproc_per_node=1)"
        )


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm of ``module`` global across ranks (parameters and buffers are
    shared with the originals, so an optimiser and a checkpoint see the same tensors).

    On GPUs timm's ``convert_sync_batchnorm`` (torch's fused ``SyncBatchNorm``; timm's
    ``BatchNormAct2d`` becomes ``SyncBatchNormAct`` and keeps its activation), elsewhere
    :class:`GlobalBatchNorm` / :class:`GlobalBatchNormAct2d`. Alone (one process) a
    converted model computes exactly what the original does.
    """
    _check_convertible(module)
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(module)
    return _to_global(module)


def _to_global(module: nn.Module) -> nn.Module:
    from timm.layers import BatchNormAct2d

    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, _ALREADY_GLOBAL
    ):
        shape = (
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if isinstance(module, BatchNormAct2d):
            out = GlobalBatchNormAct2d(*shape, drop=module.drop, act=module.act)
        else:
            out = GlobalBatchNorm(*shape)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_global(child))
    return out


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``module`` when a process group is up (else ``module``).

    ``find_unused_parameters``: heads a strategy does not use (the PFR feature predictor under
    CaSSLe distillation, say) get no gradient, and DDP must know that to finish its reduction.
    """
    if not _active():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank (one all-reduce; the flag
    itself alone), so all ranks take the same branch, e.g. stopping after the same step."""
    if not _active():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if _active():
        dist.barrier()
