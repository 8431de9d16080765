"""Images/s of the plain tutorial loop vs `featx extract`, same images and backbone, JPEG decode included.

The plain loop is the PyTorch tutorial's: torchvision ImageFolder + PIL transforms (Resize 256, CenterCrop 224,
ToTensor, Normalize) + DataLoader(batch_size=4, num_workers=4) + the eager float32 model under no_grad, moved to
the device as the tutorial does. A second plain row uses featx's batch size and worker count, so the gain from
batching alone is visible. Every timed run is a fresh process. featx's time is also split into its stages
(decode, host->device, model, write), each measured alone in one process.

    python benchmarks/bench_extract.py --data ../shared/datasets/hymenoptera_data --resize_crop_only --compile
    python benchmarks/bench_extract.py --device cuda --copies 25 --decode_on_device --backbones resnet50
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets, transforms

from featx.cli import guarded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (in_fresh_process, mirror, parse_args, rate_of, replicated, synchronize, timed,  # noqa: E402
                    write_results)

from featx.backbones import create_backbone  # noqa: E402
from featx.decode import (IMAGENET_MEAN, IMAGENET_STD, EvalTransform, ImageFiles, collate,  # noqa: E402
                          decode_on_device)
from featx.embed import Embedder, resolve_device  # noqa: E402
from featx.extract import ExtractOptions, extract  # noqa: E402
from featx.sources import discover  # noqa: E402
from featx.store import ShardWriter  # noqa: E402


def plain_loop(data: Path, backbone: str, batch_size: int, workers: int, device: torch.device) -> int:
    """The tutorial's loop over every split; returns the number of images."""
    preprocess = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                     transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    folders = [data / s for s in ("train", "val", "test") if (data / s).is_dir()] or [data]
    dataset = torch.utils.data.ConcatDataset([datasets.ImageFolder(f, preprocess) for f in folders])
    model = create_backbone(backbone, "none").model.eval().to(device)
    count = 0
    with torch.no_grad():
        for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers):
            model(images.to(device)).cpu()
            count += len(images)
    return count


def featx_extract(data: Path, backbone: str, options: ExtractOptions, transform: EvalTransform) -> int:
    with tempfile.TemporaryDirectory() as out:
        summaries = extract(data, backbone, "none", out, transform=transform, options=options)
    return sum(s["num_rows"] + s["num_failed"] for s in summaries.values())


