"""The embedding model: a timm backbone, a SimCLR projector, a CaSSLe predictor and an
optional continual classifier.

``Embedder.features(x)`` (the backbone's pooled feature) is THE production embedding that
downstream teams consume and that evaluation (kNN, linear probe) reads. The heads exist for
training only:

- ``projector`` (SimCLR, Chen et al. 2020): ``Linear-BN-ReLU-Linear`` from the backbone
  feature to ``projector_dim``; the NT-Xent loss is computed on its output ``z``.
- ``predictor`` (CaSSLe, Fini et al. CVPR 2022): ``Linear-BN-ReLU-Linear`` from ``z`` to
  ``projector_dim``; it maps the current projection into the frozen model's projection space
  for the distillation losses.
- ``feature_predictor`` (PFR, Gomez-Villa et al. CVPR-W 2022): ``Linear-BN-ReLU-Linear``
  from the backbone feature back to ``num_features`` (hidden width ``predictor_hidden``);
  it maps current features onto the frozen model's features for ``feature_distill``.
- ``classifier`` (Kaizen, Tang et al. WACV 2024), present when the model knows categories: a
  ``Linear`` over the backbone feature. The trainer feeds it stop-gradient features, so the
  labels never shape the embedding. ``expand_classes`` grows it as new categories appear.
- ``adapter`` (optional, ``compat.mode: adapter``): a ``Linear`` query-side map from this
  model's L2-normalised features into the features of the parent it was trained from
  (``adapter_parent``: the parent's :meth:`Embedder.state_fingerprint`), so a query embedded
  by this model can search an index the parent embedded (:meth:`Embedder.to_parent_space`).
  It is fitted after training (:mod:`cssl_core.learn.compat`) and never shapes the backbone.

Input is a float batch already normalised by :mod:`cssl_core.learn.augment` (``eval_transform`` or
``SimCLRAugment``); the model does not normalise. ``model.to(memory_format=torch.channels_last)``
works as for any module; saving and fingerprints do not depend on the memory format.

Persistence is weights-only: ``model.safetensors`` (never pickle) plus ``config.json``, and
loading is strict (any missing, unexpected or mis-shaped tensor is an error).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from timm.models import get_pretrained_cfg
from torch import Tensor, nn

from cssl_core.config import ModelConfig
from cssl_core.data.storage import atomic_path, atomic_write_json

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ModelLoadError(ValueError):
    """A saved model directory is missing, malformed, or does not match its config."""


@dataclass(frozen=True)
class EmbedderOutput:
    """What :meth:`Embedder.forward` returns.

    ``features``: ``(B, num_features)`` backbone embedding (the production embedding).
    ``projection``: ``(B, projector_dim)`` SimCLR projection ``z`` of those features.
    """

    features: Tensor
    projection: Tensor


Head = Literal["projection", "predictor", "feature_predictor", "features"]
"""A student head whose two-view outputs a loss reads (see :class:`StudentOutputs`)."""
TeacherOutput = Literal["projection", "features"]
"""What a loss takes from the frozen teacher (see :class:`TeacherOutputs`)."""


@dataclass(frozen=True)
class StudentOutputs:
    """One training forward of both views (:class:`cssl_core.learn.trainer.TwoViews`).

    ``z1, z2``: ``(B, projector_dim)`` SimCLR projections (always).
    ``p1, p2``: CaSSLe predictor of the projections, ``(B, projector_dim)``, when a loss
    needs the ``predictor`` head. ``q1, q2``: PFR predictor of the backbone features,
    ``(B, num_features)``, when a loss needs ``feature_predictor``. ``logits``: Kaizen
    classifier on stop-gradient view-1 features, ``(B, len(categories))``, with
    ``train.classifier``. ``f1, f2``: the backbone features, ``(B, num_features)``, when a
    loss reads them (``compat.mode: align``).
    """

    z1: Tensor
    z2: Tensor
    p1: Tensor | None = None
    p2: Tensor | None = None
    q1: Tensor | None = None
    q2: Tensor | None = None
    logits: Tensor | None = None
    f1: Tensor | None = None
    f2: Tensor | None = None

    def pair(self, head: Head) -> tuple[Tensor, Tensor]:
        """Both views' outputs of ``head``; an error if the forward did not compute it."""
        pairs = {
            "projection": (self.z1, self.z2),
            "predictor": (self.p1, self.p2),
            "feature_predictor": (self.q1, self.q2),
            "features": (self.f1, self.f2),
        }
        a, b = pairs[head]
        if a is None or b is None:
            raise RuntimeError(f"the training forward did not compute the {head} head")
        return a, b

    def map(self, fn: Callable[[Tensor], Tensor]) -> StudentOutputs:
        """Every tensor through ``fn`` (e.g. cast to fp32 and gather across ranks)."""
        return dataclasses.replace(
            self, **{k: fn(v) for k, v in vars(self).items() if v is not None}
        )


