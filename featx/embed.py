"""Mapper stage: uint8 image batches -> pooled features, on CPU or CUDA."""

from __future__ import annotations

import copy
import hashlib
import json
import time

import numpy as np
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.nn.utils.fusion import fuse_conv_bn_eval

from featx.backbones import Backbone
from featx.cache import UntrustedCacheError, model_key
from featx.compiled import compiled_model
from featx.decode import ImageFiles, collate
from featx.devices import QUANTIZED, autocast, precision_name, resolve_device, resolve_precision
from featx.memory import keep_freed_memory
from featx.runtimes import (OnnxModel, calibration_batch, check_runtime, fastest_exact, onnxruntime_version,
                            resolve_runtime)
from featx.sources import Split


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 on ``mean``'s device: the same ops as ToTensor + Normalize. The ops keep
    the input's memory format, so channels_last batches (featx's reader) need no transposing copy."""
    x = images.to(mean.device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def channel_stats(transform, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A transform's mean and std as [1, 3, 1, 1] tensors on ``device``."""
    shape = (1, 3, 1, 1)
    return (torch.tensor(transform.mean, device=device).view(shape),
            torch.tensor(transform.std, device=device).view(shape))


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A copy of eval-mode ``model`` with every BatchNorm that follows a convolution folded into its weights and
    bias (one pass over the activations less per pair: MobileNetV2 ~1.3x on 2 CPU cores, ResNet-18 ~1.03x).
    Features move by float32 rounding only. Pairs inside plain ``nn.Sequential`` containers are folded directly;
    torch.fx traces the model only when BatchNorms remain (ResNets' blocks). A model torch.fx cannot trace keeps
    those unfolded."""
    folded = copy.deepcopy(model)
    for module in folded.modules():
        if type(module).forward is nn.Sequential.forward:  # runs its children in order, nothing else
            _fold_sequential_pairs(module)
    if not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()):
        return folded
    try:
        return fuse(folded, inplace=True)
    except Exception:  # symbolic tracing refuses data-dependent control flow; the rest runs unfolded
        return folded


def _fold_sequential_pairs(sequence: nn.Sequential) -> None:
    names = list(sequence._modules)
    for first, second in zip(names, names[1:]):
        conv, norm = sequence._modules[first], sequence._modules[second]
        if (type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and not norm.training
                and norm.running_mean is not None and norm.num_features == conv.out_channels):
            sequence._modules[first] = fuse_conv_bn_eval(conv, norm)
            sequence._modules[second] = nn.Identity()


class Embedder:
    """Runs a frozen backbone: normalises uint8 batches on the device, returns float32 features on the CPU.

    ``precision``: ``resolve_precision`` (``emulate`` lets a CPU without native bf16 run it anyway, to measure it);
    ``int8`` quantizes ONNX Runtime's graph on ``calibration`` (a ``Calibration``: the user's images, some to
    calibrate on, others to check the agreement on; ``self.int8_agreement``).
    ``runtime``: ``torch`` or ``onnxruntime`` (CPU, float32); ``auto`` is decided before (``choose_runtime``).
    ``forward_batch``: images per model call (batches are cut into such chunks); None is the whole batch.
    Each image's features do not depend on it.
    ``fold_batch_norm``: fold BatchNorms into the convolutions before them (``fold_batch_norms``), in float32
    torch runs (not under autocast).
    Sets ``featx.memory.keep_freed_memory`` for the process.
    """

    def __init__(self, backbone: Backbone, device: str = "auto", precision: str = "auto", channels_last: bool = True,
                 compile: bool = False, forward_batch: int | None = None, fold_batch_norm: bool = True,
                 runtime: str = "torch", emulate: bool = False,
                 calibration: Calibration | None = None):
        self.device = resolve_device(device)
        self.amp = resolve_precision(precision, self.device, emulate)
        keep_freed_memory()
        quantized = precision_name(precision, self.device.type) in QUANTIZED
        self.runtime = check_runtime(runtime, self.device, self.amp, compile, quantized)
        if quantized and calibration is None:
            raise ValueError("--precision int8 calibrates on your images: give calibration (a Calibration)")
        self.feature_dim = backbone.feature_dim
        self.name = backbone.name
        self.onnx = None
        if runtime == "onnxruntime":  # ONNX Runtime fuses the graph itself, from the model as it is
            self.onnx = OnnxModel(backbone.model, backbone.transform.crop, backbone.name, torch.get_num_threads(),
                                  calibration if quantized else None)
            channels_last = False  # it takes NCHW
        self.int8_agreement = self.onnx.int8_agreement if self.onnx else None
        self.channels_last = channels_last
        self.model = backbone.model.eval().to(self.device)
        if fold_batch_norm and self.amp is None and not self.onnx:  # folded weights lose more to bf16 (MobileNetV2:
            self.model = fold_batch_norms(self.model)  # min cosine to float32 0.982 vs 0.99+ unfolded)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward_batch = forward_batch  # None: whole batches
        self.compile = compile
        self.compiled = None  # made for the first chunk's size; smaller chunks are padded up to it
        self.compiled_size = 0
        self.mean, self.std = channel_stats(backbone.transform, self.device)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] (any device) -> normalised float32 on the model's device."""
        return normalise(images, self.mean, self.std, self.channels_last)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float32 [B, D] on the CPU."""
        if images.shape[0] == 0:
            return torch.empty(0, self.feature_dim)
        chunks = images.split(self.forward_batch or images.shape[0])
        return torch.cat([self._forward(chunk) for chunk in chunks])

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        count = images.shape[0]
        if self.onnx:
            return self.onnx(self.normalise(images)).flatten(1)
        if not self.compile:
            with autocast(self.device, self.amp):
                return self.model(self.normalise(images)).float().flatten(1).cpu()
        if count < self.compiled_size:
            images = torch.cat([images, images.new_zeros(self.compiled_size - count, *images.shape[1:])])
        inputs = self.normalise(images)
        if self.compiled is None or count > self.compiled_size:
            self.compiled, self.compiled_size = self._compile(inputs), count
        with autocast(self.device, self.amp):
            return self.compiled(inputs)[:count].float().flatten(1).cpu()

    def _compile(self, example: torch.Tensor):
        """CPU: a frozen AOTInductor package from the on-disk cache (``featx.compiled``). CUDA: torch.compile."""
        if self.device.type == "cpu" and self.amp is None:
            return compiled_model(self.model, example, self.name)
        return torch.compile(self.model, dynamic=False)


class Calibration:
    """What ``--precision int8`` is calibrated and checked on: a seeded sample of ``split``'s own images, its first
    half to calibrate on, the other half (never calibrated on) to measure the agreement on. ``key`` names the sample
    by its images' bytes and preprocessing, so a graph quantized on it, and the agreement measured then, are found
    again in the cache without decoding it all; ``images`` decodes and normalises a half."""

    def __init__(self, split: Split, backbone: Backbone, count: int = 64, seed: int = 0):
        self.split, self.transform = split.name, backbone.transform
        self.files = ImageFiles(split.root, split.paths, backbone.transform, members=split.members)
        self.items = np.random.default_rng(seed).permutation(len(self.files))[:count].tolist()

    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(self.transform.describe(), sort_keys=True).encode())
        for item in self.items:
            digest.update(self.files.content_hash(item).to_bytes(8, "little"))
        return digest.hexdigest()

    def images(self, held: bool, limit: int | None = None) -> torch.Tensor:
        """The half to calibrate on, or the ``held`` half, decoded and normalised (float32 NCHW); with ``limit``,
        only its first ``limit`` readable images."""
        middle = len(self.items) // 2
        decoded: list = []
        for item in self.items[middle:] if held else self.items[:middle]:
            decoded.append(self.files[item])
            if limit and sum(image is not None for _, image, _ in decoded) == limit:
                break
        images = collate(decoded).images
        if len(images) < (limit or 8):
            raise ValueError(f"--precision int8 calibrates on some of your images and checks it on others: split "
                             f"{self.split} has {len(images)} readable in the half it "
                             f"{'checks' if held else 'calibrates'} on, of the {limit or 8} it needs")
        mean, std = channel_stats(self.transform, torch.device("cpu"))
        return normalise(images, mean, std, channels_last=False).contiguous()


def resolve_mapper(backbone: Backbone, device: torch.device, precision: str = "auto", runtime: str = "auto",
                   batch_size: int = 64, compile: bool = False, channels_last: bool = True,
                   fold_batch_norm: bool = True) -> tuple[str, str]:
    """(precision, runtime) as ``backbone`` runs on ``device``: the precision checked there (one line where it
    cannot run) and named, the runtime decided (``choose_runtime``, remembered with extract's choices)."""
    amp = resolve_precision(precision, device)
    name = precision_name(precision, device.type)
    return name, choose_runtime(backbone, runtime, device, amp, compile, channels_last, fold_batch_norm, batch_size,
                                name in QUANTIZED)


def embedder_for(backbone: Backbone, device: str = "auto", precision: str = "auto", runtime: str = "auto",
                 batch_size: int = 64) -> Embedder:
    """An Embedder that runs ``backbone`` as extract does (``resolve_mapper``), on no split: not quantized."""
    if precision in QUANTIZED:
        raise ValueError(f"--precision {precision} is calibrated on a split's own images, so only extract takes it; "
                         "here use fp32 (a head fitted on int8 features takes float32 ones: they agree within the "
                         "min cosine recorded in its features file)")
    resolved = resolve_device(device)
    precision, runtime = resolve_mapper(backbone, resolved, precision, runtime, batch_size)
    return Embedder(backbone, str(resolved), precision, runtime=runtime)


def choose_runtime(backbone: Backbone, runtime: str, device: torch.device, amp: torch.dtype | None,
                   compile: bool = False, channels_last: bool = True, fold_batch_norm: bool = True,
                   batch_size: int = 64, quantized: bool = False) -> str:
    """The concrete runtime for ``backbone`` (``featx.runtimes.resolve_runtime``); for ``auto``, the candidates it
    measures when nothing is remembered (on a batch like extract's, at most 32): PyTorch as extract runs it, ONNX
    Runtime, and unfolded PyTorch float32 as the reference. The choice is remembered per model, batch, thread count,
    host and versions of torch and ONNX Runtime: a new version or thread count measures again."""
    batch = calibration_batch(backbone.transform.crop, min(batch_size, 32))
    versions = {"torch": torch.__version__, "onnxruntime": onnxruntime_version(), "threads": torch.get_num_threads()}

    def measure() -> dict:  # only when no choice is remembered: the export and three models cost seconds
        about = {"backbone": backbone.name, **versions, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        candidates = {"torch": Embedder(backbone, "cpu", "fp32", channels_last, fold_batch_norm=fold_batch_norm)}
        try:
            candidates["onnxruntime"] = Embedder(backbone, "cpu", "fp32", runtime="onnxruntime")
        except UntrustedCacheError:
            raise  # a graph someone else could have written is refused, never taken for a model ONNX cannot run
        except Exception as error:  # noqa: BLE001 - an exporter that cannot take the model: torch runs it
            why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
            print(f"onnxruntime cannot run {backbone.name} ({why}); torch runs it (remembered)", flush=True)
            return {"runtime": "torch", "measured": {}, "onnxruntime_failed": why, **about}
        reference = Embedder(backbone, "cpu", "fp32", channels_last=False, fold_batch_norm=False)
        return {**fastest_exact(candidates, reference, batch), **about}

    def key() -> str:
        return model_key(backbone.model, batch, "runtime", channels_last, fold_batch_norm, *versions.values())

    return resolve_runtime(runtime, device, amp, compile, key, measure, quantized)
