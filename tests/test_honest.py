"""Honest scores: "held out" is decided by the images' content, and every output says when scored images were seen
in fitting or selection; heads that cannot score honestly are refused or reported."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image
from test_faults import SMALL, cli, one_line_error

import featx
from featx.fit import evaluate, fit_head


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A small two-class folder extracted twice: in place, and from a copy of its val images elsewhere."""
    root = tmp_path_factory.mktemp("honest")
    data = make_image_folder(root / "data", per_class=8)
    assert cli("extract", data, "--out", root / "features", *SMALL)[0] == 0
    shutil.copytree(data / "val", root / "copy")  # cats/, dogs/: one split, "all"
    assert cli("extract", root / "copy", "--out", root / "copied", *SMALL, "--source", "imagefolder")[0] == 0
    return data, root


def test_a_copy_of_images_the_head_was_fitted_on_is_not_held_out(extracted, tmp_path, capsys):
    data, root = extracted
    fit_head(root / "features" / "resnet18" / "train.h5", "auto", "logreg", tmp_path / "head")  # refits on val too
    copied = root / "copied" / "resnet18" / "all.h5"  # the same 16 val images, another folder, another name
    status, out, _ = cli("evaluate", tmp_path / "head", copied, "--out", tmp_path / "eval")
    assert status == 0 and "NOT held out: 16 of 16 images were used to fit or select this head" in out
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["held_out"] is False and saved["seen_in_fitting"] == 16
    assert Image.open(tmp_path / "eval" / "confusion.png").text["Title"].endswith("(NOT held out)")
    api = featx.extract(data / "val", "resnet18", "none", tmp_path / "api", device="cpu",
                        resize=40, crop=32)
    assert evaluate(tmp_path / "head", api["val"]["path"], tmp_path / "eval-api")["held_out"] is False
    capsys.readouterr()
    status, _, err = cli("predict", tmp_path / "head", root / "copy", "--device", "cpu", "--out", tmp_path / "p.json")
    assert status == 0 and "NOT held out: 16 of 16 images were used in fitting or selection" in err
    assert all(record["seen"] for record in json.loads((tmp_path / "p.json").read_text()))


def test_images_never_seen_are_held_out(extracted, tmp_path):
    _, root = extracted
    fit_head(root / "features" / "resnet18" / "train.h5", "none", "logreg", tmp_path / "head")  # val untouched
    scored = evaluate(tmp_path / "head", root / "copied" / "resnet18" / "all.h5", tmp_path / "eval")
    assert scored["held_out"] is True and scored["seen_in_fitting"] == 0
    assert "held out" not in Image.open(tmp_path / "eval" / "confusion.png").text["Title"]
    status, _, err = cli("predict", tmp_path / "head", root / "copy", "--device", "cpu", "--out", tmp_path / "p.csv")
    assert status == 0 and "accuracy" in err and "NOT held out" not in err


def test_a_head_with_non_finite_parameters_is_refused(extracted, tmp_path):
    _, root = extracted
    fit_head(root / "features" / "resnet18" / "train.h5", "none", "linear", tmp_path / "head")
    state = torch.load(tmp_path / "head" / "model.pt", weights_only=True)
    state["weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "head" / "model.pt")
    one_line_error(*cli("evaluate", tmp_path / "head", root / "features" / "resnet18" / "val.h5")[::2],
                   "NaN or infinite parameters", "fit-head")


def test_a_logreg_head_missing_arrays_is_one_line(extracted, tmp_path):
    _, root = extracted
    fit_head(root / "features" / "resnet18" / "train.h5", "none", "logreg", tmp_path / "head")
    with np.load(tmp_path / "head" / "model.npz") as arrays:
        kept = {name: arrays[name] for name in arrays.files if name != "coef"}
    np.savez(tmp_path / "head" / "model.npz", **kept)
    one_line_error(*cli("predict", tmp_path / "head", root / "copy", "--device", "cpu")[::2], "lacks the arrays coef")


def test_rows_far_outside_the_fitted_features_are_reported(extracted, tmp_path):
    _, root = extracted
    fit_head(root / "features" / "resnet18" / "train.h5", "none", "logreg", tmp_path / "head")
    broken = tmp_path / "val.h5"
    shutil.copy(root / "features" / "resnet18" / "val.h5", broken)
    with h5py.File(broken, "r+") as f:
        f["features"][:3] = f["features"][:3] * 1e9
    status, _, err = cli("evaluate", tmp_path / "head", broken, "--out", tmp_path / "eval")
    assert status == 0 and "3 of 16 rows" in err and "far outside" in err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["far_rows"] == 3
