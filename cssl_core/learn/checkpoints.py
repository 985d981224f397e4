"""Training checkpoints: resumable state of one period's run, in a weights-only format.

A checkpoint is one ``step-XXXXXX.safetensors`` file holding the model's and the optimiser's
tensors, with the step, the run key and the optimiser's non-tensor state in its header (no
pickle). Files are written atomically; each run keeps its two newest, and a file whose run key
differs from the caller's (another run's inputs) is never resumed from or deleted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cssl_core.data.storage import atomic_path
from cssl_core.learn.models import Embedder


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            name = f"optim.{pid}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path, step: int, model: Embedder, optimizer: torch.optim.Optimizer, run_key: str
) -> Path:
    """Write ``step-XXXXXX.safetensors`` atomically (weights-only format, no pickle)."""
    directory.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update(opt_tensors)
    meta = {"step": str(step), "run_key": run_key, "optimizer": json.dumps(opt_meta)}
    path = directory / f"step-{step:06d}.safetensors"
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    # Keep this run's two newest; another run's files (a different run_key) are left alone,
    # so they can never push this run's fresh checkpoint out.
    for old in _run_checkpoints(directory, run_key)[:-2]:
        old.unlink(missing_ok=True)
    return path


def _run_key_of(path: Path) -> str | None:
    """The ``run_key`` in a checkpoint's header; None for a torn or foreign file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return (fh.metadata() or {}).get("run_key")
    except Exception:  # noqa: BLE001 - a torn or foreign file is skipped, not fatal
        return None


def _run_checkpoints(directory: Path, run_key: str) -> list[Path]:
    """This run's readable checkpoints, oldest first."""
    paths = sorted(directory.glob("step-*.safetensors"))
    return [p for p in paths if _run_key_of(p) == run_key]


def latest_checkpoint(directory: Path | None, run_key: str) -> Path | None:
    """The newest readable checkpoint of this run (a different run's are ignored)."""
    if directory is None or not directory.is_dir():
        return None
    for path in sorted(directory.glob("step-*.safetensors"), reverse=True):
        if _run_key_of(path) == run_key:
            return path
    return None


def load_checkpoint(path: Path, model: Embedder, optimizer: torch.optim.Optimizer) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    tensors = load_file(str(path))
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_state, strict=True)
    opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, json.loads(meta["optimizer"])))
    return int(meta["step"])
