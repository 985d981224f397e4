"""kNN, linear probe, BCT compatibility and per-period evaluation on real (small) data."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cssl_core.config import EvalConfig, ModelConfig
from cssl_core.data.images import encode_jpeg, frame_id
from cssl_core.data.shard import Frame, Shard, ShardWriter
from cssl_core.evaluation.evaluate import (
    EvalSet,
    PeriodScores,
    compatibility_top1,
    encode_labels,
    eval_set_from_shard,
    evaluate_periods,
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe_accuracy,
    majority_scores,
)
from cssl_core.evaluation.outcomes import FrameOutcomes
from cssl_core.learn.augment import IMAGENET_MEAN, IMAGENET_STD
from cssl_core.learn.models import Embedder


# -- helpers -----------------------------------------------------------------------------
def clusters(
    n: int, num_classes: int, dim: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` points around ``num_classes`` random unit centres; returns (x, y, centres)."""
    g = torch.Generator().manual_seed(seed)
    centres = nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    y = torch.arange(n) % num_classes
    x = centres[y] + noise * torch.randn(n, dim, generator=g)
    return x, y, centres


def knn_reference(
    train: np.ndarray, train_y: np.ndarray, test: np.ndarray, k: int, tau: float, classes: int
) -> np.ndarray:
    """Weighted kNN written out one test point at a time, in float64."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    preds = []
    for f in test:
        sims = [float(np.dot(f, t)) for t in train]
        nearest = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * classes
        for i in nearest:
            votes[int(train_y[i])] += math.exp(sims[i] / tau)
        preds.append(max(range(classes), key=lambda c: (votes[c], -c)))
    return np.array(preds)


class ChannelMean(nn.Module):
    """``features(x)`` = per-channel mean of the normalised input: makes normalisation visible."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


COLOURS = {
    "red": (215, 35, 30),
    "green": (35, 190, 45),
    "blue": (30, 45, 215),
    "gold": (220, 190, 40),
}


def colour_jpeg(name: str, rng: np.random.Generator, size: int = 32) -> bytes:
    base = np.array(COLOURS[name], dtype=np.float64)[None, None, :]
    pixels = np.clip(base + rng.normal(0.0, 35.0, (size, size, 3)), 0, 255).astype(np.uint8)
    return encode_jpeg(pixels, quality=90)


def tiny_embedder() -> Embedder:
    torch.manual_seed(0)
    cfg = ModelConfig(
        backbone="resnet10t",
        input_size=32,
        projector_hidden=16,
        projector_dim=8,
        predictor_hidden=16,
    )
    return Embedder(cfg)


# -- labels ------------------------------------------------------------------------------
def test_encode_labels_sorted_with_unlabelled_as_minus_one() -> None:
    codes, classes = encode_labels(["b", None, "a", "b", "c"])
    assert classes == ["a", "b", "c"]
    assert codes.tolist() == [1, -1, 0, 1, 2]
    assert codes.dtype == np.int64
    empty, none = encode_labels([None, None])
    assert empty.tolist() == [-1, -1] and none == []


# -- kNN ---------------------------------------------------------------------------------
def test_knn_matches_brute_force_reference_exactly() -> None:
    x, y, _ = clusters(150, 5, 8, noise=0.45, seed=1)
    train_x, train_y, test_x = x[:100], y[:100], x[100:]
    for k, tau in [(1, 0.07), (5, 0.07), (20, 0.5)]:
        ours = knn_predict(train_x, train_y, test_x, k=k, temperature=tau, batch_size=7)
        ref = knn_reference(train_x.numpy(), train_y.numpy(), test_x.numpy(), k, tau, 5)
        assert ours.tolist() == ref.tolist(), (k, tau)
    # The noise makes some errors, so the comparison above covers wrong predictions too.
    acc = knn_accuracy(train_x, train_y, test_x, y[100:], k=5)
    assert 0.5 < acc < 1.0


def test_knn_with_k_larger_than_train_set_uses_every_train_point() -> None:
    x, y, _ = clusters(30, 3, 6, noise=0.6, seed=2)
    big = knn_predict(x[:10], y[:10], x[10:], k=1000, temperature=0.3)
    ref = knn_reference(x[:10].numpy(), y[:10].numpy(), x[10:].numpy(), 10, 0.3, 3)
    assert big.tolist() == ref.tolist()


