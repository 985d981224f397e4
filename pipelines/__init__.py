"""Orchestration: Prefect flows, MLflow registry, promotion gate and the cssl CLI."""
