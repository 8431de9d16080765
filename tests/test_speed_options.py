"""Speed options that change numerics agree with the exact path within their documented tolerance."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from featx import store
from featx.backbones import BackboneSpec, create_backbone
from featx.cache import model_key
from featx.decode import EvalTransform, ImageFiles, collate
from featx.embed import Embedder, fold_batch_norms
from featx.extract import extract
from featx.options import ExtractOptions
from featx.sources import discover


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def real_batch(hymenoptera):
    split = discover(hymenoptera)[1]
    files = ImageFiles(split.root, split.paths, EvalTransform())
    return collate([files[i] for i in range(0, len(files), 5)]).images


def test_compiled_package_matches_eager_and_is_reused(real_batch, mobilenet_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path))
    eager = Embedder(create_backbone("mobilenet_v2", str(mobilenet_weights)), "cpu")(real_batch)
    compiled_embedder = Embedder(create_backbone("mobilenet_v2", str(mobilenet_weights)), "cpu", compile=True)
    compiled = compiled_embedder(real_batch)
    ragged = compiled_embedder(real_batch[:7])  # padded to the compiled batch size
    assert (compiled - eager).abs().max() <= 1e-4 and (ragged - eager[:7]).abs().max() <= 1e-4
    (package,) = (tmp_path / "compiled").glob("*.pt2")
    assert (tmp_path / "compiled" / (package.name + ".sha256")).is_file()  # the digest it is checked against
    again = Embedder(create_backbone("mobilenet_v2", str(mobilenet_weights)), "cpu", compile=True)(real_batch)
    assert list((tmp_path / "compiled").glob("*.pt2")) == [package] and torch.equal(again, compiled)  # not rebuilt
    other = create_backbone("mobilenet_v2", "none")  # other weights: another key, never the cached package
    assert model_key(other.model, real_batch.float()) != model_key(
        create_backbone("mobilenet_v2", str(mobilenet_weights)).model, real_batch.float())


def test_bf16_autocast_on_cpu_stays_close(real_batch, mobilenet_weights):
    exact = Embedder(create_backbone("mobilenet_v2", str(mobilenet_weights)), "cpu", "fp32")(real_batch)
    bf16 = Embedder(create_backbone("mobilenet_v2", str(mobilenet_weights)), "cpu", "bf16", emulate=True)(real_batch)
    assert _cosine(exact.numpy(), bf16.numpy()).min() >= 0.99


def test_draft_decode_and_float16_storage_stay_close(hymenoptera, mobilenet_weights, tmp_path):
    weights = str(mobilenet_weights)
    extract(hymenoptera, BackboneSpec("mobilenet_v2", weights), tmp_path / "exact", splits=["val"])
    extract(hymenoptera, BackboneSpec("mobilenet_v2", weights, draft=True), tmp_path / "draft",
            splits=["val"])
    extract(hymenoptera, BackboneSpec("mobilenet_v2", weights), tmp_path / "half", splits=["val"],
            options=ExtractOptions(dtype="float16"))
    exact, draft, half = (store.load(tmp_path / r / "mobilenet_v2" / "val.h5") for r in ("exact", "draft", "half"))
    assert draft.meta["transform"]["draft"] and exact.paths == draft.paths
    assert _cosine(exact.features, draft.features).min() >= 0.95
    assert np.median(_cosine(exact.features, draft.features)) >= 0.99
    relative = np.abs(half.features.astype(np.float32) - exact.features) / (np.abs(exact.features) + 1e-2)
    assert relative.max() <= 1e-2


def test_resize_crop_only_stays_close_on_real_photos(hymenoptera, hymenoptera_features, mobilenet_weights, tmp_path):
    extract(hymenoptera, BackboneSpec("mobilenet_v2", str(mobilenet_weights), resize_crop_only=True), tmp_path,
            splits=["val"])
    exact, region = store.load(hymenoptera_features / "val.h5"), store.load(tmp_path / "mobilenet_v2" / "val.h5")
    assert exact.paths == region.paths and region.meta["transform"]["resize_crop_only"]
    cosine = _cosine(exact.features, region.features)  # measured: min 0.99984, median 0.9999995
    assert cosine.min() >= 0.999 and np.median(cosine) >= 0.99995


def test_decode_on_device_stays_close_on_real_photos(hymenoptera, hymenoptera_features, mobilenet_weights, tmp_path):
    options = ExtractOptions(device="cpu", decode_on_device=True)  # torchvision's libjpeg-turbo + tensor resize
    extract(hymenoptera, BackboneSpec("mobilenet_v2", str(mobilenet_weights)), tmp_path, splits=["val"],
            options=options)
    exact, decoded = store.load(hymenoptera_features / "val.h5"), store.load(tmp_path / "mobilenet_v2" / "val.h5")
    assert exact.paths == decoded.paths and decoded.meta["decoder"] == "torchvision.io.decode_jpeg"
    cosine = _cosine(exact.features, decoded.features)
    assert cosine.min() >= 0.998 and np.median(cosine) >= 0.9995


def test_forward_batch_chunks_give_the_whole_batch_features(real_batch, mobilenet_weights):
    backbone = create_backbone("mobilenet_v2", str(mobilenet_weights))
    whole = Embedder(backbone, "cpu", forward_batch=len(real_batch))(real_batch)
    chunked = Embedder(backbone, "cpu", forward_batch=5)(real_batch)  # 5 leaves a ragged end
    assert chunked.shape == whole.shape and (chunked - whole).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="forward_batch must be a positive integer, got 0"):
        ExtractOptions(forward_batch=0)


def test_folded_batch_norms_match_the_unfolded_model(real_batch, mobilenet_weights):
    backbone = create_backbone("mobilenet_v2", str(mobilenet_weights))
    folded = Embedder(backbone, "cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.model.modules()) == 52  # left as it was
    exact = Embedder(backbone, "cpu", fold_batch_norm=False)(real_batch)
    assert (folded(real_batch) - exact).abs().max() <= 1e-4 * exact.abs().max()


def test_untraceable_model_runs_unfolded():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y  # symbolic tracing cannot branch on a value

    model = DataDependent().eval()
    folded = fold_batch_norms(model)
    assert isinstance(folded.bn, torch.nn.BatchNorm2d) and folded is not model  # a copy, unfolded


def test_sequential_with_its_own_forward_is_not_folded_blindly():
    class Reused(torch.nn.Sequential):  # the convolution's output is used twice: its BatchNorm cannot be folded
        def forward(self, x):
            y = self[0](x)
            return self[1](y) + y

    model = Reused(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 16, 16)
    folded = fold_batch_norms(model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(x), model(x), atol=1e-6)


KEPT_PAGES = """
import resource, torch
from featx.backbones import create_backbone
from featx.embed import Embedder
from featx.memory import keep_freed_memory
embedder = Embedder(create_backbone("mobilenet_v2", "none"), "cpu")  # sets keep_freed_memory
images = torch.zeros(16, 3, 224, 224, dtype=torch.uint8)
embedder(images)  # the heap grows over the first two calls (the second by 0-14,000 pages, varying run to run)
embedder(images)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
embedder(images)
embedder(images)
print(keep_freed_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_reuses_pages_and_can_be_opted_out():
    def run(env):
        result = subprocess.run([sys.executable, "-c", KEPT_PAGES], capture_output=True, text=True, check=True,
                                env={**os.environ, **env})
        kept, faults = result.stdout.split()
        return kept, int(faults)

    kept, faults = run({})
    system, system_faults = run({"FEATX_MALLOC": "system"})
    assert (kept, system) == ("True", "False")
    assert system_faults > 50_000 and faults < system_faults / 10  # measured: 0 vs ~66,000 page faults
