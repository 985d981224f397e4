"""cssl_core: the engine of cssl, usable in a notebook with no server running.

Public names are re-exported here so a reader learns the API from one file. This package
never imports prefect, mlflow or ``pipelines`` (a test enforces it). Importing it is cheap:
torch-based modules (models, augment, losses, train, evaluate) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from cssl_core.config import ConfigError, Params, load_params
from cssl_core.data.images import DecodeLimits, ImageRejected, decode_image, encode_jpeg, frame_id
from cssl_core.data.shard import FRAME_SCHEMA, Frame, Shard, ShardError, ShardWriter, list_shards
from cssl_core.data.storage import (
    KeyNotFound,
    LocalStore,
    ObjectStore,
    S3Store,
    StoreError,
    open_store,
)
from cssl_core.evaluation.metrics import AccuracyMatrix, MissingAccuracy
from cssl_core.memory.replay import (
    ReplayBatcher,
    ReplayError,
    ReplayMemory,
    latest_period,
    list_versions,
)

_LAZY = {
    "Embedder": "cssl_core.learn.models",
    "EmbedderOutput": "cssl_core.learn.models",
    "ModelLoadError": "cssl_core.learn.models",
    "SimCLRAugment": "cssl_core.learn.augment",
    "ContinualTrainer": "cssl_core.learn.trainer",
    "FrameSource": "cssl_core.learn.trainer",
    "TrainingDiverged": "cssl_core.learn.trainer",
    "TrainingInterrupted": "cssl_core.learn.trainer",
    "StrategySpec": "cssl_core.learn.strategy",
    "strategy_spec": "cssl_core.learn.strategy",
    "DistillTerm": "cssl_core.learn.distill",
    "distill_term": "cssl_core.learn.distill",
    "PeriodInputs": "cssl_core.learn.job",
    "PeriodResult": "cssl_core.period",
    "run_period": "cssl_core.period",
    "run_stream": "cssl_core.period",
    "EvalSet": "cssl_core.evaluation.evaluate",
    "PeriodScores": "cssl_core.evaluation.outcomes",
    "FrameOutcomes": "cssl_core.evaluation.outcomes",
    "Interval": "cssl_core.evaluation.intervals",
    "accuracy_interval": "cssl_core.evaluation.intervals",
    "paired_difference_interval": "cssl_core.evaluation.intervals",
    "majority_scores": "cssl_core.evaluation.evaluate",
    "evaluate_periods": "cssl_core.evaluation.evaluate",
    "eval_set_from_shard": "cssl_core.evaluation.evaluate",
    "extract_features": "cssl_core.evaluation.evaluate",
    "knn_accuracy": "cssl_core.evaluation.evaluate",
    "linear_probe_accuracy": "cssl_core.evaluation.evaluate",
    "compatibility_top1": "cssl_core.evaluation.evaluate",
    "nt_xent": "cssl_core.learn.losses",
    "nt_xent_distill": "cssl_core.learn.losses",
    "predictor_distill": "cssl_core.learn.losses",
    "feature_distill": "cssl_core.learn.losses",
    "classifier_distill": "cssl_core.learn.losses",
    "ingest": "cssl_core.data.ingest",
    "IngestReport": "cssl_core.data.ingest",
    "validate_shard": "cssl_core.data.validate",
    "ValidationReport": "cssl_core.data.validate",
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
