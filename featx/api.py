"""The Python API for notebooks and scripts: ``featx.extract``, ``featx.embed_images``, ``featx.load``,
``featx.to_dataframe``."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from featx.backbones import create_backbone
from featx.decode import EvalTransform, collate, load_rgb, to_rgb
from featx.embed import Embedder
from featx.engines import RayOptions
from featx.export_features import to_dataframe
from featx.extract import ExtractOptions
from featx.extract import extract as run_extract
from featx.store import load


def extract(data: str | os.PathLike, backbone: str = "resnet18", weights: str = "DEFAULT",
            out: str | os.PathLike = "features", *, mirror: str | None = None, splits: list[str] | None = None,
            source: str = "auto", root: str | os.PathLike | None = None, transform: EvalTransform | None = None,
            engine: str = "local", ray_options: RayOptions = RayOptions(), label_key: str = "label", **options
            ) -> dict[str, dict]:
    """``featx extract`` from Python: per split, the written file (``path``), row and failure counts, timing and
    the failed files. ``options`` are ``ExtractOptions`` (batch_size, device, dtype, views, layout, overwrite ...);
    ``engine="ray"`` runs the shards on a Ray cluster (``ray_options``)."""
    return run_extract(data, backbone, weights, out, mirror, transform, splits, ExtractOptions(**options), source,
                       root, engine, ray_options, label_key)


def embed_images(images: list, backbone: str = "resnet18", weights: str = "DEFAULT", *, mirror: str | None = None,
                 batch_size: int = 64, device: str = "auto", transform: EvalTransform | None = None,
                 pool: str = "default", runtime: str = "auto") -> np.ndarray:
    """Pooled features [N, D] (float32) of image files or PIL images, in memory: the preprocessing and numbers of
    ``extract`` (timm's ``num_classes=0``, img2vec's ``get_vec``). An image that cannot be decoded is an error
    naming it."""
    extractor = create_backbone(backbone, weights, mirror, transform, pool)
    embedder = Embedder(extractor, device, runtime=runtime)
    rows = []
    for start in range(0, len(images), batch_size):
        pixels = [(i, extractor.transform(_rgb(image)), "") for i, image in enumerate(images[start:start + batch_size])]
        rows.append(embedder(collate(pixels).images).numpy())
    return np.concatenate(rows) if rows else np.empty((0, extractor.feature_dim), np.float32)


def _rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    try:
        return load_rgb(image)
    except Exception as error:  # noqa: BLE001 - named in one line
        raise ValueError(f"cannot decode {image}: {type(error).__name__}: {error}") from None


__all__ = ["embed_images", "extract", "load", "to_dataframe"]
