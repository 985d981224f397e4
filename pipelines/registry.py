"""The MLflow model registry for ``stream-embedding``: versions, lineage tags and aliases.

One registered version per refreshed period. A version counts as finished only once its
``cssl.status`` tag says ``complete`` (set last), so a run that died half way through
registration is never mistaken for a finished one. Aliases ``@champion`` (serving) and
``@challenger`` (last candidate) replace the deprecated stages; the registered model keeps a
``cssl.champion_history`` tag so ``rollback`` knows where to go back to.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import yaml
from filelock import FileLock
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.settings import EXPERIMENT, MODEL_NAME, state_dir, tracking_uri

STATUS = "cssl.status"
HISTORY = "cssl.champion_history"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CORE_CODE = Path(__file__).resolve().parents[1] / "cssl_core"
SERVING_REQUIREMENTS = (
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "numpy",
    "pillow",
    "pyarrow",
    "pydantic",
    "pyyaml",
)


class RegistryError(RuntimeError):
    """A registry operation that the user asked for cannot be done (one-line message)."""


@dataclass(frozen=True)
class VersionInfo:
    version: int
    period: str
    run_id: str
    tags: dict[str, str]
    aliases: tuple[str, ...]

    @classmethod
    def of(cls, mv: ModelVersion) -> VersionInfo:
        return cls(
            int(mv.version),
            mv.tags.get("period", ""),
            mv.run_id or "",
            dict(mv.tags),
            tuple(getattr(mv, "aliases", []) or []),
        )


def _logged_model_id(model_uri: str) -> str | None:
    """The logged-model id of an MLflow 3 ``models:/<model_id>`` URI (None for other URIs).

    A tracking server refuses a version whose source is ``models:/<model_id>`` unless the
    request also names that model id (the local SQLite store does not check).
    """
    ref = model_uri.removeprefix("models:/")
    if ref == model_uri or not ref or "/" in ref or "@" in ref:
        return None
    return ref


@contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """Serialise opening a SQLite tracking store across processes.

    MLflow creates its tables when a client first opens the database; two refreshes starting
    together on a fresh store would both try, and the loser would fail with "table ...
    already exists" instead of meeting the period lock.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock", timeout=600):
        yield


def _pinned_requirements() -> list[str]:
    pins = []
    for name in SERVING_REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


