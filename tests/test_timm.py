"""timm backbones (``--backbone timm:NAME``): the same features as torchvision for the same weights and
preprocessing, timm's own preprocessing by default (equal to timm's pipeline on real images), and every stage."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from test_faults import cli, fit_predict_export_finetune, one_line_error

import featx
from featx import store
from featx.backbones import create_backbone
from featx.decode import EvalTransform, load_rgb

SMALL = ["--weights", "none", "--resize", "40", "--crop", "32", "--device", "cpu", "--workers", "1"]


@pytest.fixture(scope="module")
def photos(hymenoptera) -> list[str]:
    return [str(p) for p in sorted((hymenoptera / "val").rglob("*.jpg"))[::16]]  # 10 real photos, both classes


def test_timm_resnet18_with_torchvision_weights_gives_torchvision_features(photos, tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(3)
        state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    timm_model = create_backbone("timm:resnet18", str(tmp_path / "resnet18.pth"))
    assert timm_model.weights.classifier_loaded  # every tensor, the classifier too: the names are the same
    same = EvalTransform()  # torchvision's preset for both
    ours = featx.embed_images(photos, "timm:resnet18", str(tmp_path / "resnet18.pth"), transform=same, device="cpu")
    theirs = featx.embed_images(photos, "resnet18", str(tmp_path / "resnet18.pth"), transform=same, device="cpu")
    assert ours.shape == (10, 512) and np.abs(ours - theirs).max() <= 1e-5


def test_the_default_preprocessing_is_timms_own_pipeline(photos):
    backbone = create_backbone("timm:resnet18", "none")
    config = timm.data.resolve_data_config({}, model=timm.create_model("resnet18"))
    assert (backbone.transform.interpolation, backbone.transform.crop) == (config["interpolation"], 224)
    reference = timm.data.create_transform(**config)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (backbone.transform.mean, backbone.transform.std))
    for path in photos:
        expected = reference(Image.open(path).convert("RGB"))
        ours = (backbone.transform(load_rgb(path)).float() / 255 - mean) / std
        assert ours.shape == expected.shape and (ours - expected).abs().max() <= 1e-5, path


def test_every_stage_runs_on_a_timm_backbone(image_folder, tmp_path):
    flags = ["--backbone", "timm:resnet18", *SMALL]
    assert cli("extract", image_folder, "--out", tmp_path / "f", *flags)[0] == 0
    train = tmp_path / "f" / "timm:resnet18" / "train.h5"
    assert store.read_meta(train)["backbone"] == "timm:resnet18"
    fit_predict_export_finetune(image_folder, train, tmp_path, flags, "layer2")


def test_offline_default_weights_and_a_missing_extra_are_one_line(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without the network
    one_line_error(*cli("extract", image_folder, "--out", tmp_path / "f", "--backbone", "timm:resnet18",
                        "--mirror", "none", "--device", "cpu")[::2], "resnet18.safetensors", "<mirror>/weights/")
    without = subprocess.run([sys.executable, "-c", "import sys; sys.modules['timm'] = None; from featx.cli import "
                              "main; main()", "extract", str(image_folder), "--backbone", "timm:resnet18",
                              "--weights", "none"], capture_output=True, text=True)
    one_line_error(without.returncode, without.stderr, "pip install 'featx[timm]'")


def test_pool_takes_the_class_token_or_the_mean_of_the_patch_tokens(photos):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    backbone = create_backbone("timm:vit_tiny_patch16_224", "none")
    assert backbone.pool == "token"  # this ViT's own pooling: the class token
    mean = create_backbone("timm:vit_tiny_patch16_224", "none", pool="mean")
    model.load_state_dict(mean.model.state_dict(), strict=False)  # the same seeded weights, timm's classifier kept
    images = torch.stack([mean.transform(load_rgb(p)) for p in photos[:4]])
    x = (images.float() / 255 - torch.tensor(mean.transform.mean).view(1, 3, 1, 1)) / torch.tensor(
        mean.transform.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        tokens = model.forward_features(x)  # after the final norm, which mean pooling keeps
        ours, cls = mean.model(x), backbone.model(x)
    assert mean.pool == "avg" and (ours - tokens[:, model.num_prefix_tokens:].mean(1)).abs().max() <= 1e-5
    assert (cls - tokens[:, 0]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="--pool cls does not apply to timm:resnet18"):
        create_backbone("timm:resnet18", "none", pool="cls")


def test_a_model_onnx_cannot_take_is_one_line_once_and_remembered(image_folder, tmp_path):
    """EVA-02's attention cannot be exported (the TorchScript exporter may print its whole graph when it fails):
    featx says one line, the first time only, and torch runs the model."""
    command = [sys.executable, "-m", "featx", "extract", str(image_folder), "--backbone",
               "timm:eva02_tiny_patch14_224", "--weights", "none", "--device", "cpu", "--splits", "val", "--out",
               str(tmp_path / "f")]
    env = {**os.environ, "FEATX_CACHE": str(tmp_path / "cache")}
    first = subprocess.run(command, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    said = first.stdout + first.stderr
    assert "Torch IR graph" not in said and "graph(" not in said and len(said.splitlines()) < 20, said[-3000:]
    assert said.count("onnxruntime cannot run timm:eva02_tiny_patch14_224") == 1 and "(remembered)" in said
    again = subprocess.run([*command, "--overwrite"], capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "onnxruntime cannot run" not in again.stdout + again.stderr
    features = store.read_meta(tmp_path / "f" / "timm:eva02_tiny_patch14_224" / "val.h5")
    assert features["runtime"].startswith("torch ")
    assert not [p for p in (tmp_path / "cache" / "onnx").iterdir()]  # no scratch folder left behind


def test_a_timm_vit_runs_exactly_on_onnx_runtime(photos):
    exact = featx.embed_images(photos, "timm:vit_tiny_patch16_224", "none", device="cpu", runtime="torch")
    onnx = featx.embed_images(photos, "timm:vit_tiny_patch16_224", "none", device="cpu", runtime="onnxruntime")
    assert np.abs(exact - onnx).max() <= 1e-4
