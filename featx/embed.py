"""Mapper stage: uint8 image batches -> pooled features, on CPU or CUDA."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.nn.utils.fusion import fuse_conv_bn_eval

from featx.backbones import Backbone
from featx.cache import model_key
from featx.compiled import compiled_model
from featx.memory import keep_freed_memory
from featx.runtimes import RUNTIMES, OnnxModel, calibration_batch, fastest_exact, onnxruntime_available, remembered

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes; "auto" picks


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` are taken as they are."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    return resolved


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())
    except OSError:
        return set()


def resolve_precision(precision: str, device: torch.device, emulate: bool = False) -> torch.dtype | None:
    """Autocast dtype (None: exact float32). ``auto``: bf16 on CUDA, float32 on CPU. On a CPU, bf16 needs native
    bf16 (AVX512_BF16 or AMX) and fp16 AMX-FP16: emulated, they are slower than float32, so they are refused
    unless ``emulate`` (to measure agreement on any host)."""
    precision = precision_name(precision, device.type)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    native = {"bf16": {"avx512_bf16", "amx_bf16"}, "fp16": {"amx_fp16", "avx512_fp16"}}.get(precision)
    if device.type == "cpu" and native and not native & cpu_flags() and not emulate:
        raise ValueError(f"--precision {precision} needs a CPU with native {precision} ({' or '.join(sorted(native))})"
                         f"; this one ({torch.backends.cpu.get_cpu_capability()}) would emulate it, slower than fp32: "
                         "leave --precision fp32 here, or run on CUDA")
    return PRECISIONS[precision]


def precision_name(precision: str, device_type: str) -> str:
    """What ``precision`` means on a ``device_type`` (cpu, cuda) device: ``auto`` is bf16 on CUDA, fp32 on CPU."""
    return ("bf16" if device_type == "cuda" else "fp32") if precision == "auto" else precision


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype``, or a no-op context when it is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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

    ``precision``: ``resolve_precision`` (``emulate`` lets a CPU without native bf16 run it anyway, to measure it).
    ``runtime``: ``torch``, ``onnxruntime`` (CPU, float32) or ``auto`` (``choose_runtime``: the faster exact one
    here); ``self.runtime`` is the one that runs.
    ``forward_batch``: images per model call (batches are cut into such chunks); None is the whole batch.
    Each image's features do not depend on it.
    ``fold_batch_norm``: fold BatchNorms into the convolutions before them (``fold_batch_norms``), in float32
    torch runs (not under autocast).
    Sets ``featx.memory.keep_freed_memory`` for the process.
    """

    def __init__(self, backbone: Backbone, device: str = "auto", precision: str = "auto", channels_last: bool = True,
                 compile: bool = False, forward_batch: int | None = None, fold_batch_norm: bool = True,
                 runtime: str = "torch", emulate: bool = False):
        self.device = resolve_device(device)
        self.amp = resolve_precision(precision, self.device, emulate)
        keep_freed_memory()
        if runtime == "auto":
            runtime = choose_runtime(backbone, self.device, self.amp, compile, channels_last, fold_batch_norm)
        self.runtime = check_runtime(runtime, self.device, self.amp, compile)
        self.feature_dim = backbone.feature_dim
        self.name = backbone.name
        self.onnx = None
        if runtime == "onnxruntime":  # ONNX Runtime fuses the graph itself, from the model as it is
            self.onnx = OnnxModel(backbone.model, backbone.transform.crop, backbone.name, torch.get_num_threads())
            channels_last = False  # it takes NCHW
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


def check_runtime(runtime: str, device: torch.device, amp: torch.dtype | None, compile: bool) -> str:
    """``runtime`` if it can run as asked, else a one-line ValueError."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    if runtime == "onnxruntime" and (device.type != "cpu" or amp is not None or compile):
        raise ValueError("--runtime onnxruntime runs float32 on the CPU: not with --device cuda, --precision bf16/fp16 "
                         "or --compile (use --runtime torch for those)")
    return runtime


def choose_runtime(backbone: Backbone, device: torch.device, amp: torch.dtype | None, compile: bool,
                   channels_last: bool = True, fold_batch_norm: bool = True) -> str:
    """``--runtime auto``: on a CPU in float32 without --compile, the faster of torch and onnxruntime whose features
    stay exact (``featx.runtimes.EXACT``) against unfolded PyTorch float32, measured once per model, thread count
    and host (then remembered in the private cache); torch everywhere else, and when ONNX Runtime is not
    installed or cannot take the model."""
    if device.type != "cpu" or amp is not None or compile or not onnxruntime_available():
        return "torch"
    batch = calibration_batch(backbone.transform.crop)

    def measure() -> dict | None:  # only when no choice is remembered: the export and three models cost seconds
        candidates = {"torch": Embedder(backbone, "cpu", "fp32", channels_last, fold_batch_norm=fold_batch_norm)}
        try:
            candidates["onnxruntime"] = Embedder(backbone, "cpu", "fp32", runtime="onnxruntime")
        except Exception as error:  # noqa: BLE001 - an exporter that cannot take the model: torch runs it
            print(f"onnxruntime cannot run {backbone.name} ({type(error).__name__}); using torch", flush=True)
            return None  # not remembered: tried again next time
        reference = Embedder(backbone, "cpu", "fp32", channels_last=False, fold_batch_norm=False)
        return fastest_exact(candidates, reference, batch)

    key = model_key(backbone.model, batch, "runtime", torch.get_num_threads(), channels_last, fold_batch_norm)
    choice = remembered(key, measure)
    return choice["runtime"] if choice else "torch"
