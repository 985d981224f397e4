"""The :class:`~pipelines.registry.ModelRegistry` on MLflow: tracking runs and the model registry.

One registered version per refreshed period. A version counts as finished only once its
``cssl.status`` tag says ``complete`` (set last), so a run that died half way through
registration is never mistaken for a finished one. Aliases ``@champion`` (serving) and
``@challenger`` (last candidate) replace the deprecated stages; the registered model keeps a
``cssl.champion_history`` tag so ``rollback`` knows where to go back to.

Each version is logged with the "models from code" pyfunc flavour (:mod:`pipelines.pyfunc_model`:
nothing is unpickled on load) and a signature: an ``image`` column of encoded frames in, a
float32 ``(N, D)`` embedding tensor out.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from filelock import FileLock
from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from pipelines.registry import (
    CHALLENGER,
    CHAMPION,
    EmbeddingPredictor,
    MetricPoint,
    ModelRegistry,
    RegistryError,
    Rollback,
    RunRecord,
    RunStatus,
    VersionInfo,
    VersionTags,
)
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
BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call


def _version_info(mv: ModelVersion) -> VersionInfo:
    tags = dict(mv.tags or {})
    created = getattr(mv, "creation_timestamp", None)
    return VersionInfo(
        version=int(mv.version),
        run_id=mv.run_id or "",
        lineage=VersionTags.from_tags(tags),
        aliases=tuple(getattr(mv, "aliases", []) or []),
        tags=tags,
        created=created / 1000.0 if created else None,
    )


def _run_record(run: Any) -> RunRecord:
    start = run.info.start_time
    return RunRecord(
        run_id=str(run.info.run_id),
        status=str(run.info.status),
        metrics=dict(run.data.metrics),
        params=dict(run.data.params),
        tags=dict(run.data.tags),
        name=str(run.info.run_name or ""),
        start_time=start / 1000.0 if start else None,
    )


def _quoted(value: str) -> str:
    """A tag value inside MLflow's single-quoted filter string."""
    if "'" in value:
        raise RegistryError(f"a tag value to search for cannot contain a quote: {value!r}")
    return value


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


def serving_signature(embedding_dim: int) -> ModelSignature:
    """Frames in (an ``image`` column of encoded bytes), float32 ``(N, embedding_dim)`` out.

    The parameter ``space`` (default ``own``) selects the embedding: ``own`` is the version's
    own, ``parent`` its queries mapped through its adapter into the space of the parent it
    was trained from (``compat.mode: adapter``; an error for a version without an adapter),
    to search an index the parent embedded (:mod:`pipelines.pyfunc_model`)."""
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embedding_dim))]),
        params=ParamSchema([ParamSpec("space", "string", "own")]),
    )


class _PyfuncPredictor(EmbeddingPredictor):
    def __init__(self, model: Any) -> None:
        self._model = model

    def predict(self, images: Sequence[bytes]) -> np.ndarray:
        import pandas as pd

        out = self._model.predict(pd.DataFrame({"image": list(images)}))
        return np.asarray(out, dtype=np.float32)


