"""Tensor files (weights, head states, checkpoints) read safely: tensors and plain containers only, never code. The
one place featx calls ``torch.load``."""

from __future__ import annotations

import os

import torch


def load_tensors(path: str | os.PathLike, what: str = "file"):
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only, never code. A file
    that needs more (a pickled object) is refused with one line naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - every unpickling failure is reported the same way
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise ValueError(f"refusing {what} {path}: it is not a tensors-only file (torch.load weights_only=True: "
                         f"{reason})") from None
