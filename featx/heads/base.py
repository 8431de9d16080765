"""What every head shares: the estimator API, the features it was fitted on, saving and loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin

from featx import store
from featx.metrics import load_seen, save_seen
from featx.version import __version__

HEAD_FILE = "head.json"


def holdout_split(labels: np.ndarray, groups: np.ndarray, fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Deterministic stratified hold-out: a boolean mask of held-out rows.

    Whole groups (all views of one image) go to one side; per class, ``fraction`` of its groups are held out.
    """
    rng = np.random.default_rng(seed)
    group_ids, group_index = np.unique(groups, return_inverse=True)
    classes, class_index = np.unique(labels, return_inverse=True)
    # the (class, group) pairs present, sorted by class then group: one sort instead of one per class
    pairs = np.sort(class_index.ravel() * len(group_ids) + group_index.ravel())
    pair_class, pair_group = np.divmod(pairs[np.append(True, pairs[1:] != pairs[:-1])], len(group_ids))
    bounds = np.searchsorted(pair_class, np.arange(len(classes) + 1))
    held = np.zeros(len(group_ids), bool)
    for first, last in zip(bounds[:-1], bounds[1:]):
        class_groups = group_ids[pair_group[first:last]]
        take = int(round(fraction * len(class_groups)))
        if len(class_groups) > 1:
            take = min(max(take, 1), len(class_groups) - 1)
            held[np.searchsorted(group_ids, rng.permutation(class_groups)[:take])] = True
    return held[group_index.ravel()]


