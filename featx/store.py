"""Writer stage and reader API: the featx HDF5 features format.

Extraction streams rows into numbered shard files under ``<split>.h5.parts/``; each shard is written to a
``.tmp`` name and renamed into place only when complete, so a kill at any moment leaves only whole shards
(and a resumable run). ``merge`` then writes ``<split>.h5`` the same way: it either does not exist or is
complete. Schema of ``<split>.h5``:

- ``features`` [N, D] float32 (or float16), chunked by rows, optionally compressed
- ``labels`` [N] int64, ``paths`` [N] UTF-8 (relative to the data root), ``image_ids`` [N] int64 (index of
  the source image in the split's file list; several rows share one id when augmented views are stored)
- ``failed/paths``, ``failed/reasons``: files that could not be decoded, and why
- ``content_hash`` [N] uint64: BLAKE2b-64 of each row's image bytes (heads and runs record the hashes they saw)
- ``columns/caption``, ``columns/json`` [N] UTF-8: per-row text a source keeps (a tar sample's .txt and .json)
- attrs: ``format``, ``featx_version``, ``split``, ``data_root``, ``class_names``, ``backbone``, ``weights``,
  ``weights_source``, ``weights_sha256``, ``feature_dim``, ``transform`` (JSON), ``views``, ``augmentation``
  (JSON; empty unless ``views`` > 1), ``dtype``,
  ``file_list_sha256``, ``created``, ``complete``, ``num_images``, ``num_rows``, ``num_failed``
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from featx import storage
from featx.sources import shown
from featx.version import __version__

FORMAT = "featx-features/1"
LAYOUTS = ("copy", "virtual")
CHUNK_BYTES = 1 << 20
STR = h5py.string_dtype("utf-8")
# Attributes that must agree for two feature files to come from the same extractor ("pool" only where the backbone's
# family offers a choice: an absent one agrees with an absent one).
SOURCE_KEYS = ("backbone", "pool", "weights_sha256", "feature_dim", "transform")
REQUIRED_ATTRS = ("backbone", "weights_sha256", "feature_dim", "transform", "weights", "weights_source", "class_names",
                  "split", "views", "augmentation", "dtype", "file_list_sha256")


class IncompleteFeaturesError(FileNotFoundError):
    """The features file is missing, or only its unfinished shards exist."""


class NonFiniteError(ValueError):
    """Features with NaN or infinite values: a head fitted or scored on them would be silently wrong."""


def nonfinite_rows(features, rows: int = 65536) -> int:
    """How many rows of ``features`` (an array, or an HDF5 dataset read in blocks) hold NaN or inf."""
    return sum(int((~np.isfinite(features[a:a + rows])).any(1).sum()) for a in range(0, features.shape[0], rows))


def require_finite(path: str | os.PathLike, features) -> None:
    """Refuse a features file with non-finite rows, naming the file and how many rows."""
    count = nonfinite_rows(features)
    if count:
        raise NonFiniteError(f"{path}: {count} of {features.shape[0]} rows hold NaN or infinite features; "
                             "re-extract it with `featx extract ... --overwrite`")


class NoSpaceError(OSError):
    """The device filled up while featx was writing; what was committed before stays, and a rerun resumes."""


def _mount_point(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.ismount(path):
        path = path.parent
    return path


@contextlib.contextmanager
def writing(path: Path):
    """Turn a full device while writing ``path`` (an OSError, or h5py's errors that carry errno 28) into one
    ``NoSpaceError`` naming the device and the file."""
    try:
        yield
    except NoSpaceError:
        raise
    except Exception as error:
        text = str(error)
        if getattr(error, "errno", None) == errno.ENOSPC or "errno = 28" in text or "No space left" in text:
            raise no_space(path) from None
        raise


def no_space(path: Path, needed: int | None = None) -> NoSpaceError:
    """The one-line error for a full device while writing ``path`` (a local file)."""
    size = f" (about {needed >> 20} MB needed)" if needed else ""
    return NoSpaceError(f"no space left on {_mount_point(Path(path).parent)} while writing {path}{size}; free space "
                        "and rerun to resume")


class BusyError(ValueError):
    """An output folder another featx process holds, or one featx cannot write to."""


@contextlib.contextmanager
def exclusive(folder: Path):
    """Create ``folder`` and hold an exclusive lock on it (flock on the directory itself: no lock file is left
    behind). A second featx process writing there (extract's output, a finetune run) fails at once instead of
    mixing its files in. Object storage has no locks: a folder there is not held (its objects still each appear
    whole, so two writers of one shard leave one whole copy)."""
    if storage.is_url(folder):
        yield folder
        return
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise BusyError(f"output {existing} exists and is not a folder; choose another --out")
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BusyError(f"output folder {folder} is not writable; choose another --out")
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"another featx process is writing to {folder}; wait for it to finish, or choose "
                            "another --out") from None
        yield folder
    finally:
        os.close(descriptor)  # releases the lock


SIGNATURES = {b"PK\x03\x04": "a zip archive (NumPy .npz?)", b"\x93NUMPY": "a NumPy .npy array",
              b"PAR1": "a Parquet table", b"\x80": "a Python pickle", b"\x89PNG": "a PNG image",
              b"\xff\xd8\xff": "a JPEG image"}  # what a file that is not HDF5 often is, by its first bytes


def open_h5(path: str | os.PathLike) -> h5py.File:
    """Open a features file for reading (on disk, or on object storage by ranged reads); a file of another kind, a
    truncated or a non-HDF5 file is a ValueError that says which."""
    try:
        return h5py.File(storage.open_input(path, block_size=CHUNK_BYTES) if storage.is_url(path) else path, "r")
    except storage.StorageError:
        raise
    except OSError as error:
        kind = _other_kind(path)
        if kind:
            raise ValueError(f"{path} is {kind}, not a featx features file: give the HDF5 file `featx extract` "
                             "wrote (OUT/BACKBONE/SPLIT.h5; `featx export-features` makes Parquet and npy from it)") \
                from None
        reason = str(error).split("(")[-1].rstrip(")") if "(" in str(error) else str(error)
        raise ValueError(f"{path} is not a readable HDF5 file ({reason}); it may be truncated: re-extract it "
                         "with `featx extract ... --overwrite`") from None


def _other_kind(path: str | os.PathLike) -> str | None:
    """What a file h5py could not open is, by its first bytes (``SIGNATURES``), or None."""
    try:
        start = storage.read_bytes(path, 0, 8)
    except OSError:
        return None
    return next((what for magic, what in SIGNATURES.items() if start.startswith(magic)), None)


def parts_dir(path: storage.Location) -> storage.Location:
    """Folder holding the shards of an unfinished ``path``."""
    return storage.join(storage.parent(path), storage.name(path) + ".parts")


def write_text(path: storage.Location, text: str) -> None:
    """Replace ``path``'s text atomically: a reader sees the old text or the new, never a part."""
    storage.write_bytes(path, text.encode())


def _row_chunks(dim: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // (dim * itemsize))


class ShardWriter:
    """Streams the rows of one shard (at most ``max_rows``) into ``part-NNNNN.h5.tmp``; ``commit`` renames it into
    place."""

    def __init__(self, path: Path, feature_dim: int, dtype: str = "float32", max_rows: int | None = None):
        self.path = path
        self.buffer = io.BytesIO()  # built in memory (a shard is a few MB) and written in one plain write, so a
        self.file = h5py.File(self.buffer, "w")  # full device is an ordinary OSError, never a failing HDF5 close
        rows = min(_row_chunks(feature_dim, np.dtype(dtype).itemsize), max_rows or 1 << 62)
        self.features = self.file.create_dataset(
            "features", (0, feature_dim), maxshape=(None, feature_dim), dtype=dtype, chunks=(rows, feature_dim)
        )
        self.items = self.file.create_dataset("items", (0,), maxshape=(None,), dtype="int64", chunks=(rows,))
        self.hashes = self.file.create_dataset("content_hash", (0,), maxshape=(None,), dtype="uint64", chunks=(rows,))
        self.failed_items: list[int] = []
        self.failed_reasons: list[str] = []

    def append(self, items: np.ndarray, features: np.ndarray, hashes: np.ndarray) -> None:
        """Add rows: the features of dataset items ``items``, and their images' ``content_hash``."""
        start, count = self.features.shape[0], len(items)
        for dataset, values in ((self.features, features), (self.items, items), (self.hashes, hashes)):
            dataset.resize(start + count, axis=0)
            dataset[start:] = values

    def add_failures(self, failures: list[tuple[int, str]]) -> None:
        """Record items whose image could not be decoded."""
        for item, reason in failures:
            self.failed_items.append(item)
            self.failed_reasons.append(reason)

    def commit(self) -> None:
        """Close the shard and atomically make it visible."""
        self.file.create_dataset("failed_items", data=np.asarray(self.failed_items, dtype=np.int64))
        self.file.create_dataset("failed_reasons", data=np.asarray(self.failed_reasons, dtype=object), dtype=STR)
        self.file.close()
        storage.write_bytes(self.path, self.buffer.getbuffer())

    def abort(self) -> None:
        """Drop an unfinished shard."""
        self.file.close()


def _discard(file: h5py.File, tmp: Path) -> None:
    """Close ``file`` whatever state it is in and delete it: nothing half-written is left."""
    with contextlib.suppress(Exception):
        file.close()
    tmp.unlink(missing_ok=True)


def shard_path(parts: storage.Location, shard: int) -> storage.Location:
    return storage.join(parts, f"part-{shard:05d}.h5")


def write_manifest(parts: storage.Location, manifest: dict) -> None:
    """Record what the shards in ``parts`` are extracted from (checked before resuming)."""
    write_text(storage.join(parts, "manifest.json"), json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(parts: storage.Location) -> dict | None:
    path = storage.join(parts, "manifest.json")
    return json.loads(storage.read_bytes(path)) if storage.is_file(path) else None


def finished_shards(parts: storage.Location) -> set[int]:
    """Numbers of the shards already committed in ``parts`` (an upload or a ``.tmp`` file cut short is not one)."""
    return {int(name[5:10]) for name in storage.names(parts, "part-*.h5")}


def damaged_shards(parts: Path) -> set[int]:
    """Committed shards that cannot be read whole (cut short, overwritten): each is named on stderr and deleted, so
    the run recomputes it."""
    damaged = set()
    for number in sorted(finished_shards(parts)):
        shard = shard_path(parts, number)
        try:
            with open_h5(shard) as f:
                rows = {f[name].shape[0] for name in ("features", "items")}
                f["features"][-1:], f["failed_items"][:], f["failed_reasons"][:]
                if len(rows) != 1:
                    raise ValueError(f"features and items disagree: {sorted(rows)} rows")
        except storage.StorageError:
            raise
        except (OSError, KeyError, ValueError) as error:
            reason = str(error).split("(")[-1].rstrip(")") if "(" in str(error) else str(error)
            print(f"featx: {storage.shown(shard)} is damaged ({reason}); recomputing it", file=sys.stderr)
            storage.remove(shard)
            damaged.add(number)
    return damaged


def merge(parts: storage.Location, path: storage.Location, attrs: dict, paths: tuple[str, ...], labels: np.ndarray,
          compression: str | None = None, layout: str = "copy", columns: tuple = (), unreadable: tuple = ()) -> dict:
    """Write ``path`` from the committed shards of ``parts`` in shard order. ``copy``: every feature row is copied
    into ``path``, then ``parts`` is deleted. ``virtual``: ``features`` is an HDF5 virtual dataset over the shards,
    which stay in ``parts`` (no copy; the shards are named relative to ``path``, so the folder can move).

    Shards hold item ids (image index x ``attrs["views"]`` + view); ``paths``/``labels`` are the split's file
    list, which rows index through ``image_ids``, and ``columns`` ((name, per-image text) pairs: captions, JSON)
    are written per row under ``columns/``; ``unreadable`` ((folder, why) pairs) are recorded as failed too.
    On object storage the file is built in a private scratch folder and uploaded whole.
    Returns counts.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    sizes = storage.listing(parts)
    shards = [storage.join(parts, name) for name in storage.names(parts, "part-*.h5")]
    with contextlib.ExitStack() as stack:
        if storage.is_url(path):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="featx-merge-"))) / storage.name(path)
        else:
            tmp = storage.local_path(path).with_name(storage.name(path) + ".tmp")
        copied = sum(sizes[storage.name(p)] for p in shards) if layout == "copy" else 0
        needed = copied + sum(map(len, paths)) * 2 + (1 << 20)
        if shutil.disk_usage(tmp.parent).free < needed:  # HDF5 fails badly on a full device: check before
            raise no_space(tmp, needed)
        with writing(tmp):
            files = [stack.enter_context(open_h5(p)) for p in shards]
            out = h5py.File(tmp, "w")
            try:
                counts = _merged(files, out, attrs, paths, labels, compression, layout, columns, unreadable)
                out.close()
            except BaseException:
                _discard(out, tmp)
                raise
            storage.put_file(tmp, path)
    if layout == "copy":
        storage.remove(parts)
    return counts


def _virtual_features(files: list[h5py.File], out: h5py.File, dim: int, dtype: str) -> list[list]:
    """``features`` as a virtual dataset over the shards' rows; returns [[shard name relative to the file, rows]]."""
    sizes = [f["features"].shape[0] for f in files]
    layout = h5py.VirtualLayout((sum(sizes), dim), dtype)
    shards, start = [], 0
    for f, rows in zip(files, sizes):
        name = f"{Path(f.filename).parent.name}/{Path(f.filename).name}"
        if rows:
            layout[start:start + rows] = h5py.VirtualSource(name, "features", shape=(rows, dim))
        shards.append([name, rows])
        start += rows
    out.create_virtual_dataset("features", layout, fillvalue=np.nan)
    return shards


def _merged(files: list[h5py.File], out: h5py.File, attrs: dict, paths: tuple[str, ...], labels: np.ndarray,
            compression: str | None, layout: str, columns: tuple, unreadable: tuple) -> dict:
    """Write the shards ``files`` into ``out``; returns counts."""
    views, dim, dtype = attrs["views"], attrs["feature_dim"], attrs["dtype"]
    num_rows = sum(f["features"].shape[0] for f in files)
    items = np.concatenate([f["items"][:] for f in files]) if files else np.empty(0, np.int64)
    image_ids = items // views
    stamp_layout = {"layout": layout}
    if layout == "virtual":
        stamp_layout["shards"] = json.dumps(_virtual_features(files, out, dim, dtype))
    else:
        rows = min(max(num_rows, 1), _row_chunks(dim, np.dtype(dtype).itemsize))
        features = out.create_dataset("features", (num_rows, dim), maxshape=(None, dim), dtype=dtype,
                                      chunks=(rows, dim), compression=compression)
        start = 0
        for f in files:
            block = f["features"]
            for offset in range(0, block.shape[0], rows * 16):
                piece = block[offset:offset + rows * 16]
                features[start:start + len(piece)] = piece
                start += len(piece)
    out.create_dataset("image_ids", data=image_ids)
    out.create_dataset("labels", data=labels[image_ids])
    out.create_dataset("paths", data=np.asarray([shown(paths[i]) for i in image_ids], dtype=object), dtype=STR)
    if all("content_hash" in f for f in files):  # shards of an older featx have none
        out.create_dataset("content_hash", data=np.concatenate([f["content_hash"][:] for f in files] or
                                                               [np.empty(0, np.uint64)]))
    for name, values in columns:
        out.create_dataset(f"columns/{name}", data=np.asarray([values[i] for i in image_ids], dtype=object), dtype=STR)
    failed_items = np.concatenate([f["failed_items"][:] for f in files]) if files else np.empty(0, np.int64)
    all_reasons = [r.decode() for f in files for r in f["failed_reasons"][:]]
    failed_ids, first = np.unique(failed_items // views, return_index=True)  # one entry per image
    failed_paths = [shown(paths[i]) for i in failed_ids] + [shown(folder) for folder, _ in unreadable]
    reasons = [all_reasons[i] for i in first] + [reason for _, reason in unreadable]
    failed = out.create_group("failed")
    failed.create_dataset("paths", data=np.asarray(failed_paths, dtype=object), dtype=STR)
    failed.create_dataset("reasons", data=np.asarray(reasons, dtype=object), dtype=STR)
    counts = {"num_images": len(paths), "num_rows": num_rows, "num_failed": len(failed_paths)}
    stamp = {"format": FORMAT, "featx_version": __version__,
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "complete": True, **stamp_layout}
    for key, value in {**attrs, **counts, **stamp}.items():
        out.attrs[key] = json.dumps(value) if isinstance(value, dict) else value
    return counts


def _attr(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_attr(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_meta(path: str | os.PathLike) -> dict:
    """Attributes of a complete features file (``transform`` parsed); refuses unfinished ones."""
    path = path if storage.is_url(path) else Path(path)
    if not storage.is_file(path):
        if storage.exists(parts_dir(path)):
            done = len(finished_shards(parts_dir(path)))
            raise IncompleteFeaturesError(f"{storage.shown(path)} is not finished ({done} shards done); re-run `featx "
                                          "extract` with the same arguments to resume")
        raise IncompleteFeaturesError(f"features file {storage.shown(path)} does not exist; run `featx extract` first")
    with open_h5(path) as f:
        meta = {k: _attr(v) for k, v in f.attrs.items()}
        missing = [k for k in ("features", "labels", "paths", "image_ids") if k not in f]
    if meta.get("format") != FORMAT or not meta.get("complete"):
        raise ValueError(f"{path} is not a complete featx features file (format {meta.get('format')!r})")
    if missing:
        raise ValueError(f"{path} lacks the datasets {missing}; re-extract it with --overwrite")
    missing = [k for k in REQUIRED_ATTRS if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks attributes {missing}; re-extract it with --overwrite")
    meta["transform"] = json.loads(meta["transform"])
    meta["augmentation"] = json.loads(meta["augmentation"])
    if meta.get("layout") == "virtual":
        meta["shards"] = json.loads(meta["shards"])
        _require_shards(path, meta["shards"])
    meta["class_names"] = list(meta["class_names"])
    return meta


def _require_shards(path: Path, shards: list[list]) -> None:
    """A virtual features file reads a missing shard as fill values without a word: check each is there, whole."""
    for name, rows in shards:
        shard = path.parent / name
        if not shard.is_file():
            raise ValueError(f"{shard}, a shard of the virtual features file {path}, is missing; restore it, or "
                             "re-extract with --overwrite")
        with open_h5(shard) as f:
            found = f["features"].shape[0] if "features" in f else -1
        if found != rows:
            raise ValueError(f"{shard} holds {found} rows where {path} expects {rows}; re-extract with --overwrite")


@dataclass
class FeatureSet:
    """A features file in memory."""

    features: np.ndarray  # [N, D]
    labels: np.ndarray  # [N] int64
    paths: list[str]  # [N] relative to meta["data_root"]
    image_ids: np.ndarray  # [N] source image of each row
    meta: dict
    failed: list[tuple[str, str]]  # (path, reason)
    content_hash: np.ndarray | None = None  # [N] uint64 hash of each row's image bytes (None: an older file)
    columns: dict[str, list[str]] | None = None  # per-row text kept from the source: caption, json

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]


def load_failed(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(path, reason) of every file that could not be decoded."""
    with open_h5(path) as f:
        return list(zip(f["failed/paths"].asstr()[:], f["failed/reasons"].asstr()[:]))


def load(path: str | os.PathLike) -> FeatureSet:
    """Read a whole features file: arrays plus metadata."""
    meta = read_meta(path)
    with open_h5(path) as f:
        arrays = f["features"][:], f["labels"][:], list(f["paths"].asstr()[:]), f["image_ids"][:]
        hashes = f["content_hash"][:] if "content_hash" in f else None
        columns = {name: list(f["columns"][name].asstr()[:]) for name in f.get("columns", {})}
    return FeatureSet(*arrays, meta, load_failed(path), hashes, columns)


def iter_chunks(path: str | os.PathLike, rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (features, labels) blocks of at most ``rows`` rows, for files larger than memory."""
    read_meta(path)
    with open_h5(path) as f:
        features, labels = f["features"], f["labels"]
        for start in range(0, features.shape[0], rows):
            yield features[start:start + rows], labels[start:start + rows]


def provenance(meta: dict) -> dict:
    """What a features file was made from and by: backbone (and its pooling), weights (and their sha256),
    preprocessing, precision and runtime, data root, split, source, featx version, counts."""
    keys = ("backbone", "pool", "precision", "int8_agreement", "runtime", "weights", "weights_source",
            "weights_sha256", "feature_dim", "transform", "data_root", "split", "source", "class_names", "dtype",
            "views", "featx_version", "created", "num_images", "num_rows", "num_failed")
    return {key: meta[key] for key in keys if key in meta}


def summary(path: str | os.PathLike) -> str:
    """``featx info``: a features file's provenance, counts and per-row columns, one item a line."""
    meta = read_meta(path)
    with open_h5(path) as f:
        extra = [name for name in ("content_hash", *(f"columns/{c}" for c in f.get("columns", {}))) if name in f]
    lines = [f"{storage.shown(path)}: {meta['num_rows']} rows x {meta['feature_dim']} ({meta['dtype']}), "
             f"{meta['num_images']} images, {meta['num_failed']} failed, layout {meta.get('layout', 'copy')}"]
    lines += [f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}"
              for key, value in provenance(meta).items() if key not in ("num_images", "num_rows", "num_failed")]
    lines.append(f"  per-row data: features, labels, paths, image_ids{''.join(', ' + name for name in extra)}")
    return "\n".join(lines)


def require_labels(meta: dict, path: str | os.PathLike, command: str) -> None:
    """Refuse unlabelled features (extracted from a folder of images without class folders) for ``command``."""
    if not meta.get("class_names"):
        raise ValueError(f"{path} holds unlabelled features (no class folders or label column when extracted): "
                         f"{command} needs labels; `featx predict` and `featx export-features` work on them")


def require_same_source(expected: dict, meta: dict, what: str) -> None:
    """Raise if ``meta`` (a features file's) was made by another extractor or class list than ``expected``."""
    for key in (*SOURCE_KEYS, "class_names"):
        if expected.get(key) != meta.get(key):
            raise ValueError(
                f"{what} has {key}={meta.get(key)!r} but {expected.get(key)!r} was expected "
                f"(backbone {meta.get('backbone')} vs {expected.get('backbone')}); "
                "extract features with the same backbone, weights and transform, or fit a new head on these"
            )
