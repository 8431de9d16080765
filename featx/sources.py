"""Sources (the reader role's first half): what to read, as ``Split``s. Every source gives the same thing: items
in a stable order, their labels (or none), where their bytes are, a fingerprint for resume, and natural shard
boundaries where it has them. The runner, the engines and ``finetune`` never know which source they read.

- **imagefolder**: ``DATA/[split/]class/image``.
- **unlabelled**: a folder of images with no class folders, searched recursively (labels -1).
- **manifest**: a CSV or Parquet file with a ``path`` column and optional ``label`` and ``split`` columns; also a
  Hugging Face imagefolder (``metadata.csv`` with ``file_name`` beside the images of each split).
- **webdataset**: tar shards (``shards/train-{000000..000099}.tar``, a glob, a folder of ``.tar`` files, or an
  img2dataset output folder) of ``key.jpg|png|webp`` samples. The label is ``key.cls`` when the sample has one; else
  ``key.json``'s ``--label_key`` (default ``label``), or the ``key.txt`` caption only with ``--label_key txt``.
  Captions and JSON are kept per row (``Split.columns``). Each tar is indexed once (its headers only) and its
  members are read in place, one tar per shard.

Split names are canonical: ``validation``, ``valid`` and ``dev`` are read as ``val``.
"""

from __future__ import annotations

import bisect
import csv
import glob
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, NamedTuple

import numpy as np

from featx import storage

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}  # read as the canonical name
SOURCES = ("auto", "imagefolder", "unlabelled", "manifest", "webdataset")
TAR_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
TAR_TEXT_EXTENSIONS = (".cls", ".json", ".txt")  # label and metadata members, read at indexing
COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
HF_METADATA = "metadata.csv"  # a Hugging Face imagefolder's per-split table (file_name + columns)
PATH_COLUMNS = ("image_path", "filepath", "file_path", "file_name", "filename", "image", "img_path")  # polars, HF
TAR_READ_BLOCK = 8 << 20  # bytes per read while indexing a tar on object storage (its headers are spread through it)
HF_ARROW = ("dataset_info.json", "state.json", "dataset_dict.json")  # what `datasets`' save_to_disk writes


def split_name(name: str) -> str | None:
    """The canonical split a folder, tar prefix or manifest value names (``validation`` -> ``val``), or None."""
    name = name.strip().lower()
    return name if name in SPLIT_NAMES else SPLIT_ALIASES.get(name)


class Member(NamedTuple):
    """Where an image's bytes are inside a (tar) file: read by range (``pread`` on disk, a ranged GET on object
    storage), no unpacking. ``problem``: why the sample cannot be read (no image member, cut short with its file),
    raised on reading."""

    file: str
    offset: int
    size: int
    problem: str = ""

    def read(self) -> io.BytesIO:
        """The member's bytes; a member cut short by a truncated file is an error."""
        if self.problem:
            raise ValueError(self.problem)
        data = storage.read_bytes(self.file, self.offset, self.size)
        if len(data) != self.size:
            raise EOFError(f"truncated: {len(data)} of {self.size} bytes in {storage.name(self.file)}")
        return io.BytesIO(data)


