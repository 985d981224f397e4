"""MLflow "models from code" definition of the embedding model's pyfunc flavour.

MLflow executes this file when the model is loaded with ``mlflow.pyfunc.load_model``; nothing
is unpickled. The weights come from the ``embedder`` artifact (safetensors + config.json) and
are loaded weights-only by :meth:`cssl_core.learn.models.Embedder.load`.

``predict`` takes a DataFrame with an ``image`` column of encoded frames (JPEG/PNG bytes) and
returns one L2-normalised backbone embedding per row (a float32 array ``(N, D)``). With
``params={"space": "parent"}`` it returns the embeddings mapped through the version's adapter
into its parent's space (``compat.mode: adapter``; the adapter is saved in the ``embedder``
artifact with the weights), L2-normalised: queries that search an index the parent embedded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class StreamEmbeddingModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from cssl_core.learn.models import Embedder

        self.model = Embedder.load(context.artifacts["embedder"]).eval()

    # The version's signature (pipelines.mlflow_registry.serving_signature) says what goes in
    # and out; the DataFrame hint is one MLflow accepts without deriving a schema from it.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        import torch

        from cssl_core.evaluation.evaluate import extract_features

        space = (params or {}).get("space", "own")
        if space not in ("own", "parent"):
            raise ValueError(f"params.space must be 'own' or 'parent', got {space!r}")
        images = list(model_input["image"])
        feats = extract_features(self.model, images, self.model.cfg.input_size)
        if space == "parent":
            with torch.no_grad():
                feats = self.model.to_parent_space(feats)
        feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return feats.numpy().astype(np.float32)


set_model(StreamEmbeddingModel())
