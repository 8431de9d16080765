"""Seed experiment: the PyTorch tutorial's ants/bees set through featx with real ImageNet MobileNetV2 weights:
extract features once, fit the logreg, linear and knn heads on train, evaluate them on val.

Data and weights come from the mirror ($FEATX_MIRROR, e.g. ../shared) when it has them, else they are
downloaded (the dataset zip, and torchvision's own MobileNetV2 weights).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import featx
from featx import flags
from featx.cli import guarded
from featx.fit import evaluate, fit_head
from featx.mirror import fetch_dataset, mirrored_weights

MIRROR_WEIGHTS = "mobilenet_v2-imagenet-features.pth"
DEMO_HEADS = ("logreg", "linear", "knn")  # named, not every registered head: zeroshot needs a CLIP backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="features", help="features root folder")
    parser.add_argument("--heads", default="heads/mobilenet_v2", help="where the fitted heads go")
    parser.add_argument("--data_root", default="data", help="where to download the dataset when not mirrored")
    args = flags.parse_script_args(parser)
    try:
        data = fetch_dataset("hymenoptera", args.data_root)
    except ConnectionError:
        raise ConnectionError(
            f"offline, and no mirror holds the demo's data and weights: set $FEATX_MIRROR (or --mirror) to a folder "
            f"with datasets/hymenoptera_data/ and weights/{MIRROR_WEIGHTS} (../shared has both), or connect to the "
            "network to download hymenoptera_data.zip and torchvision's MobileNetV2 weights") from None
    weights = str(mirrored_weights(MIRROR_WEIGHTS) or "DEFAULT")
    print(f"data: {data}\nweights: {weights}")
    featx.extract(data, "mobilenet_v2", weights, args.out, batch_size=64)
    features = Path(args.out) / "mobilenet_v2"
    results = {}
    for head in DEMO_HEADS:  # selection on a hold-out of train, so val stays unseen
        fit_head(features / "train.h5", "none", head, Path(args.heads) / head)
        results[head] = evaluate(Path(args.heads) / head, features / "val.h5")["accuracy"]
    print("\nval accuracy (153 images, never seen in fitting or selection):")
    for head, accuracy in results.items():
        print(f"  {head:7s} {accuracy:.4f}")


if __name__ == "__main__":
    guarded(main)
