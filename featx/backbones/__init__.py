"""One registry of backbones, by name: a bare name is a torchvision classifier; ``timm:NAME[.TAG]``,
``open_clip:ARCH[/PRETRAINED]`` and ``hf:REPO_OR_FOLDER`` are the other families, each a module here behind the
``Family`` interface (``common``). Callers never tell the families apart: they build, strip or replace a
classifier, and read feature widths through the functions below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from featx.backbones import hf_models, open_clip_models, timm_models, torchvision_models
from featx.backbones.common import POOLS, Family, ImageTower, WeightsError, WeightsInfo
from featx.backbones.open_clip_models import NoTextTower, text_embeddings
from featx.backbones.torchvision_models import available, imagenet_categories
from featx.decode import EvalTransform
from featx.mirror import mirror_dir

FAMILIES: tuple[Family, ...] = (timm_models.FAMILY, open_clip_models.FAMILY, hf_models.FAMILY)


def family(name: str) -> Family:
    """The family a backbone name belongs to (by its prefix; no prefix: torchvision)."""
    return next((f for f in FAMILIES if name.startswith(f.prefix)), torchvision_models.FAMILY)


def listing(mirror: str | os.PathLike | None = None) -> list[tuple[str, str, str]]:
    """Every family's rows for `featx backbones`: (name, feature width, where the weights are)."""
    return [row for f in (torchvision_models.FAMILY, *FAMILIES) for row in f.rows(mirror)]


def folder_name(name: str) -> str:
    """The output folder's name for a backbone: its name, with a path's separators as ``--`` (as the hub's cache
    spells repositories) and a folder as its last part."""
    if name.startswith(hf_models.FAMILY.prefix) and Path(name.removeprefix(hf_models.FAMILY.prefix)).is_dir():
        name = hf_models.FAMILY.prefix + Path(name.removeprefix(hf_models.FAMILY.prefix)).resolve().name
    return name.replace("/", "--")


def classifier_layer_name(model: nn.Module, name: str) -> str:
    """Dotted path of the model's final classification layer."""
    return family(name).classifier_name(model)


def classifier_layer(model: nn.Module, name: str) -> nn.Module:
    """The model's final classification layer (nn.Linear, or SqueezeNet's 1x1 nn.Conv2d)."""
    return model.get_submodule(classifier_layer_name(model, name))


def replace_classifier(model: nn.Module, name: str, num_classes: int | None) -> nn.Module:
    """Swap the final layer for a fresh one with ``num_classes`` outputs, or for nn.Identity when None (then the
    model returns its pooled features, [B, D]); returns the new layer."""
    return family(name).replace_classifier(model, num_classes)


def feature_dim(model: nn.Module, name: str) -> int:
    """Width of the pooled features that feed the final layer."""
    return family(name).feature_dim(model)


@dataclass
class Backbone:
    """A frozen feature extractor: ``model(x)`` maps a normalised [B, 3, H, W] batch to [B, feature_dim]."""

    name: str
    model: nn.Module
    feature_dim: int
    weights: WeightsInfo
    transform: EvalTransform
    pool: str | None = None  # how the features are pooled, where the family offers a choice

    def provenance(self) -> dict:
        """What identifies these features: backbone, pooling, weights and preprocessing."""
        return {
            "backbone": self.name,
            **({"pool": self.pool} if self.pool is not None else {}),
            "weights": self.weights.spec,
            "weights_source": self.weights.source,
            "weights_sha256": self.weights.sha256,
            "feature_dim": self.feature_dim,
            "transform": self.transform.describe(),
        }


