"""Compatible training (``compat.mode``): the alignment loss, the fitted adapter, saving it
with the model, serving it, and what each mode does to a period (issue 14)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import PERIODS, TINY_PARAMS

from cssl_core.config import apply_overrides, params_from_dict
from cssl_core.data.shard import Shard
from cssl_core.learn.compat import query_adapter, ridge_to_identity
from cssl_core.learn.losses import compat_align
from cssl_core.learn.models import Embedder, ModelLoadError
from cssl_core.period import run_stream

TINY_MODEL = params_from_dict(TINY_PARAMS).model


def test_compat_align_on_a_hand_checkable_case():
    # Two frames with orthogonal unit features, the new model equal to the old one, tau = 1:
    # each row's positive has cosine 1 and its one negative cosine 0, so every InfoNCE term
    # is -log(e / (e + 1)) = log(1 + 1/e), and so is the mean over the two views.
    f = torch.eye(2)
    assert compat_align(f, f, f, f, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
    # Swapped old features: the positive has cosine 0, the negative 1: log(1 + e).
    swapped = f.flip(0)
    value = compat_align(f, f, swapped, swapped, 1.0).item()
    assert value == pytest.approx(math.log(1 + math.e))
    # Only the new features get a gradient (the frozen ones are detached).
    new = torch.randn(4, 3, requires_grad=True)
    old = torch.randn(4, 3, requires_grad=True)
    compat_align(new, new, old, old, 0.1).backward()
    assert new.grad is not None and old.grad is None


def test_ridge_to_identity_recovers_a_rotation_and_shrinks_to_the_identity():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(400, 6, generator=g), dim=1)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    y = x @ rotation + 0.5
    fitted = ridge_to_identity(x, y, ridge=1e-9)
    assert torch.allclose(fitted(x), y, atol=1e-4)
    assert torch.allclose(fitted.weight, rotation.T, atol=1e-4)
    # An overwhelming ridge keeps the identity (the bias still centres the targets).
    stiff = ridge_to_identity(x, y, ridge=1e9)
    assert torch.allclose(stiff.weight, torch.eye(6), atol=1e-4)
    with pytest.raises(ValueError, match="same N"):
        ridge_to_identity(x, y[:3], ridge=0.1)


def test_the_adapter_is_saved_and_loaded_with_the_model(tmp_path: Path):
    torch.manual_seed(0)
    model = Embedder(TINY_MODEL).eval()
    with pytest.raises(RuntimeError, match="compat.mode=adapter"):
        model.to_parent_space(torch.randn(2, model.num_features))
    adapter = torch.nn.Linear(model.num_features, model.num_features)
    model.set_adapter(adapter, "f" * 64)
    loaded = Embedder.load(model.save(tmp_path / "m")).eval()
    assert loaded.adapter_parent == "f" * 64
    assert loaded.state_fingerprint() == model.state_fingerprint()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        assert torch.equal(loaded.features(x), feats)
        assert torch.equal(loaded.to_parent_space(feats), model.to_parent_space(feats))
    # The callable an index search takes: one query or a batch, normalised, in the old space.
    fn = query_adapter(loaded)
    one = fn(feats[0].numpy())
    assert one.shape == (model.num_features,)
    expected = F.normalize(model.to_parent_space(feats), dim=1).detach().numpy()
    np.testing.assert_allclose(one, expected[0], atol=1e-6)
    np.testing.assert_allclose(fn(feats.numpy()), expected, atol=1e-6)
    # Removing the adapter removes it from the saved files too.
    model.set_adapter(None, None)
    plain = Embedder.load(model.save(tmp_path / "plain"))
    assert plain.adapter is None and plain.adapter_parent is None
    with pytest.raises(ValueError, match="compat.mode=adapter"):
        query_adapter(plain)
    # Weights with an adapter but a config without one are refused (strict load).
    (tmp_path / "m" / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="unexpected"):
        Embedder.load(tmp_path / "m")


def test_the_served_model_maps_queries_through_the_adapter(cifar_jpegs: list[bytes]):
    from cssl_core.evaluation.evaluate import extract_features
    from pipelines.pyfunc_model import StreamEmbeddingModel

    torch.manual_seed(0)
    model = Embedder(TINY_MODEL).eval()
    model.set_adapter(torch.nn.Linear(model.num_features, model.num_features), "a" * 64)
    served = StreamEmbeddingModel()
    served.model = model
    frames = pd.DataFrame({"image": cifar_jpegs[:4]})
    own = served.predict(None, frames)
    parent = served.predict(None, frames, params={"space": "parent"})
    with torch.no_grad():
        feats = extract_features(model, cifar_jpegs[:4], 32)
        expected = F.normalize(model.to_parent_space(feats), dim=1).numpy()
    np.testing.assert_allclose(parent, expected, atol=1e-6)
    np.testing.assert_allclose(own, F.normalize(feats, dim=1).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="space"):
        served.predict(None, frames, params={"space": "other"})


def _stream(sim_shards: Path, mode: str, periods: int = 2) -> list:
    params = params_from_dict(apply_overrides(TINY_PARAMS, [f"compat.mode={mode}"]))
    shards = [Shard.open(sim_shards / p) for p in PERIODS[:periods]]
    return list(run_stream(params, shards))


def _backbone(model: Embedder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("adapter.")}


def test_each_mode_on_a_lineage(sim_shards: Path):
    torch.set_num_threads(1)
    none = _stream(sim_shards, "none")
    adapter = _stream(sim_shards, "adapter", periods=3)
    align = _stream(sim_shards, "align")
    # adapter: the backbone trains exactly as without a constraint (bit for bit), and the
    # model carries a map into its parent's space, never its parent's own adapter.
    for a, b in zip(none, adapter[:2], strict=True):
        base, other = _backbone(a.model), _backbone(b.model)
        assert base.keys() == other.keys()
        assert all(torch.equal(base[k], other[k]) for k in base)
    assert adapter[0].model.adapter is None  # the first period has no parent
    for t in (1, 2):
        assert adapter[t].model.adapter is not None
        assert adapter[t].model.adapter_parent == adapter[t - 1].model.state_fingerprint()
    # align: the alignment term is in the loss and moves the backbone (not in period 1).
    assert all(h.compat == 0.0 for h in align[0].train.history)
    assert all(h.compat > 0.0 for h in align[1].train.history)
    assert all(h.compat == 0.0 for h in none[1].train.history)
    assert torch.equal(
        _backbone(align[0].model)["backbone.conv1.0.weight"],
        _backbone(none[0].model)["backbone.conv1.0.weight"],
    )
    moved = _backbone(align[1].model)
    assert any(not torch.equal(moved[k], _backbone(none[1].model)[k]) for k in moved)


def test_the_refresh_matrix_covers_candidate_champion_index_and_the_adapter_row(
    sim_shards: Path,
):
    from cssl_core.config import PeriodChain
    from cssl_core.evaluation.metrics import AccuracyMatrix
    from cssl_core.memory.replay import ReplayMemory
    from pipelines.refresh import LineageState, compatibility
    from pipelines.registry import VersionInfo, VersionTags

    params = params_from_dict(TINY_PARAMS)
    torch.manual_seed(1)
    index_model, champion, candidate = (Embedder(params.model).eval() for _ in range(3))
    candidate.set_adapter(
        torch.nn.Linear(candidate.num_features, champion.num_features),
        champion.state_fingerprint(),
    )
    shards = [Shard.open(sim_shards / p) for p in PERIODS[:2]]
    empty = AccuracyMatrix(PERIODS[:2])
    state = LineageState(
        chain=PeriodChain(tuple(PERIODS[:2])),
        champion=VersionInfo(5, "run", VersionTags("p01", "fp", "cfg")),
        parent=champion,
        memory=ReplayMemory.empty(8),
        published=None,
        shards=shards,
        matrix=empty,
        low=empty,
        high=empty,
    )
    out = compatibility.fn(params, candidate, state, (3, index_model))
    m = out.matrix
    assert m is not None and out.lineage == ("index", "champion", "candidate")
    assert out.versions == {"index": 3, "champion": 5}
    assert m.query_models == ("index", "champion", "candidate", "candidate_adapter")
    assert m.gallery_models == ("index", "champion", "candidate")
    assert m.entry("candidate_adapter", "champion").comparable
    assert not m.entry("candidate_adapter", "candidate").comparable
    assert out.average_compatibility == m.average_compatibility(out.lineage)
    assert out.verdict is not None and out.kind == out.verdict.kind
    assert out.verdict.adapter == m.value("candidate_adapter", "champion")
    # Without a champion and an index there is nothing to compare: no matrix, no tag.
    first = compatibility.fn(
        params, candidate, LineageState(**{**vars(state), "champion": None, "parent": None}), None
    )
    assert first.matrix is None and first.kind == ""
