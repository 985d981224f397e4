"""``cssl embed``: embeddings of a shard's frames from a registered model, for downstream use.

The model is loaded the way serving loads it (:meth:`ModelRegistry.load_predictor`: MLflow's
pyfunc flavour), so the embeddings are exactly what downstream would get.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cssl_core.data.shard import Shard
from cssl_core.data.storage import atomic_path
from pipelines.registry import RegistryError, open_registry
from pipelines.settings import MODEL_NAME


def embed_shard(
    model_ref: str, shard_path: Path, out: Path, split: str | None = None, batch_size: int = 512
) -> dict[str, Any]:
    """Write one row per frame (ids, period, category, split, embedding, model version)."""
    registry = open_registry()
    if not registry.versions():
        raise RegistryError(
            f"no versions of {MODEL_NAME} yet in {registry.uri}: run `cssl refresh` or `cssl demo`"
        )
    info = registry.resolve(model_ref)
    if info is None:
        raise RegistryError(
            f"{model_ref} names no finished version of {MODEL_NAME} in {registry.uri} "
            "(give champion, challenger, a version number or models:/NAME@ALIAS)"
        )
    model = registry.load_predictor(model_ref)
    shard = Shard.open(shard_path)
    rows, dim = 0, 0
    with atomic_path(out) as tmp:
        writer = None
        for batch in shard.iter_batches(
            ["frame_id", "period", "category", "split", "image"], split=split, batch_size=batch_size
        ):
            emb = model.predict(batch.column("image").to_pylist())
            dim = emb.shape[1]
            table = pa.table(
                {
                    "frame_id": batch.column("frame_id"),
                    "period": batch.column("period"),
                    "category": batch.column("category"),
                    "split": batch.column("split"),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim),
                    "model_version": pa.array([info.version] * len(emb), pa.int32()),
                }
            )
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += len(emb)
        if writer is None:
            raise ValueError(f"{shard_path}: no frames to embed")
        writer.close()
    return {"rows": rows, "dim": dim, "model": model_ref, "version": info.version, "out": str(out)}
