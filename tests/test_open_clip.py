"""OpenCLIP backbones (``--backbone open_clip:ARCH[/PRETRAINED]``) and the zeroshot head, against OpenCLIP's own
code on real photos: its preprocessing, ``encode_image``, and its text-image similarity for the same prompts."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from test_faults import cli, one_line_error

from featx import store
from featx.heads import load_head

NAME, ARCH = "open_clip:ViT-S-32", "ViT-S-32"  # a small architecture, random weights (no hub here)


@pytest.fixture(scope="module")
def folder(hymenoptera, tmp_path_factory):
    """Five real ants and five real bees, as class folders."""
    root = tmp_path_factory.mktemp("clip") / "photos"
    for name in ("ants", "bees"):
        (root / name).mkdir(parents=True)
        for path in sorted((hymenoptera / "val" / name).glob("*.jpg"))[:5]:
            shutil.copy(path, root / name / path.name)
    return root


@pytest.fixture(scope="module")
def reference():
    """OpenCLIP's own model and preprocessing, built as featx builds ``none`` (seed 0)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=None)
    return model.eval(), preprocess


@pytest.fixture(scope="module")
def extracted(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip-features")
    assert cli("extract", folder, "--out", out, "--backbone", NAME, "--weights", "none", "--device", "cpu")[0] == 0
    return out / "open_clip:ViT-S-32" / "all.h5"


def test_features_are_openclips_encode_image(extracted, reference):
    model, preprocess = reference
    features = store.load(extracted)
    root = features.meta["data_root"]
    images = torch.stack([preprocess(Image.open(f"{root}/{path}")) for path in features.paths])
    with torch.inference_mode():
        expected = model.encode_image(images).numpy()
    assert features.features.shape == (10, model.visual.output_dim)
    assert np.abs(features.features - expected).max() <= 1e-4


def test_the_zeroshot_head_is_openclips_similarity(extracted, reference, tmp_path):
    model, _ = reference
    status, out, err = cli("fit-head", extracted, "--head", "zeroshot", "--val", "none", "--prompts",
                           "a close-up photo of {}, an insect.", "--out", tmp_path / "zs")
    assert status == 0, err
    assert "no training: the prompt" in out and "on the 10 rows of the training file" in out and "hold-out" not in out
    for prompt in ("a photo of {0}.", "a {x} photo of {}", "no class name"):
        one_line_error(*cli("fit-head", extracted, "--head", "zeroshot", "--prompts", prompt, "--out",
                            tmp_path / "bad")[::2], "--prompts must hold one {}", prompt)
    head, features = load_head(tmp_path / "zs"), store.load(extracted)
    tokens = open_clip.get_tokenizer(ARCH)([f"a close-up photo of {name}, an insect." for name in ("ants", "bees")])
    with torch.inference_mode():
        image = torch.nn.functional.normalize(torch.from_numpy(features.features), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        expected = (model.logit_scale.exp() * image @ text.T).numpy()
    assert np.abs(head.decision_function(features.features) - expected).max() <= 1e-3
    assert cli("evaluate", tmp_path / "zs", extracted, "--out", tmp_path / "eval")[0] == 0
    rows = {r["path"]: r["predicted"] for r in csv.DictReader(open(tmp_path / "eval" / "predictions.csv"))}
    assert [rows[path] for path in features.paths] == [("ants", "bees")[i] for i in expected.argmax(1)]
    assert cli("export", tmp_path / "zs", tmp_path / "exported", "--noonnx")[0] == 0
    root, preprocess = features.meta["data_root"], reference[1]
    images = torch.stack([preprocess(Image.open(f"{root}/{path}")) for path in features.paths])
    with torch.inference_mode():
        exported = torch.export.load(tmp_path / "exported" / "model.pt2").module()(images).numpy()
    assert np.abs(exported - expected).max() <= 1e-3


def test_predict_and_finetune_run_on_an_openclip_backbone(folder, extracted, tmp_path):
    assert cli("fit-head", extracted, "--head", "knn", "--val", "none", "--out", tmp_path / "knn")[0] == 0
    status, _, err = cli("predict", tmp_path / "knn", folder, "--device", "cpu")
    assert status == 0 and "accuracy" in err
    status, _, err = cli("finetune", folder, "--out", tmp_path / "run", "--backbone", NAME, "--weights", "none",
                         "--epochs", "1", "--batch_size", "4", "--workers", "1", "--device", "cpu")
    assert status == 0, err


def test_zeroshot_needs_a_clip_backbone(tmp_path, image_folder):
    assert cli("extract", image_folder, "--out", tmp_path / "f", "--backbone", "resnet18", "--weights", "none",
               "--resize", "40", "--crop", "32", "--device", "cpu")[0] == 0
    one_line_error(*cli("fit-head", tmp_path / "f" / "resnet18" / "train.h5", "--head", "zeroshot")[::2],
                   "resnet18 has no text tower", "open_clip:")
    one_line_error(*cli("extract", image_folder, "--backbone", "open_clip:ViT-S-32", "--mirror", "none")[::2],
                   "names no pretrained weights")


def test_the_tower_runs_on_onnx_runtime_with_openclips_features(folder, reference, tmp_path):
    """OpenCLIP's attention exports to ONNX (its fused fast path off while exporting): ONNX Runtime gives
    ``encode_image``'s features, and ``auto`` measures it instead of falling back."""
    status, out, err = cli("extract", folder, "--backbone", NAME, "--weights", "none", "--device", "cpu",
                           "--runtime", "onnxruntime", "--out", tmp_path / "f")
    assert status == 0, err
    features = store.load(tmp_path / "f" / "open_clip:ViT-S-32" / "all.h5")
    assert features.meta["runtime"].startswith("onnxruntime ")
    model, preprocess = reference
    images = torch.stack([preprocess(Image.open(f"{features.meta['data_root']}/{p}")) for p in features.paths])
    with torch.inference_mode():
        assert np.abs(features.features - model.encode_image(images).numpy()).max() <= 1e-4