# A pytree node, so DistributedDataParallel sees each tensor of the forward's output (an
# unregistered dataclass would be one opaque leaf to its output handling).
torch.export.register_dataclass(StudentOutputs, serialized_type_name="cssl_core.StudentOutputs")


@dataclass(frozen=True)
class TeacherOutputs:
    """The frozen previous model on the same two views (no gradient).

    ``z1, z2``: projections, ``f1, f2``: backbone features (each pair only when a loss
    takes it), ``logits``: the old classifier on view-1 features (Kaizen), when both the
    student and the teacher have a classifier.
    """

    z1: Tensor | None = None
    z2: Tensor | None = None
    f1: Tensor | None = None
    f2: Tensor | None = None
    logits: Tensor | None = None

    def pair(self, output: TeacherOutput) -> tuple[Tensor, Tensor]:
        a, b = {"projection": (self.z1, self.z2), "features": (self.f1, self.f2)}[output]
        if a is None or b is None:
            raise RuntimeError(f"the teacher's {output} were not computed")
        return a, b

    def map(self, fn: Callable[[Tensor], Tensor]) -> TeacherOutputs:
        """Every tensor through ``fn``."""
        return dataclasses.replace(
            self, **{k: fn(v) for k, v in vars(self).items() if v is not None}
        )


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """``Linear-BN-ReLU-Linear``: the SimCLR projector and CaSSLe predictor shape."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """Build ``cfg.backbone`` from timm with random weights and no classification head.

    Backbones whose timm config fixes the input size (ViTs) are built for
    ``cfg.input_size``; convolutional backbones pool globally and accept any size.
    ``cfg.small_input_stem`` applies only to ResNet-like backbones that expose ``conv1``
    and ``maxpool`` (see :func:`apply_small_input_stem`).
    """
    name = cfg.backbone
    if not timm.is_model(name):
        raise ValueError(
            f"unknown backbone {name!r}: not a timm model name; set model.backbone to one of "
            "timm.list_models() (e.g. resnet18)"
        )
    kwargs: dict[str, Any] = {}
    pretrained_cfg = get_pretrained_cfg(name)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs["img_size"] = cfg.input_size
    backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if cfg.small_input_stem:
        apply_small_input_stem(backbone, name)
    return backbone


def embedding_dim(backbone: nn.Module) -> int:
    """Width of what a headless timm backbone returns: ``head_hidden_size`` where the model has
    a pre-logits head (MobileNetV3, GhostNet, LCNet: a conv head after pooling), else
    ``num_features`` (ResNets, RegNets, ViTs: the pooled features themselves)."""
    width = getattr(backbone, "head_hidden_size", None) or getattr(backbone, "num_features")  # noqa: B009
    return int(width)


def apply_small_input_stem(backbone: nn.Module, name: str = "backbone") -> None:
    """Adapt a ResNet-like stem to 32-64 px frames, in place (as for CIFAR in SimCLR).

    The first convolution gets stride 1 (a plain 7x7 ``conv1`` becomes 3x3, stride 1,
    padding 1; in a deep stem (``resnet*d``/``*t``) only the first convolution of the
    ``conv1`` sequence loses its stride), and ``maxpool`` becomes ``Identity``. Only public
    module attributes are touched; anything without ``conv1`` and ``maxpool`` is refused.
    """
    conv1 = getattr(backbone, "conv1", None)
    if not hasattr(backbone, "maxpool") or conv1 is None:
        raise ValueError(
            f"small_input_stem applies only to ResNet-like backbones with conv1 and maxpool; "
            f"{name!r} has neither: set model.small_input_stem=false"
        )
    if isinstance(conv1, nn.Conv2d):
        backbone.conv1 = _stride1_conv(conv1, kernel_size=3)
    elif isinstance(conv1, nn.Sequential) and isinstance(conv1[0], nn.Conv2d):
        conv1[0] = _stride1_conv(conv1[0], kernel_size=conv1[0].kernel_size[0])
    else:
        raise ValueError(
            f"small_input_stem: {name!r} has an unrecognised conv1 ({type(conv1).__name__}); "
            "set model.small_input_stem=false"
        )
    backbone.maxpool = nn.Identity()


def _stride1_conv(conv: nn.Conv2d, kernel_size: int) -> nn.Conv2d:
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=kernel_size,
        stride=1,
        padding=kernel_size // 2,
        bias=conv.bias is not None,
    )
    # timm's ResNet initialisation for convolutions.
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


class Embedder(nn.Module):
    """Backbone + SimCLR projector + CaSSLe and PFR predictors (+ Kaizen classifier over
    ``categories``). Heads a strategy does not use get no gradient (DDP needs
    ``find_unused_parameters=True`` or a model without them).

    Args:
        cfg: the ``model`` section of ``params.yaml``.
        categories: known class names, in classifier-row order; empty means no classifier.
    """

    def __init__(self, cfg: ModelConfig = ModelConfig(), categories: Sequence[str] = ()) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(cfg)
        self.num_features: int = embedding_dim(self.backbone)
        self.projector = mlp(self.num_features, cfg.projector_hidden, cfg.projector_dim)
        self.predictor = mlp(cfg.projector_dim, cfg.predictor_hidden, cfg.projector_dim)
        self.feature_predictor = mlp(self.num_features, cfg.predictor_hidden, self.num_features)
        self.categories: list[str] = []
        self.classifier: nn.Linear | None = None
        if categories:
            self.expand_classes(categories)
        self.adapter: nn.Linear | None = None
        self.adapter_parent: str | None = None

    def features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, num_features)``: the production embedding."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> EmbedderOutput:
        h = self.features(x)
        return EmbedderOutput(features=h, projection=self.projector(h))

    def predict(self, projection: Tensor) -> Tensor:
        """CaSSLe predictor: ``(B, projector_dim)`` -> ``(B, projector_dim)``."""
        return self.predictor(projection)

    def predict_features(self, features: Tensor) -> Tensor:
        """PFR feature predictor: ``(B, num_features)`` -> ``(B, num_features)``."""
        return self.feature_predictor(features)

    def classify(self, features: Tensor) -> Tensor:
        """Class logits ``(B, len(categories))``; pass ``features.detach()`` to keep labels
        out of the embedding (Kaizen)."""
        if self.classifier is None:
            raise RuntimeError("this Embedder has no classifier: call expand_classes(categories)")
        return self.classifier(features)

    def set_adapter(self, adapter: nn.Linear | None, parent_fingerprint: str | None) -> None:
        """Attach (or with ``None`` remove) the query-side map into the parent's feature
        space; ``parent_fingerprint`` names that parent (its ``state_fingerprint()``)."""
        if adapter is None:
            self.adapter, self.adapter_parent = None, None
            return
        if adapter.in_features != self.num_features:
            raise ValueError(
                f"the adapter takes {adapter.in_features} features, the model has "
                f"{self.num_features}"
            )
        if not parent_fingerprint:
            raise ValueError("an adapter needs the fingerprint of the parent it maps into")
        ref = next(self.projector.parameters())
        self.adapter = adapter.to(device=ref.device, dtype=ref.dtype).eval()
        self.adapter.requires_grad_(False)
        self.adapter_parent = parent_fingerprint

    def to_parent_space(self, features: Tensor) -> Tensor:
        """``(B, num_features)`` features of this model -> ``(B, D_parent)`` features in the
        parent's space: ``A(f / |f|)`` (the adapter reads L2-normalised features, as the index
        stores them; compare the result by cosine). An error without an adapter."""
        if self.adapter is None:
            raise RuntimeError(
                "this model has no adapter into its parent's space: train it with "
                "compat.mode=adapter"
            )
        return self.adapter(torch.nn.functional.normalize(features, dim=1))

    def expand_classes(self, new_categories: Sequence[str]) -> list[str]:
        """Append unseen categories as new classifier rows; old rows keep their weights.

        Returns the categories actually added (in order). An optimiser holding the old
        classifier parameters must be rebuilt after a non-empty expansion.
        """
        if isinstance(new_categories, str):
            raise TypeError("expand_classes takes a sequence of category names, not one string")
        added: list[str] = []
        for name in new_categories:
            if not isinstance(name, str) or not name:
                raise ValueError(f"category names must be non-empty strings, got {name!r}")
            if name not in self.categories and name not in added:
                added.append(name)
        if not added:
            return added
        old = self.classifier
        ref = next(self.projector.parameters())
        new = nn.Linear(self.num_features, len(self.categories) + len(added))
        new = new.to(device=ref.device, dtype=ref.dtype)
        if old is not None:
            with torch.no_grad():
                new.weight[: old.out_features].copy_(old.weight)
                new.bias[: old.out_features].copy_(old.bias)
            new.train(old.training)
        else:
            new.train(self.training)
        self.classifier = new
        self.categories = [*self.categories, *added]
        return added

    def frozen_copy(self) -> Embedder:
        """A deep copy in eval mode with every parameter ``requires_grad=False`` (the teacher)."""
        frozen = copy.deepcopy(self)
        frozen.eval()
        frozen.requires_grad_(False)
        return frozen

    def state_fingerprint(self) -> str:
        """SHA-256 (hex) over every state tensor (parameters and buffers) in name order:
        name, dtype, shape and bytes in standard (contiguous) layout, so the memory format
        and device do not change it."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created).

        Each file is written to a temporary name and renamed into place.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "model": self.cfg.model_dump(mode="json"),
            "categories": list(self.categories),
            "adapter": (
                None
                if self.adapter is None
                else {
                    "in_features": self.adapter.in_features,
                    "out_features": self.adapter.out_features,
                    "parent_fingerprint": self.adapter_parent,
                }
            ),
            "fingerprint": self.state_fingerprint(),
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
        }
        with atomic_path(out / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        atomic_write_json(out / CONFIG_FILE, meta, sort_keys=True)
        return out

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> Embedder:
        """Rebuild from ``config.json`` and load ``model.safetensors`` strictly (weights only)."""
        src = Path(directory)
        config_path, weights_path = src / CONFIG_FILE, src / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ModelLoadError(f"{path} does not exist (expected a directory from save())")
        try:
            meta = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{config_path}: not valid JSON ({exc.msg})") from None
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            found = meta.get("format_version") if isinstance(meta, dict) else None
            raise ModelLoadError(
                f"{config_path}: format_version {found!r}, this code reads {FORMAT_VERSION}"
            )
        try:
            cfg = ModelConfig.model_validate(meta.get("model"))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "model"
            raise ModelLoadError(f"{config_path}: model.{where}: {first['msg']}") from None
        model = cls(cfg, meta.get("categories", ()))
        adapter = meta.get("adapter")
        if adapter is not None:
            try:
                linear = nn.Linear(int(adapter["in_features"]), int(adapter["out_features"]))
                model.set_adapter(linear, str(adapter["parent_fingerprint"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelLoadError(f"{config_path}: adapter: {exc}") from None
        tensors = load_file(str(weights_path), device="cpu")
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ModelLoadError(
                f"{weights_path}: keys do not match the model built from config.json; "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for key, ref in expected.items():
            got = tensors[key]
            if got.shape != ref.shape or got.dtype != ref.dtype:
                raise ModelLoadError(
                    f"{weights_path}: {key} is {got.dtype}{tuple(got.shape)}, "
                    f"the model expects {ref.dtype}{tuple(ref.shape)}"
                )
        model.load_state_dict(tensors, strict=True)
        recorded = meta.get("fingerprint")
        if recorded is not None and recorded != model.state_fingerprint():
            raise ModelLoadError(
                f"{weights_path}: weights do not match the fingerprint in config.json "
                "(the files come from different saves or were modified)"
            )
        return model.to(device)
