"""The ``cssl`` command line through ``main(argv)``: help for every verb, one-line errors with a
non-zero exit code (no traceback), the simulate -> validate happy path and ``--json`` output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from conftest import new_lineage

from pipelines.cli import EXIT_FAILED, EXIT_OK, build_parser, main
from pipelines.mlflow_registry import MlflowRegistry


def _verbs(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every verb path of the parser (``("bench", "ingest")`` included)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((*prefix, name))
                found += _verbs(sub, (*prefix, name))
    return found


VERBS = _verbs(build_parser())
# `bench continual` hands its arguments to benchmarks.continual's own parser
# (argparse.REMAINDER); a leading "--help" never reaches it (argparse rejects it first).
HELP_BROKEN: set[tuple[str, ...]] = set()


def test_every_verb_is_listed():
    names = {v[0] for v in VERBS}
    assert names == {
        "simulate",
        "ingest",
        "validate",
        "config",
        "bench",
        "refresh",
        "report",
        "promote",
        "rollback",
        "embed",
        "demo",
        "drift",
        "watch",
        "lineage",
        "train",
        "evaluate",
        "index",
        "search",
        "backfill",
    }
    assert ("bench", "ingest") in VERBS
    assert ("lineage", "export") in VERBS
    assert ("index", "build") in VERBS and ("index", "status") in VERBS
    assert ("bench", "index") in VERBS


@pytest.mark.parametrize(
    "verb",
    [
        pytest.param(v, marks=pytest.mark.xfail(strict=True, reason="REMAINDER eats no --help"))
        if v in HELP_BROKEN
        else v
        for v in VERBS
    ],
    ids=" ".join,
)
def test_help_works_for_every_verb(verb: tuple[str, ...], capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cssl {' '.join(verb)}")


def _fails_with_one_line(argv: list[str], capsys, *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == EXIT_FAILED
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_unknown_period(capsys, tmp_path: Path):
    _fails_with_one_line(
        ["ingest", "--period", "p99", "--out", str(tmp_path)], capsys, "unknown period 'p99'", "p01"
    )
    _fails_with_one_line(
        ["train", "--period", "p99", "--shards", str(tmp_path)], capsys, "unknown period 'p99'"
    )


def test_undeclared_period_with_a_missing_shard_through_the_flow(
    prefect_harness, tiny_params_file: Path, tmp_path: Path, monkeypatch, capsys
):
    """A period params.yaml does not declare is accepted (it would continue the lineage),
    but its frames must exist: one line naming the missing shard, nothing registered."""
    state = new_lineage(tmp_path, tiny_params_file)
    state.use(monkeypatch)
    capsys.readouterr()
    code = main(
        [
            "refresh",
            "--period",
            "p99",
            "--shard",
            str(tmp_path / "p99"),
            "--params",
            str(tiny_params_file),
        ]
    )
    assert code == EXIT_FAILED
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(tmp_path / "p99") in last, last
    assert (
        not (tmp_path / "mlflow.db").exists() or not MlflowRegistry(state.tracking_uri).versions()
    )


def test_missing_shard_directory(capsys, tmp_path: Path):
    missing = tmp_path / "nowhere" / "p01"
    _fails_with_one_line(["validate", str(missing)], capsys, str(missing))
    _fails_with_one_line(
        ["train", "--period", "p01", "--shards", str(tmp_path / "nowhere")], capsys, "p01"
    )


def test_bad_set_key(capsys):
    _fails_with_one_line(["config", "--set", "train.nope=1"], capsys, "train.nope")
    _fails_with_one_line(["config", "--set", "train.steps"], capsys, "section.key=value")
    _fails_with_one_line(["config", "--set", "train.steps=-5"], capsys, "train.steps")
    _fails_with_one_line(
        ["config", "--params", "/no/such/params.yaml"],
        capsys,
        "/no/such/params.yaml does not exist",
    )


def test_validate_refuses_a_folder_that_is_not_a_shard(capsys, tmp_path: Path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not frames")
    _fails_with_one_line(["validate", str(folder)], capsys)


def test_simulate_then_validate_with_json(capsys, tmp_path: Path):
    out = tmp_path / "shards"
    capsys.readouterr()
    argv = [
        "simulate",
        "--out",
        str(out),
        "--periods",
        "2",
        "--frames-per-period",
        "40",
        "--size",
        "32",
        "--json",
    ]
    assert main(argv) == EXIT_OK
    manifests = json.loads(capsys.readouterr().out)
    assert [m["period"] for m in manifests] == ["p01", "p02"]
    assert all(m["num_rows"] == 40 for m in manifests)
    assert main(["validate", str(out / "p01"), "--check", "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["clean"] is True
    assert report["rows"] == 40
    assert main(["validate", str(out / "p02"), "--check"]) == EXIT_OK
    assert "clean" in capsys.readouterr().out


def test_config_json_and_schema(capsys):
    capsys.readouterr()
    assert main(["config", "--json", "--set", "train.steps=7"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["train"]["steps"] == 7
    assert main(["config", "--schema"]) == EXIT_OK
    schema = json.loads(capsys.readouterr().out)
    assert "train" in schema["properties"]


# -- start-up cost: what a verb imports (issue 11) -----------------------------------------

HEAVY = ("torch", "timm", "torchvision", "prefect", "mlflow", "ale_py", "lancedb")
PROBE = """
import json, os, sys
from pipelines.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = set(os.environ["HEAVY"].split(","))
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & heavy)))
"""


def _heavy_imports(tmp_path: Path, *argv: str) -> list[str]:
    """The heavy modules ``cssl ARGV`` imported, run in a fresh interpreter."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "CSSL_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    env |= {"HEAVY": ",".join(HEAVY)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["config"], ["bench", "--help"], ["validate", "no-such-shard"]],
    ids=" ".join,
)
def test_help_config_and_validate_import_no_heavy_module(argv: list[str], tmp_path: Path):
    assert _heavy_imports(tmp_path, *argv) == []


