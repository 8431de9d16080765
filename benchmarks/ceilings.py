"""What this machine can do at most, for reading the other benchmarks: float32 (and native bf16) matrix-multiply
GFLOP/s; each backbone's forward pass alone (random input, no decode) eager, channels_last and compiled, at batch 64
and at featx's CPU forward batch, and featx's Embedder; one training step alone (the d2l loop's contiguous layout vs
featx's channels_last and malloc settings, each in a fresh process);
the streaming linear head's SGD step on rows already in memory, its HDF5 block reader, and the copies beneath it.

    python benchmarks/ceilings.py --backbones mobilenet_v2,resnet18
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from featx.cli import guarded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_fresh_process, parse_args, write_results  # noqa: E402

from featx.backbones import create_backbone, create_model, replace_classifier  # noqa: E402
from featx.compiled import compiled_model  # noqa: E402
from featx.devices import cpu_flags  # noqa: E402
from featx.embed import Embedder, fold_batch_norms  # noqa: E402
from featx.heads import holdout_split  # noqa: E402
from featx.heads.blocks import BlockStream  # noqa: E402
from featx.heads.linear import GridSGD, LinearHead, _error_t_x  # noqa: E402
from featx.memory import keep_freed_memory  # noqa: E402


def per_second(run, count: int, repeats: int = 3) -> float:
    """``count`` / seconds of one call of ``run``, after a warm-up call."""
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return count * repeats / (time.perf_counter() - start)


@torch.inference_mode()
def forward_rates(name: str, batch_size: int) -> dict[str, float]:
    model, x = create_backbone(name, "none").model.eval(), torch.randn(batch_size, 3, 224, 224)
    rates = {f"batch {batch_size}, eager contiguous": per_second(lambda: model(x), batch_size)}
    cl_model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    folded = fold_batch_norms(cl_model)
    rates[f"batch {batch_size}, eager channels_last"] = per_second(lambda: cl_model(x), batch_size)
    rates[f"batch {batch_size}, eager channels_last, BatchNorms folded"] = per_second(lambda: folded(x), batch_size)
    compiled = compiled_model(cl_model, x, name)
    rates[f"batch {batch_size}, compiled package"] = per_second(lambda: compiled(x), batch_size)
    return rates


def train_step_rate(name: str, batch_size: int, channels_last: bool, keep_memory: bool) -> float:
    """Training examples/s of forward + backward + SGD step on one random batch (run it in a fresh process)."""
    if keep_memory:
        keep_freed_memory()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(name, "none")[0]
    replace_classifier(model, name, 2)
    model = model.to(memory_format=layout).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=layout), torch.randint(0, 2, (batch_size,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return per_second(step, batch_size, 2)


def featx_forward_rate(name: str, batch_size: int) -> float:
    """Images/s of featx's Embedder on uint8 batches: compiled, freed memory kept."""
    embedder = Embedder(create_backbone(name, "none"), "cpu", compile=True)
    images = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8)
    return per_second(lambda: embedder(images), batch_size)


