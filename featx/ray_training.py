"""The Ray training engine: ``featx finetune --engine ray`` runs ``finetuning.fit``, the local loop itself, in N worker
processes with DDP (Ray Train's ``TorchTrainer``: gloo on CPUs, NCCL on GPUs). What differs from one process lives in
``DDPWorkers``: each worker's part of every batch (the global batch and its seeded order stay the local run's), the
validation predictions gathered from every worker, the chief writing each epoch's checkpoint into the run folder, and
every worker reporting it to Ray Train. A worker that dies restarts the group (``FailureConfig``): the workers resume
from the run folder's committed checkpoint, so no epoch counts twice.
"""

from __future__ import annotations

import functools
import os
import re
import types
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featx import checkpoints
from featx.engines import EngineError, RayOptions, connect
from featx.finetuning import TRAIN_FOLDER, FinetuneConfig, Training, Workers, fit, prepare, resumable
from featx.memory import one_arena_environment


# How Ray says a worker ran out of memory: its memory monitor's kill, the kernel's OOM killer, CUDA's or torch's
OUT_OF_MEMORY = re.compile(r"[^.;]{0,80}(running low on memory|memory pressure|OutOfMemoryError|out of memory|\bOOM\b)"
                           r"[^.;]{0,80}", re.IGNORECASE)


@dataclass(frozen=True)
class RayTrainOptions:
    """Where and how wide to train: ``address`` (None: a local Ray instance), ``workers`` DDP processes, each with
    ``cpus_per_worker`` cores and ``gpus_per_worker`` GPUs; a failed worker group restarts up to ``max_failures``
    times."""

    address: str | None = None
    workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    max_failures: int = 3

    def __post_init__(self):
        for name in ("workers", "cpus_per_worker", "gpus_per_worker", "max_failures"):
            value, least = getattr(self, name), 1 if name in ("workers", "cpus_per_worker") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"--ray_{name} must be an integer of at least {least}, got {value!r}")


class DDPWorkers(Workers):
    """One of ``world`` DDP workers of a Ray Train run (``finetuning.Workers``)."""

    def __init__(self, rank: int, world: int, sync_bn: bool):
        self.rank, self.world, self.chief, self.sync_bn = rank, world, rank == 0, sync_bn

    def wrap(self, model: nn.Module) -> nn.Module:
        drop_as_one_process(model, self)
        device = next(model.parameters()).device
        if self.sync_bn and device.type == "cuda":  # BatchNorm statistics over the global batch
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # (the modules are replaced in place)
        elif self.sync_bn:  # PyTorch's SyncBatchNorm runs on GPUs only
            warnings.filterwarnings("ignore", ".*all_reduce is deprecated", FutureWarning)  # its successor: no autograd
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.forward = types.MethodType(global_batch_norm, module)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def gather(self, logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, (logits, labels))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def total(self, values: list[float]) -> list[float]:
        summed = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(summed)
        return summed.tolist()

    def next_batch(self, rows: int) -> None:
        self.global_rows = rows

    def chiefs_buffers(self, model: nn.Module) -> None:  # with BatchNorm per worker, each has its own statistics
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)

    def committed(self, record: dict, folder: Path | None) -> None:
        from ray import train

        metrics = {key: value for key, value in record.items() if isinstance(value, (int, float))}
        train.report(metrics, checkpoint=train.Checkpoint.from_directory(str(folder)) if folder else None)


def drop_as_one_process(model: nn.Module, workers: DDPWorkers) -> None:
    """Every nn.Dropout of ``model`` draws the local run's masks (``global_dropout``), modules changed in place."""
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.forward = types.MethodType(functools.partial(global_dropout, workers), module)


def global_dropout(workers: DDPWorkers, self: nn.Dropout, inputs: torch.Tensor) -> torch.Tensor:
    """nn.Dropout's forward with this worker's rows of the mask one process draws for the whole global batch: every
    worker's generator is in the local run's state (seeded alike, one draw per call), and PyTorch's CPU dropout is
    ``input * empty_like(input).bernoulli_(1 - p) / (1 - p)``, so the masks are the local run's. Where the part is
    not the global batch's rows (an image failed to decode), plain dropout."""
    rows = getattr(workers, "global_rows", 0)
    if not self.training or not 0 < self.p < 1 or inputs.device.type != "cpu" or \
            len(range(workers.rank, rows, workers.world)) != len(inputs):
        return type(self).forward(self, inputs)
    noise = torch.empty((rows, *inputs.shape[1:]), dtype=inputs.dtype).bernoulli_(1 - self.p).div_(1 - self.p)
    return inputs * noise[workers.rank::workers.world]