class ListedPath:
    """A folder or file under a prefix on object storage, answered from one listing of the prefix
    (``storage.listing``; no request per file): the few pathlib methods the folder sources use."""

    def __init__(self, url: str):
        self.url, self.rel = url.rstrip("/"), ""
        self.keys = tuple(sorted(storage.listing(url)))  # sorted: what is under a folder is one range of them
        self.folders = frozenset(folder for key in self.keys for folder in _parents(key))

    def __truediv__(self, name: str) -> "ListedPath":
        child = ListedPath.__new__(ListedPath)
        child.url, child.keys, child.folders = self.url, self.keys, self.folders
        child.rel = f"{self.rel}/{name}" if self.rel else name
        return child

    def _under(self) -> Iterator[str]:
        """The keys under this folder, relative to it, in order."""
        prefix = f"{self.rel}/" if self.rel else ""
        for key in self.keys[bisect.bisect_left(self.keys, prefix):]:
            if not key.startswith(prefix):
                return
            yield key[len(prefix):]

    def __fspath__(self) -> str:
        return f"{self.url}/{self.rel}" if self.rel else self.url

    __str__ = __fspath__

    def __eq__(self, other) -> bool:
        return isinstance(other, ListedPath) and os.fspath(self) == os.fspath(other)

    def __hash__(self) -> int:
        return hash(os.fspath(self))

    def __lt__(self, other: "ListedPath") -> bool:
        return os.fspath(self) < os.fspath(other)

    @property
    def name(self) -> str:
        return PurePosixPath(self.rel).name if self.rel else storage.name(self.url)

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    def iterdir(self) -> list["ListedPath"]:
        return [self / name for name in sorted({key.split("/")[0] for key in self._under()})]

    def is_dir(self) -> bool:
        return not self.rel and bool(self.keys) or self.rel in self.folders

    def is_file(self) -> bool:
        found = bisect.bisect_left(self.keys, self.rel)
        return found < len(self.keys) and self.keys[found] == self.rel

    def relative_to(self, other: "ListedPath") -> PurePosixPath:
        return PurePosixPath(self.rel).relative_to(other.rel or ".")

    def images(self) -> list["ListedPath"]:
        """Image files under this folder, sorted; hidden files and folders skipped."""
        return [self / key for key in self._under() if os.path.splitext(key)[1].lower() in IMAGE_EXTENSIONS
                and not key.startswith(".") and "/." not in key]


def _parents(key: str) -> Iterator[str]:
    """``a/b/c.jpg`` -> ``a/b``, ``a``."""
    while "/" in key:
        key = key.rpartition("/")[0]
        yield key


def folder_at(data: str | os.PathLike) -> Path | ListedPath:
    """``data`` as a folder or file the sources read: a local path, or a prefix on object storage (listed once)."""
    return ListedPath(os.fspath(data)) if storage.is_url(data) else Path(data)


def shown(path: str | os.PathLike) -> str:
    """A path as text that prints and stores as UTF-8: the bytes of a file name that are not UTF-8 (kept by Python
    as surrogates, so the file still opens) are written ``\\xNN``; a URL is shown without its secrets."""
    return storage.shown(os.fsencode(path).decode("utf-8", "backslashreplace"))


