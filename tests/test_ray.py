"""The Ray engine on a local two-node cluster (``ray_cluster``): the local engine's files, resume, worker and driver
kills, bad images, failing workers, the missing-GPU error, and the no-copy layout's guard."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
from conftest import REPO, make_image_folder, remember_runtime, sigkill_when
from test_faults import cli, one_line_error

import featx
from featx import store
from featx.backbones import BackboneSpec
from featx.engines import EngineError, RayEngine, RayOptions
from featx.extract import IDENTITY_KEYS, split_dataset
from featx.extract import extract as run_extract
from featx.fit import fit_head
from featx.options import ExtractOptions
from featx.sources import discover

pytestmark = pytest.mark.ray
SMALL = dict(backbone="resnet18", weights="none", device="cpu", workers=1)


def _on_ray(address: str, **ray_options) -> dict:
    return {"engine": "ray", "ray_options": RayOptions(address, **ray_options)}


@pytest.mark.real_data
def test_ray_writes_the_local_engines_files(ray_cluster, hymenoptera, hymenoptera_features, mobilenet_weights,
                                            tmp_path):
    summaries = run_extract(hymenoptera, BackboneSpec("mobilenet_v2", str(mobilenet_weights)), tmp_path,
                                      options=ExtractOptions(batch_size=32, shard_size=64, device="cpu"),
                                      **_on_ray(ray_cluster.address))
    for split in ("train", "val"):
        local, distributed = store.load(hymenoptera_features / f"{split}.h5"), store.load(summaries[split]["path"])
        assert distributed.paths == local.paths and np.array_equal(distributed.labels, local.labels)
        assert np.abs(distributed.features - local.features).max() <= 1e-5
        assert {k: distributed.meta.get(k) for k in IDENTITY_KEYS} == {k: local.meta.get(k) for k in IDENTITY_KEYS}
        assert distributed.meta["runtime"] == local.meta["runtime"]  # the runtime the driver chose, on every worker
    head = fit_head(tmp_path / "mobilenet_v2" / "train.h5", "auto", "logreg", tmp_path / "head")
    reference = fit_head(hymenoptera_features / "train.h5", "auto", "logreg", tmp_path / "reference")
    assert head.selection_["val_accuracy"] == reference.selection_["val_accuracy"] == pytest.approx(0.9608, abs=1e-4)


def _kill_a_worker_mid_job(cluster, parts, killed: list) -> None:
    """SIGKILL one of ``cluster``'s shard workers once a shard is committed and the job is still running."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(parts.glob("part-*.h5")):
        time.sleep(0.02)
    pid = cluster.kill_worker("ShardWorker")
    if pid:
        killed.append(pid)


def test_a_worker_killed_mid_job_is_rerun_without_duplicates(ray_cluster, tmp_path):
    data = make_image_folder(tmp_path / "data", splits=("train",), per_class=12, size=(200, 200))
    options = ExtractOptions(batch_size=2, shard_size=4, device="cpu", workers=1, layout="virtual")
    local = run_extract(data, BackboneSpec("resnet18", "none"), tmp_path / "local", options=options)
    killed: list = []
    parts = tmp_path / "ray" / "resnet18" / "train.h5.parts"
    killer = threading.Thread(target=_kill_a_worker_mid_job, args=(ray_cluster, parts, killed))
    killer.start()
    summary = run_extract(data, BackboneSpec("resnet18", "none"), tmp_path / "ray", options=options,
                                    **_on_ray(ray_cluster.address))
    killer.join()
    assert killed, "no worker was killed"
    reference, distributed = store.load(local["train"]["path"]), store.load(summary["train"]["path"])
    assert distributed.paths == reference.paths and len(set(distributed.paths)) == 24
    assert np.abs(distributed.features - reference.features).max() <= 1e-5
    assert distributed.meta["layout"] == "virtual"
    (tmp_path / "ray" / "resnet18" / "train.h5.parts" / "part-00002.h5").unlink()  # the no-copy layout's guard
    one_line_error(*cli("fit-head", tmp_path / "ray" / "resnet18" / "train.h5")[::2], "part-00002.h5", "missing")


