"""Ahead-of-time compiled backbones, cached on disk: compile once, load in milliseconds in every later run.

``torch.compile`` re-compiles in every process (20-80 s on a 2-core CPU, and Inductor's cache is bypassed
for frozen oneDNN weights), which a few hundred images never repay. AOTInductor writes the frozen, compiled
model to a ``.pt2`` package instead, keyed by everything it depends on: the weights' bytes, the input shape,
memory format, torch version and machine. The package holds a shared library that is loaded (run), so the
cache lives in the user's own folder: ``$FEATX_CACHE/compiled`` (default ``~/.cache/featx/compiled``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from torch import nn


def cache_dir() -> Path:
    """Where compiled packages are kept: ``$FEATX_CACHE/compiled``, default ``~/.cache/featx/compiled``."""
    return Path(os.environ.get("FEATX_CACHE") or Path.home() / ".cache" / "featx") / "compiled"


def package_key(model: nn.Module, example: torch.Tensor) -> str:
    """sha256 over the model's state (names, shapes, bytes), its class, the example's layout, torch and machine."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    channels_last = example.is_contiguous(memory_format=torch.channels_last)
    digest.update(json.dumps([type(model).__name__, list(example.shape), str(example.dtype), channels_last,
                              example.device.type, torch.__version__, platform.machine(), platform.processor(),
                              torch.backends.cpu.get_cpu_capability()]).encode())
    return digest.hexdigest()


def compiled_model(model: nn.Module, example: torch.Tensor, name: str = "model"):
    """``model`` frozen and compiled for inputs shaped like ``example``; compiled once, then loaded from the cache."""
    path = cache_dir() / f"{name}-{package_key(model, example)[:24]}.pt2"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"compiling {name} for input {tuple(example.shape)} once (cached in {path.parent}) ...", flush=True)
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            program = torch.export.export(model, (example,))
            with tempfile.TemporaryDirectory(dir=path.parent) as folder:
                partial = Path(folder) / path.name
                torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
                os.replace(partial, path)  # atomic: a killed compile leaves no half-written package
    return torch._inductor.aoti_load_package(str(path))