def test_knn_temperature_decides_between_many_far_and_one_close_neighbour() -> None:
    query = torch.tensor([[1.0, 0.0]])
    angle = math.acos(0.5)  # two class-0 points at cosine 0.5, one class-1 point at 0.99
    train = torch.tensor(
        [
            [math.cos(angle), math.sin(angle)],
            [math.cos(angle), -math.sin(angle)],
            [0.99, math.sqrt(1 - 0.99**2)],
        ]
    )
    labels = torch.tensor([0, 0, 1])
    # tau = 0.07: class 1 scores exp(0.99/0.07) = e^14.1 > class 0: 2 e^(0.5/0.07) = 2 e^7.1
    assert knn_predict(train, labels, query, k=3, temperature=0.07).tolist() == [1]
    # tau = 10: class 1 scores e^0.099 = 1.10 < class 0: 2 e^0.05 = 2.10 (votes ~ counts)
    assert knn_predict(train, labels, query, k=3, temperature=10.0).tolist() == [0]
    # A 1-1 vote: the closer neighbour (class 1) wins although class 0 has the lower code.
    tie_train = torch.tensor([[0.6, 0.8], [0.9, math.sqrt(1 - 0.81)]])
    assert knn_predict(tie_train, torch.tensor([0, 1]), query, k=2).tolist() == [1]


def test_knn_tiny_temperature_does_not_overflow() -> None:
    x, y, _ = clusters(60, 4, 5, noise=0.8, seed=3)
    ours = knn_predict(x[:40], y[:40], x[40:], k=10, temperature=1e-4)
    assert ours.tolist() == knn_predict(x[:40], y[:40], x[40:], k=1).tolist()  # 1-NN


def test_knn_rejects_bad_inputs() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="negative"):
        knn_accuracy(x, [0, 1, -1, 0], x, [0, 1, 1, 0])
    with pytest.raises(ValueError, match="3 labels for 4"):
        knn_accuracy(x, [0, 1, 1], x, [0, 1, 1, 0])
    with pytest.raises(ValueError, match="D=3, test D=2"):
        knn_accuracy(x, [0, 1, 1, 0], torch.randn(2, 2), [0, 1])


# -- linear probe ------------------------------------------------------------------------
def test_linear_probe_separates_separable_data() -> None:
    x, y, _ = clusters(400, 4, 32, noise=0.05, seed=4)
    x = torch.cat([x, torch.full((400, 1), 3.0)], dim=1)  # a constant feature (std 0)
    acc = linear_probe_accuracy(x[:300], y[:300], x[300:], y[300:], epochs=30)
    assert acc == 1.0


def test_linear_probe_is_at_chance_on_random_labels() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1000, 64, generator=g)
    y = torch.randint(0, 4, (1000,), generator=g)
    acc = linear_probe_accuracy(x[:600], y[:600], x[600:], y[600:], epochs=30)
    # chance = 0.25; 400 test points give sd = sqrt(0.25 * 0.75 / 400) = 0.022
    assert 0.15 < acc < 0.35


def test_linear_probe_is_deterministic_for_a_seed_and_keeps_thread_count() -> None:
    x, y, _ = clusters(200, 5, 16, noise=1.0, seed=6)
    threads = torch.get_num_threads()
    a = linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:], epochs=10, seed=3)
    b = linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:], epochs=10, seed=3)
    assert a == b
    assert torch.get_num_threads() == threads


# -- backward compatibility (BCT) --------------------------------------------------------
def test_compatibility_identical_features_equal_old_vs_old_retrieval() -> None:
    x, y, _ = clusters(400, 20, 64, noise=0.12, seed=7)
    gallery, gallery_y, query, query_y = x[:200], y[:200], x[200:], y[200:]
    old_vs_old = compatibility_top1(query, gallery, query_y, gallery_y)
    assert old_vs_old > 0.95
    same = compatibility_top1(query.clone(), gallery, query_y, gallery_y, batch_size=13)
    assert same == old_vs_old


