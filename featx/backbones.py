"""One registry of backbones: build any torchvision classifier (a bare name), timm model (``timm:NAME[.TAG]``) or
OpenCLIP image tower (``open_clip:ARCH[/PRETRAINED]``), load its weights, strip or replace its classifier.

This is the only module that knows the families apart: where each keeps its final classification layer, how its
weights are found, and which preprocessing they expect.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from featx.decode import EvalTransform
from featx.mirror import file_digest, mirrored_weights
from featx.tensors import load_tensors

# Families whose final layer is not simply the model's last nn.Linear (the rule for every other family:
# resnet/resnext/regnet `fc`, mobilenet/efficientnet/vgg `classifier.N`, vit `heads.head`, swin `head`, ...).
SPECIAL_CLASSIFIER_LAYERS = {
    "squeezenet": "classifier.1",  # a 1x1 Conv2d; the ReLU and global pooling after it stay in place
}
RANDOM_INIT_SEED = 0
TIMM = "timm:"  # the prefix of timm models: timm:resnet50.a1_in1k, timm:vit_small_patch14_dinov2.lvd142m
OPEN_CLIP = "open_clip:"  # the prefix of OpenCLIP models: open_clip:ViT-B-32/laion2b_s34b_b79k


class ImageTower(nn.Module):
    """A CLIP model's image half as a classifier: ``encode_image`` (the projected embedding), then ``head``
    (nn.Identity for features; a new nn.Linear to fine-tune)."""

    def __init__(self, visual: nn.Module, dim: int):
        super().__init__()
        self.visual, self.head, self.dim = visual, nn.Identity(), dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images))


class WeightsError(ValueError):
    """Weights that cannot be found or do not fit the architecture."""


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of the weights a model was built with."""

    spec: str  # what the user asked for: a torchvision weights name, a file, or "none"
    source: str  # URL, file path, or "random init (seed 0)"
    sha256: str  # of the weights file; "" for random init
    classifier_loaded: bool = False  # whether the ImageNet classifier came with the weights
    categories: tuple[str, ...] = field(default=(), repr=False)  # ImageNet class names, when known


def available() -> list[str]:
    """Names of every torchvision classification model the registry can build."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def families() -> list[str]:
    """One line per family beyond torchvision's names: its spelling and whether it is installed."""
    lines = []
    try:
        import timm

        lines.append(f"{TIMM}NAME[.TAG]  any of timm {timm.__version__}'s {len(timm.list_models())} models, e.g. "
                     f"{TIMM}convnext_tiny.fb_in22k")
    except ImportError:
        lines.append(f"{TIMM}NAME[.TAG]  any timm model (not installed: pip install 'featx[timm]')")
    try:
        import open_clip

        lines.append(f"{OPEN_CLIP}ARCH[/PRETRAINED]  the image tower of any of OpenCLIP {open_clip.__version__}'s "
                     f"{len(open_clip.list_models())} models, e.g. {OPEN_CLIP}ViT-B-32/laion2b_s34b_b79k")
    except ImportError:
        lines.append(f"{OPEN_CLIP}ARCH[/PRETRAINED]  an OpenCLIP model (not installed: pip install 'featx[clip]')")
    return lines


def classifier_layer_name(model: nn.Module, name: str) -> str:
    """Dotted path of the model's final classification layer."""
    if name.startswith(TIMM):
        return model.pretrained_cfg["classifier"]
    if name.startswith(OPEN_CLIP):
        return "head"
    for prefix, layer in SPECIAL_CLASSIFIER_LAYERS.items():
        if name.startswith(prefix):
            return layer
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot find the classifier of {name}: it has no nn.Linear layer")
    return linears[-1]


def classifier_layer(model: nn.Module, name: str) -> nn.Module:
    """The model's final classification layer (nn.Linear, or SqueezeNet's 1x1 nn.Conv2d)."""
    return model.get_submodule(classifier_layer_name(model, name))


def replace_classifier(model: nn.Module, name: str, num_classes: int | None) -> nn.Module:
    """Swap the final layer for a fresh one with ``num_classes`` outputs, or for nn.Identity when None.

    With None the model returns its pooled features ([B, D]); returns the new layer.
    """
    if name.startswith(TIMM):  # timm's own: num_classes 0 returns the pooled features (pre-logits)
        model.reset_classifier(num_classes or 0)
        return model.get_classifier()
    if name.startswith(OPEN_CLIP):
        model.head = nn.Linear(model.dim, num_classes) if num_classes else nn.Identity()
        return model.head
    layer_name = classifier_layer_name(model, name)
    old = model.get_submodule(layer_name)
    if num_classes is None:
        new: nn.Module = nn.Identity()
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    else:
        new = nn.Linear(old.in_features, num_classes)
    model.set_submodule(layer_name, new)
    return new


