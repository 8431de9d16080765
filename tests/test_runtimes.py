"""Runtimes and precision (``--runtime``, ``--precision``): ONNX Runtime's features equal PyTorch float32 on real
weights and photos; ``auto`` measures, picks an exact runtime and remembers it privately; the Ray engine runs the
runtime the driver chose; bf16 is refused where the CPU would emulate it, and its agreement is measured anyway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import make_image_folder, remember_runtime, sigkill_when
from test_faults import cli, one_line_error

from featx import store
from featx.backbones import BackboneSpec, create_backbone
from featx.cache import SCRATCH, UntrustedCacheError
from featx.decode import ImageFiles, collate
from featx.devices import cpu_flags
from featx.embed import Calibration, Embedder, choose_runtime
from featx.heads import make_head
from featx.runtimes import agreement, calibration_batch, fastest_exact
from featx.sources import discover

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def features(path):
    return torch.from_numpy(store.load(path).features)


@pytest.mark.parametrize("name,weights", [("mobilenet_v2", "mobilenet_v2-imagenet-features.pth"),
                                          ("squeezenet1_1", "squeezenet1_1-imagenet.pth")])
def test_onnxruntime_and_the_default_give_pytorch_float32_features(hymenoptera, mirror, tmp_path, name, weights):
    weights = str(mirror / "weights" / weights)
    run = ["extract", hymenoptera, "--backbone", name, "--weights", weights, "--splits", "val", "--device", "cpu"]
    reference = ["--runtime", "torch", "--nofold_batch_norm", "--nochannels_last"]  # plain PyTorch float32 eager
    for out, flags in (("torch", reference), ("onnx", ["--runtime", "onnxruntime"]), ("auto", [])):
        assert cli(*run, "--out", tmp_path / out, *flags)[0] == 0
    expected = features(tmp_path / "torch" / name / "val.h5")
    for out in ("onnx", "auto"):
        measured = agreement(expected, features(tmp_path / out / name / "val.h5"))
        assert measured["max_abs"] <= 1e-4 and measured["min_cosine"] >= 0.99999, (out, measured)
    assert store.read_meta(tmp_path / "onnx" / name / "val.h5")["runtime"].startswith("onnxruntime ")
    assert store.read_meta(tmp_path / "torch" / name / "val.h5")["runtime"] == f"torch {torch.__version__}"


def test_auto_measures_once_picks_an_exact_runtime_and_says_which(mobilenet_weights, private_cache):
    backbone = create_backbone("mobilenet_v2", str(mobilenet_weights))
    chosen = choose_runtime(backbone, "auto", CPU, None)
    [record] = list((private_cache / "runtimes").glob("*.json"))
    choice = json.loads(record.read_text())
    assert choice["runtime"] == chosen and set(choice["measured"]) == {"torch", "onnxruntime"}
    assert record.stat().st_mode & 0o077 == 0
    batch = calibration_batch(backbone.transform.crop)  # the chosen runtime's features, checked independently
    plain = torchvision.models.mobilenet_v2()
    plain.load_state_dict(torch.load(mobilenet_weights, weights_only=True), strict=False)
    plain.classifier = torch.nn.Identity()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = plain.eval()((batch.float() / 255 - mean) / std).numpy()
    got = Embedder(backbone, "cpu", "fp32", runtime=chosen)(batch).numpy()
    assert np.abs(got - expected).max() <= 1e-4
    record.write_text(json.dumps({**choice, "runtime": "torch"}))  # remembered: not measured again
    assert choose_runtime(backbone, "auto", CPU, None) == "torch"
    assert choose_runtime(backbone, "auto", CPU, torch.bfloat16) == "torch"  # onnx: fp32 only
    with pytest.raises(ValueError, match="decided by featx.runtimes.resolve_runtime"):
        Embedder(backbone, "cpu", "fp32", runtime="auto")  # an Embedder runs a concrete runtime


def _exact(images):
    """A runtime of known output: each image's channel means."""
    return images.float().mean((2, 3))


def _taking(seconds: float):
    """``_exact``, taking ``seconds`` a call: a runtime of known speed."""
    def run(images):
        time.sleep(seconds)
        return _exact(images)
    return run


