"""Feature rows in shuffled blocks: the streaming ``linear`` head's data stage.

A block joins a few contiguous runs of rows from random places (class-sorted files still mix) and shuffles
them in short row groups. An uncompressed float32 or float16 HDF5 dataset is read straight from its file with
``preadv`` on every core, each row group landing at its shuffled place (``RowFile``); anything else goes
through h5py and a gather. Blocks are read when the consumer asks for them, so on a CPU the cores take turns
between reading and training (faster than sharing them: ``benchmarks/ceilings.py``), or ahead by a background
thread (``ahead=True``) for a consumer on a GPU.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import torch

BLOCK_BYTES = 128 << 20  # float32 features per block
RUNS_PER_BLOCK = 8  # a block joins this many contiguous runs from random places
GROUP_ROWS = 16  # rows are shuffled in groups this long (near-sequential copies), then batches are cut

try:  # preadv through ctypes: one call reads a file range into many buffers without a Python object per buffer
    _preadv = ctypes.CDLL(None, use_errno=True).preadv
    _preadv.argtypes, _preadv.restype = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64], ctypes.c_ssize_t
except (AttributeError, OSError):  # no C library exposing preadv (e.g. Windows): h5py reads instead
    _preadv = None
CALL_BUFFERS = 256  # buffers per preadv call (IOV_MAX is at least 1024); small calls share out across threads
SKIP_ROWS = 8  # unwanted rows this many in a row are not read; shorter gaps are read into scratch


class RowFile:
    """Rows of an uncompressed float32 or float16 HDF5 dataset (native byte order), read from its file with ``preadv``.

    ``RowFile.open(X)`` returns None where that is not possible (filters, another dtype or byte order, a file
    open for writing, unallocated chunks, external or virtual storage, no ``preadv``); h5py reads then.
    """

    def __init__(self, path: str, chunk_offsets: np.ndarray, chunk_rows: int, dim: int, dtype: np.dtype):
        self.path, self.chunk_offsets, self.chunk_rows, self.dtype = path, chunk_offsets, chunk_rows, dtype
        self.row_bytes = dtype.itemsize * dim

    @classmethod
    def open(cls, X) -> RowFile | None:
        if not (_preadv and isinstance(X, h5py.Dataset) and X.ndim == 2 and X.dtype.isnative
                and X.dtype in (np.float32, np.float16)):
            return None
        plist = X.id.get_create_plist()
        if (X.file.mode != "r" or X.file.driver != "sec2" or X.file.userblock_size or X.is_virtual
                or plist.get_nfilters() or plist.get_external_count() or X.shape[0] == 0):
            return None
        if X.chunks is None:
            offset = X.id.get_offset()
            if offset is None:
                return None
            found = cls(X.file.filename, np.array([offset], np.int64), X.shape[0], X.shape[1], X.dtype)
        else:
            if X.chunks[1] != X.shape[1]:
                return None
            starts = []
            X.id.chunk_iter(lambda chunk: starts.append((chunk.chunk_offset[0], chunk.byte_offset)))
            if len(starts) != -(-X.shape[0] // X.chunks[0]):
                return None
            offsets = np.array([b for _, b in sorted(starts)], np.int64)
            found = cls(X.file.filename, offsets, X.chunks[0], X.shape[1], X.dtype)
        # self-check on the first and last rows: any surprise in the layout means h5py reads instead
        out = np.empty((2, X.shape[1]), X.dtype)
        found.read(np.array([0, X.shape[0] - 1]), np.array([0, 1]), out)
        return found if np.array_equal(out, X[[0, X.shape[0] - 1]]) else None

    def read(self, rows: np.ndarray, dest: np.ndarray, out: np.ndarray, workers: int = 1) -> None:
        """File rows ``rows`` (ascending within runs) into ``out[dest]``, skipping rows whose ``dest`` is -1.

        Each contiguous file range is one ``preadv`` whose buffers are the destinations of its pieces, so
        shuffling costs no copy; ``workers`` threads share the calls.
        """
        if dest.min(initial=0) < -1 or dest.max(initial=-1) >= len(out) or not (
                out.flags.c_contiguous and out.dtype == self.dtype):
            raise ValueError(f"out must be a contiguous {self.dtype} array holding every destination row")
        scratch = np.empty(SKIP_ROWS * self.row_bytes, np.uint8)
        iovecs, calls = self._plan(rows, dest, out, scratch)
        fd = os.open(self.path, os.O_RDONLY)

        def run(share: list[tuple[int, int, int, int]]) -> None:
            for first, count, offset, expected in share:
                done = _preadv(fd, iovecs.ctypes.data + 16 * first, count, offset)
                if done != expected:
                    error = ctypes.get_errno() if done < 0 else 0
                    raise OSError(error, f"reading {self.path}: "
                                         f"{os.strerror(error) if error else 'the file changed while read'}")
        try:
            if workers > 1 and len(calls) > 1:
                with ThreadPoolExecutor(workers - 1) as pool:
                    helpers = [pool.submit(run, calls[i::workers]) for i in range(1, workers)]
                    run(calls[::workers])
                    for helper in helpers:
                        helper.result()
            else:
                run(calls)
        finally:
            os.close(fd)

    def map(self) -> MappedRows | None:
        """The file's float32 rows mapped into memory (no copy), or None (float16, rows not 4-byte aligned, no
        ``madvise``)."""
        offsets_aligned = not (self.chunk_offsets % 4).any() and self.row_bytes % 4 == 0
        if self.dtype != np.float32 or not offsets_aligned or not hasattr(mmap.mmap, "madvise"):
            return None
        return MappedRows(self)

    def _plan(self, rows: np.ndarray, dest: np.ndarray, out: np.ndarray, scratch: np.ndarray):
        """The iovecs (struct {void *base; size_t len;}) of ``read`` and its calls: (first, count, offset, bytes)."""
        size = self.row_bytes
        offsets = self.chunk_offsets[rows // self.chunk_rows] + (rows % self.chunk_rows) * size
        wanted = dest >= 0
        jump = np.ones(len(rows), bool)  # a row that does not follow the previous one in the file
        jump[1:] = offsets[1:] != offsets[:-1] + size
        cut = jump.copy()  # a row that starts another buffer
        cut[1:] |= (wanted[1:] != wanted[:-1]) | (wanted[1:] & (dest[1:] != dest[:-1] + 1))
        starts = np.flatnonzero(cut)
        lengths = np.diff(np.append(starts, len(rows)))
        skip = ~wanted[starts] & (lengths >= SKIP_ROWS)  # long gaps are not read; short ones go to scratch
        new_call = jump[starts] | np.append(False, skip[:-1])
        starts, lengths, new_call = starts[~skip], lengths[~skip], new_call[~skip]
        if not len(starts):
            return np.empty((0, 2), np.uint64), []
        rank = np.arange(len(starts)) - np.flatnonzero(new_call)[np.cumsum(new_call) - 1]
        calls = np.flatnonzero(new_call | (rank % CALL_BUFFERS == 0))
        iovecs = np.empty((len(starts), 2), np.uint64)
        iovecs[:, 0] = np.where(wanted[starts], out.ctypes.data + dest[starts] * size, scratch.ctypes.data)
        iovecs[:, 1] = lengths * size
        counts = np.diff(np.append(calls, len(starts)))
        return iovecs, list(zip(calls.tolist(), counts.tolist(), offsets[starts[calls]].tolist(),
                                (np.add.reduceat(lengths, calls) * size).tolist()))


class MappedRows:
    """A ``RowFile``'s rows straight from the page cache: ``data`` (the file as float32) and ``starts(rows)`` (where
    each row begins in it). ``release()`` unmaps the pages touched so far, so they leave the process's RSS; the
    file must not shrink while mapped (reading past its end would kill the process with SIGBUS)."""

    def __init__(self, source: RowFile):
        self.source = source
        with open(source.path, "rb") as file:
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = np.frombuffer(self._map, np.float32, len(self._map) // 4)

    def starts(self, rows: np.ndarray) -> np.ndarray:
        """Offsets in ``data`` (float32 elements) of file rows ``rows``."""
        source = self.source
        byte_offsets = source.chunk_offsets[rows // source.chunk_rows] + (rows % source.chunk_rows) * source.row_bytes
        return byte_offsets // 4

    def release(self) -> None:
        self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.data = None  # the array holds the map's buffer until it goes
        self._map.close()


def _read(X, start: int, stop: int, out: np.ndarray, offset: int) -> None:
    """Rows start:stop of X into out[offset:], without a temporary for HDF5 datasets."""
    if isinstance(X, h5py.Dataset):
        X.read_direct(out, np.s_[start:stop], np.s_[offset:offset + stop - start])
    else:
        out[offset:offset + stop - start] = X[start:stop]


class BlockStream:
    """Passes over X in blocks: ``blocks(mask, rng)`` yields (features float32 [n, D], file rows [n]).

    With a generator, blocks join RUNS_PER_BLOCK runs in random order and rows are shuffled in groups of
    GROUP_ROWS; without one, rows come in file order. The stream keeps its buffers from pass to pass (fresh
    pages cost more than the read: 0.9 vs 2.2 M rows/s). A block's features stay valid until the next is asked
    for (``ahead=False``: read then, on all cores) or the one after (``ahead=True``: read by a background
    thread); one pass at a time. ``direct=False`` reads through h5py even where ``RowFile`` could.
    """

    def __init__(self, X, block_rows: int, ahead: bool = False, direct: bool = True):
        self.X, self.ahead = X, ahead
        self.block_rows = max(1, min(block_rows, X.shape[0]))
        self.capacity = RUNS_PER_BLOCK * -(-self.block_rows // RUNS_PER_BLOCK)
        self.source = RowFile.open(X) if direct else None
        self._buffers: list[torch.Tensor] = []
        self._staging = None  # where rows arrive in another form first: h5py's runs, or float16 rows
        if self.source is None or self.source.dtype != np.float32:
            dtype = np.float32 if self.source is None else self.source.dtype
            self._staging = np.empty((self.capacity, X.shape[1]), dtype)

    def blocks(self, mask: np.ndarray, rng: np.random.Generator | None = None):
        """One pass over the rows where ``mask`` is true."""
        plan = self._plan(rng)
        self._keep_buffers(3 if self.ahead else 1)  # ahead: one queued block + one being used + one being filled
        if not self.ahead:
            return (self._fill(runs, mask, rng, self._buffers[0], torch.get_num_threads()) for runs in plan)
        return self._from_thread(plan, mask, rng)

    def buffer(self) -> torch.Tensor:
        """The stream's block buffer, float32 [capacity, D], for a consumer that fills blocks itself (``served``);
        ``blocks`` overwrites it."""
        self._keep_buffers(1)
        return self._buffers[0]

    def _keep_buffers(self, count: int) -> None:
        while len(self._buffers) < count:
            self._buffers.append(torch.empty(self.capacity, self.X.shape[1]))

    def served(self, mask: np.ndarray, rng: np.random.Generator | None = None):
        """The file rows ``blocks(mask, rng)`` would serve, block by block, without reading them (for a consumer
        that reads rows itself, e.g. through ``RowFile.map``); draws from ``rng`` exactly as ``blocks`` does."""
        for runs in self._plan(rng):
            rows, chosen = self._order(runs, mask, rng)
            yield rows[chosen]

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
              out: torch.Tensor, workers: int) -> tuple[torch.Tensor, np.ndarray]:
        """Read one block into ``out`` in served order."""
        rows, chosen = self._order(runs, mask, rng)
        features, staging = out[:len(chosen)], self._staging
        if self.source is None:  # h5py reads the runs, then a gather serves them
            offset = 0
            for start, stop in runs:
                _read(self.X, start, stop, staging, offset)
                offset += stop - start
            torch.index_select(torch.from_numpy(staging), 0, torch.from_numpy(chosen), out=features)
        else:
            dest = np.full(len(rows), -1)
            dest[chosen] = np.arange(len(chosen))
            if staging is None:
                self.source.read(rows, dest, features.numpy(), workers)
            else:  # float16 rows, half the bytes to read, converted in one pass
                self.source.read(rows, dest, staging[:len(chosen)], workers)
                features.copy_(torch.from_numpy(staging[:len(chosen)]))
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
                item = self._fill(runs, mask, rng, self._buffers[number % 3], torch.get_num_threads())
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
