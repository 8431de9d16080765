"""Heads on cached features: real accuracy, selection, streaming, refusal, estimator behaviour, views."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from test_faults import cli, one_line_error

from featx import store
from featx.backbones import BackboneSpec
from featx.extract import extract
from featx.fit import evaluate, fit_head
from featx.heads import HEADS, KNNHead, LinearHead, LogRegHead, holdout_split, load_head, make_head
from featx.metrics import classification_metrics, plot_confusion
from featx.options import ExtractOptions

THRESHOLDS = {"logreg": 0.95, "linear": 0.95, "knn": 0.90}
CLIP_ONLY = {"zeroshot"}  # heads that need features of a backbone with a text tower
README_LOGREG = 0.9608  # the held-out figure README.md quotes: `fit-head --val none` + `evaluate`, 147 of 153


def test_every_registered_head_is_covered_here():
    """A new head must say what it scores on real MobileNetV2 features, or that it needs a CLIP backbone (the
    zeroshot head once broke `make demo`, which fitted every registered head)."""
    assert set(HEADS) == set(THRESHOLDS) | CLIP_ONLY


@pytest.fixture(scope="module")
def real_heads(hymenoptera_features, tmp_path_factory):
    """Each head fitted on real train features with a hold-out of train (val stays unseen)."""
    root = tmp_path_factory.mktemp("heads")
    return {kind: fit_head(hymenoptera_features / "train.h5", "none", kind, root / kind) and root / kind
            for kind in THRESHOLDS}


@pytest.mark.parametrize("kind", sorted(CLIP_ONLY))
def test_clip_only_heads_refuse_other_features_in_one_line(hymenoptera_features, kind, tmp_path):
    one_line_error(*cli("fit-head", hymenoptera_features / "train.h5", "--head", kind, "--out", tmp_path / kind)[::2],
                   "mobilenet_v2 has no text tower")
    assert not (tmp_path / kind).exists()


@pytest.mark.parametrize("kind", sorted(THRESHOLDS))
def test_real_head_accuracy_on_unseen_val(real_heads, hymenoptera_features, kind, tmp_path):
    metrics = evaluate(real_heads[kind], hymenoptera_features / "val.h5", tmp_path)
    assert metrics["held_out"] and metrics["num_examples"] == 153
    assert metrics["accuracy"] >= THRESHOLDS[kind]
    if kind == "logreg":
        assert metrics["accuracy"] == pytest.approx(README_LOGREG, abs=1e-4)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["confusion_matrix"] == metrics["confusion_matrix"] and (tmp_path / "confusion.png").stat().st_size
    record = json.loads((real_heads[kind] / "head.json").read_text())
    assert record["selection"]["chosen"] is not None and record["source"]["backbone"] == "mobilenet_v2"


def test_confusion_plot_leaves_the_callers_matplotlib_alone(tmp_path):
    import matplotlib

    matplotlib.use("svg")  # a caller's choice, e.g. a notebook's backend
    metrics = classification_metrics(np.array([0, 1, 1]), np.array([[2.0, 1.0], [0.0, 1.0], [3.0, 1.0]]), ["a", "b"])
    path = plot_confusion(metrics, tmp_path / "confusion.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.get_backend() == "svg"


def test_selection_on_val_marks_evaluation_not_held_out(hymenoptera_features, tmp_path, capsys):
    head = fit_head(hymenoptera_features / "train.h5", "auto", "logreg", tmp_path / "h", Cs=[0.01, 1.0])
    assert "on " + str(hymenoptera_features / "val.h5") in capsys.readouterr().out
    assert head.selection_["chosen"] in (0.01, 1.0) and len(head.selection_["grid"]) == 2
    assert not evaluate(tmp_path / "h", hymenoptera_features / "val.h5", tmp_path / "e")["held_out"]


def test_holdout_is_stratified_deterministic_and_keeps_groups():
    labels = np.repeat([0, 1, 2], [50, 30, 20]).repeat(3)
    groups = np.arange(100).repeat(3)
    held = holdout_split(labels, groups, 0.2, seed=0)
    assert np.array_equal(held, holdout_split(labels, groups, 0.2, seed=0))
    assert [held[labels == c].sum() // 3 for c in range(3)] == [10, 6, 4]
    for group in range(100):
        assert len(set(held[groups == group])) == 1


def _blobs(n, dim=32, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim))
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(0, 1.5, (n, dim))).astype(np.float32), y


def test_streaming_linear_matches_in_memory(tmp_path):
    X, y = _blobs(15000)
    X, Xv, y, yv = X[:12000], X[12000:], y[:12000], y[12000:]
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["X"] = X
    memory = LinearHead(epochs=4, block_rows=10**9).fit(X, y, Xv, yv)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        streamed = LinearHead(epochs=4, block_rows=1000).fit(f["X"], y, Xv, yv)
    assert memory.score(Xv, yv) > 0.8
    assert abs(memory.score(Xv, yv) - streamed.score(Xv, yv)) <= 0.01


PEAK_RSS = textwrap.dedent("""
    import sys, h5py, numpy as np
    from featx.heads import LinearHead
    with h5py.File(sys.argv[1], "r") as f:
        LinearHead(epochs=1, lrs=[0.01], weight_decays=[0.0], block_rows=16384).fit(f["X"], f["y"][:])
    # VmHWM is this process's own peak; ru_maxrss would carry pytest's across fork+exec
    print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) // 1024)
