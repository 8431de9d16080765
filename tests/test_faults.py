"""Faults and bad input: no silent corruption, no code run from files, atomic checkpoints, one line per failure."""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, make_image_folder, require_root

from featx import checkpoints, store
from featx.backbones import BackboneSpec
from featx.cli import guarded, run
from featx.extract import extract
from featx.finetuning import FinetuneConfig, finetune, prepare
from featx.fit import fit_head
from featx.heads import LogRegHead, load_head
from featx.options import ExtractOptions

SMALL = ["--backbone", "resnet18", "--weights", "none", "--resize", "40", "--crop", "32", "--device", "cpu",
         "--workers", "1"]


def cli(*argv) -> tuple[int, str, str]:
    """Run the featx command line in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            guarded(run, [str(a) for a in argv])
        except SystemExit as exit_:
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


def fit_predict_export_finetune(folder: Path, train: Path, out: Path, flags: list, freeze: str) -> None:
    """The stages after extract, on ``train`` (features of ``folder``): fit-head, predict, export, and a one-epoch
    finetune with the same backbone ``flags``, freezing ``freeze``, then predict with it."""
    assert cli("fit-head", train, "--out", out / "head", "--val", "none")[0] == 0
    status, _, err = cli("predict", out / "head", folder / "val", "--device", "cpu")
    assert status == 0 and "accuracy" in err
    assert cli("export", out / "head", out / "exported", "--noonnx")[0] == 0
    status, _, err = cli("finetune", folder, "--out", out / "run", *flags, "--epochs", "1", "--batch_size", "4",
                         "--freeze", freeze)
    assert status == 0, err
    assert cli("predict", out / "run", folder / "val", "--device", "cpu")[0] == 0


def one_line_error(status: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("featx: error:")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """Random-weight ResNet-18 features of a small two-class folder (train + val)."""
    root = tmp_path_factory.mktemp("faults")
    data = make_image_folder(root / "data", per_class=8)
    assert cli("extract", data, "--out", root / "features", *SMALL)[0] == 0
    return root / "features" / "resnet18"


# --- 1. symlink loops -------------------------------------------------------------------------------------
def test_a_symlink_loop_is_reported_and_never_duplicates_or_mislabels(tmp_path):
    data = make_image_folder(tmp_path / "X", splits=("train",), classes=("ants", "bees"), per_class=6)
    (data / "train" / "bees" / "loopdir").symlink_to("..")
    (data / "train" / "ants" / "again").symlink_to(data / "train" / "ants")
    status, _, err = cli("extract", data, "--out", tmp_path / "features", *SMALL)
    assert status == 0 and "loopdir" in err and "again" in err
    loaded = store.load(tmp_path / "features" / "resnet18" / "train.h5")
    assert len(loaded.paths) == 12 and len(set(loaded.paths)) == 12
    assert all(path.split("/")[1] == loaded.class_names[label] for path, label in zip(loaded.paths, loaded.labels))
    from featx.predict import collect_images

    assert len(collect_images([data / "train"])[0]) == 12


# --- 2. finetune checkpoints: a kill anywhere in the save -------------------------------------------------
KILLER = """
import os, shutil, signal, sys
from pathlib import Path
import torch
import featx.checkpoints as checkpoints
from featx.cli import main

epoch, target = int(sys.argv[1]), int(sys.argv[2])
state = {"ops": 0, "active": False}

def counted(function):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        if state["active"]:
            state["ops"] += 1
            if state["ops"] == target:
                os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapper

for owner, name in ((os, "replace"), (os, "link"), (torch, "save"), (shutil, "rmtree")):
    setattr(owner, name, counted(getattr(owner, name)))
Path.write_text = counted(Path.write_text)
commit = checkpoints.commit

def watched(run, at, *args):
    state["active"] = at == epoch
    try:
        return commit(run, at, *args)
    finally:
        state["active"] = False

