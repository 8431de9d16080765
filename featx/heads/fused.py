"""The ``linear`` head's SGD step as one compiled CPU kernel (numba), for long fits.

PyTorch runs ``GridSGD.step`` as ~20 ops, each paying its dispatch (370–430 µs a call on 2 cores), and its two
products with K = 10 outputs at under half the matmul ceiling (``benchmarks/ceilings.py``). This kernel computes
the same step in one call, on all cores, a tile of eight rows at a time: each weight load serves eight dot products,
each gradient update eight rows, and the softmax runs along the tile (vectorised, exp included). It is compiled on
first use and cached on disk (numba's ``cache=True``).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

TILE = 8  # rows at once: each weight load serves eight dot products, each gradient update eight rows
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453


@njit(fastmath=True, cache=True)
def _softmax_minus_onehot(error, labels, count, num_classes, top, total, bits):
    """In place on a tile of logits ``error`` [outputs, TILE], per head of ``num_classes`` rows: softmax minus the
    one-hot of ``labels`` for the tile's first ``count`` columns; the other columns (no row) become 0. Every loop
    runs along the tile, so it is vectorised; exp is computed as 2**n * exp(g), |g| <= ln2 / 2, by a degree-6
    Taylor polynomial (relative error < 2e-7) and the exponent bits (``bits``, seen as float32)."""
    powers = bits.view(np.float32)
    for head in range(0, error.shape[0], num_classes):
        for i in range(TILE):
            top[i], total[i] = error[head, i], 0.0
        for k in range(head + 1, head + num_classes):
            for i in range(TILE):
                top[i] = max(top[i], error[k, i])
        for k in range(head, head + num_classes):
            for i in range(TILE):
                t = max(error[k, i] - top[i], np.float32(-87.0)) * np.float32(LOG2E)
                n = np.floor(t + np.float32(0.5))
                g = (t - n) * np.float32(LN2)
                error[k, i] = np.float32(1) + g * (np.float32(1) + g * (np.float32(1 / 2) + g * (np.float32(1 / 6) + g * (
                    np.float32(1 / 24) + g * (np.float32(1 / 120) + g * np.float32(1 / 720))))))
                bits[i] = (np.int32(n) + np.int32(127)) << np.int32(23)  # 2**n as float32 bits
            for i in range(TILE):
                error[k, i] *= powers[i]
                total[i] += error[k, i]
        for i in range(TILE):
            total[i] = np.float32(1) / total[i]
        for k in range(head, head + num_classes):
            for i in range(TILE):
                error[k, i] *= total[i]
        for i in range(count):
            error[head + labels[i], i] -= np.float32(1)
    for i in range(count, TILE):
        error[:, i] = 0


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
    for worker in prange(workers):  # each worker sums error.T @ x over its share of the rows, a tile at a time
        grad, grad_sum = partial_grads[worker], partial_sums[worker]
        grad[:] = 0
        grad_sum[:] = 0
        error = np.empty((outputs, TILE), np.float32)
        top, total, bits = np.empty(TILE, np.float32), np.empty(TILE, np.float32), np.empty(TILE, np.int32)
        first, stop = worker * rows // workers, (worker + 1) * rows // workers
        last = stop - 1
        for r in range(first, stop, TILE):  # past the share's end, its last row stands in, with no error
            a0, a1, a2, a3 = starts[r], starts[min(r + 1, last)], starts[min(r + 2, last)], starts[min(r + 3, last)]
            a4, a5 = starts[min(r + 4, last)], starts[min(r + 5, last)]
            a6, a7 = starts[min(r + 6, last)], starts[min(r + 7, last)]
            x0, x1, x2, x3 = data[a0:a0 + dim], data[a1:a1 + dim], data[a2:a2 + dim], data[a3:a3 + dim]
            x4, x5, x6, x7 = data[a4:a4 + dim], data[a5:a5 + dim], data[a6:a6 + dim], data[a7:a7 + dim]
            for j in range(outputs):
                s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = shift[j]
                w_row = scale[j]
                for d in range(dim):
                    w = w_row[d]
                    s0 += w * x0[d]
                    s1 += w * x1[d]
                    s2 += w * x2[d]
                    s3 += w * x3[d]
                    s4 += w * x4[d]
                    s5 += w * x5[d]
                    s6 += w * x6[d]
                    s7 += w * x7[d]
                out = error[j]
                out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7] = s0, s1, s2, s3, s4, s5, s6, s7
            _softmax_minus_onehot(error, labels[r:r + TILE], min(TILE, stop - r), num_classes, top, total, bits)
            for j in range(outputs):
                e = error[j]
                e0, e1, e2, e3, e4, e5, e6, e7 = e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]
                grad_sum[j] += (e0 + e1 + e2 + e3) + (e4 + e5 + e6 + e7)
                row = grad[j]
                for d in range(dim):
                    row[d] += ((e0 * x0[d] + e1 * x1[d] + e2 * x2[d] + e3 * x3[d])
                               + (e4 * x4[d] + e5 * x5[d] + e6 * x6[d] + e7 * x7[d]))
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
