"""Training examples/s: the d2l-style fine-tuning loop vs `featx finetune`, same model, batch size and data; or,
with ``--engine ray``, featx's local engine vs Ray Train on the same cores.

d2l loop (`train_ch13` with `train_batch_ch13`): ImageFolder + PIL RandomResizedCrop(224)/flip/ToTensor/Normalize,
DataLoader(shuffle, num_workers=4), eager contiguous model in train mode, SGD with the head at 10x lr, loss summed
over the batch, model and batches moved to the device. Changed: batch 32 instead of 128 on the CPU, one epoch
over the ants/bees train split (linked --copies times for a GPU). Every epoch runs in a fresh process.

``--engine ray``: the same `featx finetune` run (``--epochs``, global batch ``--batch_size``) on the local engine,
on Ray Train with 1 worker x 2 cores, and with 2 workers x 1 core (a local Ray instance each, in a fresh process,
interleaved): steady-state img/s (the median epoch after the first), the training time and the rest of the wall time
(start-up, Ray, validation, checkpoints); and the all-reduce a DDP step does, timed alone: the model's gradient in
DDP's 25 MB buckets over gloo between 2 processes. Run it in a loopback-only namespace:

    python benchmarks/bench_finetune.py --backbones resnet18,mobilenet_v2
    python benchmarks/bench_finetune.py --device cuda --batch_size 128 --copies 20
    tests/isolated.sh python benchmarks/bench_finetune.py --engine ray --backbones mobilenet_v2 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, transforms

from featx.cli import guarded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_fresh_process, mirror, parse_args, replicated, synchronize, write_results  # noqa: E402

from featx.backbones import classifier_layer_name, create_model, replace_classifier  # noqa: E402
from featx.decode import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from featx.devices import resolve_device  # noqa: E402
from featx.finetuning import FinetuneConfig, prepare, train_one_epoch  # noqa: E402


def d2l_loop(data: Path, backbone: str, batch_size: int, device: torch.device) -> float:
    """One epoch of the d2l loop; returns training examples/s."""
    augment = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(data / "train", augment), batch_size=batch_size,
                                         shuffle=True, num_workers=4)
    model = create_model(backbone, "none")[0]
    head = replace_classifier(model, backbone, 2)
    model.to(device)
    nn.init.xavier_uniform_(head.weight)
    head_name = classifier_layer_name(model, backbone)
    body = [p for n, p in model.named_parameters() if not n.startswith(head_name + ".")]
    optimizer = torch.optim.SGD([{"params": body}, {"params": head.parameters(), "lr": 5e-4}], lr=5e-5,
                                weight_decay=1e-3)
    loss = nn.CrossEntropyLoss(reduction="none")
    model.train()
    seen, start = 0, time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        loss(model(images), labels).sum().backward()
        optimizer.step()
        seen += len(labels)
    synchronize(device)
    return seen / (time.perf_counter() - start)


def featx_loop(data: Path, backbone: str, batch_size: int, device: torch.device) -> float:
    """One epoch of featx's loop (channels_last on CPU, decode threads taking turns with the model on CPU,
    uint8 batches normalised in the loop, bf16 autocast on CUDA); training examples/s."""
    run = prepare(data, FinetuneConfig(backbone=backbone, weights="none", batch_size=batch_size, epochs=1,
                                       device=str(device)))
    return train_one_epoch(run.model, run.optimizer, run.scheduler, run.scaler, run.loaders.train(1),
                           run.amp)["train_examples_per_second"]


RAY_LAYOUTS = {"local engine (1 process, 2 threads)": {},
               "Ray Train, 1 worker x 2 cores": {"engine": "ray", "ray_workers": 1, "ray_cpus_per_worker": 2},
               "Ray Train, 2 workers x 1 core": {"engine": "ray", "ray_workers": 2, "ray_cpus_per_worker": 1}}
BUCKET_BYTES = 25 << 20  # DDP's default bucket_cap_mb


def finetune_run(data: Path, backbone: str, batch_size: int, epochs: int, layout: dict) -> dict:
    """One `featx finetune` (random weights) in this process: wall time and each epoch's training rate and time."""
    import featx

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        featx.finetune(data, Path(folder) / "run", backbone=backbone, weights="none", epochs=epochs,
                       batch_size=batch_size, device="cpu", **layout)
        history = json.loads((Path(folder) / "run" / "history.json").read_text())[1:]
    return {"wall": time.perf_counter() - start, "rates": [h["train_examples_per_second"] for h in history],
            "train_seconds": [h["train_seconds"] for h in history]}


def _all_reduce_worker(rank: int, port: int, sizes: list[int], steps: int, result) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    buckets, current = [], 0
    for size in sizes:  # parameters in DDP's order (reversed), cut into buckets of about 25 MB
        if buckets and current + 4 * size <= BUCKET_BYTES:
            buckets[-1] += size
            current += 4 * size
        else:
            buckets.append(size)
            current = 4 * size
    tensors = [torch.ones(n) for n in buckets]
    seconds = []
    for _ in range(steps + 2):
        torch.distributed.barrier()
        start = time.perf_counter()
        for tensor in tensors:
            torch.distributed.all_reduce(tensor)
        seconds.append(time.perf_counter() - start)
    if rank == 0:
        result.put(statistics.median(seconds[2:]))
    torch.distributed.destroy_process_group()


