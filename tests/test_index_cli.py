"""The embedding index through the command line and the refresh flow's hook: ``cssl index
build``, ``cssl search``, ``cssl index status``, ``cssl backfill`` (a version switch) on a
registry of tiny models, one-line errors for bad input, and ``backfill_if_needed`` deciding by
the registry tag ``cssl.compat``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PARAMS, environment

from cssl_core.config import CompatConfig, ModelConfig, load_params
from cssl_core.data.shard import Shard
from cssl_core.learn.compat import fit_adapter, query_adapter
from cssl_core.learn.models import Embedder
from pipelines.cli import EXIT_FAILED, EXIT_OK, main
from pipelines.index import EmbeddingIndex
from pipelines.mlflow_registry import MlflowRegistry
from pipelines.registry import VersionTags
from pipelines.settings import MODEL_NAME

SHARDS = ("p01", "p02")
ROWS = 160  # 80 simulated frames per period


class Registry:
    """A state folder with a SQLite MLflow registry of tiny models:

    - v1 (p01, seed 1), the first champion;
    - v2 (p02, seed 2, parent 1) tagged ``cssl.compat=none``;
    - v3 (p02, seed 1, parent 1) tagged ``cssl.compat=direct`` (v1's weights: same space);
    - v4 (p02, another backbone, D=1024, parent 1) tagged ``direct`` (a wrong tag);
    - v5 (p02, seed 5, parent 1) tagged ``adapter``: its adapter into v1's space is fitted on
      the frames of p01 and p02.
    """

    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.uri = f"sqlite:///{root / 'mlflow.db'}"

    @property
    def env(self) -> dict[str, str]:
        return {"CSSL_HOME": str(self.home), "MLFLOW_TRACKING_URI": self.uri}


def _register(
    registry: MlflowRegistry,
    root: Path,
    cfg: ModelConfig,
    seed: int,
    period: str,
    parent: int | None = None,
    compat: str | None = None,
    model: Embedder | None = None,
) -> int:
    torch.manual_seed(seed)
    model = model if model is not None else Embedder(cfg)
    model_dir = model.save(root / f"model-{seed}-{cfg.backbone}")
    run_id = registry.start_run(f"index-cli-{period}")
    lineage = VersionTags(period, "", "", parent_version=parent, gate="pass")
    info = registry.register(run_id, model_dir, lineage, model.num_features)
    if compat is not None:
        registry.client.set_model_version_tag(MODEL_NAME, str(info.version), "cssl.compat", compat)
    registry.end_run(run_id, "FINISHED")
    return info.version


def _with_adapter(cfg: ModelConfig, seed: int, parent_seed: int, shards: list[Path]) -> Embedder:
    """A model of ``seed`` with its adapter fitted into the space of ``parent_seed``'s model."""
    torch.manual_seed(parent_seed)
    parent = Embedder(cfg).eval()
    torch.manual_seed(seed)
    model = Embedder(cfg).eval()
    tables = [Shard.open(s).read(["image"]) for s in shards]
    fit_adapter(model, parent, tables, CompatConfig())
    return model


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory, sim_shards: Path) -> Registry:
    root = tmp_path_factory.mktemp("index-cli")
    state = Registry(root)
    cfg = ModelConfig(**TINY_PARAMS["model"])
    other = cfg.model_copy(update={"backbone": "mobilenetv3_small_050"})
    adapted = _with_adapter(cfg, 5, 1, [sim_shards / p for p in SHARDS])
    with environment(**state.env):
        registry = MlflowRegistry()
        versions = [
            _register(registry, root, cfg, 1, "p01"),
            _register(registry, root, cfg, 2, "p02", parent=1, compat="none"),
            _register(registry, root, cfg, 1, "p02", parent=1, compat="direct"),
            _register(registry, root, other, 3, "p02", parent=1, compat="direct"),
            _register(registry, root, cfg, 5, "p02", parent=1, compat="adapter", model=adapted),
        ]
        assert versions == [1, 2, 3, 4, 5]
        registry.promote(1)
    return state


