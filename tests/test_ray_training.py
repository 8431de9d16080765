"""Fine-tuning on Ray Train (``featx finetune --engine ray``) on the local two-node cluster (``ray_cluster``, 1 CPU a
node): 2 DDP workers against the local engine on the real MobileNetV2 weights, a worker killed mid-epoch, the run
folder read by predict, export and --resume, and the one-line errors."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time

import psutil
import pytest
from test_faults import cli, one_line_error

from featx import checkpoints
from featx.finetuning import FinetuneConfig, finetune
from featx.ray_training import RayTrainOptions

pytestmark = [pytest.mark.ray, pytest.mark.real_data]
EPOCHS = 3


def recipe(weights) -> FinetuneConfig:
    return FinetuneConfig(backbone="mobilenet_v2", weights=str(weights), epochs=EPOCHS, batch_size=32, device="cpu",
                          workers=1)


@pytest.fixture(scope="module")
def runs(ray_cluster, hymenoptera, mobilenet_weights, tmp_path_factory) -> dict:
    """The same recipe on the local engine and on 2 Ray workers; run folders and best-model metrics."""
    folder = tmp_path_factory.mktemp("runs")
    local = finetune(hymenoptera, folder / "local", recipe(mobilenet_weights))
    ray = finetune(hymenoptera, folder / "ray", recipe(mobilenet_weights), engine="ray",
                   ray_options=RayTrainOptions(ray_cluster.address, workers=2))
    return {"local": (folder / "local", local), "ray": (folder / "ray", ray)}


def history(run) -> list[dict]:
    return checkpoints.load(run)[1]


def test_two_workers_train_as_the_local_engine_does(runs):
    (local_run, local), (ray_run, ray) = runs["local"], runs["ray"]
    local_history, ray_history = history(local_run), history(ray_run)
    assert [h["epoch"] for h in ray_history] == list(range(EPOCHS + 1))
    assert ray_history[0]["val_accuracy"] == local_history[0]["val_accuracy"]  # the same untrained model
    for mine, theirs in zip(ray_history[1:], local_history[1:]):
        assert abs(mine["val_accuracy"] - theirs["val_accuracy"]) <= 0.02, (mine, theirs)
    assert abs(ray["accuracy"] - local["accuracy"]) <= 0.01
    assert ray_history[1]["train_loss"] == pytest.approx(local_history[1]["train_loss"], rel=0.05)
    assert local["accuracy"] >= 0.93  # real weights: the recipe works
    record = json.loads((ray_run / "run.json").read_text())
    assert record["engine"]["name"] == "ray" and record["engine"]["workers"] == 2


def _kill_a_worker_mid_epoch(cluster, run, killed: list) -> None:
    """SIGKILL one of the cluster's training workers once epoch 1 is committed (so, during epoch 2)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and (checkpoints.load(run) or ({"epoch": 0},))[0]["epoch"] < 1:
        time.sleep(0.1)
    time.sleep(2)
    for process in cluster.processes():
        with contextlib.suppress(psutil.NoSuchProcess):
            if any("TrainWorker" in part for part in process.cmdline()):
                process.send_signal(signal.SIGKILL)
                killed.append(process.pid)
                return


def test_a_worker_killed_mid_epoch_restarts_from_the_last_checkpoint(runs, ray_cluster, hymenoptera,
                                                                     mobilenet_weights, tmp_path):
    run, killed = tmp_path / "run", []
    killer = threading.Thread(target=_kill_a_worker_mid_epoch, args=(ray_cluster, run, killed))
    killer.start()
    metrics = finetune(hymenoptera, run, recipe(mobilenet_weights), engine="ray",
                       ray_options=RayTrainOptions(ray_cluster.address, workers=2))
    killer.join()
    assert killed, "no training worker was found to kill"
    assert [h["epoch"] for h in history(run)] == list(range(EPOCHS + 1))  # each epoch once
    assert abs(metrics["accuracy"] - runs["ray"][1]["accuracy"]) <= 0.01


def test_the_ray_run_folder_works_with_predict_export_and_resume(runs, hymenoptera, mobilenet_weights, tmp_path):
    run = runs["ray"][0]
    status, out, err = cli("predict", run, hymenoptera / "val" / "ants", "--out", tmp_path / "predictions.csv")
    assert status == 0, err
    rows = (tmp_path / "predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == 70 and sum(",ants," in row for row in rows) >= 63
    assert cli("export", run, tmp_path / "model")[0] == 0
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(run, resumed)
    cfg = FinetuneConfig(**{**recipe(mobilenet_weights).__dict__, "epochs": EPOCHS + 1})
    finetune(hymenoptera, resumed, cfg, resume=True)  # a Ray run, continued on the local engine
    assert [h["epoch"] for h in history(resumed)] == list(range(EPOCHS + 2))


def test_bad_ray_requests_are_one_line_and_write_nothing(ray_cluster, image_folder, tmp_path):
    from conftest import free_port

    small = ["--backbone", "resnet18", "--weights", "none", "--resize", "40", "--crop", "32", "--epochs", "1",
             "--device", "cpu", "--batch_size", "4", "--engine", "ray"]
    cases = [(["--ray_address", f"127.0.0.1:{free_port()}"], "no Ray cluster answers"),
             (["--ray_address", ray_cluster.address, "--ray_workers", "3"], "the cluster has 2"),
             (["--ray_address", ray_cluster.address, "--ray_workers", "2", "--batch_size", "1"], "more than a batch"),
             (["--ray_address", ray_cluster.address, "--ray_workers", "0"], "--ray_workers")]
    for number, (flags, fragment) in enumerate(cases):
        out = tmp_path / f"run{number}"
        one_line_error(*cli("finetune", image_folder, *small, *flags, "--out", out)[::2], fragment)
        assert not (out / "run.json").exists()
