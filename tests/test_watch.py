"""The ``watch`` flow on a simulated stream whose truth is known, with real Prefect and MLflow.

The stream (``simulate.schedule``): period index 0 and 1 show the same game mix (static), index
2 switches to new games (sudden). Only ``p01`` is declared in params.yaml; the later periods
are named where their frames landed (``--source .../2026-W44``) or from the calendar
(``--period auto``) and continue the lineage. One module fixture walks the stream once:

1. ``p01``: no @champion yet -> refresh (in-process subflow);
2. ``2026-W44`` (static, from a source prefix): no drift -> skip, not in the lineage;
3. ``2026-W44`` again with ``--force``: refreshed although the last refresh started seconds
   ago (the cooldown does not hold a forced refresh);
4. the calendar period (sudden shift) with the default 7-day cooldown: drift found, but the
   cooldown holds it -> skip;
5. the same with ``watch.cooldown=0s``: drift -> refresh;
6. ``2026-W45`` (index 3, the shifted mix again) with ``watch.max_age=1s``: @champion is older
   than that, so max age asks for a refresh, which the default cooldown holds -> skip.

Drift settings are scaled to the tiny shards (400 frames, 40 frames per side, 5-second
segments, 200 permutations, a model trained at lr 0.001): with drift seeds 0-3 the static
pair gave p 0.59-0.97 and the shift p <= 0.01 (MMD² 0.09-0.18) while the test was written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow.artifacts
import pytest
import yaml
from conftest import BIN, REPO, TINY_PARAMS, Lineage, environment, new_lineage

from cssl_core.config import CalendarConfig, load_params, params_from_dict
from cssl_core.data.shard import Shard
from cssl_core.learn.models import Embedder
from pipelines.cli import EXIT_FAILED, main
from pipelines.lineage import periods_to_export, ran_periods
from pipelines.mlflow_registry import MlflowRegistry
from pipelines.watch import WATCH_EXPERIMENT, watch

pytestmark = pytest.mark.usefixtures("prefect_harness")

STATIC = "2026-W44"  # a weekly name: never the (monthly) calendar period of the test
AGED = "2026-W45"
SCHEDULE = [{"kind": "static", "periods": 2}, {"kind": "sudden"}, {"kind": "static", "periods": 1}]
WATCH_PARAMS: dict[str, Any] = {
    **TINY_PARAMS,
    "periods": {"p01": {"previous": ""}},
    "simulate": {
        **TINY_PARAMS["simulate"],
        "frames_per_period": 400,
        "schedule": SCHEDULE,
    },
    # Three steps at the default lr scramble the features of the tiny model so much that it
    # separates no games; at lr 0.001 the model keeps its seeded initial features, which do.
    "train": {**TINY_PARAMS["train"], "lr": 0.001},
    "drift": {"sample_size": 40, "segment_seconds": 5, "permutations": 200},
}


@pytest.fixture(scope="module")
def watch_params_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete params.yaml (every section, as DVC needs) declaring only p01."""
    path = tmp_path_factory.mktemp("watch-params") / "params.yaml"
    tree = params_from_dict(WATCH_PARAMS).model_dump(mode="json")
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory, watch_params_file: Path) -> Path:
    """``shards/p01`` (index 0), ``raw/2026-W44`` (index 1, the same game mix: a Parquet
    dataset where new frames land, named like its period) and ``raw/2026-W45`` (index 3)."""
    from cssl_core.data.simulate import simulate_period

    root = tmp_path_factory.mktemp("watch-stream")
    cfg = load_params(watch_params_file).simulate
    simulate_period(root / "shards", "p01", 0, 3, cfg)
    simulate_period(root / "raw", STATIC, 1, 3, cfg)
    simulate_period(root / "raw", AGED, 3, 4, cfg)
    return root


