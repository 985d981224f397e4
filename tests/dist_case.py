"""The training case the distributed tests share: torchrun workers (``dist_worker.py``) and the
single-process reference in ``test_distributed.py`` build it identically.

Real frames (CIFAR-10 JPEGs from ``../shared/data``: 24 airplanes and 24 automobiles as the
period's frames, 12 other images as the replay memory), a small timm backbone (resnet10t at
32 px), fp32, strategy distill+replay with the Kaizen classifier on, so every gathered output
(projections, predictor outputs, teacher outputs, classifier logits) takes part. The global
batch of 12 has 9 new and 3 replay rows, so two ranks hold 7 and 5 rows: unequal slices.
"""

from __future__ import annotations

import copy
from typing import Any

import pyarrow.parquet as pq
import torch

from benchmarks.datasets import default_cifar10_source
from cssl_core.config import AugmentConfig, ModelConfig, TrainConfig
from cssl_core.learn.models import Embedder
from cssl_core.learn.trainer import ContinualTrainer, FrameSource

CIFAR_PARQUET = default_cifar10_source()  # $CSSL_CIFAR10, else ../shared/data beside the repo
SMALL = ModelConfig(
    backbone="resnet10t", input_size=32, projector_hidden=64, projector_dim=32, predictor_hidden=64
)
PER_CLASS = 5000  # rows per class in the file's train block


def frames() -> tuple[FrameSource, FrameSource]:
    table = pq.read_table(CIFAR_PARQUET, columns=["image", "label_name"])
    new_rows = [*range(24), *range(PER_CLASS, PER_CLASS + 24)]
    replay_rows = [2 * PER_CLASS + i for i in range(12)]
    new, old = table.take(new_rows), table.take(replay_rows)
    return (
        FrameSource(new.column("image").to_pylist(), 32, new.column("label_name").to_pylist()),
        FrameSource(old.column("image").to_pylist(), 32, old.column("label_name").to_pylist()),
    )


def train_cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        strategy="distill+replay",
        steps=1,
        batch_size=12,
        replay_ratio=0.25,
        lr=0.05,
        warmup_steps=1,
        checkpoint_every=2,
        precision="fp32",
        channels_last="off",
        classifier=True,
    )
    base.update(kw)
    return TrainConfig(**base)


def trainer(cfg: TrainConfig, rank: int = 0, world_size: int = 1, **kw: Any) -> ContinualTrainer:
    """A fresh student (with a grown classifier) and its frozen teacher, seeded."""
    torch.manual_seed(0)
    parent = Embedder(SMALL, ["airplane"])
    student = copy.deepcopy(parent)
    student.expand_classes(["airplane", "automobile"])
    return ContinualTrainer(
        cfg,
        AugmentConfig(),
        student,
        teacher=parent.frozen_copy(),
        rank=rank,
        world_size=world_size,
        **kw,
    )


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"grad.{n}": p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"w.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
