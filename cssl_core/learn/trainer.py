"""``ContinualTrainer``: one period of continual self-supervised training.

A step draws a batch of the period's frames (plus, for the replay strategies, a share of
frames from the replay memory), makes two SimCLR views, and minimises

    L = L_NT-Xent(z1, z2) + lambda_D * L_distill(current, frozen)  [+ lambda_C * L_classifier]
                                                                    [+ lambda_B * L_align]

where the distillation term (when the strategy distils, :mod:`cssl_core.learn.strategy`; the
term is ``train.distill_loss`` of :mod:`cssl_core.learn.distill`; over the whole batch, or
with ``train.distill_rows: replay`` over the replayed rows alone, so the frozen model runs on
those only: a cheaper step) pulls the current model
toward the frozen previous model. Everything that makes a step random (batch indices, replay
draw, augmentation) is derived from ``(seed, step)``, so a run resumed from a checkpoint ends
with exactly the weights of an uninterrupted run (on CPU). ``L_align``
(``compat.mode: align``, weight ``compat.weight``) is the BCT-style alignment of the backbone
features to the frozen parent's (:func:`cssl_core.learn.losses.compat_align`); the frozen
parent then runs on the batch whatever the strategy (on the distilled rows, see above).

Under bf16 autocast only the forward runs in bf16: its outputs are cast to fp32 and every loss
is computed with autocast off (a similarity matmul in bf16 is off by ~1e-3).

A caller can stop a run cleanly: ``fit(..., should_stop=...)`` is asked after every step; when
it says yes, rank 0 writes a checkpoint of that step and :class:`TrainingInterrupted` is raised,
so a rerun resumes there and ends bit-identical to an uninterrupted run.

Under torchrun (``rank``/``world_size`` set, a process group up) the trainer is data-parallel:
every rank derives the same global batch (indices, replay draw, augmentation parameters), runs
the model on its own rows inside DistributedDataParallel, and gathers the outputs with
gradients, so losses, BatchNorm statistics and gradients are those of the single-process step
on the same global batch (:mod:`cssl_core.learn.distributed`). Only rank 0 writes checkpoints; every
rank resumes from the newest one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from cssl_core.config import AugmentConfig, CompatConfig, TrainConfig
from cssl_core.data.images import decode_batch
from cssl_core.learn import distributed as ddp
from cssl_core.learn.augment import SimCLRAugment
from cssl_core.learn.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from cssl_core.learn.distill import DistillTerm, distill_term
from cssl_core.learn.losses import classifier_distill, compat_align, nt_xent
from cssl_core.learn.models import Embedder, StudentOutputs, TeacherOutputs
from cssl_core.learn.strategy import StrategySpec, strategy_spec
from cssl_core.memory.replay import replay_split


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the period stops and nothing is promoted."""


class TrainingInterrupted(RuntimeError):
    """The caller asked the run to stop (``should_stop``); rank 0 checkpointed ``step`` first,
    so a rerun with the same inputs resumes there. The caller should exit non-zero."""

    def __init__(self, step: int, total_steps: int, checkpoint: Path | None) -> None:
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint"
        super().__init__(
            f"training stopped on request after step {step} of {total_steps} ({where}); "
            "rerun the same command to resume"
        )
        self.step, self.total_steps, self.checkpoint = step, total_steps, checkpoint


# -- pure helpers ------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup to ``cfg.lr`` over ``warmup_steps``, then cosine decay to 0."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): the key to exact resume."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))
    return g


