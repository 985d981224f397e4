"""Embedder: timm backbones, heads, the small-input stem, persistence and fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cssl_core.config import ModelConfig
from cssl_core.learn.models import (
    CONFIG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    Embedder,
    EmbedderOutput,
    ModelLoadError,
)

SMALL = ModelConfig(input_size=32, projector_hidden=64, projector_dim=32, predictor_hidden=48)
CIFAR_STEM = {"small_input_stem": True}


def _images(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _model(cfg: ModelConfig = SMALL, categories: tuple[str, ...] = (), seed: int = 0) -> Embedder:
    torch.manual_seed(seed)
    return Embedder(cfg, categories)


def _train_step(model: Embedder, seed: int = 1) -> None:
    """One SGD step so weights and BatchNorm running statistics leave their initial values."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(_images(seed=seed))
    loss = out.projection.square().mean() + model.predict(out.projection).square().mean()
    loss = loss + model.predict_features(out.features).square().mean()
    if model.classifier is not None:
        loss = loss + model.classify(out.features.detach()).square().mean()
    loss.backward()
    opt.step()
    model.eval()


def test_forward_shapes_and_every_parameter_gets_a_finite_gradient() -> None:
    model = _model(categories=("a", "b", "c"))
    out = model(_images())
    assert isinstance(out, EmbedderOutput)
    assert out.features.shape == (4, 512) and out.projection.shape == (4, 32)
    assert torch.equal(model.features(_images()), out.features)
    logits = model.classify(out.features)
    assert logits.shape == (4, 3)
    loss = out.projection.square().mean() + model.predict(out.projection).square().mean()
    loss = loss + model.predict_features(out.features).square().mean()
    (loss + logits.square().mean()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
    assert torch.isfinite(out.features).all() and torch.isfinite(out.projection).all()


def test_heads_have_the_configured_shapes() -> None:
    model = _model()
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 64), (64, 32)]
    linears = [m for m in model.predictor if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 48), (48, 32)]
    linears = [m for m in model.feature_predictor if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 48), (48, 512)]
    assert model.classifier is None
    with pytest.raises(RuntimeError, match="expand_classes"):
        model.classify(torch.zeros(2, 512))


def test_small_input_stem_keeps_resolution() -> None:
    small = _model(SMALL.model_copy(update=CIFAR_STEM))
    assert small.backbone.conv1.kernel_size == (3, 3) and small.backbone.conv1.stride == (1, 1)
    assert isinstance(small.backbone.maxpool, torch.nn.Identity)
    # 32 px: stride-1 stem keeps 32, then three stride-2 stages -> 4x4 (the ImageNet stem: 1x1)
    assert small.backbone.forward_features(_images()).shape[-2:] == (4, 4)
    imagenet = _model(SMALL.model_copy(update={"small_input_stem": False}))
    assert imagenet.backbone.conv1.stride == (2, 2)
    assert imagenet.backbone.forward_features(_images()).shape[-2:] == (1, 1)


def test_second_timm_backbone_with_deep_stem() -> None:
    model = _model(SMALL.model_copy(update={"backbone": "resnet10t", **CIFAR_STEM}))
    assert model.backbone.conv1[0].stride == (1, 1)
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    out = model(_images())
    assert out.features.shape == (4, model.backbone.num_features) == (4, 512)
    assert model.backbone.forward_features(_images()).shape[-2:] == (4, 4)


@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "ghostnet_050", "regnetx_002"])
def test_backbones_with_a_pre_logits_head_size_their_heads_from_its_output(name: str) -> None:
    # MobileNetV3/GhostNet return head_hidden_size features, not num_features: the projector
    # once took num_features and the first forward failed with a shape mismatch.
    model = _model(SMALL.model_copy(update={"backbone": name, "small_input_stem": False}))
    out = model(_images())
    assert out.features.shape[1] == model.num_features
    assert out.projection.shape == (4, SMALL.projector_dim)
    out.projection.sum().backward()
    assert all(p.grad is not None for p in model.projector.parameters())


def test_vit_backbone_is_built_for_the_input_size() -> None:
    cfg = SMALL.model_copy(update={"backbone": "vit_tiny_patch16_224", "small_input_stem": False})
    out = _model(cfg)(_images())
    assert out.features.shape == (4, 192) and out.projection.shape == (4, 32)


def test_small_input_stem_refuses_non_resnet() -> None:
    cfg = SMALL.model_copy(update={"backbone": "vit_tiny_patch16_224", **CIFAR_STEM})
    with pytest.raises(ValueError, match="small_input_stem=false"):
        Embedder(cfg)


def test_unknown_backbone_fails_loudly_in_one_line() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet_does_not_exist'") as info:
        Embedder(SMALL.model_copy(update={"backbone": "resnet_does_not_exist"}))
    assert "\n" not in str(info.value)


