"""Benchmark: cssl's ``finetune`` training step against the library a user would otherwise pick.

Two SimCLR training loops on the same frames, in one process, one after the other:

* **lightly** (``pip install -e '.[peers]'``), written the way lightly's SimCLR tutorial writes
  it: a ``Dataset`` of the decoded frames (PIL images) whose ``__getitem__`` applies lightly's
  ``SimCLRTransform`` (two views per image, one image at a time), a torch ``DataLoader``
  (shuffled, ``drop_last``, ``workers`` processes), the timm backbone built exactly as cssl
  builds it (:func:`cssl_core.learn.models.create_backbone`) with lightly's
  ``SimCLRProjectionHead``, lightly's ``NTXentLoss``, and the same optimiser (SGD with
  ``train.lr``, ``momentum``, ``weight_decay``). fp32 and the default memory format, as the
  tutorial runs.
* **cssl**: :meth:`ContinualTrainer.fit` with strategy ``finetune`` as a period runs it (batched
  augmentation on decode-cached frames, ``train.precision`` and ``train.channels_last`` as
  the trainer resolves them: bf16 autocast and channels-last on a CPU with native bf16).

Both use ``model.input_size``, ``train.batch_size``, ``train.temperature``,
``train.num_threads`` (0: torch's default, all cores) and the SimCLR
augmentation of ``params.augment`` (crop scale, jitter strength and probability, grayscale,
blur). Each *run* is ``warmup`` untimed then ``steps`` timed steps (a step ends when its loss
is read back, as cssl's log reads it); the sides alternate for ``rounds`` rounds (lightly,
cssl, lightly, cssl, ...) so a change of load on the machine touches both. Reported: every
run's images/s, the mean per side, and ``ratio = cssl / lightly`` of the means.

Frames come from the Atari stream simulator, JPEG-encoded at ``model.input_size`` and
decoded once (the decode is outside both loops).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from benchmarks import machine
from benchmarks.train import simulated_frames
from cssl_core.config import AugmentConfig, Params, params_from_dict
from cssl_core.learn.models import Embedder, create_backbone
from cssl_core.learn.trainer import ContinualTrainer, FrameSource
from cssl_core.runtime import torch_threads

GOALS = {"AVX512-BF16": 1.5, "AVX2-only": 1.1}
"""cssl's finetune images/s over lightly's: the goal per CPU kind (native bf16, AVX2 only)."""


def lightly_transform(augment: AugmentConfig, size: int) -> Any:
    """lightly's ``SimCLRTransform`` set to cssl's augmentation: crop scale, colour jitter
    (strength ``s`` for brightness, contrast and saturation, ``hue`` for hue, applied with
    probability ``color_jitter_p``), grayscale and blur probabilities, horizontal flips."""
    from lightly.transforms import SimCLRTransform

    s = augment.color_jitter
    return SimCLRTransform(
        input_size=size,
        cj_prob=augment.color_jitter_p,
        cj_strength=1.0,
        cj_bright=s,
        cj_contrast=s,
        cj_sat=s,
        cj_hue=augment.hue,
        min_scale=augment.crop_scale_min,
        random_gray_scale=augment.grayscale_p,
        gaussian_blur=augment.blur_p,
        hf_prob=0.5,
    )


class ViewsDataset(Dataset[list[torch.Tensor]]):
    """Decoded frames as PIL images; each item is the transform's two views of one frame."""

    def __init__(self, frames: torch.Tensor, transform: Callable[[Any], list[torch.Tensor]]):
        from torchvision.transforms.functional import to_pil_image

        self.images = [to_pil_image(f) for f in frames]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        return self.transform(self.images[index])


class LightlySimCLR(nn.Module):
    """The timm backbone as cssl builds it plus lightly's SimCLR projection head."""

    def __init__(self, params: Params) -> None:
        super().__init__()
        from lightly.models.modules import SimCLRProjectionHead

        self.backbone = create_backbone(params.model)
        self.head = SimCLRProjectionHead(
            self.backbone.num_features, params.model.projector_hidden, params.model.projector_dim
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class LightlyLoop:
    """A plain lightly SimCLR training loop (module docstring); :meth:`run` times it."""

    def __init__(
        self, params: Params, frames: torch.Tensor, workers: int, device: torch.device
    ) -> None:
        from lightly.loss import NTXentLoss

        cfg = params.train
        torch.manual_seed(cfg.seed)
        self.device = device
        self.model = LightlySimCLR(params).to(device)
        self.criterion = NTXentLoss(temperature=cfg.temperature)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        dataset = ViewsDataset(frames, lightly_transform(params.augment, params.model.input_size))
        self.loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        self._batches = self._forever()

    def _forever(self) -> Iterator[list[torch.Tensor]]:
        while True:
            yield from self.loader

    def step(self) -> float:
        x0, x1 = next(self._batches)
        x0, x1 = x0.to(self.device), x1.to(self.device)
        loss = self.criterion(self.model(x0), self.model(x1))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.detach())

    def run(self, warmup: int, steps: int) -> float:
        """Seconds per step over ``steps`` steps after ``warmup`` untimed ones."""
        self.model.train()
        for _ in range(warmup):
            self.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - t0) / steps


