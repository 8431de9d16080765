"""Command line: ``python -m featx <command> --help``."""

from __future__ import annotations

import sys

import fire

from featx import backbones as backbone_registry
from featx.data import EvalTransform
from featx.extract import ExtractError, ExtractOptions
from featx.extract import extract as run_extract


def extract(data, backbone="resnet18", weights="DEFAULT", out="features", mirror=None, batch_size=64,
            workers=None, device="auto", amp="auto", channels_last=True, compile=False, dtype="float32",
            compression=None, resize=None, crop=None, draft=False, shard_size=1024, splits=None,
            overwrite=False):
    """Run a frozen backbone over an ImageFolder tree and cache pooled features in HDF5.

    Writes OUT/BACKBONE/SPLIT.h5 for each split folder (train/, val/, test/) of DATA, or one file for DATA
    itself. An interrupted run resumes where it stopped; a finished one is left alone unless --overwrite.

    Args:
        data: data root (ImageFolder layout, with or without split folders).
        backbone: any torchvision classifier name (resnet18 ... resnet152, mobilenet_v2, squeezenet1_1, ...).
        weights: torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), a state-dict file, or none (random).
        out: output root folder.
        mirror: offline mirror folder with weights/ and datasets/ (default: $FEATX_MIRROR).
        batch_size: images per forward pass.
        workers: decode processes (default: one per CPU core).
        device: auto, cpu, cuda, cuda:1 ...
        amp: auto (bf16 on CUDA, off on CPU), none, bf16, fp16.
        channels_last: run the model in channels_last memory format.
        compile: wrap the model in torch.compile.
        dtype: stored feature dtype, float32 or float16.
        compression: HDF5 compression of features: gzip or lzf (default none).
        resize: shorter side after resizing (default: the weights' preset, usually 256).
        crop: centre-crop size (default: the weights' preset, usually 224).
        draft: decode JPEGs at reduced size (DCT scaling) before resizing; faster, not bit-exact.
        shard_size: images per committed shard (the most work an interruption can lose).
        splits: only these splits, e.g. --splits train,val.
        overwrite: recompute and replace existing output.
    """
    options = ExtractOptions(batch_size=batch_size, workers=workers, device=device, amp=amp,
                             channels_last=channels_last, compile=compile, dtype=dtype, compression=compression,
                             shard_size=shard_size, overwrite=overwrite)
    transform = None
    if resize is not None or crop is not None or draft:
        preset = backbone_registry.create_model(backbone, weights, mirror)[2]
        transform = EvalTransform(resize or preset.resize, crop or preset.crop, preset.mean, preset.std,
                                  preset.interpolation, draft)
    if isinstance(splits, str):
        splits = splits.split(",")
    run_extract(data, backbone, weights, out, mirror, transform, splits, options)


def backbones():
    """List the backbone names the registry can build."""
    print("\n".join(backbone_registry.available()))


COMMANDS = {"extract": extract, "backbones": backbones}
USER_ERRORS = (ValueError, FileNotFoundError, ExtractError, ConnectionError)


def main() -> None:
    """Entry point: run a command; user errors print one line and exit 2."""
    try:
        fire.Fire(COMMANDS, name="featx")
    except USER_ERRORS as error:
        print(f"featx: error: {error}", file=sys.stderr)
        sys.exit(2)
