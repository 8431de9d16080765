"""Engines (the distributor role): who runs which shards of a split. ``local`` runs them in this process; ``ray``
hands them to Ray actors, one per GPU or per N CPU cores, each loading the model once and writing whole shards
into the shared output folder. Both run ``featx.shards.write_shards``. A shard is the unit of work and of retry:
it becomes visible only by its atomic rename, so a retried shard never duplicates rows. The runner merges.

An engine has ``run(dataset, parts, shards, progress)`` and ``close()``; ``open_engine`` makes one by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from featx.backbones import Backbone, create_backbone
from featx.decode import ImageFiles
from featx.embed import Embedder
from featx.mirror import mirror_dir
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


class LocalEngine:
    """Runs shards in this process, one after another, with one model for the whole job."""

    def __init__(self, backbone: Backbone, options):
        self.embedder = Embedder(backbone, options.device, options.amp, options.channels_last, options.compile,
                                 options.forward_batch, options.fold_batch_norm)
        self.options = options

    def run(self, dataset: ImageFiles, parts: Path, shards: dict[int, list[list[int]]], progress=None) -> None:
        """Write ``shards`` (shard number -> batches of dataset items) into ``parts``."""
        write_shards(dataset, self.embedder, parts, shards, self.options, progress)

    def close(self) -> None:
        """Nothing to release: the model goes with the engine."""


class ShardWorker:
    """A Ray actor: builds the backbone once, then decodes, embeds and writes whole shards (a ``LocalEngine`` in the
    actor's process)."""

    def __init__(self, backbone_spec: dict, options, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.engine = LocalEngine(create_backbone(**backbone_spec), options)

    def ready(self) -> bool:
        return True

    def run_shard(self, dataset: ImageFiles, parts: str, number: int, batches: list[list[int]]) -> int:
        """Write shard ``number``; returns how many items it held."""
        self.engine.run(dataset, Path(parts), {number: batches})
        return sum(len(b) for b in batches)


def _connect(ray_options: RayOptions):
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_options.address, log_to_driver=False, logging_level="ERROR",
                 **({} if ray_options.address else {"include_dashboard": False}))
    return ray


def _placement(ray, ray_options: RayOptions, device: str) -> tuple[int, dict]:
    """(number of actors, the resources each asks for); asks for GPUs only where the cluster has them."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
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

    def __init__(self, backbone_spec: dict, options, ray_options: RayOptions):
        self.ray = _connect(ray_options)
        count, resources = _placement(self.ray, ray_options, options.device)
        self.worker = self.ray.remote(**resources, max_restarts=0, max_task_retries=0)(ShardWorker)
        device = "cuda" if "num_gpus" in resources else "cpu"
        worker_options = replace(options, device=device, workers=options.workers or ray_options.cpus_per_worker,
                                 reader="threads" if device == "cpu" else options.reader)
        self.arguments = (backbone_spec, worker_options, ray_options.cpus_per_worker)
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
        """Write ``shards`` (shard number -> batches of dataset items) into ``parts``."""
        ray, todo = self.ray, list(shards)
        attempts = {number: 0 for number in todo}
        dataset_ref = ray.put(dataset)
        running: dict = {}
        try:
            while todo or running:
                while todo and len(running) < self.count:
                    number, actor = todo.pop(0), self._actor()
                    attempts[number] += 1
                    running[actor.run_shard.remote(dataset_ref, str(parts), number, shards[number])] = (number, actor)
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


def backbone_spec(name: str, weights: str, mirror, transform) -> dict:
    """How a worker rebuilds the extractor: the arguments of ``create_backbone``, with a weights file made absolute
    (workers may start in another folder)."""
    weights = str(weights)
    if os.path.isfile(weights):
        weights = os.path.abspath(weights)
    root = mirror_dir(mirror)
    return {"name": name, "weights": weights, "mirror": str(root.resolve()) if root else None, "transform": transform}


def open_engine(name: str, backbone: Backbone, weights: str, mirror, options, ray_options: RayOptions = RayOptions()):
    """The engine ``name`` (``ENGINES``) for ``backbone`` (built from ``weights`` and ``mirror``); close it after."""
    if name == "ray":
        return RayEngine(backbone_spec(backbone.name, weights, mirror, backbone.transform), options, ray_options)
    return LocalEngine(backbone, options)
