"""What every backbone family shares: the family interface, weights provenance, reading tensors-only weight files,
strict loading, and ``ImageTower`` for models whose pooled embedding is not a classifier's input."""

from __future__ import annotations

import hashlib
import importlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from featx.decode import EvalTransform
from featx.mirror import mirrored_weights
from featx.tensors import load_tensors

RANDOM_INIT_SEED = 0
POOLS = ("default", "cls", "mean")  # --pool: the family's own pooling, the class token, the mean of patch tokens


class WeightsError(ValueError):
    """Weights that cannot be found or do not fit the architecture."""


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of the weights a model was built with."""

    spec: str  # what the user asked for: a weights name, DEFAULT, a file, or "none"
    source: str  # URL, file path, hub id, or "random init (seed 0)"
    sha256: str  # of the weights file (or of the loaded tensors); "" for random init
    classifier_loaded: bool = False  # whether the ImageNet classifier came with the weights
    categories: tuple[str, ...] = field(default=(), repr=False)  # ImageNet class names, when known


RANDOM_WEIGHTS = WeightsInfo(spec="none", source=f"random init (seed {RANDOM_INIT_SEED})", sha256="")


class Family:
    """One family of models behind a name prefix (``timm:``, ...): how to build one, where its classifier is, what
    its pooled features are. ``replace_classifier(model, None)`` leaves a model that returns pooled features."""

    prefix = ""
    spelling = ""  # how a name of this family is written, for `featx backbones`
    extra = ""  # the pip extra that installs the family's library

    def library(self, module: str):
        """The family's library, or a one-line ValueError naming the extra that installs it."""
        try:
            return importlib.import_module(module)
        except ImportError:
            raise ValueError(f"{self.spelling} backbones need {module}: pip install 'featx[{self.extra}]'") from None

    def create(self, name: str, spec: str, mirror, pool: str) -> tuple[nn.Module, WeightsInfo, EvalTransform]:
        """The model with its classifier (if any), its weights' provenance and the eval transform they expect."""
        raise NotImplementedError

    def classifier_name(self, model: nn.Module) -> str:
        """Dotted path of the final classification layer."""
        raise NotImplementedError

    def replace_classifier(self, model: nn.Module, num_classes: int | None) -> nn.Module:
        """Swap the final layer for a fresh one with ``num_classes`` outputs (nn.Identity when None); returns it."""
        raise NotImplementedError

    def feature_dim(self, model: nn.Module) -> int:
        """Width of the pooled features."""
        raise NotImplementedError

    def num_outputs(self, model: nn.Module) -> int:
        """Outputs of the classifier the weights came with; 0 when the model has none."""
        raise NotImplementedError

    def pool(self, model: nn.Module) -> str | None:
        """The pooling this model's features use, for the file's identity; None when the family has one way."""
        return None

    def rows(self, mirror) -> list[tuple[str, str, str]]:
        """`featx backbones` rows (name, feature width, weights offline or not) for this family."""
        raise NotImplementedError


class ImageTower(nn.Module):
    """A model whose pooled embedding is not some classifier's input (CLIP's image tower, a Hugging Face encoder) as
    a classifier: ``encoder`` (images -> [B, dim]), then ``head`` (nn.Identity for features; nn.Linear to fine-tune)."""

    def __init__(self, encoder: nn.Module, dim: int):
        super().__init__()
        self.visual, self.head, self.dim = encoder, nn.Identity(), dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images))


class TowerFamily(Family):
    """A family whose models are ``ImageTower``s: no classifier of their own, ``head`` is the one fine-tuning adds."""

    def classifier_name(self, model: nn.Module) -> str:
        return "head"

    def replace_classifier(self, model: nn.Module, num_classes: int | None) -> nn.Module:
        model.head = nn.Linear(model.dim, num_classes) if num_classes else nn.Identity()
        return model.head

    def feature_dim(self, model: nn.Module) -> int:
        return model.dim

    def num_outputs(self, model: nn.Module) -> int:
        return 0


def only_default_pool(pool: str, family: str) -> None:
    """Refuse ``--pool`` other than ``default`` for a family with one pooling."""
    if pool != "default":
        raise ValueError(f"--pool {pool} applies to timm: and hf: backbones; {family} models pool one way "
                         "(leave --pool default)")


def seeded(build):
    """``build()`` under the fixed random-init seed, leaving the global RNG as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(RANDOM_INIT_SEED)
        return build()


def weights_file(spec: str, mirror) -> Path | None:
    """The file ``spec`` names, or None when it is not file-like (a weights name, DEFAULT)."""
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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a tensors-only state dict (``weights_only``): nothing in it runs."""
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


def load_state_dict(model: nn.Module, name: str, state: dict, source: str, classifier: str | None) -> bool:
    """Load strictly except for the ``classifier`` layer, which may be absent; returns whether it loaded."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    missing_body = [k for k in missing if not (classifier and k.startswith(classifier + "."))]
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


def state_digest(model: nn.Module) -> str:
    """sha256 over a model's weights (for weights a library loaded itself, whose file featx never sees)."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class MetaWeights(TorchFunctionMode):
    """Builds models whose weights (``torch.empty``) live on the meta device, taking no memory or initialisation
    time, while other tensors stay real (RegNet's builders compute block widths with torch ops, which a whole-meta
    build cannot turn back into numbers)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def meta_feature_dim(build, family: Family) -> str:
    """Feature width of a model built with ``MetaWeights``; '?' when it cannot be built so."""
    try:
        with MetaWeights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's notes on initialisation, which the meta device skips
            return str(family.feature_dim(build()))
    except Exception:  # noqa: BLE001 - a listing shows what it can
        return "?"
