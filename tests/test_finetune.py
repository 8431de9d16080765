"""Fine-tuning: parameter groups and freezing, head initialisation, schedules, resume after SIGKILL, accuracy."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from test_faults import cli

from featx import checkpoints, store
from featx.finetuning import FinetuneConfig, evaluate, finetune, imagenet_rows, lr_factor, prepare, train_one_epoch
from featx.heads import load_head
from featx.predict import accuracy, predict

SMALL = dict(backbone="resnet18", weights="none", resize=72, crop=64, batch_size=8, workers=0)


def test_param_groups_and_freezing(image_folder, tmp_path):
    cfg = FinetuneConfig(**SMALL, freeze="layer2", lr=0.05, head_lr_mult=10)
    run = prepare(image_folder, cfg)
    groups = {g["name"]: g for g in run.optimizer.param_groups}
    assert groups["head"]["lr"] == 10 * groups["backbone"]["lr"] == pytest.approx(0.5)
    assert groups["head"]["lr"] == cfg.lr * cfg.head_lr_mult
    head_ids = {id(p) for p in run.model.fc.parameters()}
    assert {id(p) for p in groups["head"]["params"]} == head_ids
    frozen = {n for n, p in run.model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in run.model.named_parameters() if n.split(".")[0] in
                      ("conv1", "bn1", "layer1", "layer2")}
    in_optimizer = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for n, p in run.model.named_parameters() if n in frozen}
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    stats_before = run.model.layer1[0].bn1.running_mean.clone()
    train_one_epoch(run.model, run.optimizer, run.scheduler, run.scaler, run.loaders.train(1), run.amp)
    after = dict(run.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before["layer3.0.conv1.weight"], after["layer3.0.conv1.weight"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert torch.equal(stats_before, run.model.layer1[0].bn1.running_mean)  # frozen BatchNorm kept eval mode
    assert not run.model.layer1[0].bn1.training and run.model.layer3[0].bn1.training


def test_freeze_backbone_trains_only_the_head(image_folder, tmp_path):
    run = prepare(image_folder, FinetuneConfig(**SMALL, freeze="backbone"))
    assert [g["name"] for g in run.optimizer.param_groups] == ["head"]
    assert run.record["trainable_parameters"] == 512 * 2 + 2


def test_bad_recipes_are_named(image_folder, tmp_path):
    with pytest.raises(ValueError, match="layer9.*layer1"):
        prepare(image_folder, FinetuneConfig(**SMALL, freeze="layer9"))
    with pytest.raises(ValueError, match="schedule"):
        FinetuneConfig(schedule="linear")
    with pytest.raises(ValueError, match="probe"):
        FinetuneConfig(head_init="probe")


def test_schedules():
    step = lr_factor(FinetuneConfig(schedule="step", epochs=25, step_size=7, gamma=0.1), steps_per_epoch=10)
    assert step(69) == 1.0 and step(70) == pytest.approx(0.1) and step(140) == pytest.approx(0.01)
    cosine = lr_factor(FinetuneConfig(schedule="cosine", epochs=10, warmup_epochs=1), steps_per_epoch=10)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == 1.0 and cosine(55) == pytest.approx(0.5)


def test_imagenet_rows_by_name_and_by_index():
    from featx.backbones import imagenet_categories

    categories = imagenet_categories()
    assert imagenet_rows(["ants", "bees"], categories, "auto") == {0: 310, 1: 309}
    assert imagenet_rows(["ants", "bees"], categories, "ants=310,bees=309") == {0: 310, 1: 309}
    with pytest.raises(ValueError, match="wasps"):
        imagenet_rows(["ants", "bees"], categories, "wasps=1")


def test_squeezenet_reused_imagenet_rows_classify_before_training(hymenoptera, squeezenet_weights, tmp_path):
    cfg = FinetuneConfig(backbone="squeezenet1_1", weights=str(squeezenet_weights), head_init="reuse",
                         reuse="ants=310,bees=309", workers=1)
    run = prepare(hymenoptera, cfg)
    assert run.record["reused_rows"] == {"ants": 310, "bees": 309}
    assert evaluate(run.model, run.loaders.val(), run.amp)["val_accuracy"] >= 0.90


@pytest.mark.slow
def test_real_finetune_reaches_095(hymenoptera, mobilenet_weights, tmp_path):
    cfg = FinetuneConfig(backbone="mobilenet_v2", weights=str(mobilenet_weights), epochs=3, lr=0.003,
                         warmup_epochs=0.5, batch_size=32, workers=2)  # the README's recipe
    metrics = finetune(hymenoptera, tmp_path, cfg)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3] and metrics["accuracy"] >= 0.95
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "confusion.png").is_file()


KILL_AT_STEP = """
import os, signal, sys
import torch
from featx.cli import main

target, steps, step = int(sys.argv[1]), [0], torch.optim.SGD.step

def counted(self, *args, **kwargs):  # SIGKILL right after optimiser step TARGET
    result = step(self, *args, **kwargs)
    steps[0] += 1
    if steps[0] == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