def test_auto_keeps_the_fastest_exact_runtime():
    """``fastest_exact`` on runtimes whose speed and exactness are known: a slow exact one, a fast exact one, and
    a faster one that is off by 1e-2."""
    batch = calibration_batch(16, size=4)
    slow = _taking(0.05)

    def wrong(images):
        return _exact(images) + 1e-2

    assert agreement(torch.zeros(2, 3), torch.zeros(2, 3))["exact"]  # a dead row in both agrees
    choice = fastest_exact({"slow": slow, "fast": _exact, "wrong": wrong}, _exact, batch)
    assert choice["runtime"] == "fast" and not choice["measured"]["wrong"]["exact"]
    assert choice["measured"]["fast"]["images_per_second"] > choice["measured"]["slow"]["images_per_second"]
    assert fastest_exact({"slow": slow, "wrong": wrong}, _exact, batch)["runtime"] == "slow"


def test_a_planted_or_shared_onnx_graph_or_choice_is_refused(mobilenet_weights, private_cache):
    backbone = create_backbone("mobilenet_v2", str(mobilenet_weights))
    Embedder(backbone, "cpu", "fp32", runtime="onnxruntime")
    [graph] = list((private_cache / "onnx").glob("*.onnx"))
    graph.write_bytes(graph.read_bytes() + b"\0")  # changed since featx exported it
    with pytest.raises(UntrustedCacheError, match="sha256 is not the one featx recorded"):
        Embedder(backbone, "cpu", "fp32", runtime="onnxruntime")
    graph.unlink()
    choose_runtime(backbone, "auto", CPU, None)
    (private_cache / "runtimes").chmod(0o777)
    with pytest.raises(UntrustedCacheError, match="group or others can write it"):
        choose_runtime(backbone, "auto", CPU, None)


def test_bf16_is_refused_where_the_cpu_would_emulate_it_and_recorded_where_it_runs(image_folder, tmp_path):
    run = ["extract", image_folder, "--backbone", "resnet18", "--weights", "none", "--device", "cpu",
           "--resize", "40", "--crop", "32", "--out", tmp_path / "f"]
    if not {"avx512_bf16", "amx_bf16"} & cpu_flags():
        one_line_error(*cli(*run, "--precision", "bf16")[::2], "--precision bf16 needs a CPU with native bf16")
        assert not (tmp_path / "f").exists()
        return
    assert cli(*run, "--precision", "bf16")[0] == 0
    assert store.read_meta(tmp_path / "f" / "resnet18" / "train.h5")["precision"] == "bf16"
    one_line_error(*cli(*run)[::2], "precision: 'bf16' there, None now")  # a resumed run never mixes


def test_bf16_agreement_on_real_weights(hymenoptera, mobilenet_weights):
    """Measured on any host (emulated where the CPU has no bf16): cosine to float32, and the logreg head's val
    accuracy on ants/bees within one image of float32's (153 images: 0.65 point; emulated on an AVX2 host, bf16
    lost exactly one image, 0.9542 vs 0.9608)."""
    backbone = create_backbone("mobilenet_v2", str(mobilenet_weights))
    exact, bf16 = Embedder(backbone, "cpu", "fp32"), Embedder(backbone, "cpu", "bf16", emulate=True)
    rows = {}
    for split in discover(hymenoptera):
        files = ImageFiles(split.root, split.paths, backbone.transform)
        images = [collate([files[i] for i in range(s, min(s + 64, len(files)))]).images
                  for s in range(0, len(files), 64)]
        rows[split.name] = {name: torch.cat([embed(b) for b in images]).numpy() for name, embed in
                            (("fp32", exact), ("bf16", bf16))}, np.asarray(split.labels)
    measured = agreement(torch.from_numpy(rows["val"][0]["fp32"]), torch.from_numpy(rows["val"][0]["bf16"]))
    accuracy = {}
    for name in ("fp32", "bf16"):
        head = make_head("logreg").fit(rows["train"][0][name], rows["train"][1])
        accuracy[name] = head.score(rows["val"][0][name], rows["val"][1])
    print(f"bf16 vs fp32 on real MobileNetV2: min cosine {measured['min_cosine']:.5f}, val accuracy {accuracy}")
    assert measured["min_cosine"] >= 0.98 and accuracy["fp32"] >= 0.95  # 0.98: the CUDA bf16 test's bound
    assert abs(accuracy["bf16"] - accuracy["fp32"]) <= 1 / len(rows["val"][1]) + 1e-9


