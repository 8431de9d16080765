"""Fine-tuning end to end with a new head (10x learning rate by default), and the baselines (frozen, scratch).

Read like torchvision's ``references/classification/train.py``: ``train_one_epoch`` and ``evaluate`` take a model
and batches; ``fit`` is the loop (train, evaluate, checkpoint per epoch) and takes the model, loaders and optimiser
it is given; ``prepare`` builds them from a recipe; ``finetune`` is the command. ``--resume`` restarts from the last
committed epoch (``featx.checkpoints``) with the optimiser, schedule and RNG state it had, so an interrupted run ends
with the same steps and weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from featx import checkpoints, storage, store
from featx.backbones import POOLS, classifier_layer, classifier_layer_name, create_model, replace_classifier
from featx.decode import READERS, AugmentTransform, EvalTransform, ImageFiles, read_batches, sequential_batches
from featx.devices import autocast, resolve_device, resolve_precision
from featx.embed import channel_stats, normalise
from featx.heads import holdout_split, load_head
from featx.memory import keep_freed_memory
from featx.metrics import SEEN_FILE, classification_metrics, not_held_out, save_seen, summary_line, write_metrics
from featx.sources import Split, discover, shown

HEAD_INITS = ("random", "probe", "reuse")
# Default (lr, head_lr_mult) per head_init: a head that already classifies (LP-FT, reused ImageNet rows) is wrecked
# by what a random head needs (SqueezeNet, reused rows, ants/bees val after one epoch: 0.9477 -> 0.4575 at lr 0.01
# x10, 0.8366 at 0.001 x10, 0.9412 at 1e-4 x1).
HEAD_INIT_DEFAULTS = {"random": (0.01, 10.0), "probe": (1e-4, 1.0), "reuse": (1e-4, 1.0)}
INITS = ("pretrained", "scratch")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "cosine")
AMPS = ("auto", "none", "bf16", "fp16")  # autocast in training: auto is bf16 on CUDA, none (float32) on CPU
RUN_FILE = "run.json"
FAILED_FILE = "failed.json"  # images of the run that could not be decoded, and why
TRAIN_FOLDER = "ray-train"  # Ray Train's own records of a run on --engine ray (its copies of the checkpoints)
# what --overwrite deletes: the run's own files, nothing else in its folder
RUN_OUTPUTS = (RUN_FILE, checkpoints.POINTER, checkpoints.FOLDER, "history.json", "curves.png", "metrics.json",
               "confusion.png", SEEN_FILE, FAILED_FILE, TRAIN_FOLDER)


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning recipe. Loss is the batch mean (d2l sums it: its lr 5e-5 at batch 128 is 6.4e-3 here)."""

    backbone: str = "resnet18"
    weights: str = "DEFAULT"
    init: str = "pretrained"  # or scratch: random backbone
    head_init: str = "random"  # random (Xavier), probe (a fit-head head: LP-FT), reuse (ImageNet rows)
    probe: str | None = None  # head folder for head_init=probe
    reuse: str = "auto"  # for head_init=reuse: "ants=310,bees=309", or auto (match ImageNet class names)
    freeze: str = "none"  # none, backbone, or a module name: it and everything before it are frozen
    pool: str = "default"  # how timm: and hf: ViTs pool (featx.backbones.POOLS)
    epochs: int = 5
    batch_size: int = 32
    lr: float | None = None  # None: 0.01 for a random head; 1e-4 for a head that starts good (probe, reuse)
    head_lr_mult: float | None = None  # None: 10 for a random head, 1 for probe and reuse
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    step_size: int = 7  # StepLR period in epochs
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    resize: int | None = None  # default: the weights' eval preset
    crop: int | None = None
    workers: int | None = None
    reader: str = "auto"  # decode threads taking turns with the model on CPU, DataLoader processes with a GPU
    device: str = "auto"
    amp: str = "auto"
    # None: on for CPU (a measured win), off on CUDA (H100: MobileNetV2's bf16 training ran 5x slower with it)
    channels_last: bool | None = None
    val_fraction: float = 0.2  # held out of train (stratified, by seed) when the data has no val/ or test/ split
    source: str = "auto"  # how to read DATA: featx.sources.SOURCES
    label_key: str = "label"  # the manifest column, tar JSON key, or txt (tar captions) holding the label
    path_key: str = "path"  # the manifest column holding the image paths
    seed: int = 0
    sync_bn: bool = False  # --engine ray: BatchNorm statistics over the global batch (default: per worker)

    def __post_init__(self):
        self._check_types()
        lr, head_lr_mult = HEAD_INIT_DEFAULTS.get(self.head_init, HEAD_INIT_DEFAULTS["random"])
        if self.lr is None:
            object.__setattr__(self, "lr", lr)
        if self.head_lr_mult is None:
            object.__setattr__(self, "head_lr_mult", head_lr_mult)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, got {self.val_fraction!r}")
        choices = {"init": INITS, "head_init": HEAD_INITS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
                   "reader": READERS, "pool": POOLS, "amp": AMPS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "step_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("lr", "head_lr_mult", "gamma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("momentum", "weight_decay", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be zero or more, got {getattr(self, name)!r}")
        if self.head_init == "probe" and not self.probe:
            raise ValueError("head_init=probe needs --probe HEAD_FOLDER (from `featx fit-head`)")
        if self.init == "scratch" and self.head_init != "random":
            raise ValueError(f"head_init={self.head_init} needs pretrained weights; use init=pretrained")


    def _check_types(self) -> None:
        """Numbers where numbers go (a flag's value may arrive as any text): one error naming the field."""
        for name, spec in self.__dataclass_fields__.items():
            value, kinds = getattr(self, name), str(spec.type)
            optional = "None" in kinds and value is None
            if "float" in kinds and not optional and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if kinds.startswith("int") and not optional and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name, least in (("workers", 0), ("resize", 1), ("crop", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")


# --- model ----------------------------------------------------------------------------------------------
def imagenet_rows(class_names: list[str], categories: tuple[str, ...], spec: str) -> dict[int, int]:
    """Class index -> ImageNet row, from ``"name=index,..."`` or by matching names (plural 's' ignored)."""
    if spec != "auto":
        pairs = dict(item.partition("=")[::2] for item in str(spec).split(",") if item)
        unknown = sorted(set(pairs) - set(class_names))
        if unknown:
            raise ValueError(f"--reuse names classes {unknown} that the data does not have ({class_names})")
        bad = [f"{name}={row}" for name, row in pairs.items() if not row.isdigit() or int(row) >= len(categories)]
        if bad:
            raise ValueError(f"--reuse {', '.join(bad)}: an ImageNet row is an integer from 0 to {len(categories) - 1}")
        return {class_names.index(name): int(index) for name, index in pairs.items()}

    def key(name: str) -> str:
        return name.lower().replace("_", " ").replace("-", " ").strip().removesuffix("s")

    lookup = {key(name): row for row, name in enumerate(categories)}
    return {c: lookup[key(name)] for c, name in enumerate(class_names) if key(name) in lookup}


def init_head(model: nn.Module, cfg: FinetuneConfig, class_names: list[str], categories: tuple[str, ...],
              source_sha256: str, trust_pickle: bool = False) -> dict:
    """Replace the classifier by one sized to the classes and initialise it as ``cfg.head_init`` says."""
    old = classifier_layer(model, cfg.backbone)
    old_weight, old_bias = (old.weight.detach().clone(), old.bias.detach().clone()) if categories else (None, None)
    head = replace_classifier(model, cfg.backbone, len(class_names))
    nn.init.xavier_uniform_(head.weight)
    nn.init.zeros_(head.bias)
    report: dict = {"head_init": cfg.head_init}
    with torch.no_grad():
        if cfg.head_init == "reuse":
            if not categories:
                raise ValueError(f"weights {cfg.weights} have no ImageNet classifier to reuse rows from")
            rows = imagenet_rows(class_names, categories, cfg.reuse)
            if not rows:
                raise ValueError(f"no class of {class_names} matches an ImageNet class; give --reuse name=index,...")
            for c, row in rows.items():
                head.weight[c] = old_weight[row]
                head.bias[c] = old_bias[row]
            report["reused_rows"] = {class_names[c]: row for c, row in rows.items()}
        elif cfg.head_init == "probe":
            probe = load_head(cfg.probe, trust_pickle)
            source = probe.source_
            if source["backbone"] != cfg.backbone or source["weights_sha256"] != source_sha256 or \
                    source["class_names"] != class_names:
                raise ValueError(f"probe head {cfg.probe} was fitted on {source['backbone']} features of classes "
                                 f"{source['class_names']}; it cannot start {cfg.backbone} on {class_names}")
            linear = probe.to_torch()
            linear = getattr(linear, "linear", linear)
            head.weight.copy_(linear.weight.view_as(head.weight))
            head.bias.copy_(linear.bias)
            report["probe"] = str(cfg.probe)
    return report


def freeze(model: nn.Module, backbone: str, spec: str) -> list[str]:
    """Set ``requires_grad=False`` on the frozen parameters; returns their names.

    ``backbone`` freezes all but the classifier; a module name (``layer2``, ``features.6``) freezes it and
    every parameter registered before it.
    """
    head_prefix = classifier_layer_name(model, backbone) + "."
    names = [name for name, _ in model.named_parameters()]
    if spec == "none":
        frozen = []
    elif spec == "backbone":
        frozen = [n for n in names if not n.startswith(head_prefix)]
    else:
        inside = [i for i, n in enumerate(names) if n.startswith(spec + ".")]
        if not inside or names[inside[-1]].startswith(head_prefix):
            stages = ", ".join(n for n, _ in model.named_children())
            raise ValueError(f"--freeze {spec!r} is not a module of {backbone} before its classifier "
                             f"(top-level modules: {stages}); or use none / backbone")
        frozen = names[:inside[-1] + 1]
    parameters = dict(model.named_parameters())
    for name in frozen:
        parameters[name].requires_grad_(False)
    return frozen


def param_groups(model: nn.Module, backbone: str, cfg: FinetuneConfig) -> list[dict]:
    """Trainable parameters in two groups: backbone at ``lr``, head at ``lr * head_lr_mult``."""
    head_prefix = classifier_layer_name(model, backbone) + "."
    body, head = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (head if name.startswith(head_prefix) else body).append(parameter)
    groups = [{"params": head, "lr": cfg.lr * cfg.head_lr_mult, "name": "head"}]
    return ([{"params": body, "lr": cfg.lr, "name": "backbone"}] if body else []) + groups


def make_optimizer(groups: list[dict], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(cfg: FinetuneConfig, steps_per_epoch: int):
    """Per-step multiplier of every group's base lr: constant, StepLR in epochs, or warm-up + cosine."""
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "step":
            return cfg.gamma ** (step // steps_per_epoch // cfg.step_size)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        return 1.0

    return factor


def set_train_mode(model: nn.Module) -> None:
    """Train mode, except BatchNorm layers whose parameters are frozen: they keep their running statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()):
            module.eval()


# --- data -----------------------------------------------------------------------------------------------
def training_splits(data: str | os.PathLike, cfg: FinetuneConfig) -> tuple[Split, Split]:
    """(train, val): the data's train/ (or its one split) and val/ (valid/, validation/, test/); without a
    validation split, a stratified ``cfg.val_fraction`` of train, the same for the same seed."""
    splits = {s.name: s for s in discover(data, cfg.source, label_key=cfg.label_key, path_key=cfg.path_key)}
    if not next(iter(splits.values())).labelled:
        raise ValueError(f"{data} has no labels (no class folders or label column): fine-tuning needs them; give "
                         "class folders or a manifest with a label column")
    train = splits.get("train", splits.get("all"))
    if train is None:
        raise ValueError(f"{data} has no train/ split to fine-tune on (its splits: {', '.join(splits)})")
    val = next((splits[n] for n in ("val", "valid", "validation", "test") if n in splits), None)
    if val is not None:
        return train, val
    held = holdout_split(train.labels, np.arange(len(train)), cfg.val_fraction, cfg.seed)
    print(f"{data} has no val/ split: holding out {int(held.sum())} of {len(train)} training images "
          f"(--val_fraction {cfg.val_fraction})")
    return train.subset(~held, "train"), train.subset(held, "val")



def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch, a function of (seed, epoch) alone."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 10_007 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, num_items, batch_size)]


# --- the loop -------------------------------------------------------------------------------------------
class Workers:
    """Who trains: this process alone. ``featx.ray_training.DDPWorkers`` is one of several DDP workers instead; the
    loop below is the same for both, and asks this object only where they differ: each worker's part of a batch,
    the whole validation split's predictions, the totals of the training statistics, who writes the checkpoint
    (the chief), and where it is reported."""

    rank, world, chief = 0, 1, True

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as the training step runs it (DDP among workers)."""
        return model

    def gather(self, logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every worker's validation predictions, joined."""
        return logits, labels

    def total(self, values: list[float]) -> list[float]:
        """Sums over the workers."""
        return values

    def next_batch(self, rows: int) -> None:
        """The next training batch is a part of one of ``rows`` images (the global batch)."""

    def chiefs_buffers(self, model: nn.Module) -> None:
        """Every worker holds the chief's buffers (BatchNorm's running statistics), so that validation scores the
        model the chief saves."""

    def committed(self, record: dict, folder: Path) -> None:
        """An epoch's checkpoint ``folder`` is committed with ``record``'s metrics."""


LOCAL = Workers()


class ImageLoaders:
    """The batches a run trains and evaluates on, as (normalised inputs, labels) on the device. An epoch's order and
    augmentation are a function of (seed, epoch) alone, so a resumed run sees the batches it would have seen."""

    def __init__(self, train: Split, val: Split, transform: EvalTransform, cfg: FinetuneConfig,
                 device: torch.device, channels_last: bool):
        self.train_split, self.val_split, self.transform, self.cfg = train, val, transform, cfg
        self.device, self.channels_last = device, channels_last
        self.workers = LOCAL  # whose part of each batch to read (a training engine sets its own)
        self.mean, self.std = channel_stats(transform, device)
        self.failed: dict[str, str] = {}  # path -> why it could not be decoded

    def train(self, epoch: int):
        """Epoch ``epoch``'s shuffled, augmented training batches."""
        cfg = self.cfg
        augment = AugmentTransform(self.transform.crop, interpolation=self.transform.interpolation,
                                   seed=cfg.seed * 10_007 + epoch)
        batches = self._whole(epoch_batches(len(self.train_split), cfg.batch_size, cfg.seed, epoch))
        return Batches(self._batches(self.train_split, self._parts(batches), augment, [len(b) for b in batches]),
                       len(batches))

    def val(self):
        """The validation batches, in order, with the eval transform (this worker's part of each)."""
        return self._batches(self.val_split,
                             self._parts(self._whole(sequential_batches(len(self.val_split), self.cfg.batch_size * 2))))

    def _whole(self, batches: list[list[int]]) -> list[list[int]]:
        """The batches every worker takes a part of: a last batch smaller than the number of workers is left out,
        so that every worker takes the same number of steps."""
        return [batch for batch in batches if len(batch) >= self.workers.world]

    def _parts(self, batches: list[list[int]]) -> list[list[int]]:
        """This worker's part of each batch: every ``world``-th image from its ``rank``."""
        return [batch[self.workers.rank::self.workers.world] for batch in batches]

    def content_hashes(self) -> np.ndarray:
        """The content hashes of every training and validation image: what the run sees in fitting or selection."""
        files = [ImageFiles(split.root, split.paths, self.transform, members=split.members)
                 for split in (self.train_split, self.val_split)]
        return np.asarray([data.content_hash(i) for data in files for i in range(len(data))], np.uint64)

    def _batches(self, split: Split, batches: list[list[int]], augment: AugmentTransform | None = None,
                 rows: list[int] | None = None):
        """(inputs, labels) of each batch; ``rows``: training, the global batches' sizes (``Workers.next_batch``)."""
        data = ImageFiles(split.root, split.paths, self.transform, 1, augment, members=split.members)
        for number, batch in enumerate(read_batches(data, batches, self.cfg.workers, self.device, self.cfg.reader)):
            if rows:
                self.workers.next_batch(rows[number])
            self.failed.update((split.paths[index], reason) for index, reason in batch.failed)
            if not len(batch.indices):  # every image of the batch failed: nothing to train or score on
                continue
            labels = torch.from_numpy(split.labels[batch.indices.numpy()]).to(self.device)
            yield normalise(batch.images, self.mean, self.std, self.channels_last), labels


class Batches:
    """An epoch's batches, iterated once, with their count (the progress bar's total)."""

    def __init__(self, batches, count: int):
        self.batches, self.count = batches, count

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return self.count


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                    loader, amp: torch.dtype | None, description: str = "train") -> dict:
    """One pass over ``loader`` ((inputs, labels) batches): a step of ``optimizer`` and ``scheduler`` per batch.
    Returns the mean loss, accuracy, speed and the number of steps."""
    set_train_mode(model)
    loss_sum, correct, seen, steps, start = 0.0, 0, 0, 0, time.perf_counter()
    for inputs, labels in tqdm(loader, desc=description, unit="batch", leave=False, mininterval=1.0):
        with autocast(inputs.device, amp):
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        steps += 1
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "train_examples_per_second": seen / seconds, "train_seconds": seconds, "steps": steps, "examples": seen}


@torch.inference_mode()
def predict(model: nn.Module, loader, amp: torch.dtype | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Logits and labels of every batch of ``loader``, in eval mode; and examples/s."""
    model.eval()
    logits, labels, start = [], [], time.perf_counter()
    for inputs, batch_labels in loader:
        with autocast(inputs.device, amp):
            logits.append(model(inputs).float().cpu())
        labels.append(batch_labels.cpu().numpy())
    seconds = time.perf_counter() - start
    if not logits:
        raise ValueError("no image of the validation split could be decoded")
    return torch.cat(logits).numpy(), np.concatenate(labels), sum(map(len, labels)) / seconds


def evaluate(model: nn.Module, loader, amp: torch.dtype | None, workers: Workers = LOCAL) -> dict:
    """Validation loss, accuracy and examples/s of ``model`` on ``loader`` (every worker's part of it)."""
    logits, labels, rate = predict(model, loader, amp)
    logits, labels = workers.gather(logits, labels)
    loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    return {"val_loss": loss, "val_accuracy": float(np.mean(logits.argmax(1) == labels)),
            "eval_examples_per_second": rate}


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
        loaders: ImageLoaders, epochs: int, amp: torch.dtype | None, out: Path, config: dict,
        progress: checkpoints.Progress, workers: Workers = LOCAL) -> checkpoints.Progress:
    """Train from ``progress`` to ``epochs``: after each epoch, evaluate and commit a checkpoint to ``out`` (the
    chief worker writes it). A fresh run (no history) first scores the untrained model: epoch 0 is a candidate for
    the best model too."""
    trained_model = workers.wrap(model)
    if not progress.history:
        progress.history = [{"epoch": 0, "steps": 0, **evaluate(model, loaders.val(), amp, workers)}]
        progress.best_accuracy = progress.history[0]["val_accuracy"]
        _commit(out, progress, model, optimizer, scheduler, scaler, config, True, workers)
    while progress.epoch < epochs:
        trained = _totals(train_one_epoch(trained_model, optimizer, scheduler, scaler,
                                          loaders.train(progress.epoch + 1), amp, f"epoch {progress.epoch + 1}"),
                          workers)
        progress.epoch += 1
        progress.step += trained.pop("steps")
        workers.chiefs_buffers(model)
        scores = evaluate(model, loaders.val(), amp, workers)
        record = {"epoch": progress.epoch, "steps": progress.step, **trained, **scores,
                  "lr": {g["name"]: g["lr"] for g in optimizer.param_groups}}
        progress.history.append(record)
        improved = record["val_accuracy"] > progress.best_accuracy
        progress.best_accuracy = max(progress.best_accuracy, record["val_accuracy"])
        _commit(out, progress, model, optimizer, scheduler, scaler, config, improved, workers)
    return progress


def _totals(trained: dict, workers: Workers) -> dict:
    """One epoch's training statistics over every worker: losses and accuracies weighted by examples."""
    examples = trained.pop("examples")
    loss, correct, examples = workers.total([trained["train_loss"] * examples, trained["train_accuracy"] * examples,
                                             float(examples)])
    return {**trained, "train_loss": loss / max(examples, 1), "train_accuracy": correct / max(examples, 1),
            "train_examples_per_second": examples / trained["train_seconds"]}


def _commit(out: Path, progress: checkpoints.Progress, model, optimizer, scheduler, scaler, config: dict,
            improved: bool, workers: Workers) -> None:
    """The chief commits the epoch's checkpoint and says so; every worker reports it."""
    folder = checkpoints.save(out, progress, model, optimizer, scheduler, scaler, config, improved) \
        if workers.chief else None
    record = progress.history[-1]
    if workers.chief and progress.epoch == 0:
        print(f"epoch 0: val accuracy {progress.best_accuracy:.4f} (before training)")
    elif workers.chief:
        print(f"epoch {progress.epoch}: loss {record['train_loss']:.4f}, train acc {record['train_accuracy']:.4f}, "
              f"val acc {record['val_accuracy']:.4f}, {record['train_examples_per_second']:.1f} train ex/s, "
              f"{record['eval_examples_per_second']:.1f} eval ex/s")
    workers.committed(record, folder)


# --- the command ----------------------------------------------------------------------------------------
@dataclass
class Training:
    """What a recipe builds for ``fit``: the model with its new head, optimiser, schedule, scaler and loaders, and
    the run's description (``run.json``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loaders: ImageLoaders
    amp: torch.dtype | None
    class_names: list[str]
    record: dict


def prepare(data: str | os.PathLike, cfg: FinetuneConfig, mirror: str | None = None,
            trust_pickle: bool = False) -> Training:
    """Build everything ``cfg`` asks for on ``data``. Sets ``featx.memory.keep_freed_memory`` for the process."""
    train, val = training_splits(data, cfg)
    torch.manual_seed(cfg.seed)
    keep_freed_memory()
    model, weights, preset = create_model(cfg.backbone, "none" if cfg.init == "scratch" else cfg.weights, mirror,
                                          cfg.pool)
    transform = replace(preset, resize=cfg.resize or preset.resize, crop=cfg.crop or preset.crop)
    class_names = list(train.class_names)
    head_report = init_head(model, cfg, class_names, weights.categories, weights.sha256, trust_pickle)
    frozen = freeze(model, cfg.backbone, cfg.freeze)
    device = resolve_device(cfg.device)
    amp = resolve_precision({"none": "fp32"}.get(cfg.amp, cfg.amp), device, emulate=True)  # asked for: trained so
    channels_last = device.type == "cpu" if cfg.channels_last is None else cfg.channels_last
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    loaders = ImageLoaders(train, val, transform, cfg, device, channels_last)
    optimizer = make_optimizer(param_groups(model, cfg.backbone, cfg), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, math.ceil(len(train) / cfg.batch_size)))
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
    record = {"kind": "finetune", "config": asdict(cfg), "backbone": cfg.backbone, "num_classes": len(class_names),
              "class_names": class_names, "transform": transform.describe(), "weights_source": weights.source,
              "weights_sha256": weights.sha256, "frozen_parameters": len(frozen),
              "data": {"root": storage.absolute(data), "train": train.fingerprint(), "val": val.fingerprint()},
              "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad), **head_report}
    return Training(model, optimizer, scheduler, scaler, loaders, amp, class_names, record)


def resumable(out: Path, cfg: FinetuneConfig):
    """The check a checkpoint's state must pass to be resumed with ``cfg``: the same recipe (``epochs`` may grow: the
    schedule then runs to the new end; fields added to the recipe since it was written take their defaults)."""
    def check(state: dict) -> None:
        made_with = {**asdict(FinetuneConfig()), **state["config"], "epochs": cfg.epochs}
        if made_with != asdict(cfg):
            changed = sorted(k for k in made_with if made_with[k] != asdict(cfg).get(k))
            raise ValueError(f"{out} was made with a different recipe ({', '.join(changed)}); use another --out")
        if state["epoch"] > cfg.epochs:
            raise ValueError(f"{out} has already trained {state['epoch']} epochs; --epochs {cfg.epochs} cannot "
                             "shorten it")
    return check


def same_data(out: Path, data: dict) -> None:
    """Refuse to resume a run on other images: its best epoch would compare scores taken on different val sets."""
    try:
        made_on = json.loads((out / RUN_FILE).read_text()).get("data")
    except (OSError, ValueError):
        return  # no run to resume: it starts fresh
    if made_on and {k: made_on.get(k) for k in ("train", "val")} != {k: data[k] for k in ("train", "val")}:
        which = " and ".join(k for k in ("train", "val") if made_on.get(k) != data[k])
        raise ValueError(f"{out} was trained on other images ({which} differ from {data['root']}'s; it used "
                         f"{made_on.get('root')}); resume it on the same DATA, or choose another --out")


class LocalEngine:
    """The training engine that runs ``fit`` in this process. Another engine (``featx.ray_training.RayEngine``) has
    the same two methods."""

    name = "local"

    def check(self, training: Training, cfg: FinetuneConfig) -> None:
        """Refuse, before the run folder is touched, what this engine cannot run."""

    def fit(self, data, out: Path, training: Training, cfg: FinetuneConfig, progress: checkpoints.Progress,
            mirror: str | None, trust_pickle: bool) -> checkpoints.Progress:
        """Train ``training`` from ``progress`` to ``cfg.epochs``, committing each epoch into ``out``."""
        return fit(training.model, training.optimizer, training.scheduler, training.scaler, training.loaders,
                   cfg.epochs, training.amp, out, asdict(cfg), progress)


def finetune(data: str | os.PathLike, out: str | os.PathLike, cfg: FinetuneConfig, mirror: str | None = None,
             trust_pickle: bool = False, resume: bool = False, overwrite: bool = False,
             engine: LocalEngine = LocalEngine()) -> dict:
    """``featx finetune``: train ``cfg``'s recipe on ``data`` into the run folder ``out``; returns the metrics of the
    best-by-val model. A folder that holds a run is continued with ``resume``, replaced with ``overwrite``, and
    otherwise refused. ``engine`` runs the training: this process (``LocalEngine``), or DDP workers on Ray Train
    (``featx.ray_training.RayEngine``)."""
    out = Path(out)
    training = prepare(data, cfg, mirror, trust_pickle)
    engine.check(training, cfg)
    with store.exclusive(out):  # a second finetune into this folder, on either engine, stops at once
        return _train_in(out, training, cfg, resume, overwrite,
                         lambda progress: engine.fit(data, out, training, cfg, progress, mirror, trust_pickle))


def _train_in(out: Path, training: Training, cfg: FinetuneConfig, resume: bool, overwrite: bool,
              run_fit) -> dict:
    """``finetune``'s body, with the run folder locked; ``run_fit(progress)`` trains. A refused command changes
    nothing in the folder."""
    model, optimizer, scheduler, scaler = training.model, training.optimizer, training.scheduler, training.scaler
    if resume:
        same_data(out, training.record["data"])
    progress = checkpoints.restore(out, model, optimizer, scheduler, scaler, resumable(out, cfg)) if resume else None
    if (out / RUN_FILE).is_file() and not resume:
        if not overwrite:
            raise ValueError(f"{out} already holds a finetune run; pass --resume to continue it, "
                             "--overwrite to replace it, or choose another --out")
        for path in (out / name for name in RUN_OUTPUTS):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    with store.writing(out / RUN_FILE):
        store.write_text(out / RUN_FILE, json.dumps(training.record, indent=1))
        save_seen(out, training.loaders.content_hashes())
    if progress is not None:
        print(f"resuming from epoch {progress.epoch} of {cfg.epochs} in {out}")
    elif resume:
        print(f"nothing to resume in {out}; starting fresh")
    start = time.perf_counter()
    progress = run_fit(progress or checkpoints.Progress())
    plot_history(progress.history, out / "curves.png", f"{cfg.backbone} ({cfg.init}, head {cfg.head_init}, "
                                                         f"freeze {cfg.freeze})")
    model.load_state_dict(checkpoints.best_weights(out))
    logits, labels, _ = predict(model, training.loaders.val(), training.amp)
    metrics = classification_metrics(labels, logits, training.class_names)
    val = training.loaders.val_split
    metrics.update(wall_seconds=time.perf_counter() - start, steps=progress.step, split=val.name, held_out=False,
                   seen_in_fitting=len(val))  # val chose the best epoch
    write_metrics(metrics, out, f"fine-tuned {cfg.backbone}: accuracy {metrics['accuracy']:.3f}")
    failed = training.loaders.failed
    if failed:
        store.write_text(out / FAILED_FILE, json.dumps(sorted((shown(p), why) for p, why in failed.items()), indent=1))
        print(f"skipped {len(failed)} images that could not be decoded (listed in {out / FAILED_FILE})",
              file=sys.stderr)
    note = not_held_out(len(val), len(val), "to choose the best epoch")
    print(f"best model on {val.name}: {summary_line(metrics)} ({note}) -> {out}")
    return metrics


def plot_history(history: list[dict], path: Path, title: str) -> None:
    """Loss (train, val) and accuracy (train, val) per epoch, on two axes, with markers (one epoch shows)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone
    from matplotlib.ticker import MaxNLocator

    trained = [h for h in history if "train_loss" in h]
    figure = Figure(figsize=(9, 3.8))
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for axes, key in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.plot([h["epoch"] for h in trained], [h[f"train_{key}"] for h in trained], "-o", label=f"train {key}")
        axes.plot([h["epoch"] for h in history], [h[f"val_{key}"] for h in history], "--s", label=f"val {key}")
        axes.set_xlabel("epoch (0 = before training)")
        axes.set_ylabel(key)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def describe_run(folder: str | os.PathLike) -> str:
    """``featx info`` on a finetune run folder: its recipe, data, epochs done and the best model's score."""
    folder = Path(folder)
    record = json.loads((folder / RUN_FILE).read_text())
    cfg, done = record["config"], checkpoints.load(folder)
    lines = [f"{folder}: a finetune run of {record['backbone']} ({cfg['init']}, head {cfg['head_init']}, freeze "
             f"{cfg['freeze']}), {record['num_classes']} classes, {cfg['optimizer']} lr {cfg['lr']} (head x"
             f"{cfg['head_lr_mult']}), {cfg['schedule']} schedule, batch {cfg['batch_size']}",
             f"  data: {(record.get('data') or {}).get('root', '?')}",
             f"  epochs done: {done[0]['epoch'] if done else 0} of {cfg['epochs']}"]
    if (folder / "metrics.json").is_file():
        metrics = json.loads((folder / "metrics.json").read_text())
        lines.append(f"  best model on {metrics.get('split')}: {summary_line(metrics)} (val chose the best epoch)")
    return "\n".join(lines)


def load_finetuned(folder: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The best model of a finetune run (normalised images -> logits) and its ``run.json``."""
    folder = Path(folder)
    record = json.loads((folder / RUN_FILE).read_text())
    model = create_model(record["backbone"], "none", pool=record["config"].get("pool", "default"))[0]
    replace_classifier(model, record["backbone"], record["num_classes"])
    model.load_state_dict(checkpoints.best_weights(folder))
    return model.eval(), record