def feature_dim(model: nn.Module, name: str) -> int:
    """Width of the pooled features that feed the final layer."""
    if name.startswith(TIMM):
        return getattr(model, "head_hidden_size", None) or model.num_features
    if name.startswith(OPEN_CLIP):
        return model.dim
    layer = classifier_layer(model, name)
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


@dataclass
class Backbone:
    """A frozen feature extractor: ``model(x)`` maps a normalised [B, 3, H, W] batch to [B, feature_dim]."""

    name: str
    model: nn.Module
    feature_dim: int
    weights: WeightsInfo
    transform: EvalTransform

    def provenance(self) -> dict:
        """What identifies these features: backbone, weights and preprocessing."""
        return {
            "backbone": self.name,
            "weights": self.weights.spec,
            "weights_source": self.weights.source,
            "weights_sha256": self.weights.sha256,
            "feature_dim": self.feature_dim,
            "transform": self.transform.describe(),
        }


def create_model(
    name: str, weights: str = "DEFAULT", mirror: str | os.PathLike | None = None
) -> tuple[nn.Module, WeightsInfo, EvalTransform]:
    """Build torchvision model ``name`` with its original classifier and load ``weights`` into it.

    ``weights`` is a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1`` ...; the mirror's
    ``weights/<file>`` is used before any download), a state-dict file (a bare file name is also looked up
    in the mirror), or ``none`` for a seeded random init. Returns the model in eval mode, the weights'
    provenance and the eval transform the weights expect.
    """
    if name.startswith(TIMM):
        return _timm_model(name, str(weights), mirror)
    if name.startswith(OPEN_CLIP):
        clip, info = _clip_model(name, str(weights), mirror)
        return ImageTower(clip.visual, clip.visual.output_dim).eval(), info, _clip_transform(clip)
    if name not in available():
        raise ValueError(f"unknown backbone {name!r}; choose a torchvision model ({', '.join(available()[:4])}, ... "
                         "`featx backbones` lists them) or timm:NAME")
    spec = str(weights)
    if spec.lower() == "none":
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_INIT_SEED)
            model = torchvision.models.get_model(name, weights=None)
        info = WeightsInfo(spec="none", source=f"random init (seed {RANDOM_INIT_SEED})", sha256="")
        return model.eval(), info, EvalTransform()
    path = _weights_file(spec, mirror)
    if path is not None:
        model = torchvision.models.get_model(name, weights=None)
        loaded = _load_state_dict(model, name, _read_state_dict(path), str(path))
        categories = _imagenet_categories() if loaded and _num_outputs(model, name) == 1000 else ()
        info = WeightsInfo(spec, str(path.resolve()), file_digest(path), loaded, categories)
        return model.eval(), info, EvalTransform()
    return _torchvision_pretrained(name, spec, mirror)


def create_backbone(
    name: str,
    weights: str = "DEFAULT",
    mirror: str | os.PathLike | None = None,
    transform: EvalTransform | None = None,
) -> Backbone:
    """A frozen feature extractor: ``create_model`` with its classifier stripped (timm's ``num_classes=0``)."""
    model, info, default_transform = create_model(name, weights, mirror)
    dim = feature_dim(model, name)
    replace_classifier(model, name, None)
    model.requires_grad_(False)
    return Backbone(name, model.eval(), dim, info, transform or default_transform)


def backbone_from_source(source: dict, mirror: str | os.PathLike | None = None) -> Backbone:
    """Rebuild the extractor described by a features file's or head's provenance; the weights hash must match."""
    weights = source["weights"]
    if source["weights_source"] and Path(source["weights_source"]).is_file():
        weights = source["weights_source"]
    backbone = create_backbone(source["backbone"], weights, mirror, EvalTransform.from_dict(source["transform"]))
    if backbone.weights.sha256 != source["weights_sha256"]:
        raise WeightsError(f"weights {weights} have sha256 {backbone.weights.sha256[:12]}..., but these features "
                           f"were made with {source['weights_sha256'][:12]}...; point --mirror at the original file")
    return backbone