@pytest.fixture(scope="module")
def watched(
    prefect_harness: None,
    tmp_path_factory: pytest.TempPathFactory,
    watch_params_file: Path,
    stream: Path,
) -> tuple[Lineage, list[dict[str, Any]], str]:
    """The six watch decisions of the module docstring, in order, and the calendar period."""
    state = new_lineage(tmp_path_factory.mktemp("watch-lineage"), watch_params_file)
    calendar = CalendarConfig(periods_every="month").period_at(datetime.now(UTC))
    records: list[dict[str, Any]] = []

    def run(overrides: tuple[str, ...] = (), **kw: Any) -> None:
        records.append(
            watch(
                params_path=str(watch_params_file),
                overrides=[*state.overrides, *overrides],
                **kw,
            )
        )

    with environment(**state.env):
        run(period="p01", shard=str(stream / "shards" / "p01"))
        run(source=str(stream / "raw" / STATIC))
        run(source=str(stream / "raw" / STATIC), force=True)
        run(period="auto")
        run(("watch.cooldown=0s",), period="auto")
        run(("watch.max_age=1s",), source=str(stream / "raw" / AGED))
        registry = MlflowRegistry()
        for v in registry.versions():
            state.weights[v.period] = v.tags["weights_sha256"]
    return state, records, calendar


def test_the_first_period_is_refreshed_when_there_is_no_champion(watched):
    _, records, _ = watched
    first = records[0]
    assert (first["period"], first["action"], first["triggers"]) == (
        "p01",
        "refresh",
        ["no_champion"],
    )
    assert first["drift"] is None and first["champion_version"] is None
    assert first["refresh"]["mode"] == "in-process" and first["refresh"]["version"] == 1


def test_a_period_without_shift_is_skipped(watched):
    state, records, _ = watched
    skip = records[1]
    assert skip["period"] == STATIC  # named after the source's last path component
    assert (skip["action"], skip["triggers"], skip["refresh"]) == ("skip", [], {})
    assert skip["summary"] == "skip: no drift, and @champion is within its maximum age"
    drift = skip["drift"]
    assert drift["drifted"] is False and drift["reference_kind"] == "champion"
    assert drift["result"]["p_value"] >= 0.05
    assert "p01" in drift["reference"]  # the shard of the period @champion was trained on
    assert any(r.startswith("drift check: no drift") for r in skip["reasons"])


def test_force_refreshes_inside_the_cooldown(watched):
    _, records, _ = watched
    forced = records[2]
    assert forced["period"] == STATIC
    assert forced["action"] == "refresh" and "force" in forced["triggers"]
    assert forced["since_last_refresh_s"] < 7 * 86400  # the default cooldown would hold it
    assert forced["refresh"]["version"] == 2 and forced["refresh"]["promoted"]


def test_the_cooldown_holds_a_detected_shift(watched):
    _, records, calendar = watched
    held = records[3]
    assert held["period"] == calendar
    assert held["drift"]["drifted"] is True
    assert (held["action"], held["triggers"], held["refresh"]) == ("skip", ["drift"], {})
    assert held["summary"].startswith("skip: cooldown (drift asked for a refresh")
    assert held["cooldown"] == "7d"
    assert any("within watch.cooldown 7d" in r for r in held["reasons"])


def test_a_shift_is_refreshed_and_continues_the_lineage(watched):
    state, records, calendar = watched
    shifted = records[4]
    assert shifted["period"] == calendar  # --period auto: the UTC calendar month
    assert (shifted["action"], shifted["triggers"]) == ("refresh", ["drift"])
    assert shifted["drift"]["result"]["p_value"] < 0.05
    assert shifted["refresh"]["version"] == 3
    registry = MlflowRegistry(state.tracking_uri)
    assert registry.stream_periods() == ["p01", STATIC, calendar]  # the skips are not in it
    v3 = registry.get(3)
    assert (v3.period, v3.lineage.previous_period, v3.lineage.source) == (
        calendar,
        STATIC,
        "simulate",
    )
    v2 = registry.get(2)
    assert v2.lineage.previous_period == "p01"
    assert v2.lineage.source == str((Path(records[1]["source"])).resolve())
    assert registry.champion().version == 3


def test_max_age_asks_for_a_refresh_of_an_old_champion(watched):
    state, records, calendar = watched
    aged = records[5]
    assert aged["period"] == AGED and aged["champion_version"] == 3
    assert "max_age" in aged["triggers"] and aged["max_age"] == "1s"
    assert (aged["action"], aged["refresh"]) == ("skip", {})
    assert aged["summary"].startswith("skip: cooldown")
    assert any("older than watch.max_age 1s" in r for r in aged["reasons"])
    assert MlflowRegistry(state.tracking_uri).stream_periods() == ["p01", STATIC, calendar]


