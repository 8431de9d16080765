"""Where weights and datasets come from: the network, the local cache, or an offline mirror directory.

A mirror is a folder laid out like ``../shared``: ``<mirror>/weights/<file>`` and ``<mirror>/datasets/<folder>/``.
It is given by ``--mirror`` or the ``FEATX_MIRROR`` environment variable and is always tried before any download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

MIRROR_ENV = "FEATX_MIRROR"


def mirror_dir(mirror: str | os.PathLike | None = None) -> Path | None:
    """The mirror directory from the argument or ``$FEATX_MIRROR``; None when neither is set, or when the argument is
    ``none`` (download, whatever ``$FEATX_MIRROR`` says)."""
    chosen = mirror or os.environ.get(MIRROR_ENV)
    if not chosen or str(chosen).lower() == "none":
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"mirror directory {path} does not exist (from --mirror or ${MIRROR_ENV})")
    return path


def require_mirror(mirror: str | os.PathLike | None, what: str) -> Path:
    """``mirror_dir(mirror)``, or a one-line error saying how to give one when none is set."""
    root = mirror_dir(mirror)
    if root is None:
        raise FileNotFoundError(f"{what} needs the offline mirror: pass --mirror DIR or set ${MIRROR_ENV}=DIR "
                                "(a folder with weights/ and datasets/, laid out like ../shared)")
    return root


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mirrored_weights(filename: str, mirror: str | os.PathLike | None = None) -> Path | None:
    """``<mirror>/weights/<filename>`` if a mirror is set and holds that file."""
    root = mirror_dir(mirror)
    if root is None:
        return None
    candidate = root / "weights" / filename
    return candidate if candidate.is_file() else None


@dataclass(frozen=True)
class DatasetSource:
    """A downloadable ImageFolder dataset: zip URL, checksum, and the folder the zip unpacks to."""

    url: str
    folder: str
    sha1: str | None = None
    num_files: int | None = None  # content check where the publisher gives no checksum


DATASETS = {
    # The PyTorch transfer-learning tutorial's ants/bees; pytorch.org publishes no checksum, so the unpacked file
    # count (398) is checked instead.
    "hymenoptera": DatasetSource(
        url="https://download.pytorch.org/tutorial/hymenoptera_data.zip", folder="hymenoptera_data", num_files=398
    ),
    # d2l.ai "Fine-Tuning" chapter (d2l.DATA_HUB['hotdog']).
    "hotdog": DatasetSource(
        url="http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip",
        folder="hotdog",
        sha1="fba480ffa8aa7e0febbb511d181409f899b9baa5",
        num_files=2800,
    ),
}


def fetch_dataset(name: str, root: str | os.PathLike = "data", mirror: str | os.PathLike | None = None) -> Path:
    """Path of a known dataset: from the mirror if it holds it, else ``root/<folder>``, downloading it if needed."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    source = DATASETS[name]
    mirrored = mirror_dir(mirror)
    if mirrored is not None and (mirrored / "datasets" / source.folder).is_dir():
        return mirrored / "datasets" / source.folder
    target = Path(root) / source.folder
    if target.is_dir():
        return target
    created = not Path(root).exists()
    Path(root).mkdir(parents=True, exist_ok=True)
    archive = Path(root) / Path(source.url).name
    partial = archive.with_suffix(archive.suffix + ".part")
    print(f"downloading {source.url} -> {archive}")
    try:
        with urllib.request.urlopen(source.url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as error:
        partial.unlink(missing_ok=True)
        if created:
            shutil.rmtree(root, ignore_errors=True)  # leave no empty folder behind
        raise ConnectionError(
            f"could not download {source.url} ({error}); offline, put the unpacked folder {source.folder!r} under "
            f"<mirror>/datasets/ and pass --mirror or set ${MIRROR_ENV}"
        ) from error
    if source.sha1 and (actual := file_digest(partial, "sha1")) != source.sha1:
        partial.unlink()
        raise ValueError(f"{source.url}: sha1 {actual} does not match the expected {source.sha1}")
    partial.rename(archive)
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(root)
    archive.unlink()
    if source.num_files is not None:
        count = sum(1 for p in target.rglob("*") if p.is_file())
        if count != source.num_files:
            raise ValueError(f"{target} holds {count} files after unpacking, expected {source.num_files}")
    return target