def test_registry_verbs_import_no_torch(tmp_path: Path):
    """``report`` needs the registry (mlflow), not the model."""
    assert set(_heavy_imports(tmp_path, "report")) == {"mlflow"}


# -- the first minutes after the demo (issue 11) -------------------------------------------


def test_shard_dir_accepts_what_ingest_out_was_given(tmp_path: Path, capsys):
    from cssl_core.config import SimulateConfig
    from cssl_core.data.simulate import simulate_period
    from pipelines.cli import CliError, shard_dir

    cfg = SimulateConfig(frames_per_period=8, size=32)
    simulate_period(tmp_path / "one", "p01", 0, 2, cfg)
    assert shard_dir(tmp_path / "one") == tmp_path / "one" / "p01"
    assert shard_dir(tmp_path / "one" / "p01") == tmp_path / "one" / "p01"
    simulate_period(tmp_path / "one", "p02", 1, 2, cfg)
    with pytest.raises(CliError, match="holds the shards of periods p01, p02: give one of them"):
        shard_dir(tmp_path / "one")
    assert shard_dir(tmp_path / "one", period="p02") == tmp_path / "one" / "p02"
    assert main(["validate", str(tmp_path / "one"), "--check"]) == EXIT_FAILED
    assert "p01, p02" in capsys.readouterr().err


