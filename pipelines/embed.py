"""``cssl embed``: embeddings of a shard's frames from a registered model, for downstream use.

The model is loaded through its MLflow pyfunc flavour (the same path a serving endpoint
takes), so the embeddings are exactly what downstream would get.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cssl_core.data.shard import Shard
from cssl_core.data.storage import atomic_path
from pipelines.registry import Registry


def resolve_version(model_uri: str, registry: Registry) -> int | None:
    """The registry version a ``models:/name@alias`` or ``models:/name/N`` URI points to."""
    ref = model_uri.removeprefix("models:/")
    if "@" in ref:
        info = registry.alias(ref.split("@", 1)[1])
        return info.version if info else None
    if "/" in ref and ref.rsplit("/", 1)[1].isdigit():
        return int(ref.rsplit("/", 1)[1])
    return None


def embed_shard(
    model_uri: str, shard_path: Path, out: Path, split: str | None = None, batch_size: int = 512
) -> dict[str, Any]:
    import mlflow.pyfunc
    import pandas as pd

    registry = Registry()
    version = resolve_version(model_uri, registry)
    model = mlflow.pyfunc.load_model(model_uri)
    shard = Shard.open(shard_path)
    rows, dim = 0, 0
    with atomic_path(out) as tmp:
        writer = None
        for batch in shard.iter_batches(
            ["frame_id", "period", "category", "split", "image"], split=split, batch_size=batch_size
        ):
            emb = np.asarray(
                model.predict(pd.DataFrame({"image": batch.column("image").to_pylist()})),
                dtype=np.float32,
            )
            dim = emb.shape[1]
            table = pa.table(
                {
                    "frame_id": batch.column("frame_id"),
                    "period": batch.column("period"),
                    "category": batch.column("category"),
                    "split": batch.column("split"),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim),
                    "model_version": pa.array([version] * len(emb), pa.int32()),
                }
            )
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += len(emb)
        if writer is None:
            raise ValueError(f"{shard_path}: no frames to embed")
        writer.close()
    return {"rows": rows, "dim": dim, "model": model_uri, "version": version, "out": str(out)}