def test_a_killed_builds_scratch_folder_is_removed_by_the_next_build(mobilenet_weights, private_cache):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id nobody runs now: a build killed mid-way
    abandoned = private_cache / "onnx" / f"{SCRATCH}{gone.pid}-x1"
    running = private_cache / "onnx" / f"{SCRATCH}{os.getpid()}-x2"  # a build still running (this process)
    for folder in (abandoned, running):
        folder.mkdir(parents=True)
        (folder / "partial.onnx").write_bytes(b"half")
    private_cache.chmod(0o700)
    (private_cache / "onnx").chmod(0o700)
    Embedder(create_backbone("mobilenet_v2", str(mobilenet_weights)), "cpu", "fp32", runtime="onnxruntime")
    assert not abandoned.exists() and running.exists()


def test_a_resume_keeps_the_runtime_its_output_started_with(tmp_path):
    """Killed after a shard with --runtime onnxruntime: a rerun asking for torch is refused in one line and changes
    nothing; a rerun with auto, where auto would now pick torch, resumes with ONNX Runtime. Never mixed rows."""
    data = make_image_folder(tmp_path / "data", splits=("train",), per_class=24)
    run = ["extract", data, "--backbone", "resnet18", "--weights", "none", "--resize", "40", "--crop", "32",
           "--device", "cpu", "--splits", "train", "--shard_size", "4", "--batch_size", "4"]
    assert cli(*run, "--out", tmp_path / "reference", "--runtime", "onnxruntime")[0] == 0
    command = [sys.executable, "-m", "featx", *map(str, run), "--out", str(tmp_path / "f"), "--runtime", "onnxruntime"]
    parts = tmp_path / "f" / "resnet18" / "train.h5.parts"
    sigkill_when(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                 lambda: len(store.finished_shards(parts)) >= 1)
    assert 1 <= len(store.finished_shards(parts)) < 12, "not killed mid-split"
    before = sorted(p.name for p in parts.iterdir())
    one_line_error(*cli(*run, "--out", tmp_path / "f", "--runtime", "torch")[::2],
                   "runtime: 'onnxruntime' there, 'torch' now", "--overwrite")
    assert sorted(p.name for p in parts.iterdir()) == before
    backbone = BackboneSpec("resnet18", "none", resize=40, crop=32).build()
    remember_runtime(backbone, "torch", batch_size=4)  # auto would now pick torch here
    assert choose_runtime(backbone, "auto", CPU, None, batch_size=4) == "torch"
    status, out, err = cli(*run, "--out", tmp_path / "f")
    assert status == 0 and "resuming" in out, err
    resumed, reference = (store.load(tmp_path / f / "resnet18" / "train.h5") for f in ("f", "reference"))
    assert resumed.meta["runtime"].startswith("onnxruntime ") and resumed.paths == reference.paths
    assert np.array_equal(resumed.features, reference.features)


def test_a_tie_keeps_torch_and_only_a_clear_win_replaces_it():
    """Interleaved rounds at a fixed batch; another runtime must be CLEARLY_FASTER (10 %) than torch to replace
    it, so a tie measured under load never flips the choice."""
    batch = calibration_batch(16, size=4)
    assert fastest_exact({"torch": _taking(0.02), "onnxruntime": _taking(0.019)}, _exact, batch)["runtime"] == "torch"
    choice = fastest_exact({"torch": _taking(0.02), "onnxruntime": _taking(0.01)}, _exact, batch)
    assert choice["runtime"] == "onnxruntime" and choice["rounds"] == 3 and choice["batch"] == 4


