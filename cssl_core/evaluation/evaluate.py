"""Feature-based evaluation: kNN, linear probe and backward-compatible retrieval.

Every score here is computed from frozen backbone features (``model.features(x)``, shape
``(B, D)``) of labelled frames; nothing is model specific. One period is scored by
:func:`evaluate_periods` with the *same* features for the kNN classifier and the linear
probe, so the two numbers differ only by the classifier.

Labels are the ``category`` strings stored in shards. Frames without a category (``None``)
are unlabelled and excluded from every accuracy.

Besides the accuracies, :func:`evaluate_periods` keeps each eval frame's outcome
(:class:`~cssl_core.evaluation.outcomes.FrameOutcomes`): the same frames in the same order for
every model, so two models pair frame by frame and every accuracy gets a cluster-bootstrap
interval (:mod:`cssl_core.evaluation.intervals`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

from cssl_core.config import EvalConfig
from cssl_core.data.images import decode_batch
from cssl_core.data.shard import Shard
from cssl_core.evaluation.outcomes import FrameOutcomes, PeriodScores, majority_outcomes
from cssl_core.learn.augment import eval_transform

Precision = Literal["fp32", "bf16"]
ArrayLike = torch.Tensor | np.ndarray | Sequence[int]


# -- features ----------------------------------------------------------------------------
def extract_features(
    model: nn.Module,
    images: Sequence[bytes] | torch.Tensor,
    input_size: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: Precision = "fp32",
) -> torch.Tensor:
    """Backbone features of frames, float32 ``(N, D)`` on the CPU, not L2-normalised.

    ``images`` are encoded frames (decoded with :func:`cssl_core.data.images.decode_batch`:
    shorter side resized to ``input_size``, centre crop) or a uint8 ``(N, 3, H, W)`` tensor
    (resized and cropped the same way when not already ``input_size``). Pixels then go
    through :func:`cssl_core.learn.augment.eval_transform` (scale to ``[0, 1]``, ImageNet mean and
    std), the same transform serving uses.

    The model runs in eval mode under ``torch.inference_mode`` (its train/eval state is
    restored afterwards); it must already be on ``device``. ``precision="fp32"`` (the
    default) keeps features deterministic; ``"bf16"`` runs the forward under bf16 autocast.
    Decoding is per batch, so memory holds one batch of pixels.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    features_fn = getattr(model, "features", None)
    if not callable(features_fn):
        raise TypeError(f"{type(model).__name__} has no features(x) method to evaluate")
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"image tensor must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
    n = len(images)
    device = torch.device(device)
    outputs: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                chunk = images[start : start + batch_size]
                if isinstance(chunk, torch.Tensor):
                    pixels = chunk
                else:
                    pixels = decode_batch(list(chunk), input_size)
                x = eval_transform(pixels.to(device), input_size)
                with torch.autocast(
                    device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"
                ):
                    feats = features_fn(x)
                if feats.ndim != 2 or feats.shape[0] != x.shape[0]:
                    raise ValueError(
                        "model.features must return pooled (B, D) features, "
                        f"got {tuple(feats.shape)}"
                    )
                outputs.append(feats.float().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        raise ValueError("no images to extract features from")
    return torch.cat(outputs)


# -- labels ------------------------------------------------------------------------------
def encode_labels(labels: Sequence[str | None]) -> tuple[np.ndarray, list[str]]:
    """Category strings -> ``(codes, classes)``.

    ``classes`` is the sorted list of distinct categories and ``codes[k]`` the position of
    ``labels[k]`` in it, or ``-1`` for an unlabelled (``None``) frame. Sorting makes the codes
    independent of frame order.
    """
    classes = sorted({label for label in labels if label is not None})
    lookup = {name: code for code, name in enumerate(classes)}
    codes = np.array([-1 if label is None else lookup[label] for label in labels], dtype=np.int64)
    return codes, classes


def _feats(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {tuple(t.shape)}")
    return t


def _labels(y: ArrayLike, n: int, name: str, allow_negative: bool = False) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y)).to("cpu", torch.int64).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} labels for {n} feature rows")
    if not allow_negative and n and int(t.min()) < 0:
        raise ValueError(f"{name} contains negative (unlabelled) codes; drop those frames first")
    return t