def list_images(folder: Path, seen: set | None = None, skipped: list[str] | None = None,
                unreadable: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Regular image files under ``folder``, sorted; hidden files/folders and other extensions ignored. A folder
    that cannot be read (no permission) is added to ``unreadable`` with why, never dropped silently.

    Links to files are read like files. Links to directories are followed, but each real directory is walked
    once: a link to a directory already walked or in ``seen`` (a loop, or a second way to the same images) is
    not followed, and is added to ``skipped`` with why. ``seen`` holds (device, inode) pairs and grows.
    """
    if isinstance(folder, ListedPath):
        return folder.images()
    seen = set() if seen is None else seen
    seen.add(directory_key(folder))
    found = []

    def report(error: OSError) -> None:
        if unreadable is None:
            raise error
        unreadable.append((Path(error.filename), f"cannot read this folder: {error.strerror}"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=report, followlinks=True):
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            key = directory_key(Path(dirpath) / name)
            if key in seen:
                if skipped is not None:
                    skipped.append(f"{Path(dirpath) / name}: a link to a folder already read (a loop, or a second "
                                   "way to the same images); not followed")
                continue
            seen.add(key)
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                if stat.S_ISREG(path.stat().st_mode):  # no FIFOs or devices that could block a reader
                    found.append(path)
            except OSError:  # dangling link
                continue
    return found


def directory_key(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the directory ``path`` leads to: the same for every link to it."""
    if isinstance(path, ListedPath):
        return None
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


@dataclass(frozen=True)
class Split:
    """One split of a source: what every source gives the runner, the engines and ``finetune``.

    ``paths`` identify the items in a stable order (relative to ``root``, or absolute; ``tarname/key`` for a tar
    member); ``labels`` index ``class_names`` (-1: unlabelled, and ``class_names`` is empty); ``members`` say
    where an item's bytes are when it is not the file ``root / path``; ``shard_sizes`` are the source's natural
    shard boundaries in items (one tar = one shard), or None.
    """

    name: str
    root: Path
    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    members: tuple[Member | None, ...] | None = None
    shard_sizes: tuple[int, ...] | None = None
    source: str = "imagefolder"
    columns: tuple[tuple[str, tuple[str, ...]], ...] = ()  # per-item text kept beside the features: caption, json
    unreadable: tuple[tuple[str, str], ...] = ()  # (folder, why) of folders that could not be listed

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def subset(self, mask: np.ndarray, name: str) -> "Split":
        """The items where ``mask`` is true, as a split called ``name``."""
        paths = tuple(p for p, keep in zip(self.paths, mask) if keep)
        members = tuple(m for m, keep in zip(self.members, mask) if keep) if self.members else None
        columns = tuple((column, tuple(v for v, keep in zip(values, mask) if keep)) for column, values in self.columns)
        return Split(name, self.root, paths, self.labels[mask], self.class_names, members, None, self.source, columns)

    def fingerprint(self) -> str:
        """sha256 over class names, relative paths and labels: changes when the file list does."""
        digest = hashlib.sha256()
        digest.update("\0".join(self.class_names).encode())
        for path, label in zip(self.paths, self.labels.tolist()):
            digest.update(f"\n{path}\t{label}".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_folders(root: Path) -> list[tuple[str, Path]]:
    """(canonical split name, folder) of ``root``'s split folders, train first; two folders naming one split (``val/``
    and ``validation/``) are an error."""
    found: dict[str, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        name = split_name(folder.name)
        if name is None:
            continue
        if name in found:
            raise ValueError(f"{root} has two folders for split {name}: {found[name].name}/ and {folder.name}/; "
                             "merge them or rename one")
        found[name] = folder
    return [(name, found[name]) for name in SPLIT_NAMES if name in found]


def image_folder(root: Path) -> list[Split]:
    """Splits of an ImageFolder tree: ``train/``, ``val/`` ... when present, else ``root`` as one split.

    Class names come from the training split (else the first split) and apply to every split.
    """
    split_dirs = split_folders(root)
    if not split_dirs:
        split_dirs = [(split_name(root.name) or "all", root)]
    class_names = _class_folders(split_dirs[0][1])
    if not class_names:
        raise ValueError(f"{split_dirs[0][1]} has no class folders (expected ImageFolder layout: <class>/<image>)")
    splits = []
    for name, folder in split_dirs:
        extra = sorted(set(_class_folders(folder)) - set(class_names))
        if extra:
            raise ValueError(
                f"{folder} has class folders {extra} that {split_dirs[0][1].name}/ lacks; "
                f"classes come from the training split: {', '.join(class_names)}"
            )
        # the data root, the split and its class folders are walked once each, whatever links lead to them
        seen = {directory_key(p) for p in (root, folder, *(folder / c for c in class_names))}
        paths, labels, skipped, unreadable = [], [], [], []
        for label, class_name in enumerate(class_names):
            class_folder = folder / class_name
            for path in list_images(class_folder, seen, skipped, unreadable) if class_folder.is_dir() else []:
                paths.append(path.relative_to(root).as_posix())
                labels.append(label)
        _report(skipped, unreadable)
        if not paths:
            raise ValueError(f"{folder} has no images in its class folders ({', '.join(class_names)})")
        splits.append(Split(name, root, tuple(paths), np.asarray(labels, dtype=np.int64), tuple(class_names),
                            unreadable=_relative(unreadable, root)))
    return splits


def unlabelled_folder(root: Path) -> list[Split]:
    """Every image under ``root`` (recursively, sorted) as one split ``all`` with no labels."""
    skipped: list[str] = []
    unreadable: list[tuple[Path, str]] = []
    paths = tuple(p.relative_to(root).as_posix() for p in list_images(root, skipped=skipped, unreadable=unreadable))
    _report(skipped, unreadable)
    if not paths:
        raise ValueError(f"{root} holds no images")
    return [Split("all", root, paths, np.full(len(paths), -1, np.int64), (), source="unlabelled",
                  unreadable=_relative(unreadable, root))]


def _report(skipped: list[str], unreadable: list[tuple[Path, str]]) -> None:
    for line in skipped:
        print(f"featx: skipped {line}", file=sys.stderr)
    for folder, reason in unreadable:
        print(f"featx: skipped {folder}: {reason}; recorded as failed", file=sys.stderr)


def _relative(unreadable: list[tuple[Path, str]], root: Path) -> tuple[tuple[str, str], ...]:
    return tuple((folder.relative_to(root).as_posix(), reason) for folder, reason in unreadable)


def _manifest_rows(path: storage.Location) -> tuple[list[str], list[dict], int]:
    """(columns, rows, number of the first data row as a user counts it: 2 under a CSV header, 0 in Parquet). A CSV
    may start with a UTF-8 byte-order mark (Excel's "CSV UTF-8")."""
    if storage.name(path).lower().endswith(".csv"):
        with storage.open_input(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader), 2
    import pyarrow.parquet as pq

    with storage.open_input(path) as f:
        table = pq.read_table(f)
    return table.column_names, table.to_pylist(), 0


def manifest(path: storage.Location, root: storage.Location | None = None, label_key: str = "label",
             path_key: str = "path") -> list[Split]:
    """Splits of a CSV or Parquet manifest (a file, or a URL): ``path_key`` (relative to ``root``, default the
    manifest's folder, or absolute, or URLs; without a ``path`` column, the common names of other tools are read,
    with a note), optional ``label_key`` column (class names, or integers) and ``split`` (train/val/test and their
    aliases)."""
    columns, rows, first = _manifest_rows(path)
    root, path = root or storage.parent(path), storage.shown(path)
    if path_key == "path" and "path" not in columns:
        path_key = next((name for name in PATH_COLUMNS if name in columns), path_key)
        if path_key != "path":
            print(f"featx: note: {path} has no 'path' column; reading the image paths from {path_key!r} "
                  "(--path_key names another)", file=sys.stderr)
    if path_key not in columns:
        raise ValueError(f"{path} has no {path_key!r} column (its columns: {', '.join(columns) or 'none'}); name the "
                         "column of image paths with --path_key")
    if not rows:
        raise ValueError(f"{path} has a header but no rows: nothing to read")
    table = [(number, str(row[path_key]), row.get(label_key), row.get("split") if "split" in columns else None)
             for number, row in enumerate(rows, start=first)]
    return _table_splits(path, root, table, label_key in columns, label_key)


def hf_imagefolder(root: Path, label_key: str = "label") -> list[Split]:
    """A Hugging Face imagefolder: ``[split/]metadata.csv`` with ``file_name`` (relative to its folder) and the
    ``label_key`` column; each split folder's table is that split."""
    folders = split_folders(root) or [(split_name(root.name) or "all", root)]
    table = []
    for name, folder in folders:
        columns, rows, first = _manifest_rows(folder / HF_METADATA)
        if "file_name" not in columns:
            raise ValueError(f"{folder / HF_METADATA} has no 'file_name' column (its columns: {', '.join(columns)})")
        if label_key not in columns:
            raise ValueError(f"{folder / HF_METADATA} has no {label_key!r} column to label the images with (its "
                             f"columns: {', '.join(columns)}); name the label column with --label_key, or give "
                             "--source imagefolder to label by class folders")
        base = folder.relative_to(root)
        table += [(f"{folder.name}/{HF_METADATA} row {number}", (base / str(row["file_name"])).as_posix(),
                   row.get(label_key), name) for number, row in enumerate(rows, start=first)]
    return _table_splits(root, root, table, True, label_key)


def _table_splits(where: Path, root: Path, table: list[tuple], labelled: bool, label_key: str) -> list[Split]:
    """Splits of (row, path, label, split) entries: split names made canonical, exact duplicates kept once and a
    file in two splits reported (one line each), labels checked (``_labels``)."""
    entries = []
    for number, path, label, split in table:
        name = split_name(str(split)) if split not in (None, "") else "all"
        if name is None:
            raise ValueError(f"{where} row {number}, column split: {split!r} is not a split name (train, val, "
                             f"test; or {', '.join(SPLIT_ALIASES)} for val)")
        entries.append((number, path, label, name))
    entries = _without_duplicates(where, entries, labelled)
    if labelled:
        labels, class_names = _labels(where, [(n, label) for n, _, label, _ in entries], label_key,
                                      [s == "train" for *_, s in entries])
    else:
        labels, class_names = np.full(len(entries), -1, np.int64), ()
    names = [s for *_, s in entries]
    return [Split(name, root, tuple(path for _, path, _, s in entries if s == name),
                  labels[[s == name for s in names]], class_names, source="manifest")
            for name in (*SPLIT_NAMES, "all") if name in names]


def _without_duplicates(where: Path, entries: list[tuple], labelled: bool) -> list[tuple]:
    """Entries with exact repeats (same path, split and label) dropped; both reported on stderr with counts, and
    a file in two splits reported. The same file with two labels is an error naming its rows."""
    first: dict[str, tuple] = {}
    kept, repeats, across = [], 0, set()
    for entry in entries:
        number, path, label, split = entry
        seen = first.get(path)
        if seen is None:
            first[path] = entry
            kept.append(entry)
            continue
        if labelled and str(seen[2]).strip() != str(label).strip():
            raise ValueError(f"{where} rows {seen[0]} and {number}: {path} has two labels ({seen[2]!r}, {label!r})")
        if seen[3] == split:
            repeats += 1
            continue
        across.add(path)
        kept.append(entry)
    if repeats:
        print(f"featx: {where}: {repeats} duplicate rows (same file, split and label) read once", file=sys.stderr)
    if across:
        print(f"featx: {where}: {len(across)} files are in more than one split (e.g. {sorted(across)[0]}); scores on "
              "a split that shares files with train are not held out", file=sys.stderr)
    return kept


def _label_value(where, number, column: str, value) -> int | str:
    """One label as an integer or a class name: integral floats (``1.0``, pandas' floats) are integers; booleans,
    lists and empty values are errors naming the row."""
    if isinstance(value, bool) or str(value).strip().lower() in ("true", "false"):
        raise ValueError(f"{where} row {number}, column {column}: {value!r} is a boolean, not a class; map it to "
                         "class names or integers")
    if isinstance(value, (list, tuple, dict)) or str(value).strip().startswith(("[", "{")):
        raise ValueError(f"{where} row {number}, column {column}: {value!r} holds several values; featx takes one "
                         "label per image")
    if isinstance(value, float) and value != value or value is None or not str(value).strip():
        raise ValueError(f"{where} row {number}, column {column}: the label is empty")
    if isinstance(value, (int, np.integer)):
        return int(value)
    text = str(value).strip()
    try:
        number_value = float(text)
    except ValueError:
        return text
    return int(number_value) if number_value.is_integer() else text


def _labels(where, values: list[tuple[int | str, object]], column: str, train: list[bool]
            ) -> tuple[np.ndarray, tuple[str, ...]]:
    """Label indices and class names from (row, value) pairs of one kind: all integers (classes 0..max, named by
    number) or all class names (sorted, from the training rows when there are any)."""
    first: dict[str, int | str] = {}  # kind of label -> the first row holding one
    parsed = []
    for number, value in values:
        label = _label_value(where, number, column, value)
        kind = "an integer" if isinstance(label, int) else "a class name"
        first.setdefault(kind, number)
        if len(first) > 1:
            other = next(k for k in first if k != kind)
            raise ValueError(f"{where} row {number}, column {column}: {value!r} is {kind}, but row {first[other]} "
                             f"holds {other}; use one kind of label")
        parsed.append(label)
    if "an integer" in first:
        labels = np.asarray(parsed, np.int64)
        if labels.min() < 0:
            raise ValueError(f"{where}, column {column}: integer labels must be >= 0")
        return labels, tuple(str(i) for i in range(int(labels.max()) + 1))
    known = sorted({n for n, t in zip(parsed, train) if t} or set(parsed))
    unknown = sorted(set(parsed) - set(known))
    if unknown:
        raise ValueError(f"{where}: labels {unknown} do not occur in the training rows; classes come from the "
                         f"training split: {', '.join(known)}")
    return np.asarray([known.index(n) for n in parsed], np.int64), tuple(known)


def tar_files(spec: str) -> list[storage.Location]:
    """The tar files a spec names (on disk or at URLs): brace syntax (``train-{000000..000099}.tar``), a glob, a folder
    (an img2dataset output folder too), or one file. Compressed tars are refused by name: their members cannot be
    read in place."""
    from braceexpand import braceexpand

    url = storage.is_url(spec)
    if not spec.endswith((".tar", *COMPRESSED_TARS)) and not any(c in spec for c in "{*?[") \
            and (url or Path(spec).is_dir()):  # a folder
        files = [storage.join(spec, name) for name in storage.names(spec) if name.endswith((".tar", *COMPRESSED_TARS))]
    else:
        files = [f if url else Path(f) for pattern in braceexpand(spec)
                 for f in (_matches(pattern) if any(c in pattern for c in "*?[") else [pattern])]
    missing = [storage.shown(f) for f in files if not storage.is_file(f)]
    if missing:
        raise FileNotFoundError(f"tar shards not found: {', '.join(missing[:3])}" +
                                (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    compressed = [f for f in files if storage.name(f).endswith(COMPRESSED_TARS)]
    if compressed:
        name = storage.name(compressed[0])
        raise ValueError(f"{storage.shown(compressed[0])} is a compressed tar: featx reads tar members in place, which "
                         f"a compressed tar does not allow; decompress it first (e.g. gunzip -c {name} > "
                         f"{name.split('.')[0]}.tar)")
    return files


def _matches(pattern: str) -> list[str]:
    """Files matching a glob pattern (on disk or object storage), sorted; the pattern itself when none do (then
    reported missing)."""
    return (storage.glob(pattern) if storage.is_url(pattern) else sorted(glob.glob(pattern))) or [pattern]


def _index_tar(tar: storage.Location) -> list[tuple[str, Member, dict[str, bytes]]]:
    """(key, image member, {".cls"/".txt"/".json": bytes}) of every sample, in the tar's order, read from its headers
    and its small text members alone (streamed once, in large reads, on object storage). A tar cut short keeps the
    samples before the cut; the sample at the cut fails when it is read."""
    samples: dict[str, dict] = {}
    cut, file = "", os.fspath(tar)
    with storage.errors(tar), storage.open_input(tar, block_size=TAR_READ_BLOCK) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r:") as archive:
                for info in archive:
                    if not info.isfile():
                        continue
                    folder, _, name = info.name.rpartition("/")
                    key, _, extension = name.partition(".")
                    sample = samples.setdefault(f"{folder}/{key}" if folder else key, {"texts": {}})
                    extension = "." + extension.lower()
                    if extension in TAR_IMAGE_EXTENSIONS and "image" not in sample:
                        sample["image"] = Member(file, info.offset_data, info.size)
                    elif extension in TAR_TEXT_EXTENSIONS:
                        sample["texts"].setdefault(extension, archive.extractfile(info).read())
        except (tarfile.ReadError, EOFError) as error:
            cut = f"{storage.name(tar)} is cut short or damaged here ({error})"
            print(f"featx: {storage.shown(tar)} is cut short or damaged after {len(samples)} samples ({error}); the "
                  "samples before are read", file=sys.stderr)
    indexed = []
    for number, (key, sample) in enumerate(samples.items()):
        member = sample.get("image") or Member(file, 0, 0, f"no image member (.jpg, .png, .webp) for {key}")
        if cut and number == len(samples) - 1:
            member = member._replace(problem=cut)
        indexed.append((key, member, sample["texts"]))
    return indexed


def _tar_label(tar: storage.Location, key: str, texts: dict[str, bytes], label_key: str):
    """A sample's label: ``.cls`` when it has one; else ``.json``'s ``label_key``, or the ``.txt`` caption when
    ``label_key`` is ``txt``; None when it has none of these."""
    if ".cls" in texts:
        text = texts[".cls"].decode("utf-8", "replace").strip()
        return int(text) if text.lstrip("-").isdigit() else text
    if label_key == "txt":
        return texts[".txt"].decode("utf-8", "replace").strip() if ".txt" in texts else None
    if ".json" not in texts:
        return None
    try:
        value = json.loads(texts[".json"])
    except ValueError:
        raise ValueError(f"{storage.shown(tar)}: {key}.json is not JSON") from None
    return value.get(label_key) if isinstance(value, dict) else None


def _keys_found(texts: dict[str, list[str]]) -> str:
    """What a tar's samples do hold, to name in an error: their first JSON's keys, and whether they have captions."""
    first = next((text for text in texts["json"] if text), None)
    try:
        keys = sorted(json.loads(first)) if first else []
    except (ValueError, TypeError):
        keys = []
    held = [f"their .json keys: {', '.join(keys)}" if keys else "no .json labels"]
    return "; ".join(held + (["captions in .txt"] if any(texts["caption"]) else []))


def tar_shards(spec: str, label_key: str = "label", labelled: bool = True) -> list[Split]:
    """One split of WebDataset tar shards, one tar per shard; named after the shards' common split prefix
    (``train-000000.tar``, ``validation-000000.tar`` -> ``val``), else ``all``. ``labelled=False`` reads no labels;
    captions (``.txt``) and JSON are kept as the ``caption`` and ``json`` columns."""
    tars = tar_files(spec)
    if not tars:
        raise FileNotFoundError(f"no .tar files in {spec}")
    paths, members, values, sizes = [], [], [], []
    texts: dict[str, list[str]] = {"caption": [], "json": []}
    for tar in tars:
        samples = _index_tar(tar)
        for key, member, found in samples:
            paths.append(f"{storage.name(tar)}/{key}")
            members.append(member)
            values.append(None if member.problem or not labelled else _tar_label(tar, key, found, label_key))
            texts["caption"].append(found.get(".txt", b"").decode("utf-8", "replace").strip())
            texts["json"].append(found.get(".json", b"").decode("utf-8", "replace").strip())
        sizes.append(len(samples))
    readable = [i for i, member in enumerate(members) if not member.problem]  # the others fail when read
    labelled_items = [i for i in readable if values[i] is not None]
    if labelled and readable and not labelled_items and label_key != "label":  # asked for, and in no sample
        raise ValueError(f"no sample of {spec} has a label under --label_key {label_key!r} ({_keys_found(texts)}); "
                         "name the .json key that holds the label, or txt for the captions")
    if labelled_items and len(labelled_items) != len(readable):
        missing = next(i for i in readable if values[i] is None)
        raise ValueError(f"{paths[missing]} has no label but {paths[labelled_items[0]]} has one")
    labels, class_names = np.full(len(paths), -1, np.int64), ()
    if labelled_items:
        known, class_names = _labels(spec, [(paths[i], values[i]) for i in labelled_items], label_key,
                                     [True] * len(labelled_items))
        labels[labelled_items] = known
    names = {split_name(storage.name(tar).split("-")[0].split(".")[0]) for tar in tars}
    name = names.pop() if len(names) == 1 and None not in names else "all"
    root = storage.parent(tars[0]) if storage.is_url(tars[0]) else \
        Path(os.path.commonpath([str(t.parent.resolve()) for t in tars]))
    columns = tuple((column, tuple(values)) for column, values in texts.items() if any(values))
    return [Split(name, root, tuple(paths), labels, class_names, tuple(members), tuple(sizes), "webdataset", columns)]


def detect(data: str, folder: Path | ListedPath | None = None) -> str:
    """The source ``data`` names: a CSV/Parquet file, tar shards (or an img2dataset folder), a Hugging Face
    imagefolder, a folder of class folders, or of images. ``folder``: ``data`` as a folder (``folder_at``), when
    already listed."""
    named = _kind_by_name(data)
    if named:
        return named
    path = folder or folder_at(data)
    if not path.is_dir():
        raise FileNotFoundError(f"data {storage.shown(data)} does not exist (give a folder, a .csv/.parquet manifest "
                                "or .tar shards)")
    if any((path / name).is_file() for name in HF_ARROW):
        raise ValueError(f"{data} is a Hugging Face `datasets` folder (save_to_disk's Arrow files), which featx does "
                         "not read: write its images out as files (an ImageFolder, or a CSV with path and label "
                         "columns), or push it as an imagefolder")
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    tars = [p for p in entries if p.name.endswith((".tar", *COMPRESSED_TARS))]
    if tars and all(p in tars or p.suffix.lower() in (".parquet", ".json") for p in entries):  # img2dataset's too
        return "webdataset"
    folders = [folder for _, folder in split_folders(path)] or [path]
    if any((folder / HF_METADATA).is_file() for folder in folders):
        return "hf-imagefolder"
    loose = any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for f in folders for p in f.iterdir())
    return "unlabelled" if loose else "imagefolder"


def _kind_by_name(data: str) -> str | None:
    """``manifest`` or ``webdataset`` when ``data``'s name says so (no listing), else None."""
    name = storage.name(data)
    if PurePosixPath(name).suffix.lower() in (".csv", ".parquet", ".pq") and storage.is_file(data):
        return "manifest"
    if name.endswith((".tar", *COMPRESSED_TARS)) or any(c in data for c in "{*?["):
        return "webdataset"
    return None


def discover(data: str | os.PathLike, source: str = "auto", root: str | os.PathLike | None = None,
             label_key: str = "label", path_key: str = "path") -> list[Split]:
    """The splits of ``data`` (a local path, or a URL: ``featx.storage``) read as ``source`` (``auto``:
    ``detect``). ``root``: the folder a manifest's relative paths start from (default: the manifest's folder).
    ``label_key``: the manifest column, JSON key (tars) or ``txt`` (tar captions as labels) that holds the label;
    ``path_key``: a manifest's column of paths."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
    data = os.fspath(data)
    named, folder = _kind_by_name(data), None
    if source == "auto" and not named:
        folder = folder_at(data)  # listed once
    kind = (named or detect(data, folder)) if source == "auto" else source
    if kind == "manifest":
        return manifest(data if storage.is_url(data) else Path(data), root, label_key, path_key)
    if kind == "webdataset" or (kind == "unlabelled" and (named or detect(data, folder)) == "webdataset"):
        return tar_shards(data, label_key, labelled=kind == "webdataset")
    folder = folder or folder_at(data)
    if kind == "hf-imagefolder":
        return hf_imagefolder(folder, label_key)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {storage.shown(data)} does not exist")
    return unlabelled_folder(folder) if kind == "unlabelled" else image_folder(folder)
