"""Shared fixtures: real CIFAR-10 JPEGs from ``../shared/data`` and a small ingest config."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cssl_core.config import IngestConfig

CIFAR_PARQUET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.parquet"


@pytest.fixture(scope="session")
def cifar_jpegs() -> list[bytes]:
    """The first 64 CIFAR-10 rows as JPEG bytes (real natural images, 32x32, distinct)."""
    reader = pq.ParquetFile(CIFAR_PARQUET)
    batch = next(reader.iter_batches(64, columns=["image"]))
    images = batch.column("image").to_pylist()
    assert len(set(images)) == len(images), "fixture expects distinct images"
    return images


@pytest.fixture
def ingest_cfg() -> IngestConfig:
    """Defaults with small row groups, so a few dozen frames already span several groups."""
    return IngestConfig(rows_per_group=16, rows_per_part=64)
