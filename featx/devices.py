"""Devices and precision, at the ground floor (only torch below it): which device ``--device`` means, which
autocast dtype ``--precision`` means there, and whether this CPU runs it natively. The mapper, the heads,
fine-tuning and predict all ask here."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes; "auto" picks
QUANTIZED = ("int8",)  # precisions that quantize the model (ONNX Runtime on the CPU) instead of autocasting


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
    if precision in QUANTIZED:  # the graph itself is quantized (featx.runtimes); its inputs stay float32
        if device.type != "cpu":
            raise ValueError(f"--precision {precision} runs on the CPU (ONNX Runtime); on CUDA use bf16")
        return None
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of auto, {', '.join((*PRECISIONS, *QUANTIZED))}; got {precision!r}")
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
