"""Losses against loop-based references kept here, exact limiting values, gradient flow."""

from __future__ import annotations

import math

import pytest
import torch

from cssl_core.learn.losses import (
    classifier_distill,
    feature_distill,
    nt_xent,
    nt_xent_distill,
    predictor_distill,
)

TEMPERATURES = (0.07, 0.2, 0.5, 1.0, 3.0)


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


# --- references: straightforward loops over anchors ------------------------------------------


def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        denominator = sum(math.exp(_cos(z[i], z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(_cos(z[i], z[j]) / tau) / denominator)
    return total / n2


def ref_infonce(anchors: torch.Tensor, candidates: torch.Tensor, tau: float) -> float:
    """Mean over anchors a of -log softmax_b(sim(anchor_a, candidate_b) / tau)[a]."""
    total = 0.0
    for a in range(anchors.shape[0]):
        scores = [math.exp(_cos(anchors[a], c) / tau) for c in candidates]
        total += -math.log(scores[a] / sum(scores))
    return total / anchors.shape[0]


def ref_predictor_distill(p1, p2, z1f, z2f, tau: float) -> float:
    # CaSSLe: simclr_distill(p, zf) + simclr_distill(zf, p), halved; candidates = all 2N rows
    p, zf = torch.cat([p1, p2]), torch.cat([z1f, z2f])
    return 0.5 * (ref_infonce(p, zf, tau) + ref_infonce(zf, p, tau))


def ref_feature_distill(p: torch.Tensor, f: torch.Tensor) -> float:
    return sum(1.0 - _cos(p[i], f[i]) for i in range(p.shape[0])) / p.shape[0]


def ref_classifier_distill(logits: torch.Tensor, logits_frozen: torch.Tensor, t: float) -> float:
    n, c_old = logits_frozen.shape
    total = 0.0
    for i in range(n):
        q_den = sum(math.exp(float(logits_frozen[i, c]) / t) for c in range(c_old))
        s_den = sum(math.exp(float(logits[i, c]) / t) for c in range(c_old))
        for c in range(c_old):
            q = math.exp(float(logits_frozen[i, c]) / t) / q_den
            s = math.exp(float(logits[i, c]) / t) / s_den
            total += q * (math.log(q) - math.log(s))
    return t * t * total / n


# --- agreement with the references ----------------------------------------------------------


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_nt_xent_matches_reference(tau: float) -> None:
    z1, z2 = _rand(6, 5, seed=1), _rand(6, 5, seed=2)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(ref_nt_xent(z1, z2, tau), rel=1e-12)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_predictor_distill_matches_reference(tau: float) -> None:
    p1, p2, z1f, z2f = (_rand(5, 7, seed=s) for s in (3, 4, 5, 6))
    got = predictor_distill(p1, p2, z1f, z2f, tau).item()
    assert got == pytest.approx(ref_predictor_distill(p1, p2, z1f, z2f, tau), rel=1e-12)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_nt_xent_distill_matches_reference(tau: float) -> None:
    z, zf = _rand(7, 4, seed=7), _rand(7, 4, seed=8)
    assert nt_xent_distill(z, zf, tau).item() == pytest.approx(ref_infonce(z, zf, tau), rel=1e-12)


def test_feature_distill_matches_reference() -> None:
    p, f = _rand(9, 6, seed=9), _rand(9, 6, seed=10)
    assert feature_distill(p, f).item() == pytest.approx(ref_feature_distill(p, f), rel=1e-12)


@pytest.mark.parametrize("t", (0.5, 1.0, 2.0, 4.0))
def test_classifier_distill_matches_reference_over_old_classes(t: float) -> None:
    logits, frozen = _rand(6, 5, seed=11) * 3, _rand(6, 3, seed=12) * 3
    got = classifier_distill(logits, frozen, t).item()
    assert got == pytest.approx(ref_classifier_distill(logits, frozen, t), rel=1e-12)


# --- exact values ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", (2, 3, 8))
@pytest.mark.parametrize("tau", TEMPERATURES)
def test_nt_xent_identical_views_orthogonal_images_closed_form(n: int, tau: float) -> None:
    # Positive similarity 1, the 2N - 2 negatives similarity 0, for every anchor:
    # L = -log(e^{1/tau} / (e^{1/tau} + 2N - 2)) = log(1 + (2N - 2) e^{-1/tau}).
    # -> 0 as tau -> 0 and -> log(2N - 1) as tau -> infinity.
    basis = torch.eye(n + 2, dtype=torch.float64)[:n]
    z1 = basis * torch.arange(1, n + 1, dtype=torch.float64)[:, None]  # norms do not matter
    expected = math.log1p((2 * n - 2) * math.exp(-1.0 / tau))
    assert nt_xent(z1, basis.clone(), tau).item() == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("n", (2, 5))
def test_nt_xent_orthogonal_limits(n: int) -> None:
    basis = torch.eye(n, dtype=torch.float64)
    assert nt_xent(basis, basis, 0.01).item() == pytest.approx(0.0, abs=1e-40)
    assert nt_xent(basis, basis, 1e9).item() == pytest.approx(math.log(2 * n - 1), rel=1e-8)


@pytest.mark.parametrize("n", (2, 4, 16))
@pytest.mark.parametrize("tau", TEMPERATURES)
def test_nt_xent_collapsed_embeddings_give_log_2n_minus_1(n: int, tau: float) -> None:
    # Every row the same direction: positive and all 2N - 2 negatives tie, so
    # L = -log(1 / (2N - 1)) exactly, at every temperature (lightly's "aligned" case).
    v = _rand(1, 6, seed=13)
    z = v.repeat(n, 1) * torch.linspace(0.5, 2.0, n, dtype=torch.float64)[:, None]
    assert nt_xent(z, z.flip(0), tau).item() == pytest.approx(math.log(2 * n - 1), rel=1e-12)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_predictor_distill_aligned_orthogonal_closed_form(tau: float) -> None:
    # 2N mutually orthogonal rows with p == z_frozen: each anchor has one positive (sim 1)
    # and 2N - 1 negatives (sim 0) in both directions: L = log(1 + (2N - 1) e^{-1/tau}).
    n = 3
    basis = torch.eye(2 * n, dtype=torch.float64)
    p1, p2 = basis[:n], basis[n:]
    got = predictor_distill(p1, p2, 2.0 * p1, 0.5 * p2, tau).item()
    assert got == pytest.approx(math.log1p((2 * n - 1) * math.exp(-1.0 / tau)), rel=1e-13)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_predictor_distill_other_view_of_same_image_is_a_negative(tau: float) -> None:
    # Both views identical and images orthogonal: the frozen projection of the OTHER view
    # ties with the positive, as in CaSSLe's implementation, so
    # L = -log(e^{1/tau} / (2 e^{1/tau} + 2N - 2)) = log(2 + (2N - 2) e^{-1/tau}).
    n = 4
    basis = torch.eye(n, dtype=torch.float64)
    got = predictor_distill(basis, basis, basis, basis, tau).item()
    assert got == pytest.approx(math.log(2 + (2 * n - 2) * math.exp(-1.0 / tau)), rel=1e-13)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_nt_xent_distill_exact_cases(tau: float) -> None:
    n = 5
    basis = torch.eye(n, dtype=torch.float64)
    aligned = nt_xent_distill(basis, 3.0 * basis, tau).item()
    assert aligned == pytest.approx(math.log1p((n - 1) * math.exp(-1.0 / tau)), rel=1e-13)
    collapsed = nt_xent_distill(basis, torch.ones(n, n, dtype=torch.float64), tau).item()
    assert collapsed == pytest.approx(math.log(n), rel=1e-13)


def test_feature_distill_exact_values() -> None:
    p = _rand(4, 3, seed=14)
    assert feature_distill(p, 5.0 * p).item() == pytest.approx(0.0, abs=1e-15)
    assert feature_distill(p, -p).item() == pytest.approx(2.0, rel=1e-15)
    e = torch.eye(2, dtype=torch.float64)
    assert feature_distill(e, e.flip(0)).item() == pytest.approx(1.0, rel=1e-15)


def test_classifier_distill_exact_values() -> None:
    frozen = _rand(4, 3, seed=15)
    new_columns = _rand(4, 2, seed=16) * 10
    # Same old logits, arbitrary new-class logits: zero (new classes are ignored).
    zero = classifier_distill(torch.cat([frozen, new_columns], dim=1), frozen, 2.0).item()
    assert zero == pytest.approx(0.0, abs=1e-15)
    # Two classes, uniform teacher, student logits (a, 0):
    # T^2 * sum_c 0.5 * (log 0.5 - log s_c), s = softmax((a / T, 0)).
    a, t = 3.0, 2.0
    s0 = 1.0 / (1.0 + math.exp(-a / t))
    expected = t * t * 0.5 * (2 * math.log(0.5) - math.log(s0) - math.log(1.0 - s0))
    logits = torch.tensor([[a, 0.0]], dtype=torch.float64)
    got = classifier_distill(logits, torch.zeros(1, 2, dtype=torch.float64), t).item()
    assert got == pytest.approx(expected, rel=1e-13)


# --- symmetries and invariances ---------------------------------------------------------------


def test_nt_xent_symmetries() -> None:
    z1, z2 = _rand(6, 4, seed=17), _rand(6, 4, seed=18)
    base = nt_xent(z1, z2, 0.2)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(nt_xent(z2, z1, 0.2), base, rtol=1e-13, atol=0)
    assert torch.allclose(nt_xent(z1[perm], z2[perm], 0.2), base, rtol=1e-13, atol=0)
    assert torch.allclose(nt_xent(3.0 * z1, 0.1 * z2, 0.2), base, rtol=1e-13, atol=0)


def test_predictor_distill_symmetries() -> None:
    p1, p2, z1f, z2f = (_rand(5, 4, seed=s) for s in (19, 20, 21, 22))
    base = predictor_distill(p1, p2, z1f, z2f, 0.2)
    swapped_views = predictor_distill(p2, p1, z2f, z1f, 0.2)
    swapped_roles = predictor_distill(z1f, z2f, p1, p2, 0.2)
    assert torch.allclose(swapped_views, base, rtol=1e-13, atol=0)
    assert torch.allclose(swapped_roles, base, rtol=1e-13, atol=0)


def test_float32_inputs_give_float32_losses() -> None:
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    assert nt_xent(z1, z2, 0.5).dtype == torch.float32
    assert predictor_distill(z1, z2, z2, z1, 0.5).dtype == torch.float32
    assert nt_xent_distill(z1, z2, 0.5).dtype == torch.float32


# --- gradients --------------------------------------------------------------------------------


def _leaf(seed: int, *shape: int) -> torch.Tensor:
    return _rand(*shape, seed=seed).requires_grad_(True)


def test_gradients_reach_only_the_current_model() -> None:
    p1, p2, z1f, z2f = (_leaf(s, 4, 5) for s in (23, 24, 25, 26))
    predictor_distill(p1, p2, z1f, z2f, 0.2).backward()
    assert z1f.grad is None and z2f.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0

    z, zf = _leaf(27, 4, 5), _leaf(28, 4, 5)
    nt_xent_distill(z, zf, 0.2).backward()
    assert zf.grad is None and z.grad.abs().sum() > 0

    p, f = _leaf(29, 4, 5), _leaf(30, 4, 5)
    feature_distill(p, f).backward()
    assert f.grad is None and p.grad.abs().sum() > 0

    logits, frozen = _leaf(31, 4, 6), _leaf(32, 4, 3)
    classifier_distill(logits, frozen, 2.0).backward()
    assert frozen.grad is None
    assert logits.grad[:, :3].abs().sum() > 0
    assert torch.equal(logits.grad[:, 3:], torch.zeros(4, 3, dtype=torch.float64))


def test_nt_xent_gradients_reach_both_views() -> None:
    z1, z2 = _leaf(33, 4, 5), _leaf(34, 4, 5)
    nt_xent(z1, z2, 0.3).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_analytic_gradients_match_finite_differences() -> None:
    z1, z2 = _leaf(35, 3, 4), _leaf(36, 3, 4)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.3), (z1, z2))
    p1, p2 = _leaf(37, 3, 4), _leaf(38, 3, 4)
    z1f, z2f = _rand(3, 4, seed=39), _rand(3, 4, seed=40)
    assert torch.autograd.gradcheck(lambda a, b: predictor_distill(a, b, z1f, z2f, 0.3), (p1, p2))


# --- argument errors --------------------------------------------------------------------------


def test_bad_arguments_are_rejected() -> None:
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(a, b, 0.1)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(a, a, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        predictor_distill(a, a, a, b, 0.1)
    with pytest.raises(ValueError, match="fewer than"):
        classifier_distill(torch.randn(4, 2), torch.randn(4, 3), 1.0)