def test_a_killed_driver_resumes_on_rerun(ray_cluster, tmp_path):
    data = make_image_folder(tmp_path / "data", splits=("train",), per_class=12, size=(200, 200))
    command = [sys.executable, "-m", "featx", "extract", str(data), "--out", str(tmp_path / "f"), "--backbone",
               "resnet18", "--weights", "none", "--device", "cpu", "--batch_size", "2", "--shard_size", "4",
               "--engine", "ray", "--ray_address", ray_cluster.address]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "f" / "resnet18" / "train.h5.parts"
    sigkill_when(driver, lambda: any(parts.glob("part-*.h5")))
    assert 1 <= len(list(parts.glob("part-*.h5"))) < 6, "not killed mid-job"
    status, out, _ = cli(*command[3:])
    assert status == 0 and "resuming" in out
    features = store.load(tmp_path / "f" / "resnet18" / "train.h5")
    assert features.paths == list(discover(data)[0].paths)


def test_bad_images_are_recorded_as_locally(ray_cluster, image_folder, tmp_path):
    (image_folder / "train" / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    options = ExtractOptions(batch_size=4, shard_size=4, device="cpu", workers=1)
    local = run_extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path / "local", options=options)
    distributed = run_extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path / "ray", options=options,
                                        **_on_ray(ray_cluster.address))
    assert distributed["train"]["failed"] == local["train"]["failed"] and len(local["train"]["failed"]) == 1
    assert "broken.jpg" in local["train"]["failed"][0][0]


def test_missing_gpus_are_one_line_and_failing_workers_stop_the_job(ray_cluster, image_folder, tmp_path):
    status, _, err = cli("extract", image_folder, "--out", tmp_path / "f", "--backbone", "resnet18", "--weights",
                         "none", "--engine", "ray", "--ray_address", ray_cluster.address, "--device", "cuda")
    one_line_error(status, err, "has no GPU")
    (split, _) = discover(image_folder)
    options = ExtractOptions(device="cpu", workers=1)
    backbone = featx.backbones.create_backbone("resnet18", "none")
    spec = BackboneSpec("resnet18", str(tmp_path / "gone.pth"))  # workers cannot load it
    start = time.monotonic()
    engine = RayEngine(spec, backbone, options, RayOptions(ray_cluster.address))
    with pytest.raises(EngineError, match=r"shard 0 failed 3 times.*gone.pth"):
        engine.run(split_dataset(split, backbone, options), tmp_path, {0: [[0, 1]]})
    assert time.monotonic() - start < 120


def test_a_cluster_nobody_runs_fails_in_one_line_within_seconds(image_folder, tmp_path):
    for address in ("127.0.0.1:1", "no-such-host.invalid:6379"):
        start = time.monotonic()
        one_line_error(*cli("extract", image_folder, "--out", tmp_path / "f", "--backbone", "resnet18", "--weights",
                            "none", "--engine", "ray", "--ray_address", address)[::2], address, "no Ray cluster")
        assert time.monotonic() - start < 30
    client = "ray://127.0.0.1:10001"
    status, _, err = cli("extract", image_folder, "--out", tmp_path / "f", "--backbone", "resnet18", "--weights",
                         "none", "--engine", "ray", "--ray_address", client)
    import importlib.util

    one_line_error(status, err, client, "ray[client]" if importlib.util.find_spec("grpc") is None else "no Ray")


@pytest.mark.parametrize("flags, message", [(["--ray_cpus_per_worker", "0"], "ray_cpus_per_worker must be"),
                                            (["--ray_workers", "-3"], "ray_workers must be")])
def test_impossible_worker_shapes_are_refused_before_any_work(image_folder, tmp_path, flags, message):
    one_line_error(*cli("extract", image_folder, "--out", tmp_path / "f", "--engine", "ray", *flags)[::2], message)
    assert not (tmp_path / "f").exists()


def test_workers_wider_than_any_node_are_refused(ray_cluster, image_folder, tmp_path):
    one_line_error(*cli("extract", image_folder, "--out", tmp_path / "f", "--backbone", "resnet18", "--weights", "none",
                        "--engine", "ray", "--ray_address", ray_cluster.address, "--ray_cpus_per_worker", "4")[::2],
                   "more than any node", "at most 1 CPUs")