def test_a_damaged_choice_is_measured_again_and_the_listing_shows_each(mobilenet_weights, private_cache, capsys):
    backbone = create_backbone("mobilenet_v2", str(mobilenet_weights))
    chosen = choose_runtime(backbone, "auto", CPU, None, batch_size=8)
    [record] = list((private_cache / "runtimes").glob("*.json"))
    saved = json.loads(record.read_text())
    assert saved["batch"] == 8 and saved["threads"] == torch.get_num_threads() and saved["onnxruntime"]
    record.write_text("")  # a kill mid-write (before writes were atomic), or an edit
    assert choose_runtime(backbone, "auto", CPU, None, batch_size=8) in ("torch", "onnxruntime")
    assert "is damaged; measuring again" in capsys.readouterr().err and json.loads(record.read_text())["runtime"]
    assert not [p for p in record.parent.iterdir() if p.name.startswith(".")]  # no partial write left
    status, out, _ = cli("backbones", "--runtimes")
    assert status == 0 and out.startswith("mobilenet_v2: ") and "batch 8" in out and str(record) in out
    assert chosen in ("torch", "onnxruntime")
    assert cli("backbones", "--forget_runtimes")[0] == 0 and not record.exists()


def test_a_graph_swapped_with_its_digest_is_refused_not_run(mobilenet_weights, squeezenet_weights, private_cache):
    """The digest catches accidents; a graph replaced together with its digest must still compute this model."""
    mobilenet = create_backbone("mobilenet_v2", str(mobilenet_weights))
    squeezenet = create_backbone("squeezenet1_1", str(squeezenet_weights))
    for backbone in (mobilenet, squeezenet):
        Embedder(backbone, "cpu", "fp32", runtime="onnxruntime")
    graphs = {path.name.split("-")[0]: path for path in (private_cache / "onnx").glob("*.onnx")}
    for suffix in ("", ".sha256"):  # SqueezeNet's graph and digest under MobileNetV2's names
        Path(f"{graphs['mobilenet_v2']}{suffix}").write_bytes(Path(f"{graphs['squeezenet1_1']}{suffix}").read_bytes())
    with pytest.raises(UntrustedCacheError, match="does not compute mobilenet_v2"):
        Embedder(mobilenet, "cpu", "fp32", runtime="onnxruntime")
    with pytest.raises(UntrustedCacheError, match="does not compute"):  # never "onnxruntime cannot run"
        choose_runtime(mobilenet, "auto", CPU, None, batch_size=4)
    Path(f"{graphs['squeezenet1_1']}.sha256").chmod(0o666)
    with pytest.raises(UntrustedCacheError, match="group or others can write it"):
        Embedder(squeezenet, "cpu", "fp32", runtime="onnxruntime")


@pytest.mark.parametrize("name,weights", [("mobilenet_v2", "mobilenet_v2-imagenet-features.pth"),
                                          ("squeezenet1_1", "squeezenet1_1-imagenet.pth")])
def test_int8_on_real_weights_keeps_the_accuracy_or_is_refused(hymenoptera, mirror, name, weights, tmp_path):
    """--precision int8, calibrated on the user's own images and checked on others: where it is accepted, the
    logreg head's val accuracy is within one image of float32's; where it would move the features (real
    MobileNetV2: min cosine 0.91 here), it is refused in one line naming the figure, and nothing is written."""
    run = ["extract", hymenoptera, "--backbone", name, "--weights", mirror / "weights" / weights, "--device", "cpu"]
    status, _, err = cli(*run, "--precision", "int8", "--out", tmp_path / "int8")
    if status != 0:
        one_line_error(status, err, f"--precision int8 would change {name}'s features: min cosine", "0.99 needed")
        assert not (tmp_path / "int8").exists()
        return
    assert cli(*run, "--out", tmp_path / "fp32")[0] == 0
    accuracy = {}
    for out in ("fp32", "int8"):
        train, val = (store.load(tmp_path / out / name / f"{s}.h5") for s in ("train", "val"))
        accuracy[out] = make_head("logreg").fit(train.features, train.labels).score(val.features, val.labels)
    assert abs(accuracy["int8"] - accuracy["fp32"]) <= 1 / 153 + 1e-9, accuracy