def test_every_decision_is_recorded_in_mlflow(watched):
    state, records, _ = watched
    registry = MlflowRegistry(state.tracking_uri)
    ids = {r["run_id"] for r in records}
    runs = [r for r in registry.search_runs(WATCH_EXPERIMENT, limit=20) if r.run_id in ids]
    assert [r.tags["cssl.action"] for r in reversed(runs)] == [r["action"] for r in records]
    for run, record in zip(reversed(runs), records, strict=True):
        assert run.run_id == record["run_id"] and run.status == "FINISHED"
        assert run.tags["cssl.period"] == record["period"]
        assert run.tags["cssl.triggers"] == ",".join(record["triggers"])
        assert run.metrics["refresh"] == float(record["action"] == "refresh")
        with environment(MLFLOW_TRACKING_URI=state.tracking_uri):
            local = mlflow.artifacts.download_artifacts(
                run_id=run.run_id, artifact_path="watch/decision.json"
            )
        decision = json.loads(Path(local).read_text())
        assert decision["reasons"] == record["reasons"] and decision["run_id"] == run.run_id
        if record["action"] == "refresh":
            assert run.tags["cssl.refresh.version"] == str(record["refresh"]["version"])
    checks = registry.search_runs("cssl-drift", limit=10)
    assert len(checks) == 5  # every decision with a champion ran a drift check


