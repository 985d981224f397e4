"""``cssl lineage export --write``: the periods that ran appended to a params file's
``periods:`` block, whatever block style the file uses (pure file edits, no registry)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cssl_core.config import ConfigError, load_params, params_from_dict
from pipelines.lineage import RanPeriod, append_periods, periods_to_export

RAN = [
    RanPeriod("p01", "", "simulate", 1, "passed"),
    RanPeriod("2026-11", "p01", "/data/raw/2026-11", 2, "passed"),
    RanPeriod("2026-12", "2026-11", "simulate", 3, "passed"),
]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "periods_block",
    [
        'periods:\n  p01: {previous: ""}\n',  # one line per entry (the project's params.yaml)
        "periods:\n  p01:\n    previous: ''\n",  # nested block style (yaml.safe_dump)
        "periods:   # the stream\n    p01:\n        previous: ''\n\n    # end\n",
    ],
)
def test_append_adds_the_new_periods_after_the_declared_ones(tmp_path: Path, periods_block: str):
    path = _write(tmp_path, periods_block + "train:\n  steps: 3  # tiny\n")
    new = periods_to_export(load_params(path), RAN)
    assert [p.name for p in new] == ["2026-11", "2026-12"]
    append_periods(path, new)
    params = load_params(path)
    assert params.period_names == ["p01", "2026-11", "2026-12"]
    assert params.periods["2026-12"].previous == "2026-11"
    assert params.period_source("2026-11") == "/data/raw/2026-11"
    assert params.train.steps == 3 and "# tiny" in path.read_text()
    assert periods_to_export(params, RAN) == []


def test_a_dumped_params_file_keeps_every_other_section(tmp_path: Path):
    tree = params_from_dict({"periods": {"p01": {"previous": ""}}}).model_dump(mode="json")
    path = _write(tmp_path, yaml.safe_dump(tree, sort_keys=False))
    before = load_params(path)
    append_periods(path, periods_to_export(before, RAN))
    after = load_params(path)
    assert after.period_names == ["p01", "2026-11", "2026-12"]
    assert after.model_dump(exclude={"periods"}) == before.model_dump(exclude={"periods"})


def test_a_chain_that_does_not_continue_the_declared_one_is_refused(tmp_path: Path):
    path = _write(tmp_path, 'periods:\n  p01: {previous: ""}\n  p02: {previous: p01}\n')
    with pytest.raises(ConfigError, match="'2026-11' ran after 'p01'.*appended after 'p02'"):
        periods_to_export(load_params(path), RAN)


def test_a_flow_style_periods_section_is_a_clear_error(tmp_path: Path):
    path = _write(tmp_path, 'periods: {p01: {previous: ""}}\n')
    new = periods_to_export(load_params(path), RAN)
    with pytest.raises(ConfigError, match="no block-style `periods:` section"):
        append_periods(path, new)
    assert path.read_text() == 'periods: {p01: {previous: ""}}\n'