def test_compatibility_drops_to_chance_for_a_rotated_embedding() -> None:
    x, y, _ = clusters(400, 20, 64, noise=0.12, seed=7)
    gallery, gallery_y, query, query_y = x[:200], y[:200], x[200:], y[200:]
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(8)))
    new_query, new_gallery = query @ q, gallery @ q
    # The rotated model is as good on its own (rotations keep cosine similarities) ...
    new_vs_new = compatibility_top1(new_query, new_gallery, query_y, gallery_y)
    assert new_vs_new == pytest.approx(compatibility_top1(query, gallery, query_y, gallery_y))
    # ... but its queries no longer find their class in the old index (chance = 1/20).
    assert compatibility_top1(new_query, gallery, query_y, gallery_y) < 0.2


def test_compatibility_skips_unlabelled_queries_and_never_counts_an_unlabelled_hit() -> None:
    """Labels -1 are unlabelled frames. Query 0 (class 0) finds gallery 0 (class 0): a hit.
    Query 1 (class 1) finds the unlabelled gallery 1: a miss, not a hit. Query 2 is
    unlabelled (it would find the unlabelled gallery 1 and match -1 == -1): skipped."""
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    query = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.0, 1.0]])
    assert compatibility_top1(query, gallery, [0, 1, -1], [0, -1, 1]) == 0.5
    with pytest.raises(ValueError, match="no labelled query"):
        compatibility_top1(query[2:], gallery, [-1], [0, -1, 1])


def test_compatibility_needs_the_same_dimension() -> None:
    with pytest.raises(ValueError, match="same space"):
        compatibility_top1(torch.randn(3, 8), torch.randn(5, 4), [0, 1, 2], [0, 1, 2, 0, 1])


# -- feature extraction ------------------------------------------------------------------
def test_extract_features_normalises_with_imagenet_statistics() -> None:
    colour = (10, 128, 255)
    pixels = torch.tensor(colour, dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    feats = extract_features(ChannelMean(), pixels.contiguous(), input_size=8)
    expected = [
        (c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD, strict=True)
    ]
    assert feats.shape == (2, 3)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, torch.tensor([expected, expected]), rtol=0, atol=1e-6)


def test_extract_features_bytes_and_tensor_agree_and_batching_does_not_matter() -> None:
    rng = np.random.default_rng(9)
    arrays = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(5)]
    pngs = []
    for a in arrays:  # PNG is lossless, so decoded pixels equal the arrays
        from io import BytesIO

        buf = BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    model = tiny_embedder()
    model.train()
    from_bytes = extract_features(model, pngs, input_size=16, batch_size=2)
    from_tensor = extract_features(model, tensor, input_size=16, batch_size=256)
    assert model.training  # train/eval state restored
    assert from_bytes.shape == (5, model.num_features)
    torch.testing.assert_close(from_bytes, from_tensor, rtol=1e-5, atol=1e-5)
    bf16 = extract_features(model, tensor, input_size=16, precision="bf16")
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, from_tensor, rtol=0.1, atol=0.1)


def test_extract_features_resizes_tensor_input_and_rejects_models_without_features() -> None:
    big = torch.full((1, 3, 40, 20), 200, dtype=torch.uint8)
    feats = extract_features(ChannelMean(), big, input_size=10)
    assert feats.shape == (1, 3)
    with pytest.raises(TypeError, match="no features"):
        extract_features(nn.Linear(2, 2), big, input_size=10)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(ChannelMean(), big.float(), input_size=10)


# -- periods -----------------------------------------------------------------------------
def write_colour_shard(root: Path, period: str, names: list[str], seed: int) -> Path:
    """A real shard: 12 labelled train + 3 unlabelled train + 6 labelled eval + 1 unlabelled
    eval frame per colour name."""
    rng = np.random.default_rng(seed)
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    writer = ShardWriter(root, period)
    k = 0
    for name in names:
        for split, count, labelled in [("train", 12, True), ("train", 3, False),
                                       ("eval", 6, True), ("eval", 1, False)]:  # fmt: skip
            for _ in range(count):
                frame = Frame(
                    image=colour_jpeg(name, rng),
                    stream_id=f"s-{name}",
                    ts=t0 + timedelta(seconds=k),
                    source="test",
                    category=name if labelled else None,
                    split=split,
                )
                assert writer.add(frame) == "kept"
                k += 1
    writer.commit()
    return root / period


