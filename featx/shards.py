"""Shards, the unit of work and of resume: a split's items cut into shards, and the step every engine runs on
them (decode -> embed -> write), each shard made visible by an atomic rename when it is whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from featx import store
from featx.decode import ImageFiles, decode_on_device, read_batches
from featx.embed import Embedder
from featx.options import ExtractOptions


def plan_shards(num_items: int, shard_size: int, batch_size: int, sizes: list[int] | None = None
                ) -> list[list[list[int]]]:
    """Item indices in shards of ``shard_size``, or of the source's own ``sizes`` (one tar = one shard), each cut in
    batches; the boundaries never depend on the batch size."""
    sizes = [n for n in sizes if n] if sizes else [shard_size] * -(-num_items // shard_size)
    starts = np.cumsum([0, *sizes])
    return [[list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]
            for start, stop in zip(starts[:-1].tolist(), np.minimum(starts[1:], num_items).tolist())]


def write_shards(dataset: ImageFiles, embedder: Embedder, parts: Path, shards: dict[int, list[list[int]]],
                 options: ExtractOptions, progress: tqdm | None = None) -> None:
    """Decode, embed and write the given shards (shard number -> batches of dataset items) into ``parts``, as
    ``options`` (workers, reader, dtype) say."""
    order = [(number, i == len(batches) - 1) for number, batches in shards.items() for i in range(len(batches))]
    batches = [batch for batches in shards.values() for batch in batches]
    writer = None
    try:
        reader = read_batches(dataset, batches, options.workers, embedder.device, options.reader)
        for batch, (number, last) in zip(reader, order):
            batch = decode_on_device(batch, dataset.transform, embedder.device)
            features = embedder(batch.images).numpy().astype(options.dtype)
            path = store.shard_path(parts, number)
            with store.writing(path):
                if writer is None:
                    shard_items = sum(len(b) for b in shards[number])
                    writer = store.ShardWriter(path, embedder.feature_dim, options.dtype, shard_items)
                hashes = np.asarray([dataset.content_hash(i) for i in batch.indices.tolist()], np.uint64)
                writer.append(batch.indices.numpy(), features, hashes)
                writer.add_failures(batch.failed)
                if last:
                    writer.commit()
                    writer = None
            if progress is not None:
                progress.update(batch.size)
    finally:
        if writer is not None:
            writer.abort()
