"""``logreg``: StandardScaler + multinomial LogisticRegression, C chosen on validation (Kornblith et al. 2019)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from featx.heads.base import Head, check_grid, check_positive

DEFAULT_CS = tuple(float(c) for c in np.logspace(-6, 5, 23))

STATE_ARRAYS = ("mean", "scale", "var", "samples", "C", "coef", "intercept", "classes", "iterations")  # model.npz


class LogRegHead(Head):
    """Logistic regression on standardised features with C swept over a log grid (warm-started, small to large).

    The best C on validation (accuracy, then log-loss) is refitted on train + validation.
    """

    kind = "logreg"

    def __init__(self, Cs=DEFAULT_CS, max_iter: int = 1000, refit: bool = True, seed: int = 0):
        self.Cs, self.max_iter, self.refit, self.seed = Cs, max_iter, refit, seed
        self._validate()

    def _validate(self):
        if not all(c > 0 for c in check_grid("Cs", self.Cs)):
            raise ValueError(f"Cs must all be positive, got {self.Cs!r}")
        check_positive("max_iter", self.max_iter, int)

    def _logreg(self, C: float, warm: bool = False) -> LogisticRegression:
        return LogisticRegression(C=C, max_iter=self.max_iter, warm_start=warm, random_state=self.seed)

    def fit(self, X, y, X_val=None, y_val=None, groups=None):
        self._validate()
        X, y, X_val, y_val = self._split(X, y, X_val, y_val, groups)
        scaler = StandardScaler().fit(X)
        train, val = scaler.transform(X), scaler.transform(X_val)
        model = self._logreg(self.Cs[0], warm=True)
        scores = []
        for C in sorted(self.Cs):
            model.set_params(C=C)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(train, y)
            proba = model.predict_proba(val)
            accuracy = float(np.mean(model.classes_[proba.argmax(1)] == y_val))
            scores.append({"C": C, "val_accuracy": accuracy,
                           "val_log_loss": float(log_loss(y_val, proba, labels=model.classes_))})
        best = max(scores, key=lambda s: (s["val_accuracy"], -s["val_log_loss"]))
        self.selection_ = {"parameter": "C", "chosen": best["C"], "val_accuracy": best["val_accuracy"],
                           "grid": scores, "refit_on_train_and_val": self.refit}
        if self.refit:
            X, y = np.concatenate([X, X_val]), np.concatenate([y, y_val])
        self.pipeline_ = Pipeline([("scale", StandardScaler()), ("logreg", self._logreg(best["C"]))])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.pipeline_.fit(X, y)
        return self

    def fixed_params(self) -> dict:
        return {**self.get_params(), "Cs": (self.selection_["chosen"],), "refit": False}

    def decision_function(self, X) -> np.ndarray:
        logits = self.pipeline_.decision_function(np.asarray(X, np.float32))
        return np.stack([np.zeros_like(logits), logits], 1) if logits.ndim == 1 else logits

    def linear_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(W [C, D], b [C]) with the scaler folded in: logits = X @ W.T + b."""
        scale, logreg = self.pipeline_["scale"], self.pipeline_["logreg"]
        coef, intercept = logreg.coef_ / scale.scale_, logreg.intercept_.copy()
        intercept = intercept - coef @ scale.mean_
        if coef.shape[0] == 1:  # binary: sklearn keeps one row; class 0 has logit 0
            coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        return coef, intercept

    def scaled(self, X) -> np.ndarray:
        scale = self.pipeline_["scale"]
        return (np.asarray(X, np.float64) - scale.mean_) / scale.scale_

    def to_torch(self) -> torch.nn.Module:
        coef, intercept = self.linear_weights()
        layer = torch.nn.Linear(coef.shape[1], coef.shape[0])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(coef))
            layer.bias.copy_(torch.from_numpy(intercept))
        return layer

    def _save_state(self, folder: Path) -> None:
        """The fitted arrays in ``model.npz`` (no pickle: loading it runs no code)."""
        scale, logreg = self.pipeline_["scale"], self.pipeline_["logreg"]
        np.savez(folder / "model.npz", mean=scale.mean_, scale=scale.scale_, var=scale.var_,
                 samples=np.asarray(scale.n_samples_seen_), coef=logreg.coef_, intercept=logreg.intercept_,
                 classes=logreg.classes_, iterations=np.asarray(logreg.n_iter_), C=np.asarray(logreg.C))
        (folder / "model.joblib").unlink(missing_ok=True)  # a stale pickle from an older featx

    def _load_state(self, folder: Path, trust_pickle: bool = False) -> None:
        if not (folder / "model.npz").is_file() and (folder / "model.joblib").is_file():
            self.pipeline_ = _load_pickled(folder / "model.joblib", trust_pickle)
            return
        with np.load(folder / "model.npz", allow_pickle=False) as arrays:
            missing = sorted(set(STATE_ARRAYS) - set(arrays.files))
            if missing:
                raise ValueError(f"{folder / 'model.npz'} lacks the arrays {', '.join(missing)}; fit the head again "
                                 "with `featx fit-head`")
            scale = StandardScaler()
            scale.mean_, scale.scale_, scale.var_ = arrays["mean"], arrays["scale"], arrays["var"]
            scale.n_samples_seen_, scale.n_features_in_ = int(arrays["samples"]), len(arrays["mean"])
            logreg = self._logreg(float(arrays["C"]))
            logreg.coef_, logreg.intercept_, logreg.classes_ = arrays["coef"], arrays["intercept"], arrays["classes"]
            logreg.n_iter_, logreg.n_features_in_ = arrays["iterations"], len(arrays["mean"])
        self.pipeline_ = Pipeline([("scale", scale), ("logreg", logreg)])


def _load_pickled(path: Path, trust_pickle: bool) -> Pipeline:
    """An older featx head's pickled pipeline: only when the user vouches for the file."""
    if not trust_pickle:
        raise ValueError(f"{path} is a pickle from an older featx: loading it can run any code. Refit the head with "
                         "`featx fit-head`, or pass --trust_pickle if you made this file yourself")
    import joblib

    print(f"featx: warning: loading the pickle {path} (--trust_pickle): it runs whatever code it holds")
    pipeline = joblib.load(path)
    if not isinstance(pipeline, Pipeline):
        raise ValueError(f"{path} holds a {type(pipeline).__name__}, not a scikit-learn pipeline: not a featx head")
    return pipeline
