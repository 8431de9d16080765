"""Comparison job: on one dataset, `featx compare` of the cached-feature heads against fine-tuning (a new head at
10x lr), LP-FT (from the logreg head), a frozen backbone (the tutorial's "fixed feature extractor") and the same
network from scratch, with each dataset's fine-tuning recipe. Writes OUT/report.html and its tables.

    python jobs/compare.py --dataset hymenoptera     # PyTorch tutorial ants/bees, MobileNetV2 (mirror) or ResNet-18
    python jobs/compare.py --dataset hotdog          # d2l hotdog (downloads hotdog.zip, sha1-checked, or mirror)
"""

from __future__ import annotations

import argparse

import featx
from featx import flags
from featx.cli import guarded
from featx.mirror import fetch_dataset, mirrored_weights

# (backbone, weights file in the mirror) used when the mirror has it; else torchvision's ResNet-18 download.
MIRROR_BACKBONE = ("mobilenet_v2", "mobilenet_v2-imagenet-features.pth")
# Mean-loss recipes (d2l sums its loss over the batch of 128: lr 5e-5 summed is 6.4e-3 mean).
RECIPES = {
    "hymenoptera": dict(epochs=3, batch_size=32, lr=0.003, head_lr_mult=10, schedule="cosine", warmup_epochs=0.5,
                        weight_decay=1e-4),
    "hotdog": dict(epochs=5, batch_size=128, lr=6.4e-3, head_lr_mult=10, momentum=0.0, weight_decay=7.8e-6,
                   schedule="constant"),
}


def backbone_choice(override: str | None, weights: str) -> str:
    if override:
        return f"{override}={weights}"
    mirrored = mirrored_weights(MIRROR_BACKBONE[1])
    return f"{MIRROR_BACKBONE[0]}={mirrored}" if mirrored else "resnet18"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(RECIPES), default="hymenoptera")
    parser.add_argument("--data", help="an ImageFolder with train/ and val/ to use instead of --dataset's images "
                        "(--dataset still picks the recipe)")
    parser.add_argument("--backbone", help="backbone name (default: mirror's MobileNetV2)")
    parser.add_argument("--weights", default="DEFAULT", help="--backbone's weights: DEFAULT, a file, or none")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--out", default=None, help="output folder (default runs/compare-DATASET)")
    parser.add_argument("--data_root", default="data")
    args = flags.parse_script_args(parser)

    data = args.data or fetch_dataset(args.dataset, args.data_root)
    recipe = {**RECIPES[args.dataset], **({"epochs": args.epochs} if args.epochs else {})}
    featx.compare(data, backbone_choice(args.backbone, args.weights), heads="logreg", shots="all", repeats=1,
                  finetune="finetune,lp-ft,frozen,scratch", out=args.out or f"runs/compare-{args.dataset}", **recipe)


if __name__ == "__main__":
    guarded(main)
