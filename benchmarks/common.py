"""Shared by the benchmarks: machine description, timing, and writing JSON + Markdown results."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from featx import flags
from featx.mirror import require_mirror

RESULTS = Path(__file__).resolve().parent / "results"  # the committed results: written only with --out
SCRATCH = Path(__file__).resolve().parent / "scratch"  # where a run writes by default (ignored by git)


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser``'s arguments as featx's scripts take them (``flags.parse_script_args``), with ``--out``
    defaulting to the scratch folder: committed results change only when asked (``--out benchmarks/results``)."""
    parser.add_argument("--out", type=Path, default=SCRATCH,
                        help=f"results folder (default: {SCRATCH}; benchmarks/results holds the committed ones)")
    return flags.parse_script_args(parser)


def mirror() -> Path:
    """The offline mirror of weights and datasets, resolved as featx resolves it (--mirror, $FEATX_MIRROR)."""
    return require_mirror(None, "this benchmark")


def replicated(data: Path, copies: int, folder: Path) -> Path:
    """``data``'s ImageFolder tree with every image linked ``copies`` times under ``folder`` (for fast devices)."""
    for source in sorted(p for p in Path(data).rglob("*") if p.is_file()):
        relative = source.relative_to(data)
        (folder / relative.parent).mkdir(parents=True, exist_ok=True)
        for copy in range(copies):
            (folder / relative.parent / f"c{copy}_{relative.name}").symlink_to(source.resolve())
    return folder


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info() -> dict:
    """CPU model (with its family and model numbers: VMs of one name differ), its vector ISA as torch uses it,
    cores, torch version and device, recorded with every result."""
    cpu = platform.processor()
    try:
        first_cpu = open("/proc/cpuinfo").read().split("\n\n")[0].splitlines()
        fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first_cpu)}
        cpu = f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
    except (OSError, KeyError):
        pass
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def in_fresh_process(function, *args):
    """``function(*args)`` in a new interpreter, so that process-wide settings one loop makes (featx's malloc
    options, torch threads, caches) never reach the loop it is compared with. ``function`` must be importable."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:  # not daemonic:
        return pool.submit(_forking, function, *args).result()  # the loop may start DataLoader workers


def _forking(function, *args):
    # a spawned process would spawn its DataLoader workers too (re-importing torch in each): fork, as usual
    multiprocessing.set_start_method("fork", force=True)
    return function(*args)


def rate_of(function, *args) -> tuple[float, int]:
    """(items/s, items) of ``function(*args)``, which returns how many items it processed."""
    start = time.perf_counter()
    count = function(*args)
    return count / (time.perf_counter() - start), count


@contextmanager
def timed(store: dict, key: str):
    """Add the wall time of the block to ``store[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        store[key] = store.get(key, 0.0) + time.perf_counter() - start


def write_results(name: str, results: dict, table: list[str], out: Path = SCRATCH) -> None:
    """``out/NAME.json`` (with machine info) and ``out/NAME.md``; prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "machine": machine_info(), **results}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    machine = record["machine"]
    header = f"# {name}\n\n{machine['cpu']}, {machine['cpu_capability']}, {machine['cores']} cores, " \
             f"torch {machine['torch']}, device {machine['cuda'] or 'cpu'}, {machine['date']}\n\n"
    (out / f"{name}.md").write_text(header + "\n".join(table) + "\n")
    print(header + "\n".join(table))
