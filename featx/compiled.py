"""Ahead-of-time compiled backbones, cached on disk: compile once, load in milliseconds in every later run.

``torch.compile`` re-compiles in every process (20-80 s on a 2-core CPU, and Inductor's cache is bypassed
for frozen oneDNN weights), which a few hundred images never repay. AOTInductor writes the frozen, compiled
model to a ``.pt2`` package instead, keyed by everything it depends on: the weights' bytes, the input shape,
memory format, torch version and machine. The package holds a shared library that is loaded (run), so the
cache lives in the user's own folder: ``$FEATX_CACHE/compiled`` (default ``~/.cache/featx/compiled``), and a
package is loaded only when the folder and the file belong to the user and nobody else can write them, and the
file's sha256 matches the one featx recorded (``<package>.sha256``) when it built it.
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

from featx.mirror import file_digest


class UntrustedCacheError(ValueError):
    """A compiled package featx will not load: someone else could have written it."""


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
    folder = cache_dir()
    path = folder / f"{name}-{package_key(model, example)[:24]}.pt2"
    digest = path.with_name(path.name + ".sha256")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    require_private(folder)
    if not (path.is_file() and digest.is_file()):
        print(f"compiling {name} for input {tuple(example.shape)} once (cached in {folder}) ...", flush=True)
        for module in model.modules():  # in-place activations (SqueezeNet's ReLUs) cannot write frozen storage
            if getattr(module, "inplace", False):
                module.inplace = False
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            program = torch.export.export(model, (example,))
            with tempfile.TemporaryDirectory(dir=folder) as scratch:
                partial = Path(scratch) / path.name
                torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
                (Path(scratch) / digest.name).write_text(file_digest(partial))
                os.replace(Path(scratch) / digest.name, digest)  # the digest first: a kill between the two
                os.replace(partial, path)  # leaves a digest without its package, which is rebuilt
    require_private(path)
    if file_digest(path) != digest.read_text().strip():
        raise UntrustedCacheError(f"refusing the compiled package {path}: its sha256 is not the one featx recorded "
                                  "when it built it; delete it (featx rebuilds it)")
    return torch._inductor.aoti_load_package(str(path))


def require_private(path: Path) -> None:
    """Refuse ``path`` unless it belongs to this user and neither group nor others can write it."""
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        why = ("it belongs to another user" if info.st_uid != os.getuid() else
               f"group or others can write it (mode {oct(info.st_mode & 0o777)})")
        raise UntrustedCacheError(f"refusing the compiled-model cache {path}: {why}; make it yours alone "
                                  "(chown, chmod go-w) or set $FEATX_CACHE to a private folder")
