"""Fine-tuning on Ray Train (``featx finetune --engine ray``) on the local two-node cluster (``ray_cluster``, 1 CPU a
node): 2 DDP workers against the local engine on the real MobileNetV2 weights, a worker killed mid-epoch, the run
folder read by predict, export and --resume, and the one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import torch
import pytest
from conftest import missing, ray_problem
from test_faults import cli, one_line_error

from featx import checkpoints
from featx.finetuning import FinetuneConfig, finetune
from featx.ray_training import DDPWorkers, RayEngine, RayTrainOptions, drop_as_one_process

pytestmark = [pytest.mark.ray, pytest.mark.real_data]
EPOCHS = 3


def recipe(weights) -> FinetuneConfig:
    """The README's MobileNetV2 recipe (0.9542 on val locally)."""
    return FinetuneConfig(backbone="mobilenet_v2", weights=str(weights), epochs=EPOCHS, lr=0.003, warmup_epochs=0.5,
                          batch_size=32, device="cpu", workers=1)


@pytest.fixture(scope="module")
def runs(ray_cluster, hymenoptera, mobilenet_weights, tmp_path_factory) -> dict:
    """The same recipe on the local engine, on 2 Ray workers with BatchNorm over the global batch (--sync_bn, as one
    process computes it), and on 2 Ray workers with BatchNorm per worker (the default); run folders and best-model
    metrics."""
    folder = tmp_path_factory.mktemp("runs")
    local = finetune(hymenoptera, folder / "local", recipe(mobilenet_weights))
    ray = finetune(hymenoptera, folder / "ray", replace(recipe(mobilenet_weights), sync_bn=True),
                   engine=on_ray(ray_cluster))
    per_worker = finetune(hymenoptera, folder / "per-worker", recipe(mobilenet_weights), engine=on_ray(ray_cluster))
    return {"local": (folder / "local", local), "ray": (folder / "ray", ray),
            "per-worker": (folder / "per-worker", per_worker)}


def on_ray(cluster) -> RayEngine:
    return RayEngine(RayTrainOptions(cluster.address, workers=2))


def history(run) -> list[dict]:
    return checkpoints.load(run)[1]


def test_two_workers_with_sync_bn_take_the_local_engines_steps(ray_cluster, tmp_path):
    """No dropout, batches that split evenly, BatchNorm over the global batch: DDP on 2 workers is the same
    arithmetic as one process, so an epoch's losses agree to float rounding (the step's gradients agree to 1e-8;
    after that, rounding grows with each step of a net this far from converged)."""
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", per_class=8)  # 16 training images: 2 batches of 8
    cfg = FinetuneConfig(backbone="resnet18", weights="none", resize=40, crop=32, epochs=1, batch_size=8,
                         workers=0, device="cpu", lr=0.003, sync_bn=True)
    finetune(data, tmp_path / "local", cfg)
    finetune(data, tmp_path / "ray", cfg, engine=on_ray(ray_cluster))
    local, ray = history(tmp_path / "local"), history(tmp_path / "ray")
    for mine, theirs in zip(ray, local):
        if "train_loss" in theirs:  # epoch 0 is scored, not trained
            assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4), (mine, theirs)
        assert mine["val_accuracy"] == theirs["val_accuracy"]
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-2)  # an untrained net: large, sensitive


def test_two_workers_train_as_the_local_engine_does(runs):
    """With BatchNorm over the global batch and each worker dropping its rows of the local run's dropout masks, two
    workers train as one process does up to float rounding, which 3 epochs amplify a little (measured: epochs
    within 0.7 points, the same best model, epoch-1 train loss +0.5 %; with BatchNorm per worker instead: epochs
    within 2.0 points, the best within 0.7, epoch-1 loss +6 %)."""
    (local_run, local), (ray_run, ray) = runs["local"], runs["ray"]
    local_history, ray_history = history(local_run), history(ray_run)
    assert [h["epoch"] for h in ray_history] == list(range(EPOCHS + 1))
    assert ray_history[0]["val_accuracy"] == local_history[0]["val_accuracy"]  # the same untrained model
    for mine, theirs in zip(ray_history[1:], local_history[1:]):
        assert abs(mine["val_accuracy"] - theirs["val_accuracy"]) <= 0.02, (mine, theirs)
    assert abs(ray["accuracy"] - local["accuracy"]) <= 0.01
    assert ray_history[1]["train_loss"] == pytest.approx(local_history[1]["train_loss"], rel=0.05)
    assert local["accuracy"] == pytest.approx(0.9542, abs=1e-4)  # the README's figure
    assert abs(runs["per-worker"][1]["accuracy"] - local["accuracy"]) <= 0.02  # BatchNorm per worker: close
    record = json.loads((ray_run / "run.json").read_text())
    assert record["engine"]["name"] == "ray" and record["engine"]["workers"] == 2


