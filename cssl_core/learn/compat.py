r"""The query-side adapter of ``compat.mode: adapter``: a linear map from a new model's
features into its parent's, fitted in closed form after the period's training.

Downstream teams search an index of L2-normalised backbone features (``Embedder.features``,
what ``cssl embed``, the MLflow model and the LanceDB index hold). A refreshed model embeds
differently; instead of re-embedding the index, its queries can be mapped into the space the
index was embedded in. The map is fitted on frames both models see: the period's train frames
and the replay memory (frames of earlier periods, the old distribution the index holds), each
embedded with the evaluation transform (what serving does) by the new model (``x``,
normalised) and by the frozen parent (``y``, normalised). With rows ``x_i`` and ``y_i``, a
bias column, and the prior that nothing changed (the identity, ``W_0 = [I; 0]``; a student
starts as a copy of its parent), the ridge estimate is

.. math::

    \hat W = \arg\min_W \sum_i \lVert [x_i, 1] W - y_i \rVert^2 + \lambda \lVert W_{1:D} -
    I \rVert_F^2 = (A^\top A + \Lambda)^{-1} (A^\top Y + \Lambda W_0)

with ``A = [X, 1]``, ``Λ = diag(λ, ..., λ, 0)`` (the bias is not shrunk) and
``λ = compat.adapter_ridge · tr(XᵀX) / D`` (relative to the mean eigenvalue of the Gram
matrix, so it does not depend on the number of frames). It is solved in float64.

Why closed form after training rather than a head trained in the loop: the backbone moves
during the period, so features seen at early steps are stale targets; the fit on the final
model's features is exact for the model that is saved, deterministic, and costs one
inference pass of both models over at most ``2 × compat.adapter_frames`` frames. It never
changes the backbone: with ``adapter`` the model's own embedding is the ``none`` model's.

Why not CaSSLe's predictor: it maps the projector's output ``z`` (``projector_dim``) into
the parent's projections, not the backbone features the index stores. PFR's feature
predictor (``train.distill_loss: feature``) does map backbone features, but through
BatchNorm on augmented views with the moving student; the fitted map replaces it for serving.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from cssl_core.config import CompatConfig
from cssl_core.learn.models import Embedder


def ridge_to_identity(x: torch.Tensor, y: torch.Tensor, ridge: float) -> nn.Linear:
    """The ``nn.Linear`` of the module docstring's estimate: ``x (N, D_in)`` -> ``y (N,
    D_out)`` with a bias, shrunk toward the identity (toward zero when ``D_in != D_out``)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"x (N, D_in) and y (N, D_out) need the same N > 0, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    n, d_in = x.shape
    d_out = y.shape[1]
    a = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    yd = y.double()
    gram = a.T @ a
    lam = ridge * float(torch.trace(gram[:d_in, :d_in])) / d_in
    penalty = torch.full((d_in + 1,), lam, dtype=torch.float64)
    penalty[-1] = 0.0
    prior = torch.zeros(d_in + 1, d_out, dtype=torch.float64)
    if d_in == d_out:
        prior[:d_in] = torch.eye(d_in, dtype=torch.float64)
    w = torch.linalg.solve(gram + torch.diag(penalty), a.T @ yd + penalty[:, None] * prior)
    linear = nn.Linear(d_in, d_out)
    with torch.no_grad():
        linear.weight.copy_(w[:d_in].T.float())
        linear.bias.copy_(w[d_in].float())
    return linear


def _sample(images: list[bytes], limit: int, seed: int) -> list[bytes]:
    if len(images) <= limit:
        return images
    keep = np.sort(np.random.default_rng(seed).choice(len(images), size=limit, replace=False))
    return [images[i] for i in keep]


def fit_adapter(
    model: Embedder,
    parent: Embedder,
    tables: list[pa.Table],
    cfg: CompatConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> nn.Linear:
    """Fit ``model``'s adapter into ``parent``'s space on the frames of ``tables`` (each: an
    ``image`` column; at most ``cfg.adapter_frames`` of each, drawn with ``seed``) and attach
    it (:meth:`Embedder.set_adapter`). Both models must be on ``device``. Returns it."""
    from cssl_core.evaluation.evaluate import extract_features

    images: list[bytes] = []
    for k, table in enumerate(tables):
        if len(table):
            images += _sample(table.column("image").to_pylist(), cfg.adapter_frames, seed + k)
    if not images:
        raise ValueError("no frames to fit the adapter on")
    size = model.cfg.input_size
    x = F.normalize(extract_features(model, images, size, device=device), dim=1)
    y = F.normalize(extract_features(parent, images, parent.cfg.input_size, device=device), dim=1)
    adapter = ridge_to_identity(x, y, cfg.adapter_ridge)
    model.set_adapter(adapter, parent.state_fingerprint())
    return adapter


def query_adapter(model: Embedder) -> Callable[[np.ndarray], np.ndarray]:
    """``model``'s adapter as the new -> old callable an index search takes
    (``EmbeddingIndex.search(..., adapter=...)``): a float32 query ``(D,)`` or ``(N, D)`` of
    this model's embedding -> the same in its parent's space, L2-normalised. An error when
    the model has no adapter (``compat.mode`` other than ``adapter``)."""
    if model.adapter is None:
        raise ValueError(
            "this model has no adapter into its parent's space (train with compat.mode=adapter)"
        )

    def apply(query: np.ndarray) -> np.ndarray:
        q = torch.as_tensor(np.asarray(query, dtype=np.float32))
        rows = q.reshape(-1, q.shape[-1])
        with torch.no_grad():
            out = F.normalize(model.to_parent_space(rows), dim=1)
        return out.numpy().reshape(*q.shape[:-1], -1)

    return apply