def test_watch_starts_the_refresh_as_a_flow_run_of_prefect(watched):
    """Without a refresh deployment the refresh runs as a subflow of watch: Prefect's API has
    a completed ``refresh`` flow run whose parent task belongs to a ``watch`` flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        refreshes = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["refresh"]))
        )
        watches = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["watch"])))
        watch_ids = {w.id for w in watches}
        parents = [
            client.read_task_run(r.parent_task_run_id).flow_run_id
            for r in refreshes
            if r.parent_task_run_id is not None
        ]
    assert sum(p in watch_ids for p in parents) >= 3  # the three refreshes watch started
    assert all(r.state.is_completed() for r in refreshes if r.parent_task_run_id is not None)


def test_lineage_export_writes_the_chain_that_ran(watched, tmp_path: Path):
    state, records, calendar = watched
    target = tmp_path / "params.yaml"
    shutil.copy(state.params_file, target)
    with environment(**state.env):
        assert main(["lineage", "export", "--write", str(target), "--json"]) == 0
        again = periods_to_export(load_params(target), ran_periods(MlflowRegistry()))
    params = load_params(target)
    assert params.period_names == ["p01", STATIC, calendar]
    assert params.periods[STATIC].previous == "p01"
    assert params.period_source(STATIC) == str(Path(records[2]["source"]).resolve())
    assert (params.periods[calendar].previous, params.period_source(calendar)) == (
        STATIC,
        "simulate",
    )
    assert again == []  # a second export has nothing to add
    assert params.config_hash() == load_params(state.params_file).config_hash()


@pytest.mark.slow
def test_dvc_repro_rebuilds_the_undeclared_periods(watched, tmp_path: Path):
    """After ``cssl lineage export --write``, ``dvc repro train@<calendar period>`` rebuilds the
    periods watch refreshed from their sources (the prefix's Parquet dataset, the simulator at
    the period's place in the chain) with the very weights the flow registered."""
    state, _, calendar = watched
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(state.params_file, repo / "params.yaml")
    for placeholder in ("data/models/.model", "data/memory/.memory"):
        shutil.copytree(REPO / placeholder, repo / placeholder)
    with environment(**state.env):
        assert main(["lineage", "export", "--write", str(repo / "params.yaml")]) == 0
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "CSSL_HOME": str(repo / ".cssl"),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, timeout=120)
    done = subprocess.run(
        [str(BIN / "dvc"), "repro", f"train@{calendar}"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for period in ("p01", STATIC, calendar):
        model = Embedder.load(repo / "data" / "models" / f"{period}.model")
        assert model.state_fingerprint() == state.weights[period], period
    registry = MlflowRegistry(state.tracking_uri)
    for v in registry.versions():
        shard = Shard.open(repo / "data" / "shards" / v.period)
        assert shard.fingerprint == v.tags["shard_fingerprint"], v.period


# -- bad input: one line -------------------------------------------------------------------


def _one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI, which must fail; its last line on stderr is the one error line (a flow's
    Prefect log may come before it)."""
    capsys.readouterr()
    assert main(argv) == EXIT_FAILED
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err[-2000:]
    return last


@pytest.fixture(scope="module")
def tiny_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid shard of 12 frames: fewer than a drift check needs on either side."""
    from cssl_core.config import SimulateConfig
    from cssl_core.data.simulate import simulate_period

    root = tmp_path_factory.mktemp("tiny-shard")
    simulate_period(root, "p09", 0, 1, SimulateConfig(frames_per_period=12, size=32))
    return root / "p09"


def _cli_state(state: Lineage, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    state.use(monkeypatch)
    return ["--params", str(state.params_file), *(f"--set={o}" for o in state.overrides)]


def test_drift_on_a_tiny_or_empty_shard_is_one_line(
    watched, capsys, tiny_shard: Path, stream: Path, tmp_path: Path, monkeypatch
):
    state, _, _ = watched
    common = [*_cli_state(state, monkeypatch), "--no-log"]
    reference = ["--reference", str(stream / "shards" / "p01")]
    line = _one_error_line(capsys, ["drift", "--shard", str(tiny_shard), *reference, *common])
    assert "at least 20" in line and "p09" in line, line
    line = _one_error_line(
        capsys,
        [
            "drift",
            "--shard",
            str(stream / "shards" / "p01"),
            *common,
            "--reference",
            str(tiny_shard),
        ],
    )
    assert "at least 20" in line, line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_error_line(capsys, ["drift", "--shard", str(empty), *reference, *common])
    assert str(empty) in line and "not a shard" in line, line


def test_watch_on_a_tiny_or_empty_shard_is_one_line(
    watched, capsys, tiny_shard: Path, tmp_path: Path, monkeypatch
):
    state, records, _ = watched
    common = _cli_state(state, monkeypatch)
    line = _one_error_line(capsys, ["watch", "--shard", str(tiny_shard), *common])
    assert "at least 20" in line, line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_error_line(capsys, ["watch", "--shard", str(empty), *common])
    assert str(empty) in line, line
    registry = MlflowRegistry(state.tracking_uri)
    assert "p09" not in registry.stream_periods()
    decided = {r.run_id for r in registry.search_runs(WATCH_EXPERIMENT, limit=20)}
    assert decided == {r["run_id"] for r in records}  # no decision was recorded for them


def test_drift_before_any_refresh_is_one_line(
    capsys, tmp_path: Path, stream: Path, watch_params_file: Path, monkeypatch
):
    """``cssl drift`` in a fresh state: one line saying there is no @champion."""
    state = new_lineage(tmp_path, watch_params_file)
    line = _one_error_line(
        capsys,
        ["drift", "--shard", str(stream / "shards" / "p01"), *_cli_state(state, monkeypatch)],
    )
    assert "@champion" in line, line


@pytest.mark.slow
def test_the_static_then_shift_demo_skips_one_period_and_refreshes_the_shift(
    prefect_harness, watch_params_file: Path, tmp_path: Path, monkeypatch, capsys
):
    """``cssl demo --stream static-then-shift`` on three tiny periods: p01 refreshed, p02 (same
    games) skipped, p03 (new games) refreshed on drift; the skipped period is not in the
    lineage, and the report reads back the two refreshed ones."""
    for name in ("CSSL_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    three = {"p01": {"previous": ""}, "p02": {"previous": "p01"}, "p03": {"previous": "p02"}}
    argv = ["demo", "--stream", "static-then-shift", "--workdir", str(tmp_path / "state")]
    argv += ["--params", str(watch_params_file), "--set", f"periods={json.dumps(three)}"]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "p02: skip: no drift, and @champion is within its maximum age" in printed
    assert "p03: refresh (drift)" in printed
    registry = MlflowRegistry(f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}")
    assert registry.stream_periods() == ["p01", "p03"]
    assert registry.get(2).lineage.previous_period == "p01"