def batch_indices(
    n: int, batch: int, step: int, seed: int, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """Indices of the global batch at ``step``, sliced for ``rank``.

    Each epoch is a fresh permutation of ``range(n)`` seeded by (seed, epoch); steps walk
    through it in order, so every frame is seen once per epoch. With ``world_size`` ranks each
    takes an interleaved slice of the global batch (what a DistributedSampler would give).
    """
    if n <= 0:
        raise ValueError("no frames to train on")
    per_epoch = max(1, n // batch) if n >= batch else 1
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=step_generator(seed, epoch, stream=0))
    if n >= batch:
        idx = perm[offset * batch : (offset + 1) * batch]
    else:  # tiny sets: sample with replacement so the batch keeps its size
        idx = torch.randint(n, (batch,), generator=step_generator(seed, step, stream=1))
    return idx[rank::world_size]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU and on CPUs with native bf16 (AVX512-BF16/AMX); else fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else None


# -- data --------------------------------------------------------------------------------


class FrameSource:
    """Frames held as encoded bytes; decoded to uint8 tensors in bulk when they fit.

    ``cache_bytes`` bounds the decoded cache (64x64 frames cost 12 KiB each, so the demo's
    shards fit easily); above it, frames are decoded per batch and memory stays flat.
    """

    def __init__(
        self,
        images: list[bytes],
        size: int,
        labels: list[str | None] | None = None,
        cache_bytes: int = 2 * 1024**3,
        device: torch.device | str | None = None,
    ) -> None:
        self.encoded = images
        self.size = size
        self.labels = labels
        self.device = torch.device(device) if device is not None else None
        self._decoded: torch.Tensor | None = None
        if len(images) * 3 * size * size <= cache_bytes and images:
            self._decoded = decode_batch(images, size, device=self.device)

    @classmethod
    def from_table(cls, table: pa.Table, size: int, **kw: Any) -> FrameSource:
        labels = table.column("category").to_pylist() if "category" in table.column_names else None
        return cls(table.column("image").to_pylist(), size, labels, **kw)

    def __len__(self) -> int:
        return len(self.encoded)

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 ``(len(idx), 3, size, size)`` frames (on the GPU when decoded there)."""
        if self._decoded is not None:
            return self._decoded[idx.to(self._decoded.device)]
        return decode_batch([self.encoded[i] for i in idx.tolist()], self.size, self.device)

    def labels_at(self, idx: torch.Tensor) -> list[str | None]:
        if self.labels is None:
            return [None] * len(idx)
        return [self.labels[i] for i in idx.tolist()]


# -- the trainer -------------------------------------------------------------------------


@dataclass
class StepLog:
    step: int
    loss: float
    ssl: float
    distill: float
    classifier: float
    lr: float
    compat: float = 0.0


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    wall_seconds: float
    images_per_second: float
    history: list[StepLog] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.history[-1].loss if self.history else float("nan")


@dataclass(frozen=True)
class LossTerms:
    """The parts of one step's loss, as plain numbers (for the step log)."""

    ssl: float
    distill: float
    classifier: float
    compat: float = 0.0


class TwoViews(nn.Module):
    """One training forward: both views through the model and the heads the loss needs.

    DistributedDataParallel wraps this module: one call per step, and every head that gets a
    gradient runs inside it, so DDP sees each parameter's gradient. Returns
    :class:`~cssl_core.learn.models.StudentOutputs`: the projections always, the CaSSLe
    predictor (``predictor``) and PFR feature predictor (``feature_predictor``) outputs when
    asked for, and classifier logits on stop-gradient view-1 features (``classifier``).
    """

    def __init__(
        self,
        model: Embedder,
        predictor: bool,
        feature_predictor: bool,
        classifier: bool,
        features: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.predictor, self.feature_predictor = predictor, feature_predictor
        self.classifier = classifier
        self.features = features

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> StudentOutputs:
        model = self.model
        out1, out2 = model(v1), model(v2)
        z1, z2 = out1.projection, out2.projection
        return StudentOutputs(
            z1=z1,
            z2=z2,
            p1=model.predict(z1) if self.predictor else None,
            p2=model.predict(z2) if self.predictor else None,
            q1=model.predict_features(out1.features) if self.feature_predictor else None,
            q2=model.predict_features(out2.features) if self.feature_predictor else None,
            logits=model.classify(out1.features.detach()) if self.classifier else None,
            f1=out1.features if self.features else None,
            f2=out2.features if self.features else None,
        )


@dataclass
class ContinualTrainer:
    """Train ``model`` for one period.

    ``strategy`` is what this period does (default: the spec of ``cfg.strategy``; a period
    driver passes :meth:`StrategySpec.for_period`'s effective spec). ``teacher`` is the
    frozen previous model (required when the strategy distils); ``replay`` (in :meth:`fit`)
    holds the replay memory's frames (used when the strategy replays). ``rank`` and
    ``world_size`` place this process in a torchrun job (see the module docstring).
    ``compat`` adds the alignment term when its mode is ``align`` and there is a ``teacher``.
    """

    cfg: TrainConfig
    augment: AugmentConfig
    model: Embedder
    teacher: Embedder | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    checkpoint_dir: Path | None = None
    run_key: str = "run"
    rank: int = 0
    world_size: int = 1
    on_step: Callable[[StepLog, float], None] | None = None
    fail_at_step: int | None = None  # fault injection for tests: raise after this step
    strategy: StrategySpec | None = None
    compat: CompatConfig = field(default_factory=CompatConfig)

    def __post_init__(self) -> None:
        self.spec = self.strategy or strategy_spec(self.cfg.strategy)
        if self.spec.uses_distill and self.teacher is None:
            raise ValueError(f"strategy {self.spec.name!r} needs the frozen previous model")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world_size {self.world_size}")
        self.distill: DistillTerm | None = None
        if self.spec.uses_distill and self.cfg.distill_weight > 0:
            self.distill = distill_term(self.cfg.distill_loss)
        # The first period has no parent, hence no teacher and nothing to align with.
        self.align = (
            self.compat.mode == "align" and self.compat.weight > 0 and self.teacher is not None
        )
        self.autocast_dtype = resolve_precision(self.cfg.precision, self.device)
        cl = self.cfg.channels_last
        self.channels_last = cl == "on" or (cl == "auto" and self.autocast_dtype is not None)
        self.augmenter = SimCLRAugment(self.augment, self.model.cfg.input_size)
        self._layout = (0, 0)  # (new, replay) rows of the current global batch
        self._forward: nn.Module | None = None

    # -- setup ---------------------------------------------------------------------------
    def build_optimizer(self) -> torch.optim.Optimizer:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if self.cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=self.cfg.lr)
        if self.cfg.optimizer == "lars":
            from timm.optim import Lars

            return Lars(groups, lr=self.cfg.lr, momentum=self.cfg.momentum)
        return torch.optim.SGD(groups, lr=self.cfg.lr, momentum=self.cfg.momentum)

    def _uses_classifier(self) -> bool:
        return self.cfg.classifier and self.model.classifier is not None

    def build_forward(self) -> nn.Module:
        """The per-step forward module: :class:`TwoViews` with the heads the distillation
        term reads, in DDP under torchrun, compiled when ``train.compile`` is on."""
        head = self.distill.student_head if self.distill is not None else "projection"
        module: nn.Module = TwoViews(
            self.model,
            predictor=head == "predictor",
            feature_predictor=head == "feature_predictor",
            classifier=self._uses_classifier(),
            features=self.align,
        )
        module = ddp.wrap_ddp(module, self.device)
        if self.cfg.compile:
            module = cast(nn.Module, torch.compile(module))
        return module

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 frames to the training device: pinned memory and an asynchronous copy on
        GPUs (the views are then made there); unchanged on the CPU."""
        if self.device.type == "cuda" and x.device.type == "cpu":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x

    def _autocast(self) -> torch.autocast:
        """bf16 autocast for the forward when the precision asks for it (else a no-op)."""
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    # -- one step ------------------------------------------------------------------------
    def global_batch(
        self, step: int, frames: FrameSource, replay: FrameSource | None, n_new: int, n_replay: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame and replay indices of the whole global batch at ``step`` (same on every rank)."""
        idx = batch_indices(len(frames), n_new, step, self.cfg.seed)
        ridx = torch.zeros(0, dtype=torch.long)
        if n_replay:
            if replay is None:
                raise ValueError("a batch with replay rows needs the replay frames")
            ridx = torch.randperm(len(replay), generator=step_generator(self.cfg.seed, step, 2))
            ridx = ridx[:n_replay]
        return idx, ridx

    def local_views(
        self,
        step: int,
        frames: FrameSource,
        replay: FrameSource | None,
        idx: torch.Tensor,
        ridx: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's two views: its rows of the global batch, augmented with the global
        batch's parameters (drawn for every row from the step's generator, then sliced)."""
        r, w = self.rank, self.world_size
        x = frames.get(idx[r::w])
        if len(ridx):
            if replay is None:
                raise ValueError("a batch with replay rows needs the replay frames")
            x = torch.cat([x, replay.get(ridx[r::w]).to(x.device)])
        x = self._to_device(x)
        g = step_generator(self.cfg.seed, step, stream=3)
        total, size = len(idx) + len(ridx), frames.size
        first = self.augmenter.sample(total, size, size, g)
        second = self.augmenter.sample(total, size, size, g)
        if w > 1:
            rows = ddp.rank_rows(len(idx), len(ridx), r, w)
            first, second = ddp.slice_rows(first, rows), ddp.slice_rows(second, rows)
        v1, v2 = self.augmenter.view(x, first), self.augmenter.view(x, second)
        return self._prepare(v1), self._prepare(v2)

    def _global(self, x: torch.Tensor, layout: tuple[int, int] | None = None) -> torch.Tensor:
        """fp32, then this rank's rows -> the global batch (identity for one process);
        ``layout`` is ``(new, replay)`` rows of ``x`` across ranks (default: the batch's)."""
        return ddp.to_global_batch(x.float(), *(layout or self._layout))

    def _distils_replay_only(self) -> bool:
        """``train.distill_rows: replay`` with replayed rows in the batch."""
        return self.cfg.distill_rows == "replay" and self._layout[1] > 0

    def _distilled_rows(self) -> tuple[int, int]:
        """``(new, replay)`` rows the frozen model runs on: the replayed rows alone with
        ``distill_rows: replay``, else the whole batch."""
        return (0, self._layout[1]) if self._distils_replay_only() else self._layout

    def loss_terms(
        self, v1: torch.Tensor, v2: torch.Tensor, labels: list[str | None]
    ) -> tuple[torch.Tensor, LossTerms]:
        """The step's loss from this rank's views and the GLOBAL batch's labels.

        The forward (student and teacher) runs under the trainer's autocast; its outputs are
        cast to fp32 and gathered across ranks (identity for one process), and every loss is
        computed in fp32 with autocast off, on the global batch in global row order.
        """
        cfg = self.cfg
        forward = self._forward if self._forward is not None else self.build_forward()
        with self._autocast():
            local: StudentOutputs = forward(v1, v2)
            frozen_local = self._teacher_outputs(v1, v2)
        student = local.map(self._global)
        frozen = None
        if frozen_local is not None:
            frozen = frozen_local.map(lambda x: self._global(x, self._distilled_rows()))
        with torch.autocast(self.device.type, enabled=False):
            ssl = nt_xent(student.z1, student.z2, cfg.temperature)
            total = ssl
            distill = torch.zeros((), device=ssl.device)
            if self.distill is not None and frozen is not None:
                taught = student
                if self._distils_replay_only():
                    taught = student.map(lambda x: x[self._layout[0] :])
                distill = self.distill(taught, frozen, cfg.distill_temperature)
                total = total + cfg.distill_weight * distill
            align = torch.zeros((), device=ssl.device)
            if self.align and frozen is not None:
                taught = student
                if self._distils_replay_only():
                    taught = student.map(lambda x: x[self._layout[0] :])
                (f1, f2), (g1, g2) = taught.pair("features"), frozen.pair("features")
                align = compat_align(f1, f2, g1, g2, self.compat.temperature)
                total = total + self.compat.weight * align
            clf = torch.zeros((), device=ssl.device)
            if student.logits is not None:
                kept = frozen if self.distill is not None else None  # Kaizen distils with it
                clf = self._classifier_loss(student.logits, labels, kept)
                total = total + cfg.classifier_weight * clf
        terms = LossTerms(
            float(ssl.detach()), float(distill.detach()), float(clf.detach()), float(align.detach())
        )
        return total, terms

    @torch.no_grad()
    def _teacher_outputs(self, v1: torch.Tensor, v2: torch.Tensor) -> TeacherOutputs | None:
        """The frozen model on this rank's views: what the distillation term takes from it,
        and the old classifier's logits for Kaizen. None when nothing is distilled."""
        teacher = self.teacher
        if (self.distill is None and not self.align) or teacher is None:
            return None
        if self._distils_replay_only():  # this rank's replayed rows follow its new rows
            new_here = len(range(self._layout[0])[self.rank :: self.world_size])
            v1, v2 = v1[new_here:], v2[new_here:]
        f1, f2 = teacher(v1), teacher(v2)
        logits = None
        if self._uses_classifier() and teacher.classifier is not None and teacher.categories:
            logits = teacher.classify(f1.features)
        wants = {self.distill.teacher_output} if self.distill is not None else set()
        if self.align:
            wants.add("features")
        return TeacherOutputs(
            z1=f1.projection if "projection" in wants else None,
            z2=f2.projection if "projection" in wants else None,
            f1=f1.features if "features" in wants else None,
            f2=f2.features if "features" in wants else None,
            logits=logits,
        )

    def _classifier_loss(
        self,
        logits: torch.Tensor,
        labels: list[str | None],
        frozen: TeacherOutputs | None,
    ) -> torch.Tensor:
        """Kaizen: CE of the classifier on stop-gradient features (``logits``) plus
        distillation toward the frozen classifier on the old classes."""
        index = {c: i for i, c in enumerate(self.model.categories)}
        known = [(row, index[c]) for row, c in enumerate(labels) if c is not None and c in index]
        loss = torch.zeros((), device=logits.device)
        if known:
            rows = [row for row, _ in known]
            target = torch.tensor([k for _, k in known], device=logits.device)
            loss = F.cross_entropy(logits[rows], target)
        if frozen is not None and frozen.logits is not None:
            n_old = frozen.logits.shape[1]
            taught = logits[self._layout[0] :] if self._distils_replay_only() else logits
            loss = loss + classifier_distill(
                taught[:, :n_old], frozen.logits, self.cfg.classifier_temperature
            )
        return loss

    # -- the loop ------------------------------------------------------------------------
    def fit(
        self,
        frames: FrameSource,
        replay: FrameSource | None = None,
        steps: int | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        """Train for ``steps`` (default ``cfg.steps``), resuming this run's newest checkpoint.

        ``should_stop`` is asked after every step (under torchrun, the ranks agree: any rank's
        yes stops all of them); a yes checkpoints that step (rank 0, when there is a
        checkpoint directory) and raises :class:`TrainingInterrupted`.
        """
        cfg = self.cfg
        total_steps = steps if steps is not None else cfg.steps
        model = self.model.to(self.device)
        if self.world_size > 1:
            ddp.convert_batchnorm(model, self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.teacher is not None:
            self.teacher.to(self.device)
            if self.channels_last:
                self.teacher.to(memory_format=torch.channels_last)
            self.teacher.eval()
        optimizer = self.build_optimizer()
        start = 0
        ckpt = latest_checkpoint(self.checkpoint_dir, self.run_key)
        if ckpt is not None:
            start = load_checkpoint(ckpt, model, optimizer)
        use_replay = self.spec.uses_replay and replay is not None and len(replay) > 0
        n_new, n_replay = replay_split(
            cfg.batch_size, cfg.replay_ratio, len(replay) if use_replay and replay else 0
        )
        if n_new < self.world_size:
            raise ValueError(
                f"a global batch of {n_new} new frames cannot be split over {self.world_size} "
                "processes: raise train.batch_size or lower the process count"
            )
        self._layout = (n_new, n_replay)
        model.train()
        self._forward = self.build_forward()  # DDP broadcasts rank 0's weights here
        history: list[StepLog] = []
        t0 = time.perf_counter()
        seen = 0
        try:
            for step in range(start, total_steps):
                idx, ridx = self.global_batch(step, frames, replay, n_new, n_replay)
                labels = frames.labels_at(idx) + (replay.labels_at(ridx) if replay else [])
                v1, v2 = self.local_views(step, frames, replay, idx, ridx)
                lr = lr_at(step, cfg, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, terms = self.loss_terms(v1, v2, labels)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(
                        f"loss became {loss_value} at step {step} (lr {lr:.4g}); nothing was "
                        "promoted: lower train.lr or check the shard"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += n_new + n_replay
                log = StepLog(
                    step, loss_value, terms.ssl, terms.distill, terms.classifier, lr, terms.compat
                )
                history.append(log)
                if self.on_step is not None:
                    self.on_step(log, seen / max(1e-9, time.perf_counter() - t0))
                done = step + 1
                saved = None
                if (
                    self.rank == 0
                    and self.checkpoint_dir is not None
                    and (done % cfg.checkpoint_every == 0 or done == total_steps)
                ):
                    saved = save_checkpoint(
                        self.checkpoint_dir, done, model, optimizer, self.run_key
                    )
                if self.fail_at_step is not None and done >= self.fail_at_step:
                    raise RuntimeError(f"injected failure after step {done}")
                if should_stop is not None and done < total_steps:
                    if ddp.any_rank(should_stop(), self.device):
                        if saved is None and self.rank == 0 and self.checkpoint_dir is not None:
                            saved = save_checkpoint(
                                self.checkpoint_dir, done, model, optimizer, self.run_key
                            )
                        ddp.barrier()  # every rank leaves after rank 0's checkpoint is down
                        raise TrainingInterrupted(done, total_steps, saved)
        finally:
            self._forward = None
        wall = time.perf_counter() - t0
        if self.channels_last:
            model.to(memory_format=torch.contiguous_format)
        model.eval()
        return TrainResult(
            steps=total_steps,
            resumed_from=start,
            wall_seconds=wall,
            images_per_second=seen / wall if wall > 0 else 0.0,
            history=history,
        )
