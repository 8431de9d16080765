"""``linear``: torch nn.Linear heads, a grid of learning rates x weight decays trained together in one pass.

X may be an ``h5py.Dataset`` larger than memory: it is streamed in blocks of about ``BLOCK_BYTES`` by a
background thread while the main thread trains, so memory is bounded by the block size, not N. Each block
joins a few contiguous runs from random places (class-sorted files still mix) and is shuffled in short row
groups. The gradient is computed in closed form for all heads at once, in the standardised feature space
without standardising the rows. The head with the best validation accuracy wins (as in DINOv2's linear
evaluation).
"""

from __future__ import annotations

import math
import queue
import threading
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from featx.embed import resolve_device
from featx.heads.base import Head, check_grid, check_positive

BLOCK_BYTES = 128 << 20  # float32 features per block; a reading, a queued and a training block are alive at once
RUNS_PER_BLOCK = 8  # a block joins this many contiguous runs from random places
GROUP_ROWS = 16  # rows are shuffled in groups this long (near-sequential copies), then batches are cut
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


def _read(X, start: int, stop: int, out: np.ndarray, offset: int) -> None:
    """Rows start:stop of X into out[offset:], without a temporary for HDF5 datasets."""
    if isinstance(X, h5py.Dataset):
        X.read_direct(out, np.s_[start:stop], np.s_[offset:offset + stop - start])
    else:
        out[offset:offset + stop - start] = X[start:stop]