def _weights_file(spec: str, mirror) -> Path | None:
    """The file ``spec`` names, or None when it is not file-like (then it is a torchvision weights name)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    file_like = os.sep in spec or path.suffix in {".pth", ".pt", ".bin", ".ckpt", ".safetensors"}
    if file_like:
        found = mirrored_weights(path.name, mirror) if path.parent == Path(".") else None
        if found is None:
            raise WeightsError(f"weights file {spec} does not exist")
        return found
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = load_tensors(path, "weights file")
    except ValueError as error:
        raise WeightsError(str(error)) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _few(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _load_state_dict(model: nn.Module, name: str, state: dict, source: str) -> bool:
    """Load strictly except for the classifier, which may be absent; returns whether the classifier loaded."""
    expected = model.state_dict()
    classifier = classifier_layer_name(model, name) + "."
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    missing_body = [k for k in missing if not k.startswith(classifier)]
    problems = []
    if missing_body:
        problems.append(f"missing keys {_few(missing_body)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_few(mismatched)}")
    if problems:
        raise WeightsError(f"weights {source} do not fit {name}: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
    return not missing


def _num_outputs(model: nn.Module, name: str) -> int:
    if name.startswith(TIMM):
        return model.num_classes
    if name.startswith(OPEN_CLIP):
        return 0  # no classifier: CLIP classifies through its text tower (the zeroshot head)
    layer = classifier_layer(model, name)
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def _imagenet_categories() -> tuple[str, ...]:
    return tuple(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _torchvision_pretrained(name: str, spec: str, mirror) -> tuple[nn.Module, WeightsInfo, EvalTransform]:
    enum = torchvision.models.get_model_weights(name)
    try:
        weights = enum.DEFAULT if spec.upper() == "DEFAULT" else enum[spec]
    except KeyError:
        known = ", ".join(["DEFAULT", *enum.__members__])
        raise WeightsError(
            f"weights {spec!r} is not a file, 'none', or a torchvision weights name for {name} (known: {known})"
        ) from None
    filename = os.path.basename(weights.url)
    path = mirrored_weights(filename, mirror)
    if path is None:
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            hash_prefix = filename.rsplit("-", 1)[-1].split(".")[0]
            try:
                torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=hash_prefix, progress=True)
            except OSError as error:
                raise WeightsError(
                    f"cannot download {weights.url} ({error}); offline, put {filename} in <mirror>/weights/ "
                    "and pass --mirror or set $FEATX_MIRROR"
                ) from error
    categories = weights.meta["categories"]
    model = torchvision.models.get_model(name, weights=None, num_classes=len(categories))
    _load_state_dict(model, name, _read_state_dict(path), str(path))
    if hasattr(model, "transform_input"):  # torchvision's googlenet/inception weights expect it
        model.transform_input = True
    preset = weights.transforms()
    transform = EvalTransform(
        resize=preset.resize_size[0],
        crop=preset.crop_size[0],
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        interpolation=preset.interpolation.value,
    )
    info = WeightsInfo(spec, weights.url, file_digest(path), True, tuple(categories))
    return model.eval(), info, transform


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm backbones need timm: pip install 'featx[timm]'") from None
    return timm


def _timm_model(name: str, spec: str, mirror) -> tuple[nn.Module, WeightsInfo, EvalTransform]:
    """A timm model with its classifier, and the eval transform of its own data config. ``DEFAULT``: timm's
    pretrained weights for the tag, from ``<mirror>/weights/NAME.safetensors`` when the mirror has them, else
    downloaded by timm; a file; or ``none``."""
    timm, model_name = _timm(), name.removeprefix(TIMM)
    if not timm.is_model(model_name.split(".")[0]):
        raise ValueError(f"unknown timm model {model_name!r} (`python -c \"import timm; print(timm.list_models())\"`)")
    if spec.lower() == "none":
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(model_name, pretrained=False)
        info = WeightsInfo(spec="none", source=f"random init (seed {RANDOM_INIT_SEED})", sha256="")
        return model.eval(), info, _timm_transform(timm, model)
    path = _weights_file(spec, mirror) if spec.upper() != "DEFAULT" else mirrored_weights(
        f"{model_name}.safetensors", mirror)
    if path is None and spec.upper() != "DEFAULT":
        raise WeightsError(f"weights {spec!r} for {name} are not a file, DEFAULT or none")
    if path is None:
        try:
            model = timm.create_model(model_name, pretrained=True)
        except Exception as error:  # noqa: BLE001 - timm and the hub raise many kinds; all mean "not here"
            raise WeightsError(f"cannot get timm's pretrained weights for {model_name} ({type(error).__name__}); "
                               f"offline, put {model_name}.safetensors in <mirror>/weights/ and pass --mirror or set "
                               "$FEATX_MIRROR") from None
        source = f"timm:{model.pretrained_cfg.get('hf_hub_id') or model_name}"
        digest, loaded = _state_digest(model), True
    else:
        model = timm.create_model(model_name, pretrained=False)
        loaded = _load_state_dict(model, name, _read_state_dict(path), str(path))
        source, digest = str(path.resolve()), file_digest(path)
    categories = _imagenet_categories() if loaded and model.num_classes == 1000 else ()
    return model.eval(), WeightsInfo(spec, source, digest, loaded, categories), _timm_transform(timm, model)


def _state_digest(model: nn.Module) -> str:
    """sha256 over a model's weights (for weights timm loaded itself, whose file featx never sees)."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _timm_transform(timm, model: nn.Module) -> EvalTransform:
    """timm's eval preprocessing for ``model`` (``resolve_data_config``): resize to floor(size / crop_pct), centre
    crop, its interpolation and mean/std."""
    config = timm.data.resolve_data_config({}, model=model)
    if config.get("crop_mode", "center") != "center":
        raise ValueError(f"timm crop_mode {config['crop_mode']!r} is not supported; featx centre-crops")
    size = config["input_size"][-1]
    return EvalTransform(resize=math.floor(size / config["crop_pct"]), crop=size, mean=tuple(config["mean"]),
                         std=tuple(config["std"]), interpolation=config["interpolation"])


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ValueError("OpenCLIP backbones need open_clip: pip install 'featx[clip]'") from None
    return open_clip


