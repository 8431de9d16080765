"""Training examples/s: the d2l-style fine-tuning loop vs `featx finetune`, same model, batch size and data.

d2l loop (`train_ch13` with `train_batch_ch13`): ImageFolder + PIL RandomResizedCrop(224)/flip/ToTensor/Normalize,
DataLoader(shuffle, num_workers=4), eager contiguous model in train mode, SGD with the head at 10x lr, loss summed
over the batch, model and batches moved to the device. Changed: batch 32 instead of 128 on the CPU, one epoch
over the ants/bees train split (linked --copies times for a GPU). Every epoch runs in a fresh process.

    python benchmarks/bench_finetune.py --backbones resnet18,mobilenet_v2
    python benchmarks/bench_finetune.py --device cuda --batch_size 128 --copies 20
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="image folder (default: the mirror's ants/bees)")
    parser.add_argument("--backbones", default="resnet18,mobilenet_v2")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--copies", type=int, default=1, help="link each image this many times (bigger set)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N epochs for each loop (interleaved)")
    args = parse_args(parser)
    args.data = args.data or mirror() / "datasets" / "hymenoptera_data"
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
