"""Images/s of the plain tutorial loop vs `featx extract`, same images and backbone, JPEG decode included.

The plain loop is the PyTorch tutorial's: torchvision ImageFolder + PIL transforms (Resize 256, CenterCrop 224,
ToTensor, Normalize) + DataLoader(batch_size=4, num_workers=4) + the eager float32 model under no_grad, moved to
the device as the tutorial does. A second plain row uses featx's batch size and worker count, so the gain from
batching alone is visible. Every timed run is a fresh process. featx's time is also split into its stages
(decode, host->device, model, write), each measured alone in one process. Every loop uses the same weights: the
mirror's real ones for MobileNetV2 and SqueezeNet 1.1, random ones for the rest.

``--runtimes`` adds a row per ``--runtime`` (torch, onnxruntime), ``--reader pipeline`` (decode overlapping the
model), ``--precision bf16`` (where the CPU has it natively) and ``--precision int8`` (or why it is refused), with
each one's agreement with plain PyTorch float32 on real images, its model stage and the peak RSS of every run.

    python benchmarks/bench_extract.py --runtimes --backbones mobilenet_v2,resnet18 --repeats 3
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

from featx.backbones import BackboneSpec, create_backbone  # noqa: E402
from featx.decode import (IMAGENET_MEAN, IMAGENET_STD, EvalTransform, ImageFiles, collate,  # noqa: E402
                          decode_on_device)
from featx.devices import cpu_flags, resolve_device  # noqa: E402
from featx.embed import Embedder, choose_runtime  # noqa: E402
from featx.extract import extract  # noqa: E402
from featx.options import ExtractOptions  # noqa: E402
from featx.runtimes import agreement  # noqa: E402
from featx.sources import discover  # noqa: E402
from featx.store import ShardWriter  # noqa: E402

REAL_WEIGHTS = {"mobilenet_v2": "mobilenet_v2-imagenet-features.pth", "squeezenet1_1": "squeezenet1_1-imagenet.pth"}


def plain_loop(data: Path, backbone: str, weights: str, batch_size: int, workers: int, device: torch.device) -> int:
    """The tutorial's loop over every split; returns the number of images."""
    preprocess = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                     transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    folders = [data / s for s in ("train", "val", "test") if (data / s).is_dir()] or [data]
    dataset = torch.utils.data.ConcatDataset([datasets.ImageFolder(f, preprocess) for f in folders])
    model = create_backbone(backbone, weights).model.eval().to(device)
    count = 0
    with torch.no_grad():
        for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers):
            model(images.to(device)).cpu()
            count += len(images)
    return count


def featx_extract(data: Path, backbone: str, weights: str, options: ExtractOptions, changes: dict) -> int:
    with tempfile.TemporaryDirectory() as out:
        summaries = extract(data, BackboneSpec(backbone, weights, **changes), out, options=options)
    return sum(s["num_rows"] + s["num_failed"] for s in summaries.values())


def stage_split(data: Path, backbone: str, weights: str, batch_size: int, device: torch.device, on_device: bool,
                region: bool, mappers: dict) -> dict:
    """Milliseconds per image of each featx stage, measured alone on one process (``region``: also the decode
    with ``resize_crop_only``; the model stage once per ``mappers``: label -> Embedder keyword arguments)."""
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
    for label, mapper in mappers.items():
        embedder = Embedder(create_backbone(backbone, weights), str(device), **mapper)
        embedder(images[:batch_size])  # warm-up
        with timed(times, f"model ({label})"):
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


def measured(function, *args) -> tuple[float, int, float]:
    """(images/s, images, peak RSS in MB of this process: ``VmHWM``, as ``ru_maxrss`` carries the parent's peak
    across exec; DataLoader workers not included) of ``function(*args)``."""
    rate, count = rate_of(function, *args)
    status = Path("/proc/self/status").read_text()
    return rate, count, int(status.split("VmHWM:")[1].split()[0]) / 1024


