"""Per-frame scores a replay selection asks the current model for.

- :func:`embed_table`: L2-normalised backbone features (``diverse``: k-center in embedding
  space).
- :func:`ssl_loss_per_frame`: each frame's SimCLR loss (``hard``: keep the frames the model
  finds hardest).

Both are functions of a frame's content and the model only, never of where the frame falls
in the batching, so a selection does not depend on the batch size or the order of the rows.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from cssl_core.config import AugmentConfig
from cssl_core.data.images import decode_batch
from cssl_core.learn.augment import SimCLRAugment, ViewParams
from cssl_core.learn.models import Embedder

SCORE_ROWS = 1024
"""Anchors per block of the score's similarity matrix (bounds its memory to 2N x 1024)."""


def embed_table(model: Embedder, table: pa.Table, batch_size: int = 256) -> np.ndarray:
    """L2-normalised backbone features of a table's frames (for ``diverse`` selection)."""
    from cssl_core.evaluation.evaluate import extract_features

    images = table.column("image").to_pylist()
    feats = extract_features(model, images, model.cfg.input_size, batch_size=batch_size)
    return F.normalize(feats, dim=1).numpy()


def frame_generator(seed: int, frame_id: str) -> torch.Generator:
    """A generator that depends on (seed, frame id) only: a frame's views in scoring."""
    digest = hashlib.sha256(f"{seed}\x00{frame_id}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") % (2**63 - 1))
    return g


def _frame_views(
    augmenter: SimCLRAugment, frame_ids: list[str], seed: int, size: int
) -> tuple[ViewParams, ViewParams]:
    """Both views' parameters for each frame, drawn from the frame's own generator."""
    first, second = [], []
    for fid in frame_ids:
        g = frame_generator(seed, fid)
        first.append(augmenter.sample(1, size, size, g))
        second.append(augmenter.sample(1, size, size, g))

    def stack(params: list[ViewParams]) -> ViewParams:
        return ViewParams(
            **{
                f.name: torch.cat([getattr(p, f.name) for p in params])
                for f in dataclasses.fields(ViewParams)
            }
        )

    return stack(first), stack(second)


def nt_xent_against_all(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-frame NT-Xent where every anchor's negatives are ALL other views of the set.

    With ``z = [z1; z2]`` (``2N`` rows) and ``i'`` the other view of the same frame::

        l(i) = -log( exp(sim(z_i, z_i') / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) )
        score(frame f) = (l(f) + l(N + f)) / 2

    This is SimCLR's NT-Xent (Chen et al. 2020, eq. 1) with the whole scored set as one
    batch, computed in blocks of :data:`SCORE_ROWS` anchors so memory stays ``O(N)``: every
    frame of one selection is scored against the same ``2N - 2`` negatives. Returns ``(N,)``.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    per_anchor = torch.empty(2 * n, dtype=torch.float32)
    for start in range(0, 2 * n, SCORE_ROWS):
        rows = torch.arange(start, min(start + SCORE_ROWS, 2 * n))
        logits = z[rows] @ z.T / temperature
        logits[torch.arange(len(rows)), rows] = float("-inf")
        per_anchor[rows] = F.cross_entropy(logits, (rows + n) % (2 * n), reduction="none")
    return per_anchor.reshape(2, n).mean(0)


@torch.inference_mode()
def ssl_loss_per_frame(
    model: Embedder,
    augment: AugmentConfig,
    table: pa.Table,
    temperature: float,
    seed: int = 0,
    batch_size: int = 256,
) -> np.ndarray:
    """Each frame's SimCLR loss, higher = harder (for ``hard`` selection): ``(rows,)``.

    A frame's score must not depend on where it falls in the batching (a per-batch NT-Xent
    has a ``log(2B - 1)`` scale, so the frames of a short last batch, the tail of the newest
    period, would look easy and never be kept). So:

    - a frame's two views come from a generator seeded by ``(seed, frame_id)``;
    - the model runs in eval mode (BatchNorm uses its running statistics, not the batch's);
    - every frame is scored against the same negatives, all other views of ``table``
      (:func:`nt_xent_against_all`); ``batch_size`` only bounds the forward's memory.

    Scores are comparable within one call (one selection), which is all ``hard`` needs.
    """
    if "frame_id" not in table.column_names:
        raise ValueError("scoring frames needs their frame_id column (the views are seeded by it)")
    if table.num_rows == 0:
        return np.zeros(0, np.float32)
    size = model.cfg.input_size
    augmenter = SimCLRAugment(augment, size)
    images = table.column("image").to_pylist()
    ids = table.column("frame_id").to_pylist()
    was_training = model.training
    model.eval()
    z1, z2 = [], []
    try:
        for i in range(0, len(images), batch_size):
            x = decode_batch(images[i : i + batch_size], size)
            first, second = _frame_views(augmenter, ids[i : i + batch_size], seed, size)
            z1.append(model(augmenter.view(x, first)).projection.float())
            z2.append(model(augmenter.view(x, second)).projection.float())
    finally:
        model.train(was_training)
    return nt_xent_against_all(torch.cat(z1), torch.cat(z2), temperature).numpy()