def test_eval_set_from_shard_reads_labelled_frames_and_subsamples_deterministically(
    tmp_path: Path,
) -> None:
    shard = Shard.open(write_colour_shard(tmp_path, "p01", ["red", "green"], seed=10))
    table = shard.read(["frame_id", "category", "split"]).to_pylist()
    train_ids = {r["frame_id"]: r["category"] for r in table if r["split"] == "train"}
    labelled_train = {fid for fid, cat in train_ids.items() if cat is not None}
    assert len(labelled_train) == 24

    es = eval_set_from_shard(shard, max_train_frames=10, seed=0)
    ids = [frame_id(img) for img in es.train_images]
    assert len(ids) == 10 and set(ids) <= labelled_train
    assert ids == sorted(ids)
    assert es.train_labels == [train_ids[fid] for fid in ids]
    assert eval_set_from_shard(shard, max_train_frames=10, seed=0) == es
    other = eval_set_from_shard(shard, max_train_frames=10, seed=1)
    assert [frame_id(img) for img in other.train_images] != ids

    everything = eval_set_from_shard(shard, max_train_frames=1000, seed=0)
    assert sorted(frame_id(img) for img in everything.train_images) == sorted(labelled_train)
    assert len(es.test_images) == 12  # 6 labelled eval frames per colour, unlabelled dropped
    assert sorted(es.test_labels) == ["green"] * 6 + ["red"] * 6


def test_evaluate_periods_scores_each_period_from_one_feature_pass(tmp_path: Path) -> None:
    shards = {
        "p01": write_colour_shard(tmp_path, "p01", ["red", "green", "blue"], seed=11),
        "p02": write_colour_shard(tmp_path, "p02", ["blue", "gold"], seed=12),
    }
    cfg = EvalConfig(knn_k=5, probe_epochs=20, max_train_frames=30)
    eval_sets = {
        p: eval_set_from_shard(Shard.open(path), cfg.max_train_frames, seed=0)
        for p, path in shards.items()
    }
    model = tiny_embedder()
    scores = evaluate_periods(model, eval_sets, cfg, input_size=32)
    assert list(scores) == ["p01", "p02"]
    assert all(isinstance(s, PeriodScores) for s in scores.values())

    # The same numbers by hand, from the public pieces.
    for period, es in eval_sets.items():
        codes, classes = encode_labels([*es.train_labels, *es.test_labels])
        feats = extract_features(model, [*es.train_images, *es.test_images], 32)
        n = len(es.train_images)
        knn = knn_accuracy(feats[:n], codes[:n], feats[n:], codes[n:], k=5, temperature=0.07)
        linear = linear_probe_accuracy(feats[:n], codes[:n], feats[n:], codes[n:], epochs=20)
        assert scores[period] == PeriodScores(knn=knn, linear=linear)
    # Solid, well separated colours: even a randomly initialised ResNet separates them.
    assert scores["p01"].knn == 1.0 and scores["p02"].knn == 1.0


def test_evaluate_periods_keeps_each_eval_frames_outcome_paired_across_models(
    tmp_path: Path,
) -> None:
    shard = Shard.open(write_colour_shard(tmp_path, "p01", ["red", "green", "blue"], seed=14))
    es = eval_set_from_shard(shard, max_train_frames=30, seed=0)
    table = shard.read(["frame_id", "stream_id", "category"], split="eval").to_pylist()
    streams = {r["frame_id"]: r["stream_id"] for r in table if r["category"] is not None}
    assert es.test_frame_ids == tuple(sorted(streams))  # frame_id order, labelled only
    assert es.test_frame_ids == tuple(frame_id(img) for img in es.test_images)
    assert es.test_stream_ids == tuple(streams[f] for f in es.test_frame_ids)

    cfg = EvalConfig(knn_k=5, probe_epochs=20, max_train_frames=30)
    a = evaluate_periods(tiny_embedder(), {"p01": es}, cfg, input_size=32)["p01"]
    b = evaluate_periods(ChannelMean(), {"p01": es}, cfg, input_size=32)["p01"]
    assert a.frames is not None and b.frames is not None
    for scores in (a, b):
        frames = scores.frames
        assert frames is not None
        assert frames.frame_ids == es.test_frame_ids
        assert frames.clusters == es.test_stream_ids  # eval.cluster: stream (the default)
        assert frames.labels == tuple(es.test_labels)
        assert scores.knn == frames.knn.mean() and scores.linear == frames.linear.mean()
    a.frames.check_paired(b.frames)

    # The per-frame kNN outcome is the classifier's, frame by frame.
    codes, classes = encode_labels([*es.train_labels, *es.test_labels])
    n = len(es.train_images)
    feats = extract_features(ChannelMean(), [*es.train_images, *es.test_images], 32)
    preds = knn_predict(feats[:n], codes[:n], feats[n:], k=5, num_classes=len(classes))
    assert np.array_equal(b.frames.knn, preds.numpy() == codes[n:])
    diff = a.frames.difference(b.frames, "knn", n_resamples=200)
    assert diff.estimate == pytest.approx(a.knn - b.knn)
    assert diff.n_clusters == 3 and diff.n_frames == 18

    per_frame = EvalConfig(knn_k=5, probe_epochs=20, cluster="frame")
    c = evaluate_periods(ChannelMean(), {"p01": es}, per_frame, input_size=32)["p01"]
    assert c.frames is not None and c.frames.clusters == es.test_frame_ids


