"""``knn``: cosine k-nearest neighbours on L2-normalised features, votes weighted by exp(similarity / T)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from featx.heads.base import Head, check_grid, check_positive
from featx.tensors import load_tensors


class CosineKNN(nn.Module):
    """features [B, D] -> log of temperature-weighted neighbour votes [B, C] (DINO's k-NN classifier)."""

    def __init__(self, reference: torch.Tensor, targets: torch.Tensor, num_classes: int, k: int,
                 temperature: float):
        super().__init__()
        self.register_buffer("reference", nn.functional.normalize(reference.float(), dim=1))
        self.register_buffer("targets", targets.long())
        self.num_classes, self.k, self.temperature = num_classes, min(k, len(targets)), temperature

    def votes(self, x: torch.Tensor, k: int) -> torch.Tensor:
        similarity = nn.functional.normalize(x.float(), dim=1) @ self.reference.T
        top, index = similarity.topk(k, dim=1)
        weights = (top / self.temperature).exp()
        votes = torch.zeros(x.shape[0], self.num_classes, device=x.device, dtype=weights.dtype)
        return votes.scatter_add_(1, self.targets[index], weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        votes = self.votes(x, self.k)
        return (votes / votes.sum(1, keepdim=True)).clamp_min(1e-12).log()


class KNNHead(Head):
    """k chosen on validation from ``ks``; the reference set is train (+ validation when ``refit``)."""

    kind = "knn"

    def __init__(self, ks=(1, 3, 5, 10, 20, 50), temperature: float = 0.07, batch_size: int = 1024,
                 refit: bool = True, seed: int = 0):
        self.ks, self.temperature, self.batch_size, self.refit, self.seed = ks, temperature, batch_size, refit, seed
        self._validate()

    def _validate(self):
        if not all(isinstance(k, int) and k >= 1 for k in check_grid("ks", self.ks)):
            raise ValueError(f"ks must be positive integers, got {self.ks!r}")
        check_positive("temperature", self.temperature)
        check_positive("batch_size", self.batch_size, int)

    def fit(self, X, y, X_val=None, y_val=None, groups=None):
        self._validate()
        X, y, X_val, y_val = self._split(X, y, X_val, y_val, groups)
        targets = torch.from_numpy(np.searchsorted(self.classes_, y))
        val_targets = torch.from_numpy(np.searchsorted(self.classes_, y_val))
        knn = CosineKNN(torch.from_numpy(X), targets, len(self.classes_), max(self.ks), self.temperature)
        ks = sorted({min(k, len(y)) for k in self.ks})
        correct = np.zeros(len(ks))
        with torch.no_grad():
            for start in range(0, len(y_val), self.batch_size):
                batch = torch.from_numpy(X_val[start:start + self.batch_size])
                for i, k in enumerate(ks):
                    correct[i] += (knn.votes(batch, k).argmax(1) == val_targets[start:start + len(batch)]).sum()
        scores = [{"k": k, "val_accuracy": c / len(y_val)} for k, c in zip(ks, correct)]
        best = max(scores, key=lambda s: (s["val_accuracy"], -s["k"]))
        self.selection_ = {"parameter": "k", "chosen": best["k"], "val_accuracy": best["val_accuracy"],
                           "grid": scores, "refit_on_train_and_val": self.refit}
        if self.refit:
            X, targets = np.concatenate([X, X_val]), torch.cat([targets, val_targets])
        self.state_ = {"reference": torch.from_numpy(X), "targets": targets}
        return self

    def fixed_params(self) -> dict:
        return {**self.get_params(), "ks": (self.selection_["chosen"],), "refit": False}

    def to_torch(self) -> nn.Module:
        return CosineKNN(self.state_["reference"], self.state_["targets"], len(self.classes_),
                         self.selection_["chosen"], self.temperature)

    def decision_function(self, X) -> np.ndarray:
        module, X = self.to_torch(), np.asarray(X, np.float32)
        with torch.no_grad():
            return np.concatenate([module(torch.from_numpy(X[a:a + self.batch_size])).numpy()
                                   for a in range(0, len(X), self.batch_size)] or [np.empty((0, 0))])

    def _save_state(self, folder: Path) -> None:
        torch.save(self.state_, folder / "model.pt")

    def _load_state(self, folder: Path, trust_pickle: bool = False) -> None:
        self.state_ = load_tensors(folder / "model.pt", "head state")
