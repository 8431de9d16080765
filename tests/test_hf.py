"""Hugging Face backbones (``--backbone hf:REPO_OR_FOLDER``): tiny random DINOv2 and ViT models saved with
``save_pretrained``; featx's features equal transformers' own forward and pooling after the processor's own
preprocessing, on real photos; every stage; the mirror's hub cache offline; one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_faults import cli, fit_predict_export_finetune, one_line_error
from transformers import (AutoImageProcessor, AutoModel, BitImageProcessor, Dinov2Config, Dinov2Model, ViTConfig,
                          ViTImageProcessor, ViTModel)

import featx
from featx import store
from featx.backbones import create_backbone
from featx.cache import model_key
from featx.decode import load_rgb
from featx.runtimes import agreement

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=224)


def save_dinov2(folder):
    """DINOv2's own preprocessing (facebook/dinov2-*: shorter side 256 bicubic, centre crop 224)."""
    torch.manual_seed(1)
    Dinov2Model(Dinov2Config(patch_size=14, **TINY)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(
        folder)
    return folder


def save_vit(folder):
    """google/vit-base-patch16-224's preprocessing: both sides to 224 (aspect not kept), bilinear, mean/std 0.5."""
    torch.manual_seed(2)
    ViTModel(ViTConfig(patch_size=16, **TINY)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}, resample=2, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"dinov2": save_dinov2(root / "dinov2"), "vit": save_vit(root / "vit")}


@pytest.fixture(scope="module")
def photos(hymenoptera) -> list[str]:
    return [str(p) for p in sorted((hymenoptera / "val").rglob("*.jpg"))[::16]]  # 10 real photos, both classes