@pytest.mark.slow
def test_a_cluster_that_goes_away_mid_job_is_one_line_and_the_rerun_resumes(ray_cluster, tmp_path):
    from conftest import free_port, start_ray_node, stop_ray_nodes

    data = make_image_folder(tmp_path / "data", splits=("train",), per_class=30, size=(160, 160))
    port = str(free_port())
    head = start_ray_node(tmp_path / "head.log", "--head", "--port", port, "--num-cpus", "1",
                          "--include-dashboard=false", "--temp-dir", tempfile.mkdtemp(prefix="featx-ray-"))
    command = [sys.executable, "-m", "featx", "extract", str(data), "--out", str(tmp_path / "f"), "--backbone",
               "resnet18", "--weights", "none", "--device", "cpu", "--engine", "ray", "--ray_address",
               f"127.0.0.1:{port}", "--shard_size", "4", "--batch_size", "4"]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "f" / "resnet18" / "train.h5.parts"
    try:
        deadline = time.monotonic() + 180
        while not list(parts.glob("part-*.h5")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop_ray_nodes(head)  # this cluster only; the module's own keeps running
    _, err = job.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("featx: error:")]
    assert job.returncode == 2 and len(lines) == 1 and "went away mid-job" in lines[0], err[-2000:]
    done = len(list(parts.glob("part-*.h5")))
    assert done >= 1
    resumed = subprocess.run([*command[:-8], "--shard_size", "4", "--batch_size", "4"], capture_output=True,
                             text=True)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-2000:]
    assert len(store.load(tmp_path / "f" / "resnet18" / "train.h5").paths) == 60


def test_ray_runs_a_timm_backbone_as_the_local_engine_does(ray_cluster, image_folder, tmp_path):
    options = ExtractOptions(batch_size=4, shard_size=4, device="cpu", workers=1)
    local = run_extract(image_folder, BackboneSpec("timm:resnet18", "none"), tmp_path / "local", options=options)
    distributed = run_extract(image_folder, BackboneSpec("timm:resnet18", "none"), tmp_path / "ray", options=options,
                                        **_on_ray(ray_cluster.address))
    for split in ("train", "val"):
        a, b = store.load(local[split]["path"]), store.load(distributed[split]["path"])
        assert a.paths == b.paths and np.abs(a.features - b.features).max() <= 1e-5


def test_no_address_starts_a_private_instance_never_the_newest_cluster(ray_cluster, image_folder, tmp_path):
    """``ray.init()`` with no address joins the newest cluster on the machine, whoever started it: without
    --ray_address featx starts its own (2 CPUs here), so a worker of 2 CPUs fits where ``ray_cluster``'s 1-CPU
    nodes would refuse it."""
    result = subprocess.run([sys.executable, "-m", "featx", "extract", str(image_folder), "--out", str(tmp_path / "f"),
                             "--backbone", "resnet18", "--weights", "none", "--device", "cpu", "--resize", "40",
                             "--crop", "32", "--engine", "ray", "--ray_workers", "1", "--ray_cpus_per_worker", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(store.load(tmp_path / "f" / "resnet18" / "val.h5").paths) == 12


def test_the_ray_extract_job_writes_the_local_engines_features(ray_cluster, image_folder, tmp_path):
    local = run_extract(image_folder, BackboneSpec("resnet18", "none"), tmp_path / "local",
                                  options=ExtractOptions(device="cpu", workers=1))
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "ray_extract.py"), str(image_folder), "--out",
                             str(tmp_path / "job"), "--backbone", "resnet18", "--weights", "none", "--device", "cpu",
                             "--ray_address", ray_cluster.address, "--shard_size", "4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for split in ("train", "val"):
        job, reference = store.load(tmp_path / "job" / "resnet18" / f"{split}.h5"), store.load(local[split]["path"])
        assert job.paths == reference.paths and np.abs(job.features - reference.features).max() <= 1e-5


def test_cpu_workers_run_the_runtime_the_driver_resolved(ray_cluster, image_folder, tmp_path, monkeypatch):
    """With --device auto on a cluster of CPUs, the workers run what auto picks locally (here made ONNX Runtime),
    not PyTorch: the same features, the same provenance."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "cache"))
    spec = BackboneSpec("resnet18", "none", resize=40, crop=32)
    remember_runtime(spec.build(), "onnxruntime", batch_size=4)  # auto's choice here made ONNX Runtime
    options = ExtractOptions(batch_size=4, shard_size=4, workers=1)  # device auto
    local = run_extract(image_folder, spec, tmp_path / "local", options=options)
    distributed = run_extract(image_folder, spec, tmp_path / "ray", options=options, **_on_ray(ray_cluster.address))
    for split in ("train", "val"):
        a, b = store.load(local[split]["path"]), store.load(distributed[split]["path"])
        assert a.meta["runtime"] == b.meta["runtime"] and a.meta["runtime"].startswith("onnxruntime ")
        assert np.abs(a.features - b.features).max() <= 1e-5