def agreement_of(data: Path, backbone: str, weights: str, mappers: dict) -> dict:
    """Each mapper's features (label -> Embedder keyword arguments) against plain PyTorch float32 eager on the first
    64 real images of the first split: max abs difference and min cosine."""
    split = discover(data)[0]
    files = ImageFiles(split.root, split.paths, EvalTransform())
    images = collate([files[i] for i in range(min(64, len(files)))]).images
    model = create_backbone(backbone, weights)
    reference = Embedder(model, "cpu", "fp32", channels_last=False, fold_batch_norm=False)(images)
    return {label: agreement(reference, Embedder(model, "cpu", **mapper)(images)) for label, mapper in mappers.items()}


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
    parser.add_argument("--runtimes", action="store_true",
                        help="also time each --runtime, --reader pipeline and --precision bf16 (where native)")
    args = parse_args(parser)
    args.data = args.data or mirror() / "datasets" / "hymenoptera_data"

    device = resolve_device(args.device)
    os.environ["FEATX_CACHE"] = tempfile.mkdtemp(prefix="featx-bench-cache-")  # so one-time costs are timed
    workers = args.workers if args.workers is not None else os.cpu_count()
    featx_options = ExtractOptions(batch_size=args.batch_size, workers=workers, device=str(device))
    native_bf16 = device.type == "cuda" or bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    featx_transforms = {"": {}}  # featx's row suffix -> the changes to the weights' preprocessing
    if args.draft:
        featx_transforms[" --draft"] = {"draft": True}
    if args.resize_crop_only:
        featx_transforms[" --resize_crop_only"] = {"resize_crop_only": True}
    with tempfile.TemporaryDirectory() as folder:
        data = replicated(args.data, args.copies, Path(folder)) if args.copies > 1 else args.data
        rows = []
        table = ["| backbone | loop | images/s | vs tutorial loop | peak RSS MB | max abs / min cos vs PyTorch fp32 |",
                 "|---|---|---|---|---|---|"]
        for backbone in args.backbones.split(","):
            real = mirror() / "weights" / REAL_WEIGHTS.get(backbone, "-")
            weights = str(real) if real.is_file() else "none"
            mappers = {"torch": {"precision": "fp32"}}  # the model stage and agreement of each runtime/precision
            refusals: list[str] = []
            start = time.perf_counter()  # auto's one-time cost: the ONNX export and the measurement
            chosen = in_fresh_process(chosen_runtime, backbone, weights, featx_options) if device.type == "cpu" \
                else "torch"
            choice_seconds = time.perf_counter() - start
            runs = {  # name -> (function, args, mapper label), each timed in a fresh process
                "plain (tutorial: batch 4, 4 workers)": (plain_loop, (data, backbone, weights, 4, 4, device), None),
                f"plain (batch {args.batch_size}, {workers} workers)":
                    (plain_loop, (data, backbone, weights, args.batch_size, workers, device), None),
            }
            for suffix, transform in featx_transforms.items():
                runs[f"featx extract{suffix} (runtime auto: {chosen})"] = (
                    featx_extract, (data, backbone, weights, featx_options, transform), chosen)
            if args.runtimes and device.type == "cpu":
                mappers["onnxruntime"] = {"precision": "fp32", "runtime": "onnxruntime"}
                for runtime in ("torch", "onnxruntime"):
                    runs[f"featx extract --runtime {runtime}"] = (
                        featx_extract, (data, backbone, weights, replace(featx_options, runtime=runtime), {}),
                        runtime)
                runs["featx extract --reader pipeline (decode overlapping the model)"] = (
                    featx_extract, (data, backbone, weights, replace(featx_options, reader="pipeline"), {}), chosen)
                int8 = replace(featx_options, precision="int8")
                try:  # calibrated on these images, and refused where it would move the features
                    in_fresh_process(featx_extract, data, backbone, weights, int8, {})
                    runs["featx extract --precision int8 (ONNX Runtime, calibrated here)"] = (
                        featx_extract, (data, backbone, weights, int8, {}), None)
                except ValueError as refused:
                    rows.append({"backbone": backbone, "loop": "featx --precision int8", "refused": str(refused)})
                    refusals.append(f"| {backbone} | --precision int8 refused: {refused} | | | | |")
            if args.runtimes:
                label = "bf16" if native_bf16 else "bf16 (emulated: featx refuses it on this CPU)"
                mappers[label] = {"precision": "bf16", "emulate": not native_bf16}
                if native_bf16:
                    runs["featx extract --precision bf16"] = (
                        featx_extract, (data, backbone, weights, replace(featx_options, precision="bf16"), {}),
                        label)
            if args.decode_on_device:
                on_device = replace(featx_options, decode_on_device=True)
                runs["featx extract --decode_on_device"] = (
                    featx_extract, (data, backbone, weights, on_device, {}), "torch")
            if args.compile:  # the package is compiled once, outside the timed runs, and its cost reported
                compiled = replace(featx_options, compile=True)
                start = time.perf_counter()
                in_fresh_process(featx_extract, data, backbone, weights, compiled, {})
                compile_run = time.perf_counter() - start
                rows.append({"backbone": backbone, "loop": "featx --compile, first run (compiles the package)",
                             "seconds": compile_run})
                for suffix, transform in featx_transforms.items():
                    runs[f"featx extract --compile{suffix} (package cached)"] = (
                        featx_extract, (data, backbone, weights, compiled, transform), None)
            agreements = agreement_of(args.data, backbone, weights, mappers) if device.type == "cpu" else {}
            results = {name: (0.0, 0.0) for name in runs}
            for _ in range(args.repeats):  # interleaved, so a drift of the machine's speed hits every loop
                for name, (function, function_args, _label) in runs.items():
                    rate, count, peak = in_fresh_process(measured, function, *function_args)
                    results[name] = (max(results[name][0], rate), max(results[name][1], peak))
                    print(f"{backbone} {name}: {rate:.1f} images/s, peak RSS {peak:.0f} MB", flush=True)
            baseline = next(iter(results.values()))[0]
            for name, (rate, peak) in results.items():
                agrees = agreements.get(runs[name][2])
                rows.append({"backbone": backbone, "weights": weights, "loop": name, "images_per_second": rate,
                             "ratio": rate / baseline, "peak_rss_mb": peak, "images": count, "agreement": agrees})
                table.append(f"| {backbone} | {name} | {rate:.1f} | {rate / baseline:.2f}x | {peak:.0f} | " +
                             (f"{agrees['max_abs']:.1e} / {agrees['min_cosine']:.6f}" if agrees else "") + " |")
            table.append(f"| {backbone} | runtime auto's first run here: {choice_seconds:.1f} s (ONNX export and "
                         "measurement, once per model and host) | | | | |")
            table += refusals
            for label, agrees in agreements.items():
                if label not in {runs[name][2] for name in runs}:
                    table.append(f"| {backbone} | {label} (not timed end to end) | | | | "
                                 f"{agrees['max_abs']:.1e} / {agrees['min_cosine']:.6f} |")
            if args.compile:
                table.append(f"| {backbone} | featx --compile, first run in a fresh cache: "
                             f"{compile_run:.0f} s (compiles once per weights/batch/crop) | | | | |")
            for on_device in (False, True) if args.decode_on_device else (False,):
                stages = stage_split(data, backbone, weights, args.batch_size, device, on_device,
                                     args.resize_crop_only, mappers)
                what = "featx stages alone" + (" (decode on device)" if on_device else "")
                rows.append({"backbone": backbone, "loop": f"{what} (ms/image, one process)", **stages})
                table.append(f"| {backbone} | {what}, ms/image: " +
                             ", ".join(f"{k} {v:.2f}" for k, v in stages.items()) + " | | | | |")
    write_results(f"bench_extract{'' if device.type == 'cpu' else '_' + device.type}",
                  {"data": str(args.data), "copies": args.copies, "rows": rows}, table, args.out)


def chosen_runtime(backbone: str, weights: str, options: ExtractOptions) -> str:
    """What ``--runtime auto`` picks for ``backbone`` here (measuring it once, into the cache the runs share)."""
    return choose_runtime(create_backbone(backbone, weights), "auto", torch.device(options.device), None)


if __name__ == "__main__":
    guarded(main)
