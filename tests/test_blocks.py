"""The linear head's data stage and SGD step: blocks against the rows they stand for, the step against autograd."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from featx.heads.blocks import BlockStream
from featx.heads.linear import MOMENTUM, GridSGD, LinearHead

ROWS, DIM = 5000, 24
MASKS = {"all": np.ones(ROWS, bool), "random 80%": np.random.default_rng(1).random(ROWS) < 0.8,
         "first 3000": np.arange(ROWS) < 3000, "random 10%": np.random.default_rng(2).random(ROWS) < 0.1}


@pytest.fixture(scope="module")
def features():
    return np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)


def _blocks(blocks) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy().copy(), rows) for x, rows in blocks]


@pytest.mark.parametrize("chunks, dtype", [((100, DIM), "float32"), ((37, DIM), "float32"), (None, "float32"),
                                          ((100, DIM), "float16")],
                         ids=["chunks of 100", "chunks of 37", "contiguous", "float16 file"])
def test_blocks_serve_each_masked_row_once(features, chunks, dtype, tmp_path):
    """Every masked row once, its stored values as float32, in file order without a generator; an HDF5 dataset and
    the same rows in memory are served alike (same rows, same order)."""
    features = features.astype(dtype)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("X", data=features, chunks=chunks)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        streams = {ahead: (BlockStream(f["X"], 700, ahead), BlockStream(features, 700, ahead))
                   for ahead in (False, True)}
        for name, mask in MASKS.items():  # one stream per mode serves every pass
            for seed, ahead in ((None, False), (3, False), (3, True)):
                from_file, in_memory = streams[ahead]
                served = _blocks(from_file.blocks(mask, seed and np.random.default_rng(seed)))
                expected = _blocks(in_memory.blocks(mask, seed and np.random.default_rng(seed)))
                assert len(served) == len(expected)
                for (x, rows), (x_memory, rows_memory) in zip(served, expected):
                    np.testing.assert_array_equal(rows, rows_memory, err_msg=name)
                    np.testing.assert_array_equal(x, x_memory, err_msg=name)
                    np.testing.assert_array_equal(x, features[rows].astype(np.float32), err_msg=name)
                np.testing.assert_array_equal(np.sort(np.concatenate([r for _, r in served])), np.flatnonzero(mask))
                if seed is None:  # file order
                    np.testing.assert_array_equal(np.concatenate([r for _, r in served]), np.flatnonzero(mask))


def test_shuffled_blocks_mix_a_class_sorted_file(tmp_path):
    labels = np.repeat(np.arange(10), 2000)  # class-sorted, as extract writes ImageFolder classes
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("X", data=np.zeros((len(labels), 8), np.float32), chunks=(256, 8))
    with h5py.File(tmp_path / "f.h5", "r") as f:
        blocks = BlockStream(f["X"], 4096).blocks(np.ones(len(labels), bool), np.random.default_rng(0))
        batches = [labels[rows[a:a + 256]] for _, rows in blocks for a in range(0, len(rows), 256)]
    assert np.median([len(np.unique(batch)) for batch in batches]) >= 3


def test_any_storage_serves_the_same_rows(features, tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("gzip", data=features, chunks=(100, DIM), compression="gzip")
        f.create_dataset("double", data=features.astype(np.float64), chunks=(100, DIM))
        f.create_dataset("big-endian", data=features.astype(">f4"), chunks=(100, DIM))
        f.create_dataset("narrow chunks", data=features, chunks=(100, 8))
    with h5py.File(tmp_path / "f.h5", "r") as f:
        for name in ("gzip", "double", "big-endian", "narrow chunks"):
            blocks = _blocks(BlockStream(f[name], 700).blocks(MASKS["random 80%"], np.random.default_rng(5)))
            rows = np.concatenate([r for _, r in blocks])
            np.testing.assert_array_equal(np.sort(rows), np.flatnonzero(MASKS["random 80%"]))
            np.testing.assert_array_equal(np.concatenate([x for x, _ in blocks]), features[rows], err_msg=name)


def test_a_fit_does_not_depend_on_how_the_rows_are_stored(tmp_path):
    """The same rows in an uncompressed and a gzip file: the same head, bit for bit."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 3000)
    x = (rng.normal(0, 1, (3, 16))[labels] + rng.normal(0, 1.5, (3000, 16))).astype(np.float32)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("plain", data=x, chunks=(100, 16))
        f.create_dataset("gzip", data=x, chunks=(100, 16), compression="gzip")
    heads = {}
    with h5py.File(tmp_path / "f.h5", "r") as f:
        for name in ("plain", "gzip"):
            head = LinearHead(lrs=[0.1], weight_decays=[0.0, 1e-3], epochs=3, block_rows=700)
            heads[name] = head.fit(f[name], labels)
    for key in ("weight", "bias"):
        torch.testing.assert_close(heads["plain"].state_[key], heads["gzip"].state_[key], rtol=0, atol=0)
    assert heads["plain"].selection_ == heads["gzip"].selection_ and heads["plain"].selection_["val_accuracy"] > 0.7


def test_grid_sgd_step_matches_autograd():
    """Closed-form steps of two heads vs torch autograd + torch.optim.SGD on the standardised features."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(2.0, 3.0, (600, 20)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 4, 600))
    mean, std = x.mean(0), x.std(0)
    grid = [(0.1, 0.0), (0.5, 0.01)]
    sgd = GridSGD(grid, 4, mean, std)
    models = [nn.Linear(20, 4) for _ in grid]
    optimizers = []
    for model, (lr, decay) in zip(models, grid):
        nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
        optimizers.append(torch.optim.SGD([{"params": [model.weight], "weight_decay": decay},
                                           {"params": [model.bias], "weight_decay": 0.0}], lr=lr, momentum=MOMENTUM))
    for step, first in enumerate(range(0, 600, 128)):  # the last batch is short
        factor = 1.0 - step / 10
        sgd.step(x[first:first + 128], labels[first:first + 128], factor)
        for model, optimizer, (lr, _) in zip(models, optimizers, grid):
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model((x[first:first + 128] - mean) / std), labels[first:first + 128])
            loss.backward()
            optimizer.step()
    for head, model in enumerate(models):
        torch.testing.assert_close(sgd.weight[4 * head:4 * head + 4], model.weight.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sgd.bias[4 * head:4 * head + 4], model.bias.detach(), rtol=1e-4, atol=1e-5)
    assert sgd.weight.abs().max() > 0.05  # the heads moved
