"""The Hugging Face family: ``hf:REPO_OR_FOLDER``, a ``transformers`` vision encoder (DINOv2, ViT, ConvNeXt, the
vision tower of CLIP / SigLIP), from the hub, from a Hugging Face cache inside the mirror, or from a folder written
by ``save_pretrained``; with its image processor's preprocessing. Weights are read from safetensors only and no
repository code runs (``trust_remote_code=False``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from featx.backbones.common import (RANDOM_WEIGHTS, ImageTower, TowerFamily, WeightsError, WeightsInfo,
                                    load_state_dict, read_state_dict, seeded, state_digest, weights_file)
from featx.decode import EvalTransform
from featx.mirror import file_digest, mirror_dir

PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
MIRROR_CACHE = "huggingface"  # <mirror>/huggingface: a Hugging Face hub cache (models--ORG--NAME/...)


class Pooled(nn.Module):
    """A ``transformers`` encoder's pooled output: ``pooler`` (its ``pooler_output``), ``cls`` (the class token of
    the last hidden state) or ``mean`` (the mean of its patch tokens, or of a conv feature map)."""

    def __init__(self, encoder: nn.Module, pool: str):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        self.prefix_tokens = 1 + getattr(encoder.config, "num_register_tokens", 0)  # CLS and DINOv2's registers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.encoder(pixel_values=images)
        if self.pool == "pooler":
            return output.pooler_output.flatten(1)
        hidden = output.last_hidden_state
        if hidden.ndim == 4:  # [B, C, H, W]: a conv net's last feature map
            return hidden.mean((2, 3))
        return hidden[:, 0] if self.pool == "cls" else hidden[:, self.prefix_tokens:].mean(1)


class HuggingFace(TowerFamily):
    prefix = "hf:"
    spelling = "hf:REPO_OR_FOLDER"
    extra = "hf"

    def create(self, name, spec, mirror, pool):
        """``DEFAULT``: the repository's safetensors weights (a folder's own, the mirror's cache, or the hub's);
        a file (safetensors or a tensors-only state dict) for the same config; or ``none``."""
        transformers = FAMILY.library("transformers")
        where, options = _location(name.removeprefix(self.prefix), mirror)
        config = _hub_call(transformers.AutoConfig.from_pretrained, where, options, name)
        if spec.upper() == "DEFAULT":
            encoder = _hub_call(transformers.AutoModel.from_pretrained, where, {**options, "use_safetensors": True},
                                name)
            info = WeightsInfo(spec, _source(where, config), state_digest(encoder))
        else:
            encoder = seeded(lambda: transformers.AutoModel.from_config(config))
            info = RANDOM_WEIGHTS
            if spec.lower() != "none":
                path = weights_file(spec, mirror)
                if path is None:
                    raise WeightsError(f"weights {spec!r} for {name} are not a file, DEFAULT or none")
                load_state_dict(encoder, name, read_state_dict(path), str(path), None)
                info = WeightsInfo(spec, str(path.resolve()), file_digest(path))
        encoder = getattr(encoder, "vision_model", encoder)  # CLIP / SigLIP: their image tower
        processor = _hub_call(transformers.AutoImageProcessor.from_pretrained, where, options, name)
        transform = _transform(processor.to_dict(), name)
        if pool == "default":
            pool = "pooler" if _has_pooler(encoder, transform) else "cls"
        tower = Pooled(encoder.eval(), pool)
        with torch.inference_mode():
            dim = tower(torch.zeros(1, 3, transform.crop, transform.crop)).shape[-1]
        return ImageTower(tower, dim).eval(), info, transform

    def pool(self, model):
        return model.visual.pool

    def rows(self, mirror):
        rows = [(self.spelling, "", "a transformers vision model, e.g. hf:facebook/dinov2-small")]
        root = mirror_dir(mirror)
        for folder in sorted((root / MIRROR_CACHE).glob("models--*")) if root else []:
            repo = folder.name.removeprefix("models--").replace("--", "/")
            rows.append((self.prefix + repo, _width(repo, mirror), f"offline: {folder}"))
        return rows


def _location(ref: str, mirror) -> tuple[str, dict]:
    """Where ``from_pretrained`` reads ``ref``, and how: a folder as it is; a repository from the mirror's cache when
    it holds it (offline), else from the hub."""
    options: dict = {"trust_remote_code": False}
    if Path(ref).expanduser().is_dir():
        return str(Path(ref).expanduser().resolve()), options
    if ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or Path(ref).exists():  # a path, not ORG/NAME
        raise WeightsError(f"hf:{ref}: no folder {Path(ref).expanduser()} here (a folder written by save_pretrained, "
                           "or a hub repository as ORG/NAME)")
    root = mirror_dir(mirror)
    cache = root / MIRROR_CACHE if root else None
    if cache is not None and (cache / f"models--{ref.replace('/', '--')}").is_dir():
        options.update(cache_dir=str(cache), local_files_only=True)
    return ref, options


def _hub_call(load, where: str, options: dict, name: str):
    try:
        return load(where, **options)
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsError(f"cannot load {name} ({reason[:200]}); offline, put the hub's cache of {where} in "
                           f"<mirror>/{MIRROR_CACHE} (hf download {where} --cache-dir <mirror>/{MIRROR_CACHE}) and "
                           "pass "
                           "--mirror or set $FEATX_MIRROR, or name a folder written by save_pretrained") from None


def _source(where: str, config) -> str:
    commit = getattr(config, "_commit_hash", None)
    return where if Path(where).is_dir() else f"hf:{where}" + (f"@{commit}" if commit else "")


def _has_pooler(encoder: nn.Module, transform: EvalTransform) -> bool:
    with torch.inference_mode():
        output = encoder(pixel_values=torch.zeros(1, 3, transform.crop, transform.crop))
    return getattr(output, "pooler_output", None) is not None


def _width(repo: str, mirror) -> str:
    try:
        where, options = _location(repo, mirror)
        config = FAMILY.library("transformers").AutoConfig.from_pretrained(where, **options)
        config = getattr(config, "vision_config", config)
        return str(getattr(config, "hidden_size", None) or config.hidden_sizes[-1])
    except Exception:  # noqa: BLE001 - a listing shows what it can
        return "?"


def _transform(config: dict, name: str) -> EvalTransform:
    """The image processor's preprocessing as featx's transform: resize (the shorter side, or both sides), centre
    crop with the processor's offsets, its resampling filter, rescale by 1/255 and normalise."""
    size, crop = config.get("size") or {}, config.get("crop_size") or {}
    if not config.get("do_resize", True) or abs(config.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise ValueError(f"{name}'s image processor does not resize, or rescales by other than 1/255; featx cannot "
                         "reproduce it")
    squash = "height" in size
    if squash and size["height"] != size["width"] or crop and crop["height"] != crop["width"]:
        raise ValueError(f"{name}'s image processor makes non-square images ({size}, {crop}); featx makes square ones")
    resize = size["height"] if squash else size.get("shortest_edge")
    if resize is None:
        raise ValueError(f"{name}'s image processor resizes by {size}, which featx cannot reproduce")
    crop_to = crop["height"] if config.get("do_center_crop") and crop else resize
    if "crop_pct" in config and not squash:  # ConvNeXt's: below 384, resize to size / crop_pct and crop; else squash
        resize, crop_to, squash = (int(resize / config["crop_pct"]), resize, False) if resize < 384 else \
            (resize, resize, True)
    resample = config.get("resample", 2)
    normalise = config.get("do_normalize", True)
    return EvalTransform(resize=resize, crop=crop_to,
                         mean=tuple(config["image_mean"]) if normalise else (0.0, 0.0, 0.0),
                         std=tuple(config["image_std"]) if normalise else (1.0, 1.0, 1.0),
                         interpolation=resample if isinstance(resample, str) else PIL_RESAMPLE[int(resample)],
                         squash=squash, crop_offset="floor")


FAMILY = HuggingFace()
