"""Where the pipeline keeps its state when nothing is configured (embedded defaults).

``CSSL_HOME`` (default ``.cssl``) holds the SQLite MLflow store, MLflow artifacts, local
checkpoints and locks. ``MLFLOW_TRACKING_URI`` and the store root in params.yaml (``store.root``,
a directory or ``s3://bucket/prefix``) point the pipeline at shared infrastructure instead.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_NAME = "stream-embedding"
EXPERIMENT = "cssl-refresh"


def state_dir() -> Path:
    path = Path(os.environ.get("CSSL_HOME", ".cssl")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else SQLite in the state folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow.db'}"