def test_int8_records_its_agreement_and_is_never_mixed_with_float(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=12, size=(64, 64))
    run = ["extract", data, "--backbone", "resnet18", "--weights", "none", "--device", "cpu", "--resize", "64",
           "--crop", "56"]
    assert cli(*run, "--out", tmp_path / "fp32")[0] == 0
    status, _, err = cli(*run, "--out", tmp_path / "f", "--precision", "int8")
    assert status == 0, err
    quantized, exact = (store.load(tmp_path / out / "resnet18" / "val.h5") for out in ("f", "fp32"))
    agreement_recorded = json.loads(quantized.meta["int8_agreement"])
    assert quantized.meta["precision"] == "int8" and quantized.meta["runtime"].startswith("onnxruntime ")
    assert agreement_recorded["min_cosine"] >= 0.99 and agreement_recorded["held_images"] == 12
    cosine = (quantized.features * exact.features).sum(1) / (
        np.linalg.norm(quantized.features, axis=1) * np.linalg.norm(exact.features, axis=1))
    assert cosine.min() >= 0.99 and np.abs(quantized.features - exact.features).max() > 1e-4  # close, not equal
    again = cli(*run, "--out", tmp_path / "again", "--precision", "int8")  # the graph and its agreement cached:
    assert again[0] == 0 and "quantized to int8" not in again[1]  # nothing quantized or measured again
    assert store.load(tmp_path / "again" / "resnet18" / "val.h5").meta["int8_agreement"] == \
        quantized.meta["int8_agreement"]
    make_image_folder(data, per_class=12, size=(64, 64), seed=1)  # other images: calibrated on them, anew
    assert "quantized to int8" in cli(*run, "--out", tmp_path / "other", "--precision", "int8")[1]
    one_line_error(*cli(*run, "--out", tmp_path / "f")[::2], "precision: 'int8' there")
    one_line_error(*cli(*run, "--out", tmp_path / "g", "--precision", "int8", "--runtime", "torch")[::2],
                   "--precision int8 runs on ONNX Runtime")
    one_line_error(*cli(*run, "--out", tmp_path / "g", "--precision", "int8", "--engine", "ray")[::2],
                   "runs on the local engine")
    assert not (tmp_path / "g").exists()


def test_an_int8_graph_swapped_with_its_digest_is_refused_not_run(tmp_path, private_cache):
    """The quantized graph and the agreement in it are reused without measuring again: one swapped together with
    its digest (another model's) must still come close to this model on the probe, or it is refused."""
    split = discover(make_image_folder(tmp_path / "data", splits=("train",), per_class=10, size=(64, 64)))[0]
    backbones = [BackboneSpec(name, "none", resize=64, crop=56).build() for name in ("resnet18", "resnet34")]
    for backbone in backbones:
        assert Embedder(backbone, "cpu", "int8", runtime="onnxruntime",
                        calibration=Calibration(split, backbone)).int8_agreement["min_cosine"] >= 0.99
    graphs = {path.name.split("-")[0]: path for path in (private_cache / "onnx").glob("*-int8-*.onnx")}
    for suffix in ("", ".sha256"):  # ResNet-34's quantized graph and digest under ResNet-18's names
        Path(f"{graphs['resnet18']}{suffix}").write_bytes(Path(f"{graphs['resnet34']}{suffix}").read_bytes())
    with pytest.raises(UntrustedCacheError, match="does not compute resnet18 quantized"):
        Embedder(backbones[0], "cpu", "int8", runtime="onnxruntime", calibration=Calibration(split, backbones[0]))


def test_int8_on_too_few_readable_images_is_one_line(tmp_path):
    """int8 needs 8 readable images to calibrate on and 8 others to check on; fewer is one line, nothing written."""
    data = make_image_folder(tmp_path / "data", per_class=6, size=(64, 64))
    for broken in sorted((data / "train").rglob("*.jpg"))[:4]:
        broken.write_bytes(b"not a jpeg")
    status, _, err = cli("extract", data, "--backbone", "resnet18", "--weights", "none", "--device", "cpu", "--resize",
                         "64", "--crop", "56", "--precision", "int8", "--out", tmp_path / "out")
    one_line_error(status, err, "--precision int8 calibrates on some of your images", "split train has",
                   "of the 8 it needs")
    assert not (tmp_path / "out").exists()