def _num_classes(num_classes: int | None, *labels: torch.Tensor) -> int:
    needed = max(int(y.max()) for y in labels) + 1
    if num_classes is None:
        return needed
    if num_classes < needed:
        raise ValueError(f"num_classes={num_classes} but a label code is {needed - 1}")
    return num_classes


# -- kNN ---------------------------------------------------------------------------------
def knn_predict(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: ArrayLike,
    test_feats: torch.Tensor | np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    r"""Weighted kNN class predictions (Wu et al. 2018, InstDisc, Sec. 3.4; as in solo-learn).

    Features are L2-normalised, so similarity is cosine. For a test feature ``f`` with
    neighbours ``N_k(f)`` (the ``k`` most similar train features; all of them when ``k``
    exceeds the train set), each class ``c`` scores

    .. math:: w_c = \sum_{i \in N_k(f),\, y_i = c} \exp(s_i / \tau)

    and the prediction is ``argmax_c w_c`` (ties go to the lowest class code). Weights are
    computed as ``exp((s_i - s_max) / tau)``: a per-row constant factor that changes no
    prediction and cannot overflow for small ``tau``. Test rows are processed
    ``batch_size`` at a time, so memory is ``O(batch_size * N_train)``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    train = F.normalize(_feats(train_feats, "train_feats"), dim=1)
    test = F.normalize(_feats(test_feats, "test_feats"), dim=1)
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train features have D={train.shape[1]}, test D={test.shape[1]}")
    y = _labels(train_labels, train.shape[0], "train_labels")
    classes = _num_classes(num_classes, y)
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, test.shape[0], batch_size):
        sim = test[start : start + batch_size] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = torch.exp((top_sim - top_sim[:, :1]) / temperature)
        votes = torch.zeros(sim.shape[0], classes, dtype=torch.float32)
        votes.scatter_add_(1, y[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: ArrayLike,
    test_feats: torch.Tensor | np.ndarray,
    test_labels: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> float:
    """Top-1 accuracy of :func:`knn_predict` on labelled test features."""
    preds = knn_predict(train_feats, train_labels, test_feats, k, temperature, num_classes)
    y = _labels(test_labels, preds.shape[0], "test_labels")
    return float((preds == y).double().mean())


# -- linear probe ------------------------------------------------------------------------
def linear_probe_predict(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: ArrayLike,
    test_feats: torch.Tensor | np.ndarray,
    epochs: int = 100,
    lr: float = 0.1,
    seed: int = 0,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    num_classes: int | None = None,
    threads: int | None = 1,
) -> torch.Tensor:
    r"""Class predictions of multinomial logistic regression on frozen, standardised features.

    The linear evaluation protocol (Zhang et al. 2016; Chen et al. 2020, SimCLR, Sec. 4):
    features are standardised with the *train* mean and std (dimensions constant on train
    are only centred), then ``W x + b`` is fit with cross-entropy by mini-batch SGD
    (momentum 0.9, cosine-decayed learning rate, zero initialisation; the problem is convex).
    Shuffling uses a generator seeded with ``seed``, so the result is deterministic.
    ``num_classes`` (default: the largest train code + 1) sizes the output layer.

    ``threads`` caps torch's intra-op threads while fitting (restored afterwards; ``None``
    leaves them alone). The probe's matrices are too small to gain from threads, and on a
    busy CPU spinning threads made a 2000 x 512 probe about 5x slower (1.6 s vs 9 s, 2 cores).
    """
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
    x_train = _feats(train_feats, "train_feats")
    x_test = _feats(test_feats, "test_feats")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train features have D={x_train.shape[1]}, test D={x_test.shape[1]}")
    y_train = _labels(train_labels, x_train.shape[0], "train_labels")
    classes = _num_classes(num_classes, y_train)

    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std

    with _intra_op_threads(threads):
        return _fit_probe(
            x_train, y_train, x_test, classes, epochs, lr, seed, batch_size, weight_decay
        )


def linear_probe_accuracy(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: ArrayLike,
    test_feats: torch.Tensor | np.ndarray,
    test_labels: ArrayLike,
    epochs: int = 100,
    lr: float = 0.1,
    seed: int = 0,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    num_classes: int | None = None,
    threads: int | None = 1,
) -> float:
    """Top-1 test accuracy of :func:`linear_probe_predict` on labelled test features (a test
    class absent from train counts as an error)."""
    y_train = _labels(train_labels, _feats(train_feats, "train_feats").shape[0], "train_labels")
    y_test = _labels(test_labels, _feats(test_feats, "test_feats").shape[0], "test_labels")
    classes = _num_classes(num_classes, y_train, y_test)
    preds = linear_probe_predict(
        train_feats,
        y_train,
        test_feats,
        epochs=epochs,
        lr=lr,
        seed=seed,
        batch_size=batch_size,
        weight_decay=weight_decay,
        num_classes=classes,
        threads=threads,
    )
    return float((preds == y_test).double().mean())


@contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    classes: int,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int,
    weight_decay: float,
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    probe = nn.Linear(x_train.shape[1], classes)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = x_train.shape[0]
    steps_per_epoch = -(-n // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(probe(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        return probe(x_test).argmax(dim=1)


# -- backward compatibility --------------------------------------------------------------
def compatibility_top1(
    new_query_feats: torch.Tensor | np.ndarray,
    old_gallery_feats: torch.Tensor | np.ndarray,
    query_labels: ArrayLike,
    gallery_labels: ArrayLike,
    batch_size: int = 1024,
) -> float:
    r"""Top-1 retrieval accuracy of new-model queries against an old-model gallery.

    The backward-compatibility test of Shen et al. 2020, "Towards Backward-Compatible
    Representation Learning" (BCT), Sec. 3.1: a query ``q`` embedded by the new model
    retrieves its most cosine-similar gallery item embedded by the old model, and counts
    as correct when the labels match,

    .. math:: M(\phi_{new}, \phi_{old}) = \frac{1}{|Q|} \sum_{q \in Q}
              \mathbb{1}\left[y\left(\arg\max_{g \in G} \cos(\phi_{new}(q), \phi_{old}(g))\right)
              = y_q\right]

    The update is backward compatible when ``M(new, old) > M(old, old)`` (BCT's empirical
    criterion): downstream users can keep their old index. Pass the old model's features
    for both arguments to get ``M(old, old)``. Exact similarity ties go to the first
    gallery item.

    Unlabelled frames (code ``-1``): an unlabelled query has no right answer and is left out
    of ``Q``; an unlabelled gallery item stays in the index (it can be retrieved) but is
    never a hit. No labelled query at all is an error.
    """
    query = F.normalize(_feats(new_query_feats, "new_query_feats"), dim=1)
    gallery = F.normalize(_feats(old_gallery_feats, "old_gallery_feats"), dim=1)
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query features have D={query.shape[1]} but the gallery D={gallery.shape[1]}; "
            "backward compatibility needs both models to embed into the same space"
        )
    yq = _labels(query_labels, query.shape[0], "query_labels", allow_negative=True)
    yg = _labels(gallery_labels, gallery.shape[0], "gallery_labels", allow_negative=True)
    labelled = torch.nonzero(yq >= 0).flatten()
    if labelled.numel() == 0:
        raise ValueError("compatibility_top1: no labelled query (every query label is -1)")
    query, yq = query[labelled], yq[labelled]
    hits = 0
    for start in range(0, query.shape[0], batch_size):
        nearest = (query[start : start + batch_size] @ gallery.T).argmax(dim=1)
        hits += int((yg[nearest] == yq[start : start + batch_size]).sum())
    return hits / query.shape[0]


# -- periods -----------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSet:
    """One period's evaluation data: labelled reference (train) and eval (test) frames.

    ``test_frame_ids`` and ``test_stream_ids`` identify each eval frame and its stream (read
    from the shard by :func:`eval_set_from_shard`). A set built by hand may leave them out:
    frames are then named by position (``"#0"``, ``"#1"``, ...) and each frame is its own
    stream, which treats the frames as independent draws.
    """

    train_images: list[bytes]
    train_labels: list[str | None]
    test_images: list[bytes]
    test_labels: list[str | None]
    test_frame_ids: tuple[str, ...] | None = None
    test_stream_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.train_images) != len(self.train_labels):
            raise ValueError("train_images and train_labels differ in length")
        if len(self.test_images) != len(self.test_labels):
            raise ValueError("test_images and test_labels differ in length")
        n = len(self.test_images)
        for name in ("test_frame_ids", "test_stream_ids"):
            ids = getattr(self, name)
            if ids is not None:
                if len(ids) != n:
                    raise ValueError(f"{name} has {len(ids)} entries for {n} eval frames")
                object.__setattr__(self, name, tuple(str(i) for i in ids))

    @property
    def eval_frame_ids(self) -> tuple[str, ...]:
        """Each eval frame's id (its position ``#k`` when the set carries none)."""
        if self.test_frame_ids is not None:
            return self.test_frame_ids
        return tuple(f"#{k}" for k in range(len(self.test_images)))

    def eval_clusters(self, unit: Literal["stream", "frame"] = "stream") -> tuple[str, ...]:
        """Each eval frame's cluster id for the bootstrap: its stream (``unit="stream"``;
        its own id when the set carries no stream ids) or the frame itself."""
        if unit == "stream" and self.test_stream_ids is not None:
            return self.test_stream_ids
        if unit not in ("stream", "frame"):
            raise ValueError(f"cluster unit must be 'stream' or 'frame', got {unit!r}")
        return self.eval_frame_ids

    def labelled_eval(self) -> np.ndarray:
        """Positions of the labelled eval frames (the ones every accuracy is over)."""
        return np.array([k for k, y in enumerate(self.test_labels) if y is not None], dtype=int)


