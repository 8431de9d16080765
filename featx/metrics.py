"""Classification metrics in one format for ``evaluate``, ``predict`` and ``finetune``; confusion-matrix plot."""

from __future__ import annotations

import csv
import json
import os
import textwrap
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support


def classification_metrics(labels: np.ndarray, scores: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, balanced accuracy, top-5 (when more than 5 classes), per-class P/R/F1, confusion matrix.

    ``scores`` [N, C] are logits or probabilities over ``class_names`` (column c is class c).
    """
    labels = np.asarray(labels)
    predicted = scores.argmax(1)
    classes = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=classes,
                                                                     zero_division=0)
    metrics = {
        "num_examples": int(len(labels)),
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else float("nan"),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)) if len(labels) else float("nan"),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(class_names, precision, recall, f1, support)},
        "class_names": list(class_names),
        "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).tolist(),
    }
    confusion = np.asarray(metrics["confusion_matrix"])
    pairs = [(int(confusion[t, p]), class_names[t], class_names[p]) for t, p in np.argwhere(confusion)
             if t != p]  # fastai's most_confused: (true, predicted, count), most frequent first
    metrics["most_confused"] = [[true, predicted, count] for count, true, predicted in
                                sorted(pairs, key=lambda pair: -pair[0])[:20]]
    if len(class_names) > 5:
        top5 = np.argsort(-scores, axis=1)[:, :5]
        metrics["top5_accuracy"] = float(np.mean((top5 == labels[:, None]).any(1)))
    return metrics


def plot_confusion(metrics: dict, path, title: str = ""):
    """Write the confusion matrix of ``metrics`` as a PNG to ``path`` (a path or a binary file), ``title``
    (default: the accuracy) above it and in its ``Title`` text chunk."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and open figures are left alone

    matrix, names = np.asarray(metrics["confusion_matrix"]), metrics["class_names"]
    size = max(4.0, 0.5 * len(names) + 2)
    figure = Figure(figsize=(size, size))
    axes = figure.subplots()
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, col), count in np.ndenumerate(matrix):
        axes.text(col, row, str(count), ha="center", va="center",
                  color="white" if count > matrix.max() / 2 else "black")
    title = title or f"accuracy {metrics['accuracy']:.3f}"
    axes.set_title(textwrap.fill(title, 36), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png", metadata={"Title": title})  # the PNG says what it shows
    return path


def write_metrics(metrics: dict, folder: str | os.PathLike, title: str = "") -> Path:
    """``metrics.json`` and ``confusion.png`` in ``folder`` (its title says when the images were not held out, as
    ``metrics["held_out"]`` does); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if metrics.get("held_out") is False:
        title = f"{title} (NOT held out)"
    plot_confusion(metrics, folder / "confusion.png", title)
    return folder


def write_predictions(path: str | os.PathLike, paths: list[str], labels: np.ndarray, scores: np.ndarray,
                      class_names: list[str]) -> Path:
    """CSV of every row: path, true, predicted, probability of the prediction, correct; mistakes first, the most
    confident of them on top (fastai's top losses)."""
    scores = np.asarray(scores, np.float64)
    probabilities = np.exp(scores - scores.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    predicted = probabilities.argmax(1)
    order = sorted(range(len(paths)), key=lambda i: (predicted[i] == labels[i], -probabilities[i, predicted[i]]))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "true", "predicted", "probability", "correct"])
        for i in order:
            writer.writerow([paths[i], class_names[labels[i]], class_names[predicted[i]],
                             f"{probabilities[i, predicted[i]]:.6f}", int(predicted[i] == labels[i])])
    return Path(path)


SEEN_FILE = "seen_images.npy"  # beside a head or run: content hashes of every image it was fitted or selected on


def save_seen(folder: Path, hashes: np.ndarray) -> None:
    """Record the content hashes (``featx.decode.bytes_hash``) of the images a head or run saw, as a plain array."""
    tmp = Path(folder) / (SEEN_FILE + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.unique(np.asarray(hashes, np.uint64)), allow_pickle=False)
    os.replace(tmp, Path(folder) / SEEN_FILE)


def load_seen(folder: Path) -> np.ndarray | None:
    """The content hashes a head or run saw, or None for one from an older featx that did not record them."""
    path = Path(folder) / SEEN_FILE
    return np.load(path, allow_pickle=False) if path.is_file() else None


def seen_rows(seen: np.ndarray | None, hashes: np.ndarray | None) -> np.ndarray | None:
    """Which scored images (by content hash) were seen in fitting or selection; None when either side does not
    know its hashes."""
    if seen is None or hashes is None:
        return None
    hashes = np.asarray(hashes, np.uint64)
    return np.isin(hashes, seen) & (hashes != 0)


def times_seen(seen: np.ndarray | None, hashes: np.ndarray | None) -> int | None:
    """How many of the scored images were seen in fitting or selection (``seen_rows``), or None."""
    rows = seen_rows(seen, hashes)
    return None if rows is None else int(rows.sum())


def not_held_out(seen: int, total: int, how: str = "to fit or select this head") -> str:
    """The warning every score on seen images carries."""
    return f"NOT held out: {seen} of {total} images were used {how}"


def summary_line(metrics: dict) -> str:
    """One line: accuracy, balanced accuracy, top-5 when present."""
    line = f"accuracy {metrics['accuracy']:.4f}, balanced accuracy {metrics['balanced_accuracy']:.4f}"
    if "top5_accuracy" in metrics:
        line += f", top-5 {metrics['top5_accuracy']:.4f}"
    return f"{line} on {metrics['num_examples']} examples"