@pytest.fixture
def state(tiny_registry: Registry, tmp_path: Path, monkeypatch) -> Iterator[Registry]:
    """The registry, with a fresh index (``index.uri`` via --index) per test."""
    for key, value in tiny_registry.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    MlflowRegistry().promote(1)
    yield tiny_registry


def _run(capsys, *argv: str) -> str:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    return captured.out


def _json(capsys, *argv: str) -> dict:
    return json.loads(_run(capsys, *argv, "--json"))


def _fails(capsys, argv: list[str], *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == EXIT_FAILED
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def test_build_search_status_then_backfill_to_a_new_champion(
    state: Registry, sim_shards: Path, tmp_path: Path, capsys
):
    index = str(tmp_path / "index")
    shards = [str(sim_shards / p) for p in SHARDS]
    built = _json(capsys, "index", "build", *shards, "--index", index)
    assert built["model_version"] == 1 and built["rows_total"] == built["rows_written"] == ROWS
    again = _run(capsys, "index", "build", *shards, "--index", index)
    assert "p01: already indexed with version 1, skipped" in again  # idempotent

    frame = Shard.open(sim_shards / "p02").read(["frame_id"])["frame_id"][3].as_py()
    found = _json(capsys, "search", "--frame-id", frame, "--k", "5", "--index", index)
    hits = found["hits"]
    assert len(hits) == 5 and frame not in {h["frame_id"] for h in hits}
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(h["model_version"] == 1 and h["period"] in SHARDS for h in hits)

    # By image file: the frame's own JPEG comes back first, at cosine ~1.
    table = Shard.open(sim_shards / "p01").read(["frame_id", "image"])
    image = tmp_path / "query.jpg"
    image.write_bytes(table["image"][0].as_py())
    by_image = _json(capsys, "search", "--image", str(image), "--k", "3", "--index", index)
    assert by_image["hits"][0]["frame_id"] == table["frame_id"][0].as_py()
    assert by_image["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    printed = _run(capsys, "search", "--frame-id", frame, "--index", index)
    assert "rank" in printed and "category" in printed and len(printed.splitlines()) == 12

    status = _json(capsys, "index", "status", "--index", index)
    assert status["status"]["rows_per_version"] == {"1": ROWS}
    assert status["champion"]["compatible"] and status["champion"]["via"] == "same"

    # A new champion tagged cssl.compat=none: status says so, backfill switches to it.
    _run(capsys, "promote", "2")
    text = _run(capsys, "index", "status", "--index", index)
    assert "@champion: version 2, NOT compatible" in text and "cssl.compat=none" in text
    capsys.readouterr()
    assert main(["backfill", "--chunk-size", "64", "--index", index]) == EXIT_OK
    out, err = capsys.readouterr()
    assert f"backfilled {ROWS} rows to version 2" in out and "switched" in out
    assert "version 2 vs the index's version 1: not compatible" in err
    assert "committed chunk" in err and "(3/3 chunks)" in err
    status = _json(capsys, "index", "status", "--index", index)
    assert status["status"]["live_version"] == 2
    assert status["status"]["rows_per_version"] == {"2": ROWS}
    assert status["champion"]["via"] == "same"
    assert _run(capsys, "backfill", "--index", index).strip() == (
        "the index is already on version 2"
    )
    after = _json(capsys, "search", "--frame-id", frame, "--k", "3", "--index", index)
    assert {h["model_version"] for h in after["hits"]} == {2}

    # v3 is directly compatible with v1, not with the live version 2: its rows may not join.
    _fails(
        capsys,
        ["index", "build", shards[0], "--model", "3", "--index", index],
        "not declared compatible",
    )


def test_search_with_a_newer_version_through_its_compatibility_chain(
    state: Registry, sim_shards: Path, tmp_path: Path, capsys
):
    """``cssl search --model``: a version queries an index built by its ancestor without a
    backfill when its lineage is compatible: the identity along ``direct``, the saved adapter
    along ``adapter``; an incompatible one is refused in one line."""
    from pipelines.backfill import embedder_dir, load_model
    from pipelines.index_build import embed_images

    index = str(tmp_path / "index")
    _run(capsys, "index", "build", *(str(sim_shards / p) for p in SHARDS), "--index", index)
    table = Shard.open(sim_shards / "p01").read(["frame_id", "image"])
    frame, jpeg = table["frame_id"][5].as_py(), table["image"][5].as_py()
    image = tmp_path / "query.jpg"
    image.write_bytes(jpeg)

    def search(*extra: str) -> dict:
        return _json(capsys, "search", "--image", str(image), "--k", "3", "--index", index, *extra)

    # v3 (direct, v1's weights): its own embedding is in v1's space.
    direct = search("--model", "3")
    assert direct["query"].endswith(
        "(embedded by version 3, mapped into version 1's space (direct))"
    )
    assert direct["hits"][0]["frame_id"] == frame
    assert direct["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    # v5 (adapter): its raw embedding is in another space (cosine ~0.3 with the frame's
    # stored v1 vector; untrained models, so every frame is alike within a space); mapped by
    # its saved adapter it lands on it, and the command searches with exactly that vector.
    mapped = search("--model", "5")
    assert "mapped into version 1's space (adapter)" in mapped["query"]
    idx = EmbeddingIndex(index)
    stored = idx.stored_vectors(frame).vector
    stored = stored / np.linalg.norm(stored)
    v5 = load_model(embedder_dir(MlflowRegistry(), 5))
    raw = embed_images(v5, [jpeg])[0]
    query = query_adapter(v5)(raw)
    assert float(query @ stored) > 0.97
    assert float(raw @ stored / np.linalg.norm(raw)) < 0.6
    assert [h["frame_id"] for h in mapped["hits"]] == [h.frame_id for h in idx.search(query, 3)]
    assert mapped["hits"][0]["score"] > 0.97
    # By frame id: the frame's image embedded by v5; its nearest other frames come back.
    by_frame = _json(capsys, "search", "--frame-id", frame, "--model", "5", "--index", index)
    assert "embedded by version 5" in by_frame["query"]
    assert frame not in {h["frame_id"] for h in by_frame["hits"]}
    assert all(h["model_version"] == 1 for h in by_frame["hits"])

    _fails(
        capsys,
        ["search", "--image", str(image), "--model", "2", "--index", index],
        "version 2 is not compatible with the index's version 1",
        "cssl.compat=none",
        "cssl backfill --to 2",
    )
    _fails(  # v4 is tagged direct but embeds D=1024
        capsys,
        ["search", "--image", str(image), "--model", "4", "--index", index],
        "the query has D=1024",
    )
    own = search("--model", "@champion")  # v1 itself: nothing to map
    assert own["query"].endswith("(embedded by version 1)")
    assert own["hits"] == search()["hits"]

    _run(capsys, "promote", "5")  # index status points at the mapped search
    status = _run(capsys, "index", "status", "--index", index)
    assert "@champion: version 5, compatible with the index (adapter" in status
    assert "`cssl search --model @champion` queries it" in status
    assert search("--model", "@champion")["hits"] == mapped["hits"]


def test_bad_input_is_one_line(state: Registry, sim_shards: Path, tmp_path: Path, capsys):
    index = str(tmp_path / "index")
    for argv in (
        ["search", "--frame-id", "abc"],
        ["index", "status"],
        ["backfill"],
    ):
        _fails(capsys, [*argv, "--index", index], "there is no index at", "cssl index build")
    _run(capsys, "index", "build", str(sim_shards / "p01"), "--index", index)
    _fails(capsys, ["search", "--frame-id", "nope", "--index", index], "frame nope is not in")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    _fails(capsys, ["search", "--image", str(text), "--index", index], "is not a readable image")
    missing = str(tmp_path / "missing.png")
    _fails(capsys, ["search", "--image", missing, "--index", index], "no such image file")
    _fails(capsys, ["search", "--frame-id", "x", "--k", "0", "--index", index], "--k must be")
    # v4 is tagged directly compatible with v1 but embeds D=1024: the index stores D=512.
    _fails(
        capsys,
        ["index", "build", str(sim_shards / "p02"), "--model", "4", "--index", index],
        "embeds D=1024",
        "D=512",
    )
    _fails(capsys, ["index", "build", str(sim_shards / "p02"), "--model", "9", "--index", index])
    assert EmbeddingIndex(index).status().rows_per_version == {1: 80}


@pytest.mark.server
def test_backfill_if_needed_follows_the_compat_tag(
    prefect_harness, state: Registry, sim_shards: Path, tmp_path: Path, capsys
):
    from pipelines.backfill import backfill_decision, backfill_if_needed, compatibility

    registry = MlflowRegistry()
    assert compatibility(registry, 1, 3).via == "direct"  # v3 -> v1: direct
    unknown = compatibility(registry, 2, 1)  # a rollback: v1's lineage never reaches v2
    assert not unknown.compatible and "not in version 1's lineage" in unknown.reason
    assert "cssl.compat=none" in compatibility(registry, 1, 2).reason

    index = tmp_path / "index"
    params = load_params(None, [f"index.uri={index}"])
    on = load_params(None, [f"index.uri={index}", "index.backfill_on_promotion=true"])
    assert not backfill_if_needed(state.uri, str(index), 2, on).backfill  # no index yet
    _run(capsys, "index", "build", str(sim_shards / "p01"), "--index", str(index))
    assert backfill_if_needed(state.uri, str(index), 2, params).reason.endswith("is off")

    compatible = backfill_if_needed(state.uri, str(index), 3, on)
    assert not compatible.backfill and compatible.report is None
    assert "compatible with the index's version 1 (direct)" in compatible.reason
    assert EmbeddingIndex(index).pointer().live.model_version == 1

    assert backfill_decision(registry, EmbeddingIndex(index), 2).backfill
    done = backfill_if_needed(state.uri, str(index), 2, on)  # the backfill flow runs
    assert done.backfill and done.report is not None and done.report.switched
    status = EmbeddingIndex(index).status()
    assert status.live_version == 2 and status.rows_per_version == {2: 80}


def test_search_and_status_while_a_backfill_is_half_way_then_resume(
    state: Registry, sim_shards: Path, tmp_path: Path, capsys
):
    """A backfill planned but not run (as after a kill before the first commit): searches embed
    a frame not yet re-embedded with the new version and search both spaces; status shows the
    progress; `cssl backfill` resumes it and switches."""
    index = str(tmp_path / "index")
    _run(capsys, "index", "build", str(sim_shards / "p01"), "--index", index)
    assert EmbeddingIndex(index).start_backfill(2, 512, chunk_size=32) is not None
    frame = Shard.open(sim_shards / "p01").read(["frame_id"])["frame_id"][5].as_py()
    found = _json(capsys, "search", "--frame-id", frame, "--k", "4", "--index", index)
    assert len(found["hits"]) == 4 and {h["space"] for h in found["hits"]} == {1}
    # --model 2 (the target, incompatible with v1): the rows still on v1 are searched with the
    # frame embedded by v1, as without --model; v5 maps into neither space and is refused.
    champion = _json(
        capsys, "search", "--frame-id", frame, "--k", "4", "--model", "2", "--index", index
    )
    assert champion["hits"] == found["hits"] and "embedded by version 2" in champion["query"]
    _fails(
        capsys,
        ["search", "--frame-id", frame, "--model", "5", "--index", index],
        "not compatible with the index's version 2",
    )
    text = _run(capsys, "index", "status", "--index", index)
    assert "backfill to version 2 in progress: 0/3 chunks, 0/80 rows" in text
    capsys.readouterr()
    assert main(["backfill", "--index", index]) == EXIT_OK  # no --to: resumes the one started
    out, err = capsys.readouterr()
    assert "resuming the backfill to version 2: 3 of 3 chunks to go" in err
    assert "switched: the index now serves version 2" in out
