"""Sources (the reader role's first half): what to read, as ``Split``s. Every source gives the same thing: items
in a stable order, their labels (or none), where their bytes are, a fingerprint for resume, and natural shard
boundaries where it has them. The runner, the engines and ``finetune`` never know which source they read.

- **imagefolder**: ``DATA/[split/]class/image``.
- **unlabelled**: a folder of images with no class folders, searched recursively (labels -1).
- **manifest**: a CSV or Parquet file with a ``path`` column and optional ``label`` and ``split`` columns.
- **webdataset**: tar shards (``shards/train-{000000..000099}.tar``, a glob, or a folder of ``.tar`` files) of
  ``key.jpg|png|webp`` samples with an optional ``key.cls``, ``key.json`` or ``key.txt`` label; each tar is indexed
  once (its headers only) and its members are read in place, one tar per shard.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import NamedTuple

import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")
SOURCES = ("auto", "imagefolder", "unlabelled", "manifest", "webdataset")
TAR_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
TAR_LABEL_EXTENSIONS = (".cls", ".json", ".txt")


class Member(NamedTuple):
    """Where an image's bytes are inside a (tar) file: read with ``pread``, no unpacking. ``problem``: why the
    sample cannot be read (no image member, cut short with its file), raised on reading."""

    file: str
    offset: int
    size: int
    problem: str = ""

    def read(self) -> io.BytesIO:
        """The member's bytes; a member cut short by a truncated file is an error."""
        if self.problem:
            raise ValueError(self.problem)
        with open(self.file, "rb") as f:
            data = os.pread(f.fileno(), self.size, self.offset)
        if len(data) != self.size:
            raise EOFError(f"truncated: {len(data)} of {self.size} bytes in {Path(self.file).name}")
        return io.BytesIO(data)


def list_images(folder: Path, seen: set | None = None, skipped: list[str] | None = None) -> list[Path]:
    """Regular image files under ``folder``, sorted; hidden files/folders and other extensions ignored.

    Links to files are read like files. Links to directories are followed, but each real directory is walked
    once: a link to a directory already walked or in ``seen`` (a loop, or a second way to the same images) is
    not followed, and is added to ``skipped`` with why. ``seen`` holds (device, inode) pairs and grows.
    """
    seen = set() if seen is None else seen
    seen.add(directory_key(folder))
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
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

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def subset(self, mask: np.ndarray, name: str) -> "Split":
        """The items where ``mask`` is true, as a split called ``name``."""
        paths = tuple(p for p, keep in zip(self.paths, mask) if keep)
        members = tuple(m for m, keep in zip(self.members, mask) if keep) if self.members else None
        return Split(name, self.root, paths, self.labels[mask], self.class_names, members, None, self.source)

    def fingerprint(self) -> str:
        """sha256 over class names, relative paths and labels: changes when the file list does."""
        digest = hashlib.sha256()
        digest.update("\0".join(self.class_names).encode())
        for path, label in zip(self.paths, self.labels.tolist()):
            digest.update(f"\n{path}\t{label}".encode())
        return digest.hexdigest()


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_folder(root: Path) -> list[Split]:
    """Splits of an ImageFolder tree: ``train/``, ``val/`` ... when present, else ``root`` as one split.

    Class names come from the training split (else the first split) and apply to every split.
    """
    split_dirs = [(name, root / name) for name in SPLIT_NAMES if (root / name).is_dir()]
    if not split_dirs:
        split_dirs = [(root.name if root.name in SPLIT_NAMES else "all", root)]
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
        paths, labels, skipped = [], [], []
        for label, class_name in enumerate(class_names):
            class_folder = folder / class_name
            for path in list_images(class_folder, seen, skipped) if class_folder.is_dir() else []:
                paths.append(path.relative_to(root).as_posix())
                labels.append(label)
        for line in skipped:
            print(f"featx: skipped {line}", file=sys.stderr)
        if not paths:
            raise ValueError(f"{folder} has no images in its class folders ({', '.join(class_names)})")
        splits.append(Split(name, root, tuple(paths), np.asarray(labels, dtype=np.int64), tuple(class_names)))
    return splits


def unlabelled_folder(root: Path) -> list[Split]:
    """Every image under ``root`` (recursively, sorted) as one split ``all`` with no labels."""
    skipped: list[str] = []
    paths = tuple(p.relative_to(root).as_posix() for p in list_images(root, skipped=skipped))
    for line in skipped:
        print(f"featx: skipped {line}", file=sys.stderr)
    if not paths:
        raise ValueError(f"{root} holds no images")
    return [Split("all", root, paths, np.full(len(paths), -1, np.int64), (), source="unlabelled")]