def all_reduce_seconds(backbone: str, steps: int = 20) -> float:
    """The gradient all-reduce of one DDP step of ``backbone`` between 2 gloo processes on this machine, alone."""
    import socket

    import torch.multiprocessing as mp

    sizes = [p.numel() for p in reversed(list(create_model(backbone, "none")[0].parameters()))]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    result = context.Queue()
    mp.start_processes(_all_reduce_worker, args=(port, sizes, steps, result), nprocs=2, start_method="spawn")
    return result.get()


def ray_comparison(args: argparse.Namespace) -> None:
    """--engine ray: the local engine vs Ray Train's two layouts on the same cores (module docstring)."""
    rows, table = [], [f"global batch {args.batch_size}, {args.epochs} epochs, random weights; steady = the median "
                       "epoch after the first; best of the interleaved repeats", "",
                       "| backbone | engine | steady img/s | vs local | training s | rest of wall s (start-up, Ray, "
                       "val, checkpoints) | wall s |", "|---|---|---|---|---|---|---|"]
    for backbone in args.backbones.split(","):
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for name, layout in RAY_LAYOUTS.items():
                run = in_fresh_process(finetune_run, args.data, backbone, args.batch_size, args.epochs, layout)
                run["steady"] = statistics.median(run["rates"][1:] or run["rates"])
                if name not in best or run["steady"] > best[name]["steady"]:
                    best[name] = run
                print(f"{backbone}, {name}: {run['steady']:.1f} img/s steady, {run['wall']:.0f} s", flush=True)
        local = best[next(iter(RAY_LAYOUTS))]["steady"]
        reduce = all_reduce_seconds(backbone)
        for name, run in best.items():
            rows.append({"backbone": backbone, "engine": name, **run, "vs_local": run["steady"] / local})
            training = sum(run["train_seconds"])
            table.append(f"| {backbone} | {name} | {run['steady']:.1f} | {run['steady'] / local:.2f}x | {training:.1f} "
                         f"| {run['wall'] - training:.1f} | {run['wall']:.1f} |")
        step = args.batch_size / best["Ray Train, 2 workers x 1 core"]["steady"]
        table.append(f"| {backbone} | all-reduce of one step's gradient (2 gloo processes, alone) | "
                     f"{1000 * reduce:.1f} ms | {reduce / step:.0%} of a 2 x 1 step | | | |")
        rows.append({"backbone": backbone, "all_reduce_seconds": reduce, "step_seconds_2x1": step})
    write_results("bench_finetune_ray", {"batch_size": args.batch_size, "epochs": args.epochs,
                                         "repeats": args.repeats, "rows": rows}, table, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="image folder (default: the mirror's ants/bees)")
    parser.add_argument("--backbones", default="resnet18,mobilenet_v2")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--copies", type=int, default=1, help="link each image this many times (bigger set)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N epochs for each loop (interleaved)")
    parser.add_argument("--engine", default="loops", choices=("loops", "ray"),
                        help="loops: the d2l loop vs featx; ray: featx's local engine vs Ray Train")
    parser.add_argument("--epochs", type=int, default=3, help="--engine ray: epochs of each run")
    args = parse_args(parser)
    args.data = args.data or mirror() / "datasets" / "hymenoptera_data"
    if args.engine == "ray":
        ray_comparison(args)
        return
    device = resolve_device(args.device)
    rows, table = [], ["| backbone | loop | train examples/s | vs d2l loop |", "|---|---|---|---|"]
    for backbone in args.backbones.split(","):
        with tempfile.TemporaryDirectory() as folder:
            data = replicated(args.data, args.copies, Path(folder)) if args.copies > 1 else args.data
            d2l = featx = 0.0
            for _ in range(args.repeats):  # interleaved, so a drift of the machine's speed hits both loops
                d2l = max(d2l, in_fresh_process(d2l_loop, data, backbone, args.batch_size, device))
                featx = max(featx, in_fresh_process(featx_loop, data, backbone, args.batch_size, device))
                print(f"{backbone}: d2l {d2l:.1f}, featx {featx:.1f} examples/s (best so far)", flush=True)
        rows.append({"backbone": backbone, "d2l_examples_per_second": d2l, "featx_examples_per_second": featx,
                     "ratio": featx / d2l})
        table += [f"| {backbone} | d2l train_ch13 style | {d2l:.1f} | 1.00x |",
                  f"| {backbone} | featx finetune | {featx:.1f} | {featx / d2l:.2f}x |"]
    write_results(f"bench_finetune{'' if device.type == 'cpu' else '_' + device.type}",
                  {"batch_size": args.batch_size, "copies": args.copies, "repeats": args.repeats, "rows": rows},
                  table, args.out)


if __name__ == "__main__":
    guarded(main)
