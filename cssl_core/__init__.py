"""cssl_core: the engine of cssl, usable in a notebook with no server running.

Public names are re-exported here so a reader learns the API from one file. This package
never imports prefect, mlflow or ``pipelines`` (a test enforces it). Importing it is cheap:
torch-based modules (models, augment, losses, train, evaluate) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from cssl_core.config import ConfigError, Params, load_params
from cssl_core.images import DecodeLimits, ImageRejected, decode_image, encode_jpeg, frame_id
from cssl_core.metrics import AccuracyMatrix, MissingAccuracy
from cssl_core.replay import ReplayBatcher, ReplayError, ReplayMemory, latest_period, list_versions
from cssl_core.shard import FRAME_SCHEMA, Frame, Shard, ShardError, ShardWriter, list_shards
from cssl_core.storage import (
    KeyNotFound,
    LocalStore,
    ObjectStore,
    S3Store,
    StoreError,
    open_store,
)

_LAZY = {
    "Embedder": "cssl_core.models",
    "EmbedderOutput": "cssl_core.models",
    "ModelLoadError": "cssl_core.models",
    "SimCLRAugment": "cssl_core.augment",
    "ContinualTrainer": "cssl_core.train",
    "FrameSource": "cssl_core.train",
    "TrainingDiverged": "cssl_core.train",
    "EvalSet": "cssl_core.evaluate",
    "PeriodScores": "cssl_core.evaluate",
    "evaluate_periods": "cssl_core.evaluate",
    "eval_set_from_shard": "cssl_core.evaluate",
    "extract_features": "cssl_core.evaluate",
    "knn_accuracy": "cssl_core.evaluate",
    "linear_probe_accuracy": "cssl_core.evaluate",
    "compatibility_top1": "cssl_core.evaluate",
    "nt_xent": "cssl_core.losses",
    "nt_xent_distill": "cssl_core.losses",
    "predictor_distill": "cssl_core.losses",
    "feature_distill": "cssl_core.losses",
    "classifier_distill": "cssl_core.losses",
    "ingest": "cssl_core.ingest",
    "IngestReport": "cssl_core.ingest",
    "validate_shard": "cssl_core.validate",
    "ValidationReport": "cssl_core.validate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cssl_core' has no attribute {name!r}")


__all__ = [
    "FRAME_SCHEMA",
    "AccuracyMatrix",
    "ConfigError",
    "DecodeLimits",
    "Frame",
    "ImageRejected",
    "KeyNotFound",
    "LocalStore",
    "MissingAccuracy",
    "ObjectStore",
    "Params",
    "ReplayBatcher",
    "ReplayError",
    "ReplayMemory",
    "S3Store",
    "Shard",
    "ShardError",
    "ShardWriter",
    "StoreError",
    "decode_image",
    "encode_jpeg",
    "frame_id",
    "latest_period",
    "list_shards",
    "list_versions",
    "load_params",
    "open_store",
    *_LAZY,
]

__version__ = "0.1.0"
