"""`featx compare` on the real ants/bees photos with real MobileNetV2 and SqueezeNet 1.1 weights: the leaderboard
agrees with the single commands, its intervals behave, label efficiency rises with shots, a rerun reuses the
features, a killed run resumes to the same files, planted near copies are found, bad input is one line, and the
report opens in a real headless Chromium with no error and no network request."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from browser import chromium, open_page
from conftest import make_image_folder, missing, sigkill_when
from PIL import Image
from test_faults import cli, one_line_error

from featx.compare import interval, resampled, without_timing

OUTPUTS = ("leaderboard.csv", "leaderboard.json", "leaderboard.md", "label_efficiency.csv", "curves.png",
           "confusion-mobilenet_v2-logreg.png", "mistakes-mobilenet_v2-logreg.png", "report.html")


def backbones(mobilenet_weights, squeezenet_weights) -> str:
    return f"mobilenet_v2={mobilenet_weights},squeezenet1_1={squeezenet_weights}"


def run_compare(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featx", "compare", *map(str, argv)], capture_output=True, text=True,
                          timeout=900, cwd=cwd)


@pytest.fixture(scope="module")
def compared(hymenoptera, mobilenet_weights, squeezenet_weights, tmp_path_factory) -> Path:
    """2 backbones x 3 heads x 6 shot levels x 5 draws, as the issue's benchmark runs it."""
    out = tmp_path_factory.mktemp("compare") / "out"
    result = run_compare(hymenoptera, "--backbones", backbones(mobilenet_weights, squeezenet_weights), "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def board(out: Path) -> dict:
    return json.loads((out / "leaderboard.json").read_text())


def test_the_leaderboard_agrees_with_fit_head_and_evaluate(compared, tmp_path):
    rows = board(compared)["leaderboard"]
    assert [(r["backbone"], r["model"]) for r in rows if r["leader"]] == [("mobilenet_v2", "logreg")]
    assert len(rows) == 6 and [r["accuracy"] for r in rows] == sorted((r["accuracy"] for r in rows), reverse=True)
    features = compared / "features" / "mobilenet_v2" / "mobilenet_v2"
    assert cli("fit-head", features / "train.h5", "--val", "none", "--out", tmp_path / "head")[0] == 0
    assert cli("evaluate", tmp_path / "head", features / "val.h5", "--out", tmp_path / "eval")[0] == 0
    single = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    logreg = next(r for r in rows if r["backbone"] == "mobilenet_v2" and r["model"] == "logreg")
    assert logreg["accuracy"] == single["accuracy"] == pytest.approx(0.9608, abs=1e-4)
    assert logreg["balanced_accuracy"] == pytest.approx(single["balanced_accuracy"], abs=1e-12)
    assert logreg["macro_f1"] == pytest.approx(np.mean([c["f1"] for c in single["per_class"].values()]), abs=1e-12)
    for row in rows:  # each interval holds its estimate; every head scored on images it never saw
        assert row["accuracy_ci"][0] <= row["accuracy"] <= row["accuracy_ci"][1]
        assert row["balanced_accuracy_ci"][0] <= row["balanced_accuracy"] <= row["balanced_accuracy_ci"][1]
        assert row["held_out"] and row["accuracy_without_near_duplicates"] == row["accuracy"]  # none here
        assert row["feature_dim"] in (1280, 512) and row["images_per_second"] > 0 and row["features_mb"] > 0
    with open(compared / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert [(t["backbone"], t["model"], float(t["accuracy"])) for t in table] == \
        [(r["backbone"], r["model"], round(r["accuracy"], 4)) for r in rows]
    correct = np.array([row["correct"] == "1" for row in csv.DictReader(open(tmp_path / "eval" / "predictions.csv"))])
    widths = []  # the interval narrows as the images grow
    for size in (38, 76, 153):
        sample = np.random.default_rng(1).permutation(len(correct))[:size]
        indices = np.random.default_rng(0).integers(0, size, (2000, size))
        low, high = interval(resampled(np.ones(size, int), correct[sample].astype(int), indices)["accuracy"])
        assert low <= correct[sample].mean() <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]


def test_label_efficiency_rises_with_shots(compared):
    with open(compared / "label_efficiency.csv") as f:
        levels = list(csv.DictReader(f))
    assert len(levels) == 2 * 3 * 6 and {int(level["draws"]) for level in levels if level["shots"] != "all"} == {5}
    curves: dict[tuple, list[float]] = {}
    for level in levels:
        curves.setdefault((level["backbone"], level["model"]), []).append(float(level["mean_accuracy"]))
    steps = [later - earlier for curve in curves.values() for earlier, later in zip(curve, curve[1:])]
    assert np.mean(steps) > 0.02 and all(curve[-1] > curve[0] + 0.2 for curve in curves.values())
    text = (compared / "leaderboard.md").read_text()
    assert text.count("Label efficiency, ") == 6 and ("stop helping" in text or "still rising" in text)


def test_outputs_and_a_rerun_that_reuses_the_features(compared, hymenoptera, mobilenet_weights, squeezenet_weights):
    for name in OUTPUTS:
        assert (compared / name).stat().st_size > 500, name
    assert Image.open(compared / "curves.png").size[0] >= 800
    before = board(compared)
    efficiency = (compared / "label_efficiency.csv").read_bytes()
    result = run_compare(hymenoptera, "--backbones", backbones(mobilenet_weights, squeezenet_weights), "--out",
                         compared)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("is up to date") == 4 and "img/s)" not in result.stdout  # nothing extracted
    assert without_timing(board(compared)) == without_timing(before)
    assert (compared / "label_efficiency.csv").read_bytes() == efficiency
    assert [r["images_per_second"] for r in board(compared)["leaderboard"]] == \
        [r["images_per_second"] for r in before["leaderboard"]]  # as measured when extracted


def test_killed_mid_run_and_rerun_gives_the_clean_run_files(compared, hymenoptera, mobilenet_weights,
                                                           squeezenet_weights, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "featx", "compare", str(hymenoptera), "--backbones",
            backbones(mobilenet_weights, squeezenet_weights), "--out", str(out)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "features" / "squeezenet1_1" / "squeezenet1_1" / "train.h5.parts"
    sigkill_when(process, lambda: parts.is_dir())  # during the second backbone's extraction
    assert not (out / "leaderboard.json").exists()
    result = run_compare(hymenoptera, "--backbones", backbones(mobilenet_weights, squeezenet_weights), "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mobilenet_v2/train.h5 is up to date" in result.stdout
    assert without_timing(board(out)) == without_timing(board(compared))
    assert (out / "label_efficiency.csv").read_bytes() == (compared / "label_efficiency.csv").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in compared.iterdir())


def near_copies(hymenoptera: Path, root: Path) -> tuple[Path, list[str]]:
    """15 ants and 15 bees of train, 10 of each of val, and three training photos put into val re-encoded,
    cropped and shrunk: the near copies the content hash cannot see."""
    for split, count in (("train", 15), ("val", 10)):
        for name in ("ants", "bees"):
            (root / split / name).mkdir(parents=True)
            for photo in sorted((hymenoptera / split / name).iterdir())[:count]:
                shutil.copy(photo, root / split / name / photo.name)
    planted = []
    for number, (name, change) in enumerate((("ants", lambda im: im), ("bees", lambda im: im.crop(
            (im.width // 20, im.height // 20, im.width * 19 // 20, im.height * 19 // 20))),
            ("bees", lambda im: im.resize((im.width * 3 // 5, im.height * 3 // 5))))):
        original = Image.open(sorted((root / "train" / name).iterdir())[number]).convert("RGB")
        change(original).save(root / "val" / name / f"near-{number}.jpg", quality=60)
        planted.append(f"val/{name}/near-{number}.jpg")
    return root, planted


def test_planted_near_copies_are_found_and_left_out_of_the_second_score(hymenoptera, mobilenet_weights, tmp_path):
    data, planted = near_copies(hymenoptera, tmp_path / "data")
    out = tmp_path / "out"
    status, _, err = cli("compare", data, "--backbones", f"mobilenet_v2={mobilenet_weights}", "--heads", "logreg",
                         "--shots", "2,all", "--repeats", "2", "--out", out)
    assert status == 0, err
    found = board(out)
    assert sorted(n["held_path"] for n in found["near_duplicates"]) == sorted(planted)
    assert all(n["cosine"] >= found["calibration"]["mobilenet_v2"]["threshold"] > 0.8 for n in found["near_duplicates"])
    features = out / "features" / "mobilenet_v2" / "mobilenet_v2"
    head = out / "heads" / "mobilenet_v2" / "logreg"
    assert cli("evaluate", head, features / "val.h5", "--out", tmp_path / "e")[0] == 0
    rows = list(csv.DictReader(open(tmp_path / "e" / "predictions.csv")))
    kept = [row["correct"] == "1" for row in rows if row["path"] not in planted]
    assert len(kept) == 20
    assert found["leaderboard"][0]["accuracy_without_near_duplicates"] == pytest.approx(np.mean(kept))
    page = (out / "report.html").read_text()
    assert all(path in page for path in planted) and page.count("alt='held-out'") == 3


def test_two_families_and_the_zeroshot_head(hymenoptera, mobilenet_weights, tmp_path):
    """A torchvision and an OpenCLIP backbone side by side: the zeroshot head has a row where there is a text tower
    (and is said to have none beside MobileNetV2), and no label-efficiency curve (it uses no labels)."""
    data = tmp_path / "data"
    for split, count in (("train", 6), ("val", 4)):
        for name in ("ants", "bees"):
            (data / split / name).mkdir(parents=True)
            for photo in sorted((hymenoptera / split / name).iterdir())[:count]:
                shutil.copy(photo, data / split / name / photo.name)
    status, _, err = cli("compare", data, "--backbones", f"mobilenet_v2={mobilenet_weights},open_clip:ViT-S-32=none",
                         "--heads", "logreg,zeroshot", "--shots", "1,all", "--repeats", "2", "--out", tmp_path / "out")
    assert status == 0, err
    assert "no zeroshot row for mobilenet_v2: it has no text tower" in err
    found = board(tmp_path / "out")
    assert sorted((r["backbone"], r["model"]) for r in found["leaderboard"]) == \
        [("mobilenet_v2", "logreg"), ("open_clip:ViT-S-32", "logreg"), ("open_clip:ViT-S-32", "zeroshot")]
    assert {(r["backbone"], r["model"]) for r in found["label_efficiency"]} == \
        {("mobilenet_v2", "logreg"), ("open_clip:ViT-S-32", "logreg")}


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, mirror):
    data = make_image_folder(tmp_path / "data", per_class=20, size=(16, 16))
    only_train = make_image_folder(tmp_path / "only-train", splits=("train",), per_class=3)
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(next((data / "train" / "cats").iterdir()), loose / "a.jpg")
    out = tmp_path / "out"
    cases = [(["--backbones", "nosuchnet"], "nosuchnet"),
             (["--backbones", "squeezenet1_1=nosuch.pth"], "nosuch.pth"),
             (["--backbones", "resnet18=none", "--shots", "1,25"], "--shots 25 is more than the smallest class (cats"),
             (["--backbones", "resnet18=none", "--heads", "logreg,forest"], "forest"),
             (["--backbones", "resnet18=none", "--repeats", "0"], "--repeats"),
             (["--backbones", "resnet18=none", "--finetune", "lp-ft", "--heads", "knn"], "add logreg to --heads"),
             (["--backbones", "resnet18=none", "--epoch", "1"], "--epoch"),
             (["--backbones", ""], "--backbones names no backbone")]
    for flags, fragment in cases:
        one_line_error(*cli("compare", data, *flags, "--out", out)[::2], fragment)
    one_line_error(*cli("compare", only_train, "--backbones", "resnet18=none", "--out", out)[::2],
                   "needs a train split and a held-out test or val split")
    one_line_error(*cli("compare", loose, "--backbones", "resnet18=none", "--out", out)[::2], "unlabelled")
    assert not out.exists()


def test_finetune_rows_say_their_val_chose_the_epoch(image_folder, tmp_path):
    """A fine-tuning recipe is a row, scored by `featx predict` on its run: the run's own val accuracy, flagged as
    not held out (val picked its best epoch)."""
    out = tmp_path / "out"
    status, _, err = cli("compare", image_folder, "--backbones", "resnet18=none", "--heads", "logreg", "--shots",
                         "1,all", "--repeats", "2", "--finetune", "finetune,lp-ft", "--epochs", "1", "--resize",
                         "40", "--crop", "32", "--batch_size", "4", "--device", "cpu", "--out", out)
    assert status == 0, err
    rows = {row["model"]: row for row in board(out)["leaderboard"]}
    assert set(rows) == {"logreg", "finetune:finetune", "finetune:lp-ft"}
    assert rows["logreg"]["leader"]  # whatever the fine-tuned rows score: their val chose their epoch
    for recipe in ("finetune", "lp-ft"):
        run = json.loads((out / "finetune" / "resnet18" / recipe / "metrics.json").read_text())
        assert rows[f"finetune:{recipe}"]["accuracy"] == pytest.approx(run["accuracy"])
        assert not rows[f"finetune:{recipe}"]["held_out"] and "NOT held out" in (out / "leaderboard.md").read_text()
    assert rows["logreg"]["held_out"] and rows["logreg"]["feature_dim"] == 512


def test_the_report_opens_in_a_real_browser_with_no_error_and_no_request(compared):
    if chromium() is None:
        missing("needs Debian's chromium package (apt-get install chromium)", "FEATX_REQUIRE_BROWSER")
    broken = compared.parent / "broken.html"  # the check itself can fail: a script error and a fetch are seen
    broken.write_text("<html><body><img src='http://127.0.0.1:9/x.png'><script>undefinedFunction()</script>")
    seen = open_page(broken.as_uri())
    assert len(seen["errors"]) >= 2 and "http://127.0.0.1:9/x.png" in seen["requests"]
    seen = open_page((compared / "report.html").as_uri(), width=1400, height=2000)
    assert seen["errors"] == []
    assert {url.split(":")[0] for url in seen["requests"]} <= {"file", "data"}
    page = seen["page"]
    assert page["tables"] >= 2 and page["rows"][0] == 7 and page["images"] == page["drawn"] == 3
    assert page["alts"][0] == "curves.png"
    shot = np.asarray(Image.open(io.BytesIO(seen["screenshot"])).convert("L"))
    assert shot.shape == (2000, 1400) and shot.std() > 20 and (shot < 128).mean() > 0.02  # drawn, not blank

