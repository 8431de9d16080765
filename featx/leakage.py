"""Near-duplicate leakage: held-out images whose nearest training image is a re-encoded, resized or cropped copy.

Exact copies are caught by content hash (``featx.metrics.seen_rows``); near copies are not. On cached features,
each held-out image's nearest training image (cosine) is compared with a threshold calibrated on the user's own
images: some training images are re-encoded, halved and cropped and embedded by the same backbone, and the
threshold lies halfway between the ``COPY_QUANTILE`` of those copies' cosines to their originals (nearly every such
copy lies above it) and the ``DISTINCT_QUANTILE`` of distinct training images' nearest-neighbour cosines (nearly
every distinct pair lies below it); where those two overlap, just above the distinct images.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

COPY_QUANTILE = 0.05
DISTINCT_QUANTILE = 0.99
CALIBRATION_IMAGES = 24
JPEG_QUALITY = 40
CROP_KEEPS = 0.85


def _reencoded(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _halved(image: Image.Image) -> Image.Image:
    return image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.BICUBIC)


def _cropped(image: Image.Image) -> Image.Image:
    margin = (1 - CROP_KEEPS) / 2
    return image.crop((round(image.width * margin), round(image.height * margin),
                       round(image.width * (1 - margin)), round(image.height * (1 - margin))))


COPIES: dict[str, Callable[[Image.Image], Image.Image]] = {
    f"JPEG quality {JPEG_QUALITY}": _reencoded, "half size": _halved, f"{CROP_KEEPS:.0%} centre crop": _cropped}


def normalised(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def nearest(train: np.ndarray, held: np.ndarray | None = None, rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """For each held-out row, the index of its nearest training row and their cosine similarity, ``rows`` rows at a
    time; without ``held``, each training row's nearest other training row."""
    train = normalised(train)
    held = train if held is None else normalised(held)
    index, cosine = np.zeros(len(held), np.int64), np.zeros(len(held), np.float32)
    for start in range(0, len(held), rows):
        similarity = held[start:start + rows] @ train.T
        if held is train:  # not itself
            similarity[np.arange(len(similarity)), np.arange(start, start + len(similarity))] = -1.0
        index[start:start + rows] = similarity.argmax(1)
        cosine[start:start + rows] = similarity.max(1)
    return index, cosine


def calibrate(train: np.ndarray, images: list[Image.Image], rows: np.ndarray,
              embed: Callable[[list[Image.Image]], np.ndarray]) -> dict:
    """The threshold for this backbone: ``images`` are the training images at ``rows`` of ``train`` (their cached
    features); ``embed`` gives features of PIL images as the extraction made them."""
    train = normalised(train)
    embedded = normalised(embed([make(image) for make in COPIES.values() for image in images]))
    cosines = (embedded.reshape(len(COPIES), len(images), -1) * train[rows]).sum(2)
    copies = dict(zip(COPIES, cosines))
    distinct = nearest(train)[1]
    distinct = distinct[distinct < 1 - 1e-6]  # exact copies inside train are not distinct images
    copy_cut = float(np.quantile(np.concatenate(list(copies.values())), COPY_QUANTILE))
    distinct_cut = float(np.quantile(distinct, DISTINCT_QUANTILE)) if len(distinct) else -1.0
    overlap = distinct_cut >= copy_cut
    return {"threshold": distinct_cut + 1e-3 if overlap else (copy_cut + distinct_cut) / 2,
            "copies_quantile": copy_cut, "distinct_quantile": distinct_cut, "overlap": overlap,
            "calibration_images": len(images),
            "copy_cosine_min": {name: float(values.min()) for name, values in copies.items()},
            "copy_cosine_median": {name: float(np.median(values)) for name, values in copies.items()}}


def describe(calibration: dict) -> str:
    """The threshold in words, for the report."""
    text = (f"cosine ≥ {calibration['threshold']:.3f}, halfway between {calibration['copies_quantile']:.3f} (the "
            f"{COPY_QUANTILE:.0%} quantile of the cosines between {calibration['calibration_images']} of your training "
            f"images and their copies: {', '.join(COPIES)}) and {calibration['distinct_quantile']:.3f} (the "
            f"{DISTINCT_QUANTILE:.0%} quantile of distinct training images' nearest-neighbour cosines)")
    if calibration["overlap"]:
        text = (f"cosine ≥ {calibration['threshold']:.3f}, just above the distinct training images' "
                f"{calibration['distinct_quantile']:.3f}: their copies ({', '.join(COPIES)}) reach down to "
                f"{calibration['copies_quantile']:.3f}, so some near copies are missed")
    return text
