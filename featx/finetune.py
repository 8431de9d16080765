"""Stage 3: end-to-end fine-tuning with a new head (10x learning rate by default), and the baselines.

One loop, read top to bottom: build the model and its head, freeze what is asked, make parameter groups,
then per epoch train, evaluate, checkpoint. ``--resume`` restarts from the last finished epoch with the
optimiser, schedule and RNG state it had, so an interrupted run ends with the same steps and weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from featx import checkpoints, store
from featx.backbones import classifier_layer, classifier_layer_name, create_model, replace_classifier
from featx.data import READERS, AugmentTransform, ImageFiles, read_batches, sequential_batches
from featx.embed import autocast, channel_stats, normalise, resolve_amp, resolve_device
from featx.heads import holdout_split, load_head
from featx.inputs import Split, discover
from featx.memory import keep_freed_memory
from featx.metrics import classification_metrics, summary_line, write_metrics

HEAD_INITS = ("random", "probe", "reuse")
# Default (lr, head_lr_mult) per head_init: a head that already classifies (LP-FT, reused ImageNet rows) is wrecked
# by what a random head needs (SqueezeNet, reused rows, ants/bees val after one epoch: 0.9477 -> 0.4575 at lr 0.01
# x10, 0.8366 at 0.001 x10, 0.9412 at 1e-4 x1).
HEAD_INIT_DEFAULTS = {"random": (0.01, 10.0), "probe": (1e-4, 1.0), "reuse": (1e-4, 1.0)}
INITS = ("pretrained", "scratch")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "cosine")
RUN_FILE = "run.json"
RUN_OUTPUTS = (RUN_FILE, checkpoints.POINTER, checkpoints.FOLDER, "history.json", "curves.png", "metrics.json",
               "confusion.png")  # what --overwrite deletes: the run's own files, nothing else in its folder


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
    source: str = "auto"  # how to read DATA: featx.inputs.SOURCES
    seed: int = 0

    def __post_init__(self):
        lr, head_lr_mult = HEAD_INIT_DEFAULTS.get(self.head_init, HEAD_INIT_DEFAULTS["random"])
        if self.lr is None:
            object.__setattr__(self, "lr", lr)
        if self.head_lr_mult is None:
            object.__setattr__(self, "head_lr_mult", head_lr_mult)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, got {self.val_fraction!r}")
        choices = {"init": INITS, "head_init": HEAD_INITS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
                   "reader": READERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "step_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("lr", "head_lr_mult", "gamma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.head_init == "probe" and not self.probe:
            raise ValueError("head_init=probe needs --probe HEAD_FOLDER (from `featx fit-head`)")
        if self.init == "scratch" and self.head_init != "random":
            raise ValueError(f"head_init={self.head_init} needs pretrained weights; use init=pretrained")


# --- model ----------------------------------------------------------------------------------------------
def imagenet_rows(class_names: list[str], categories: tuple[str, ...], spec: str) -> dict[int, int]:
    """Class index -> ImageNet row, from ``"name=index,..."`` or by matching names (plural 's' ignored)."""
    if spec != "auto":
        pairs = dict(item.split("=") for item in spec.split(",") if item)
        unknown = sorted(set(pairs) - set(class_names))
        if unknown:
            raise ValueError(f"--reuse names classes {unknown} that the data does not have ({class_names})")
        return {class_names.index(name): int(index) for name, index in pairs.items()}

    def key(name: str) -> str:
        return name.lower().replace("_", " ").replace("-", " ").strip().removesuffix("s")

    lookup = {key(name): row for row, name in enumerate(categories)}
    return {c: lookup[key(name)] for c, name in enumerate(class_names) if key(name) in lookup}


def init_head(model: nn.Module, cfg: FinetuneConfig, class_names: list[str], categories: tuple[str, ...],
              source_sha256: str, trust_pickle: bool = False) -> dict:
    """Replace the classifier by one sized to the classes and initialise it as ``cfg.head_init`` says."""
    old = classifier_layer(model, cfg.backbone)
    old_weight, old_bias = old.weight.detach().clone(), old.bias.detach().clone()
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
    splits = {s.name: s for s in discover(data, cfg.source)}
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


# --- run ------------------------------------------------------------------------------------------------
class Run:
    """One fine-tuning run in a folder: model, optimiser, schedule, history, checkpoints. Sets
    ``featx.memory.keep_freed_memory`` for the process."""

    def __init__(self, data: str | os.PathLike, out: str | os.PathLike, cfg: FinetuneConfig,
                 mirror: str | None = None, trust_pickle: bool = False):
        self.cfg, self.out = cfg, Path(out)
        self.train, self.val = training_splits(data, cfg)
        torch.manual_seed(cfg.seed)
        keep_freed_memory()
        weights = "none" if cfg.init == "scratch" else cfg.weights
        self.model, self.weights, preset = create_model(cfg.backbone, weights, mirror)
        self.transform = replace(preset, resize=cfg.resize or preset.resize, crop=cfg.crop or preset.crop)
        self.class_names = list(self.train.class_names)
        self.head_report = init_head(self.model, cfg, self.class_names, self.weights.categories,
                                     self.weights.sha256, trust_pickle)
        self.frozen = freeze(self.model, cfg.backbone, cfg.freeze)
        self.device = resolve_device(cfg.device)
        self.amp = resolve_amp(cfg.amp, self.device)
        self.channels_last = self.device.type == "cpu" if cfg.channels_last is None else cfg.channels_last
        self.model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.mean, self.std = channel_stats(self.transform, self.device)
        self.optimizer = make_optimizer(param_groups(self.model, cfg.backbone, cfg), cfg)
        self.steps_per_epoch = math.ceil(len(self.train) / cfg.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(enabled=self.amp == torch.float16)
        self.epoch, self.step, self.best_accuracy, self.history = 0, 0, -1.0, []

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        return normalise(images, self.mean, self.std, self.channels_last)

    def train_epoch(self) -> dict:
        cfg, epoch = self.cfg, self.epoch + 1
        augment = AugmentTransform(self.transform.crop, interpolation=self.transform.interpolation,
                                   seed=cfg.seed * 10_007 + epoch)
        batches = epoch_batches(len(self.train), cfg.batch_size, cfg.seed, epoch)
        set_train_mode(self.model)
        loss_sum, correct, seen, start = 0.0, 0, 0, time.perf_counter()
        data = ImageFiles(self.train.root, self.train.paths, self.transform, 1, augment, members=self.train.members)
        reader = read_batches(data, batches, cfg.workers, self.device, cfg.reader)
        for batch in tqdm(reader, desc=f"epoch {epoch}", unit="batch", leave=False, mininterval=1.0):
            labels = torch.from_numpy(self.train.labels[batch.indices.numpy()]).to(self.device)
            with autocast(self.device, self.amp):
                logits = self.model(self.inputs(batch.images))
                loss = nn.functional.cross_entropy(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
        seconds = time.perf_counter() - start
        return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                "train_examples_per_second": seen / seconds, "train_seconds": seconds}

    @torch.inference_mode()
    def predict(self, split: Split) -> tuple[np.ndarray, np.ndarray, float]:
        """Logits and labels of every decodable image of ``split``; and examples/s."""
        self.model.eval()
        logits, labels, start = [], [], time.perf_counter()
        data = ImageFiles(split.root, split.paths, self.transform, members=split.members)
        batches = sequential_batches(len(split), self.cfg.batch_size * 2)
        for batch in read_batches(data, batches, self.cfg.workers, self.device, self.cfg.reader):
            with autocast(self.device, self.amp):
                logits.append(self.model(self.inputs(batch.images)).float().cpu())
            labels.append(split.labels[batch.indices.numpy()])
        seconds = time.perf_counter() - start
        return torch.cat(logits).numpy(), np.concatenate(labels), sum(map(len, labels)) / seconds

    def evaluate(self) -> dict:
        logits, labels, rate = self.predict(self.val)
        loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
        return {"val_loss": loss, "val_accuracy": float(np.mean(logits.argmax(1) == labels)),
                "eval_examples_per_second": rate}

    # --- checkpoints ------------------------------------------------------------------------------------
    def save(self, improved: bool) -> None:
        """Commit this epoch's checkpoint as one unit (``featx.checkpoints``)."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "epoch": self.epoch, "step": self.step, "best_accuracy": self.best_accuracy,
                 "rng": torch.get_rng_state(), "config": asdict(self.cfg)}
        checkpoints.commit(self.out, self.epoch, state, self.model.state_dict() if improved else None, self.history)

    def resume(self) -> bool:
        """Continue from the last committed epoch if there is one and it was made with the same recipe (``epochs``
        may grow: the schedule then runs to the new end)."""
        found = checkpoints.load(self.out)
        if found is None:
            return False
        state, history = found
        made_with = {**asdict(FinetuneConfig()), **state["config"], "epochs": self.cfg.epochs}  # fields added
        if made_with != asdict(self.cfg):  # since then: their defaults
            changed = sorted(k for k in made_with if made_with[k] != asdict(self.cfg).get(k))
            raise ValueError(f"{self.out} was made with a different recipe ({', '.join(changed)}); use another --out")
        if state["epoch"] > self.cfg.epochs:
            raise ValueError(f"{self.out} has already trained {state['epoch']} epochs; --epochs "
                             f"{self.cfg.epochs} cannot shorten it")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        self.epoch, self.step, self.best_accuracy, self.history = (state["epoch"], state["step"],
                                                                  state["best_accuracy"], history)
        return True

    def describe(self) -> dict:
        return {"kind": "finetune", "config": asdict(self.cfg), "backbone": self.cfg.backbone,
                "num_classes": len(self.class_names), "class_names": self.class_names,
                "transform": self.transform.describe(), "weights_source": self.weights.source,
                "weights_sha256": self.weights.sha256, "frozen_parameters": len(self.frozen),
                "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                **self.head_report}

    # --- the loop ---------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, overwrite: bool = False) -> dict:
        """Train to ``cfg.epochs``; returns the final metrics of the best-by-val model. A folder that holds a run
        is continued with ``resume``, replaced with ``overwrite``, and otherwise refused."""
        if (self.out / RUN_FILE).is_file() and not resume:
            if not overwrite:
                raise ValueError(f"{self.out} already holds a finetune run; pass --resume to continue it, "
                                 "--overwrite to replace it, or choose another --out")
            for path in (self.out / name for name in RUN_OUTPUTS):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        store.write_text(self.out / RUN_FILE, json.dumps(self.describe(), indent=1))
        if resume and self.resume():
            print(f"resuming from epoch {self.epoch} of {self.cfg.epochs} in {self.out}")
        else:
            if resume:
                print(f"nothing to resume in {self.out}; starting fresh")
            self.history = [{"epoch": 0, "steps": 0, **self.evaluate()}]  # before any training: a candidate too
            self.best_accuracy = self.history[0]["val_accuracy"]
            self.save(improved=True)
            print(f"epoch 0: val accuracy {self.best_accuracy:.4f} (before training)")
        start = time.perf_counter()
        while self.epoch < self.cfg.epochs:
            record = self.train_epoch()
            self.epoch += 1
            record = {"epoch": self.epoch, "steps": self.step, **record, **self.evaluate(),
                      "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups}}
            self.history.append(record)
            improved = record["val_accuracy"] > self.best_accuracy
            self.best_accuracy = max(self.best_accuracy, record["val_accuracy"])
            self.save(improved)
            print(f"epoch {self.epoch}: loss {record['train_loss']:.4f}, train acc {record['train_accuracy']:.4f}, "
                  f"val acc {record['val_accuracy']:.4f}, {record['train_examples_per_second']:.1f} train ex/s, "
                  f"{record['eval_examples_per_second']:.1f} eval ex/s")
        plot_history(self.history, self.out / "curves.png", f"{self.cfg.backbone} ({self.cfg.init}, "
                                                            f"head {self.cfg.head_init}, freeze {self.cfg.freeze})")
        self.model.load_state_dict(checkpoints.best_weights(self.out))
        logits, labels, _ = self.predict(self.val)
        metrics = classification_metrics(labels, logits, self.class_names)
        metrics.update(wall_seconds=time.perf_counter() - start, steps=self.step, split=self.val.name)
        write_metrics(metrics, self.out, f"fine-tuned {self.cfg.backbone}: accuracy {metrics['accuracy']:.3f}")
        print(f"best model on {self.val.name}: {summary_line(metrics)} -> {self.out}")
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


def load_finetuned(folder: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The best model of a finetune run (normalised images -> logits) and its ``run.json``."""
    folder = Path(folder)
    record = json.loads((folder / RUN_FILE).read_text())
    model = create_model(record["backbone"], "none")[0]
    replace_classifier(model, record["backbone"], record["num_classes"])
    model.load_state_dict(checkpoints.best_weights(folder))
    return model.eval(), record
