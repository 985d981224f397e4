"""Distillation terms looked up by name, and the typed outputs they read.

Each term declares the student head and the teacher output it needs; the trainer's forward
computes exactly that head, and the term combines the two views with the pure functions of
``cssl_core.learn.losses`` (whose formulas ``test_losses.py`` checks).
"""

from __future__ import annotations

import pytest
import torch

from cssl_core.config import AugmentConfig, ModelConfig, TrainConfig
from cssl_core.learn.distill import DISTILL_TERMS, distill_term
from cssl_core.learn.losses import feature_distill, nt_xent_distill, predictor_distill
from cssl_core.learn.models import Embedder, StudentOutputs, TeacherOutputs
from cssl_core.learn.trainer import ContinualTrainer

SMALL = ModelConfig(
    backbone="resnet10t", input_size=32, projector_hidden=64, projector_dim=32, predictor_hidden=64
)


def tensors(n: int, *shape: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def test_each_term_reads_its_head_and_teacher_output_and_combines_both_views() -> None:
    z1, z2, p1, p2, zt1, zt2 = tensors(6, 8, 16)
    q1, q2, f1, f2 = tensors(4, 8, 24, seed=1)
    student = StudentOutputs(z1=z1, z2=z2, p1=p1, p2=p2, q1=q1, q2=q2)
    teacher = TeacherOutputs(z1=zt1, z2=zt2, f1=f1, f2=f2)
    t = 0.3
    expected = {
        "predictor": predictor_distill(p1, p2, zt1, zt2, t),
        "nt_xent": (nt_xent_distill(z1, zt1, t) + nt_xent_distill(z2, zt2, t)) / 2,
        "feature": (feature_distill(q1, f1) + feature_distill(q2, f2)) / 2,
    }
    assert set(DISTILL_TERMS) == set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(distill_term(name)(student, teacher, t), want)
    heads = {n: (d.student_head, d.teacher_output) for n, d in DISTILL_TERMS.items()}
    assert heads == {
        "predictor": ("predictor", "projection"),
        "nt_xent": ("projection", "projection"),
        "feature": ("feature_predictor", "features"),
    }


def test_a_term_refuses_outputs_that_lack_what_it_reads() -> None:
    z1, z2 = tensors(2, 4, 8)
    with pytest.raises(RuntimeError, match="did not compute the predictor head"):
        distill_term("predictor")(StudentOutputs(z1=z1, z2=z2), TeacherOutputs(z1=z1, z2=z2), 1)
    with pytest.raises(RuntimeError, match="teacher's features were not computed"):
        student = StudentOutputs(z1=z1, z2=z2, q1=z1, q2=z2)
        distill_term("feature")(student, TeacherOutputs(z1=z1, z2=z2), 1)
    with pytest.raises(ValueError, match="unknown distillation loss 'ewc'.*predictor"):
        distill_term("ewc")


@pytest.mark.parametrize("loss", sorted(DISTILL_TERMS))
def test_the_training_forward_computes_exactly_the_heads_the_term_needs(loss: str) -> None:
    torch.manual_seed(0)
    model = Embedder(SMALL, ["a", "b"])
    cfg = TrainConfig(strategy="distill", distill_loss=loss, classifier=True, precision="fp32")
    trainer = ContinualTrainer(cfg, AugmentConfig(), model, teacher=model.frozen_copy())
    v1, v2 = tensors(2, 4, 3, 32, 32)
    out = trainer.build_forward()(v1, v2)
    head = DISTILL_TERMS[loss].student_head
    assert isinstance(out, StudentOutputs)
    assert out.z1.shape == out.z2.shape == (4, 32)
    assert (out.p1 is not None) == (head == "predictor")
    assert (out.q1 is not None) == (head == "feature_predictor")
    assert out.logits is not None and out.logits.shape == (4, 2)
    teacher = trainer._teacher_outputs(v1, v2)
    assert teacher is not None and teacher.logits is not None
    wanted = DISTILL_TERMS[loss].teacher_output
    assert (teacher.z1 is not None) == (wanted == "projection")
    assert (teacher.f1 is not None) == (wanted == "features")
    doubled = out.map(lambda x: 2 * x)
    torch.testing.assert_close(doubled.z1, 2 * out.z1)
    assert (doubled.p1 is None) == (out.p1 is None)


def test_without_distillation_no_teacher_runs_and_no_extra_head_is_computed() -> None:
    torch.manual_seed(0)
    model = Embedder(SMALL)
    trainer = ContinualTrainer(TrainConfig(strategy="replay"), AugmentConfig(), model)
    v1, v2 = tensors(2, 4, 3, 32, 32)
    out = trainer.build_forward()(v1, v2)
    assert (out.p1, out.q1, out.logits) == (None, None, None)
    assert trainer.distill is None and trainer._teacher_outputs(v1, v2) is None
