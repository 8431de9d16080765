"""The ``linear`` head's SGD step as one compiled CPU call (``_fused.c``, built at install time, loaded by ctypes).

PyTorch runs ``GridSGD.step`` as ~20 ops, each paying its dispatch (~100–400 µs a call on 2 cores), and its two
products with K = 10 outputs at under half the matmul ceiling (``benchmarks/ceilings.py``). The C kernel computes
the same step in one call, on all cores, a tile of eight rows at a time: each weight load serves eight dot products,
each gradient update eight rows, and the softmax runs along the tile (vectorised, exp included). ctypes releases
the GIL for the call. ``available()`` is False where the library was not built (no C compiler at install).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

import numpy as np
import torch

TILE = 8  # rows at once, as in _fused.c
MAX_WORKERS = 64  # as in _fused.c


def _load() -> ctypes.CDLL | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(__file__).with_name("_fused" + suffix)
        if path.exists():
            library = ctypes.CDLL(str(path))
            pointer, size = ctypes.c_void_p, ctypes.c_int64
            library.featx_sgd_step.argtypes = ([pointer, pointer, size, size, pointer] + [pointer] * 8
                                               + [ctypes.c_float, size, size, ctypes.c_float, ctypes.c_int]
                                               + [pointer] * 5)
            library.featx_sgd_step.restype = ctypes.c_int
            library.featx_gather_rows.argtypes = [pointer, pointer, size, size, pointer]
            library.featx_softmax_minus_onehot.argtypes = [pointer, pointer, size, size, size]
            return library
    return None


_LIBRARY = _load()


def available() -> bool:
    """Whether the compiled kernel is there (built by ``pip install``)."""
    return _LIBRARY is not None


def _address(array: np.ndarray, dtype) -> int:
    assert array.dtype == dtype and array.flags.c_contiguous, (array.dtype, array.flags)
    return array.ctypes.data


def _row_starts(data: np.ndarray, starts: np.ndarray, dim: int) -> np.ndarray:
    """``starts`` as contiguous int64, checked so that every row ``data[start:start + dim]`` lies inside ``data``
    (the C code does not check)."""
    starts = np.ascontiguousarray(starts, np.int64)
    if len(starts) and (starts.min() < 0 or starts.max() + dim > len(data)):
        raise IndexError("row starts fall outside the data")
    return starts


def gather_rows(data: np.ndarray, starts: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Rows ``data[starts[i]:starts[i] + D]`` into ``out[:len(starts)]`` [n, D]; returns that slice."""
    starts = _row_starts(data, starts, out.shape[1])
    _LIBRARY.featx_gather_rows(_address(data, np.float32), _address(starts, np.int64), len(starts), out.shape[1],
                               _address(out, np.float32))
    return out[:len(starts)]


def softmax_minus_onehot(error: np.ndarray, labels: np.ndarray, count: int, num_classes: int) -> None:
    """The kernel's softmax, in place on one tile of logits ``error`` [outputs, TILE] (exposed for tests)."""
    assert error.shape[1] == TILE and count <= TILE
    labels = np.ascontiguousarray(labels, np.int64)
    _LIBRARY.featx_softmax_minus_onehot(_address(error, np.float32), _address(labels, np.int64), count,
                                        error.shape[0], num_classes)


class FusedStep:
    """``GridSGD.step`` on CPU in one kernel call; updates the given parameter tensors in place."""

    def __init__(self, weight, bias, weight_velocity, bias_velocity, mean, std, lr, decay, num_classes: int,
                 momentum: float):
        if _LIBRARY is None:
            raise RuntimeError("featx's compiled kernel (featx/heads/_fused.c) is not built: reinstall featx with a "
                               "C compiler present (pip install -e .), or use kernel='torch'")
        self.arrays = [t.numpy() for t in (weight, bias, weight_velocity, bias_velocity, mean, std)]
        self.arrays += [np.ascontiguousarray(t.numpy().ravel()) for t in (lr, decay)]  # kept alive: passed by address
        self.addresses = [_address(a, np.float32) for a in self.arrays]
        self.num_classes, self.momentum = num_classes, momentum
        self.outputs, self.dim = weight.shape
        self.workers = max(1, min(torch.get_num_threads(), MAX_WORKERS))
        shapes = [(self.workers, self.outputs, self.dim), (self.workers, self.outputs), (self.outputs, self.dim),
                  (self.outputs,), (self.workers, self.outputs, TILE)]  # featx_sgd_step's scratch, in its order
        self.scratch = [np.empty(shape, np.float32) for shape in shapes]
        self.scratch_addresses = [a.ctypes.data for a in self.scratch]

    def __call__(self, x, labels, lr_factor: float) -> None:
        """One step on rows ``x``: a [B, D] tensor, or ``(data, starts)``, rows ``data[starts[i]:starts[i] + D]``
        of one float32 array (e.g. a memory-mapped file)."""
        if isinstance(x, tuple):
            data, starts = x[0], _row_starts(*x, self.dim)
        else:
            data = np.ascontiguousarray(x.numpy(), np.float32)
            starts = np.arange(len(data), dtype=np.int64) * self.dim
        labels = np.ascontiguousarray(labels.numpy(), np.int64)
        if len(labels) != len(starts) or (len(labels) and not 0 <= labels.min() <= labels.max() < self.num_classes):
            raise ValueError("labels must be class indices, one per row")
        status = _LIBRARY.featx_sgd_step(
            _address(data, np.float32), starts.ctypes.data, len(starts), self.dim, labels.ctypes.data, *self.addresses,
            float(lr_factor), self.outputs, self.num_classes, self.momentum, self.workers, *self.scratch_addresses)
        if status:
            raise ValueError(f"featx_sgd_step refused its arguments ({len(starts)} rows, {self.outputs} outputs, "
                             f"{self.num_classes} classes, {self.workers} workers)")
