"""Extraction end to end: real-weights numerics and accuracy, resume after SIGKILL, refusing stale output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from conftest import make_image_folder
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torchvision import transforms

from featx import store
from featx.backbones import BackboneSpec
from featx.embed import Embedder
from featx.extract import ExtractError, extract
from featx.options import ExtractOptions

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_real_features_match_direct_forward(hymenoptera_features, hymenoptera, mobilenet_weights):
    train, val = store.load(hymenoptera_features / "train.h5"), store.load(hymenoptera_features / "val.h5")
    assert len(train.labels) + len(val.labels) == 398 and not train.failed and not val.failed
    assert train.class_names == ["ants", "bees"] and train.features.shape[1] == 1280
    for features in (train, val):  # labels align with the folder each path is in
        assert [features.class_names[i] for i in features.labels] == [p.split("/")[1] for p in features.paths]
    assert train.meta["weights_sha256"].startswith("7c0df58649780856")
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(mobilenet_weights, weights_only=True), strict=False)
    model.classifier = torch.nn.Identity()
    preprocess = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                     transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    for features in (train, val):  # every row, computed without featx
        for start in range(0, len(features.paths), 64):
            paths = features.paths[start:start + 64]
            images = torch.stack([preprocess(Image.open(hymenoptera / p).convert("RGB")) for p in paths])
            with torch.inference_mode():
                direct = model.eval()(images).numpy()
            assert np.abs(direct - features.features[start:start + 64]).max() <= 1e-4, paths


def test_real_features_are_linearly_separable(hymenoptera_features):
    train, val = store.load(hymenoptera_features / "train.h5"), store.load(hymenoptera_features / "val.h5")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(train.features, train.labels)
    assert probe.score(val.features, val.labels) >= 0.94


def test_resnet_dims_and_provenance(image_folder, tmp_path):
    for name, dim in (("resnet18", 512), ("resnet50", 2048)):
        extract(image_folder, BackboneSpec(name, "none"), tmp_path, splits=["val"], options=ExtractOptions(workers=0))
        meta = store.read_meta(tmp_path / name / "val.h5")
        assert meta["feature_dim"] == dim and meta["backbone"] == name and meta["num_rows"] == 12
        assert meta["weights"] == "none" and meta["transform"]["crop"] == 224 and meta["complete"]
        with h5py.File(tmp_path / name / "val.h5") as f:
            assert f["features"].shape == (12, dim) and f["features"].chunks[1] == dim


def test_float16_and_compression_and_chunk_iterator(image_folder, tmp_path):
    options = ExtractOptions(workers=0, dtype="float16", compression="gzip")
    extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path, splits=["train"], options=options)
    path = tmp_path / "resnet18" / "train.h5"
    whole = store.load(path)
    assert whole.features.dtype == np.float16
    blocks = list(store.iter_chunks(path, rows=5))
    assert [len(b[0]) for b in blocks] == [5, 5, 2]
    assert np.array_equal(np.concatenate([b[0] for b in blocks]), whole.features)
    assert np.array_equal(np.concatenate([b[1] for b in blocks]), whole.labels)


def test_complete_output_is_kept_and_other_backbone_refused(image_folder, tmp_path, capsys):
    options = ExtractOptions(workers=0)
    extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path, splits=["val"], options=options)
    path = tmp_path / "resnet18" / "val.h5"
    stamp = path.stat().st_mtime_ns
    summary = extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path, splits=["val"], options=options)
    assert summary["val"]["skipped"]
    assert path.stat().st_mtime_ns == stamp and "up to date" in capsys.readouterr().out
    with pytest.raises(ExtractError, match="transform.*--overwrite"):
        extract(image_folder, BackboneSpec("resnet18", "none", resize=128, crop=112), tmp_path, splits=["val"],
                options=options)
    (image_folder / "val" / "cats" / "cats_000.jpg").unlink()
    with pytest.raises(ExtractError, match="file_list_sha256"):
        extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path, splits=["val"], options=options)
    overwrite = ExtractOptions(workers=0, overwrite=True)
    summary = extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path, splits=["val"], options=overwrite)
    assert summary["val"]["num_rows"] == 11


def test_unfinished_output_is_reported_by_reader(tmp_path):
    (tmp_path / "train.h5.parts").mkdir()
    with pytest.raises(store.IncompleteFeaturesError, match="resume"):
        store.load(tmp_path / "train.h5")


def _extract_command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "featx", "extract", str(data), "--backbone", "resnet18", "--weights", "none",
            "--out", str(out), "--resize", "72", "--crop", "64", "--batch_size", "4", "--shard_size", "8",
            "--workers", "1"]


def _kill_after_shards(command: list[str], parts: Path, shards: int) -> None:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(store.finished_shards(parts)) < shards and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path):
    data = make_image_folder(tmp_path / "data", splits=("train",), per_class=60, size=(80, 72))
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    subprocess.run(_extract_command(data, reference), check=True, capture_output=True)
    parts = resumed / "resnet18" / "train.h5.parts"
    _kill_after_shards(_extract_command(data, resumed), parts, 2)
    assert not (resumed / "resnet18" / "train.h5").exists(), "the run finished before it could be killed"
    done = len(store.finished_shards(parts))
    _kill_after_shards(_extract_command(data, resumed), parts, done + 3)
    for shard in parts.glob("part-*.h5"):  # every committed shard opens, whatever the moment of the kill
        h5py.File(shard, "r").close()
    result = subprocess.run(_extract_command(data, resumed), check=True, capture_output=True, text=True)
    assert "resuming" in result.stdout
    expected, got = store.load(reference / "resnet18" / "train.h5"), store.load(resumed / "resnet18" / "train.h5")
    assert got.paths == expected.paths and len(set(got.paths)) == 120
    assert np.array_equal(got.labels, expected.labels)
    assert np.array_equal(got.features, expected.features)
    assert not parts.exists()


def test_resume_with_other_batch_and_shard_size_keeps_the_first_plan(image_folder, tmp_path, monkeypatch):
    first = ExtractOptions(workers=0, batch_size=2, shard_size=4, runtime="torch")  # no measurement among the calls
    calls, embed = [], Embedder.__call__

    def interrupted(self, images):
        calls.append(len(images))
        if len(calls) == 5:  # first batch of the third shard
            raise KeyboardInterrupt
        return embed(self, images)

    monkeypatch.setattr(Embedder, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path / "resumed", splits=["train"], options=first)
    monkeypatch.undo()
    parts = tmp_path / "resumed" / "resnet18" / "train.h5.parts"
    assert store.finished_shards(parts) == {0, 1} and not list(parts.glob("*.tmp"))
    extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path / "resumed", splits=["train"],
            options=ExtractOptions(workers=0, batch_size=3, shard_size=5, runtime="torch"))
    extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path / "reference", splits=["train"], options=first)
    got, expected = (store.load(tmp_path / r / "resnet18" / "train.h5") for r in ("resumed", "reference"))
    assert got.paths == expected.paths and len(set(got.paths)) == 12
    assert np.allclose(got.features, expected.features, atol=1e-5)


def test_cli_reports_bad_weights_in_one_line(image_folder, tmp_path):
    result = subprocess.run([sys.executable, "-m", "featx", "extract", str(image_folder), "--weights",
                             str(tmp_path / "missing.pth")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


def test_cli_extract_starts_without_the_heads_libraries():
    probe = "import sys, featx.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy'}))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"  # imported by fit-head / evaluate / predict / finetune when they run
