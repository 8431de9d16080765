"""Engines (the distributor role): who runs which shards of a split. ``local`` runs them in this process; ``ray``
hands them to Ray actors, one per GPU or per N CPU cores, each loading the model once and writing whole shards
into the shared output folder. Both run ``featx.shards.write_shards``. A shard is the unit of work and of retry:
it becomes visible only by its atomic rename, so a retried shard never duplicates rows. The runner merges.

An engine has ``run(dataset, parts, shards, progress)``, ``close()``, ``device_type`` (where its models run: cpu,
cuda) and ``options``: the ``ExtractOptions`` as they run there (``resolved``: the precision named, ``--runtime
auto`` decided once, in this process, for every worker); ``open_engine`` makes one by name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from featx import storage
from featx.backbones import Backbone, BackboneSpec
from featx.decode import ImageFiles
from featx.devices import QUANTIZED, resolve_device
from featx.embed import Embedder, resolve_mapper
from featx.options import ExtractOptions
from featx.shards import write_shards

ENGINES = ("local", "ray")
MAX_ATTEMPTS = 3  # tries per shard before the job stops


class EngineError(RuntimeError):
    """A shard kept failing on the engine's workers."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run on Ray. ``address``: None starts a local Ray instance; ``auto`` or
    ``ray://host:port`` joins a cluster. ``workers``: actors (default: one per GPU when the cluster has GPUs and the
    device is not cpu, else cluster CPUs // ``cpus_per_worker``)."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int = 1

    def __post_init__(self):
        for name, value in (("ray_workers", self.workers), ("ray_cpus_per_worker", self.cpus_per_worker)):
            if (value is not None or name == "ray_cpus_per_worker") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")


def resolved(options: ExtractOptions, backbone: Backbone, device: torch.device) -> ExtractOptions:
    """``options`` as they run on ``device`` (``featx.embed.resolve_mapper``: the precision named, the runtime
    decided)."""
    precision, runtime = resolve_mapper(backbone, device, options.precision, options.runtime, options.batch_size,
                                        options.compile, options.channels_last, options.fold_batch_norm)
    return replace(options, precision=precision, runtime=runtime)


class LocalEngine:
    """Runs shards in this process, one after another, with one model for the whole job. ``calibration``: the
    images ``--precision int8`` is calibrated and checked on (``featx.embed.Calibration``)."""

    def __init__(self, backbone: Backbone, options: ExtractOptions, calibration=None):
        device = resolve_device(options.device)
        self.options = options = resolved(options, backbone, device)
        self.embedder = Embedder(backbone, options.device, options.precision, options.channels_last,
                                 options.compile, options.forward_batch, options.fold_batch_norm, options.runtime,
                                 calibration=calibration)
        self.device_type = device.type
        agreement = self.embedder.int8_agreement
        self.provenance = {"int8_agreement": agreement} if agreement else {}  # recorded in each split's file

    def run(self, dataset: ImageFiles, parts: Path, shards: dict[int, list[list[int]]], progress=None) -> None:
        """Write ``shards`` (shard number -> batches of dataset items) into ``parts``."""
        write_shards(dataset, self.embedder, parts, shards, self.options, progress)

    def close(self) -> None:
        """Nothing to release: the model goes with the engine."""


class ShardWorker:
    """A Ray actor: builds the backbone once, then decodes, embeds and writes whole shards (a ``LocalEngine`` in the
    actor's process)."""

    def __init__(self, spec: BackboneSpec, options: ExtractOptions, threads: int):
        torch.set_num_threads(max(1, threads))
        self.engine = LocalEngine(spec.build(), options)

    def ready(self) -> bool:
        return True

    def run_shard(self, dataset: ImageFiles, parts: str, number: int, batches: list[list[int]]) -> int:
        """Write shard ``number``; returns how many items it held."""
        self.engine.run(dataset, storage.location(parts), {number: batches})
        return sum(len(b) for b in batches)


def connect(ray_options: RayOptions):
    """Ray, joined to ``ray_options.address`` (None: a private local instance), after a quick reachability check."""
    import ray

    if ray_options.address not in (None, "auto"):
        reachable(ray_options.address)
    if not ray.is_initialized():
        local = (ray_options.address or "").removeprefix("ray://").startswith(("127.", "localhost:"))
        # no address: a private local instance (ray.init() with none joins the newest cluster on the machine)
        ray.init(address=ray_options.address or "local", log_to_driver=False, logging_level="ERROR",
                 **({} if ray_options.address else {"include_dashboard": False}),
                 **({"_node_ip_address": "127.0.0.1"} if local else {}))  # no probe of an outside address
    return ray


def reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in one line, within ``timeout``, when nothing answers at a cluster address (``HOST:PORT``, or
    ``ray://HOST:PORT`` with Ray Client installed); Ray itself retries for minutes."""
    client = address.startswith("ray://")
    if client and importlib.util.find_spec("grpc") is None:
        raise ValueError(f"--ray_address {address} needs Ray Client: pip install 'ray[client]'; or run featx on a node "
                         "of the cluster with --ray_address HOST:PORT (the head's GCS address) or auto")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray_address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise EngineError(f"no Ray cluster answers at {address} ({error.strerror or error}); start one "
                          "(`ray start --head`) or check --ray_address") from None


def _placement(ray, ray_options: RayOptions, device: str) -> tuple[int, dict]:
    """(number of actors, the resources each asks for); asks for GPUs only where the cluster has them."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    widest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
    if ray_options.cpus_per_worker > widest:
        raise ValueError(f"--ray_cpus_per_worker {ray_options.cpus_per_worker} is more than any node of the Ray "
                         f"cluster has (at most {int(widest)} CPUs); its actors could never start")
    if device.startswith("cuda") and not gpus:
        raise ValueError(f"--device {device} was asked for, but the Ray cluster has no GPU "
                         f"({cpus} CPUs); use --device cpu")
    if gpus and device != "cpu":
        return ray_options.workers or gpus, {"num_gpus": 1, "num_cpus": ray_options.cpus_per_worker}
    workers = ray_options.workers or max(1, cpus // ray_options.cpus_per_worker)
    return workers, {"num_cpus": ray_options.cpus_per_worker}


class RayEngine:
    """Runs shards on Ray actors, kept for every split of a job (the model loads once per actor). A shard whose
    actor dies or fails is retried on a fresh actor, at most ``MAX_ATTEMPTS`` times; then the job stops with the
    shard's error. ``close`` ends the actors."""

    def __init__(self, spec: BackboneSpec, backbone: Backbone, options: ExtractOptions, ray_options: RayOptions):
        if options.precision in QUANTIZED:
            raise ValueError(f"--precision {options.precision} runs on the local engine (its graph is calibrated "
                             "on your images in this process); leave out --engine ray")
        self.ray = connect(ray_options)
        self.provenance: dict = {}
        count, resources = _placement(self.ray, ray_options, options.device)
        self.worker = self.ray.remote(**resources, max_restarts=0, max_task_retries=0)(ShardWorker)
        device = self.device_type = "cuda" if "num_gpus" in resources else "cpu"
        worker_options = replace(options, device=device, workers=options.workers or ray_options.cpus_per_worker,
                                 reader="threads" if device == "cpu" else options.reader)
        self.options = resolved(worker_options, backbone, torch.device(device))  # here, once: every worker the same
        self.arguments = (spec.portable(), self.options, ray_options.cpus_per_worker)
        self.count, self.idle = count, []

    def start(self) -> None:
        """Start every actor now and wait until each has loaded its model (otherwise they start on first use)."""
        actors = [self.worker.remote(*self.arguments) for _ in range(self.count - len(self.idle))]
        try:
            self.ray.get([actor.ready.remote() for actor in actors])
        except self.ray.exceptions.RayActorError as error:
            raise EngineError(f"Ray workers could not start: {_first_line(error)}") from None
        self.idle += actors

    def _actor(self):
        return self.idle.pop() if self.idle else self.worker.remote(*self.arguments)

    def run(self, dataset: ImageFiles, parts: Path, shards: dict[int, list[list[int]]], progress=None) -> None:
        """Write ``shards`` (shard number -> batches of dataset items) into ``parts``; a cluster that goes away
        meanwhile ends the job in one line (``watching``)."""
        with watching(self.ray.get_runtime_context().gcs_address):
            self._schedule(dataset, parts, shards, progress)

    def _schedule(self, dataset: ImageFiles, parts: Path, shards: dict[int, list[list[int]]], progress) -> None:
        ray, todo = self.ray, list(shards)
        attempts = {number: 0 for number in todo}
        dataset_ref = ray.put(dataset)
        running: dict = {}
        try:
            while todo or running:
                while todo and len(running) < self.count:
                    number, actor = todo.pop(0), self._actor()
                    attempts[number] += 1
                    running[actor.run_shard.remote(dataset_ref, os.fspath(parts), number, shards[number])] = \
                        (number, actor)
                (done,), _ = ray.wait(list(running), num_returns=1)
                number, actor = running.pop(done)
                try:
                    items = ray.get(done)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
                    ray.kill(actor)
                    if attempts[number] >= MAX_ATTEMPTS:
                        raise EngineError(f"shard {number} failed {attempts[number]} times on Ray workers; last: "
                                          f"{_first_line(error)}") from None
                    todo.insert(0, number)
                    continue
                self.idle.append(actor)
                if progress is not None:
                    progress.update(items)
        finally:
            for _, actor in running.values():
                ray.kill(actor)

    def close(self) -> None:
        for actor in self.idle:
            self.ray.kill(actor)
        self.idle = []


@contextlib.contextmanager
def watching(address: str, interval: float = 2.0, misses: int = 3):
    """While the block runs, check every ``interval`` seconds that the cluster's GCS at ``address`` answers. After
    ``misses`` failures in a row, say so in one line and exit with status 2: without it the driver hangs, or Ray
    ends it a minute later with its own log. The shards committed so far stay; a rerun resumes."""
    host, _, port = address.rpartition(":")
    stop = threading.Event()

    def watch() -> None:
        failures = 0
        while not stop.wait(interval):
            try:
                socket.create_connection((host, int(port)), timeout=interval).close()
                failures = 0
            except OSError:
                failures += 1
            if failures >= misses:
                print(f"\nfeatx: error: the Ray cluster at {address} went away mid-job; the shards committed so far "
                      "are kept: rerun the same command to resume", file=sys.stderr, flush=True)
                os._exit(2)

    thread = threading.Thread(target=watch, name="featx-ray-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "cause", None) or error)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("Traceback", "  "))]
    return lines[-1] if lines else type(error).__name__


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def open_engine(name: str, spec: BackboneSpec, backbone: Backbone, options: ExtractOptions,
                ray_options: RayOptions = RayOptions(), calibration=None):
    """The engine ``name`` (``ENGINES``) for ``backbone`` (built from ``spec``); close it after."""
    if name == "ray":
        return RayEngine(spec, backbone, options, ray_options)
    return LocalEngine(backbone, options, calibration)
