"""Runner: data in, features out. For each split: plan its shards, skip the finished ones, have an engine write
the rest, merge them into ``SPLIT.h5``.

The roles below it, each replaceable: ``featx.sources`` (what to read), ``featx.decode`` (files -> uint8 batches),
``featx.embed`` (batches -> features), ``featx.shards`` + ``featx.store`` (shards written, merged),
``featx.engines`` (who runs which shards: this process, or Ray actors).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import replace

from tqdm import tqdm

from featx import storage, store
from featx.backbones import Backbone, BackboneSpec, folder_name
from featx.decode import AugmentTransform, ImageFiles
from featx.devices import QUANTIZED, resolve_device
from featx.embed import Calibration
from featx.engines import ENGINES, RayOptions, open_engine, ray_available
from featx.options import ExtractOptions
from featx.runtimes import describe
from featx.shards import plan_shards
from featx.sources import Split, discover

# What must match for an existing output (partial or complete) to be resumed or kept.
IDENTITY_KEYS = ("backbone", "pool", "precision", "weights_sha256", "feature_dim", "transform", "decoder", "dtype",
                 "views", "augmentation", "class_names", "file_list_sha256")
AUGMENTED_SPLITS = ("train", "all")  # the splits --views applies to


class ExtractError(RuntimeError):
    """An existing output that does not match the requested extraction."""


def extract(data_root: str | os.PathLike, spec: BackboneSpec, out: str | os.PathLike = "features", *,
            options: ExtractOptions = ExtractOptions(), splits: list[str] | None = None, source: str = "auto",
            root: str | os.PathLike | None = None, engine: str = "local", ray_options: RayOptions = RayOptions(),
            label_key: str = "label", path_key: str = "path") -> dict[str, dict]:
    """Extract every split of ``data_root`` (read as ``source``: ``featx.sources``) with the backbone ``spec``
    builds to ``out/<backbone>/<split>.h5`` (``featx.backbones.folder_name``), its shards run by ``engine``
    (``featx.engines``: local, or ray); returns a summary per split."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if engine == "ray" and not ray_available():
        raise ValueError("--engine ray needs Ray: pip install 'featx[ray]'")
    all_splits = discover(data_root, source, root, label_key, path_key)
    if options.decode_on_device is None:  # the fast pipeline wherever the model runs on a GPU
        options = replace(options, decode_on_device=engine == "local" and resolve_device(options.device).type == "cuda")
    if splits:
        unknown = sorted(set(splits) - {s.name for s in all_splits})
        if unknown:
            raise ValueError(f"splits {unknown} not found in {data_root}; it has {[s.name for s in all_splits]}")
        all_splits = [s for s in all_splits if s.name in splits]
    if storage.is_url(out) and options.layout == "virtual":
        raise ValueError(f"--layout virtual needs --out on a local disk (HDF5 virtual datasets name their shards as "
                         f"files); {storage.shown(out)} is on object storage: leave --layout at copy")
    folder = storage.join(out, folder_name(spec.name))
    options = replace(options, runtime=started_runtime(folder, all_splits, options))
    extractor = spec.build()
    calibration = None
    if options.precision in QUANTIZED and engine == "local":  # on the user's own images: the train split's
        calibration = Calibration(next((s for s in all_splits if s.name == "train"), all_splits[0]), extractor)
    with contextlib.closing(open_engine(engine, spec, extractor, options, ray_options, calibration)) as runner, \
            store.exclusive(folder):  # a precision or runtime refused by the engine has written nothing
        return {split.name: extract_split(split, extractor, runner, storage.join(folder, f"{split.name}.h5"))
                for split in all_splits}


def started_runtime(folder: storage.Location, splits: list[Split], options: ExtractOptions) -> str:
    """The runtime to ask for: with ``auto``, the one an existing output of these splits was made with (a resume
    never mixes runtimes, whatever auto would choose today); else the one asked for (a different one is refused
    by the identity check)."""
    if options.runtime != "auto" or options.overwrite:
        return options.runtime
    for split in splits:
        path = storage.join(folder, f"{split.name}.h5")
        try:
            made = store.read_meta(path) if storage.exists(path) else store.read_manifest(store.parts_dir(path))
        except (ValueError, OSError):
            continue
        if made and made.get("runtime"):
            return made["runtime"].split()[0]
    return options.runtime


def identity(attrs: dict) -> dict:
    """What must match for an existing output to be resumed or kept (``IDENTITY_KEYS``), and the runtime by name
    (a new version keeps a file; a file from before runtimes were recorded ran torch)."""
    return {**{k: attrs.get(k) for k in IDENTITY_KEYS}, "runtime": (attrs.get("runtime") or "torch").split()[0]}


def augmentation_for(split: Split, backbone: Backbone, options: ExtractOptions) -> AugmentTransform | None:
    """The train-time augmentation for ``split`` when ``--views`` asks for several views of it."""
    if options.views == 1 or split.name not in AUGMENTED_SPLITS:
        return None
    return AugmentTransform(backbone.transform.crop, interpolation=backbone.transform.interpolation,
                            seed=options.augment_seed)


def split_dataset(split: Split, backbone: Backbone, options: ExtractOptions) -> ImageFiles:
    """The files of ``split`` as the extraction reads them: views, augmentation, decoder."""
    augment = augmentation_for(split, backbone, options)
    return ImageFiles(split.root, split.paths, backbone.transform, options.views if augment else 1, augment,
                      options.decode_on_device, split.members)