def test_expand_classes_keeps_old_rows() -> None:
    model = _model(categories=("cat", "dog"))
    _train_step(model)
    old_weight = model.classifier.weight.detach().clone()
    old_bias = model.classifier.bias.detach().clone()
    features = model.features(_images())
    old_logits = model.classify(features).detach()

    added = model.expand_classes(["dog", "bird", "fish", "bird"])
    assert added == ["bird", "fish"]
    assert model.categories == ["cat", "dog", "bird", "fish"]
    assert model.classifier.weight.shape == (4, 512)
    assert torch.equal(model.classifier.weight[:2], old_weight)
    assert torch.equal(model.classifier.bias[:2], old_bias)
    # same rows; a wider matrix product may round differently, hence a float tolerance
    new_logits = model.classify(features)[:, :2].detach()
    assert torch.allclose(new_logits, old_logits, rtol=1e-6, atol=1e-7)
    assert model.expand_classes(["cat"]) == []
    with pytest.raises(ValueError, match="non-empty strings"):
        model.expand_classes([""])
    with pytest.raises(TypeError, match="not one string"):
        model.expand_classes("eel")


def test_expand_classes_creates_the_classifier() -> None:
    model = _model()
    assert model.expand_classes(("x", "y")) == ["x", "y"]
    assert model.classify(torch.zeros(3, 512)).shape == (3, 2)


def test_save_load_round_trip_is_bit_identical(tmp_path: Path) -> None:
    model = _model(categories=("a", "b"))
    _train_step(model)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    meta = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["categories"] == ["a", "b"]
    assert ModelConfig.model_validate(meta["model"]) == SMALL

    loaded = Embedder.load(tmp_path / "m")
    assert loaded.categories == ["a", "b"] and loaded.cfg == SMALL
    assert loaded.state_fingerprint() == model.state_fingerprint() == meta["fingerprint"]
    loaded.eval()
    x = _images(seed=5)
    a, b = model(x), loaded(x)
    assert torch.equal(a.features, b.features) and torch.equal(a.projection, b.projection)
    assert torch.equal(model.predict(a.projection), loaded.predict(b.projection))
    assert torch.equal(model.predict_features(a.features), loaded.predict_features(b.features))
    assert torch.equal(model.classify(a.features), loaded.classify(b.features))


def _saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = _model(categories=("a",)).save(tmp_path / "m")
    return directory, load_file(str(directory / WEIGHTS_FILE))


def test_load_refuses_missing_keys(tmp_path: Path) -> None:
    directory, tensors = _saved(tmp_path)
    del tensors["projector.0.weight"]
    save_file(tensors, str(directory / WEIGHTS_FILE))
    with pytest.raises(ModelLoadError, match=r"missing \['projector.0.weight'\]"):
        Embedder.load(directory)


def test_load_refuses_unexpected_keys(tmp_path: Path) -> None:
    directory, tensors = _saved(tmp_path)
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, str(directory / WEIGHTS_FILE))
    with pytest.raises(ModelLoadError, match=r"unexpected \['extra.weight'\]"):
        Embedder.load(directory)


def test_load_refuses_wrong_shapes_and_tampered_weights(tmp_path: Path) -> None:
    directory, tensors = _saved(tmp_path)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    meta["categories"] = ["a", "b"]  # config now expects a 2-row classifier
    (directory / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"classifier.weight is torch.float32\(1, 512\)"):
        Embedder.load(directory)

    meta["categories"] = ["a"]
    (directory / CONFIG_FILE).write_text(json.dumps(meta))
    tensors["projector.3.bias"] = tensors["projector.3.bias"] + 1.0
    save_file(tensors, str(directory / WEIGHTS_FILE))
    with pytest.raises(ModelLoadError, match="fingerprint"):
        Embedder.load(directory)


def test_load_refuses_missing_files_and_other_versions(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        Embedder.load(tmp_path)
    directory, _ = _saved(tmp_path)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (directory / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="format_version"):
        Embedder.load(directory)
    meta["format_version"] = FORMAT_VERSION
    meta["model"]["projector_dimension"] = 3  # a key this ModelConfig does not know
    (directory / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="model.projector_dimension"):
        Embedder.load(directory)


def test_fingerprint_tracks_weights_not_layout() -> None:
    model = _model()
    before = model.state_fingerprint()
    assert len(before) == 64 and before == _model().state_fingerprint()  # same seed
    model.to(memory_format=torch.channels_last)
    assert model.state_fingerprint() == before
    with torch.no_grad():
        model.projector[0].bias[0] += 1e-6
    assert model.state_fingerprint() != before
    assert _model(seed=1).state_fingerprint() != before


def test_frozen_copy_is_an_independent_eval_teacher() -> None:
    model = _model(categories=("a",))
    frozen = model.frozen_copy()
    assert not frozen.training and model.training
    assert all(not p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert frozen.state_fingerprint() == model.state_fingerprint()
    _train_step(model)
    assert frozen.state_fingerprint() != model.state_fingerprint()
    assert frozen.categories == ["a"]


def test_channels_last_gives_the_same_outputs_and_saves(tmp_path: Path) -> None:
    model = _model()
    _train_step(model)
    x = _images(seed=3)
    reference = model(x)
    model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out.features, reference.features, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out.projection, reference.projection, rtol=1e-4, atol=1e-5)
    loaded = Embedder.load(model.save(tmp_path / "cl"))
    assert loaded.state_fingerprint() == model.state_fingerprint()