torch.optim.SGD.step = counted
sys.argv = ["featx", *sys.argv[2:]]
main()
"""


def _finetune_command(data, out, *extra):
    return [sys.executable, "-m", "featx", "finetune", str(data), "--out", str(out), "--backbone", "resnet18",
            "--weights", "none", "--resize", "72", "--crop", "64", "--batch_size", "4", "--epochs", "3",
            "--workers", "0", "--schedule", "step", "--step_size", "1", "--device", "cpu", *extra]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=24, size=(72, 72))
    subprocess.run(_finetune_command(data, tmp_path / "reference"), check=True, capture_output=True)
    out = tmp_path / "resumed"
    killed = subprocess.run([sys.executable, "-c", KILL_AT_STEP, "18", *_finetune_command(data, out)[3:]],
                            capture_output=True, text=True)  # 12 steps an epoch: the 6th step of epoch 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(json.loads((out / "history.json").read_text())) == 2, "not killed during epoch 2"
    subprocess.run(_finetune_command(data, out, "--resume"), check=True, capture_output=True)
    reference = json.loads((tmp_path / "reference" / "history.json").read_text())
    resumed = json.loads((out / "history.json").read_text())
    assert [h["steps"] for h in resumed] == [h["steps"] for h in reference] == [0, 12, 24, 36]
    assert [h["val_accuracy"] for h in resumed] == [h["val_accuracy"] for h in reference]
    assert [h["train_loss"] for h in resumed[1:]] == pytest.approx([h["train_loss"] for h in reference[1:]], rel=1e-5)
    final = checkpoints.load(out)[0]["model"]
    expected = checkpoints.load(tmp_path / "reference")[0]["model"]
    assert all(torch.allclose(final[k].float(), expected[k].float(), atol=1e-6) for k in expected)
    records = predict(out, [str(data / "val")], workers=0, device="cpu")  # the run folder works with predict
    assert accuracy(records)[1] == 48 and np.isfinite(records[0]["logits"]).all()


def test_resume_refuses_another_recipe_and_takes_fields_added_since(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=4)
    cfg = FinetuneConfig(backbone="resnet18", weights="none", resize=40, crop=32, batch_size=4, epochs=1, workers=0,
                         device="cpu")
    finetune(data, tmp_path / "run", cfg)
    state = torch.load(checkpoints.current(tmp_path / "run") / "state.pt", weights_only=True)
    del state["config"]["reader"]  # as a checkpoint written before `reader` existed
    torch.save(state, checkpoints.current(tmp_path / "run") / "state.pt")
    finetune(data, tmp_path / "run", cfg, resume=True)  # a missing field means its default
    assert "resuming from epoch 1 of 1" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"different recipe \(lr\)"):
        finetune(data, tmp_path / "run", replace(cfg, lr=0.1), resume=True)


def test_a_head_that_starts_good_gets_gentler_defaults():
    assert (FinetuneConfig().lr, FinetuneConfig().head_lr_mult) == (0.01, 10.0)
    reuse = FinetuneConfig(head_init="reuse")
    assert (reuse.lr, reuse.head_lr_mult) == (1e-4, 1.0)
    assert FinetuneConfig(head_init="probe", probe="h", lr=0.003).head_lr_mult == 1.0
    assert FinetuneConfig(head_init="reuse", head_lr_mult=10).lr == 1e-4


FLAGS = ["--weights", "none", "--resize", "72", "--crop", "64", "--device", "cpu", "--workers", "0"]


def test_lp_ft_starts_from_the_probe_head_and_adamw_keeps_a_constant_lr(image_folder, tmp_path):
    """``--head_init probe``: before any step (epoch 0) the run's val loss is the probe head's own cross-entropy on
    the extracted val features, computed here with numpy; AdamW and the constant schedule run as asked."""
    assert cli("extract", image_folder, "--out", tmp_path / "f", "--backbone", "resnet18", *FLAGS)[0] == 0
    train = tmp_path / "f" / "resnet18" / "train.h5"
    assert cli("fit-head", train, "--val", "none", "--out", tmp_path / "probe")[0] == 0
    val = store.load(tmp_path / "f" / "resnet18" / "val.h5")
    logits = load_head(tmp_path / "probe").decision_function(val.features).astype(np.float64)
    log_probabilities = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    expected_loss = -log_probabilities[np.arange(len(val.labels)), val.labels].mean()
    status, _, err = cli("finetune", image_folder, "--out", tmp_path / "run", "--backbone", "resnet18", *FLAGS,
                         "--head_init", "probe", "--probe", tmp_path / "probe", "--optimizer", "adamw",
                         "--schedule", "constant", "--epochs", "2", "--batch_size", "4")
    assert status == 0, err
    state, history = checkpoints.load(tmp_path / "run")
    assert history[0]["steps"] == 0 and history[0]["val_loss"] == pytest.approx(expected_loss, rel=1e-4, abs=1e-6)
    assert [h["lr"] for h in history[1:]] == [{"backbone": 1e-4, "head": 1e-4}] * 2  # probe defaults, constant
    assert all("exp_avg_sq" in moments for moments in state["optimizer"]["state"].values())  # AdamW's


def test_scratch_starts_from_random_weights_not_the_pretrained_ones(image_folder, squeezenet_weights, tmp_path):
    """``--init scratch`` with real weights named: after one step at a tiny lr the backbone is still far from
    them, where ``--init pretrained`` is still next to them."""
    real = torch.load(squeezenet_weights, weights_only=True)["features.0.weight"]
    distance = {}
    for init in ("scratch", "pretrained"):
        status, _, err = cli("finetune", image_folder, "--out", tmp_path / init, "--backbone", "squeezenet1_1",
                             *FLAGS[2:], "--weights", squeezenet_weights, "--init", init, "--lr", "1e-7",
                             "--epochs", "1", "--batch_size", "24", "--schedule", "constant")
        assert status == 0, err
        trained = checkpoints.load(tmp_path / init)[0]["model"]
        weight = next(v for k, v in trained.items() if k.endswith("features.0.weight"))
        distance[init] = float((weight - real).abs().max())
    assert distance["pretrained"] < 1e-3 < 0.05 < distance["scratch"], distance
