"""Feature rows in shuffled blocks: the streaming ``linear`` head's data stage.

A block joins a few contiguous runs of rows from random places (class-sorted files still mix), read through h5py,
and serves them shuffled in short row groups. Blocks are read when the consumer asks for them, so on a CPU the
cores take turns between reading and training, or ahead by a background thread (``ahead=True``) for a consumer on
a GPU. Memory is bounded by the block size, not by the file.
"""

from __future__ import annotations

import queue
import threading

import h5py
import numpy as np
import torch

BLOCK_BYTES = 128 << 20  # float32 features per block
RUNS_PER_BLOCK = 8  # a block joins this many contiguous runs from random places
GROUP_ROWS = 16  # rows are shuffled in groups this long (near-sequential copies), then batches are cut


def _read(X, start: int, stop: int, out: np.ndarray, offset: int) -> None:
    """Rows ``start:stop`` of X into ``out[offset:]`` (straight into the buffer when X is an HDF5 dataset)."""
    if isinstance(X, h5py.Dataset):
        X.read_direct(out, np.s_[start:stop], np.s_[offset:offset + stop - start])
    else:
        out[offset:offset + stop - start] = X[start:stop]


class BlockStream:
    """Passes over X (an array or an HDF5 dataset) in blocks: ``blocks(mask, rng)`` yields (features float32
    [n, D], file rows [n]).

    With a generator, blocks join RUNS_PER_BLOCK runs in random order and rows are shuffled in groups of
    GROUP_ROWS; without one, rows come in file order. The stream keeps its buffers from pass to pass (fresh
    pages cost more than the read). A block's features stay valid until the next is asked for (``ahead=False``)
    or the one after (``ahead=True``: read by a background thread); one pass at a time. float16 rows are read as
    they are stored (h5py's own conversion is slow) and converted in the gather.
    """

    def __init__(self, X, block_rows: int, ahead: bool = False):
        self.X, self.ahead = X, ahead
        self.block_rows = max(1, min(block_rows, X.shape[0]))
        self.capacity = RUNS_PER_BLOCK * -(-self.block_rows // RUNS_PER_BLOCK)
        self._buffers: list[torch.Tensor] = []
        stored = np.dtype(X.dtype)
        self._staging = np.empty((self.capacity, X.shape[1]), stored if stored == np.float16 else np.float32)

    def blocks(self, mask: np.ndarray, rng: np.random.Generator | None = None):
        """One pass over the rows where ``mask`` is true."""
        plan = self._plan(rng)
        self._keep_buffers(3 if self.ahead else 1)  # ahead: one queued block + one being used + one being filled
        if not self.ahead:
            return (self._fill(runs, mask, rng, self._buffers[0]) for runs in plan)
        return self._from_thread(plan, mask, rng)

    def _keep_buffers(self, count: int) -> None:
        while len(self._buffers) < count:
            self._buffers.append(torch.empty(self.capacity, self.X.shape[1]))

    def _plan(self, rng: np.random.Generator | None) -> list[list[tuple[int, int]]]:
        """A pass's blocks, each a list of (start, stop) runs of file rows."""
        runs = RUNS_PER_BLOCK if rng is not None else 1
        run_rows = -(-self.block_rows // runs)
        starts = np.arange(0, self.X.shape[0], run_rows)
        if rng is not None:
            starts = rng.permutation(starts)
        return [[(s, min(s + run_rows, self.X.shape[0])) for s in starts[i:i + runs]]
                for i in range(0, len(starts), runs)]

    def _order(self, runs: list[tuple[int, int]], mask: np.ndarray,
               rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        """The block's file rows, and the positions of its masked rows in the order they are served."""
        rows = np.concatenate([np.arange(a, b) for a, b in runs])
        chosen = np.flatnonzero(mask[rows])
        if rng is not None:
            group = np.arange(len(chosen)) // GROUP_ROWS
            chosen = chosen[np.argsort(rng.permutation(-(-len(chosen) // GROUP_ROWS))[group], kind="stable")]
        return rows, chosen

    def _fill(self, runs: list[tuple[int, int]], mask: np.ndarray, rng: np.random.Generator | None,
              out: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Read one block's runs, then gather its masked rows into ``out`` in served order."""
        rows, chosen = self._order(runs, mask, rng)
        offset = 0
        for start, stop in runs:
            _read(self.X, start, stop, self._staging, offset)
            offset += stop - start
        features, staged, index = out[:len(chosen)], torch.from_numpy(self._staging), torch.from_numpy(chosen)
        if staged.dtype == torch.float32:
            torch.index_select(staged, 0, index, out=features)
        else:
            features.copy_(staged.index_select(0, index))
        return features, rows[chosen]

    def _from_thread(self, plan: list, mask: np.ndarray, rng: np.random.Generator | None):
        """Blocks read ahead by a background thread (and its helpers) while the consumer (a GPU) uses this one."""
        blocks: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(plan, mask, rng, blocks, stop), daemon=True)
        thread.start()
        try:
            while (item := blocks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    def _produce(self, plan: list, mask: np.ndarray, rng: np.random.Generator | None, out: queue.Queue,
                 stop: threading.Event) -> None:
        try:
            for number, runs in enumerate(plan):
                item = self._fill(runs, mask, rng, self._buffers[number % 3])
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(None)
        except BaseException as error:  # noqa: BLE001 - handed to the consuming thread, which raises it
            out.put(error)