def transformers_features(folder, photos, pool: str) -> np.ndarray:
    """What a transformers user computes: the processor (PIL backend), the model, then the pooling."""
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    model = AutoModel.from_pretrained(folder).eval()
    pixels = processor([Image.open(p).convert("RGB") for p in photos], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        output = model(pixel_values=pixels)
    hidden = output.last_hidden_state
    return {"default": output.pooler_output, "cls": hidden[:, 0], "mean": hidden[:, 1:].mean(1)}[pool].numpy()


@pytest.mark.parametrize("kind", ["dinov2", "vit"])
@pytest.mark.parametrize("pool", ["default", "cls", "mean"])
def test_features_equal_transformers_own_forward_and_pooling(models, photos, kind, pool):
    ours = featx.embed_images(photos, f"hf:{models[kind]}", "DEFAULT", device="cpu", pool=pool)
    theirs = transformers_features(models[kind], photos, pool)
    assert ours.shape == (10, 32) and np.abs(ours - theirs).max() <= 1e-4
    if pool == "default":
        assert not np.allclose(ours, featx.embed_images(photos, f"hf:{models[kind]}", "DEFAULT", device="cpu",
                                                        pool="mean"), atol=1e-3)  # --pool changes what comes out


@pytest.mark.parametrize("kind", ["dinov2", "vit"])
def test_the_preprocessing_is_the_processors_own(models, photos, kind):
    """Equal to the processor's PIL backend; its torchvision backend (transformers' default) resamples tensors and
    differs by a level or two on a few pixels."""
    backbone = create_backbone(f"hf:{models[kind]}", "DEFAULT")
    pil = AutoImageProcessor.from_pretrained(models[kind], backend="pil")
    fast = AutoImageProcessor.from_pretrained(models[kind])
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (backbone.transform.mean, backbone.transform.std))
    for path in photos:
        ours = (backbone.transform(load_rgb(path)).float() / 255 - mean) / std
        exact = pil(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
        assert ours.shape == exact.shape and (ours - exact).abs().max() <= 1e-5, path
        close = fast(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
        level = 1 / 255 / min(backbone.transform.std)
        differs = (ours - close).abs()
        assert differs.max() <= 2 * level + 1e-5 and (differs > 1e-5).float().mean() < 0.02, path


def test_every_stage_runs_on_a_hf_backbone(models, image_folder, tmp_path):
    flags = ["--backbone", f"hf:{models['dinov2']}", "--device", "cpu", "--workers", "1"]
    assert cli("extract", image_folder, "--out", tmp_path / "f", *flags, "--pool", "mean")[0] == 0
    train = tmp_path / "f" / "hf:dinov2" / "train.h5"  # a folder's backbone is named by the folder
    meta = store.read_meta(train)
    assert meta["backbone"] == f"hf:{models['dinov2']}" and meta["pool"] == "mean"
    status, _, err = cli("extract", image_folder, "--out", tmp_path / "f", *flags)  # the default pool: refused
    one_line_error(status, err, "pool: 'mean' there, 'pooler' now")
    fit_predict_export_finetune(image_folder, train, tmp_path, [*flags, "--pool", "mean"], "visual.encoder.embeddings")


def test_a_repository_is_read_offline_from_the_mirrors_hub_cache(models, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without the network
    commit = "0" * 40
    repo = tmp_path / "mirror" / "huggingface" / "models--featx--tiny-dinov2"
    shutil.copytree(models["dinov2"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cached = featx.embed_images(photos[:3], "hf:featx/tiny-dinov2", mirror=str(tmp_path / "mirror"), device="cpu")
    folder = featx.embed_images(photos[:3], f"hf:{models['dinov2']}", device="cpu")
    assert np.array_equal(cached, folder)
    status, out, _ = cli("backbones", "--mirror", tmp_path / "mirror")
    assert status == 0 and any(line.startswith("hf:featx/tiny-dinov2") and " 32 " in line and "offline" in line
                               for line in out.splitlines())


def test_offline_default_weights_and_a_missing_extra_are_one_line(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(*cli("extract", image_folder, "--out", tmp_path / "f", "--backbone", "hf:facebook/dinov2-small",
                        "--mirror", "none", "--device", "cpu")[::2], "facebook/dinov2-small", "<mirror>/huggingface")
    without = subprocess.run([sys.executable, "-c", "import sys; sys.modules['transformers'] = None; from featx.cli "
                              "import main; main()", "extract", str(image_folder), "--backbone", "hf:some/model"],
                             capture_output=True, text=True)
    one_line_error(without.returncode, without.stderr, "pip install 'featx[hf]'")
    one_line_error(*cli("extract", image_folder, "--backbone", "resnet18", "--pool", "cls")[::2], "--pool cls")
    for missing in ("./my-model", str(tmp_path / "gone" / "model")):  # a folder that is not there: no hub advice
        status, _, err = cli("extract", image_folder, "--out", tmp_path / "f", "--backbone", f"hf:{missing}")
        one_line_error(status, err, f"hf:{missing}: no folder", "ORG/NAME")
        assert "hf download" not in err


@pytest.mark.parametrize("kind", ["dinov2", "vit"])
def test_vision_transformers_run_exactly_on_onnx_runtime(models, photos, kind):
    """ViT-family encoders export to ONNX: ONNX Runtime's features equal PyTorch float32 (1e-4), so auto can take
    them where they are faster."""
    backbone = create_backbone(f"hf:{models[kind]}", "none")
    exact = featx.embed_images(photos, f"hf:{models[kind]}", "none", device="cpu", runtime="torch")
    onnx = featx.embed_images(photos, f"hf:{models[kind]}", "none", device="cpu", runtime="onnxruntime")
    measured = agreement(torch.from_numpy(exact), torch.from_numpy(onnx))
    assert measured["max_abs"] <= 1e-4 and measured["min_cosine"] >= 0.99999, measured
    assert exact.shape == (len(photos), backbone.feature_dim)


def test_the_cache_keys_a_model_by_its_pooling_too(models):
    """The same weights pooled another way compute something else: their cached graphs (and compiled packages)
    must not be shared (they were, keyed by the weights alone, until a probe check caught it)."""
    example = torch.zeros(1, 3, 224, 224)
    keys = {pool: model_key(create_backbone(f"hf:{models['dinov2']}", "none", pool=pool).model, example)
            for pool in ("default", "cls", "mean")}
    assert len(set(keys.values())) == 3
