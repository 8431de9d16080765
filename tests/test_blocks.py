"""The linear head's data stage and SGD step: direct file reads against h5py, the step against autograd."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from featx.heads.blocks import BlockStream, RowFile
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
def test_direct_reads_serve_what_h5py_serves(features, chunks, dtype, tmp_path):
    features = features.astype(dtype)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("X", data=features, chunks=chunks)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        # per mode, one stream serves every pass; the h5py path is the reference
        streams = {ahead: (BlockStream(f["X"], 700, ahead), BlockStream(f["X"], 700, ahead, direct=False))
                   for ahead in (False, True)}
        assert all(direct.source is not None for direct, _ in streams.values())
        for name, mask in MASKS.items():  # one stream per mode serves every pass
            for seed, ahead in ((None, False), (3, False), (3, True)):
                direct, through_h5py = streams[ahead]
                served = _blocks(direct.blocks(mask, seed and np.random.default_rng(seed)))
                expected = _blocks(through_h5py.blocks(mask, seed and np.random.default_rng(seed)))
                assert len(served) == len(expected)
                for (x, rows), (x_h5py, rows_h5py) in zip(served, expected):
                    np.testing.assert_array_equal(rows, rows_h5py, err_msg=name)
                    np.testing.assert_array_equal(x, x_h5py, err_msg=name)
                    np.testing.assert_array_equal(x, features[rows].astype(np.float32), err_msg=name)
                np.testing.assert_array_equal(np.sort(np.concatenate([r for _, r in served])), np.flatnonzero(mask))
                if seed is None:  # file order
                    np.testing.assert_array_equal(np.concatenate([r for _, r in served]), np.flatnonzero(mask))


@pytest.mark.parametrize("chunks", [(100, DIM), (37, DIM), None], ids=["chunks of 100", "chunks of 37", "contiguous"])
def test_mapped_rows_are_the_rows_blocks_serve(features, chunks, tmp_path):
    """``served`` gives the file rows ``blocks`` reads, in the same order; the mapped file holds those rows."""
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("X", data=features, chunks=chunks)
        f.create_dataset("half", data=features.astype(np.float16), chunks=chunks)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        stream = BlockStream(f["X"], 700)
        mapped = stream.source.map()
        assert mapped is not None and RowFile.open(f["half"]).map() is None  # float16 rows need converting
        for name, mask in MASKS.items():
            read = _blocks(stream.blocks(mask, np.random.default_rng(3)))
            served = list(stream.served(mask, np.random.default_rng(3)))
            assert len(served) == len(read)
            for rows, (x, read_rows) in zip(served, read):
                np.testing.assert_array_equal(rows, read_rows, err_msg=name)
                np.testing.assert_array_equal(mapped.data[mapped.starts(rows)[:, None] + np.arange(DIM)], x)
            mapped.release()
        mapped.close()


def test_shuffled_blocks_mix_a_class_sorted_file(tmp_path):
    labels = np.repeat(np.arange(10), 2000)  # class-sorted, as extract writes ImageFolder classes
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("X", data=np.zeros((len(labels), 8), np.float32), chunks=(256, 8))
    with h5py.File(tmp_path / "f.h5", "r") as f:
        blocks = BlockStream(f["X"], 4096).blocks(np.ones(len(labels), bool), np.random.default_rng(0))
        batches = [labels[rows[a:a + 256]] for _, rows in blocks for a in range(0, len(rows), 256)]
    assert np.median([len(np.unique(batch)) for batch in batches]) >= 3


def test_row_file_declines_what_it_cannot_read_directly(features, tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("gzip", data=features, chunks=(100, DIM), compression="gzip")
        f.create_dataset("double", data=features.astype(np.float64), chunks=(100, DIM))
        f.create_dataset("big-endian", data=features.astype(">f4"), chunks=(100, DIM))
        f.create_dataset("narrow chunks", data=features, chunks=(100, 8))
        f.create_dataset("plain", data=features, chunks=(100, DIM))
    with h5py.File(tmp_path / "f.h5", "r") as f:
        for name in ("gzip", "double", "big-endian", "narrow chunks"):
            assert RowFile.open(f[name]) is None, name
            rows = np.concatenate([r for _, r in BlockStream(f[name], 700).blocks(MASKS["random 80%"])])
            np.testing.assert_array_equal(rows, np.flatnonzero(MASKS["random 80%"]))
        assert RowFile.open(f["plain"]) is not None
    with h5py.File(tmp_path / "f.h5", "r+") as f:  # a file open for writing may hold rows not yet on disk
        assert RowFile.open(f["plain"]) is None
    assert RowFile.open(features) is None


def test_row_file_reads_rows_into_scattered_places(features, tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("X", data=features, chunks=(64, DIM))
    with h5py.File(tmp_path / "f.h5", "r") as f:
        source = RowFile.open(f["X"])
    rows = np.concatenate([np.arange(100, 400), np.arange(4000, 4100), np.arange(10, 20)])
    dest = np.random.default_rng(0).permutation(len(rows))
    dest[::7] = -1  # short gaps: read into scratch; a long one: not read
    dest[150:250] = -1
    out = np.full((len(rows), DIM), np.nan, np.float32)
    source.read(rows, dest, out, workers=2)
    np.testing.assert_array_equal(out[dest[dest >= 0]], features[rows[dest >= 0]])
    with pytest.raises(ValueError, match="destination"):
        source.read(rows, np.arange(len(rows)), out[:10])


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


def test_fused_kernel_step_matches_the_torch_step():
    """The C kernel vs GridSGD's PyTorch ops: three heads (decay on two), odd batch sizes, a falling lr."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(1.0, 2.0, (1000, 48)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 5, 1000))
    mean, std = x.mean(0), x.std(0)
    grid = [(0.05, 0.0), (0.2, 1e-3), (0.5, 1e-2)]
    reference, fused = GridSGD(grid, 5, mean, std), GridSGD(grid, 5, mean, std, fused=True)
    for step, first in enumerate(range(0, 1000, 203)):  # 203 rows: shares of 101/102, not whole tiles
        for sgd in (reference, fused):
            sgd.step(x[first:first + 203], labels[first:first + 203], 1.0 - step / 8)
    torch.testing.assert_close(fused.weight, reference.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused.bias, reference.bias, rtol=1e-4, atol=1e-6)
    assert reference.weight.abs().max() > 0.05