def stage_split(data: Path, backbone: str, batch_size: int, device: torch.device, on_device: bool,
                region: bool) -> dict:
    """Milliseconds per image of each featx stage, measured alone on one process (``region``: also the decode
    with ``resize_crop_only``)."""
    split = discover(data)[0]
    files = ImageFiles(split.root, split.paths, EvalTransform(), encoded=on_device)
    count = min(len(files), 256)
    times: dict = {}
    if region and not on_device:
        fast = ImageFiles(split.root, split.paths, EvalTransform(resize_crop_only=True))
        with timed(times, "decode (PIL, resize_crop_only)"):
            collate([fast[i] for i in range(count)])
    with timed(times, "decode (PIL)" if not on_device else "read bytes"):
        batch = collate([files[i] for i in range(count)])
    if on_device:
        decode_on_device(batch, files.transform, device)  # warm-up: nvjpeg handles
        synchronize(device)
        with timed(times, "decode on device"):
            batch = decode_on_device(batch, files.transform, device)
            synchronize(device)
    with timed(times, "host->device"):
        images = batch.images.to(device)
        synchronize(device)
    embedder = Embedder(create_backbone(backbone, "none"), str(device))
    embedder(images[:batch_size])  # warm-up
    with timed(times, "model"):
        for start in range(0, count, batch_size):
            features = embedder(images[start:start + batch_size])
    with tempfile.TemporaryDirectory() as out:
        writer = ShardWriter(Path(out) / "part-00000.h5", features.shape[1])
        rows = np.random.default_rng(0).standard_normal((count, features.shape[1]), dtype=np.float32)
        with timed(times, "write"):
            for start in range(0, count, batch_size):
                items = np.arange(start, min(start + batch_size, count))
                writer.append(items, rows[start:start + batch_size], items.astype(np.uint64))
            writer.commit()
    return {k: 1000 * v / count for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="image folder (default: the mirror's ants/bees)")
    parser.add_argument("--copies", type=int, default=1, help="link each image this many times (bigger set)")
    parser.add_argument("--backbones", default="mobilenet_v2,resnet18,resnet50")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="featx decode workers (default: cores)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each timed run (interleaved)")
    parser.add_argument("--draft", action="store_true", help="also time featx with reduced-size JPEG decode")
    parser.add_argument("--resize_crop_only", action="store_true",
                        help="also time featx resampling only the region the centre crop keeps")
    parser.add_argument("--decode_on_device", action="store_true", help="also time featx decoding JPEGs on DEVICE")
    parser.add_argument("--compile", action="store_true", help="also time featx --compile (after a warm-up run)")
    args = parse_args(parser)
    args.data = args.data or mirror() / "datasets" / "hymenoptera_data"

    device = resolve_device(args.device)
    os.environ["FEATX_CACHE"] = tempfile.mkdtemp(prefix="featx-bench-cache-")  # so the one-time compile is timed
    workers = args.workers if args.workers is not None else os.cpu_count()
    featx_options = ExtractOptions(batch_size=args.batch_size, workers=workers, device=str(device))
    featx_transforms = {"": EvalTransform()}  # featx's row suffix -> transform
    if args.draft:
        featx_transforms[" --draft"] = EvalTransform(draft=True)
    if args.resize_crop_only:
        featx_transforms[" --resize_crop_only"] = EvalTransform(resize_crop_only=True)
    with tempfile.TemporaryDirectory() as folder:
        data = replicated(args.data, args.copies, Path(folder)) if args.copies > 1 else args.data
        rows, table = [], ["| backbone | loop | images/s | vs tutorial loop |", "|---|---|---|---|"]
        for backbone in args.backbones.split(","):
            runs = {  # name -> (function, args), each timed in a fresh process
                "plain (tutorial: batch 4, 4 workers)": (plain_loop, (data, backbone, 4, 4, device)),
                f"plain (batch {args.batch_size}, {workers} workers)":
                    (plain_loop, (data, backbone, args.batch_size, workers, device)),
            }
            for suffix, transform in featx_transforms.items():
                runs[f"featx extract{suffix}"] = (featx_extract, (data, backbone, featx_options, transform))
            if args.decode_on_device:
                on_device = replace(featx_options, decode_on_device=True)
                runs["featx extract --decode_on_device"] = (featx_extract, (data, backbone, on_device, EvalTransform()))
            if args.compile:  # the package is compiled once, outside the timed runs, and its cost reported
                compiled = replace(featx_options, compile=True)
                start = time.perf_counter()
                in_fresh_process(featx_extract, data, backbone, compiled, EvalTransform())
                compile_run = time.perf_counter() - start
                rows.append({"backbone": backbone, "loop": "featx --compile, first run (compiles the package)",
                             "seconds": compile_run})
                for suffix, transform in featx_transforms.items():
                    runs[f"featx extract --compile{suffix} (package cached)"] = (
                        featx_extract, (data, backbone, compiled, transform))
            rates = dict.fromkeys(runs, 0.0)
            for _ in range(args.repeats):  # interleaved, so a drift of the machine's speed hits every loop
                for name, (function, function_args) in runs.items():
                    rate, count = in_fresh_process(rate_of, function, *function_args)
                    rates[name] = max(rates[name], rate)
                    print(f"{backbone} {name}: {rate:.1f} images/s", flush=True)
            baseline = next(iter(rates.values()))
            for name, rate in rates.items():
                rows.append({"backbone": backbone, "loop": name, "images_per_second": rate, "ratio": rate / baseline,
                             "images": count})
                table.append(f"| {backbone} | {name} | {rate:.1f} | {rate / baseline:.2f}x |")
            if args.compile:
                table.append(f"| {backbone} | featx --compile, first run in a fresh cache: "
                             f"{compile_run:.0f} s (compiles once per weights/batch/crop) | | |")
            for on_device in (False, True) if args.decode_on_device else (False,):
                stages = stage_split(data, backbone, args.batch_size, device, on_device, args.resize_crop_only)
                what = "featx stages alone" + (" (decode on device)" if on_device else "")
                rows.append({"backbone": backbone, "loop": f"{what} (ms/image, one process)", **stages})
                table.append(f"| {backbone} | {what}, ms/image: " +
                             ", ".join(f"{k} {v:.2f}" for k, v in stages.items()) + " | | |")
    write_results(f"bench_extract{'' if device.type == 'cpu' else '_' + device.type}",
                  {"data": str(args.data), "copies": args.copies, "rows": rows}, table, args.out)


if __name__ == "__main__":
    guarded(main)