def _clip_model(name: str, spec: str, mirror) -> tuple[nn.Module, WeightsInfo]:
    """A whole OpenCLIP model (image and text towers). ``DEFAULT``: the PRETRAINED tag's weights, from
    ``<mirror>/weights/ARCH-PRETRAINED.safetensors`` when the mirror has them, else OpenCLIP's download (which reads
    tensors only); a file; or ``none``."""
    open_clip = _open_clip()
    arch, _, tag = name.removeprefix(OPEN_CLIP).partition("/")
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown OpenCLIP model {arch!r} (open_clip.list_models() lists them)")
    if spec.lower() == "none":
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_INIT_SEED)
            clip = open_clip.create_model(arch, pretrained=None)
        return clip.eval(), WeightsInfo("none", f"random init (seed {RANDOM_INIT_SEED})", "")
    default = spec.upper() == "DEFAULT"
    if default and not tag:
        raise WeightsError(f"{name} names no pretrained weights: write open_clip:{arch}/PRETRAINED "
                           f"(open_clip.list_pretrained_tags_by_model({arch!r})), or --weights FILE or none")
    path = mirrored_weights(f"{arch}-{tag}.safetensors", mirror) if default else _weights_file(spec, mirror)
    if path is None and not default:
        raise WeightsError(f"weights {spec!r} for {name} are not a file, DEFAULT or none")
    if path is None:
        try:
            clip = open_clip.create_model(arch, pretrained=tag, require_pretrained=True)
        except Exception as error:  # noqa: BLE001 - the hub and OpenCLIP raise many kinds; all mean "not here"
            raise WeightsError(f"cannot get OpenCLIP's {arch}/{tag} weights ({type(error).__name__}); offline, put "
                               f"{arch}-{tag}.safetensors in <mirror>/weights/ and pass --mirror or set "
                               "$FEATX_MIRROR") from None
        return clip.eval(), WeightsInfo(spec, f"open_clip:{arch}/{tag}", _state_digest(clip))
    clip = open_clip.create_model(arch, pretrained=None)
    try:
        clip.load_state_dict(_read_state_dict(path))
    except RuntimeError as error:
        raise WeightsError(f"weights {path} do not fit {name}: {str(error).splitlines()[0]}") from None
    return clip.eval(), WeightsInfo(spec, str(path.resolve()), file_digest(path))


def _clip_transform(clip: nn.Module) -> EvalTransform:
    """OpenCLIP's own eval preprocessing (``visual.preprocess_cfg``): resize the shorter side, centre crop."""
    config = clip.visual.preprocess_cfg
    if config.get("resize_mode", "shortest") != "shortest":
        raise ValueError(f"OpenCLIP resize_mode {config['resize_mode']!r} is not supported; featx centre-crops")
    size = config["size"] if isinstance(config["size"], int) else config["size"][-1]
    return EvalTransform(resize=size, crop=size, mean=tuple(config["mean"]), std=tuple(config["std"]),
                         interpolation=config["interpolation"])


def text_embeddings(name: str, weights: str, mirror, texts: list[str]) -> tuple[torch.Tensor, float]:
    """L2-normalised text embeddings of ``texts`` [T, D] by the CLIP model ``name`` with ``weights`` (the one whose
    image tower made some features), and its logit scale: CLIP's image-text similarity is scale * cos."""
    if not name.startswith(OPEN_CLIP):
        raise ValueError(f"{name} has no text tower: the zeroshot head needs features of an open_clip: backbone")
    clip, _ = _clip_model(name, weights, mirror)
    tokenizer = _open_clip().get_tokenizer(name.removeprefix(OPEN_CLIP).partition("/")[0])
    with torch.inference_mode():
        text = clip.encode_text(tokenizer(texts)).float()
    return nn.functional.normalize(text, dim=-1), float(clip.logit_scale.detach().exp())
