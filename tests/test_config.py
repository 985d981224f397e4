"""params.yaml is one typed, validated config; invalid examples fail with a clear message."""

from pathlib import Path

import pytest

from cssl_core.config import ConfigError, Params, apply_overrides, json_schema, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_equal_embedded_defaults():
    # The committed params.yaml documents the defaults; they must not drift apart.
    assert load_params(ROOT / "params.yaml") == Params()


def test_overrides_are_typed_and_merged():
    params = load_params(ROOT / "params.yaml", ["train.steps=7", "replay.selection=diverse"])
    assert params.train.steps == 7
    assert params.replay.selection == "diverse"
    assert params.model == Params().model


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.stepz=3", "train.stepz"),
        ("train.steps=0", "train.steps"),
        ("train.strategy=magic", "train.strategy"),
        ("replay.capacity=-1", "replay.capacity"),
        ("gate.metric=f1", "gate.metric"),
    ],
)
def test_invalid_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_params(ROOT / "params.yaml", [override])


def test_period_chain_must_link(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("periods:\n  a: {previous: ''}\n  b: {previous: x}\n")
    with pytest.raises(ConfigError, match="previous='x', expected 'a'"):
        load_params(bad)


def test_period_source_override_and_template(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text(
        "periods:\n  a: {previous: ''}\n  b: {previous: a, source: /raw/special}\n"
        "ingest: {source: '/raw/{period}'}\n"
    )
    params = load_params(f)
    assert params.period_source("a") == "/raw/a"
    assert params.period_source("b") == "/raw/special"
    assert params.period_index("b") == 1
    with pytest.raises(ConfigError, match="unknown period 'c'"):
        params.period_index("c")


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    f = tmp_path / "params.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(f)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.steps"])


def test_config_hash_changes_with_any_value():
    assert Params().config_hash() == Params().config_hash()
    assert load_params(None, ["train.seed=1"]).config_hash() != Params().config_hash()


def test_schema_lists_sections():
    props = json_schema()["properties"]
    assert {"periods", "train", "replay", "gate", "store"} <= set(props)
