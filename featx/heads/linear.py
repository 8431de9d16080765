"""``linear``: torch nn.Linear heads, a grid of learning rates x weight decays trained together in one pass.

Features are read in contiguous blocks (``block_rows``), so X may be an ``h5py.Dataset`` larger than memory:
memory is bounded by the block size, not N. Blocks are visited in a seeded random order and shuffled
inside; features are standardised with a streamed mean/std. The head with the best validation accuracy wins
(as in DINOv2's linear evaluation).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featx.embed import resolve_device
from featx.heads.base import Head, check_grid, check_positive


class StandardisedLinear(nn.Module):
    """logits = ((x - mean) / std) @ W.T + b, for one or several heads stacked along W's rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight / std)
            self.linear.bias.copy_(bias - (weight / std) @ mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _blocks(n: int, rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


class LinearHead(Head):
    """Multinomial linear classifiers trained by SGD (momentum 0.9, cosine schedule) on standardised features."""

    kind = "linear"

    def __init__(self, lrs=(0.003, 0.03, 0.3), weight_decays=(0.0, 1e-4, 1e-3, 1e-2), epochs: int | None = None,
                 batch_size: int = 1024, block_rows: int = 65536, device: str = "auto", seed: int = 0):
        self.lrs, self.weight_decays, self.epochs = lrs, weight_decays, epochs
        self.batch_size, self.block_rows, self.device, self.seed = batch_size, block_rows, device, seed
        self._validate()

    def _validate(self):
        check_grid("lrs", self.lrs)
        check_grid("weight_decays", self.weight_decays)
        if self.epochs is not None:
            check_positive("epochs", self.epochs, int)
        check_positive("batch_size", self.batch_size, int)
        check_positive("block_rows", self.block_rows, int)

    def _grid(self) -> list[tuple[float, float]]:
        return [(lr, wd) for lr in self.lrs for wd in self.weight_decays]

    def _moments(self, X, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        total, squares, count = np.zeros(X.shape[1]), np.zeros(X.shape[1]), 0
        for start, stop in _blocks(X.shape[0], self.block_rows):
            block = np.asarray(X[start:stop], np.float64)[rows[start:stop]]
            total += block.sum(0)
            squares += (block ** 2).sum(0)
            count += len(block)
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean ** 2, 0)) + 1e-6
        return torch.from_numpy(mean).float(), torch.from_numpy(std).float()

    def fit(self, X, y, X_val=None, y_val=None, groups=None):
        """Train every (lr, weight decay) head on X, pick the best on validation. X may be an h5py.Dataset."""
        self._validate()
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        targets = np.searchsorted(self.classes_, y)
        train_rows = np.ones(len(y), bool)
        if X_val is None:
            train_rows = ~self._holdout(y, groups)
            X_val, val_rows, val_targets = X, ~train_rows, targets
        else:
            val_rows = np.ones(X_val.shape[0], bool)
            val_targets = np.searchsorted(self.classes_, np.asarray(y_val))
        device = resolve_device(self.device)
        mean, std = self._moments(X, train_rows)
        grid, num_classes, dim = self._grid(), len(self.classes_), X.shape[1]
        generator = torch.Generator().manual_seed(self.seed)
        weights = [nn.Parameter(torch.zeros(num_classes, dim, device=device)) for _ in grid]
        biases = [nn.Parameter(torch.zeros(num_classes, device=device)) for _ in grid]
        optimizer = torch.optim.SGD([{"params": [w, b], "lr": lr, "weight_decay": wd}
                                     for (lr, wd), w, b in zip(grid, weights, biases)], momentum=0.9)
        n_train = int(train_rows.sum())
        batch = min(self.batch_size, n_train)
        steps_per_epoch = sum(math.ceil(train_rows[a:b].sum() / batch) for a, b in _blocks(len(y), self.block_rows))
        epochs = self.epochs or max(5, math.ceil(300 / steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
        mean_d, std_d = mean.to(device), std.to(device)
        blocks = _blocks(len(y), self.block_rows)
        for _ in range(epochs):
            for index in torch.randperm(len(blocks), generator=generator).tolist():
                start, stop = blocks[index]
                keep = train_rows[start:stop]
                features = torch.from_numpy(np.asarray(X[start:stop], np.float32)[keep]).to(device)
                features = (features - mean_d) / std_d
                labels = torch.from_numpy(targets[start:stop][keep]).to(device)
                order = torch.randperm(len(labels), generator=generator).to(device)
                for first in range(0, len(order), batch):
                    rows = order[first:first + batch]
                    logits = features[rows] @ torch.cat(weights).T + torch.cat(biases)
                    logits = logits.view(len(rows), len(grid), num_classes).transpose(0, 1)
                    loss = nn.functional.cross_entropy(logits.reshape(-1, num_classes), labels[rows].repeat(len(grid)),
                                                       reduction="sum") / len(rows)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
        correct, losses = np.zeros(len(grid)), np.zeros(len(grid))
        stacked = StandardisedLinear(torch.cat(weights).detach().cpu(), torch.cat(biases).detach().cpu(), mean, std)
        for start, stop in _blocks(X_val.shape[0], self.block_rows):
            keep = val_rows[start:stop]
            with torch.no_grad():
                logits = stacked(torch.from_numpy(np.asarray(X_val[start:stop], np.float32)[keep]))
            logits = logits.view(-1, len(grid), num_classes).transpose(0, 1)
            labels = torch.from_numpy(val_targets[start:stop][keep])
            correct += (logits.argmax(2) == labels).sum(1).numpy()
            losses += np.array([nn.functional.cross_entropy(l, labels, reduction="sum").item() for l in logits])
        n_val = int(val_rows.sum())
        scores = [{"lr": lr, "weight_decay": wd, "val_accuracy": c / n_val, "val_loss": l / n_val}
                  for (lr, wd), c, l in zip(grid, correct, losses)]
        best = max(range(len(grid)), key=lambda i: (scores[i]["val_accuracy"], -scores[i]["val_loss"]))
        self.selection_ = {"parameter": "lr, weight_decay", "chosen": {"lr": grid[best][0],
                           "weight_decay": grid[best][1]}, "val_accuracy": scores[best]["val_accuracy"],
                           "epochs": epochs, "grid": scores}
        self.state_ = {"weight": weights[best].detach().cpu(), "bias": biases[best].detach().cpu(), "mean": mean,
                       "std": std}
        return self

    def to_torch(self) -> nn.Module:
        return StandardisedLinear(**self.state_)

    def decision_function(self, X) -> np.ndarray:
        module = self.to_torch()
        with torch.no_grad():
            return np.concatenate([module(torch.from_numpy(np.asarray(X[a:b], np.float32))).numpy()
                                   for a, b in _blocks(X.shape[0], self.block_rows)] or [np.empty((0, 0))])

    def _save_state(self, folder: Path) -> None:
        torch.save(self.state_, folder / "model.pt")

    def _load_state(self, folder: Path) -> None:
        self.state_ = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
