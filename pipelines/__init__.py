"""Orchestration: Prefect flows, MLflow registry, promotion gate and the cssl CLI."""

import os

# Set before prefect or mlflow is imported anywhere in this package; a user's own setting wins.
# The local temporary Prefect server must not try to phone home (it logs an error offline).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect waits 20 s by default for its temporary local server, too little on a busy 2-core
# machine (pipelines/prefect_server.py also retries once).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# Quiet, non-interactive MLflow downloads.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
