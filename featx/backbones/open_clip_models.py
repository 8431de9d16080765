"""The OpenCLIP family: ``open_clip:ARCH[/PRETRAINED]``, the image tower of a CLIP model, and its text tower for
the zeroshot head."""

from __future__ import annotations

import torch
from torch import nn

from featx.backbones.common import (RANDOM_WEIGHTS, ImageTower, TowerFamily, WeightsError, WeightsInfo,
                                    only_default_pool, read_state_dict, seeded, state_digest, weights_file)
from featx.decode import EvalTransform
from featx.mirror import file_digest, mirror_dir, mirrored_weights


class OpenClip(TowerFamily):
    prefix = "open_clip:"
    spelling = "open_clip:ARCH[/PRETRAINED]"
    extra = "clip"

    def create(self, name, spec, mirror, pool):
        only_default_pool(pool, "OpenCLIP")
        clip, info = clip_model(name, spec, mirror)
        return ImageTower(clip.visual, clip.visual.output_dim).eval(), info, _transform(clip)

    def rows(self, mirror):
        try:
            open_clip = FAMILY.library("open_clip")
        except ValueError as missing:
            return [(self.spelling, "", str(missing))]
        rows = [(self.spelling, "", f"the image tower of any of OpenCLIP {open_clip.__version__}'s "
                                    f"{len(open_clip.list_models())} models, e.g. "
                                    "open_clip:ViT-B-32/laion2b_s34b_b79k")]
        root = mirror_dir(mirror)
        for arch, tag in open_clip.list_pretrained():
            path = root / "weights" / f"{arch}-{tag}.safetensors" if root else None
            if path is not None and path.is_file():
                dim = str(open_clip.get_model_config(arch)["embed_dim"])
                rows.append((f"{self.prefix}{arch}/{tag}", dim, f"offline: {path}"))
        return rows


def clip_model(name: str, spec: str, mirror) -> tuple[nn.Module, WeightsInfo]:
    """A whole OpenCLIP model (image and text towers). ``DEFAULT``: the PRETRAINED tag's weights, from
    ``<mirror>/weights/ARCH-PRETRAINED.safetensors`` when the mirror has them, else OpenCLIP's download (which reads
    tensors only); a file; or ``none``."""
    open_clip = FAMILY.library("open_clip")
    arch, _, tag = name.removeprefix(OpenClip.prefix).partition("/")
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown OpenCLIP model {arch!r} (open_clip.list_models() lists them)")
    if spec.lower() == "none":
        return seeded(lambda: open_clip.create_model(arch, pretrained=None)).eval(), RANDOM_WEIGHTS
    default = spec.upper() == "DEFAULT"
    if default and not tag:
        raise WeightsError(f"{name} names no pretrained weights: write open_clip:{arch}/PRETRAINED "
                           f"(open_clip.list_pretrained_tags_by_model({arch!r})), or --weights FILE or none")
    path = mirrored_weights(f"{arch}-{tag}.safetensors", mirror) if default else weights_file(spec, mirror)
    if path is None and not default:
        raise WeightsError(f"weights {spec!r} for {name} are not a file, DEFAULT or none")
    if path is None:
        try:
            clip = open_clip.create_model(arch, pretrained=tag, require_pretrained=True)
        except Exception as error:  # noqa: BLE001 - the hub and OpenCLIP raise many kinds; all mean "not here"
            raise WeightsError(f"cannot get OpenCLIP's {arch}/{tag} weights ({type(error).__name__}); offline, put "
                               f"{arch}-{tag}.safetensors in <mirror>/weights/ and pass --mirror or set "
                               "$FEATX_MIRROR") from None
        return clip.eval(), WeightsInfo(spec, f"open_clip:{arch}/{tag}", state_digest(clip))
    clip = open_clip.create_model(arch, pretrained=None)
    try:
        clip.load_state_dict(read_state_dict(path))
    except RuntimeError as error:
        raise WeightsError(f"weights {path} do not fit {name}: {str(error).splitlines()[0]}") from None
    return clip.eval(), WeightsInfo(spec, str(path.resolve()), file_digest(path))


def _transform(clip: nn.Module) -> EvalTransform:
    """OpenCLIP's own eval preprocessing (``visual.preprocess_cfg``): resize the shorter side, centre crop."""
    config = clip.visual.preprocess_cfg
    if config.get("resize_mode", "shortest") != "shortest":
        raise ValueError(f"OpenCLIP resize_mode {config['resize_mode']!r} is not supported; featx centre-crops")
    size = config["size"] if isinstance(config["size"], int) else config["size"][-1]
    return EvalTransform(resize=size, crop=size, mean=tuple(config["mean"]), std=tuple(config["std"]),
                         interpolation=config["interpolation"])


class NoTextTower(ValueError):
    """Features of a backbone with no text tower, where one is needed (the zeroshot head)."""


def text_embeddings(name: str, weights: str, mirror, texts: list[str]) -> tuple[torch.Tensor, float]:
    """L2-normalised text embeddings of ``texts`` [T, D] by the CLIP model ``name`` with ``weights`` (the one whose
    image tower made some features), and its logit scale: CLIP's image-text similarity is scale * cos."""
    if not name.startswith(OpenClip.prefix):
        raise NoTextTower(f"{name} has no text tower: the zeroshot head needs features of an open_clip: backbone")
    clip, _ = clip_model(name, weights, mirror)
    tokenizer = FAMILY.library("open_clip").get_tokenizer(name.removeprefix(OpenClip.prefix).partition("/")[0])
    with torch.inference_mode():
        text = clip.encode_text(tokenizer(texts)).float()
    return nn.functional.normalize(text, dim=-1), float(clip.logit_scale.detach().exp())


FAMILY = OpenClip()
