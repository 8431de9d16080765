"""Wall time to a trained classifier on ants/bees with real MobileNetV2 weights: the tutorial's fixed-feature
extractor loop vs `featx extract` + `featx fit-head`, in one run.

Tutorial loop ("ConvNet as fixed feature extractor"): backbone frozen, new linear head, SGD lr 1e-3 momentum 0.9,
StepLR(7, 0.1), batch 4, 4 workers, 25 epochs, train transform RandomResizedCrop(224) + flip, the backbone
recomputed on every image every epoch, best-by-val weights kept. Changed: MobileNetV2 (the real ImageNet weights
available offline) instead of ResNet-18; its head is `classifier[1]`.

    python benchmarks/time_to_accuracy.py            # --epochs 25 by default
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, transforms

from featx.cli import guarded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_fresh_process, mirror, parse_args, write_results  # noqa: E402

from featx import store  # noqa: E402
from featx.backbones import BackboneSpec, create_model  # noqa: E402
from featx.decode import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from featx.extract import extract  # noqa: E402
from featx.fit import fit_head  # noqa: E402
from featx.options import ExtractOptions  # noqa: E402


def tutorial_fixed_feature_loop(data: Path, weights: str, epochs: int) -> tuple[float, list[float]]:
    """The tutorial's train_model with a frozen backbone; returns best val accuracy and per-epoch val accuracy."""
    torch.manual_seed(0)
    preprocess = {
        "train": transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]),
        "val": transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]),
    }
    images = {s: datasets.ImageFolder(data / s, preprocess[s]) for s in ("train", "val")}
    loaders = {s: torch.utils.data.DataLoader(images[s], batch_size=4, shuffle=True, num_workers=4)
               for s in ("train", "val")}
    model = create_model("mobilenet_v2", weights)[0]
    for parameter in model.parameters():
        parameter.requires_grad = False
    model.classifier[1] = nn.Linear(model.classifier[1].in_features, 2)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.classifier[1].parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    best_weights, best_accuracy, history = copy.deepcopy(model.state_dict()), 0.0, []
    for _ in range(epochs):
        for phase in ("train", "val"):
            model.train() if phase == "train" else model.eval()
            correct = 0
            for inputs, labels in loaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                correct += (outputs.argmax(1) == labels).sum().item()
            if phase == "train":
                scheduler.step()
            else:
                accuracy = correct / len(images["val"])
                history.append(accuracy)
                if accuracy > best_accuracy:
                    best_accuracy, best_weights = accuracy, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_weights)
    return best_accuracy, history


def featx_pipeline(data: Path, weights: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        extract(data, BackboneSpec("mobilenet_v2", weights), out, options=ExtractOptions(batch_size=64))
        features = Path(out) / "mobilenet_v2"
        head = fit_head(features / "train.h5", "none", "logreg", Path(out) / "head")
        val = store.load(features / "val.h5")
        return head.score(val.features, val.labels)  # as the tutorial scores itself: no report or plot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="image folder (default: the mirror's ants/bees)")
    parser.add_argument("--weights", default=None, help="default: the mirror's MobileNetV2 weights")
    parser.add_argument("--epochs", type=int, default=25)
    args = parse_args(parser)
    args.data = args.data or mirror() / "datasets" / "hymenoptera_data"
    args.weights = args.weights or str(mirror() / "weights" / "mobilenet_v2-imagenet-features.pth")

    # each in a fresh process (its start-up counted), so featx's process-wide settings never reach the tutorial
    start = time.perf_counter()
    featx_accuracy = in_fresh_process(featx_pipeline, args.data, args.weights)
    featx_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tutorial_accuracy, history = in_fresh_process(tutorial_fixed_feature_loop, args.data, args.weights, args.epochs)
    tutorial_seconds = time.perf_counter() - start
    speedup = tutorial_seconds / featx_seconds
    table = ["| pipeline | val accuracy | wall time (s) | speed-up |", "|---|---|---|---|",
             f"| tutorial fixed-feature loop ({args.epochs} epochs, best epoch) | {tutorial_accuracy:.4f} | "
             f"{tutorial_seconds:.1f} | 1.00x |",
             f"| featx extract + fit-head logreg | {featx_accuracy:.4f} | {featx_seconds:.1f} | {speedup:.1f}x |"]
    write_results("time_to_accuracy", {
        "tutorial": {"accuracy": tutorial_accuracy, "seconds": tutorial_seconds, "val_history": history,
                     "epochs": args.epochs},
        "featx": {"accuracy": featx_accuracy, "seconds": featx_seconds}, "speedup": speedup,
        "featx_reaches_tutorial_accuracy": featx_accuracy >= tutorial_accuracy}, table, args.out)


if __name__ == "__main__":
    guarded(main)
