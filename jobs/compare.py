"""Comparison job: on one dataset and backbone, the cached-feature head against fine-tuning and its baselines.

Runs, in one go: (1) `extract` + `fit-head` (cached features, logistic regression), (2) fine-tune with a new
random head at 10x lr, (3) LP-FT: fine-tune starting from the head of (1), (4) frozen backbone, only the new head
trained (the tutorial's "fixed feature extractor"), (5) the same network from scratch. Writes
`OUT/comparison.md` (accuracy, wall time, examples/s), `OUT/comparison.json` and `OUT/comparison.png`.

    python jobs/compare.py --dataset hymenoptera     # PyTorch tutorial ants/bees, MobileNetV2 (mirror) or ResNet-18
    python jobs/compare.py --dataset hotdog          # d2l hotdog (downloads hotdog.zip, sha1-checked, or mirror)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import featx
from featx import flags, store
from featx.cli import guarded
from featx.finetuning import FinetuneConfig, finetune
from featx.fit import evaluate, fit_head
from featx.mirror import fetch_dataset, mirrored_weights

# (backbone, weights file in the mirror) used when the mirror has it; else torchvision's ResNet-18 download.
MIRROR_BACKBONE = ("mobilenet_v2", "mobilenet_v2-imagenet-features.pth")
# Mean-loss recipes (d2l sums its loss over the batch of 128: lr 5e-5 summed is 6.4e-3 mean).
RECIPES = {
    "hymenoptera": FinetuneConfig(epochs=3, batch_size=32, lr=0.003, head_lr_mult=10, schedule="cosine",
                                  warmup_epochs=0.5, weight_decay=1e-4),
    "hotdog": FinetuneConfig(epochs=5, batch_size=128, lr=6.4e-3, head_lr_mult=10, momentum=0.0,
                             weight_decay=7.8e-6, schedule="constant"),
}
SCRATCH_LR = {"hymenoptera": 0.01, "hotdog": 6.4e-2}  # d2l's scratch baseline: 5e-4 summed, one group


def backbone_choice(override: str | None, weights: str) -> tuple[str, str]:
    if override:
        return override, weights
    mirrored = mirrored_weights(MIRROR_BACKBONE[1])
    return (MIRROR_BACKBONE[0], str(mirrored)) if mirrored else ("resnet18", "DEFAULT")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(RECIPES), default="hymenoptera")
    parser.add_argument("--data", help="an ImageFolder with train/ and val/ to use instead of --dataset's images "
                        "(--dataset still picks the recipe)")
    parser.add_argument("--backbone", help="torchvision backbone (default: mirror's MobileNetV2)")
    parser.add_argument("--weights", default="DEFAULT", help="--backbone's weights: DEFAULT, a file, or none")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--out", default=None, help="output folder (default runs/compare-DATASET)")
    parser.add_argument("--data_root", default="data")
    args = flags.parse_script_args(parser)

    data = args.data or fetch_dataset(args.dataset, args.data_root)
    backbone, weights = backbone_choice(args.backbone, args.weights)
    out = Path(args.out or f"runs/compare-{args.dataset}")
    recipe = replace(RECIPES[args.dataset], backbone=backbone, weights=weights,
                     epochs=args.epochs or RECIPES[args.dataset].epochs)
    results = {}

    start = time.perf_counter()
    summaries = featx.extract(data, backbone, weights, out / "features", batch_size=64)
    train_file = out / "features" / backbone / "train.h5"
    eval_file = next(out / "features" / backbone / f"{s}.h5" for s in ("val", "test") if s in summaries)
    fit_head(train_file, "none", "logreg", out / "probe")
    metrics = evaluate(out / "probe", eval_file, out / "probe" / "eval")
    rows = sum(store.read_meta(f)["num_rows"] for f in (train_file, eval_file))
    seconds = time.perf_counter() - start
    results["cached features + logreg head"] = {"accuracy": metrics["accuracy"], "wall_seconds": seconds,
                                                "examples_per_second": rows / seconds, "history": []}

    runs = {
        "fine-tune, new head at 10x lr": recipe,
        "LP-FT (fine-tune from the probe head)": replace(recipe, head_init="probe", probe=str(out / "probe")),
        "frozen backbone, head only": replace(recipe, freeze="backbone"),
        "scratch (same network and budget)": replace(recipe, init="scratch", lr=SCRATCH_LR[args.dataset],
                                                     head_lr_mult=1.0),
    }
    for name, cfg in runs.items():
        print(f"\n== {name}")
        run_dir = out / name.split(" ")[0].strip(",").lower()
        metrics = finetune(data, run_dir, cfg, resume=True)  # a rerun continues, or reuses, each run
        history = json.loads((run_dir / "history.json").read_text())
        trained = [h for h in history if "train_examples_per_second" in h]
        results[name] = {"accuracy": metrics["accuracy"], "wall_seconds": metrics["wall_seconds"],
                         "examples_per_second": sum(h["train_examples_per_second"] for h in trained) / len(trained),
                         "history": [h["val_accuracy"] for h in history]}
    write_report(results, out, args.dataset, backbone, recipe)


def write_report(results: dict, out: Path, dataset: str, backbone: str, recipe: FinetuneConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"# {dataset}: {backbone}, {recipe.epochs} epochs, batch {recipe.batch_size}, lr {recipe.lr} "
             f"(head x{recipe.head_lr_mult}), {recipe.optimizer}, {recipe.schedule}", "",
             "| method | val accuracy (best epoch) | wall time (s) | examples/s |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['accuracy']:.4f} | {r['wall_seconds']:.0f} | {r['examples_per_second']:.1f} |")
    lines.append("\nexamples/s: extraction + fitting throughput for the cached head; mean training throughput "
                 "for the others. Accuracy of the fine-tuned runs is that of their best-by-val epoch.")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    (out / "comparison.json").write_text(json.dumps(results, indent=1))
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(7, 4))
    styles = zip(("o", "s", "^", "D", "v"), ("-", "--", "-.", ":", "-"))
    for index, (name, r) in enumerate(results.items()):
        if r["history"]:  # markers and dashes differ and points shift a little, so equal curves stay visible
            marker, dash = next(styles)
            epochs = [epoch + 0.04 * (index - 2) for epoch in range(len(r["history"]))]
            axes.plot(epochs, r["history"], linestyle=dash, marker=marker, alpha=0.85, label=name)
        else:
            axes.axhline(r["accuracy"], color="black", linestyle="--", label=name)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch (0 = before training)")
    axes.set_ylabel("val accuracy")
    axes.set_title(f"{dataset}, {backbone}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "comparison.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    guarded(main)