def _group_shuffle(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``rows`` reordered by a random permutation of consecutive groups of GROUP_ROWS."""
    groups = -(-len(rows) // GROUP_ROWS)
    padded = np.full(groups * GROUP_ROWS, -1)
    padded[:len(rows)] = rows
    shuffled = padded.reshape(groups, GROUP_ROWS)[rng.permutation(groups)].ravel()
    return shuffled[shuffled >= 0]


class BlockStream:
    """Iterates (features float32 [n, D], row indices [n]) over the rows of X where ``mask`` is true.

    With a generator, blocks join RUNS_PER_BLOCK runs in random order and rows are group-shuffled; without
    one, rows come in file order. A background thread reads the next block while the caller uses this one.
    """

    def __init__(self, X, mask: np.ndarray, block_rows: int, rng: np.random.Generator | None = None):
        self.X, self.mask, self.rng = X, mask, rng
        runs = RUNS_PER_BLOCK if rng is not None else 1
        run_rows = max(1, -(-min(block_rows, X.shape[0]) // runs))
        starts = np.arange(0, X.shape[0], run_rows)
        if rng is not None:
            starts = rng.permutation(starts)
        self.blocks = [[(s, min(s + run_rows, X.shape[0])) for s in starts[i:i + runs]]
                       for i in range(0, len(starts), runs)]
        self.capacity = run_rows * runs

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            dim = self.X.shape[1]
            buffer = np.empty((self.capacity, dim), np.float32)
            pool = [torch.empty(self.capacity, dim) for _ in range(3)]  # see __iter__: 3 are never in use at once
            for number, runs in enumerate(self.blocks):
                offset, rows = 0, []
                for start, stop_row in runs:
                    _read(self.X, start, stop_row, buffer, offset)
                    rows.append(offset + np.flatnonzero(self.mask[start:stop_row]))
                    offset += stop_row - start
                local = np.concatenate(rows)
                if self.rng is not None:
                    local = _group_shuffle(local, self.rng)
                file_rows = np.concatenate([np.arange(a, b) for a, b in runs])[local]
                features = pool[number % 3][:len(local)]
                torch.index_select(torch.from_numpy(buffer), 0, torch.from_numpy(local), out=features)
                while not stop.is_set():
                    try:
                        out.put((features, file_rows), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(None)
        except BaseException as error:  # noqa: BLE001 - handed to the consuming thread, which raises it
            out.put(error)

    def __iter__(self):
        # One queued block + one being used + one being filled: a pool of three buffers is never overwritten early.
        blocks: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(blocks, stop), daemon=True)
        thread.start()
        try:
            while (item := blocks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


class GridSGD:
    """SGD with momentum for a grid of (lr, weight decay) softmax heads stacked along one weight's rows.

    The gradient of the mean cross-entropy is closed-form and taken in the standardised space
    ``(x - mean) / std`` without standardising the rows; weight decay applies to the weights only.
    """

    def __init__(self, grid: list[tuple[float, float]], num_classes: int, mean: torch.Tensor, std: torch.Tensor):
        device, rows = mean.device, len(grid) * num_classes
        self.num_classes, self.mean, self.std = num_classes, mean, std
        self.lr = torch.tensor([lr for lr, _ in grid], device=device).repeat_interleave(num_classes)
        self.decay = torch.tensor([wd for _, wd in grid], device=device).repeat_interleave(num_classes)[:, None]
        self.weight, self.bias = torch.zeros(rows, len(mean), device=device), torch.zeros(rows, device=device)
        self.weight_velocity, self.bias_velocity = torch.zeros_like(self.weight), torch.zeros_like(self.bias)

    @torch.inference_mode()
    def step(self, x: torch.Tensor, label: torch.Tensor, lr_factor: float) -> None:
        """One step on raw features ``x`` [B, D] with class indices ``label`` [B], at ``lr_factor`` x the lrs."""
        # logits of the standardised x, from raw x: x @ (W / std).T + (b - (W / std) @ mean)
        scale = self.weight / self.std
        logits = torch.addmm(self.bias - scale @ self.mean, x, scale.T).view(len(x), -1, self.num_classes)
        probs = logits.softmax(2)
        probs -= nn.functional.one_hot(label, self.num_classes).to(probs.dtype).unsqueeze(1)
        grad = probs.view(len(x), -1).div_(len(x))  # d(mean cross-entropy)/d logits, per head
        bias_grad = grad.sum(0)
        weight_grad = (grad.T @ x - bias_grad[:, None] * self.mean) / self.std
        weight_grad.addcmul_(self.weight, self.decay)
        self.weight_velocity.mul_(MOMENTUM).add_(weight_grad)
        self.bias_velocity.mul_(MOMENTUM).add_(bias_grad)
        self.weight.addcmul_(self.weight_velocity, (self.lr * lr_factor)[:, None], value=-1)
        self.bias.addcmul_(self.bias_velocity, self.lr * lr_factor, value=-1)


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

    def _moments(self, X, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the training rows, estimated on the first shuffled block (the scale SGD needs)."""
        rng = np.random.default_rng(self.seed)
        features, _ = next(iter(BlockStream(X, rows, self._block_rows(X.shape[1]), rng)))
        features = features.double()
        return features.mean(0).float(), (features.std(0, correction=0) + 1e-6).float()

    def fit(self, X, y, X_val=None, y_val=None, groups=None):
        """Train every (lr, weight decay) head on X, pick the best on validation. X may be an h5py.Dataset."""
        self._validate()
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        targets = torch.from_numpy(np.searchsorted(self.classes_, y))
        train_rows = np.ones(len(y), bool)
        if X_val is None:
            train_rows = ~self._holdout(y, groups)
            X_val, val_rows, val_targets = X, ~train_rows, targets
        else:
            val_rows = np.ones(X_val.shape[0], bool)
            val_targets = torch.from_numpy(np.searchsorted(self.classes_, np.asarray(y_val)))
        mean, std = self._moments(X, train_rows)
        weight, bias, epochs = self._train(X, targets, train_rows, mean, std)
        scores = self._score_grid(StandardisedLinear(weight, bias, mean, std), X_val, val_targets, val_rows)
        grid = self._grid()
        best = max(range(len(grid)), key=lambda i: (scores[i]["val_accuracy"], -scores[i]["val_loss"]))
        self.selection_ = {"parameter": "lr, weight_decay", "chosen": {"lr": grid[best][0],
                           "weight_decay": grid[best][1]}, "val_accuracy": scores[best]["val_accuracy"],
                           "epochs": epochs, "grid": scores}
        heads = weight.view(len(grid), -1, weight.shape[1])
        self.state_ = {"weight": heads[best].clone(), "bias": bias.view(len(grid), -1)[best].clone(), "mean": mean,
                       "std": std}
        return self

    @torch.inference_mode()
    def _train(self, X, targets: torch.Tensor, train_rows: np.ndarray, mean: torch.Tensor, std: torch.Tensor):
        """SGD for all heads at once; returns the stacked weights [H*K, D], biases [H*K] (standardised space)."""
        device = resolve_device(self.device)
        sgd = GridSGD(self._grid(), len(self.classes_), mean.to(device), std.to(device))
        rng = np.random.default_rng(self.seed)
        n_train = int(train_rows.sum())
        batch = min(self.batch_size, n_train)
        epochs = self.epochs or max(5, math.ceil(300 / math.ceil(n_train / batch)))
        # the cosine follows the rows seen: each epoch's shuffled blocks cut into a slightly different step count
        total_rows, rows_seen = epochs * n_train, 0
        for _ in range(epochs):
            for features, file_rows in BlockStream(X, train_rows, self._block_rows(X.shape[1]), rng):
                features = features.to(device, non_blocking=True)
                labels = targets[file_rows].to(device)
                for first in range(0, len(labels), batch):
                    x, label = features[first:first + batch], labels[first:first + batch]
                    sgd.step(x, label, 0.5 * (1 + math.cos(math.pi * rows_seen / total_rows)))
                    rows_seen += len(x)
        return sgd.weight.cpu(), sgd.bias.cpu(), epochs

    def _score_grid(self, stacked: StandardisedLinear, X, targets: torch.Tensor, rows: np.ndarray) -> list[dict]:
        """Validation accuracy and loss of every head of the grid."""
        grid, num_classes = self._grid(), len(self.classes_)
        correct, losses = np.zeros(len(grid)), np.zeros(len(grid))
        for features, file_rows in BlockStream(X, rows, self._block_rows(X.shape[1])):
            with torch.no_grad():
                logits = stacked(features).view(-1, len(grid), num_classes).transpose(0, 1)
            labels = targets[file_rows]
            correct += (logits.argmax(2) == labels).sum(1).numpy()
            losses += np.array([nn.functional.cross_entropy(l, labels, reduction="sum").item() for l in logits])
        count = max(int(rows.sum()), 1)
        return [{"lr": lr, "weight_decay": wd, "val_accuracy": c / count, "val_loss": l / count}
                for (lr, wd), c, l in zip(grid, correct, losses)]

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

    def _load_state(self, folder: Path) -> None:
        self.state_ = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