def _kill_a_worker_mid_epoch(cluster, run, killed: list) -> None:
    """SIGKILL one of the cluster's training workers once epoch 1 is committed (so, during epoch 2)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and _epochs_done(run) < 1:
        time.sleep(0.1)
    time.sleep(2)
    while time.monotonic() < deadline and not killed and _epochs_done(run) < EPOCHS:  # under load, found later
        pid = cluster.kill_worker("TrainWorker")
        if pid:
            killed.append(pid)
        time.sleep(0.2)


def _epochs_done(run) -> int:
    try:
        return json.loads((run / "history.json").read_text())[-1]["epoch"]
    except (OSError, ValueError, IndexError, KeyError):  # not written yet, or being replaced
        return 0


def test_a_worker_killed_mid_epoch_restarts_from_the_last_checkpoint(runs, ray_cluster, hymenoptera,
                                                                     mobilenet_weights, tmp_path):
    """BatchNorm per worker (the default) this time: the restarted group resumes from the committed epoch with its
    RNG state, so the result is the uninterrupted run's, within 1 point."""
    run, killed = tmp_path / "run", []
    killer = threading.Thread(target=_kill_a_worker_mid_epoch, args=(ray_cluster, run, killed))
    killer.start()
    metrics = finetune(hymenoptera, run, recipe(mobilenet_weights), engine=on_ray(ray_cluster))
    killer.join()
    assert killed, "no training worker was found to kill"
    assert [h["epoch"] for h in history(run)] == list(range(EPOCHS + 1))  # each epoch once
    assert abs(metrics["accuracy"] - runs["per-worker"][1]["accuracy"]) <= 0.01


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
    cfg = replace(recipe(mobilenet_weights), sync_bn=True, epochs=EPOCHS + 1)
    finetune(hymenoptera, resumed, cfg, resume=True)  # a Ray run, continued on the local engine
    assert [h["epoch"] for h in history(resumed)] == list(range(EPOCHS + 2))


def _batch_norm_on_workers(rank: int, world: int, port: int, inputs, state, results) -> None:
    """Worker ``rank`` of ``world``: its part of ``inputs`` through a BatchNorm with ``global_batch_norm``; then
    through a plain one (statistics of its own), whose buffers ``chiefs_buffers`` makes rank 0's."""
    import os
    import types

    from featx.ray_training import global_batch_norm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    layer = torch.nn.BatchNorm2d(inputs.shape[1])
    layer.load_state_dict(state)
    layer.forward = types.MethodType(global_batch_norm, layer)
    part = inputs[rank::world].clone().requires_grad_(True)
    out = layer(part)
    out.square().sum().backward()
    own = torch.nn.BatchNorm2d(inputs.shape[1])
    own(inputs[rank::world])
    DDPWorkers(rank, world, sync_bn=False).chiefs_buffers(own)
    results[rank] = (out.detach(), part.grad, layer.weight.grad, layer.running_var.clone(), own.running_mean)
    torch.distributed.destroy_process_group()


def test_each_worker_drops_its_rows_of_what_one_process_drops_from_the_whole_batch():
    """DDPWorkers' dropout (no cluster needed: each worker's generator is seeded alike): worker r's output is rows
    r::2 of nn.Dropout's output on the whole batch, odd batches too; in eval mode, and for a part that is not the
    global batch's rows (an image failed), it is nn.Dropout."""
    for rows in (7, 32):
        whole = torch.randn(rows, 1280)
        torch.manual_seed(3)
        expected = torch.nn.functional.dropout(whole, 0.2, training=True)
        for rank in (0, 1):
            workers, layer = DDPWorkers(rank, 2, sync_bn=False), torch.nn.Sequential(torch.nn.Dropout(0.2))
            drop_as_one_process(layer, workers)
            workers.next_batch(rows)
            torch.manual_seed(3)
            assert torch.equal(layer(whole[rank::2]), expected[rank::2])
    workers.next_batch(rows + 2)
    torch.manual_seed(3)
    plain = layer(whole[1::2])
    torch.manual_seed(3)
    assert torch.equal(plain, torch.nn.functional.dropout(whole[1::2], 0.2, training=True))
    assert torch.equal(layer.eval()(whole[1::2]), whole[1::2])


