"""Classify images with backbone + head: top-k classes with probabilities, as CSV or JSON; contact sheet."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from scipy.special import softmax
from tqdm import tqdm

from featx.backbones import Backbone, WeightsInfo, backbone_from_source
from featx.decode import EvalTransform, ImageFiles, load_rgb, read_batches, sequential_batches
from featx.devices import resolve_device
from featx.embed import embedder_for
from featx.finetuning import RUN_FILE, load_finetuned
from featx.heads import load_head
from featx.heads.base import check_positive
from featx.metrics import load_seen, not_held_out, seen_rows
from featx.sources import IMAGE_EXTENSIONS, folder_at, list_images, shown


def collect_images(inputs: list[str | os.PathLike]) -> tuple[list[str], list[tuple[Path, str]]]:
    """Image files named directly, plus every image under the folders named (on disk or at URLs); and the folders
    that could not be read, with why."""
    files, unreadable = [], []
    for item in inputs:
        path = folder_at(item)  # a folder or file on disk, or at a URL (listed once)
        if path.is_dir():
            files.extend(str(p) for p in list_images(path, unreadable=unreadable))
        elif path.is_file() or path.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(str(path))  # a missing file is reported as a failure, like an undecodable one
        else:
            raise FileNotFoundError(f"{shown(item)} is neither an image file nor a folder")
    return files, unreadable


class Classifier(NamedTuple):
    """What ``predict`` runs: uint8 image batch -> (logits, rows far outside what the head was fitted on), the
    transform it expects, the class name of each logit column, and the content hashes of the images it was fitted
    or selected on (None: not recorded)."""

    classify: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]
    transform: EvalTransform
    names: list[str]
    seen: np.ndarray | None


def load_classifier(folder: str | os.PathLike, device: str = "auto", mirror: str | None = None,
                    trust_pickle: bool = False, **mapper) -> Classifier:
    """The classifier of a head folder (backbone features, then the head's ``decision_function``, as ``evaluate``
    does) or of a finetune run; its model run as extract runs it (``mapper``: precision, runtime, batch_size of
    ``featx.embed.embedder_for``)."""
    if (Path(folder) / RUN_FILE).is_file():
        model, record = load_finetuned(folder)
        transform = EvalTransform.from_dict(record["transform"])
        info = WeightsInfo("finetuned", str(folder), "")
        embedder = embedder_for(Backbone(record["backbone"], model, record["num_classes"], info, transform), device,
                                **mapper)

        def classify_run(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            logits = embedder(images).numpy()
            return logits, np.zeros(len(logits), bool)

        return Classifier(classify_run, transform, record["class_names"], load_seen(folder))
    estimator = load_head(folder, trust_pickle)
    backbone = backbone_from_source(estimator.source_, mirror)
    embedder = embedder_for(backbone, device, **mapper)
    names = [estimator.source_["class_names"][c] for c in estimator.classes_]

    def classify_head(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        features = embedder(images).numpy()
        return estimator.decision_function(features), estimator.far_rows(features)

    return Classifier(classify_head, backbone.transform, names, estimator.seen_)


def predict(head: str | os.PathLike, inputs: list[str], topk: int = 5, batch_size: int = 64,
            workers: int | None = None, device: str = "auto", mirror: str | None = None,
            trust_pickle: bool = False, precision: str = "auto", runtime: str = "auto") -> list[dict]:
    """Classify with a head folder or a finetune run folder. One record per image: path, true class (its
    folder's name, when that is a class), prediction, top-k, logits, whether the classifier saw the image (by
    content) in fitting or selection, and whether its features lie far outside the head's; undecodable images get
    an ``error``."""
    check_positive("topk", topk, int)
    check_positive("batch_size", batch_size, int)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be a non-negative integer, got {workers!r}")
    classifier = load_classifier(head, device, mirror, trust_pickle, precision=precision, runtime=runtime,
                                 batch_size=batch_size)
    names = classifier.names
    files, unreadable = collect_images(inputs)
    dataset = ImageFiles(Path(), tuple(files), classifier.transform)
    records: list[dict | None] = [None] * len(files)
    batches = read_batches(dataset, sequential_batches(len(files), batch_size), workers, resolve_device(device))
    progress = tqdm(total=len(files), unit="img", desc="predict", mininterval=1.0, file=sys.stderr,
                    disable=not files)
    for batch in batches:
        progress.update(len(batch.indices) + len(batch.failed))
        for index, reason in batch.failed:
            records[index] = {"path": files[index], "error": reason}
        if not len(batch.indices):  # every image of this batch failed
            continue
        logits, far = classifier.classify(batch.images)
        probabilities = softmax(logits, axis=1)
        indices = batch.indices.tolist()
        seen = np.zeros(len(indices), bool) if classifier.seen is None else seen_rows(
            classifier.seen, [dataset.content_hash(i) for i in indices])  # hashed only when the head knows its own
        for index, row_logits, row_probabilities, row_far, row_seen in zip(indices, logits, probabilities, far, seen):
            order = np.argsort(-row_probabilities)[:topk]
            top = [(names[i], float(row_probabilities[i])) for i in order]
            records[index] = {"path": files[index], "predicted": top[0][0], "probability": top[0][1],
                              "topk": top, "logits": row_logits.tolist(), "seen": bool(row_seen),
                              "far": bool(row_far)}
    progress.close()
    records += [{"path": str(folder), "error": reason} for folder, reason in unreadable]
    for record in records:
        parent = Path(record["path"]).parent.name
        record["true"] = parent if parent in names else None
    return records


def run(head: str | os.PathLike, inputs: list[str], topk: int = 5, out: str | os.PathLike | None = None,
        show: str | os.PathLike | None = None, show_limit: int = 48, batch_size: int = 64, workers: int | None = None,
        device: str = "auto", mirror: str | None = None, trust_pickle: bool = False, precision: str = "auto",
        runtime: str = "auto") -> list[dict]:
    """``featx predict``: classify ``inputs``, write the records to ``out`` (CSV on stdout without it), name the
    skipped files and print the accuracy where folders name the classes (stderr), draw the contact sheet ``show``."""
    if not inputs:
        raise ValueError("give at least one image file or folder to classify")
    if show:
        check_positive("show_limit", show_limit, int)
    records = predict(head, inputs, topk, batch_size, workers, device, mirror, trust_pickle, precision, runtime)
    if out:
        write_records(records, out)
    else:
        print(to_csv(records), end="")
    for record in records:
        if "error" in record:
            print(f"skipped {shown(record['path'])}: {record['error']}", file=sys.stderr)
    if records and not any("predicted" in record for record in records):
        raise ValueError(f"nothing could be classified: none of the {len(records)} inputs could be read as an image "
                         f"({shown(records[0]['path'])}: {records[0]['error']})")
    correct, labelled = accuracy(records)
    if labelled:
        seen = sum(1 for r in records if r.get("true") and r.get("seen"))
        note = f" ({not_held_out(seen, labelled, 'in fitting or selection')})" if seen else ""
        print(f"accuracy {correct:.4f} on {labelled} images whose folder names their class{note}", file=sys.stderr)
    far = sum(1 for r in records if r.get("far"))
    if far:
        print(f"featx: warning: {far} images have features far outside what the head was fitted on (|standardised "
              "value| > 1e6): their predictions say nothing", file=sys.stderr)
    if show:
        contact_sheet(records, show, show_limit)
    return records


def accuracy(records: list[dict]) -> tuple[float, int]:
    """Accuracy over the records whose true class is known, and their count."""
    labelled = [r for r in records if r.get("true") and "predicted" in r]
    return (float(np.mean([r["predicted"] == r["true"] for r in labelled])) if labelled else float("nan"),
            len(labelled))


def to_csv(records: list[dict]) -> str:
    """CSV text: path, true, predicted, probability, top-k as ``class:p;class:p``, error."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "true", "predicted", "probability", "topk", "error"])
    for r in records:
        top = ";".join(f"{name}:{p:.6f}" for name, p in r.get("topk", []))
        writer.writerow([shown(r["path"]), r.get("true") or "", r.get("predicted", ""),
                         f"{r['probability']:.6f}" if "probability" in r else "", top, r.get("error", "")])
    return buffer.getvalue()