def test_majority_baseline_predicts_the_most_frequent_reference_category(tmp_path: Path) -> None:
    shard = Shard.open(write_colour_shard(tmp_path, "p01", ["red", "green", "blue"], seed=15))
    es = eval_set_from_shard(shard, max_train_frames=1000, seed=0)
    base = majority_scores(es)  # 12 reference frames per colour: a tie, 'blue' sorts first
    assert base.knn == base.linear == pytest.approx(1 / 3)
    assert base.frames is not None
    assert np.array_equal(base.frames.knn, np.array(es.test_labels) == "blue")
    assert base.frames.frame_ids == es.test_frame_ids
    # Fewer blue reference frames: green and red tie now, and green sorts first.
    keep = [k for k, y in enumerate(es.train_labels) if y != "blue" or k % 2]
    fewer_blue = EvalSet(
        [es.train_images[k] for k in keep],
        [es.train_labels[k] for k in keep],
        es.test_images,
        es.test_labels,
        es.test_frame_ids,
        es.test_stream_ids,
    )
    assert np.array_equal(
        majority_scores(fewer_blue).frames.knn, np.array(es.test_labels) == "green"
    )


def test_a_hand_built_eval_set_names_frames_by_position() -> None:
    rng = np.random.default_rng(16)
    imgs = [colour_jpeg(c, rng) for c in ["red", "blue"] * 3]
    es = EvalSet(imgs[:4], ["red", "blue"] * 2, imgs[4:], ["red", None])
    assert es.eval_frame_ids == ("#0", "#1") and es.eval_clusters() == ("#0", "#1")
    scores = evaluate_periods(ChannelMean(), {"p": es}, EvalConfig(knn_k=3, probe_epochs=5), 16)
    frames = scores["p"].frames
    assert isinstance(frames, FrameOutcomes) and frames.frame_ids == ("#0",)
    with pytest.raises(ValueError, match="test_stream_ids has 1 entries for 2"):
        EvalSet(imgs[:4], ["red", "blue"] * 2, imgs[4:], ["red", None], None, ("s",))


def test_evaluate_periods_skips_unlabelled_frames_and_names_an_empty_period() -> None:
    rng = np.random.default_rng(13)
    imgs = [colour_jpeg(c, rng) for c in ["red", "blue"] * 4]
    labels: list[str | None] = ["red", "blue"] * 4
    es = EvalSet(imgs[:6], [*labels[:4], None, None], imgs[6:], labels[6:])
    cfg = EvalConfig(knn_k=3, probe_epochs=5)
    model = ChannelMean()
    got = evaluate_periods(model, {"p": es}, cfg, input_size=16)
    clean = EvalSet(imgs[:4], labels[:4], imgs[6:], labels[6:])
    assert got == evaluate_periods(model, {"p": clean}, cfg, input_size=16)
    empty = EvalSet(imgs[:2], labels[:2], imgs[2:4], [None, None])
    with pytest.raises(ValueError, match="period 'p02'.*0 labelled eval"):
        evaluate_periods(model, {"p02": empty}, cfg, input_size=16)
    with pytest.raises(ValueError, match="differ in length"):
        EvalSet(imgs[:2], labels[:1], [], [])
