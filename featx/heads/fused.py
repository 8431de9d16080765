"""The ``linear`` head's SGD step as one compiled CPU kernel (numba), for long fits.

PyTorch runs ``GridSGD.step`` as ~20 ops, each paying its dispatch (370–430 µs a call on 2 cores), and its two
products with K = 10 outputs at under half the matmul ceiling (``benchmarks/ceilings.py``). This kernel computes
the same step in one call: four rows at a time, each weight load serves four dot products and each gradient
update four rows, on all cores. It is compiled on first use and cached on disk (numba's ``cache=True``).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

ROWS_AT_ONCE = 4


@njit(fastmath=True, cache=True)
def _softmax_minus_onehot(logits: np.ndarray, label: int, num_classes: int) -> None:
    """In place, per head of ``num_classes`` logits: softmax minus the one-hot of ``label``."""
    for head in range(0, len(logits), num_classes):
        top = logits[head]
        for k in range(1, num_classes):
            top = max(top, logits[head + k])
        total = 0.0
        for k in range(num_classes):
            logits[head + k] = np.exp(logits[head + k] - top)
            total += logits[head + k]
        for k in range(num_classes):
            logits[head + k] /= total
        logits[head + label] -= 1.0


@njit(parallel=True, fastmath=True, cache=True)
def _step(data, starts, dim, labels, weight, bias, weight_velocity, bias_velocity, mean, std, lr, decay, lr_factor,
          num_classes, momentum, partial_grads, partial_sums):
    rows = len(starts)  # row r is data[starts[r]:starts[r] + dim]
    outputs, workers = weight.shape[0], partial_grads.shape[0]
    scale = np.empty((outputs, dim), np.float32)  # logits = x @ scale.T + shift (the standardisation folded in)
    shift = np.empty(outputs, np.float32)
    for j in prange(outputs):
        total = bias[j]
        for d in range(dim):
            scale[j, d] = weight[j, d] / std[d]
            total -= scale[j, d] * mean[d]
        shift[j] = total
    for worker in prange(workers):  # each worker sums error.T @ x over its share of the rows
        grad, grad_sum = partial_grads[worker], partial_sums[worker]
        grad[:] = 0
        grad_sum[:] = 0
        error = np.empty((ROWS_AT_ONCE, outputs), np.float32)
        first, stop = worker * rows // workers, (worker + 1) * rows // workers
        for r in range(first, stop, ROWS_AT_ONCE):  # past the share's end, its last row stands in, with no error
            last = stop - 1
            a0, a1, a2, a3 = starts[r], starts[min(r + 1, last)], starts[min(r + 2, last)], starts[min(r + 3, last)]
            x0, x1, x2, x3 = data[a0:a0 + dim], data[a1:a1 + dim], data[a2:a2 + dim], data[a3:a3 + dim]
            for j in range(outputs):
                s0 = s1 = s2 = s3 = shift[j]
                for d in range(dim):
                    w = scale[j, d]
                    s0 += w * x0[d]
                    s1 += w * x1[d]
                    s2 += w * x2[d]
                    s3 += w * x3[d]
                error[0, j], error[1, j], error[2, j], error[3, j] = s0, s1, s2, s3
            for i in range(ROWS_AT_ONCE):
                if r + i < stop:
                    _softmax_minus_onehot(error[i], labels[r + i], num_classes)
                else:
                    error[i, :] = 0
            for j in range(outputs):
                e0, e1, e2, e3 = error[0, j], error[1, j], error[2, j], error[3, j]
                grad_sum[j] += e0 + e1 + e2 + e3
                row = grad[j]
                for d in range(dim):
                    row[d] += e0 * x0[d] + e1 * x1[d] + e2 * x2[d] + e3 * x3[d]
    for j in prange(outputs):  # GridSGD's update: gradient in standardised space, decay on weights, momentum
        grad = partial_grads[0, j]
        bias_grad = partial_sums[0, j]
        for worker in range(1, workers):
            bias_grad += partial_sums[worker, j]
            other = partial_grads[worker, j]
            for d in range(dim):
                grad[d] += other[d]
        bias_grad /= rows
        step = lr_factor * lr[j]
        for d in range(dim):
            g = (grad[d] / rows - bias_grad * mean[d]) / std[d] + decay[j] * weight[j, d]
            weight_velocity[j, d] = momentum * weight_velocity[j, d] + g
            weight[j, d] -= step * weight_velocity[j, d]
        bias_velocity[j] = momentum * bias_velocity[j] + bias_grad
        bias[j] -= step * bias_velocity[j]


@njit(parallel=True, cache=True)
def _gather(data, starts, out):
    dim = out.shape[1]
    for i in prange(len(starts)):
        out[i, :] = data[starts[i]:starts[i] + dim]


def gather_rows(data: np.ndarray, starts: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Rows ``data[starts[i]:starts[i] + D]`` into ``out[:len(starts)]`` [n, D], on all cores; returns that slice."""
    _gather(data, np.ascontiguousarray(starts, np.int64), out[:len(starts)])
    return out[:len(starts)]


class FusedStep:
    """``GridSGD.step`` on CPU in one kernel call; updates the given parameter tensors in place."""

    def __init__(self, weight, bias, weight_velocity, bias_velocity, mean, std, lr, decay, num_classes: int,
                 momentum: float):
        arrays = [t.numpy() for t in (weight, bias, weight_velocity, bias_velocity, mean, std)]
        self.arrays = arrays + [np.ascontiguousarray(t.numpy().ravel()) for t in (lr, decay)]
        self.num_classes, self.momentum, self.dim = num_classes, momentum, weight.shape[1]
        workers = numba.get_num_threads()
        self.partial_grads = np.empty((workers, *weight.shape), np.float32)
        self.partial_sums = np.empty((workers, weight.shape[0]), np.float32)

    def __call__(self, x, labels, lr_factor: float) -> None:
        """One step on rows ``x``: a [B, D] tensor, or ``(data, starts)``, rows ``data[starts[i]:starts[i] + D]``
        of one float32 array (e.g. a memory-mapped file)."""
        if isinstance(x, tuple):
            data, starts = x
        else:
            rows = np.ascontiguousarray(x.numpy())
            data, starts = rows.reshape(-1).view(), np.arange(len(rows)) * self.dim
            data.flags.writeable = False  # typed as a read-only map is: one compiled signature serves both
        _step(data, np.ascontiguousarray(starts, np.int64), self.dim, np.ascontiguousarray(labels.numpy(), np.int64),
              *self.arrays, float(lr_factor), self.num_classes, self.momentum, self.partial_grads, self.partial_sums)