class CsslLoop:
    """cssl's ``finetune`` period training (:class:`ContinualTrainer`), timed per step."""

    def __init__(self, params: Params, frames: FrameSource, device: torch.device) -> None:
        torch.manual_seed(params.train.seed)
        self.frames = frames
        self.trainer = ContinualTrainer(
            params.train, params.augment, Embedder(params.model), device=device
        )

    def run(self, warmup: int, steps: int) -> float:
        """Seconds per step over the last ``steps`` of one ``fit`` of ``warmup + steps``."""
        stamps: list[float] = []
        self.trainer.on_step = lambda _log, _rate: stamps.append(time.perf_counter())
        self.trainer.fit(self.frames, None, steps=warmup + steps)
        return (stamps[-1] - stamps[warmup - 1]) / steps


def run_peers_benchmark(
    params: Params | None = None,
    *,
    steps: int = 8,
    warmup: int = 2,
    rounds: int = 2,
    batch_size: int | None = None,
    num_frames: int = 512,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Alternate ``rounds`` runs of the lightly loop and of cssl's finetune step (module
    docs); each run is ``warmup`` untimed and ``steps`` timed steps."""
    if steps < 1 or warmup < 1 or rounds < 1:
        raise ValueError(f"need steps, warmup and rounds >= 1, got {steps}, {warmup}, {rounds}")
    t_start = time.perf_counter()
    say = progress or (lambda _line: None)
    tree = (params or Params()).model_dump(mode="json")
    tree["train"]["strategy"] = "finetune"
    if batch_size:
        tree["train"]["batch_size"] = batch_size
    params = params_from_dict(tree, "bench peers")
    batch, size = params.train.batch_size, params.model.input_size
    if num_frames < batch:
        raise ValueError(f"--frames {num_frames} must be at least the batch size {batch}")
    device = torch.device(device)
    load_before = machine.load_average()
    frames = FrameSource(simulated_frames(num_frames, size, 1), size)
    decoded = frames.get(torch.arange(len(frames)))
    lightly_loop = LightlyLoop(params, decoded, workers, device)
    cssl_loop = CsslLoop(params, frames, device)
    runs: dict[str, list[float]] = {"lightly": [], "cssl": []}
    with torch_threads(params.train.num_threads if device.type == "cpu" else 0):
        threads = torch.get_num_threads()
        for r in range(rounds):
            for side, loop in (("lightly", lightly_loop), ("cssl", cssl_loop)):
                rate = batch / loop.run(warmup, steps)
                runs[side].append(rate)
                say(f"round {r + 1}/{rounds}: {side} {rate:.1f} img/s")
    trainer = cssl_loop.trainer
    means = {side: statistics.fmean(rates) for side, rates in runs.items()}
    m = machine.describe()
    kind = next((k for k in GOALS if m["cpu_kind"].startswith(k)), None)
    ratio = means["cssl"] / means["lightly"]
    goal = {"cpu": kind, "ratio": GOALS[kind], "met": ratio >= GOALS[kind]} if kind else None
    return {
        "model": params.model.backbone,
        "input_size": size,
        "batch_size": batch,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "frames": num_frames,
        "device": str(device),
        "lightly": {
            "version": importlib.metadata.version("lightly"),
            "precision": "fp32",
            "channels_last": "off",
            "workers": workers,
            "images_per_s": runs["lightly"],
            "mean_images_per_s": means["lightly"],
        },
        "cssl": {
            "strategy": "finetune",
            "precision": "bf16" if trainer.autocast_dtype is not None else "fp32",
            "channels_last": "on" if trainer.channels_last else "off",
            "images_per_s": runs["cssl"],
            "mean_images_per_s": means["cssl"],
        },
        "ratio": ratio,
        "goal": goal,
        "machine": {
            **m,
            "torch": torch.__version__,
            "threads": threads,
            "load_average_before": load_before,
            "load_average_after": machine.load_average(),
        },
        "wall_s": time.perf_counter() - t_start,
    }


def format_peers_benchmark(result: dict[str, Any]) -> list[str]:
    """Human-readable lines for :func:`run_peers_benchmark`'s result."""
    m, lt, cs, goal = result["machine"], result["lightly"], result["cssl"], result["goal"]
    emulated = ", ".join(f"{k}={v}" for k, v in m["emulation"].items())

    def rates(side: dict[str, Any]) -> str:
        return ", ".join(f"{r:.1f}" for r in side["images_per_s"])

    return [
        f"peers: SimCLR on {result['model']} {result['input_size']} px, batch "
        f"{result['batch_size']}, {result['rounds']} alternating rounds of {result['warmup']} "
        f"warm-up + {result['steps']} timed steps, {result['device']}",
        f"machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), "
        f"{m['cpu_kind']}" + (f" [{emulated}]" if emulated else "") + f", torch {m['torch']}, "
        f"load average {m['load_average_before']:.2f} -> {m['load_average_after']:.2f}, wall "
        f"{result['wall_s']:.0f} s",
        f"lightly {lt['version']} (fp32, DataLoader with {lt['workers']} workers): "
        f"{lt['mean_images_per_s']:.1f} img/s (runs: {rates(lt)})",
        f"cssl finetune ({cs['precision']}, channels_last {cs['channels_last']}): "
        f"{cs['mean_images_per_s']:.1f} img/s (runs: {rates(cs)})",
        f"cssl / lightly: {result['ratio']:.2f}"
        + (
            f" (goal on an {goal['cpu']} CPU: >= {goal['ratio']}: "
            f"{'met' if goal['met'] else 'missed'})"
            if goal
            else " (no goal for this CPU kind)"
        ),
    ]


def run_from_args(params: Params, args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark for the options of :func:`benchmarks.cli.add_peers_arguments`."""
    from benchmarks.cli import progress

    return run_peers_benchmark(
        params,
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        batch_size=args.batch_size,
        num_frames=args.frames,
        workers=args.workers,
        device=args.device,
        progress=progress,
    )
