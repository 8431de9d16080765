"""Heads on cached features: the `fit-head` command (fit, choose regularisation on validation) and `evaluate`."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from featx import storage, store
from featx.heads import Head, load_head, make_head
from featx.metrics import (classification_metrics, not_held_out, summary_line, times_seen, write_metrics,
                           write_predictions)


def _resolve_val(train: storage.Location, val: str | None) -> storage.Location | None:
    if val in (None, "none", "None"):
        return None
    if val == "auto":
        beside = storage.join(storage.parent(train), "val.h5")
        return beside if beside != train and storage.is_file(beside) else None
    return storage.location(val)


def fit_head(train: str | os.PathLike, val: str | None = "auto", head: str = "logreg",
             out: str | os.PathLike | None = None, **params) -> Head:
    """Fit a head of kind ``head`` on ``train`` (a features file), choosing its regularisation on ``val``.

    ``val``: a features file, ``auto`` (``val.h5`` beside ``train`` when present), or ``none`` (a stratified,
    deterministic hold-out of train). Views of one image stay on one side of the hold-out. The ``linear`` head
    streams features from the file block by block; others load them. Saves to ``out`` (default
    ``heads/<backbone>/<head>``).
    """
    train = storage.location(train)
    meta = store.read_meta(train)
    store.require_labels(meta, train, "fit-head")
    val_path = _resolve_val(train, val)
    estimator = make_head(head, **params)
    if val_path is not None:
        store.require_same_source(meta, store.read_meta(val_path), f"validation file {val_path}")
    with store.open_h5(train) as f, (store.open_h5(val_path) if val_path else contextlib.nullcontext()) as v:
        X = f["features"] if head == "linear" else f["features"][:]
        y, groups = f["labels"][:], f["image_ids"][:]
        seen = [file["content_hash"][:] if "content_hash" in file else None for file in (f, v) if file is not None]
        seen = None if any(hashes is None for hashes in seen) else np.concatenate(seen)  # all it fits or selects on
        estimator.set_source(meta, seen, train=storage.absolute(train),
                             val=storage.absolute(val_path) if val_path else None)
        X_val = None if v is None else v["features"] if head == "linear" else v["features"][:]
        try:
            estimator.fit(X, y, X_val, None if v is None else v["labels"][:], groups=groups)
        except store.NonFiniteError:  # name the file and count its rows
            store.require_finite(train, f["features"])
            if v is not None:
                store.require_finite(val_path, v["features"])
            raise
    out = storage.location(out) if out else Path("heads") / meta["backbone"] / head
    for stale in sorted({key.split("/")[0] for key in storage.listing(out) if key.startswith("eval-")}):
        storage.remove(storage.join(out, stale))  # reports of the head this one replaces
    with storage.local_output(out) as folder:
        estimator.save(folder)
    where = f"on {storage.shown(val_path)}" if val_path else "on a 20% stratified hold-out of train"
    print(f"{head}: {estimator.fit_summary(where)} -> {storage.shown(out)}")
    return estimator


def evaluate(head: str | os.PathLike, features: str | os.PathLike, out: str | os.PathLike | None = None,
             trust_pickle: bool = False) -> dict:
    """Metrics of a saved head on a features file, written as ``metrics.json`` + ``confusion.png``."""
    estimator = load_head(head, trust_pickle)
    data = store.load(features)
    metrics, scores = score(estimator, data, features)
    metrics["head"] = str(head)
    out = storage.location(out) if out else Path(head) / f"eval-{data.meta['split']}"
    with storage.local_output(out) as folder:
        write_metrics(metrics, folder, f"{estimator.kind} on {data.meta['split']}: accuracy {metrics['accuracy']:.3f}")
        write_predictions(folder / "predictions.csv", data.paths, data.labels, scores, data.class_names)
    seen = metrics["seen_in_fitting"]
    note = "" if seen == 0 else f" ({not_held_out(seen, len(data.labels))})"
    print(f"{estimator.kind} on {storage.shown(features)}: {summary_line(metrics)}{note} -> {storage.shown(out)}")
    if metrics["far_rows"]:
        print(f"featx: warning: {metrics['far_rows']} of {len(data.labels)} rows of {features} lie far outside the "
              "features the head was fitted on (|standardised value| > 1e6): their predictions say nothing; were "
              "they extracted the same way?", file=sys.stderr)
    return metrics


def score(estimator: Head, data: store.FeatureSet, features: str | os.PathLike) -> tuple[dict, np.ndarray]:
    """A fitted head's metrics on the loaded features file ``features`` (``evaluate``'s, and whether each image
    was held out: by content, so a copy of a seen image is seen) and its logits [N, C]."""
    store.require_labels(data.meta, features, "evaluate")
    estimator.check_features(data.meta, f"features file {features}")
    store.require_finite(features, data.features)
    scores = estimator.decision_function(data.features)
    metrics = classification_metrics(data.labels, scores, data.class_names)
    seen = times_seen(estimator.seen_, data.content_hash)
    if seen is None:  # a head or file from an older featx: by file
        seen = len(data.labels) if storage.absolute(features) in set(estimator.fitted_on_.values()) else 0
    metrics.update(held_out=seen == 0, seen_in_fitting=seen, far_rows=int(estimator.far_rows(data.features).sum()),
                   features=storage.shown(features))
    return metrics, scores