def _manifest_rows(path: Path) -> tuple[list[str], list[dict], int]:
    """(columns, rows, number of the first data row as a user counts it: 2 under a CSV header, 0 in Parquet)."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader), 2
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return table.column_names, table.to_pylist(), 0


def manifest(path: Path, root: Path | None = None) -> list[Split]:
    """Splits of a CSV or Parquet manifest: ``path`` (relative to ``root``, default the manifest's folder, or
    absolute), optional ``label`` (class names, or integers) and ``split`` (train/val/valid/validation/test)."""
    columns, rows, first = _manifest_rows(path)
    if "path" not in columns:
        raise ValueError(f"{path} has no 'path' column (its columns: {', '.join(columns) or 'none'})")
    root = Path(root) if root else path.parent
    numbered = list(enumerate(rows, start=first))
    splits = [str(row.get("split") or "").strip() or "all" for _, row in numbered] if "split" in columns else \
        ["all"] * len(rows)
    for (number, _), split in zip(numbered, splits):
        if split not in (*SPLIT_NAMES, "all"):
            raise ValueError(f"{path} row {number}, column split: {split!r} is not one of {', '.join(SPLIT_NAMES)}")
    labels, class_names = _labels(path, [(n, row.get("label")) for n, row in numbered], "label",
                                  [s == "train" for s in splits]) if "label" in columns else \
        (np.full(len(rows), -1, np.int64), ())
    order = [name for name in (*SPLIT_NAMES, "all") if name in splits]
    return [Split(name, root, tuple(str(row["path"]) for row, s in zip(rows, splits) if s == name),
                  labels[[s == name for s in splits]], class_names, source="manifest") for name in order]


def _labels(where, values: list[tuple[int | str, object]], column: str, train: list[bool]
            ) -> tuple[np.ndarray, tuple[str, ...]]:
    """Label indices and class names from (row, value) pairs of one kind: all integers (classes 0..max, named by
    number) or all class names (sorted, from the training rows when there are any)."""
    first: dict[str, int | str] = {}  # kind of label -> the first row holding one
    for number, value in values:
        text = str(value).strip() if value is not None else ""
        if not text:
            raise ValueError(f"{where} row {number}, column {column}: the label is empty")
        kind = "an integer" if isinstance(value, int) or text.lstrip("-").isdigit() else "a class name"
        first.setdefault(kind, number)
        if len(first) > 1:
            other = next(k for k in first if k != kind)
            raise ValueError(f"{where} row {number}, column {column}: {value!r} is {kind}, but row {first[other]} "
                             f"holds {other}; use one kind of label")
    if "an integer" in first:
        labels = np.asarray([int(str(v).strip()) for _, v in values], np.int64)
        if labels.min() < 0:
            raise ValueError(f"{where}, column {column}: integer labels must be >= 0")
        return labels, tuple(str(i) for i in range(int(labels.max()) + 1))
    names = [str(v).strip() for _, v in values]
    known = sorted({n for n, t in zip(names, train) if t} or set(names))
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"{where}: labels {unknown} do not occur in the training rows; classes come from the "
                         f"training split: {', '.join(known)}")
    return np.asarray([known.index(n) for n in names], np.int64), tuple(known)


def tar_files(spec: str) -> list[Path]:
    """The tar files a spec names: brace syntax (``train-{000000..000099}.tar``), a glob, a folder, or one file."""
    from braceexpand import braceexpand

    path = Path(spec)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    files = [Path(f) for pattern in braceexpand(spec) for f in (sorted(glob.glob(pattern)) or [pattern])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"tar shards not found: {', '.join(missing[:3])}" +
                                (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return files


def _index_tar(tar: Path) -> list[tuple[str, Member, object]]:
    """(key, image member, label value or None) of every sample, in the tar's order, read from its headers alone.
    A tar cut short keeps the samples before the cut; the sample at the cut fails when it is read."""
    samples: dict[str, dict] = {}
    cut = ""
    try:
        with tarfile.open(tar, "r:") as archive:
            for info in archive:
                if not info.isfile():
                    continue
                folder, _, name = info.name.rpartition("/")
                key, _, extension = name.partition(".")
                sample = samples.setdefault(f"{folder}/{key}" if folder else key, {})
                extension = "." + extension.lower()
                if extension in TAR_IMAGE_EXTENSIONS and "image" not in sample:
                    sample["image"] = Member(str(tar), info.offset_data, info.size)
                elif extension in TAR_LABEL_EXTENSIONS:
                    sample["label"] = (extension, archive.extractfile(info).read())
    except (tarfile.ReadError, EOFError) as error:
        cut = f"{tar.name} is cut short or damaged here ({error})"
        print(f"featx: {tar} is cut short or damaged after {len(samples)} samples ({error}); the samples before "
              "are read", file=sys.stderr)
    indexed = []
    for number, (key, sample) in enumerate(samples.items()):
        member = sample.get("image") or Member(str(tar), 0, 0, f"no image member (.jpg, .png, .webp) for {key}")
        if cut and number == len(samples) - 1:
            member = member._replace(problem=cut)
        indexed.append((key, member, None if member.problem else _tar_label(tar, key, sample.get("label"))))
    return indexed


def _tar_label(tar: Path, key: str, found: tuple[str, bytes] | None):
    if found is None:
        return None
    extension, data = found
    text = data.decode("utf-8", "replace").strip()
    if extension == ".json":
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(f"{tar}: {key}.json is not JSON") from None
        return value.get("label", value.get("cls")) if isinstance(value, dict) else value
    return int(text) if extension == ".cls" and text.lstrip("-").isdigit() else text


def tar_shards(spec: str) -> list[Split]:
    """One split of WebDataset tar shards, one tar per shard; named after the shards' common split prefix
    (``train-000000.tar`` -> ``train``), else ``all``."""
    tars = tar_files(spec)
    if not tars:
        raise FileNotFoundError(f"no .tar files in {spec}")
    paths, members, values, sizes = [], [], [], []
    for tar in tars:
        samples = _index_tar(tar)
        for key, member, value in samples:
            paths.append(f"{tar.name}/{key}")
            members.append(member)
            values.append(value)
        sizes.append(len(samples))
    readable = [i for i, member in enumerate(members) if not member.problem]  # the others fail when read
    labelled = [i for i in readable if values[i] is not None]
    if labelled and len(labelled) != len(readable):
        missing = next(i for i in readable if values[i] is None)
        raise ValueError(f"{paths[missing]} has no label but {paths[labelled[0]]} has one")
    labels, class_names = np.full(len(paths), -1, np.int64), ()
    if labelled:
        known, class_names = _labels(spec, [(paths[i], values[i]) for i in labelled], "label", [True] * len(labelled))
        labels[labelled] = known
    prefixes = {tar.name.split("-")[0].split(".")[0] for tar in tars}
    name = prefixes.pop() if len(prefixes) == 1 and prefixes <= set(SPLIT_NAMES) else "all"
    root = Path(os.path.commonpath([str(t.parent.resolve()) for t in tars]))
    return [Split(name, root, tuple(paths), labels, class_names, tuple(members), tuple(sizes), "webdataset")]


def detect(data: str) -> str:
    """The source ``data`` names: a CSV/Parquet file, tar shards, a folder of class folders, or of images."""
    path = Path(data)
    if path.is_file() and path.suffix.lower() in (".csv", ".parquet", ".pq"):
        return "manifest"
    if path.suffix.lower() == ".tar" or any(c in data for c in "{*?["):
        return "webdataset"
    if not path.is_dir():
        raise FileNotFoundError(f"data {data} does not exist (give a folder, a .csv/.parquet manifest or .tar shards)")
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if entries and all(p.suffix.lower() == ".tar" for p in entries):
        return "webdataset"
    folders = [path / name for name in SPLIT_NAMES if (path / name).is_dir()] or [path]
    loose = any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for f in folders for p in f.iterdir())
    return "unlabelled" if loose else "imagefolder"


def discover(data: str | os.PathLike, source: str = "auto", root: str | os.PathLike | None = None) -> list[Split]:
    """The splits of ``data`` read as ``source`` (``auto``: ``detect``). ``root``: the folder a manifest's
    relative paths start from (default: the manifest's folder)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
    data = str(data)
    kind = detect(data) if source == "auto" else source
    if kind == "manifest":
        return manifest(Path(data), root)
    if kind == "webdataset":
        return tar_shards(data)
    if not Path(data).is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist")
    return unlabelled_folder(Path(data)) if kind == "unlabelled" else image_folder(Path(data))
