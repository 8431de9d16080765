"""predict reproduces evaluate; the exported fused model reproduces predict's logits."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import make_image_folder
from test_faults import cli, one_line_error

from featx.backbones import BackboneSpec, backbone_from_source
from featx.decode import ImageFiles, collate
from featx.embed import Embedder
from featx.export import export, fused_model
from featx.extract import extract
from featx.fit import evaluate, fit_head
from featx.options import ExtractOptions
from featx.predict import accuracy, predict, to_csv

SMALL_FINETUNE = ["--backbone", "resnet18", "--weights", "none", "--resize", "40", "--crop", "32", "--epochs", "1",
                  "--workers", "0", "--device", "cpu", "--batch_size", "8"]


def test_predict_on_val_folder_reproduces_evaluate(hymenoptera_features, hymenoptera, tmp_path):
    head = tmp_path / "head"
    fit_head(hymenoptera_features / "train.h5", "none", "logreg", head)
    metrics = evaluate(head, hymenoptera_features / "val.h5", tmp_path / "eval")
    records = predict(head, [str(hymenoptera / "val")], topk=2, workers=1, device="cpu")
    assert len(records) == 153 and all(r["true"] in ("ants", "bees") for r in records)
    assert accuracy(records) == (pytest.approx(metrics["accuracy"]), 153)
    rows = list(csv.DictReader(io.StringIO(to_csv(records))))
    assert rows[0]["predicted"] in ("ants", "bees") and rows[0]["topk"].count(":") == 2


@pytest.fixture(scope="module")
def small_head(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    data = make_image_folder(root / "data", per_class=8)
    extract(data, BackboneSpec("resnet18", "none"), root / "features", options=ExtractOptions(workers=0, device="cpu"))
    fit_head(root / "features" / "resnet18" / "train.h5", "auto", "linear", root / "head", epochs=20, device="cpu")
    return root / "head", data


def test_export_matches_predict_logits(small_head, tmp_path):
    head, data = small_head
    records = predict(head, [str(data / "val")], workers=0, device="cpu")
    backbone = backbone_from_source(fused_model(head)[1])
    files = ImageFiles(Path(), tuple(r["path"] for r in records), backbone.transform)
    images = Embedder(backbone, "cpu").normalise(collate([files[i] for i in range(len(files))]).images)
    export(head, tmp_path, onnx=True)
    predicted = np.array([r["logits"] for r in records])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(tmp_path / "model.ts"))(images).numpy()
        exported = torch.export.load(tmp_path / "model.pt2").module()(images).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    [onnx_logits] = session.run(None, {session.get_inputs()[0].name: images.contiguous().numpy()})
    for logits in (scripted, exported, onnx_logits):
        assert np.abs(logits - predicted).max() <= 1e-4
    assert (tmp_path / "model.json").read_text().count("cats") == 1


def test_predict_cli_reports_bad_images_and_writes_json(small_head, tmp_path):
    head, data = small_head
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    result = subprocess.run([sys.executable, "-m", "featx", "predict", str(head), str(data / "val" / "cats"),
                             str(tmp_path / "broken.jpg"), "--out", str(tmp_path / "p.json"), "--show",
                             str(tmp_path / "sheet.png"), "--workers", "0", "--device", "cpu"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr
    assert "accuracy" in result.stderr and (tmp_path / "sheet.png").stat().st_size > 1000
    records = json.loads((tmp_path / "p.json").read_text())
    assert len(records) == 9 and "error" in records[-1]


def test_what_each_path_holds_is_said(small_head, tmp_path):
    """`featx info` on a head, a finetune run and a folder; a file of another kind given as features; predict on
    nothing readable is an error, not an exit 0 with error rows."""
    head, data = small_head
    status, out, _ = cli("info", head)
    assert status == 0 and "a linear head, 2 classes (cats, dogs) on resnet18 features (512-d)" in out
    one_line_error(*cli("info", head.parent / "features")[::2], "is a folder, not a features file",
                   "train.h5")
    np.savez(tmp_path / "rows.npz", features=np.zeros((2, 3)))
    one_line_error(*cli("fit-head", tmp_path / "rows.npz")[::2], "is a zip archive (NumPy .npz?)", "featx extract")
    status, _, err = cli("export-features", head.parent / "features" / "resnet18" / "val.h5", tmp_path / "v.parquet")
    assert status == 0, err
    one_line_error(*cli("evaluate", head, tmp_path / "v.parquet")[::2], "is a Parquet table")
    one_line_error(*cli("predict", head, tmp_path / "missing.jpg", "--device", "cpu")[::2],
                   "nothing could be classified", "missing.jpg")
    assert cli("finetune", data, "--out", tmp_path / "run", *SMALL_FINETUNE)[0] == 0
    status, out, _ = cli("info", tmp_path / "run")
    assert status == 0 and "a finetune run of resnet18" in out and "epochs done: 1 of 1" in out, out


def test_predict_runs_the_backbone_as_extract_does(small_head):
    """--runtime and --precision reach predict's model: ONNX Runtime gives PyTorch's logits; a runtime that cannot
    run as asked is one line."""
    head, data = small_head
    logits = {runtime: np.array([r["logits"] for r in predict(head, [str(data / "val")], workers=0, device="cpu",
                                                                runtime=runtime)])
              for runtime in ("torch", "onnxruntime", "auto")}
    assert np.abs(logits["onnxruntime"] - logits["torch"]).max() <= 1e-4
    assert np.abs(logits["auto"] - logits["torch"]).max() <= 1e-4
    one_line_error(*cli("predict", head, data / "val", "--device", "cpu", "--runtime", "onnxruntime", "--precision",
                        "bf16")[::2], "--precision bf16")  # onnxruntime runs fp32 (or: this CPU would emulate bf16)
    one_line_error(*cli("predict", head, data / "val", "--device", "cpu", "--precision", "int8")[::2],
                   "--precision int8 is calibrated on a split's own images, so only extract takes it")
