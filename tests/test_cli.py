"""The command line a newcomer meets: flags refused before any work, help pages, the offline demo, reports."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from test_faults import SMALL, cli, one_line_error

from featx.cli import COMMANDS
from featx.fit import evaluate, fit_head
from featx.flags import normalise

ARGUMENTS = {"extract": ["data"], "fit-head": ["train.h5"], "evaluate": ["head", "val.h5"],
             "predict": ["head", "photos"], "export": ["head", "exported"], "finetune": ["data"],
             "export-features": ["val.h5", "out.parquet"], "info": ["val.h5"], "backbones": [], "compare": ["data"]}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_misspelled_flag_before_any_work(command, tmp_path, monkeypatch):
    assert set(ARGUMENTS) == set(COMMANDS)
    monkeypatch.chdir(tmp_path)
    status, out, err = cli(command, *ARGUMENTS[command], "--batchsize", "8", "--out_dir", "x")
    one_line_error(status, err, "--batchsize")
    assert out == "" and list(tmp_path.iterdir()) == []


def test_suggestions_and_spellings():
    assert "did you mean --topk?" in cli("predict", "h", "x", "--top_k", "1")[2]
    assert "did you mean --out?" in cli("evaluate", "h", "f.h5", "--output", "X")[2]
    assert "short flags" in cli("export", "h", "o", "-o", "x")[2]
    assert normalise(["--batch-size=3", "--shard-size", "4", "--", "--keep-me"]) == \
        ["--batch_size=3", "--shard_size", "4", "--", "--keep-me"]


def test_help_pages_show_every_flag_with_its_default():
    status, page, _ = cli("fit-head", "-h")
    assert status == 0 and page.startswith("usage: featx fit-head TRAIN") and "--head" in page
    finetune = cli("finetune", "--help")[1]
    for flag in ("--seed", "--val_fraction", "--head_lr_mult", "--overwrite", "--schedule"):
        assert flag in finetune
    assert "(default: cosine)" in finetune and "Optional[" not in finetune and "Type:" not in finetune
    overview = cli("--help")[1]
    assert all(f"  {name}" in overview for name in COMMANDS)
    entries = " ".join(overview.split("commands:")[1].split())  # each command's sentence, ends whole
    for name, following in zip(COMMANDS, [*list(COMMANDS)[1:], None]):
        entry = entries.split(f"{name} ", 1)[1].split(f" {following} ")[0] if following else \
            entries.split(f"{name} ", 1)[1]
        assert entry.endswith("."), (name, entry)
    assert cli("--version")[1].startswith("featx 0.")
    from featx.cli import extra_flags
    from featx.flags import signature_flags

    for command, function in COMMANDS.items():  # every flag is listed, with a description
        page = cli(command, "--help")[1].splitlines()
        for flag in {**signature_flags(function)[1], **extra_flags(command)}:
            line = next(line for line in page if line.startswith(f"  --{flag} "))
            assert len(line.split()) > 1, line


def test_the_offline_demo_says_what_is_missing_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FEATX_MIRROR"}
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "hymenoptera.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    one_line_error(result.returncode, result.stderr, "hymenoptera_data", "mobilenet_v2-imagenet-features.pth",
                   "FEATX_MIRROR")
    assert list(tmp_path.iterdir()) == []  # no empty data/ folder left behind


def test_jobs_take_both_spellings_and_the_mirror(mirror, tmp_path):
    for spelling in ("--data-root", "--data_root"):  # parsed (the bad value is what fails), never "unrecognized"
        result = subprocess.run([sys.executable, str(REPO / "jobs" / "compare.py"), spelling, "d", "--mirror",
                                 str(mirror), "--epochs", "x"], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 2 and "argument --epochs: invalid int value" in result.stderr
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "compare.py"), "--epoch", "1"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unrecognized arguments: --epoch" in result.stderr


@pytest.mark.slow
def test_the_compare_job_runs_end_to_end(image_folder, tmp_path):
    """jobs/compare.py on a tiny folder, one epoch: the logreg head and every fine-tuning recipe have a row; the
    head's is its own `featx evaluate`."""
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "compare.py"), "--data", str(image_folder),
                             "--backbone", "resnet18", "--weights", "none", "--epochs", "1", "--out",
                             str(tmp_path / "compare")], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    board = json.loads((tmp_path / "compare" / "leaderboard.json").read_text())
    rows = {row["model"]: row for row in board["leaderboard"]}
    assert set(rows) == {"logreg", "finetune:finetune", "finetune:lp-ft", "finetune:frozen", "finetune:scratch"}
    assert all(0 <= r["accuracy"] <= 1 for r in rows.values())
    head = tmp_path / "compare" / "heads" / "resnet18" / "logreg"
    evaluate(head, tmp_path / "compare" / "features" / "resnet18" / "resnet18" / "val.h5", tmp_path / "eval")
    assert rows["logreg"]["accuracy"] == json.loads((tmp_path / "eval" / "metrics.json").read_text())["accuracy"]
    assert (tmp_path / "compare" / "report.html").stat().st_size > 1000


def test_evaluate_writes_per_image_predictions_and_refit_drops_stale_reports(image_folder, tmp_path):
    cli("extract", image_folder, "--out", tmp_path / "f", *SMALL)
    features = tmp_path / "f" / "resnet18"
    fit_head(features / "train.h5", "none", "knn", tmp_path / "head")
    metrics = evaluate(tmp_path / "head", features / "val.h5")
    report = tmp_path / "head" / "eval-val"
    rows = list(csv.DictReader(open(report / "predictions.csv")))
    assert len(rows) == 12 and set(rows[0]) == {"path", "true", "predicted", "probability", "correct"}
    wrong = [r for r in rows if r["correct"] == "0"]
    assert rows[:len(wrong)] == wrong  # mistakes first
    assert json.loads((report / "metrics.json").read_text())["most_confused"] == metrics["most_confused"]
    fit_head(features / "train.h5", "none", "logreg", tmp_path / "head")
    assert not report.exists()


def test_progress_bars_count_each_split_finetune_epochs_and_predict(image_folder, tmp_path):
    def run(*argv):
        result = subprocess.run([sys.executable, "-m", "featx", *map(str, argv)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stderr.replace("\r", "\n")

    bars = run("extract", image_folder, "--out", tmp_path / "f", *SMALL)
    assert "resnet18 train: 100%" in bars and "12/12" in bars and "resnet18 val:" in bars
    assert " 0img [" not in bars and "/24 [" not in bars, bars  # a bar per split (no empty job bar), from 0 to its size
    flags = ["--backbone", "resnet18", "--weights", "none", "--resize", "40", "--crop", "32", "--workers", "0"]
    bars = run("finetune", image_folder, "--out", tmp_path / "run", *flags, "--epochs", "1", "--batch_size", "4")
    assert "epoch 1:   0%|          | 0/3 [" in bars, bars  # 12 images, batch 4: a total, so an ETA
    assert cli("fit-head", tmp_path / "f" / "resnet18" / "train.h5", "--head", "knn", "--out", tmp_path / "h")[0] == 0
    bars = run("predict", tmp_path / "h", image_folder / "val", "--device", "cpu", "--out", tmp_path / "p.csv")
    assert "predict: 100%" in bars and "12/12" in bars, bars
