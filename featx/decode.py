"""Reader stage: decode images robustly (files, or members of tar shards) and preprocess them to uint8 batches.
Which images to read comes from ``featx.sources``.

Normalisation (float, mean/std) happens later, on the device, so batches cross to it as compact uint8. Images
are [3, H, W] tensors kept channels-last in memory, as PIL decodes them and as the model reads them: no
transposing copy on the way.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from featx import storage
from featx.sources import Member

_GLOBAL_RNG = threading.Lock()  # AugmentTransform reseeds torch's global generator: one thread at a time
READERS = ("auto", "threads", "pipeline", "processes")  # see read_batches
READ_AHEAD = 2  # batches whose bytes are read while the device works (threads reader, GPU)
REMOTE_READS = 16  # reads in flight for images on object storage (latency-bound: many GETs at once)
TAR_GAP = 64 << 10  # tar members at most this far apart are fetched in one ranged read (headers, labels between)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIL_FILTERS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # interpolations PIL has by name


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side, centre-crop, and (on the device) normalise: torchvision's eval preset.

    ``draft`` lets JPEG decoding shrink by DCT scaling (PIL ``draft``) to no less than ``resize`` first:
    faster for large photos, close to but not bit-identical with the exact path.
    ``resize_crop_only`` resamples only the source region that the centre crop keeps, straight to ``crop`` x
    ``crop`` (PIL ``resize(box=...)``): about half the resampling work, and ~1 % of pixel values differ by one
    level from the exact path (PIL images only; tensors, as decoded on the device, take the exact path).
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    draft: bool = False
    resize_crop_only: bool = False
    squash: bool = False  # resize both sides to ``resize`` (aspect not kept: Hugging Face's ViT processors)
    crop_offset: str = "round"  # the crop's offset: (size - crop) / 2 rounded (torchvision) or floored (Hugging Face)

    def __post_init__(self):
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} must not exceed resize {self.resize}")
        InterpolationMode(self.interpolation)  # raises on an unknown name
        if self.crop_offset not in ("round", "floor"):
            raise ValueError(f"crop_offset must be round or floor, got {self.crop_offset!r}")
        if self.resize_crop_only and (self.squash or self.crop_offset != "round"):
            raise ValueError("resize_crop_only works with torchvision-style resizing only (this backbone's "
                             "preprocessing squashes or floors its crop)")
        if self.resize_crop_only and self.interpolation not in PIL_FILTERS:
            raise ValueError(f"resize_crop_only needs one of PIL's filters {sorted(PIL_FILTERS)}, "
                             f"got interpolation {self.interpolation!r}")

    @classmethod
    def from_dict(cls, described: dict) -> "EvalTransform":
        """Inverse of ``describe``."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in described.items()})

    def describe(self) -> dict:
        """JSON-ready description, stored as provenance (the fields added later only when not their defaults, so
        files written before they existed keep their identity)."""
        described = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        for name, value in (("resize_crop_only", False), ("squash", False), ("crop_offset", "round")):
            if described[name] == value:
                del described[name]
        return described

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """PIL RGB image, or uint8 tensor [3, H, W] on any device -> uint8 tensor [3, crop, crop] (same device)."""
        if self.resize_crop_only and isinstance(image, Image.Image):
            size, box = (self.crop, self.crop), self.crop_box(*image.size)
            pil_filter = TF.pil_modes_mapping[InterpolationMode(self.interpolation)]  # as TF.resize picks it
            return pil_to_uint8(image.resize(size, pil_filter, box=box))
        size = [self.resize, self.resize] if self.squash else self.resize
        image = TF.resize(image, size, interpolation=InterpolationMode(self.interpolation), antialias=True)
        if self.crop_offset == "floor":
            height, width = image.shape[-2:] if isinstance(image, torch.Tensor) else image.size[::-1]
            image = TF.crop(image, (height - self.crop) // 2, (width - self.crop) // 2, self.crop, self.crop)
        else:
            image = TF.center_crop(image, self.crop)
        return image.contiguous() if isinstance(image, torch.Tensor) else pil_to_uint8(image)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region (left, top, right, bottom), in source pixels, of a ``width`` x ``height`` image that the
        resize and centre crop keep; sizes and offsets rounded as torchvision rounds them."""
        short, long = sorted((width, height))
        resized_long = int(self.resize * long / short)
        resized_w, resized_h = (self.resize, resized_long) if width <= height else (resized_long, self.resize)
        top, left = round((resized_h - self.crop) / 2), round((resized_w - self.crop) / 2)
        scale_x, scale_y = width / resized_w, height / resized_h
        return (left * scale_x, top * scale_y, (left + self.crop) * scale_x, (top + self.crop) * scale_y)


@dataclass(frozen=True)
class AugmentTransform:
    """RandomResizedCrop + horizontal flip (the tutorials' train augmentation), seeded per item.

    Each (seed, item) pair always gives the same crop, whatever the worker or a resumed run.
    """

    crop: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"
    seed: int = 0

    def describe(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def __call__(self, image: Image.Image, item: int) -> torch.Tensor:
        """PIL RGB image -> uint8 tensor [3, crop, crop], augmented as item ``item`` of this seed."""
        with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + item)
            top, left, height, width = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
            flip = bool(torch.rand(()) < 0.5)
        image = TF.resized_crop(image, top, left, height, width, [self.crop, self.crop],
                                interpolation=InterpolationMode(self.interpolation))
        return pil_to_uint8(TF.hflip(image) if flip else image)


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W] over PIL's [H, W, 3] pixels (channels-last, not copied again)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def load_rgb(path: str | os.PathLike | io.BytesIO, draft_size: int | None = None) -> Image.Image:
    """Decode any image (a file, or its bytes) to 8-bit RGB: EXIF orientation applied; 16-bit scaled;
    transparency over white."""
    if isinstance(path, io.BytesIO):
        path.seek(0)
    with Image.open(path) as image:
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def read_bytes(path: str | os.PathLike | io.BytesIO) -> bytes:
    """The bytes of a file, or of a tar member already read."""
    return path.getvalue() if isinstance(path, io.BytesIO) else Path(path).read_bytes()


def jpeg_bytes(path: str | os.PathLike | io.BytesIO) -> torch.Tensor | None:
    """A file's bytes when they are a JPEG (known by its first two bytes: no parsing, so reading costs only the
    read), else None: other files are decoded with PIL. EXIF orientation and greyscale are handled by the device
    decoder (``decode_on_device``); a JPEG it rejects (CMYK or progressive on nvjpeg) goes to PIL there."""
    data = read_bytes(path)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data[:2] == b"\xff\xd8" else None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, RGBA, CMYK, I;16, I, F ...) to RGB."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F":  # 16-bit integer samples
            values = values / 257.0
        elif values.max() <= 1.0:  # float images are usually 0..1
            values = values * 255.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


class Batch(NamedTuple):
    """A collated batch: decoded images with their row indices, the rows that failed with why, and JPEG files
    still to be decoded (``decode_on_device``): their row indices, their bytes concatenated, and byte counts."""

    indices: torch.Tensor  # int64 [b] item indices (image index x views + view)
    images: torch.Tensor  # uint8 [b, 3, H, W]
    failed: list[tuple[int, str]]
    encoded_indices: torch.Tensor = torch.empty(0, dtype=torch.int64)
    encoded: torch.Tensor = torch.empty(0, dtype=torch.uint8)  # one tensor, not one per file: cheap to pass
    encoded_sizes: torch.Tensor = torch.empty(0, dtype=torch.int64)  # between processes

    @property
    def size(self) -> int:
        """Items in the batch, failed and still-encoded ones included."""
        return len(self.indices) + len(self.failed) + len(self.encoded_indices)


def bytes_hash(data: bytes) -> int:
    """The 64-bit content hash featx records per image (BLAKE2b, 8 bytes, as an unsigned integer)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class ImageFiles(torch.utils.data.Dataset):
    """Files -> uint8 tensors. A file that cannot be decoded yields its error instead of raising.

    With ``views`` > 1 and an ``augment`` transform, item ``i`` is view ``i % views`` of image ``i // views``.
    With ``encoded``, plain JPEGs come back as their bytes (a 1-D tensor) for ``decode_on_device``. ``members``:
    for each path, where its bytes are inside a tar (or None: the file ``root / path``). ``root`` and the paths may be
    URLs (``featx.storage``): then each image's bytes are fetched as it is decoded.
    """

    def __init__(self, root: storage.Location, paths: tuple[str, ...], transform: EvalTransform, views: int = 1,
                 augment: AugmentTransform | None = None, encoded: bool = False,
                 members: tuple[Member | None, ...] | None = None):
        root = os.fspath(root) if storage.is_url(root) else root  # a URL as text (not a listing) crosses to workers
        self.root, self.paths, self.transform, self.views, self.augment = root, paths, transform, views, augment
        self.encoded = encoded and augment is None  # augmentation (PIL crops) always decodes with PIL
        self.members = members
        self.remote = storage.is_url(root) or any(storage.is_url(m.file) for m in members or () if m) or \
            any(storage.is_url(p) for p in paths)
        self.fetched: dict[int, int] = {}  # image -> content hash of bytes fetched over the network, not yet asked for
        self.prefetched: dict[int, bytes] = {}  # image -> its bytes, fetched ahead of decoding (``fetch``)

    @property
    def decoder(self) -> str:
        """What decodes plain JPEGs: ``torchvision.io.decode_jpeg`` (on the model's device) or ``PIL``."""
        return "torchvision.io.decode_jpeg" if self.encoded else "PIL"

    def __len__(self) -> int:
        return len(self.paths) * self.views

    def content_hash(self, item: int) -> int:
        """A 64-bit hash (BLAKE2b) of item ``item``'s image bytes: the same image has the same hash wherever it is
        and whatever it is called; 0 when it cannot be read."""
        image = item // self.views
        if image in self.fetched:  # hashed as it was fetched: no second download
            return self.fetched.pop(image)
        try:
            return bytes_hash(read_bytes(self._source(image)))
        except storage.StorageUnavailable:
            raise
        except (OSError, ValueError):
            return 0

    def original(self, image: int) -> Image.Image:
        """Image ``image`` decoded to RGB as it is, with no transform (thumbnails, copies for calibration)."""
        return load_rgb(self._source(image))

    def _source(self, image: int) -> Path | io.BytesIO:
        """Image ``image``'s file, or its bytes (read from its tar, or fetched from object storage)."""
        member = self.members[image] if self.members else None
        where = None if member else storage.join(self.root, self.paths[image])
        if not self.remote:
            return member.read() if member else where
        data = self.prefetched.pop(image, None)
        data = io.BytesIO(data) if data is not None else member.read() if member else \
            io.BytesIO(storage.read_bytes(where))
        self.fetched[image] = bytes_hash(data.getvalue())
        return data

    def fetch_groups(self, items: list[int]) -> list[list[int]]:
        """The images of ``items`` grouped as they are best fetched from object storage: neighbouring members of one
        tar together (one ranged read), the files together (fetched concurrently, ``storage.read_many``)."""
        images = sorted({item // self.views for item in items})
        if not self.members:
            return [images]
        groups: list[list[int]] = []
        for image in images:
            member = self.members[image]
            last = self.members[groups[-1][-1]] if groups else None
            if member and last and not (member.problem or last.problem) and member.file == last.file \
                    and 0 <= member.offset - (last.offset + last.size) <= TAR_GAP:
                groups[-1].append(image)
            else:
                groups.append([image])
        return groups

    def fetch(self, images: list[int]) -> None:
        """Fetch the bytes of ``images`` (a group of ``fetch_groups``) ahead of decoding, into ``prefetched``. An
        image that cannot be fetched is left out: decoding reads it again and records why it failed."""
        members = [self.members[image] for image in images] if self.members else [None]
        try:
            if members[0] is None:
                found = storage.read_many([storage.join(self.root, self.paths[image]) for image in images])
                self.prefetched.update((i, data) for i, data in zip(images, found) if isinstance(data, bytes))
                return
            if members[0].problem:  # read (and its problem raised) when decoded
                return
            start = members[0].offset
            data = storage.read_bytes(members[0].file, start, members[-1].offset + members[-1].size - start)
        except storage.StorageUnavailable:
            raise
        except Exception:  # noqa: BLE001 - recorded when the image is decoded
            return
        for image, member in zip(images, members):
            piece = data[member.offset - start:member.offset - start + member.size]
            if len(piece) == member.size:  # a cut-short tar is read, and reported, member by member
                self.prefetched[image] = piece

    def __getitem__(self, item: int) -> tuple[int, torch.Tensor | None, str]:
        image = item // self.views
        try:
            path = self._source(image)
            if self.augment is not None:
                return item, self.augment(load_rgb(path), item), ""
            if self.encoded and (data := jpeg_bytes(path)) is not None:
                return item, data, ""
            draft = self.transform.resize if self.transform.draft else None
            return item, self.transform(load_rgb(path, draft)), ""
        except storage.StorageUnavailable:  # no image can be read until the user acts: stop, record nothing
            raise
        except Exception as error:  # noqa: BLE001 - every decode failure is recorded, none is fatal
            return item, None, f"{type(error).__name__}: {error}".strip()


def collate(items: list[tuple[int, torch.Tensor | None, str]]) -> Batch:
    """Stack the decoded images; keep the failures and the undecoded bytes aside so labels never shift."""
    good = [(i, image) for i, image, _ in items if image is not None and image.dim() == 3]
    failed = [(i, reason) for i, image, reason in items if image is None]
    encoded = [(i, data) for i, data, _ in items if data is not None and data.dim() == 1]
    if not encoded:
        return Batch(*_stack(good), failed)
    return Batch(*_stack(good), failed, torch.tensor([i for i, _ in encoded]), torch.cat([d for _, d in encoded]),
                 torch.tensor([len(d) for _, d in encoded]))


def _stack(images: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices, and images as one [b, 3, H, W] batch in channels_last memory (a plain copy of PIL's pixels)."""
    if not images:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.uint8)
    pixels = torch.stack([image.permute(1, 2, 0) for _, image in images])  # [b, H, W, 3]
    return torch.tensor([i for i, _ in images], dtype=torch.int64), pixels.permute(0, 3, 1, 2)


def decode_on_device(batch: Batch, transform: EvalTransform, device: torch.device) -> Batch:
    """Decode the batch's JPEG bytes on ``device`` in one batched call (nvjpeg on CUDA; EXIF orientation applied),
    resize and crop them there, and join them to its decoded images (moved to ``device``). A file the device
    decoder rejects takes the CPU path (PIL) instead; only a file that fails there too is recorded as failed."""
    if not len(batch.encoded_indices):
        return batch
    encoded = list(zip(batch.encoded_indices.tolist(), batch.encoded.split(batch.encoded_sizes.tolist())))
    decoded, failed = [], list(batch.failed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=DeprecationWarning)
        try:
            images = decode_jpeg([data for _, data in encoded], ImageReadMode.RGB, device,
                                 apply_exif_orientation=True)
            decoded = [(i, transform(image)) for (i, _), image in zip(encoded, images)]
        except RuntimeError:  # one file the device decoder rejects fails the whole batch call: one by one
            for i, data in encoded:
                try:
                    decoded.append((i, transform(decode_jpeg(data, ImageReadMode.RGB, device,
                                                             apply_exif_orientation=True))))
                except RuntimeError:
                    try:  # the CPU path, as if the file had never been sent to the device
                        decoded.append((i, transform(load_rgb(io.BytesIO(data.numpy().tobytes()))).to(device)))
                    except Exception as error:  # noqa: BLE001 - every decode failure is recorded
                        failed.append((i, f"{type(error).__name__}: {error}".strip()))
    if len(batch.indices):
        decoded += list(zip(batch.indices.tolist(), batch.images.to(device, non_blocking=True)))
    return Batch(*_stack(sorted(decoded, key=lambda item: item[0])), failed)  # rows stay in file order


def sequential_batches(count: int, batch_size: int) -> list[list[int]]:
    """Items 0..count-1 in order, cut in batches of ``batch_size``."""
    return [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]


def read_batches(dataset: ImageFiles, batches: list[list[int]], workers: int | None, device: torch.device,
                 reader: str = "auto") -> Iterator[Batch]:
    """Decoded batches in order, by ``workers`` threads or processes (None: one per core). ``threads`` (``auto``
    on a CPU-only run): a thread pool decodes each batch while the model waits, then the model runs while the
    pool waits, so the cores never serve both (decode processes would preempt the model's threads).
    ``pipeline``: the threads decode ``READ_AHEAD`` batches ahead of the model, overlapping with it (on 2 CPU
    cores slower than taking turns: measured in ``benchmarks/bench_extract.py``). ``processes`` (``auto`` with a
    GPU): DataLoader workers overlap decoding with the device. With a GPU and ``decode_on_device``
    (``dataset.encoded``), ``auto`` uses threads that only read bytes, ``READ_AHEAD`` batches ahead of the device."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if reader in ("threads", "pipeline") or (reader == "auto" and (device.type == "cpu" or dataset.encoded)):
        with ThreadPoolExecutor(max(workers, 1)) as pool, ThreadPoolExecutor(REMOTE_READS) as network:
            if dataset.remote:  # bytes fetched READ_AHEAD batches ahead, while the model and decoding run
                batches = _fetched_ahead(dataset, batches, network)
            if device.type == "cpu" and reader != "pipeline":
                for batch in batches:
                    yield collate(list(pool.map(dataset.__getitem__, batch)))
                return
            pending: deque = deque()  # read READ_AHEAD batches ahead of the model
            for batch in batches:
                pending.append([pool.submit(dataset.__getitem__, item) for item in batch])
                if len(pending) > READ_AHEAD:
                    yield collate([future.result() for future in pending.popleft()])
            while pending:
                yield collate([future.result() for future in pending.popleft()])
        return
    yield from torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                           pin_memory=device.type == "cuda", worker_init_fn=_single_threaded)


def _fetched_ahead(dataset: ImageFiles, batches: list[list[int]], network: ThreadPoolExecutor
                   ) -> Iterator[list[int]]:
    """``batches`` in order, each once its images' bytes are fetched (``ImageFiles.fetch``), fetching running
    ``READ_AHEAD`` batches ahead; a store that cannot be reached stops the run here."""
    pending: deque = deque()
    for batch in batches:
        pending.append((batch, [network.submit(dataset.fetch, group) for group in dataset.fetch_groups(batch)]))
        if len(pending) > READ_AHEAD:
            yield _when_fetched(*pending.popleft())
    for batch, futures in pending:
        yield _when_fetched(batch, futures)


def _when_fetched(batch: list[int], futures: list) -> list[int]:
    for future in futures:
        future.result()  # raises what stopped the fetch
    return batch


def _single_threaded(_worker_id: int) -> None:
    torch.set_num_threads(1)
