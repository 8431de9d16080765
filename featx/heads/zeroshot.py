"""``zeroshot``: a CLIP model's own classifier, with no training: the text embeddings of prompts naming each class
("a photo of a {}."), compared to the image embedding by cosine similarity times CLIP's logit scale."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featx.backbones import text_embeddings
from featx.heads.base import Head
from featx.tensors import load_tensors


class CosineLinear(nn.Module):
    """logits = normalise(x) @ W.T: W holds scale x the normalised text embedding of each class."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(nn.functional.normalize(x, dim=-1))


class ZeroShotHead(Head):
    """Classes named by prompts through the text tower of the CLIP model that made the features (an ``open_clip:``
    backbone, from the features' provenance: ``set_source`` comes first). ``prompts`` holds ``{}`` for the class
    name. Nothing is fitted: the labels only name the classes, and validation only reports the accuracy."""

    kind = "zeroshot"

    def __init__(self, prompts: str = "a photo of a {}.", mirror: str | None = None, seed: int = 0):
        self.prompts, self.mirror, self.seed = prompts, mirror, seed

    def fit(self, X, y, X_val=None, y_val=None, groups=None):
        """Build the head for the classes of ``y``; its accuracy on (X_val, y_val), or on X, is reported."""
        fields = [field for _, field, _, _ in string.Formatter().parse(str(self.prompts)) if field is not None]
        if fields != [""]:
            raise ValueError(f"--prompts must hold one {{}} where the class name goes (and no other {{...}}), got "
                             f"{self.prompts!r}")
        self._set_classes(np.asarray(y))
        source = getattr(self, "source_", None) or {}
        names = [source["class_names"][c] for c in self.classes_] if source else []
        weights = source.get("weights_source") if Path(source.get("weights_source", "")).is_file() else \
            source.get("weights")
        text, scale = text_embeddings(source.get("backbone", "?"), weights, self.mirror,
                                      [self.prompts.format(name) for name in names])
        self.state_ = {"weight": text * scale}
        X_check, y_check = (X, y) if X_val is None else (X_val, y_val)
        self.selection_ = {"parameter": "prompts", "chosen": self.prompts, "scored_on": len(y_check),
                           "scored_on_val": X_val is not None,
                           "val_accuracy": float(np.mean(self.predict(np.asarray(X_check)) == np.asarray(y_check)))}
        return self

    def fit_summary(self, where: str) -> str:
        """Nothing is chosen or trained: the prompt, the classes, and the accuracy on the rows it was scored on."""
        selection = self.selection_
        rows = f"{where.removeprefix('on ')}" if selection.get("scored_on_val") else "the training file"
        return (f"no training: the prompt {selection['chosen']!r} for {len(self.classes_)} classes through CLIP's text "
                f"tower; accuracy {selection['val_accuracy']:.4f} on the {selection.get('scored_on')} rows of {rows}")

    def to_torch(self) -> nn.Module:
        return CosineLinear(self.state_["weight"])

    def decision_function(self, X) -> np.ndarray:
        with torch.no_grad():
            return self.to_torch()(torch.from_numpy(np.asarray(X, np.float32))).numpy()

    def _save_state(self, folder: Path) -> None:
        torch.save(self.state_, folder / "model.pt")

    def _load_state(self, folder: Path, trust_pickle: bool = False) -> None:
        self.state_ = load_tensors(folder / "model.pt", "head state")
