"""Losses of continual SimCLR, as pure functions of local tensors.

One concept per function, named and shaped after the papers. ``sim(a, b) = a.b / (|a| |b|)``
is cosine similarity and ``tau`` a temperature. Every argument called ``*_frozen`` comes from
the frozen previous model and is detached here, so no gradient can reach it even if the
caller forgets ``torch.no_grad()``.

No function here communicates across processes: under DistributedDataParallel each rank
computes the loss on its own batch. Gathering negatives across ranks, if wanted, must be
done explicitly (and autograd-aware) by the caller before calling these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must both be (N, D) with the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def cosine_logits(anchors: Tensor, candidates: Tensor, temperature: float) -> Tensor:
    """``(N, D), (M, D) -> (N, M)`` matrix of ``sim(anchor_i, candidate_j) / tau``."""
    return F.normalize(anchors, dim=1) @ F.normalize(candidates, dim=1).T / temperature


def nt_xent(z1: Tensor, z2: Tensor, temperature: float, reduction: str = "mean") -> Tensor:
    """SimCLR's NT-Xent loss (Chen et al., ICML 2020, eq. 1).

    The ``2N`` projections ``z = [z1; z2]`` are anchors; the positive of ``z_i`` is the other
    view of the same image, and the ``2N - 2`` other projections are its negatives::

        l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) )
        L = 1 / (2N) * sum_{k=1..N} [ l(k, N + k) + l(N + k, k) ]

    Args:
        z1: ``(N, D)`` projections of the first view.
        z2: ``(N, D)`` projections of the second view, row ``i`` the same image as ``z1[i]``.
        temperature: ``tau > 0``.
        reduction: ``"mean"`` (the loss) or ``"none"`` (``(2N,)`` per-anchor terms
            ``[l(1, N+1) .. l(N, 2N), l(N+1, 1) .. l(2N, N)]``, e.g. to score hard frames).

    Returns:
        Scalar loss, the mean over the ``2N`` anchors (or the per-anchor terms).
    """
    _check_pair("z1", z1, "z2", z2)
    _check_temperature(temperature)
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    logits = cosine_logits(z, z, temperature)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, positives, reduction=reduction)


def predictor_distill(
    p1: Tensor, p2: Tensor, z1_frozen: Tensor, z2_frozen: Tensor, temperature: float
) -> Tensor:
    """CaSSLe's contrastive distillation for SimCLR (Fini et al., "Self-Supervised Models are
    Continual Learners", CVPR 2022, Sec. 3: ``L_D = L_SSL(g(z), z_frozen)`` with the SimCLR
    loss as ``L_SSL``), as the authors' ``simclr_distill_loss_func`` computes it.

    The current model's projection of each view goes through the predictor ``g``
    (``p = g(z)``) and must identify the frozen model's projection ``zf`` of the SAME image
    and the SAME view among the frozen projections of the batch. With ``p = [p1; p2]`` and
    ``zf = [z1_frozen; z2_frozen]`` (``2N`` rows each, row ``a`` view ``a // N``)::

        l_pz(a) = -log( exp(sim(p_a, zf_a) / tau) / sum_{b=1..2N} exp(sim(p_a, zf_b) / tau) )
        l_zp(a) = -log( exp(sim(zf_a, p_a) / tau) / sum_{b=1..2N} exp(sim(zf_a, p_b) / tau) )
        L = 1/2 * [ 1/(2N) sum_a l_pz(a) + 1/(2N) sum_a l_zp(a) ]

    Negatives, exactly: for a predictor anchor ``p_a``, the ``2N - 1`` other FROZEN
    projections, including the frozen projection of the other view of the same image; for a
    frozen anchor ``zf_a``, the ``2N - 1`` other CURRENT predictions, including the other
    view's prediction of the same image. No current-current or frozen-frozen pairs appear.
    The second term is CaSSLe's swapped call ``loss(zf, p)``; both views enter as anchors,
    so the loss is symmetric in the two views. Gradients reach ``p`` only.

    Args:
        p1, p2: ``(N, D)`` predictor outputs of the current model for views 1 and 2.
        z1_frozen, z2_frozen: ``(N, D)`` frozen model projections of the same images/views.
        temperature: ``tau > 0`` (CaSSLe's ``distill_temperature``).
    """
    for name, t in (("p2", p2), ("z1_frozen", z1_frozen), ("z2_frozen", z2_frozen)):
        _check_pair("p1", p1, name, t)
    _check_temperature(temperature)
    p = torch.cat([p1, p2], dim=0)
    zf = torch.cat([z1_frozen, z2_frozen], dim=0).detach()
    logits = cosine_logits(p, zf, temperature)  # row a: anchor p_a, column b: zf_b
    targets = torch.arange(p.shape[0], device=p.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def nt_xent_distill(z: Tensor, z_frozen: Tensor, temperature: float) -> Tensor:
    """NT-Xent with frozen-teacher positives (self-supervised lifelong learning with
    knowledge distillation): the current embedding of image ``i`` must pick the frozen
    model's embedding of the same image among the frozen embeddings of the batch::

        L = -1/N * sum_i log( exp(sim(z_i, zf_i) / tau) / sum_{j=1..N} exp(sim(z_i, zf_j) / tau) )

    This is InfoNCE (van den Oord et al. 2018, eq. 4) with teacher embeddings as the keys,
    the form used by contrastive representation distillation. Negatives are the frozen
    embeddings of the other ``N - 1`` images only: no current-current negatives, and only the
    current side is an anchor (one direction). Gradients reach ``z`` only.

    Args:
        z: ``(N, D)`` current embeddings (a batch may stack several views as separate rows).
        z_frozen: ``(N, D)`` frozen model embeddings of the same rows.
        temperature: ``tau > 0``.
    """
    _check_pair("z", z, "z_frozen", z_frozen)
    _check_temperature(temperature)
    logits = cosine_logits(z, z_frozen.detach(), temperature)
    return F.cross_entropy(logits, torch.arange(z.shape[0], device=z.device))


def feature_distill(p: Tensor, f_frozen: Tensor) -> Tensor:
    """Cosine feature distillation of PFR ("Continually Learning Self-Supervised
    Representations with Projected Functional Regularization", Gomez-Villa et al., CVPR
    Workshops 2022, Sec. 3): the projected current features ``p = h(f)`` are pulled toward
    the frozen model's features::

        L = 1/N * sum_i ( 1 - sim(p_i, ff_i) )

    (PFR writes ``-sim``; the constant 1 makes the loss 0 at perfect alignment and changes
    no gradient.) Gradients reach ``p`` only.

    Args:
        p: ``(N, D)`` current features after the distillation projector.
        f_frozen: ``(N, D)`` frozen model features of the same images.
    """
    _check_pair("p", p, "f_frozen", f_frozen)
    return (1.0 - F.cosine_similarity(p, f_frozen.detach(), dim=1)).mean()


def compat_align(
    f1: Tensor, f2: Tensor, f1_frozen: Tensor, f2_frozen: Tensor, temperature: float
) -> Tensor:
    """Backward-compatible alignment of the backbone features: BCT's influence loss (Shen et
    al., "Towards Backward-Compatible Representation Learning", CVPR 2020, eq. 3:
    ``L(w_new, w_old_c) = L_new + lambda * L_old(phi_new; w_old_c)``, the new embedding scored
    by the OLD model's frozen classifier) carried over to self-supervised training.

    SimCLR has no classes, so the frozen "classifier" is the old model's embeddings of the
    batch's frames: each instance is its own class with the old feature ``ff_i`` as its
    prototype, and the new feature of a view must be classified as its own frame's old
    prototype among the batch's (InfoNCE, van den Oord et al. 2018, with frozen keys), per
    view ``v``, on the features the index stores (backbone, before the projector)::

        l_v = -1/N * sum_i log( exp(sim(f_vi, ff_vi) / tau)
                                / sum_{j=1..N} exp(sim(f_vi, ff_vj) / tau) )
        L = 1/2 * (l_1 + l_2)

    Ranking the old features, not matching them exactly, is what retrieval in an old index
    needs: the new query must be nearer its own frame's old embedding than the others'. The
    trainer adds ``compat.weight * L``. Gradients reach ``f1``/``f2`` only.

    Args:
        f1, f2: ``(N, D)`` current backbone features of views 1 and 2.
        f1_frozen, f2_frozen: ``(N, D)`` frozen parent's backbone features of the same views.
        temperature: ``tau > 0`` (``compat.temperature``).
    """
    return 0.5 * (
        nt_xent_distill(f1, f1_frozen, temperature) + nt_xent_distill(f2, f2_frozen, temperature)
    )


def classifier_distill(logits: Tensor, logits_frozen: Tensor, temperature: float) -> Tensor:
    """Kaizen's classifier distillation (Tang et al., WACV 2024): knowledge distillation
    (Hinton et al. 2015, eq. 1 and its ``T^2`` gradient scaling) of the frozen classifier's
    softened distribution into the current one, over the OLD classes only::

        q_i = softmax(yf_i / T),  s_i = softmax(y_i[:C_old] / T)
        L = T^2 / N * sum_i KL(q_i || s_i) = T^2 / N * sum_i sum_c q_ic (log q_ic - log s_ic)

    New classes (columns ``C_old:`` of ``logits``) are ignored. The supervised cross-entropy
    on stop-gradient features belongs to the trainer. Gradients reach ``logits`` only.

    Args:
        logits: ``(N, C)`` current classifier logits, ``C >= C_old``; the first ``C_old``
            columns are the old classes in the frozen classifier's order.
        logits_frozen: ``(N, C_old)`` frozen classifier logits.
        temperature: ``T > 0``.
    """
    _check_temperature(temperature)
    if logits.ndim != 2 or logits_frozen.ndim != 2 or logits.shape[0] != logits_frozen.shape[0]:
        raise ValueError(
            f"logits (N, C) and logits_frozen (N, C_old) need the same N, "
            f"got {tuple(logits.shape)} and {tuple(logits_frozen.shape)}"
        )
    old = logits_frozen.shape[1]
    if logits.shape[1] < old:
        raise ValueError(f"logits has {logits.shape[1]} classes, fewer than the {old} old ones")
    log_s = F.log_softmax(logits[:, :old] / temperature, dim=1)
    log_q = F.log_softmax(logits_frozen.detach() / temperature, dim=1)
    kl = F.kl_div(log_s, log_q, reduction="batchmean", log_target=True)
    return kl * temperature**2