def test_a_newcomers_path_demo_then_the_commands_it_prints(
    prefect_harness, tiny_params_file: Path, tmp_path: Path, monkeypatch, capsys
):
    """``cssl demo`` (tiny, two periods) from a fresh directory, then every command of its
    "Explore:" lines exactly as printed (report, embed, rollback; the MLflow UI's store), then
    promote: they all find the demo's state with no extra settings."""
    import shlex

    import pyarrow.parquet as pq
    from conftest import TINY_PARAMS, tiny_override_list

    from cssl_core.data.shard import Shard
    from pipelines.mlflow_registry import MlflowRegistry

    monkeypatch.chdir(tmp_path)
    for name in ("CSSL_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    two = {**TINY_PARAMS, "periods": {"p01": {"previous": ""}, "p02": {"previous": "p01"}}}
    sets = [x for item in tiny_override_list(two) for x in ("--set", item)]
    capsys.readouterr()
    assert main(["demo", "--params", str(tiny_params_file), *sets]) == EXIT_OK
    printed = capsys.readouterr().out.splitlines()
    at = printed.index("Explore:")
    commands = [shlex.split(line.split("  #")[0]) for line in printed[at + 1 : at + 5]]
    assert [c[0].rsplit("/", 1)[-1] for c in commands] == ["cssl", "cssl", "cssl", "mlflow"]
    assert all("=" not in c[0] for c in commands)  # no settings needed before the command

    report, embed, rollback, ui = (c[1:] for c in commands)
    assert main([*report, "--json"]) == EXIT_OK
    payload = json.loads(capsys.readouterr().out)
    assert [v["period"] for v in payload["versions"]] == ["p01", "p02"]
    assert payload["champion"] == 2
    assert main(embed) == EXIT_OK
    shard = Shard.open(tmp_path / embed[1])
    assert pq.read_table(tmp_path / "embeddings.parquet").num_rows == shard.num_rows
    capsys.readouterr()
    assert main(rollback) == EXIT_OK
    assert capsys.readouterr().out.strip() == "@champion rolled back: version 2 -> 1"
    assert main(["promote", "2"]) == EXIT_OK
    store = ui[ui.index("--backend-store-uri") + 1]
    assert MlflowRegistry(store).champion().version == 2

    # The demo ends with an index of its frames and a search; the next commands it prints.
    assert "embedding index (LanceDB) and a search" in "\n".join(printed[:at])
    search, status = (shlex.split(line.split("  #")[0])[1:] for line in printed[at + 5 : at + 7])
    assert search[:2] == ["search", "--frame-id"]
    capsys.readouterr()
    assert main([*search, "--json"]) == EXIT_OK
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 5 and all(h["model_version"] == 2 for h in hits)
    assert main([*status, "--json"]) == EXIT_OK
    indexed = json.loads(capsys.readouterr().out)
    assert indexed["status"]["rows_per_version"] == {"2": 160}
    assert indexed["champion"]["via"] == "same"


def test_the_temporary_prefect_server_gets_time_a_retry_and_a_one_line_failure(
    monkeypatch, capsys, tiny_params_file: Path, sim_shards: Path
):
    """A server that never answers (as on a busy machine): two tries with the generous
    timeout, then one line saying what happened and what to set; no flow runs."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.prefect_server import PrefectServerUnavailable, start_local_server

    tries: list[int | None] = []

    def never_answers(self, timeout=None):  # noqa: ANN001, ANN202
        tries.append(timeout)
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    monkeypatch.setattr(SubprocessASGIServer, "start", never_answers)
    monkeypatch.setattr(SubprocessASGIServer, "stop", lambda self: None)
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(PrefectServerUnavailable, match=r"within 90 s \(2 tries"):
            start_local_server()
        assert tries == [90, 90]
        capsys.readouterr()
        argv = ["refresh", "--period", "p01", "--shard", str(sim_shards / "p01")]
        assert main([*argv, "--params", str(tiny_params_file)]) == EXIT_FAILED
    assert len(tries) == 4
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[:2] == [
        "starting the local Prefect server (waiting up to 90 s)",
        "starting the local Prefect server (no answer; once more, waiting up to 90 s)",
    ]
    assert len(lines) == 3 and lines[2].startswith("error: the temporary Prefect server did not")
    for needle in ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=", "PREFECT_API_URL="):
        assert needle in lines[2]