def _read_labelled(
    shard: Shard, split: str, keep: set[str] | None
) -> tuple[list[bytes], list[str | None], list[str], list[str]]:
    """``(images, categories, frame_ids, stream_ids)`` of the labelled frames of ``split``
    (those in ``keep`` when given), in ``frame_id`` order."""
    rows: list[tuple[str, str | None, bytes, str]] = []
    keep_arr = None if keep is None else pa.array(sorted(keep), type=pa.string())
    columns = ["frame_id", "category", "image", "stream_id"]
    for batch in shard.iter_batches(columns, split=split):
        mask = pc.is_valid(batch.column("category"))
        if keep_arr is not None:
            mask = pc.and_(mask, pc.is_in(batch.column("frame_id"), value_set=keep_arr))
        batch = batch.filter(mask)
        rows.extend(
            zip(
                batch.column("frame_id").to_pylist(),
                batch.column("category").to_pylist(),
                batch.column("image").to_pylist(),
                batch.column("stream_id").to_pylist(),
                strict=True,
            )
        )
    rows.sort(key=lambda r: r[0])
    return [r[2] for r in rows], [r[1] for r in rows], [r[0] for r in rows], [r[3] for r in rows]


def eval_set_from_shard(shard: Shard, max_train_frames: int, seed: int = 0) -> EvalSet:
    """Build a period's :class:`EvalSet` from its shard.

    Train: labelled ``split == "train"`` frames; when there are more than
    ``max_train_frames``, a uniform sample without replacement drawn with ``seed`` from the
    frames in ``frame_id`` order (so the choice does not depend on how the shard is split
    into parts). Test: every labelled ``split == "eval"`` frame, with its ``frame_id`` and
    ``stream_id``. Both are in ``frame_id`` order. Only the ids and categories are read to
    choose; images are read for chosen rows.
    """
    if max_train_frames < 1:
        raise ValueError(f"max_train_frames must be >= 1, got {max_train_frames}")
    meta = shard.read(["frame_id", "category"], split="train")
    ids = sorted(
        fid
        for fid, cat in zip(
            meta.column("frame_id").to_pylist(), meta.column("category").to_pylist(), strict=True
        )
        if cat is not None
    )
    if len(ids) > max_train_frames:
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(ids), size=max_train_frames, replace=False)
        keep: set[str] | None = {ids[i] for i in chosen}
    else:
        keep = set(ids)
    train_images, train_labels, _, _ = _read_labelled(shard, "train", keep)
    test_images, test_labels, test_ids, test_streams = _read_labelled(shard, "eval", None)
    return EvalSet(
        train_images, train_labels, test_images, test_labels, tuple(test_ids), tuple(test_streams)
    )