class Registry:
    """Thin, typed access to the MLflow tracking server and registry."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri or tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        with _sqlite_init_lock(self.uri):
            self.client = MlflowClient(self.uri)

    # -- experiment and runs -------------------------------------------------------------
    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:"):
            location = (state_dir() / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(EXPERIMENT, artifact_location=location)
        except MlflowException:  # created concurrently
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            assert exp is not None
            return exp.experiment_id

    def log_model(self, run_id: str, model_dir: Path) -> str:
        """Log the embedder (safetensors + config) with a models-from-code pyfunc flavour."""
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts={"embedder": str(model_dir)},
                code_paths=[str(CORE_CODE)],
                pip_requirements=_pinned_requirements(),
            )
        # Leaving the block ended the run as FINISHED, but the refresh is not done: the
        # caller sets the final status, so a refresh that dies from here on never leaves a
        # run that looks finished.
        self.client.update_run(run_id, status="RUNNING")
        return info.model_uri

    # -- versions ------------------------------------------------------------------------
    def ensure_registered_model(self) -> None:
        try:
            self.client.get_registered_model(MODEL_NAME)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    MODEL_NAME, description="Stream-frame embedding, refreshed every period"
                )
            except MlflowException:
                pass  # created concurrently

    def register(self, model_uri: str, run_id: str, tags: dict[str, str]) -> VersionInfo:
        """Create a version, tag its lineage, then mark it complete (last) and @challenger."""
        self.ensure_registered_model()
        mv = self.client.create_model_version(
            MODEL_NAME,
            model_uri,
            run_id=run_id,
            tags={**tags, STATUS: "registering"},
            model_id=_logged_model_id(model_uri),
        )
        self.client.set_model_version_tag(MODEL_NAME, mv.version, STATUS, "complete")
        self.client.set_registered_model_alias(MODEL_NAME, "challenger", mv.version)
        return VersionInfo.of(self.client.get_model_version(MODEL_NAME, mv.version))

    def versions(self) -> list[VersionInfo]:
        """All finished versions, oldest first."""
        try:
            found = self.client.search_model_versions(f"name='{MODEL_NAME}'")
        except MlflowException:
            return []
        infos = [
            VersionInfo.of(self.client.get_model_version(MODEL_NAME, mv.version)) for mv in found
        ]
        return sorted(
            (v for v in infos if v.tags.get(STATUS) == "complete"), key=lambda v: v.version
        )

    def get(self, version: int) -> VersionInfo:
        try:
            mv = self.client.get_model_version(MODEL_NAME, str(version))
        except MlflowException:
            raise RegistryError(f"{MODEL_NAME} has no version {version}") from None
        info = VersionInfo.of(mv)
        if info.tags.get(STATUS) != "complete":
            raise RegistryError(f"{MODEL_NAME} version {version} is not a finished version")
        return info

    def find_completed(
        self, period: str, shard_fingerprint: str, config_hash: str
    ) -> VersionInfo | None:
        """The finished version already made from exactly these inputs, if any."""
        for v in self.versions():
            t = v.tags
            if (t.get("period"), t.get("shard_fingerprint"), t.get("config_hash")) == (
                period,
                shard_fingerprint,
                config_hash,
            ):
                return v
        return None

    # -- aliases -------------------------------------------------------------------------
    def alias(self, name: str) -> VersionInfo | None:
        try:
            return VersionInfo.of(self.client.get_model_version_by_alias(MODEL_NAME, name))
        except MlflowException:
            return None

    def champion(self) -> VersionInfo | None:
        return self.alias("champion")

    def _history(self) -> list[int]:
        try:
            tags = self.client.get_registered_model(MODEL_NAME).tags
        except MlflowException:
            return []
        return [int(v) for v in json.loads(tags.get(HISTORY, "[]"))]

    def promote(self, version: int) -> None:
        """Point @champion at ``version`` and remember it for rollback."""
        self.get(version)
        history = [v for v in self._history() if v != version] + [version]
        self.client.set_registered_model_alias(MODEL_NAME, "champion", str(version))
        self.client.set_registered_model_tag(MODEL_NAME, HISTORY, json.dumps(history))

    def rollback(self) -> tuple[int, int]:
        """Move @champion back to the previous champion; returns (from, to)."""
        history = self._history()
        current = self.champion()
        if current is None or len(history) < 2:
            raise RegistryError("nothing to roll back to: fewer than two champions so far")
        previous = history[-2]
        self.client.set_registered_model_alias(MODEL_NAME, "champion", str(previous))
        self.client.set_registered_model_tag(MODEL_NAME, HISTORY, json.dumps(history[:-1]))
        return current.version, previous

    # -- artifacts -----------------------------------------------------------------------
    def download_embedder(self, version: int, dest: Path | None = None) -> Path:
        """Download a version and return its safetensors + config directory (no pickle)."""
        dest = dest or Path(tempfile.mkdtemp(prefix=f"cssl-v{version}-"))
        root = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{MODEL_NAME}/{version}", dst_path=str(dest)
            )
        )
        mlmodel = yaml.safe_load((root / "MLmodel").read_text(encoding="utf-8"))
        rel = mlmodel["flavors"]["python_function"]["artifacts"]["embedder"]["path"]
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:
            raise RegistryError(f"version {version}: embedder path {rel!r} leaves the model")
        return path

    def run_data(self, run_id: str) -> dict[str, Any]:
        run = self.client.get_run(run_id)
        return {
            "metrics": dict(run.data.metrics),
            "params": dict(run.data.params),
            "tags": dict(run.data.tags),
        }