""")


@pytest.mark.slow
def test_streaming_linear_memory_does_not_grow_with_rows(tmp_path):
    peaks = {}
    for rows in (25_000, 200_000):
        path = tmp_path / f"{rows}.h5"
        rng = np.random.default_rng(0)
        with h5py.File(path, "w") as f:
            data = f.create_dataset("X", (rows, 512), "float32", chunks=(512, 512))
            for start in range(0, rows, 25_000):
                data[start:start + 25_000] = rng.standard_normal((25_000, 512), dtype=np.float32)
            f["y"] = rng.integers(0, 10, rows)
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True,
                                check=True)
        peaks[rows] = int(result.stdout.split()[-1])
    # 175k more rows are 358 MB more data; the streamed fit may grow by its [N] label/mask arrays only.
    assert peaks[200_000] - peaks[25_000] < 60, peaks


def test_head_refuses_features_of_another_backbone(real_heads, image_folder, tmp_path):
    extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path, splits=["val"], options=ExtractOptions(workers=0))
    with pytest.raises(ValueError, match="resnet18.*mobilenet_v2|mobilenet_v2.*resnet18"):
        evaluate(real_heads["logreg"], tmp_path / "resnet18" / "val.h5")


def test_logreg_head_drops_into_a_sklearn_pipeline():
    X, y = _blobs(600)
    pipeline = Pipeline([("pca", PCA(8)), ("head", LogRegHead(Cs=[0.1, 1.0]))]).fit(X, y)
    assert pipeline.score(X, y) > 0.8
    fresh = clone(pipeline)
    assert fresh.get_params()["head__Cs"] == [0.1, 1.0] and not hasattr(fresh["head"], "pipeline_")


@pytest.mark.parametrize("factory, message", [
    (lambda: LogRegHead(Cs=[1.0, -1.0]), "Cs"),
    (lambda: LinearHead(epochs=0), "epochs"),
    (lambda: LinearHead(lrs=[]), "lrs"),
    (lambda: KNNHead(ks=[0]), "ks"),
    (lambda: make_head("svm"), "svm"),
    (lambda: make_head("logreg", lrs=[0.1]), "no parameter lrs"),
])
def test_bad_parameters_are_named_up_front(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_a_head_saved_with_a_parameter_featx_has_since_dropped_still_loads(tmp_path):
    """Heads fitted by a featx with the compiled SGD kernel record ``kernel`` among their parameters."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    X = (rng.normal(0, 1, (3, 8))[y] + rng.normal(0, 0.5, (600, 8))).astype(np.float32)
    head = LinearHead(epochs=3).fit(X, y)
    head.save(tmp_path)
    record = json.loads((tmp_path / "head.json").read_text())
    record["params"]["kernel"] = "fused"
    (tmp_path / "head.json").write_text(json.dumps(record))
    np.testing.assert_array_equal(load_head(tmp_path).decision_function(X), head.decision_function(X))


@pytest.mark.parametrize("kind", ["logreg", "linear", "knn"])
def test_save_load_roundtrip_and_torch_module_agree(kind, tmp_path):
    X, y = _blobs(400, classes=3)
    head = make_head(kind).fit(X, y)
    head.set_source({"backbone": "b", "weights_sha256": "s", "feature_dim": 32, "transform": {}, "class_names":
                     ["a", "b", "c"], "weights": "none", "weights_source": ""}).save(tmp_path)
    loaded = load_head(tmp_path)
    assert np.allclose(loaded.decision_function(X), head.decision_function(X), atol=1e-5)
    with torch.no_grad():
        module_logits = loaded.to_torch()(torch.from_numpy(X)).numpy()
    assert np.allclose(module_logits, head.decision_function(X), atol=1e-4)
    assert np.allclose(head.predict_proba(X).sum(1), 1.0)


def test_views_store_augmented_rows_per_image(image_folder, tmp_path):
    options = ExtractOptions(workers=1, views=3, batch_size=5, shard_size=5)
    extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path / "a", options=options)
    extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path / "b", options=ExtractOptions(workers=0, views=3))
    train, again = (store.load(tmp_path / r / "resnet18" / "train.h5") for r in ("a", "b"))
    val = store.load(tmp_path / "a" / "resnet18" / "val.h5")
    assert train.features.shape[0] == 36 and np.array_equal(train.image_ids, np.arange(12).repeat(3))
    assert train.meta["views"] == 3 and train.meta["augmentation"]["scale"] == [0.08, 1.0]
    assert np.allclose(train.features, again.features, atol=1e-5)  # same views whatever workers/batching
    assert not np.allclose(train.features[0], train.features[1])  # views differ
    assert val.meta["views"] == 1 and val.features.shape[0] == 12
    head = fit_head(tmp_path / "a" / "resnet18" / "train.h5", "none", "logreg", tmp_path / "h", Cs=[1.0])
    assert head.selection_["val_accuracy"] == 1.0  # red against green: every held-out view, even with random weights
    scored = evaluate(tmp_path / "h", tmp_path / "a" / "resnet18" / "val.h5", tmp_path / "e")
    assert scored["accuracy"] == 1.0 and scored["held_out"]