def majority_scores(es: EvalSet, cluster: Literal["stream", "frame"] = "stream") -> PeriodScores:
    """The blind majority-class baseline on one period: predict the most frequent category
    of the labelled reference (train) frames for every labelled eval frame
    (:func:`~cssl_core.evaluation.outcomes.majority_outcomes`). Same frames and order as
    :func:`evaluate_periods`, so it pairs with any model's outcomes."""
    keep = es.labelled_eval()
    if keep.size == 0:
        raise ValueError("majority baseline: the eval set has no labelled frame")
    frame_ids, clusters = es.eval_frame_ids, es.eval_clusters(cluster)
    outcomes = majority_outcomes(
        es.train_labels,
        [str(es.test_labels[k]) for k in keep],
        [frame_ids[k] for k in keep],
        [clusters[k] for k in keep],
    )
    acc = outcomes.accuracy("knn")
    return PeriodScores(knn=acc, linear=acc, frames=outcomes)


def evaluate_periods(
    model: nn.Module,
    eval_sets: Mapping[str, EvalSet],
    cfg: EvalConfig,
    input_size: int,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: Precision = "fp32",
    seed: int = 0,
) -> dict[str, PeriodScores]:
    """kNN and linear-probe accuracy on each period's eval set, from one feature pass, with
    the per-frame outcomes behind them.

    Per period, the train and test frames' features come from the same forward pass of
    ``model``; kNN uses ``cfg.knn_k`` / ``cfg.knn_temperature``, the probe
    ``cfg.probe_epochs`` / ``cfg.probe_lr`` and ``seed``. Class codes are shared between
    train and test, so a test category absent from the train frames counts as an error.
    Unlabelled frames are skipped; a period with no labelled train or test frame is an
    error naming it.

    Each result's ``frames`` (:class:`~cssl_core.evaluation.outcomes.FrameOutcomes`) lists
    the labelled eval frames in the eval set's order (``frame_id`` order for a set read
    from a shard) with both classifiers' correctness and the frame's cluster
    (``cfg.cluster``: its stream, or the frame itself): the same frames for every model, so
    two models' results on a period pair frame by frame.
    """
    scores: dict[str, PeriodScores] = {}
    for period, es in eval_sets.items():
        n_train = len(es.train_labels)
        codes, classes = encode_labels([*es.train_labels, *es.test_labels])
        train_codes, test_codes = codes[:n_train], codes[n_train:]
        train_keep = np.flatnonzero(train_codes >= 0)
        test_keep = np.flatnonzero(test_codes >= 0)
        if train_keep.size == 0 or test_keep.size == 0:
            raise ValueError(
                f"period {period!r}: {train_keep.size} labelled train and {test_keep.size} "
                "labelled eval frames; both must be > 0 to evaluate (check the shard's "
                "categories and eval split)"
            )
        images = [es.train_images[i] for i in train_keep] + [es.test_images[i] for i in test_keep]
        feats = extract_features(model, images, input_size, batch_size, device, precision)
        train_feats, test_feats = feats[: train_keep.size], feats[train_keep.size :]
        y_train, y_test = train_codes[train_keep], test_codes[test_keep]
        knn_pred = knn_predict(
            train_feats,
            y_train,
            test_feats,
            k=cfg.knn_k,
            temperature=cfg.knn_temperature,
            num_classes=len(classes),
        )
        linear_pred = linear_probe_predict(
            train_feats,
            y_train,
            test_feats,
            epochs=cfg.probe_epochs,
            lr=cfg.probe_lr,
            seed=seed,
            num_classes=len(classes),
        )
        frame_ids, clusters = es.eval_frame_ids, es.eval_clusters(cfg.cluster)
        outcomes = FrameOutcomes(
            tuple(frame_ids[k] for k in test_keep),
            tuple(clusters[k] for k in test_keep),
            tuple(str(es.test_labels[k]) for k in test_keep),
            knn_pred.numpy() == y_test,
            linear_pred.numpy() == y_test,
        )
        scores[period] = PeriodScores(
            knn=outcomes.accuracy("knn"), linear=outcomes.accuracy("linear"), frames=outcomes
        )
    return scores