def test_fused_softmax_matches_torch_on_extreme_logits():
    """The kernel's tile softmax (its own exp) vs a float64 softmax: 400 heads of 5 classes, logits from -200 to
    200, a part tile (its other columns zeroed); probabilities within 2e-6 relative (or 1e-9), the label's p - 1
    within 2e-7."""
    from featx.heads.fused import TILE, softmax_minus_onehot

    rng = np.random.default_rng(2)
    heads, classes, count = 400, 5, TILE - 3
    logits = (rng.normal(0, 1, (heads * classes, TILE)) * rng.choice([0.01, 1, 30, 200], (heads * classes, TILE)))
    labels = rng.integers(0, classes, TILE)
    error = logits.astype(np.float32)
    softmax_minus_onehot(error, labels, count, classes)
    expected = torch.from_numpy(logits.astype(np.float32).astype(np.float64).T[:count]).view(count, heads, classes)
    expected = expected.softmax(2)
    got = torch.from_numpy(error.T[:count].astype(np.float64)).view(count, heads, classes)
    is_label = torch.zeros_like(got, dtype=torch.bool)
    is_label[torch.arange(count), :, torch.from_numpy(labels[:count])] = True
    torch.testing.assert_close(got[~is_label], expected[~is_label], rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(got[is_label], expected[is_label] - 1, rtol=0, atol=2e-7)
    assert not error[:, count:].any()


def test_fused_fit_on_mapped_rows_matches_the_block_reader(tmp_path):
    """A fused-kernel fit reading rows through the memory map (uncompressed file) equals one reading them through
    blocks (the same rows in a gzip file, which cannot be mapped)."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 3000)
    x = (rng.normal(0, 1, (3, 16))[labels] + rng.normal(0, 1.5, (3000, 16))).astype(np.float32)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("plain", data=x, chunks=(100, 16))
        f.create_dataset("gzip", data=x, chunks=(100, 16), compression="gzip")
    heads = {}
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert RowFile.open(f["plain"]).map() is not None and RowFile.open(f["gzip"]) is None
        for name in ("plain", "gzip"):
            heads[name] = LinearHead(lrs=[0.1], weight_decays=[0.0, 1e-3], epochs=3, block_rows=700,
                                     kernel="fused").fit(f[name], labels)
    for key in ("weight", "bias"):
        torch.testing.assert_close(heads["plain"].state_[key], heads["gzip"].state_[key], rtol=1e-6, atol=1e-7)
    assert heads["plain"].selection_ == heads["gzip"].selection_ and heads["plain"].selection_["val_accuracy"] > 0.7