def write_records(records: list[dict], out: str | os.PathLike) -> Path:
    """Write as JSON when ``out`` ends in .json, else CSV."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    readable = [{**record, "path": shown(record["path"])} for record in records]
    out.write_text(json.dumps(readable, indent=1) if out.suffix == ".json" else to_csv(records))
    return out


def contact_sheet(records: list[dict], out, limit: int = 48, columns: int = 6, confident_mistakes: bool = False,
                  load=load_rgb):
    """PNG grid of at most ``limit`` images: mistakes first (the least confident of them first, or with
    ``confident_mistakes`` the most), then the least confident predictions; each titled with prediction
    (probability) and true class (green right, red wrong), its file name below. ``load`` reads a record's
    ``path`` as a PIL image; ``out``: a path or a binary file."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    def mistaken(record: dict) -> bool:
        return bool(record["true"]) and record["true"] != record["predicted"]

    decoded = [r for r in records if "predicted" in r]
    wrong = [r for r in decoded if mistaken(r)]
    sign = -1 if confident_mistakes else 1
    chosen = sorted(decoded, key=lambda r: (not mistaken(r), sign * r["probability"] if mistaken(r)
                                            else r["probability"]))[:limit]
    rows = max(1, -(-len(chosen) // columns))
    figure = Figure(figsize=(2.4 * columns, 2.9 * rows + 0.4))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, record in zip(axes.flat, chosen):
        image = load(record["path"])
        image.thumbnail((224, 224))
        axis.imshow(image)
        title = f"{record['predicted']} ({record['probability']:.2f})"
        colour = "black"
        if record["true"]:
            title += f"\ntrue: {record['true']}"
            colour = "green" if record["true"] == record["predicted"] else "red"
        axis.set_title(title, fontsize=8, color=colour)
        name = shown(Path(record["path"]).name)
        axis.text(0.5, -0.03, name if len(name) <= 28 else name[:12] + "..." + name[-13:], transform=axis.transAxes,
                  ha="center", va="top", fontsize=7)
    order = "the most confident mistakes first" if confident_mistakes else "mistakes first"
    figure.suptitle(f"{len(wrong)} mistakes of {len(decoded)} images; showing {len(chosen)}: {order}, then "
                    "the least confident", fontsize=10)
    figure.tight_layout()
    figure.savefig(out, dpi=80, format="png")
    return out