def split_attrs(split: Split, backbone: Backbone, dataset: ImageFiles, options: ExtractOptions) -> dict:
    """Everything recorded about how a split's features are made (the precision only when not exact float32, so
    files from before it was recorded keep their identity)."""
    augment = dataset.augment
    precision = {} if options.precision == "fp32" else {"precision": options.precision}
    return {**backbone.provenance(), **precision, "runtime": describe(options.runtime), "split": split.name,
            "data_root": storage.absolute(split.root),
            "class_names": list(split.class_names), "dtype": options.dtype, "views": dataset.views,
            "augmentation": augment.describe() if augment else {}, "decoder": dataset.decoder,
            "file_list_sha256": split.fingerprint(), "source": split.source}


def _differences(expected: dict, found: dict) -> str:
    keys = [k for k in expected if expected.get(k) != found.get(k)]
    return ", ".join(f"{k}: {found.get(k)!r} there, {expected.get(k)!r} now" for k in keys)


def _prepare(path: storage.Location, expected: dict, options: ExtractOptions) -> int | None:
    """Check existing output against the ``expected`` identity. Returns None when a complete, matching file is
    there, else the shard size to use: an unfinished run's own (shard boundaries must not move), or
    ``options.shard_size``."""
    parts = store.parts_dir(path)
    if storage.exists(path) and not options.overwrite:
        meta = store.read_meta(path)
        found = identity(meta)
        if found == expected:
            if meta.get("layout", "copy") == "copy" and storage.exists(parts):  # killed between commit and cleanup
                storage.remove(parts)
            return None
        raise ExtractError(f"{storage.shown(path)} was extracted differently ({_differences(expected, found)}); "
                           "pass --overwrite to replace it, or choose another --out")
    if storage.exists(path) and _rows_in_shards(path):  # --overwrite keeps an old copy-layout file until replaced
        storage.remove(path)
    manifest = store.read_manifest(parts)
    if options.overwrite and storage.exists(parts):
        storage.remove(parts)
    elif manifest is not None:
        if identity(manifest) != expected:
            raise ExtractError(f"{storage.shown(parts)} holds an unfinished extraction made differently "
                               f"({_differences(expected, identity(manifest))}); pass --overwrite to start again")
        return manifest["shard_size"]
    with store.writing(storage.join(parts, "manifest.json")):
        store.write_manifest(parts, {**expected, "shard_size": options.shard_size})
    return options.shard_size


def _rows_in_shards(path: storage.Location) -> bool:
    """Whether a complete features file reads its rows from the shards beside it (the virtual layout), or cannot be
    read at all; either way it cannot outlive its shards being replaced."""
    try:
        return store.read_meta(path).get("layout") == "virtual"
    except (ValueError, OSError):
        return True


def extract_split(split: Split, backbone: Backbone, runner, path: storage.Location) -> dict:
    """Extract one split to ``path``, resuming an unfinished run; the engine ``runner`` writes the shards still to do
    (``run(dataset, parts, shards, progress)``), counting images on the split's progress bar. Returns counts,
    timing and failures."""
    options = runner.options
    dataset = split_dataset(split, backbone, options)
    attrs = {**split_attrs(split, backbone, dataset, options), **runner.provenance}
    shard_size = _prepare(path, identity(attrs), options)
    if shard_size is None:
        print(f"{split.name}: {storage.shown(path)} is up to date ({len(split)} images); --overwrite to redo it")
        return {"path": os.fspath(path), "skipped": True}
    parts = store.parts_dir(path)
    sizes = [n * dataset.views for n in split.shard_sizes] if split.shard_sizes else None
    planned = plan_shards(len(dataset), shard_size, options.batch_size, sizes)
    done = store.finished_shards(parts) - store.damaged_shards(parts)
    todo = {n: batches for n, batches in enumerate(planned) if n not in done}
    remaining = sum(len(b) for batches in todo.values() for b in batches)
    if done:
        print(f"{split.name}: resuming, {len(done)} of {len(planned)} shards already done")
    start = time.perf_counter()
    with tqdm(total=remaining, unit="img", desc=f"{backbone.name} {split.name}", mininterval=1.0, file=sys.stderr,
              disable=not remaining) as progress:
        runner.run(dataset, parts, todo, progress)
    seconds = time.perf_counter() - start
    counts = store.merge(parts, path, attrs, split.paths, split.labels, options.compression, options.layout,
                         split.columns, split.unreadable)
    rate = remaining / seconds if seconds > 0 else float("nan")
    print(f"{split.name}: {counts['num_rows']} rows, {counts['num_failed']} failed, {remaining} views processed "
          f"in {seconds:.1f}s ({rate:.1f} img/s) -> {storage.shown(path)}")
    failed = store.load_failed(path)
    for failed_path, reason in failed[:20]:
        print(f"  skipped {failed_path}: {reason}")
    if len(failed) > 20:
        print(f"  ... and {len(failed) - 20} more, all listed under failed/ in {storage.shown(path)}")
    return {"path": os.fspath(path), "skipped": False, "seconds": seconds, "images_per_second": rate, **counts,
            "failed": failed}
