"""The torchvision family: bare names (``resnet50``, ``mobilenet_v2``), torchvision's weights and eval presets."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from featx.backbones.common import (RANDOM_WEIGHTS, Family, WeightsError, WeightsInfo, load_state_dict,
                                    meta_feature_dim, only_default_pool, read_state_dict, seeded, weights_file)
from featx.decode import EvalTransform
from featx.mirror import file_digest, mirror_dir, mirrored_weights

# Models whose final layer is not simply the last nn.Linear (the rule for every other: resnet/resnext/regnet `fc`,
# mobilenet/efficientnet/vgg `classifier.N`, vit `heads.head`, swin `head`, ...).
SPECIAL_CLASSIFIER_LAYERS = {  # by class
    "SqueezeNet": "classifier.1",  # a 1x1 Conv2d; the ReLU and global pooling after it stay in place
}


def available() -> list[str]:
    """Names of every torchvision classification model."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def imagenet_categories() -> tuple[str, ...]:
    """ImageNet's 1000 class names, as torchvision's weights list them."""
    return tuple(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


class Torchvision(Family):
    spelling = "NAME"
    extra = ""

    def create(self, name, spec, mirror, pool):
        only_default_pool(pool, "torchvision")
        if name not in available():
            raise ValueError(f"unknown backbone {name!r}; choose a torchvision model ({', '.join(available()[:4])}, "
                             "... `featx backbones` lists them), timm:NAME, open_clip:ARCH/TAG or hf:REPO")
        if spec.lower() == "none":
            return seeded(lambda: torchvision.models.get_model(name, weights=None)).eval(), RANDOM_WEIGHTS, \
                EvalTransform()
        path = weights_file(spec, mirror)
        if path is None:
            return self._pretrained(name, spec, mirror)
        model = torchvision.models.get_model(name, weights=None)
        loaded = load_state_dict(model, name, read_state_dict(path), str(path), self.classifier_name(model))
        categories = imagenet_categories() if loaded and self.num_outputs(model) == 1000 else ()
        return model.eval(), WeightsInfo(spec, str(path.resolve()), file_digest(path), loaded, categories), \
            EvalTransform()

    def classifier_name(self, model: nn.Module) -> str:
        if type(model).__name__ in SPECIAL_CLASSIFIER_LAYERS:
            return SPECIAL_CLASSIFIER_LAYERS[type(model).__name__]
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"cannot find the classifier of {type(model).__name__}: it has no nn.Linear layer")
        return linears[-1]

    def replace_classifier(self, model, num_classes):
        layer_name = self.classifier_name(model)
        old = model.get_submodule(layer_name)
        if num_classes is None:
            new: nn.Module = nn.Identity()
        elif isinstance(old, nn.Conv2d):
            new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
        else:
            new = nn.Linear(old.in_features, num_classes)
        model.set_submodule(layer_name, new)
        return new

    def feature_dim(self, model):
        layer = model.get_submodule(self.classifier_name(model))
        return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features

    def num_outputs(self, model):
        layer = model.get_submodule(self.classifier_name(model))
        return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features

    def rows(self, mirror):
        rows = []
        root = mirror_dir(mirror)
        mirrored = sorted(p.name for p in (root / "weights").glob("*")) if root and (root / "weights").is_dir() else []
        for name in available():
            dim = meta_feature_dim(lambda: torchvision.models.get_model(name, weights=None), self)
            filename = os.path.basename(torchvision.models.get_model_weights(name).DEFAULT.url)
            found = mirrored_weights(filename, mirror) or _hub_file(filename)
            others = [f for f in mirrored if f != filename and f.startswith((f"{name}-", f"{name}."))]
            where = f"offline: {found}" if found else "download"
            if others:  # other weights of this model in the mirror, named with --weights
                where += f"; offline: --weights {', '.join(others)} (in the mirror)"
            rows.append((name, dim, where))
        return rows

    def _pretrained(self, name: str, spec: str, mirror) -> tuple[nn.Module, WeightsInfo, EvalTransform]:
        enum = torchvision.models.get_model_weights(name)
        try:
            weights = enum.DEFAULT if spec.upper() == "DEFAULT" else enum[spec]
        except KeyError:
            known = ", ".join(["DEFAULT", *enum.__members__])
            raise WeightsError(f"weights {spec!r} is not a file, 'none', or a torchvision weights name for {name} "
                               f"(known: {known})") from None
        filename = os.path.basename(weights.url)
        path = mirrored_weights(filename, mirror) or _download(weights.url, filename)
        categories = weights.meta["categories"]
        model = torchvision.models.get_model(name, weights=None, num_classes=len(categories))
        load_state_dict(model, name, read_state_dict(path), str(path), self.classifier_name(model))
        if hasattr(model, "transform_input"):  # torchvision's googlenet/inception weights expect it
            model.transform_input = True
        preset = weights.transforms()
        transform = EvalTransform(resize=preset.resize_size[0], crop=preset.crop_size[0], mean=tuple(preset.mean),
                                  std=tuple(preset.std), interpolation=preset.interpolation.value)
        return model.eval(), WeightsInfo(spec, weights.url, file_digest(path), True, tuple(categories)), transform


def _hub_file(filename: str) -> Path | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return path if path.is_file() else None


def _download(url: str, filename: str) -> Path:
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        hash_prefix = filename.rsplit("-", 1)[-1].split(".")[0]
        try:
            torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix, progress=True)
        except OSError as error:
            raise WeightsError(f"cannot download {url} ({error}); offline, put {filename} in <mirror>/weights/ "
                               "and pass --mirror or set $FEATX_MIRROR") from error
    return path


FAMILY = Torchvision()