class MlflowRegistry(ModelRegistry):
    """The MLflow tracking server (or SQLite store) and its model registry."""

    def __init__(self, uri: str | None = None) -> None:
        self._uri = uri or tracking_uri()
        mlflow.set_tracking_uri(self._uri)
        with _sqlite_init_lock(self._uri):
            self.client = MlflowClient(self._uri)

    @property
    def uri(self) -> str:
        return self._uri

    # -- runs ----------------------------------------------------------------------------
    def experiment_id(self, name: str = EXPERIMENT) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        location = None
        if self._uri.startswith("sqlite:"):
            location = (state_dir() / "mlartifacts").as_uri()
        try:
            return str(self.client.create_experiment(name, artifact_location=location))
        except MlflowException:  # created concurrently
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def start_run(self, name: str, experiment: str | None = None) -> str:
        experiment_id = self.experiment_id(experiment or EXPERIMENT)
        return str(self.client.create_run(experiment_id, run_name=name).info.run_id)

    def end_run(self, run_id: str, status: RunStatus) -> None:
        self.client.set_terminated(run_id, status)

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        self.client.log_batch(run_id, params=[Param(k, v[:500]) for k, v in params.items()])

    def log_metrics(self, run_id: str, metrics: Sequence[MetricPoint]) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [Metric(m.key, float(m.value), now, m.step) for m in metrics]
        for i in range(0, len(batch), BATCH):
            self.client.log_batch(run_id, metrics=batch[i : i + BATCH])

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path=artifact_path)

    def set_run_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def run(self, run_id: str) -> RunRecord:
        return _run_record(self.client.get_run(run_id))

    def search_runs(
        self, experiment: str | None = None, tags: Mapping[str, str] | None = None, limit: int = 1
    ) -> list[RunRecord]:
        exp = self.client.get_experiment_by_name(experiment or EXPERIMENT)
        if exp is None:
            return []
        where = " and ".join(f"tags.`{k}` = '{_quoted(v)}'" for k, v in (tags or {}).items())
        found = self.client.search_runs(
            [str(exp.experiment_id)],
            filter_string=where,
            max_results=limit,
            order_by=["attributes.start_time DESC"],
        )
        return [_run_record(r) for r in found]

    # -- versions ------------------------------------------------------------------------
    def log_model(self, run_id: str, model_dir: Path, embedding_dim: int) -> str:
        """Log the embedder (safetensors + config) with a models-from-code pyfunc flavour."""
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # The signature says what the model takes and returns. MLflow also asks for an
            # input example, which it would serve through the model to check it (a second
            # model load per registration) and show as base64 JPEG bytes: not worth it.
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts={"embedder": str(model_dir)},
                code_paths=[str(CORE_CODE)],
                pip_requirements=_pinned_requirements(),
                signature=serving_signature(embedding_dim),
            )
        # Leaving the block ended the run as FINISHED, but the refresh is not done: the
        # caller sets the final status, so a refresh that dies from here on never leaves a
        # run that looks finished.
        self.client.update_run(run_id, status="RUNNING")
        return str(info.model_uri)

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

    def register(
        self, run_id: str, model_dir: Path, lineage: VersionTags, embedding_dim: int
    ) -> VersionInfo:
        model_uri = self.log_model(run_id, model_dir, embedding_dim)
        return self.register_uri(model_uri, run_id, lineage.as_tags())

    def register_uri(self, model_uri: str, run_id: str, tags: Mapping[str, str]) -> VersionInfo:
        """Create a version of a logged model, tag it, then mark it complete (last) and
        @challenger."""
        self.ensure_registered_model()
        mv = self.client.create_model_version(
            MODEL_NAME,
            model_uri,
            run_id=run_id,
            tags={**tags, STATUS: "registering"},
            model_id=_logged_model_id(model_uri),
        )
        self.client.set_model_version_tag(MODEL_NAME, mv.version, STATUS, "complete")
        self.client.set_registered_model_alias(MODEL_NAME, CHALLENGER, mv.version)
        return _version_info(self.client.get_model_version(MODEL_NAME, mv.version))

    def versions(self) -> list[VersionInfo]:
        try:
            found = self.client.search_model_versions(f"name='{MODEL_NAME}'")
        except MlflowException:
            return []
        infos = [
            _version_info(self.client.get_model_version(MODEL_NAME, mv.version)) for mv in found
        ]
        return sorted(
            (v for v in infos if v.tags.get(STATUS) == "complete"), key=lambda v: v.version
        )

    def get(self, version: int) -> VersionInfo:
        try:
            mv = self.client.get_model_version(MODEL_NAME, str(version))
        except MlflowException:
            raise RegistryError(f"{MODEL_NAME} has no version {version}") from None
        info = _version_info(mv)
        if info.tags.get(STATUS) != "complete":
            raise RegistryError(f"{MODEL_NAME} version {version} is not a finished version")
        return info

    # -- aliases -------------------------------------------------------------------------
    def alias(self, name: str) -> VersionInfo | None:
        try:
            return _version_info(self.client.get_model_version_by_alias(MODEL_NAME, name))
        except MlflowException:
            return None

    def _history(self) -> list[int]:
        try:
            tags = self.client.get_registered_model(MODEL_NAME).tags
        except MlflowException:
            return []
        return [int(v) for v in json.loads(tags.get(HISTORY, "[]"))]

    def promote(self, version: int) -> None:
        self.get(version)
        history = [v for v in self._history() if v != version] + [version]
        self.client.set_registered_model_alias(MODEL_NAME, CHAMPION, str(version))
        self.client.set_registered_model_tag(MODEL_NAME, HISTORY, json.dumps(history))

    def rollback(self) -> Rollback:
        history = self._history()
        current = self.champion()
        if current is None or len(history) < 2:
            raise RegistryError("nothing to roll back to: fewer than two champions so far")
        previous = history[-2]
        self.client.set_registered_model_alias(MODEL_NAME, CHAMPION, str(previous))
        self.client.set_registered_model_tag(MODEL_NAME, HISTORY, json.dumps(history[:-1]))
        return Rollback(current.version, previous)

    # -- model files ---------------------------------------------------------------------
    def download_embedder(self, version: int, dest: Path | None = None) -> Path:
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

    def model_uri(self, model_ref: str) -> str:
        """An MLflow model URI for ``champion``/``challenger``, a version number, or a URI."""
        if "://" in model_ref or model_ref.startswith("models:/"):
            return model_ref
        if model_ref.isdigit():
            return f"models:/{MODEL_NAME}/{model_ref}"
        return f"models:/{MODEL_NAME}@{model_ref}"

    def resolve(self, model_ref: str) -> VersionInfo | None:
        ref = self.model_uri(model_ref).removeprefix("models:/")
        name, alias_sep, alias = ref.partition("@")
        if alias_sep:
            return self.alias(alias) if name == MODEL_NAME else None
        name, _, number = ref.rpartition("/")
        if name == MODEL_NAME and number.isdigit():
            return self.get(int(number))
        return None

    def load_predictor(self, model_ref: str) -> EmbeddingPredictor:
        import mlflow.pyfunc

        return _PyfuncPredictor(mlflow.pyfunc.load_model(self.model_uri(model_ref)))
