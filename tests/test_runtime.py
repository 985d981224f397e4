"""cssl_core.runtime: settings held for a block and restored afterwards."""

from __future__ import annotations

import os

import pytest
import torch

from cssl_core.runtime import environ_restored, environment, torch_threads

KEY, OTHER = "CSSL_TEST_RUNTIME_A", "CSSL_TEST_RUNTIME_B"


def test_environment_sets_unsets_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY, "before")
    monkeypatch.delenv(OTHER, raising=False)
    with environment(**{KEY: None, OTHER: "set"}):
        assert KEY not in os.environ and os.environ[OTHER] == "set"
        os.environ[KEY] = "changed inside"
    assert os.environ[KEY] == "before" and OTHER not in os.environ


def test_environ_restored_undoes_what_the_block_wrote(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY, "2")
    monkeypatch.delenv(OTHER, raising=False)
    with pytest.raises(RuntimeError), environ_restored([KEY, OTHER]):
        os.environ[KEY], os.environ[OTHER] = "1", "1"  # as a local Dask cluster does
        raise RuntimeError
    assert os.environ[KEY] == "2" and OTHER not in os.environ


def test_torch_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
