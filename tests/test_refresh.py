"""The Prefect flow ``refresh`` end to end on tiny settings, with real Prefect, MLflow and S3.

Most tests read the session ``lineage`` (conftest): the flow run over p01..p03 with a SQLite
MLflow store and a local object store, under one session-scoped ``prefect_test_harness``.
Tests that change the registry (a rejected candidate, rollback) restore what they rely on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlflow.artifacts
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import PERIODS, REPO, Lineage, new_lineage

from cssl_core.config import ConfigError, load_params
from cssl_core.data.shard import Shard, ShardError
from cssl_core.data.storage import LocalStore, open_store
from cssl_core.evaluation.evaluate import extract_features
from cssl_core.learn.models import Embedder
from cssl_core.memory.replay import ReplayMemory, list_versions
from pipelines.cli import main
from pipelines.mlflow_registry import MlflowRegistry
from pipelines.refresh import RefreshBusy, period_lock, refresh, resolve_period, validate
from pipelines.registry import Rollback
from pipelines.report import build_report, format_report

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def lin(lineage: Lineage, monkeypatch: pytest.MonkeyPatch) -> Lineage:
    """The session lineage, with CSSL_HOME and MLFLOW_TRACKING_URI pointing at it."""
    lineage.use(monkeypatch)
    return lineage


def _params(lin: Lineage, *extra: str):
    return load_params(lin.params_file, [*lin.overrides, *extra])


def _run(lin: Lineage, period: str, shard: Path | None, *extra: str, **kw) -> dict:
    return refresh(
        period,
        shard=str(shard) if shard else None,
        params_path=str(lin.params_file),
        overrides=[*lin.overrides, *extra],
        **kw,
    )


def _lineage_versions(registry: MlflowRegistry) -> list:
    """The three versions the session lineage made (later tests may add more)."""
    return [v for v in registry.versions() if v.version <= len(PERIODS)]


def test_three_periods_make_a_lineage_of_versions(lin: Lineage, sim_shards: Path):
    registry = MlflowRegistry()
    params = _params(lin)
    versions = _lineage_versions(registry)
    assert [v.version for v in versions] == [1, 2, 3]
    assert [v.period for v in versions] == PERIODS
    assert [lin.summaries[p]["version"] for p in PERIODS] == [1, 2, 3]
    assert not any(s["skipped"] for s in lin.summaries.values())
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()

    champion_then = None  # the champion each candidate was trained from
    for v in versions:
        t = v.tags
        summary = lin.summaries[v.period]
        assert t["period"] == v.period
        assert t["shard_fingerprint"] == Shard.open(sim_shards / v.period).fingerprint
        assert t["parent_version"] == ("" if champion_then is None else str(champion_then))
        assert t["memory_manifest"] == f"{lin.store}/memory/{v.period}/manifest.json"
        assert Path(t["memory_manifest"]).is_file()
        assert t["config_hash"] == params.config_hash()
        assert t["git_commit"] == head
        assert t["cssl.status"] == "complete"
        assert t["gate"] == ("pass" if summary["promoted"] else "reject")
        assert summary["champion_version"] == champion_then
        weights = Embedder.load(registry.download_embedder(v.version))
        assert weights.state_fingerprint() == t["weights_sha256"] == lin.weights[v.period]
        run = registry.client.get_run(v.run_id)
        assert run.info.status == "FINISHED"
        assert set(summary["row"]) == set(PERIODS[: PERIODS.index(v.period) + 1])
        assert run.data.metrics[f"knn/{v.period}"] == summary["row"][v.period]
        if summary["promoted"]:
            champion_then = v.version

    # The first period has no champion to beat: only the sanity checks apply, so it passes.
    assert lin.summaries["p01"]["promoted"]
    # Later ones are decided on paired differences, each reason with its interval.
    reasons = lin.summaries["p03"]["reasons"]
    assert any(r.startswith("PASS p01 non-inferior: Δ ") and "clusters)" in r for r in reasons)
    assert any(r.startswith("PASS forgetting: ") for r in reasons)
    # @champion is the last version that passed the gate.
    passed = [v.version for v in versions if v.tags["gate"] == "pass"]
    assert registry.champion() is not None and registry.champion().version == passed[-1]

    store = LocalStore(lin.store)
    assert list_versions(store) == PERIODS
    for p in PERIODS:
        memory = ReplayMemory.load(store, p)
        assert memory.period == p and 0 < len(memory) <= params.replay.capacity
        assert (Path(lin.store) / "shards" / p / "manifest.json").is_file()


def test_report_reads_the_matrix_back_from_mlflow(lin: Lineage):
    registry = MlflowRegistry()
    report = build_report(_params(lin), registry)
    assert [r.version for r in report.versions][:3] == [1, 2, 3]
    knn = report.matrices["knn"]
    assert knn.periods == tuple(PERIODS)
    for i, p in enumerate(PERIODS):
        # Row i is promoted version i's accuracy on every period so far, as it was logged.
        row = lin.summaries[p]["row"]
        assert {q: knn.get(p, q) for q in PERIODS[: i + 1]} == pytest.approx(row, abs=0)
    assert report.summary["knn"].average_accuracy == pytest.approx(
        float(np.mean(list(lin.summaries["p03"]["row"].values())))
    )
    # Every cell with its logged 95% interval; next-period accuracy; the blind baselines.
    low, high = report.lows["knn"], report.highs["knn"]
    for i, p in enumerate(PERIODS):
        for q in PERIODS[: i + 1]:
            assert low.get(p, q) <= knn.get(p, q) <= high.get(p, q)
    text = "\n".join(format_report(report))
    cell = f"{knn.get('p01', 'p01'):.3f} ±"
    assert cell in text and "next-period accuracy (the model served" in text
    assert [b.period for b in report.baselines] == PERIODS
    for b in report.baselines:
        assert b.majority.value is not None and b.random_knn.value is not None
        assert b.majority.low is not None and b.majority.low <= b.majority.value
    served = report.summary["knn"].next_period
    assert served is not None and list(served) == PERIODS[1:]
    assert served["p02"].value == knn.get("p01", "p02")


def test_every_refresh_logs_the_compatibility_matrix_and_tags_the_version(lin: Lineage):
    registry = MlflowRegistry()
    versions = _lineage_versions(registry)
    first, *later = versions
    assert first.tags["cssl.compat"] == ""  # no champion: nothing to be compatible with
    first_metrics = registry.run(first.run_id).metrics
    assert not any(k.startswith("compat_top1/") for k in first_metrics)
    for v in later:
        metrics = registry.run(v.run_id).metrics
        names = ("candidate", "champion")
        for q in names:
            for g in names:
                assert 0.0 <= metrics[f"compat_top1/{q}__{g}"] <= 1.0
                assert 0.0 <= metrics[f"compat_map10/{q}__{g}"] <= 1.0
        direct = metrics["compat_top1/candidate__champion"]
        own = metrics["compat_top1/champion__champion"]
        via = metrics.get("compat_top1/candidate_adapter__champion", -1.0)  # with an adapter
        expected = "direct" if direct >= own else "adapter" if via >= own else "none"
        assert v.tags["cssl.compat"] == expected
        assert metrics["compat/direct"] == float(direct >= own)
        assert 0.0 <= metrics["compat/average_compatibility"] <= 1.0
        local = mlflow.artifacts.download_artifacts(run_id=v.run_id, artifact_path="eval")
        record = json.loads((Path(local) / "compatibility.json").read_text())
        assert record["lineage"] == ["champion", "candidate"]
        assert record["matrix"]["gallery_models"] == ["champion", "candidate"]
        assert record["verdict"]["kind"] == v.tags["cssl.compat"]
        assert record["matrix"]["top1"][1][0] == pytest.approx(direct)
        assert (Path(local) / "compatibility.md").is_file()
        assert (Path(local) / "compatibility.png").stat().st_size > 0
        assert any(r.startswith("PASS compatibility: ") for r in lin.summaries[v.period]["reasons"])
    text = "\n".join(format_report(build_report(_params(lin), registry)))
    assert "| version | period | gate | parent | compat |" in text
    assert "Compatibility (retrieval top-1 / mAP@k" in text
    assert "average compatibility of the lineage (CL2R, consecutive pairs)" in text


@pytest.mark.slow
def test_an_adapter_lineage_logs_the_adapter_row_and_saves_the_adapter(
    prefect_harness: None, tiny_params_file: Path, sim_shards: Path, tmp_path: Path, monkeypatch
):
    state = new_lineage(tmp_path / "state", tiny_params_file)
    state.use(monkeypatch)
    for period in PERIODS[:2]:
        refresh(
            period,
            shard=str(sim_shards / period),
            params_path=str(tiny_params_file),
            overrides=[*state.overrides, "compat.mode=adapter"],
        )
    registry = MlflowRegistry()
    v1, v2 = registry.versions()
    model = Embedder.load(registry.download_embedder(v2.version))
    assert model.adapter is not None and model.adapter_parent == v1.tags["weights_sha256"]
    metrics = registry.run(v2.run_id).metrics
    via = metrics["compat_top1/candidate_adapter__champion"]
    direct = metrics["compat_top1/candidate__champion"]
    own = metrics["compat_top1/champion__champion"]
    assert "compat_top1/candidate_adapter__candidate" not in metrics  # other space
    expected = "direct" if direct >= own else "adapter" if via >= own else "none"
    assert v2.tags["cssl.compat"] == expected
    assert metrics["compat/via_adapter"] == float(via >= own)


def test_rerun_of_a_finished_period_does_nothing(lin: Lineage, sim_shards: Path):
    manifest = Path(lin.store) / "memory" / "p02" / "manifest.json"
    before = manifest.read_bytes()
    count = len(MlflowRegistry().versions())
    summary = _run(lin, "p02", sim_shards / "p02")
    assert summary["skipped"] is True
    assert summary["version"] == 2
    assert summary["reasons"] == ["already refreshed: same shard and config"]
    assert len(MlflowRegistry().versions()) == count
    assert manifest.read_bytes() == before


def test_latest_and_the_declared_source(lin: Lineage, sim_shards: Path):
    """``latest`` is the last period; with no shard or source the flow ingests the period's
    declared source (``simulate`` here), which gives the very shard of the lineage. (A name
    that params.yaml does not declare continues the lineage: tests/test_open_periods.py.)"""
    params = _params(lin)
    assert resolve_period(params, "latest") == "p03"
    with pytest.raises(ConfigError, match="'p/09' is not a period name"):
        resolve_period(params, "p/09")
    summary = _run(lin, "latest", sim_shards / "p03")
    assert (summary["period"], summary["version"], summary["skipped"]) == ("p03", 3, True)
    summary = _run(lin, "p01", None)  # simulated into CSSL_HOME/incoming, then validated
    assert (summary["version"], summary["skipped"]) == (1, True)
    incoming = Shard.open(lin.home / "incoming" / "p01")
    assert incoming.fingerprint == Shard.open(sim_shards / "p01").fingerprint


def test_a_second_refresh_of_the_same_period_fails_fast(lin: Lineage, sim_shards: Path, capsys):
    count = len(MlflowRegistry().versions())
    with period_lock("p02"):
        with pytest.raises(RefreshBusy, match="another refresh of period 'p02' is running"):
            _run(lin, "p02", sim_shards / "p02")
        capsys.readouterr()
        code = main(
            [
                "refresh",
                "--period",
                "p02",
                "--shard",
                str(sim_shards / "p02"),
                "--params",
                str(lin.params_file),
                "--set",
                lin.overrides[0],
            ]
        )
    assert code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error:") and "another refresh of period 'p02' is running" in last
    assert len(MlflowRegistry().versions()) == count
    # The lock is released: the same refresh now goes through (and finds the work done).
    assert _run(lin, "p02", sim_shards / "p02")["skipped"] is True


def test_a_shard_of_another_period_is_refused(lin: Lineage, sim_shards: Path, capsys):
    count = len(MlflowRegistry().versions())
    with pytest.raises(ShardError, match="holds period 'p01', not 'p02'"):
        _run(lin, "p02", sim_shards / "p01")
    capsys.readouterr()
    code = main(
        [
            "refresh",
            "--period",
            "p02",
            "--shard",
            str(sim_shards / "p01"),
            "--params",
            str(lin.params_file),
            "--set",
            lin.overrides[0],
        ]
    )
    assert code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: shard ") and "holds period 'p01', not 'p02'" in last
    with pytest.raises(ValueError, match="either --shard or --source"):
        _run(lin, "p02", sim_shards / "p02", source=str(sim_shards / "p02"))
    assert len(MlflowRegistry().versions()) == count


def test_validate_task_refuses_an_unclean_shard(lin: Lineage, sim_shards: Path, tmp_path: Path):
    params = _params(lin)
    good = validate.fn(str(sim_shards / "p01"), params, "p01")
    assert good.fingerprint == Shard.open(sim_shards / "p01").fingerprint
    bad = tmp_path / "p01"
    shutil.copytree(sim_shards / "p01", bad)
    part = Shard.open(bad).part_paths()[0]
    table = pq.read_table(part)
    images = table.column("image").to_pylist()
    images[0] = b"\xff\xd8 not a jpeg"
    index = table.schema.get_field_index("image")
    table = table.set_column(index, table.schema.field(index), pa.array(images, pa.binary()))
    pq.write_table(table, part)
    with pytest.raises(ShardError, match="is not clean.*run `cssl validate"):
        validate.fn(str(bad), params, "p01")


def test_embed_writes_the_champions_embeddings(lin: Lineage, sim_shards: Path, tmp_path: Path):
    registry = MlflowRegistry()
    champion = registry.champion()
    assert champion is not None
    out = tmp_path / "emb.parquet"
    shard = Shard.open(sim_shards / "p01")
    assert main(["embed", str(shard.path), "--out", str(out)]) == 0
    table = pq.read_table(out)
    model = Embedder.load(registry.download_embedder(champion.version))
    dim = model.num_features
    assert table.num_rows == shard.num_rows
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    assert set(table.column("model_version").to_pylist()) == {champion.version}
    frames = shard.read(["frame_id", "image"])
    assert table.column("frame_id").to_pylist() == frames.column("frame_id").to_pylist()
    got = torch.from_numpy(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)))
    want = F.normalize(extract_features(model, frames.column("image").to_pylist(), 32), dim=1)
    assert torch.allclose(got, want, atol=1e-5)
    assert main(["embed", str(shard.path), "--out", str(out), "--split", "eval"]) == 0
    assert pq.read_table(out).num_rows == shard.manifest["splits"]["eval"]


def test_a_rejected_candidate_is_registered_but_not_promoted(
    lin: Lineage, sim_shards: Path, tmp_path: Path
):
    """An unreachable gate (the candidate must beat the champion's average by 100 points) and a
    damaging update (fine-tuning at 10x the learning rate): the gate rejects it, whatever the
    data."""
    registry = MlflowRegistry()
    champion = registry.champion()
    assert champion is not None and lin.summaries["p03"]["promoted"]
    count = len(registry.versions())
    strict = [
        "gate.max_forgetting=-1",  # must beat its best earlier accuracy by 100 points: never
        "gate.margin=0",
        "gate.new_period=better",
        "train.strategy=finetune",
        "train.lr=3.0",
    ]
    summary = _run(lin, "p03", sim_shards / "p03", *strict)
    assert summary["promoted"] is False and summary["skipped"] is False
    assert any(r.startswith("FAIL") for r in summary["reasons"])
    assert summary["champion_version"] == champion.version
    rejected = registry.get(summary["version"])
    assert rejected.version == count + 1 and rejected.period == "p03"
    assert rejected.tags["gate"] == "reject"
    assert rejected.tags["config_hash"] == _params(lin, *strict).config_hash()
    assert rejected.tags["parent_version"] == str(champion.version)
    assert registry.champion().version == champion.version
    assert registry.alias("challenger").version == rejected.version
    gate_file = mlflow.artifacts.download_artifacts(
        run_id=rejected.run_id, artifact_path="eval/gate.json", dst_path=str(tmp_path)
    )
    gate = json.loads(Path(gate_file).read_text())
    assert gate["promote"] is False and gate["reasons"] == summary["reasons"]
    assert set(gate["differences"]) == {"p01", "p02", "p03"}
    assert gate["forgetting"]["high"] > -1
    # The report's lineage keeps the promoted p03 version's row, not the rejected one's.
    knn = build_report(_params(lin), registry).matrices["knn"]
    assert knn.row("p03") == pytest.approx(lin.summaries["p03"]["row"], abs=0)


def test_rollback_through_the_registry_and_the_cli(lin: Lineage, capsys):
    registry = MlflowRegistry()
    original = registry.champion()
    assert original is not None
    for version in (1, 2, 3):
        registry.promote(version)
    assert registry.rollback() == Rollback(3, 2)
    assert registry.champion().version == 2
    capsys.readouterr()
    assert main(["rollback"]) == 0
    assert capsys.readouterr().out.strip() == "@champion rolled back: version 2 -> 1"
    assert registry.champion().version == 1
    assert main(["rollback"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: nothing to roll back to: fewer than two champions so far"
    assert main(["promote", "99"]) == 1
    assert "has no version 99" in capsys.readouterr().err
    registry.promote(original.version)
    assert registry.champion().version == original.version


def test_refresh_ingests_an_image_folder(
    tmp_path: Path, sim_shards: Path, tiny_params_file: Path, monkeypatch
):
    """``--source`` a folder of JPEGs in one sub-folder per game: ingested (categories from the
    folder names), validated, published and refreshed into version 1 of a fresh registry."""
    frames = Shard.open(sim_shards / "p01").read(["frame_id", "category", "image"])
    folder = tmp_path / "raw"
    for fid, cat, img in zip(
        *(frames.column(c).to_pylist() for c in frames.column_names), strict=True
    ):
        (folder / cat).mkdir(parents=True, exist_ok=True)
        (folder / cat / f"{fid}.jpg").write_bytes(img)
    state = new_lineage(tmp_path / "state", tiny_params_file)
    state.use(monkeypatch)
    summary = _run(state, "p01", None, source=str(folder))
    assert (summary["version"], summary["promoted"]) == (1, True)
    shard = Shard.open(state.home / "incoming" / "p01")
    assert set(shard.manifest["categories"]) == set(frames.column("category").to_pylist())
    assert 0 < shard.num_rows <= frames.num_rows
    version = MlflowRegistry().get(1)
    assert version.tags["shard_fingerprint"] == shard.fingerprint
    stored = Path(state.store) / "shards" / "p01" / "manifest.json"
    assert json.loads(stored.read_text())["fingerprint"] == shard.fingerprint


@pytest.mark.server
def test_refresh_on_s3_with_a_tracking_server(
    mlflow_server,
    s3_bucket: str,
    tmp_path: Path,
    sim_shards: Path,
    tiny_params_file: Path,
    monkeypatch,
):
    """The shared-infrastructure setup: shards and replay memory in S3 (moto server), MLflow
    over HTTP with artifacts proxied to S3. p02 loads its parent from the server and its
    memory and p01's shard from S3."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipelines.settings import MODEL_NAME

    try:  # the server is shared with test_registry: start from an empty registered model
        MlflowClient(mlflow_server.uri).delete_registered_model(MODEL_NAME)
    except MlflowException:
        pass
    state = new_lineage(
        tmp_path / "state",
        tiny_params_file,
        store=f"s3://{s3_bucket}/cssl",
        tracking_uri=mlflow_server.uri,
    )
    state.use(monkeypatch)
    first = _run(state, "p01", sim_shards / "p01")
    second = _run(state, "p02", sim_shards / "p02")
    assert (first["version"], second["version"]) == (1, 2)
    registry = MlflowRegistry()
    v2 = registry.get(2)
    assert v2.tags["parent_version"] == ("1" if first["promoted"] else "")
    assert v2.tags["memory_manifest"] == f"s3://{s3_bucket}/cssl/memory/p02/manifest.json"
    store = open_store(state.store)
    assert list_versions(store) == ["p01", "p02"]
    assert ReplayMemory.load(store, "p02").fingerprint == v2.tags["memory_fingerprint"]
    for p in ("p01", "p02"):
        manifest = json.loads(store.get_bytes(f"shards/{p}/manifest.json"))
        assert manifest["fingerprint"] == Shard.open(sim_shards / p).fingerprint
    assert (
        Embedder.load(registry.download_embedder(2)).state_fingerprint()
        == (v2.tags["weights_sha256"])
    )
    assert _run(state, "p02", sim_shards / "p02")["skipped"] is True


NEVER = ["gate.max_forgetting=-1"]  # beat its best earlier accuracy by 100 points
DIVERSE = "replay.selection=diverse"


def _rejected_p02(tmp_path: Path, sim_shards: Path, params_file: Path, monkeypatch) -> Lineage:
    """p01 promoted, then p02's candidate rejected, with ``diverse`` replay selection."""
    state = new_lineage(tmp_path / "state", params_file)
    state.use(monkeypatch)
    assert _run(state, "p01", sim_shards / "p01", DIVERSE)["promoted"]
    summary = _run(state, "p02", sim_shards / "p02", DIVERSE, *NEVER)
    assert summary["promoted"] is False and summary["version"] == 2
    return state


def test_a_rejected_period_keeps_a_memory_chosen_by_the_champion_and_no_lineage_row(
    tmp_path: Path, sim_shards: Path, tiny_params_file: Path, monkeypatch
):
    """Issue 12, fixes 5 and 6. With ``diverse`` selection the memory depends on the model
    that embeds the frames. p02's candidate is rejected: memory(p02) must be the one the
    champion (version 1) selects, not the rejected candidate's, and p02 has no row in the
    lineage."""
    from cssl_core import period as core

    state = _rejected_p02(tmp_path, sim_shards, tiny_params_file, monkeypatch)
    registry = MlflowRegistry()
    store = LocalStore(state.store)
    params = _params(state, DIVERSE, *NEVER)
    shard = Shard.open(Path(state.store) / "shards" / "p02")
    before = ReplayMemory.load(store, "p01")
    by_champion = core.next_memory(params, before, shard, registry.load_embedder(1), "p02")
    by_candidate = core.next_memory(params, before, shard, registry.load_embedder(2), "p02")
    assert by_champion.fingerprint != by_candidate.fingerprint  # the rule is observable here
    kept = ReplayMemory.load(store, "p02")
    assert kept.fingerprint == by_champion.fingerprint
    assert registry.get(2).lineage.memory_fingerprint == kept.fingerprint

    knn = build_report(params, registry).matrices["knn"]
    assert knn.periods == ("p01", "p02")
    assert not np.isnan(knn.get("p01", "p01"))
    assert np.isnan(knn.values[1]).all()  # the rejected candidate is not the lineage


@pytest.mark.slow
def test_refreshing_a_rejected_period_again_keeps_its_published_memory(
    tmp_path: Path, sim_shards: Path, tiny_params_file: Path, monkeypatch
):
    """Memory versions never change: a later refresh of p02 (another config, rejected again)
    registers a new version and leaves memory(p02) as the first decision published it."""
    state = _rejected_p02(tmp_path, sim_shards, tiny_params_file, monkeypatch)
    manifest = Path(state.store) / "memory" / "p02" / "manifest.json"
    published = manifest.read_bytes()
    again = _run(state, "p02", sim_shards / "p02", DIVERSE, *NEVER, "train.lr=0.05")
    assert (again["promoted"], again["skipped"], again["version"]) == (False, False, 3)
    assert manifest.read_bytes() == published
    assert (
        MlflowRegistry().get(3).lineage.memory_fingerprint
        == ReplayMemory.load(LocalStore(state.store), "p02").fingerprint
    )