def test_sync_bn_on_cpu_workers_is_batch_norm_over_the_whole_batch():
    """Two gloo workers, each with half a batch, against one BatchNorm2d over the whole batch (PyTorch's own)."""
    from conftest import free_port

    torch.manual_seed(0)
    inputs, reference = torch.randn(8, 3, 4, 4) * 3 + 1, torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2), reference.bias.uniform_(-1, 1)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    whole = inputs.clone().requires_grad_(True)
    expected = reference(whole)
    expected.square().sum().backward()
    results = torch.multiprocessing.get_context("spawn").Manager().dict()
    torch.multiprocessing.spawn(_batch_norm_on_workers, args=(2, free_port(), inputs, state, results), nprocs=2)
    chiefs = torch.nn.BatchNorm2d(3)
    chiefs(inputs[0::2])
    for rank in range(2):
        out, grad, _, running_var, running_mean = results[rank]
        torch.testing.assert_close(running_mean, chiefs.running_mean, atol=0, rtol=0)  # validation: one model
        torch.testing.assert_close(out, expected.detach()[rank::2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, whole.grad[rank::2], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(running_var, reference.running_var)
    # a parameter's gradient is each worker's share (DDP all-reduces them): together, the whole batch's
    torch.testing.assert_close(results[0][2] + results[1][2], reference.weight.grad, atol=1e-4, rtol=1e-4)
    assert np.isfinite(expected.detach().numpy()).all()


def test_engine_ray_without_ray_is_one_line_and_writes_nothing(image_folder, tmp_path):
    """As where featx[ray] is not installed: ``sys.modules["ray"] = None`` is how Python marks a module that must
    not be imported (``import ray`` raises ImportError), in a fresh interpreter running the command line."""
    run = "import sys; sys.modules['ray'] = None; from featx.cli import main; sys.argv[0] = 'featx'; main()"
    small = ["--backbone", "resnet18", "--weights", "none", "--resize", "40", "--crop", "32", "--device", "cpu"]
    for command in ("finetune", "extract"):
        out = tmp_path / command
        result = subprocess.run([sys.executable, "-c", run, command, str(image_folder), *small, "--engine", "ray",
                                 "--out", str(out)], capture_output=True, text=True, timeout=300)
        one_line_error(result.returncode, result.stderr, "needs Ray: pip install 'featx[ray]'")
        assert not out.exists()


def test_a_worker_out_of_memory_is_named_in_one_line(image_folder, tmp_path):
    """Ray's memory monitor kills the training worker (on a Ray instance of this test's own, its threshold set below
    what the machine already uses): one line saying a worker ran out of memory, after the restarts."""
    if ray_problem():
        missing(ray_problem(), "FEATX_REQUIRE_RAY")
    env = {**os.environ, "RAY_memory_usage_threshold": "0.001", "RAY_memory_monitor_refresh_ms": "50"}
    small = ["--backbone", "resnet18", "--weights", "none", "--resize", "40", "--crop", "32", "--device", "cpu",
             "--epochs", "1", "--batch_size", "4"]
    result = subprocess.run([sys.executable, "-m", "featx", "finetune", str(image_folder), *small, "--engine", "ray",
                             "--ray_workers", "1", "--out", str(tmp_path / "run")], env=env, capture_output=True,
                            text=True, timeout=600)
    one_line_error(result.returncode, result.stderr, "a worker ran out of memory", "--batch_size")


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


def test_every_recipe_family_and_source_trains_on_ray(ray_cluster, image_folder, squeezenet_weights, tmp_path):
    """One epoch on 2 workers each: LP-FT from a fitted head, reused ImageNet rows, a frozen backbone, scratch, a timm
    backbone, and a CSV manifest instead of folders; each run folder records its engine and recipe."""
    tiny = ["--backbone", "resnet18", "--weights", "none", "--resize", "40", "--crop", "32"]
    on_two = ["--epochs", "1", "--device", "cpu", "--batch_size", "4", "--workers", "1", "--engine", "ray",
              "--ray_address", ray_cluster.address]
    assert cli("extract", image_folder, *tiny, "--out", tmp_path / "f")[0] == 0
    assert cli("fit-head", tmp_path / "f" / "resnet18" / "train.h5", "--out", tmp_path / "probe")[0] == 0
    manifest = image_folder / "images.csv"  # its paths relative to its folder
    rows = [f"{path.relative_to(image_folder)},{path.parent.name},{path.parent.parent.name}"
            for path in sorted(image_folder.rglob("*.jpg"))]
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    recipes = {"lp-ft": [image_folder, *tiny, "--head_init", "probe", "--probe", tmp_path / "probe"],
               "reuse": [image_folder, "--backbone", "squeezenet1_1", "--weights", squeezenet_weights, "--resize",
                         "64", "--crop", "64", "--head_init", "reuse", "--reuse", "cats=281,dogs=207"],
               "freeze": [image_folder, *tiny, "--freeze", "backbone"],
               "scratch": [image_folder, *tiny, "--init", "scratch"],
               "timm": [image_folder, *tiny[2:], "--backbone", "timm:resnet18"],
               "manifest": [manifest, *tiny]}
    for name, recipe_flags in recipes.items():
        status, _, err = cli("finetune", *recipe_flags, *on_two, "--out", tmp_path / name)
        assert status == 0, (name, err[-2000:])
        record = json.loads((tmp_path / name / "run.json").read_text())
        assert record["engine"]["name"] == "ray" and record["engine"]["workers"] == 2, name
        assert [h["epoch"] for h in history(tmp_path / name)] == [0, 1], name
    assert json.loads((tmp_path / "lp-ft" / "run.json").read_text())["head_init"] == "probe"
    assert json.loads((tmp_path / "reuse" / "run.json").read_text())["reused_rows"] == {"cats": 281, "dogs": 207}