def global_batch_norm(self: nn.modules.batchnorm._BatchNorm, inputs: torch.Tensor) -> torch.Tensor:
    """A BatchNorm layer's forward over the global batch of every worker, on CPUs (gloo): the per-channel sums and
    sums of squares are all-reduced with autograd, so the statistics and their gradients are the whole batch's, as
    one process computes them. Eval mode (and frozen layers) use the running statistics, as BatchNorm does."""
    if not self.training:
        return type(self).forward(self, inputs)
    from torch.distributed.nn.functional import all_reduce

    channels, dims = inputs.shape[1], [0, *range(2, inputs.dim())]
    count = torch.tensor([inputs.numel() / channels], dtype=inputs.dtype)
    sums = all_reduce(torch.cat([inputs.sum(dims), (inputs * inputs).sum(dims), count]))
    total = sums[-1]
    mean = sums[:channels] / total
    var = sums[channels:2 * channels] / total - mean * mean
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean, momentum)
            self.running_var.lerp_(var * total / (total - 1), momentum)  # unbiased, as BatchNorm keeps it
    shape = [1, channels] + [1] * (inputs.dim() - 2)
    out = (inputs - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out


def _train_worker(config: dict) -> None:
    """One worker's run: the recipe built as the driver built it (same seed, same weights), resumed from the run
    folder's committed checkpoint when there is one, then ``fit`` on its part of the batches."""
    from ray import train

    torch.set_num_threads(config["threads"])
    cfg, out = FinetuneConfig(**config["cfg"]), Path(config["out"])
    context = train.get_context()
    training = prepare(config["data"], cfg, config["mirror"], config["trust_pickle"])
    workers = DDPWorkers(context.get_world_rank(), context.get_world_size(), cfg.sync_bn)
    training.loaders.workers = workers
    progress = checkpoints.restore(out, training.model, training.optimizer, training.scheduler, training.scaler,
                                   resumable(out, cfg)) or checkpoints.Progress()
    fit(training.model, training.optimizer, training.scheduler, training.scaler, training.loaders, cfg.epochs,
        training.amp, out, asdict(cfg), progress, workers)


class RayEngine:
    """The training engine that runs ``fit`` on Ray Train's workers (``finetuning.finetune``'s ``engine``)."""

    name = "ray"

    def __init__(self, options: RayTrainOptions = RayTrainOptions()):
        self.options = options

    def check(self, training: Training, cfg: FinetuneConfig) -> None:
        """Refuse what cannot run (``check_request``), and record the engine in the run's ``run.json``."""
        check_request(cfg, self.options, len(training.loaders.train_split))
        training.record["engine"] = {"name": self.name, **asdict(self.options)}

    def fit(self, data, out: Path, training: Training, cfg: FinetuneConfig, progress: checkpoints.Progress,
            mirror: str | None, trust_pickle: bool) -> checkpoints.Progress:
        """Train on the workers, which resume from ``out`` themselves; then the run's committed progress."""
        train_on_ray(data, out, cfg, self.options, mirror, trust_pickle)
        return checkpoints.restore(out, training.model, training.optimizer, training.scheduler, training.scaler,
                                   resumable(out, cfg))


def check_request(cfg: FinetuneConfig, options: RayTrainOptions, train_images: int) -> None:
    """Refuse, before anything is written, what cannot run: more workers than a batch (or the ``train_images``)
    holds (each worker takes its part of every global batch), a cluster that does not answer, or one with fewer
    CPUs or GPUs than the workers ask for."""
    if options.workers > min(cfg.batch_size, train_images):
        raise ValueError(f"--ray_workers {options.workers} is more than a batch holds (--batch_size {cfg.batch_size}, "
                         f"{train_images} training images): each worker takes its part of every batch; use fewer "
                         "workers or a larger batch")
    ray = connect(RayOptions(options.address))
    resources = ray.cluster_resources()
    asked = {"CPU": options.workers * options.cpus_per_worker, "GPU": options.workers * options.gpus_per_worker}
    short = [f"{need} {kind}s ({options.workers} workers x {need // options.workers}) but the cluster has "
             f"{int(resources.get(kind, 0))}" for kind, need in asked.items() if need > resources.get(kind, 0)]
    if short:
        raise ValueError(f"--engine ray asks for {'; '.join(short)}; use fewer --ray_workers or a larger cluster")


def train_on_ray(data: str | os.PathLike, out: Path, cfg: FinetuneConfig, options: RayTrainOptions,
                 mirror: str | None = None, trust_pickle: bool = False) -> None:
    """Run ``cfg`` on ``options.workers`` Ray Train workers (``check_request`` passed) into the run folder ``out`` (a
    path every node sees), which ``finetune`` has prepared; returns once the last epoch is committed."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": options.cpus_per_worker, **({"GPU": options.gpus_per_worker} if options.gpus_per_worker
                                                     else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"data": os.fspath(data), "out": str(out.resolve()), "cfg": asdict(cfg), "mirror": mirror,
                           "trust_pickle": trust_pickle, "threads": options.cpus_per_worker},
        scaling_config=ScalingConfig(num_workers=options.workers, use_gpu=options.gpus_per_worker > 0,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=TRAIN_FOLDER, storage_path=str(out.resolve()),
                             worker_runtime_env={"env_vars": one_arena_environment()},  # fit runs in a thread
                             failure_config=FailureConfig(max_failures=options.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))
    try:
        trainer.fit()
    except Exception as error:  # noqa: BLE001 - Ray's errors carry a remote traceback: one line of it
        cause = " ".join(str(error).split())
        memory = OUT_OF_MEMORY.search(cause)
        if memory:
            raise EngineError(f"training on Ray failed: a worker ran out of memory (Ray: \"...{memory.group(0)}...\", "
                              f"{options.max_failures} restarts); use a smaller --batch_size, fewer --ray_workers per "
                              f"node or nodes with more memory; the epochs committed in {out} stay: rerun with "
                              "--resume") from None
        raise EngineError(f"training on Ray failed after {options.max_failures} restarts ({type(error).__name__}: "
                          f"{cause[-400:]}); the epochs committed in {out} stay: rerun with --resume") from None
