"""The timm family: ``timm:NAME[.TAG]``, any timm model, its pretrained weights and its own data config."""

from __future__ import annotations

import math

from torch import nn

from featx.backbones.common import (RANDOM_WEIGHTS, Family, WeightsError, WeightsInfo, load_state_dict,
                                    meta_feature_dim, read_state_dict, seeded, state_digest, weights_file)
from featx.backbones.torchvision_models import imagenet_categories
from featx.decode import EvalTransform
from featx.mirror import file_digest, mirror_dir, mirrored_weights

TIMM_POOLS = {"cls": "token", "mean": "avg"}  # --pool -> timm's global_pool


class Timm(Family):
    prefix = "timm:"
    spelling = "timm:NAME[.TAG]"
    extra = "timm"

    def create(self, name, spec, mirror, pool):
        """``DEFAULT``: timm's pretrained weights for the tag, from ``<mirror>/weights/NAME.safetensors`` when the
        mirror has them, else downloaded by timm; a file; or ``none``. ``pool``: timm's ``global_pool``."""
        timm, model_name = self.library("timm"), name.removeprefix(self.prefix)
        if not timm.is_model(model_name.split(".")[0]):
            raise ValueError(f"unknown timm model {model_name!r} (`python -c \"import timm; "
                             "print(timm.list_models())\"`)")

        def build(pretrained=False):
            return timm.create_model(model_name, pretrained=pretrained)

        if spec.lower() == "none":
            model = self._repool(seeded(build), pool, name)
            return model.eval(), RANDOM_WEIGHTS, _transform(timm, model)
        default = spec.upper() == "DEFAULT"
        path = mirrored_weights(f"{model_name}.safetensors", mirror) if default else weights_file(spec, mirror)
        if path is None and not default:
            raise WeightsError(f"weights {spec!r} for {name} are not a file, DEFAULT or none")
        if path is None:
            try:
                model = build(pretrained=True)
            except Exception as error:  # noqa: BLE001 - timm and the hub raise many kinds; all mean "not here"
                raise WeightsError(f"cannot get timm's pretrained weights for {model_name} ({type(error).__name__})"
                                   f"; offline, put {model_name}.safetensors in <mirror>/weights/ and pass --mirror "
                                   "or set $FEATX_MIRROR") from None
            source = f"timm:{model.pretrained_cfg.get('hf_hub_id') or model_name}"
            digest, loaded = state_digest(model), True
        else:
            model = build()
            loaded = load_state_dict(model, name, read_state_dict(path), str(path), self.classifier_name(model))
            source, digest = str(path.resolve()), file_digest(path)
        categories = imagenet_categories() if loaded and model.num_classes == 1000 else ()
        model = self._repool(model, pool, name)
        return model.eval(), WeightsInfo(spec, source, digest, loaded, categories), _transform(timm, model)

    def _repool(self, model: nn.Module, pool: str, name: str) -> nn.Module:
        """``model`` pooling by ``pool`` (timm's ``global_pool``) after the weights loaded, so the layers they were
        trained with stay (a ViT built for avg pooling would swap its final norm); the classifier is kept."""
        if pool == "default":
            return model
        classifier = model.get_classifier()
        try:
            model.reset_classifier(model.num_classes, global_pool=TIMM_POOLS[pool])
        except (TypeError, ValueError, AssertionError, KeyError) as error:
            raise ValueError(f"--pool {pool} does not apply to {name} ({error})") from None
        model.set_submodule(self.classifier_name(model), classifier)
        return model

    def classifier_name(self, model):
        return model.pretrained_cfg["classifier"]

    def replace_classifier(self, model, num_classes):
        """timm's own: ``num_classes=0`` returns the pooled features (pre-logits)."""
        model.reset_classifier(num_classes or 0)
        return model.get_classifier()

    def feature_dim(self, model):
        return getattr(model, "head_hidden_size", None) or model.num_features

    def num_outputs(self, model):
        return model.num_classes

    def pool(self, model):
        pooling = getattr(model, "global_pool", None)
        return str(getattr(pooling, "pool_type", pooling))

    def rows(self, mirror):
        try:
            timm = self.library("timm")
        except ValueError as missing:
            return [(self.spelling, "", str(missing))]
        rows = [(self.spelling, "", f"any of timm {timm.__version__}'s {len(timm.list_models())} models, e.g. "
                                    "timm:convnext_tiny.fb_in22k")]
        root = mirror_dir(mirror)
        for path in sorted((root / "weights").glob("*.safetensors")) if root else []:
            if timm.is_model(path.stem.split(".")[0]):
                build = lambda: timm.create_model(path.stem, pretrained=False)  # noqa: E731
                rows.append((self.prefix + path.stem, meta_feature_dim(build, self), f"offline: {path}"))
        return rows


def _transform(timm, model: nn.Module) -> EvalTransform:
    """timm's eval preprocessing for ``model`` (``resolve_data_config``): resize to floor(size / crop_pct), centre
    crop, its interpolation and mean/std."""
    config = timm.data.resolve_data_config({}, model=model)
    if config.get("crop_mode", "center") != "center":
        raise ValueError(f"timm crop_mode {config['crop_mode']!r} is not supported; featx centre-crops")
    size = config["input_size"][-1]
    return EvalTransform(resize=math.floor(size / config["crop_pct"]), crop=size, mean=tuple(config["mean"]),
                         std=tuple(config["std"]), interpolation=config["interpolation"])


FAMILY = Timm()