def create_model(name: str, weights: str = "DEFAULT", mirror: str | os.PathLike | None = None,
                 pool: str = "default") -> tuple[nn.Module, WeightsInfo, EvalTransform]:
    """Build backbone ``name`` with its classifier (if it has one) and load ``weights`` into it.

    ``weights``: ``DEFAULT`` (the family's pretrained weights: the mirror first, then the library's download), a
    named variant (torchvision's ``IMAGENET1K_V1`` ...), a ``.safetensors`` or tensors-only state-dict file (a bare
    file name is also looked up in ``<mirror>/weights``), or ``none`` for a seeded random init. ``pool``: one of
    ``POOLS``. Returns the model in eval mode, the weights' provenance and the eval transform they expect.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    return family(name).create(name, str(weights), mirror, pool)


def create_backbone(name: str, weights: str = "DEFAULT", mirror: str | os.PathLike | None = None,
                    transform: EvalTransform | None = None, pool: str = "default") -> Backbone:
    """A frozen feature extractor: ``create_model`` with its classifier stripped (timm's ``num_classes=0``)."""
    model, info, default_transform = create_model(name, weights, mirror, pool)
    models = family(name)
    dim = models.feature_dim(model)
    models.replace_classifier(model, None)
    model.requires_grad_(False)
    return Backbone(name, model.eval(), dim, info, transform or default_transform, models.pool(model))


@dataclass(frozen=True)
class BackboneSpec:
    """What builds a backbone, wherever it runs (Ray workers rebuild it from this): ``create_backbone``'s name,
    weights, mirror and pooling, and the changes asked to its eval transform (``resize``, ``crop``, ``draft``,
    ``resize_crop_only``), applied to the weights' own preset in the one build."""

    name: str = "resnet18"
    weights: str = "DEFAULT"
    mirror: str | None = None
    pool: str = "default"
    resize: int | None = None
    crop: int | None = None
    draft: bool = False
    resize_crop_only: bool = False

    def __post_init__(self):
        object.__setattr__(self, "weights", str(self.weights))
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {self.pool!r}")
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer (pixels), got {value!r}")

    def portable(self) -> BackboneSpec:
        """The same spec with a weights file and the mirror as absolute paths (workers may start elsewhere)."""
        root = mirror_dir(self.mirror)
        weights = os.path.abspath(self.weights) if os.path.isfile(self.weights) else self.weights
        return replace(self, weights=weights, mirror=str(root.resolve()) if root else None)

    def build(self) -> Backbone:
        """The frozen extractor, its transform changed as asked."""
        backbone = create_backbone(self.name, self.weights, self.mirror, pool=self.pool)
        if self.resize is None and self.crop is None and not self.draft and not self.resize_crop_only:
            return backbone
        preset = backbone.transform
        return replace(backbone, transform=replace(preset, resize=self.resize or preset.resize,
                                                   crop=self.crop or preset.crop, draft=self.draft,
                                                   resize_crop_only=self.resize_crop_only))


def backbone_from_source(source: dict, mirror: str | os.PathLike | None = None) -> Backbone:
    """Rebuild the extractor described by a features file's or head's provenance; the weights hash must match."""
    weights = source["weights"]
    if source["weights_source"] and Path(source["weights_source"]).is_file():
        weights = source["weights_source"]
    pool = {"token": "cls", "cls": "cls", "avg": "mean", "mean": "mean"}.get(source.get("pool"), "default")
    backbone = create_backbone(source["backbone"], weights, mirror, EvalTransform.from_dict(source["transform"]), pool)
    if backbone.pool != source.get("pool"):
        raise ValueError(f"{source['backbone']} now pools by {backbone.pool}, but these features were pooled by "
                         f"{source.get('pool')}; extract them again")
    if backbone.weights.sha256 != source["weights_sha256"]:
        raise WeightsError(f"weights {weights} have sha256 {backbone.weights.sha256[:12]}..., but these features "
                           f"were made with {source['weights_sha256'][:12]}...; point --mirror at the original file")
    return backbone


__all__ = ["Backbone", "BackboneSpec", "Family", "ImageTower", "POOLS", "WeightsError", "WeightsInfo", "available",
           "backbone_from_source", "classifier_layer", "classifier_layer_name", "create_backbone", "create_model",
           "family", "feature_dim", "folder_name", "imagenet_categories", "listing", "replace_classifier",
           "text_embeddings", "NoTextTower"]
