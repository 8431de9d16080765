"""``linear``: torch nn.Linear heads, a grid of learning rates x weight decays trained together in one pass.

X may be an ``h5py.Dataset`` larger than memory: it is streamed in shuffled blocks of about ``BLOCK_BYTES``
(``featx.heads.blocks``), so memory is bounded by the block size, not N. The gradient is computed in closed
form for all heads at once, in the standardised feature space without standardising the rows. The head with the
best validation accuracy wins (as in DINOv2's linear evaluation).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featx import store
from featx.devices import resolve_device
from featx.heads.base import Head, check_grid, check_positive
from featx.heads.blocks import BLOCK_BYTES, BlockStream
from featx.tensors import load_tensors

MOMENTUM = 0.9


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


class GridSGD:
    """SGD with momentum for a grid of (lr, weight decay) softmax heads stacked along one weight's rows.

    The gradient of the mean cross-entropy is closed-form and taken in the standardised space
    ``(x - mean) / std`` without standardising the rows; weight decay applies to the weights only.
    """

    def __init__(self, grid: list[tuple[float, float]], num_classes: int, mean: torch.Tensor, std: torch.Tensor):
        device, rows = mean.device, len(grid) * num_classes
        self.num_classes, self.mean, self.std = num_classes, mean, std
        self.onehot = torch.eye(num_classes, device=device)  # row i: the one-hot of class i
        self.lr = torch.tensor([lr for lr, _ in grid], device=device).repeat_interleave(num_classes)[:, None]
        self.decay = torch.tensor([wd for _, wd in grid], device=device).repeat_interleave(num_classes)[:, None]
        self.weight, self.bias = torch.zeros(rows, len(mean), device=device), torch.zeros(rows, device=device)
        self.weight_velocity, self.bias_velocity = torch.zeros_like(self.weight), torch.zeros_like(self.bias)

    @torch.inference_mode()
    def step(self, x: torch.Tensor, labels: torch.Tensor, lr_factor: float) -> None:
        """One step on raw features ``x`` [B, D] with class indices ``labels`` [B], at ``lr_factor`` x the lrs."""
        onehot = self.onehot[labels]
        # logits of the standardised x, from raw x: x @ (W / std).T + (b - (W / std) @ mean)
        scale = self.weight / self.std
        logits = torch.addmm(torch.addmv(self.bias, scale, self.mean, alpha=-1), x, scale.T)
        # B x d(cross-entropy)/d logits, per head
        error = logits.view(len(x), -1, self.num_classes).softmax(2).sub_(onehot.unsqueeze(1)).view(len(x), -1)
        bias_grad = error.sum(0).div_(len(x))
        weight_grad = torch.addr(_error_t_x(error, x).div_(len(x)), bias_grad, self.mean, alpha=-1).div_(self.std)
        weight_grad.addcmul_(self.weight, self.decay)
        self.weight_velocity.mul_(MOMENTUM).add_(weight_grad)
        self.bias_velocity.mul_(MOMENTUM).add_(bias_grad)
        self.weight.addcmul_(self.weight_velocity, self.lr, value=-lr_factor)
        self.bias.addcmul_(self.bias_velocity, self.lr[:, 0], value=-lr_factor)


def _training_blocks(stream: BlockStream, mask: np.ndarray, rng: np.random.Generator, device: torch.device):
    """One shuffled pass: (features on ``device``, file rows) per block."""
    for features, file_rows in stream.blocks(mask, rng):
        yield _finite(features).to(device, non_blocking=True), file_rows


def _finite(features: torch.Tensor) -> torch.Tensor:
    """``features``, checked as they are read: NaN or inf rows stop the fit."""
    if not torch.isfinite(features).all():
        count = int((~torch.isfinite(features)).any(1).sum())
        raise store.NonFiniteError(f"{count} rows of a block of the features hold NaN or infinite values")
    return features


def _error_t_x(error: torch.Tensor, x: torch.Tensor, pieces: int = 4) -> torch.Tensor:
    """error.T @ x summed over row pieces: the cores take whole pieces instead of splitting one skinny product
    (one-off probe, 2 CPU cores, 1024 x 512, K = 10: 2.8M vs 1.7M rows/s)."""
    if x.device.type != "cpu" or len(x) % pieces:
        return error.T @ x
    rows = len(x) // pieces
    return torch.bmm(error.view(pieces, rows, -1).transpose(1, 2), x.view(pieces, rows, -1)).sum(0)


class LinearHead(Head):
    """Multinomial linear classifiers trained by SGD (momentum 0.9, cosine schedule) on standardised features.

    ``block_rows`` (default: about 128 MB of features) bounds memory when X is an HDF5 dataset. Weight decay
    applies to the weights, not the biases.
    """

    kind = "linear"

    def __init__(self, lrs=(0.003, 0.03, 0.3), weight_decays=(0.0, 1e-4, 1e-3, 1e-2), epochs: int | None = None,
                 batch_size: int = 1024, block_rows: int | None = None, device: str = "auto", seed: int = 0):
        self.lrs, self.weight_decays, self.epochs = lrs, weight_decays, epochs
        self.batch_size, self.block_rows, self.device, self.seed = batch_size, block_rows, device, seed
        self._validate()

    def _validate(self):
        check_grid("lrs", self.lrs)
        check_grid("weight_decays", self.weight_decays)
        if self.epochs is not None:
            check_positive("epochs", self.epochs, int)
        check_positive("batch_size", self.batch_size, int)
        if self.block_rows is not None:
            check_positive("block_rows", self.block_rows, int)

    def _grid(self) -> list[tuple[float, float]]:
        return [(lr, wd) for lr in self.lrs for wd in self.weight_decays]

    def _block_rows(self, dim: int) -> int:
        return self.block_rows or max(1024, BLOCK_BYTES // (4 * dim))

    def _moments(self, stream: BlockStream, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the training rows, estimated on the first shuffled block (the scale SGD needs)."""
        with contextlib.closing(stream.blocks(rows, np.random.default_rng(self.seed))) as blocks:
            features, _ = next(blocks)
        mean = _finite(features).mean(0)  # two passes, in slices (torch.var_mean over rows is 5x slower here)
        variance = sum((piece - mean).square_().sum(0) for piece in features.split(4096)) / len(features)
        return mean, variance.sqrt() + 1e-6

    def fit(self, X, y, X_val=None, y_val=None, groups=None):
        """Train every (lr, weight decay) head on X, pick the best on validation. X may be an h5py.Dataset."""
        self._validate()
        y = np.asarray(y)
        self._set_classes(y)
        targets = torch.from_numpy(np.searchsorted(self.classes_, y))
        train_rows = np.ones(len(y), bool)
        if X_val is None:
            train_rows = ~self._holdout(y, groups)
            X_val, val_rows, val_targets = X, ~train_rows, targets
        else:
            val_rows = np.ones(X_val.shape[0], bool)
            val_targets = torch.from_numpy(np.searchsorted(self.classes_, np.asarray(y_val)))
        device = resolve_device(self.device)
        stream = BlockStream(X, self._block_rows(X.shape[1]), ahead=device.type != "cpu")
        n_train = int(train_rows.sum())
        batch, epochs = self._schedule(n_train)
        mean, std = self._moments(stream, train_rows)
        weight, bias = self._train(stream, targets, train_rows, mean, std, device, batch, epochs)
        val_stream = stream if X_val is X else BlockStream(X_val, self._block_rows(X_val.shape[1]))
        val_blocks = ((_finite(features), file_rows) for features, file_rows in val_stream.blocks(val_rows))
        scores = self._score_grid(StandardisedLinear(weight, bias, mean, std), val_blocks, val_targets, val_rows)
        grid = self._grid()
        best = max(range(len(grid)), key=lambda i: (scores[i]["val_accuracy"], -scores[i]["val_loss"]))
        self.selection_ = {"parameter": "lr, weight_decay", "chosen": {"lr": grid[best][0],
                           "weight_decay": grid[best][1]}, "val_accuracy": scores[best]["val_accuracy"],
                           "epochs": epochs, "grid": scores}
        heads = weight.view(len(grid), -1, weight.shape[1])
        self.state_ = {"weight": heads[best].clone(), "bias": bias.view(len(grid), -1)[best].clone(), "mean": mean,
                       "std": std}
        return self

    def _schedule(self, n_train: int) -> tuple[int, int]:
        """Batch size and epochs (default: at least 5, and at least 300 steps)."""
        batch = min(self.batch_size, n_train)
        return batch, self.epochs or max(5, math.ceil(300 / math.ceil(n_train / batch)))

    @torch.inference_mode()
    def _train(self, stream: BlockStream, targets: torch.Tensor, train_rows: np.ndarray, mean: torch.Tensor,
               std: torch.Tensor, device: torch.device, batch: int, epochs: int):
        """SGD for all heads at once; returns the stacked weights [H*K, D], biases [H*K] (standardised space)."""
        rng = np.random.default_rng(self.seed)
        sgd = GridSGD(self._grid(), len(self.classes_), mean.to(device), std.to(device))
        if batch >= int(train_rows.sum()) and stream.block_rows >= stream.X.shape[0]:  # full batch, one block:
            with contextlib.closing(_training_blocks(stream, train_rows, rng, device)) as blocks:  # read once
                features, file_rows = next(blocks)
                labels = targets[file_rows].to(device)
                for epoch in range(epochs):  # a full-batch step does not depend on the rows' order
                    sgd.step(features, labels, 0.5 * (1 + math.cos(math.pi * epoch / epochs)))
            return sgd.weight.cpu(), sgd.bias.cpu()
        # the cosine follows the rows seen: each epoch's shuffled blocks cut into a slightly different step count
        total_rows, rows_seen = epochs * int(train_rows.sum()), 0
        for _ in range(epochs):
            for features, file_rows in _training_blocks(stream, train_rows, rng, device):
                labels = targets[file_rows].to(device)
                for first in range(0, len(labels), batch):
                    factor = 0.5 * (1 + math.cos(math.pi * rows_seen / total_rows))
                    sgd.step(features[first:first + batch], labels[first:first + batch], factor)
                    rows_seen += min(batch, len(labels) - first)
        return sgd.weight.cpu(), sgd.bias.cpu()

    def _score_grid(self, stacked: StandardisedLinear, blocks, targets: torch.Tensor, rows: np.ndarray) -> list[dict]:
        """Validation accuracy and loss of every head of the grid, over ``blocks`` of (features, file rows)."""
        grid, num_classes = self._grid(), len(self.classes_)
        correct, losses = np.zeros(len(grid)), np.zeros(len(grid))
        for features, file_rows in blocks:
            with torch.no_grad():
                logits = stacked(features).view(-1, len(grid), num_classes).transpose(0, 1)
            labels = targets[file_rows]
            correct += (logits.argmax(2) == labels).sum(1).numpy()
            losses += np.array([nn.functional.cross_entropy(l, labels, reduction="sum").item() for l in logits])
        count = max(int(rows.sum()), 1)
        return [{"lr": lr, "weight_decay": wd, "val_accuracy": c / count, "val_loss": l / count}
                for (lr, wd), c, l in zip(grid, correct, losses)]

    def fixed_params(self) -> dict:
        chosen = self.selection_["chosen"]
        return {**self.get_params(), "lrs": (chosen["lr"],), "weight_decays": (chosen["weight_decay"],)}

    def scaled(self, X) -> np.ndarray:
        return (np.asarray(X, np.float32) - self.state_["mean"].numpy()) / self.state_["std"].numpy()

    def to_torch(self) -> nn.Module:
        return StandardisedLinear(**self.state_)

    def decision_function(self, X) -> np.ndarray:
        module = self.to_torch()
        rows = self._block_rows(X.shape[1])
        with torch.no_grad():
            return np.concatenate([module(torch.from_numpy(np.asarray(X[a:a + rows], np.float32))).numpy()
                                   for a in range(0, X.shape[0], rows)] or [np.empty((0, 0))])

    def _save_state(self, folder: Path) -> None:
        torch.save(self.state_, folder / "model.pt")

    def _load_state(self, folder: Path, trust_pickle: bool = False) -> None:
        self.state_ = load_tensors(folder / "model.pt", "head state")
