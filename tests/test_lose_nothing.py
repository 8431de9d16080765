"""Runs that lose or break nothing: unreadable folders and odd file names are recorded, refused commands change
nothing on disk, damaged shards are recomputed, --overwrite keeps the old output until the new one is whole, a
finetune run folder is locked and survives a full device, and every user error is one line."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder, require_root, require_setpriv, sigkill_when
from test_faults import SMALL, cli, one_line_error

from featx import checkpoints, store
from featx.finetuning import FinetuneConfig, finetune

FINETUNE = ["--backbone", "squeezenet1_1", "--weights", "none", "--resize", "40", "--crop", "32", "--epochs", "1",
            "--workers", "0", "--device", "cpu", "--batch_size", "4"]
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override,-dac_read_search"]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_featx_cannot_read_is_recorded_not_dropped(image_folder, tmp_path):
    """Root reads any folder; the commands run without the capabilities that let it, as a user would."""
    require_setpriv()
    (image_folder / "train" / "dogs").chmod(0)
    try:
        command = [*NO_DAC, sys.executable, "-m", "featx"]
        result = subprocess.run([*command, "extract", str(image_folder), "--out", str(tmp_path / "f"), *SMALL],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        features = store.load(tmp_path / "f" / "resnet18" / "train.h5")
        assert dict(features.failed) == {"train/dogs": "cannot read this folder: Permission denied"}
        assert "1 failed" in result.stdout and "train/dogs" in result.stdout
        result = subprocess.run([*command, "predict", str(tmp_path / "knn"), str(image_folder / "train")],
                                capture_output=True, text=True)
        assert "no head.json" in result.stderr  # (no head yet: the folder check comes first)
        assert cli("fit-head", tmp_path / "f" / "resnet18" / "train.h5", "--head", "knn", "--val", "none",
                   "--out", tmp_path / "knn")[0] == 2  # one class left: refused in one line
    finally:
        (image_folder / "train" / "dogs").chmod(0o755)


def test_predict_records_a_folder_it_cannot_read(image_folder, tmp_path):
    require_setpriv()
    assert cli("extract", image_folder, "--out", tmp_path / "f", *SMALL)[0] == 0
    assert cli("fit-head", tmp_path / "f" / "resnet18" / "train.h5", "--head", "knn", "--out", tmp_path / "knn")[0] == 0
    (image_folder / "val" / "dogs").chmod(0)
    try:
        result = subprocess.run([*NO_DAC, sys.executable, "-m", "featx", "predict", str(tmp_path / "knn"),
                                 str(image_folder / "val"), "--device", "cpu", "--out", str(tmp_path / "p.json")],
                                capture_output=True, text=True)
    finally:
        (image_folder / "val" / "dogs").chmod(0o755)
    assert result.returncode == 0, result.stderr[-2000:]
    errors = [r for r in json.loads((tmp_path / "p.json").read_text()) if "error" in r]
    assert [r["path"] for r in errors] == [str(image_folder / "val" / "dogs")] and "Permission" in errors[0]["error"]
    assert f"skipped {image_folder / 'val' / 'dogs'}" in result.stderr


def test_file_names_that_are_not_utf8_are_extracted_and_shown_readably(image_folder, tmp_path):
    cats = image_folder / "train" / "cats"
    first = sorted(cats.iterdir())[0]
    os.rename(bytes(first), bytes(cats) + b"/caf\xe9.jpg")
    status, out, err = cli("extract", image_folder, "--out", tmp_path / "f", *SMALL)
    assert status == 0, err
    features = store.load(tmp_path / "f" / "resnet18" / "train.h5")
    assert "train/cats/caf\\xe9.jpg" in features.paths and len(features.paths) == 12
    assert cli("fit-head", tmp_path / "f" / "resnet18" / "train.h5", "--head", "knn", "--out", tmp_path / "knn")[0] == 0
    status, out, err = cli("predict", tmp_path / "knn", cats, "--device", "cpu")
    assert status == 0 and "caf\\xe9.jpg" in out and len(out.splitlines()) == 7, err


def test_a_refused_resume_changes_nothing(image_folder, tmp_path):
    run = tmp_path / "run"
    assert cli("finetune", image_folder, "--out", run, *FINETUNE)[0] == 0
    before = _snapshot(run)
    one_line_error(*cli("finetune", image_folder, "--out", run, *FINETUNE, "--resume", "--lr", "0.5")[::2],
                   "different recipe (lr)")
    one_line_error(*cli("finetune", image_folder, "--out", run, *FINETUNE[:-6], "--resume", "--backbone",
                        "resnet18")[::2], "different recipe")
    other = make_image_folder(tmp_path / "other", per_class=5, seed=1)  # other images, another val hold-out
    one_line_error(*cli("finetune", other, "--out", run, *FINETUNE, "--resume", "--epochs", "2")[::2],
                   "trained on other images (train and val differ", str(image_folder))
    assert _snapshot(run) == before
    assert cli("predict", run, image_folder / "val", "--device", "cpu")[0] == 0
    assert cli("export", run, tmp_path / "exported", "--noonnx")[0] == 0


def test_a_second_finetune_into_one_folder_is_refused_at_once(image_folder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    descriptor = os.open(run, os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)  # as a running finetune holds it
    try:
        one_line_error(*cli("finetune", image_folder, "--out", run, *FINETUNE, "--resume")[::2],
                       f"another featx process is writing to {run}")
    finally:
        os.close(descriptor)
    assert not list(run.iterdir())


def test_batches_whose_every_image_fails_are_skipped_and_recorded(image_folder, tmp_path):
    for name in ("a_bad0.jpg", "a_bad1.jpg"):
        (image_folder / "train" / "cats" / name).write_bytes(b"not an image")
    for i in range(8):  # val's first batch (2 x batch_size) is all bad
        (image_folder / "val" / "cats" / f"a_bad{i}.jpg").write_bytes(b"not an image")
    cfg = FinetuneConfig(backbone="squeezenet1_1", weights="none", resize=40, crop=32, epochs=1, workers=0,
                         device="cpu", batch_size=1)  # a batch per image: each bad one is a batch of failures
    metrics = finetune(image_folder, tmp_path / "run", cfg)
    assert metrics["num_examples"] == 12
    failed = dict(json.loads((tmp_path / "run" / "failed.json").read_text()))
    assert len(failed) == 10 and "train/cats/a_bad0.jpg" in failed


def test_a_damaged_committed_shard_is_named_and_recomputed(tmp_path):
    data = make_image_folder(tmp_path / "data", splits=("train",), per_class=10, size=(64, 64))
    command = [sys.executable, "-m", "featx", "extract", str(data), "--out", str(tmp_path / "f"), *SMALL,
               "--shard_size", "4", "--batch_size", "2"]
    clean = subprocess.run([*command[:6], str(tmp_path / "clean"), *command[7:]], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "f" / "resnet18" / "train.h5.parts"
    sigkill_when(process, lambda: (parts / "part-00001.h5").exists())
    shard = parts / "part-00000.h5"
    shard.write_bytes(shard.read_bytes()[:1000])  # cut short: a disk error, a bad copy
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{shard} is damaged" in result.stderr and "recomputing it" in result.stderr
    fixed, reference = store.load(tmp_path / "f" / "resnet18" / "train.h5"), store.load(
        tmp_path / "clean" / "resnet18" / "train.h5")
    assert fixed.paths == reference.paths and np.allclose(fixed.features, reference.features, atol=1e-5)


def test_overwrite_keeps_the_old_output_until_the_new_one_is_whole(tmp_path):
    data = make_image_folder(tmp_path / "data", splits=("train",), per_class=12, size=(64, 64))
    command = [sys.executable, "-m", "featx", "extract", str(data), "--out", str(tmp_path / "f"), *SMALL,
               "--shard_size", "4", "--batch_size", "2"]
    subprocess.run(command, capture_output=True, check=True)
    path = tmp_path / "f" / "resnet18" / "train.h5"
    old = store.load(path)
    process = subprocess.Popen([*command, "--overwrite", "--views", "2"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    sigkill_when(process, lambda: (path.with_name("train.h5.parts") / "part-00001.h5").exists())
    kept = store.load(path)  # killed mid-overwrite: the old file is still whole
    assert kept.paths == old.paths and np.array_equal(kept.features, old.features)


def test_a_full_device_during_finetune_is_one_line_and_keeps_the_committed_epochs(image_folder, tmp_path):
    """A device with room for 1.2 final checkpoints: epoch 0 (no momentum yet) commits, epoch 1 (written beside it
    before the switch) runs out of space."""
    require_root("mounting a tmpfs")
    command = [sys.executable, "-m", "featx", "finetune", str(image_folder), *FINETUNE]
    subprocess.run([*command, "--out", str(tmp_path / "reference")], capture_output=True, check=True)
    epoch = sum(p.stat().st_size for p in (tmp_path / "reference" / "checkpoints").rglob("*") if p.is_file())
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(epoch * 1.2) // 1024 + 32}k", "tmpfs", str(mount)],
                   check=True)
    try:
        full = subprocess.run([*command, "--out", str(mount / "run")], capture_output=True, text=True)
        one_line_error(full.returncode, full.stderr, f"no space left on {mount}", "rerun to resume")
        assert json.loads((mount / "run" / "checkpoint.json").read_text())["epoch"] == 0
        assert not list((mount / "run" / "checkpoints").glob("*.tmp"))  # the half-written epoch freed its space
        subprocess.run(["mount", "-o", f"remount,size={epoch * 4 // 1024}k", str(mount)], check=True)
        resumed = subprocess.run([*command, "--out", str(mount / "run"), "--resume"], capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "resuming from epoch 0" in resumed.stdout and checkpoints.load(mount / "run")[0]["epoch"] == 1
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("argv, message", [
    (["extract"], "extract needs DATA"),
    (["evaluate", "head"], "evaluate needs FEATURES"),
    (["export-features", "f.h5"], "export-features needs OUT"),
    (["extract", "data", "resnet50"], "'resnet50' is one argument too many"),
    (["extract", "data", "--overwrite", "maybe"], "--overwrite is a switch"),
    (["extract", "data", "--batch_size"], "--batch_size needs a value"),
    (["extract", "data", "--crop", "0"], "crop must be a positive integer"),
    (["extract", "data", "--device", "tpu"], "device must be auto, cpu, cuda or cuda:N"),
    (["extract", "data", "--device", "gpu"], "device must be auto, cpu, cuda or cuda:N"),
    (["finetune", "data", "--lr", "abc"], "lr must be a number, got 'abc'"),
    (["finetune", "data", "--head_lr_mult", "x"], "head_lr_mult must be a number"),
    (["finetune", "data", "--weight_decay", "x"], "weight_decay must be a number"),
    (["finetune", "data", "--gamma", "x"], "gamma must be a number"),
    (["finetune", "data", "--momentum", "x"], "momentum must be a number"),
    (["finetune", "data", "--val_fraction", "x"], "val_fraction must be a number"),
    (["finetune", "data", "--seed", "x"], "seed must be an integer"),
    (["finetune", "data", "--warmup_epochs", "-1"], "warmup_epochs must be zero or more"),
    (["predict", "head", "x.jpg", "--workers", "-1"], "workers must be a non-negative integer"),
    (["export-features", "f.h5", "out.csv"], "not .csv"),
    (["export-features", "f.h5", "out.parquet", "--format", "npy"], "--format is npy"),
])
def test_user_errors_are_one_line_before_any_work(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "extract" and "--device" in argv:
        make_image_folder(tmp_path / "data", splits=("train",), per_class=2)
        argv = [*argv, "--weights", "none"]
    if argv[0] == "predict":
        make_image_folder(tmp_path / "data", per_class=4)
        assert cli("extract", tmp_path / "data", "--out", tmp_path / "f", *SMALL)[0] == 0
        assert cli("fit-head", tmp_path / "f" / "resnet18" / "train.h5", "--head", "knn", "--out", "head")[0] == 0
    one_line_error(*cli(*argv)[::2], message)
    assert not (tmp_path / "features").exists()


@pytest.mark.parametrize("reuse, message", [("ants=5000", "ants=5000"), ("ants=-1", "ants=-1")])
def test_a_reused_imagenet_row_must_exist(hymenoptera, squeezenet_weights, tmp_path, reuse, message):
    one_line_error(*cli("finetune", hymenoptera, "--out", tmp_path / "run", "--backbone", "squeezenet1_1",
                        "--weights", squeezenet_weights, "--head_init", "reuse", "--reuse", reuse)[::2],
                   message, "integer from 0 to 999")
    assert not (tmp_path / "run").exists()


def test_mirror_none_means_download(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_MIRROR", str(tmp_path))  # a mirror without the weights: none must not look there
    status, _, err = cli("extract", image_folder, "--out", tmp_path / "f", "--mirror", "none", "--device", "cpu")
    one_line_error(status, err, "resnet18-f37072fd.pth")
    assert "mirror directory" not in err


@pytest.mark.slow
def test_compile_works_on_squeezenet(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "cache"))
    flags = ["--backbone", "squeezenet1_1", "--weights", "none", "--resize", "40", "--crop", "32", "--device", "cpu",
             "--workers", "1", "--splits", "val"]
    assert cli("extract", image_folder, "--out", tmp_path / "eager", *flags)[0] == 0
    status, _, err = cli("extract", image_folder, "--out", tmp_path / "compiled", *flags, "--compile")
    assert status == 0, err
    eager, compiled = (store.load(tmp_path / f / "squeezenet1_1" / "val.h5").features for f in ("eager", "compiled"))
    assert np.abs(eager - compiled).max() <= 1e-4 and np.abs(eager).max() > 1e-3
    assert len(list((tmp_path / "cache" / "compiled").rglob("*.pt2"))) == 1  # it ran the compiled package


def test_an_export_over_a_folder_is_one_line_and_leaves_no_partial_file(image_folder, tmp_path):
    assert cli("extract", image_folder, "--out", tmp_path / "f", *SMALL)[0] == 0
    (tmp_path / "x.parquet").mkdir()
    one_line_error(*cli("export-features", tmp_path / "f" / "resnet18" / "val.h5", tmp_path / "x.parquet")[::2],
                   "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "f", "x.parquet"]
