"""Distillation toward the frozen previous model, one small term per loss, looked up by name.

A :class:`DistillTerm` declares what it needs and how it combines it:

- ``student_head``: which two-view outputs of the current model it reads
  (:data:`~cssl_core.learn.models.Head`); the trainer computes that head in its forward;
- ``teacher_output``: what it takes from the frozen model (projections or features);
- ``loss``: ``(student_view1, student_view2, teacher_view1, teacher_view2, temperature)``
  -> scalar, built from the pure functions of :mod:`cssl_core.learn.losses`.

``train.distill_loss`` names one of :data:`DISTILL_TERMS`. Adding a loss is one pure function
in ``losses.py``, one entry here, and its test (``tests/test_losses.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from cssl_core.learn.losses import feature_distill, nt_xent_distill, predictor_distill
from cssl_core.learn.models import Head, StudentOutputs, TeacherOutput, TeacherOutputs

TermLoss = Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]


@dataclass(frozen=True)
class DistillTerm:
    """One distillation loss: what it reads from the student and the teacher, and the loss."""

    name: str
    student_head: Head
    teacher_output: TeacherOutput
    loss: TermLoss
    paper: str

    def __call__(
        self, student: StudentOutputs, teacher: TeacherOutputs, temperature: float
    ) -> Tensor:
        s1, s2 = student.pair(self.student_head)
        t1, t2 = teacher.pair(self.teacher_output)
        return self.loss(s1, s2, t1, t2, temperature)


def _predictor(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor, t: float) -> Tensor:
    return predictor_distill(p1, p2, z1, z2, t)


def _nt_xent(z1: Tensor, z2: Tensor, zf1: Tensor, zf2: Tensor, t: float) -> Tensor:
    """Each view against the frozen projections of the same view, averaged over the views."""
    return 0.5 * (nt_xent_distill(z1, zf1, t) + nt_xent_distill(z2, zf2, t))


def _feature(q1: Tensor, q2: Tensor, f1: Tensor, f2: Tensor, _t: float) -> Tensor:
    """Cosine distillation of each view's predicted features (no temperature)."""
    return 0.5 * (feature_distill(q1, f1) + feature_distill(q2, f2))


DISTILL_TERMS: dict[str, DistillTerm] = {
    term.name: term
    for term in (
        DistillTerm(
            "predictor", "predictor", "projection", _predictor, "CaSSLe (Fini et al., CVPR 2022)"
        ),
        DistillTerm(
            "nt_xent", "projection", "projection", _nt_xent, "InfoNCE with frozen-teacher keys"
        ),
        DistillTerm(
            "feature",
            "feature_predictor",
            "features",
            _feature,
            "PFR (Gomez-Villa et al., CVPR-W 2022)",
        ),
    )
}


def distill_term(name: str) -> DistillTerm:
    """The term called ``name``; a one-line error naming the valid choices otherwise."""
    try:
        return DISTILL_TERMS[name]
    except KeyError:
        raise ValueError(
            f"unknown distillation loss {name!r}; train.distill_loss is one of "
            f"{', '.join(DISTILL_TERMS)}"
        ) from None
