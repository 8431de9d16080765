"""Runner: data in, features out. For each split: plan its shards, skip the finished ones, have an engine write
the rest, merge them into ``SPLIT.h5``.

The roles below it, each replaceable: ``featx.sources`` (what to read), ``featx.decode`` (files -> uint8 batches),
``featx.embed`` (batches -> features), ``featx.shards`` + ``featx.store`` (shards written, merged),
``featx.engines`` (who runs which shards: this process, or Ray actors).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from featx import store
from featx.backbones import Backbone, create_backbone, create_model, folder_name
from featx.decode import READERS, AugmentTransform, EvalTransform, ImageFiles
from featx.embed import PRECISIONS, choose_runtime, precision_name, resolve_device, resolve_precision
from featx.runtimes import RUNTIMES, describe
from featx.engines import ENGINES, RayOptions, open_engine, ray_available
from featx.shards import plan_shards
from featx.sources import Split, discover

# What must match for an existing output (partial or complete) to be resumed or kept.
IDENTITY_KEYS = ("backbone", "pool", "precision", "weights_sha256", "feature_dim", "transform", "decoder", "dtype",
                 "views", "augmentation", "class_names", "file_list_sha256")
AUGMENTED_SPLITS = ("train", "all")  # the splits --views applies to
DTYPES = ("float32", "float16")
COMPRESSIONS = (None, "gzip", "lzf")


class ExtractError(RuntimeError):
    """An existing output that does not match the requested extraction."""


@dataclass(frozen=True)
class ExtractOptions:
    """How to run extraction; validated on construction."""

    batch_size: int = 64
    workers: int | None = None  # decode threads or processes; None = one per core
    reader: str = "auto"  # threads (decode, then forward, in turn: no contention) on CPU; processes on CUDA
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 (exact) on CPU; bf16/fp16 on CPUs that have them natively
    runtime: str = "auto"  # torch, onnxruntime, or auto: the faster exact one here (featx.embed.choose_runtime)
    channels_last: bool = True
    compile: bool = False
    fold_batch_norm: bool = True  # BatchNorms folded into the convolutions before them (float32 rounding only)
    forward_batch: int | None = None  # images per model call; None: the whole batch
    decode_on_device: bool | None = None  # JPEGs decoded on the model's device (nvjpeg); None: on with CUDA
    dtype: str = "float32"
    compression: str | None = None
    shard_size: int = 1024  # an unfinished run keeps the shard size it started with
    overwrite: bool = False
    layout: str = "copy"  # copy: one merged file; virtual: the file reads the shards in place (no copy)
    views: int = 1  # augmented views per training image (1 = the eval transform only)
    augment_seed: int = 0

    def __post_init__(self):
        for name in ("batch_size", "shard_size", "views", "forward_batch"):
            value = getattr(self, name)
            if not (name == "forward_batch" and value is None) and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise ValueError(f"workers must be a non-negative integer, got {self.workers!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, got {self.reader!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if self.layout not in store.LAYOUTS:
            raise ValueError(f"layout must be one of {store.LAYOUTS}, got {self.layout!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.precision not in ("auto", *PRECISIONS):
            raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.layout == "virtual" and self.compression:
            raise ValueError("compression applies to the copy layout; the virtual layout reads the shards as written")


def custom_transform(backbone: str, weights: str, mirror: str | None, resize: int | None = None,
                     crop: int | None = None, draft: bool = False, resize_crop_only: bool = False,
                     pool: str = "default") -> EvalTransform | None:
    """The weights' eval preset with the sizes and decode shortcuts asked for; None when nothing is asked."""
    if resize is None and crop is None and not draft and not resize_crop_only:
        return None
    for name, value in (("resize", resize), ("crop", crop)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer (pixels), got {value!r}")
    preset = create_model(backbone, weights, mirror, pool)[2]
    return replace(preset, resize=resize or preset.resize, crop=crop or preset.crop, draft=draft,
                   resize_crop_only=resize_crop_only)


def extract(data_root: str | os.PathLike, backbone: str = "resnet18", weights: str = "DEFAULT",
            out: str | os.PathLike = "features", mirror: str | None = None, transform: EvalTransform | None = None,
            splits: list[str] | None = None, options: ExtractOptions = ExtractOptions(), source: str = "auto",
            root: str | os.PathLike | None = None, engine: str = "local", ray_options: RayOptions = RayOptions(),
            label_key: str = "label", pool: str = "default") -> dict[str, dict]:
    """Extract every split of ``data_root`` (read as ``source``: ``featx.sources``) to ``out/<backbone>/<split>.h5``
    (``featx.backbones.folder_name``), its shards run by ``engine`` (``featx.engines``: local, or ray); returns a
    summary per split. ``pool``: how ViT-like backbones pool (``featx.backbones.POOLS``)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if engine == "ray" and not ray_available():
        raise ValueError("--engine ray needs Ray: pip install 'featx[ray]'")
    all_splits = discover(data_root, source, root, label_key)
    if options.decode_on_device is None:  # the fast pipeline wherever the model runs on a GPU
        options = replace(options, decode_on_device=engine == "local" and resolve_device(options.device).type == "cuda")
    if splits:
        unknown = sorted(set(splits) - {s.name for s in all_splits})
        if unknown:
            raise ValueError(f"splits {unknown} not found in {data_root}; it has {[s.name for s in all_splits]}")
        all_splits = [s for s in all_splits if s.name in splits]
    folder = Path(out) / folder_name(backbone)
    extractor = create_backbone(backbone, weights, mirror, transform, pool)
    if engine == "local" or options.device == "cpu":  # the model runs here, or on CPUs like these
        device = resolve_device(options.device)
        amp = resolve_precision(options.precision, device)  # refused here, before any work, where it cannot run
        if options.runtime == "auto":  # chosen once here, so every worker runs the same one
            options = replace(options, runtime=choose_runtime(extractor, device, amp, options.compile,
                                                              options.channels_last, options.fold_batch_norm))
    elif options.runtime == "auto":  # Ray workers on the cluster's GPUs (or where Ray places them): PyTorch
        options = replace(options, runtime="torch")
    with store.exclusive(folder), contextlib.closing(open_engine(engine, extractor, weights, mirror, options,
                                                           ray_options, pool)) as runner, \
            tqdm(total=0, unit="img", desc=backbone, mininterval=1.0, file=sys.stderr) as progress:  # the whole job
        options = replace(options, precision=precision_name(options.precision, runner.device_type))
        return {split.name: extract_split(split, extractor, runner.run, folder / f"{split.name}.h5", options, progress)
                for split in all_splits}


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
            "data_root": str(Path(split.root).resolve()),
            "class_names": list(split.class_names), "dtype": options.dtype, "views": dataset.views,
            "augmentation": augment.describe() if augment else {}, "decoder": dataset.decoder,
            "file_list_sha256": split.fingerprint(), "source": split.source}


def _differences(expected: dict, found: dict) -> str:
    keys = [k for k in IDENTITY_KEYS if expected.get(k) != found.get(k)]
    return ", ".join(f"{k}: {found.get(k)!r} there, {expected.get(k)!r} now" for k in keys)


def _prepare(path: Path, identity: dict, options: ExtractOptions) -> int | None:
    """Check existing output against ``identity``. Returns None when a complete, matching file is there, else
    the shard size to use: an unfinished run's own (shard boundaries must not move), or ``options.shard_size``."""
    parts = store.parts_dir(path)
    if path.exists() and not options.overwrite:
        meta = store.read_meta(path)
        found = {k: meta.get(k) for k in IDENTITY_KEYS}
        if found == identity:
            if parts.exists() and meta.get("layout", "copy") == "copy":  # a kill between the commit and the cleanup
                shutil.rmtree(parts)
            return None
        raise ExtractError(f"{path} was extracted differently ({_differences(identity, found)}); "
                           "pass --overwrite to replace it, or choose another --out")
    if path.exists() and _rows_in_shards(path):  # --overwrite keeps an old copy-layout file until the new replaces it
        path.unlink()
    manifest = store.read_manifest(parts)
    if options.overwrite and parts.exists():
        shutil.rmtree(parts)
    elif manifest is not None:
        if {k: manifest.get(k) for k in IDENTITY_KEYS} != identity:
            raise ExtractError(f"{parts} holds an unfinished extraction made differently "
                               f"({_differences(identity, manifest)}); pass --overwrite to start again")
        return manifest["shard_size"]
    with store.writing(parts / "manifest.json"):
        store.write_manifest(parts, {**identity, "shard_size": options.shard_size})
    return options.shard_size


def _rows_in_shards(path: Path) -> bool:
    """Whether a complete features file reads its rows from the shards beside it (the virtual layout), or cannot be
    read at all; either way it cannot outlive its shards being replaced."""
    try:
        return store.read_meta(path).get("layout") == "virtual"
    except (ValueError, OSError):
        return True


def extract_split(split: Split, backbone: Backbone, run, path: Path, options: ExtractOptions, progress: tqdm) -> dict:
    """Extract one split to ``path``, resuming an unfinished run; ``run(dataset, parts, shards, progress)`` writes
    the shards still to do (an engine), counting images on the job's ``progress`` bar. Returns counts, timing and
    failures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = split_dataset(split, backbone, options)
    attrs = split_attrs(split, backbone, dataset, options)
    identity = {k: attrs.get(k) for k in IDENTITY_KEYS}
    shard_size = _prepare(path, identity, options)
    if shard_size is None:
        print(f"{split.name}: {path} is up to date ({len(split)} images); --overwrite to redo it")
        return {"path": str(path), "skipped": True}
    parts = store.parts_dir(path)
    sizes = [n * dataset.views for n in split.shard_sizes] if split.shard_sizes else None
    planned = plan_shards(len(dataset), shard_size, options.batch_size, sizes)
    done = store.finished_shards(parts) - store.damaged_shards(parts)
    todo = {n: batches for n, batches in enumerate(planned) if n not in done}
    remaining = sum(len(b) for batches in todo.values() for b in batches)
    if done:
        print(f"{split.name}: resuming, {len(done)} of {len(planned)} shards already done")
    start = time.perf_counter()
    progress.total += remaining
    progress.set_description(f"{backbone.name} {split.name}")
    run(dataset, parts, todo, progress)
    seconds = time.perf_counter() - start
    counts = store.merge(parts, path, attrs, split.paths, split.labels, options.compression, options.layout,
                         split.columns, split.unreadable)
    rate = remaining / seconds if seconds > 0 else float("nan")
    print(f"{split.name}: {counts['num_rows']} rows, {counts['num_failed']} failed, {remaining} views processed "
          f"in {seconds:.1f}s ({rate:.1f} img/s) -> {path}")
    failed = store.load_failed(path)
    for failed_path, reason in failed[:20]:
        print(f"  skipped {failed_path}: {reason}")
    if len(failed) > 20:
        print(f"  ... and {len(failed) - 20} more, all listed under failed/ in {path}")
    return {"path": str(path), "skipped": False, "seconds": seconds, "images_per_second": rate, **counts,
            "failed": failed}
