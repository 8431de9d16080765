"""featx's private on-disk cache of what it builds from a model once and loads in later runs: AOTInductor packages
(``featx.compiled``), ONNX graphs and runtime choices (``featx.runtimes``).

It lives in the user's own folder, ``$FEATX_CACHE/<kind>`` (default ``~/.cache/featx/<kind>``). A file is loaded
only when the folder and the file belong to the user and nobody else can write them, and the file's sha256 is the
one featx recorded (``<file>.sha256``) when it built it. Keys (``model_key``) cover everything a file depends on.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from featx.mirror import file_digest

SCRATCH = ".building-"  # + the building process's id: a build's scratch folder, renamed into place when whole


class UntrustedCacheError(ValueError):
    """A cached file featx will not load: someone else could have written it."""


def cache_dir(kind: str) -> Path:
    """The folder of one kind of cached file: ``$FEATX_CACHE/<kind>``, default ``~/.cache/featx/<kind>``."""
    return Path(os.environ.get("FEATX_CACHE") or Path.home() / ".cache" / "featx") / kind


def model_key(model: nn.Module, example: torch.Tensor, *extra) -> str:
    """sha256 over the model's state (names, shapes, bytes), its modules' classes and plain settings (a pooling
    mode: the same weights pooled another way compute something else), the example's layout, torch, the machine and
    ``extra``."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps([(name, type(module).__name__, _settings(module))
                              for name, module in model.named_modules()]).encode())
    channels_last = example.is_contiguous(memory_format=torch.channels_last)
    digest.update(json.dumps([type(model).__name__, list(example.shape), str(example.dtype), channels_last,
                              example.device.type, torch.__version__, platform.machine(), platform.processor(),
                              torch.backends.cpu.get_cpu_capability(), *map(str, extra)]).encode())
    return digest.hexdigest()


def _settings(module: nn.Module) -> list:
    """A module's plain attributes (strings, numbers, flags and tuples of them), as written in its code."""
    def plain(value) -> bool:
        return isinstance(value, (str, int, float, bool, type(None))) or (
            isinstance(value, tuple) and all(plain(v) for v in value))

    return sorted((key, repr(value)) for key, value in vars(module).items()
                  if not key.startswith("_") and key != "training" and plain(value))


def cached_file(kind: str, filename: str, build: Callable[[Path], None], what: str) -> Path:
    """``<cache>/<kind>/<filename>``, made by ``build(path)`` the first time (then its sha256 recorded beside it);
    refused (``UntrustedCacheError``) unless private and unchanged since featx built it."""
    folder = cache_dir(kind)
    path, digest = folder / filename, folder / (filename + ".sha256")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    require_private(folder)
    if not (path.is_file() and digest.is_file()):
        print(f"building {what} once (cached in {folder}) ...", flush=True)
        remove_abandoned(folder)
        with tempfile.TemporaryDirectory(prefix=f"{SCRATCH}{os.getpid()}-", dir=folder) as scratch:
            partial = Path(scratch) / path.name
            build(partial)
            (Path(scratch) / digest.name).write_text(file_digest(partial))
            os.replace(Path(scratch) / digest.name, digest)  # the digest first: a kill between the two
            os.replace(partial, path)  # leaves a digest without its file, which is rebuilt
    require_private(path)
    require_private(digest)
    if file_digest(path) != digest.read_text().strip():
        raise UntrustedCacheError(f"refusing the cached {path}: its sha256 is not the one featx recorded when it "
                                  "built it; delete it (featx rebuilds it)")
    return path


def remove_abandoned(folder: Path) -> None:
    """Remove the scratch folders of builds whose process is gone (killed mid-build)."""
    for scratch in folder.glob(f"{SCRATCH}*"):
        pid = scratch.name.removeprefix(SCRATCH).split("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(scratch, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def require_private(path: Path) -> None:
    """Refuse ``path`` unless it belongs to this user and neither group nor others can write it."""
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        why = ("it belongs to another user" if info.st_uid != os.getuid() else
               f"group or others can write it (mode {oct(info.st_mode & 0o777)})")
        raise UntrustedCacheError(f"refusing the cache {path}: {why}; make it yours alone (chown, chmod go-w) or "
                                  "set $FEATX_CACHE to a private folder")