checkpoints.commit = watched
sys.argv = ["featx", *sys.argv[3:]]
main()
print("OPS", state["ops"])
"""


def _finetune_args(data, out):
    return ["finetune", str(data), "--out", str(out), "--backbone", "squeezenet1_1", "--weights", "none",
            "--resize", "40", "--crop", "32", "--batch_size", "4", "--epochs", "2", "--workers", "0",
            "--device", "cpu", "--lr", "0.01"]


@pytest.mark.slow
def test_a_kill_in_any_window_of_the_checkpoint_save_resumes_to_the_uninterrupted_run(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4, size=(40, 40))
    cfg = FinetuneConfig(backbone="squeezenet1_1", weights="none", resize=40, crop=32, batch_size=4, epochs=2,
                         workers=0, device="cpu", lr=0.01)
    finetune(data, tmp_path / "reference", cfg)
    reference_state, reference_history = checkpoints.load(tmp_path / "reference")
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    counted = subprocess.run([sys.executable, str(script), "1", "0", *_finetune_args(data, tmp_path / "count")],
                             capture_output=True, text=True, check=True)
    operations = int(counted.stdout.split("OPS")[-1])
    assert operations >= 8  # state, best, history, folder rename, pointer (write, replace), cleanup, history copy
    windows = [(0, 3), *((1, k) for k in range(1, operations + 1))]  # epoch 0's save too: nothing committed yet
    killers = {}
    for epoch, target in windows:  # two at a time: one per core
        out = tmp_path / f"killed-{epoch}-{target}"
        killers[out] = subprocess.Popen([sys.executable, str(script), str(epoch), str(target),
                                         *_finetune_args(data, out)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        if len(killers) % 2 == 0 or (epoch, target) == windows[-1]:
            for process in list(killers.values())[-2:]:
                process.wait()
    for out, killed in killers.items():
        assert killed.returncode == -signal.SIGKILL, (out.name, killed.stderr.read()[-500:])
        (out / "history.json").write_text('[{"epoch": 0, "ste')  # a truncated copy is never read back
        finetune(data, out, cfg, resume=True)
        state, history = checkpoints.load(out)
        strip = [{k: v for k, v in h.items() if "per_second" not in k and "seconds" not in k} for h in history]
        expected = [{k: v for k, v in h.items() if "per_second" not in k and "seconds" not in k}
                    for h in reference_history]
        assert strip == expected, out.name
        assert all(torch.equal(state["model"][k], reference_state["model"][k]) for k in state["model"]), out.name
        assert torch.equal(checkpoints.best_weights(out)["features.0.weight"],
                           checkpoints.best_weights(tmp_path / "reference")["features.0.weight"])
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0002"]


def test_finetune_refuses_an_existing_run_and_resume_extends_it(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", splits=("train",), per_class=5, size=(40, 40))
    cfg = FinetuneConfig(backbone="squeezenet1_1", weights="none", resize=40, crop=32, batch_size=4, epochs=1,
                         workers=0, device="cpu")
    loaders = prepare(data, cfg).loaders
    assert len(loaders.val_split) == 2 and len(loaders.train_split) == 8  # --val_fraction 0.2: one of five per class
    finetune(data, tmp_path / "run", cfg)
    with pytest.raises(ValueError, match="already holds a finetune run"):
        finetune(data, tmp_path / "run", cfg)
    finetune(data, tmp_path / "run", FinetuneConfig(**{**cfg.__dict__, "epochs": 2}), resume=True)
    assert "resuming from epoch 1 of 2" in capsys.readouterr().out
    assert [h["epoch"] for h in checkpoints.load(tmp_path / "run")[1]] == [0, 1, 2]
    finetune(data, tmp_path / "run", cfg, overwrite=True)
    assert [h["epoch"] for h in checkpoints.load(tmp_path / "run")[1]] == [0, 1]


# --- 3. non-finite features ------------------------------------------------------------------------------
@pytest.fixture
def poisoned(features, tmp_path) -> Path:
    path = tmp_path / "train.h5"
    shutil.copy(features / "train.h5", path)
    with h5py.File(path, "r+") as f:
        f["features"][2, 5] = np.nan
        f["features"][7, 0] = np.inf
        f["features"][11, 3] = -np.inf
    return path


@pytest.mark.parametrize("head, params", [("linear", {}), ("linear", {"block_rows": 4}), ("knn", {}),
                                          ("logreg", {})])
def test_every_head_refuses_non_finite_features_naming_file_and_rows(features, poisoned, tmp_path, head, params):
    with pytest.raises(store.NonFiniteError, match=rf"{poisoned}: 3 of 16 rows"):
        fit_head(poisoned, "none", head, tmp_path / "head", **params)
    with pytest.raises(store.NonFiniteError, match=rf"{poisoned}: 3 of 16 rows"):  # as the validation file
        fit_head(features / "train.h5", poisoned, head, tmp_path / "head", **params)
    assert not (tmp_path / "head").exists()


def test_evaluate_refuses_non_finite_features(features, poisoned, tmp_path):
    fit_head(features / "train.h5", "none", "knn", tmp_path / "knn")
    status, _, err = cli("evaluate", tmp_path / "knn", poisoned)
    one_line_error(status, err, str(poisoned), "3 of 16 rows")


# --- 4. predict keeps every good image --------------------------------------------------------------------
def test_predict_with_a_batch_of_only_bad_images_writes_every_good_prediction(features, tmp_path):
    from featx.predict import predict

    folder = make_image_folder(tmp_path / "photos", splits=("x",), per_class=2)
    (folder / "x" / "cats" / "bad.jpg").write_bytes(b"not an image")
    for head in ("logreg", "linear"):
        fit_head(features / "train.h5", "none", head, tmp_path / head)
        records = predict(tmp_path / head, [str(folder)], batch_size=1, workers=1, device="cpu")
        assert len(records) == 5 and sum("predicted" in r for r in records) == 4
        assert [r["path"] for r in records if "error" in r] == [str(folder / "x" / "cats" / "bad.jpg")]
    status, out, err = cli("predict", tmp_path / "logreg", folder, "--batch_size", "1", "--out", tmp_path / "p.csv")
    assert status == 0 and len((tmp_path / "p.csv").read_text().splitlines()) == 6 and "bad.jpg" in err


# --- 5. disk full ----------------------------------------------------------------------------------------
@pytest.fixture
def small_device(tmp_path):
    require_root("mounting a small tmpfs")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_device_is_one_line_and_a_rerun_resumes(small_device, tmp_path):
    data = make_image_folder(tmp_path / "data", splits=("train",), per_class=40, size=(64, 64))
    filler = small_device / "filler"
    filler.write_bytes(b"\0" * (2_600_000))
    command = [sys.executable, "-m", "featx", "extract", str(data), "--out", str(small_device / "f"), *SMALL,
               "--shard_size", "16"]
    full = subprocess.run(command, capture_output=True, text=True)
    assert full.returncode == 2, full.stderr[-2000:]
    one_line_error(full.returncode, full.stderr, f"no space left on {small_device} while writing",
                   "free space and rerun to resume")
    assert not list(small_device.rglob("*.tmp"))
    filler.unlink()
    resumed = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "resuming" in resumed.stdout
    assert len(store.load(small_device / "f" / "resnet18" / "train.h5").paths) == 80


# --- 6. no pickle: the logreg head -------------------------------------------------------------------------
class Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_logreg_head_is_saved_without_pickle_and_old_pickles_need_trust(features, tmp_path):
    from sklearn.base import clone
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    fitted = fit_head(features / "train.h5", "none", "logreg", tmp_path / "logreg")
    assert sorted(p.name for p in (tmp_path / "logreg").iterdir()) == ["head.json", "model.npz", "seen_images.npy"]
    X = store.load(features / "val.h5").features
    loaded = load_head(tmp_path / "logreg")
    assert np.array_equal(loaded.decision_function(X), fitted.decision_function(X))
    assert np.array_equal(loaded.predict_proba(X), fitted.predict_proba(X))
    clone(LogRegHead(Cs=[0.1, 1.0]))
    labels = store.load(features / "val.h5").labels
    pipeline = Pipeline([("scale", StandardScaler()), ("head", LogRegHead(Cs=[1.0], refit=False))]).fit(X, labels)
    scaled = StandardScaler().fit_transform(X)  # the same steps by hand
    by_hand = LogRegHead(Cs=[1.0], refit=False).fit(scaled, labels)
    assert np.allclose(pipeline.decision_function(X), by_hand.decision_function(scaled), atol=1e-6)
    # an old head folder whose model.joblib is a malicious pickle
    (tmp_path / "logreg" / "model.npz").unlink()
    marker = tmp_path / "PWNED"
    with open(tmp_path / "logreg" / "model.joblib", "wb") as f:
        pickle.dump(Planted(marker), f)
    for command in (["evaluate", tmp_path / "logreg", features / "val.h5"],
                    ["predict", tmp_path / "logreg", tmp_path, "--device", "cpu"],
                    ["export", tmp_path / "logreg", tmp_path / "exported", "--noonnx"]):
        status, _, err = cli(*command)
        one_line_error(status, err, "model.joblib", "--trust_pickle")
        assert not marker.exists()
    with pytest.raises(ValueError, match="not a scikit-learn pipeline"):  # vouched for: it is unpickled, and runs
        load_head(tmp_path / "logreg", trust_pickle=True)
    assert marker.exists()


def test_featx_never_unpickles_outside_the_trust_flag():
    found = subprocess.run(["grep", "-rn", r"joblib.load\|pickle.load\|weights_only=False", str(REPO / "featx")],
                           capture_output=True, text=True).stdout.splitlines()
    assert len(found) == 1 and "= joblib.load(path)" in found[0] and "logreg.py" in found[0], found


def test_unsafe_tensor_files_are_refused_in_one_line(features, tmp_path):
    fit_head(features / "train.h5", "none", "knn", tmp_path / "knn")
    with open(tmp_path / "knn" / "model.pt", "wb") as f:
        pickle.dump(Planted(tmp_path / "PWNED"), f)
    status, _, err = cli("evaluate", tmp_path / "knn", features / "val.h5")
    one_line_error(status, err, "refusing head state", "model.pt")
    assert not (tmp_path / "PWNED").exists()


# --- 7. the compiled-model cache ---------------------------------------------------------------------------
def test_a_planted_or_shared_compiled_package_is_refused(tmp_path, monkeypatch):
    from featx.cache import UntrustedCacheError, model_key
    from featx.compiled import compiled_model

    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "cache"))
    model, example = torch.nn.Linear(4, 2).eval(), torch.randn(3, 4)
    folder = tmp_path / "cache" / "compiled"
    folder.mkdir(parents=True, mode=0o700)
    planted = folder / f"model-{model_key(model, example)[:24]}.pt2"
    planted.write_bytes(b"a shared library someone else built")
    (folder / (planted.name + ".sha256")).write_text("0" * 64)
    with pytest.raises(UntrustedCacheError, match="sha256 is not the one featx recorded"):
        compiled_model(model, example)
    folder.chmod(0o777)
    with pytest.raises(UntrustedCacheError, match="group or others can write it"):
        compiled_model(model, example)
    folder.chmod(0o700)
    planted.chmod(0o666)
    with pytest.raises(UntrustedCacheError, match="group or others can write it"):
        compiled_model(model, example)


# --- 8. one line for every failure ---------------------------------------------------------------------------
def test_output_problems_are_one_line(image_folder, tmp_path):
    (tmp_path / "file").write_text("")
    one_line_error(*cli("extract", image_folder, "--out", tmp_path / "file", *SMALL)[::2], "not a folder")
    if os.geteuid() == 0:  # root writes through permissions: a read-only mount instead
        readonly = tmp_path / "ro"
        readonly.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], check=True)
        try:
            one_line_error(*cli("extract", image_folder, "--out", readonly, *SMALL)[::2], str(readonly))
        finally:
            subprocess.run(["umount", str(readonly)], check=True)
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        one_line_error(*cli("extract", image_folder, "--out", tmp_path / "ro", *SMALL)[::2], "not writable")


def test_a_second_writer_is_told_who_holds_the_output(image_folder, tmp_path):
    folder = tmp_path / "features" / "resnet18"
    folder.mkdir(parents=True)
    descriptor = os.open(folder, os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)  # as a running featx extract holds it
    try:
        status, _, err = cli("extract", image_folder, "--out", tmp_path / "features", *SMALL)
    finally:
        os.close(descriptor)
    one_line_error(status, err, "another featx process is writing to", str(folder))
    assert list(folder.iterdir()) == []


def test_damaged_feature_files_are_one_line(features, tmp_path):
    fit_head(features / "train.h5", "none", "knn", tmp_path / "knn")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes((features / "val.h5").read_bytes()[:5000])
    (tmp_path / "text.h5").write_text("hello")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        for key, value in h5py.File(features / "val.h5", "r").attrs.items():
            f.attrs[key] = value
    for path, fragment in ((truncated, "not a readable HDF5 file"), (tmp_path / "text.h5", "not a readable HDF5"),
                           (tmp_path / "empty.h5", "lacks the datasets ['features'")):
        one_line_error(*cli("evaluate", tmp_path / "knn", path)[::2], str(path), fragment)
        one_line_error(*cli("fit-head", path, "--val", "none")[::2], str(path), fragment)


def test_empty_class_folders_and_all_bad_splits_leave_nothing_half_written(tmp_path):
    empty = tmp_path / "empty"
    for name in ("ants", "bees"):
        (empty / "train" / name).mkdir(parents=True)
    one_line_error(*cli("extract", empty, "--out", tmp_path / "f1", *SMALL)[::2], "no images in its class folders")
    assert not list((tmp_path / "f1").rglob("*.tmp"))
    bad = make_image_folder(tmp_path / "bad", splits=("train",), per_class=1)
    (bad / "train" / "cats" / "cats_000.jpg").write_bytes(b"broken")
    (bad / "train" / "dogs" / "dogs_000.jpg").write_bytes(b"broken")
    status, out, _ = cli("extract", bad, "--out", tmp_path / "f2", *SMALL)
    assert status == 0 and "0 rows, 2 failed" in out
    assert len(store.load(tmp_path / "f2" / "resnet18" / "train.h5").failed) == 2
    assert not [p for p in (tmp_path / "f2").rglob("*") if p.name.endswith((".tmp", ".parts"))]


def test_bad_values_and_one_class_heads_are_one_line(features, tmp_path):
    fit_head(features / "train.h5", "none", "knn", tmp_path / "knn")
    one_line_error(*cli("predict", tmp_path / "knn", tmp_path, "--topk", "0")[::2], "topk must be a positive")
    one_class = tmp_path / "one.h5"
    shutil.copy(features / "train.h5", one_class)
    with h5py.File(one_class, "r+") as f:
        f["labels"][:] = 0
    for head in ("logreg", "linear", "knn"):
        one_line_error(*cli("fit-head", one_class, "--val", "none", "--head", head)[::2], "at least 2")


# --- 9. misspelled flags ---------------------------------------------------------------------------------------
def test_a_misspelled_extract_flag_is_refused_before_any_work(image_folder, tmp_path):
    result = subprocess.run([sys.executable, "-m", "featx", "extract", str(image_folder), "--out",
                             str(tmp_path / "f"), "--batchsize", "8"], capture_output=True, text=True)
    one_line_error(result.returncode, result.stderr, "--batchsize", "did you mean --batch_size?")
    assert not (tmp_path / "f").exists()


# --- 10, 11. leftovers and chunk sizes -------------------------------------------------------------------------
def test_parts_left_by_a_kill_after_the_commit_are_cleaned(image_folder, tmp_path):
    options = ExtractOptions(batch_size=4, shard_size=4, workers=1, device="cpu")
    extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path, options=options)
    parts = tmp_path / "resnet18" / "train.h5.parts"
    parts.mkdir()
    (parts / "part-00000.h5").write_bytes(b"\0" * 1000)  # what a kill between the commit and the cleanup leaves
    extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path, options=options)
    assert not parts.exists()


def test_shard_chunks_never_exceed_the_shard(tmp_path):
    writer = store.ShardWriter(tmp_path / "part-00000.h5", 1280, "float32", max_rows=16)
    writer.append(np.arange(16), np.ones((16, 1280), np.float32), np.zeros(16, np.uint64))
    writer.commit()
    with h5py.File(tmp_path / "part-00000.h5", "r") as f:
        assert f["features"].chunks == (16, 1280)
    assert (tmp_path / "part-00000.h5").stat().st_size < 120_000  # was 1,084,176 bytes for 81,920 of data