def linear_head_rates(rows: int = 262144, dim: int = 512, classes: int = 10,
                      batch: int = 1024) -> dict[str, tuple[float, str]]:
    """The streaming linear head's stages, each alone: the SGD step (one head, rows in memory, PyTorch ops) at
    ``batch`` and 4x it, its cost per call (at 16 rows), its two K = ``classes`` products; the block reader, all
    rows or fit-head's 20 % hold-out masked out (rows served per second); the file copy beneath it (every row in
    file order, no shuffle); and a memory-to-memory copy of as many bytes."""
    features, labels = torch.randn(rows, dim), torch.randint(0, classes, (rows,))
    threads, calls, rates = torch.get_num_threads(), 64, {}
    sgd = GridSGD([(0.03, 0.0)], classes, torch.zeros(dim), torch.ones(dim))
    for b in (batch, 4 * batch):
        rates[f"SGD step alone, batch {b}, rows in memory, {threads} threads"] = (per_second(
            lambda: [sgd.step(features[a:a + b], labels[a:a + b], 1.0) for a in range(0, rows, b)], rows), "rows/s")
    rates["SGD step cost per call (batch 16)"] = (1e6 / per_second(
        lambda: [sgd.step(features[:16], labels[:16], 1.0) for _ in range(calls)], calls), "µs")
    x, weight, error = features[:batch], torch.randn(classes, dim), torch.randn(batch, classes)
    flops = 2 * batch * dim * classes
    with torch.inference_mode():
        rates[f"logits product alone (x @ W.T), batch {batch}"] = (
            per_second(lambda: torch.addmm(weight[:, 0], x, weight.T), flops, 50) / 1e9, "GFLOP/s")
        rates[f"gradient product alone (error.T @ x), batch {batch}"] = (
            per_second(lambda: _error_t_x(error, x), flops, 50) / 1e9, "GFLOP/s")
    with tempfile.TemporaryDirectory() as folder:
        with h5py.File(Path(folder) / "x.h5", "w") as f:  # chunked as bench_heads writes it
            f.create_dataset("x", data=features.numpy(), chunks=(2**18 // dim, dim))
        with h5py.File(Path(folder) / "x.h5", "r") as f:
            stream = BlockStream(f["x"], LinearHead()._block_rows(dim))
            for what, mask in {"all rows": np.ones(rows, bool),
                               "20% hold-out masked out": ~holdout_split(labels.numpy(), np.arange(rows))}.items():
                rng = np.random.default_rng(0)
                rates[f"block reader alone (shuffled), all cores, {what}"] = (per_second(
                    lambda: sum(len(r) for _, r in stream.blocks(mask, rng)), int(mask.sum())), "rows/s")
            out = np.empty((rows, dim), np.float32)
            rates["file copy alone: h5py read_direct in file order"] = (per_second(
                lambda: f["x"].read_direct(out), rows), "rows/s")
    rates["memory copy of as many bytes, numpy"] = (per_second(lambda: np.copyto(out, features.numpy()), rows),
                                                    "rows/s")
    return {f"linear head {rows}x{dim}, {classes} classes: {k}": v for k, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="mobilenet_v2,resnet18")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--train_batch_size", type=int, default=32)
    args = parse_args(parser)
    rows, table = [], ["| what | rate |", "|---|---|"]

    def add(what: str, rate: float, unit: str) -> None:
        rows.append({"what": what, "rate": rate, "unit": unit})
        table.append(f"| {what} | {rate:,.1f} {unit} |")
        print(table[-1], flush=True)

    dtypes = [torch.float32] + ([torch.bfloat16] if {"avx512_bf16", "amx_bf16"} & cpu_flags() else [])
    for dtype in dtypes:  # bf16 where the CPU has it natively
        for n in (2048, 4096):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            add(f"{str(dtype).removeprefix('torch.')} matmul {n}x{n}, {torch.get_num_threads()} threads",
                per_second(lambda: a @ b, 2 * n ** 3) / 1e9, "GFLOP/s")
    for name in args.backbones.split(","):
        for what, rate in forward_rates(name, args.batch_size).items():
            add(f"{name} forward alone, {what}", rate, "img/s")
        add(f"{name} forward alone, featx Embedder (uint8 in, compiled, batch {args.batch_size}, freed memory kept)",
            in_fresh_process(featx_forward_rate, name, args.batch_size), "img/s")
        steps = {"contiguous (d2l loop)": (False, False), "channels_last": (True, False),
                 "channels_last, freed memory kept (featx)": (True, True)}
        for what, (channels_last, keep_memory) in steps.items():
            rate = in_fresh_process(train_step_rate, name, args.train_batch_size, channels_last, keep_memory)
            add(f"{name} training step alone, batch {args.train_batch_size}, {what}", rate, "examples/s")
    for what, (rate, unit) in linear_head_rates().items():
        add(what, rate, unit)
    write_results("ceilings", {"rows": rows}, table, args.out)


if __name__ == "__main__":
    guarded(main)