class Head(ClassifierMixin, BaseEstimator):
    """A classifier on cached features: ``fit``, ``predict``, ``predict_proba``, ``decision_function``, ``score``.

    ``fit(X, y, X_val=None, y_val=None, groups=None)`` chooses its regularisation on (X_val, y_val), or on a
    stratified group hold-out of X when no validation set is given. ``source`` is the provenance of the
    features (``store.read_meta``); a fitted head refuses features from another extractor or class list.
    """

    kind = ""

    def fit_summary(self, where: str) -> str:
        """What ``fit`` did, for its one line: the choice it made ``where`` (on a file, or a hold-out of train)."""
        selection = self.selection_
        return f"chose {selection['parameter']} = {selection['chosen']} {where} " \
               f"(val accuracy {selection['val_accuracy']:.4f})"

    def _holdout(self, y: np.ndarray, groups) -> np.ndarray:
        """Mask of the rows held out for selection when no validation set is given."""
        return holdout_split(y, np.arange(len(y)) if groups is None else np.asarray(groups), seed=self.seed)

    def _set_classes(self, y: np.ndarray) -> None:
        """``classes_`` from the training labels; fewer than two classes is an error."""
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError(f"the training features hold {len(self.classes_)} class(es) "
                             f"{self.classes_.tolist()}; a classifier needs at least 2")

    def _split(self, X, y, X_val, y_val, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """In-memory (X, y, X_val, y_val): the validation set given, or a hold-out of X; sets ``classes_``.
        Non-finite features are refused."""
        X, y = np.asarray(X, np.float32), np.asarray(y)
        self._set_classes(y)
        for name, values in (("X", X), ("X_val", X_val)):
            if values is not None:
                store.require_finite(name, values)
        if X_val is None:
            held = self._holdout(y, groups)
            return X[~held], y[~held], X[held], y[held]
        return X, y, np.asarray(X_val, np.float32), np.asarray(y_val)

    def decision_function(self, X) -> np.ndarray:
        """Logits [N, C]; ``softmax`` of them is ``predict_proba``."""
        raise NotImplementedError

    def fixed_params(self) -> dict:
        """Parameters of a new head of this kind whose grid is only what this fitted head chose, refitting
        nothing: ``fit(X, y, X, y)`` then trains it on all of X with no selection (``featx compare``'s draws)."""
        raise NotImplementedError

    def predict_proba(self, X) -> np.ndarray:
        return softmax(self.decision_function(X), axis=1)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    def to_torch(self) -> torch.nn.Module:
        """A module mapping features [B, D] to the same logits as ``decision_function``."""
        raise NotImplementedError

    def scaled(self, X) -> np.ndarray:
        """X as the head's linear map sees it (standardised, for the heads that standardise)."""
        return np.asarray(X, np.float32)

    def far_rows(self, X, limit: float = 1e6) -> np.ndarray:
        """Rows whose scaled features exceed ``limit`` in magnitude: their logits saturate, so their predictions
        say nothing (a broken extraction, or features from elsewhere)."""
        return np.abs(self.scaled(X)).max(1) > limit if len(X) else np.zeros(0, bool)

    # --- provenance -------------------------------------------------------------------------------------
    def set_source(self, meta: dict, seen: np.ndarray | None = None, **fitted_on) -> "Head":
        """Record the features' provenance (and the files fitted on) so mismatched features are refused, and
        ``seen``: the content hashes of every image used in fitting or selection (None: not known)."""
        keys = (*store.SOURCE_KEYS, "class_names", "weights", "weights_source")
        self.source_ = {k: meta[k] for k in keys if k in meta}
        self.fitted_on_ = {k: str(v) for k, v in fitted_on.items() if v is not None}
        self.seen_ = None if seen is None else np.unique(np.asarray(seen, np.uint64))
        return self

    def check_features(self, meta: dict, what: str) -> None:
        """Refuse features made by another backbone, weights, transform or class list."""
        if getattr(self, "source_", None):
            store.require_same_source(self.source_, meta, f"{what} (this head was fitted on {self.source_['backbone']} "
                                                          f"features)")

    # --- persistence ------------------------------------------------------------------------------------
    def _save_state(self, folder: Path) -> None:
        raise NotImplementedError

    def _load_state(self, folder: Path, trust_pickle: bool = False) -> None:
        raise NotImplementedError

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``head.json`` (kind, parameters, provenance, selection) and the fitted state to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._save_state(folder)
        record = {"kind": self.kind, "featx_version": __version__, "params": self.get_params(),
                  "classes": self.classes_.tolist(), "source": getattr(self, "source_", {}),
                  "fitted_on": getattr(self, "fitted_on_", {}), "selection": self.selection_}
        (folder / HEAD_FILE).write_text(json.dumps(record, indent=1))
        if getattr(self, "seen_", None) is not None:
            save_seen(folder, self.seen_)
        return folder

    @classmethod
    def _restore(cls, folder: Path, record: dict, trust_pickle: bool = False) -> "Head":
        known = cls._get_param_names()  # a parameter featx has dropped since (the linear head's kernel) is ignored
        head = cls(**{name: value for name, value in record["params"].items() if name in known})
        head.classes_ = np.asarray(record["classes"])
        head.source_, head.fitted_on_, head.selection_ = record["source"], record["fitted_on"], record["selection"]
        head._load_state(folder, trust_pickle)
        head.seen_ = load_seen(folder)
        module = head.to_torch()
        if not all(torch.isfinite(t).all() for t in (*module.parameters(), *module.buffers())):
            raise ValueError(f"head {folder} holds NaN or infinite parameters; fit it again with `featx fit-head`")
        return head


def read_record(folder: str | os.PathLike) -> dict:
    """The ``head.json`` of a saved head."""
    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a featx head folder (no {HEAD_FILE}); run `featx fit-head` first")
    return json.loads(path.read_text())


def describe(folder: str | os.PathLike) -> str:
    """``featx info`` on a head folder: its kind, classes, the features it was fitted on, what it chose."""
    record = read_record(folder)
    source, selection = record["source"], record.get("selection") or {}
    names = source.get("class_names") or []
    lines = [f"{folder}: a {record['kind']} head, {len(names)} classes ({', '.join(map(str, names[:8]))}"
             f"{', ...' if len(names) > 8 else ''}) on {source['backbone']} features ({source['feature_dim']}-d)",
             f"  weights: {source.get('weights')} (sha256 {str(source.get('weights_sha256'))[:12]}...)",
             f"  fitted on: {', '.join(f'{k} {v}' for k, v in (record.get('fitted_on') or {}).items()) or '?'}"]
    if selection.get("chosen") is not None:
        lines.append(f"  chose {selection.get('parameter')} = {selection['chosen']} "
                     f"(val accuracy {selection.get('val_accuracy', float('nan')):.4f})")
    lines.append(f"  featx {record.get('featx_version')}; `featx evaluate {folder} FEATURES` scores it")
    return "\n".join(lines)


def check_positive(name: str, value, kind=(int, float)) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a positive number."""
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_grid(name: str, values) -> tuple:
    """A non-empty tuple of non-negative numbers, or a ValueError naming ``name``."""
    values = tuple(values) if np.iterable(values) else (values,)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
        raise ValueError(f"{name} must be a non-empty list of non-negative numbers, got {values!r}")
    return values
