"""Process memory settings for the convolutional stages (extract, finetune).

glibc's malloc serves every block above its mmap threshold (at most 32 MB) with fresh pages from the kernel
and unmaps them on free, so each forward or training step that allocates large activations pays the kernel
for zeroed pages again: at batch 32 a MobileNetV2 training step spent 20 % of its time in page faults here
(sys 3.0 s of 16.7). ``keep_freed_memory`` makes glibc serve large blocks from its heap and keep freed memory
for the next step instead (measured: once the heap has grown over two forwards, two more MobileNetV2 forwards
at batch 16 cause 0 page faults instead of ~66,000). Process-wide and not undone; ``FEATX_MALLOC=system``
leaves malloc alone.

These settings are the main arena's: a thread with an arena of its own (glibc gives threads their own as they first
allocate) pays the page faults still. ``one_arena_environment`` is for processes whose training runs in such a
thread (Ray Train's workers): MobileNetV2 trained in a second thread ran at 27.6 img/s with 6.7x the page faults,
36.2 with every thread on the main arena, as in the main thread.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
KEEP_UP_TO = 1 << 30  # bytes of freed heap top kept instead of returned to the kernel


def one_arena_environment() -> dict[str, str]:
    """Environment variables for a new process in which every thread allocates from glibc's main arena (the
    ``arena_max`` tunable, read as the process starts), so ``keep_freed_memory`` covers them all; empty where it
    does not apply."""
    if os.environ.get("FEATX_MALLOC") == "system" or not sys.platform.startswith("linux"):
        return {}
    tunables = [os.environ["GLIBC_TUNABLES"]] if os.environ.get("GLIBC_TUNABLES") else []
    return {"GLIBC_TUNABLES": ":".join([*tunables, "glibc.malloc.arena_max=1"])}


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory for reuse; True if it took effect (glibc on Linux, not opted out)."""
    if os.environ.get("FEATX_MALLOC") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO))
    except (OSError, AttributeError):  # not glibc
        return False
