"""What this machine can do at most, for reading the other benchmarks: float32 matrix-multiply GFLOP/s and each
backbone's forward pass alone (batch 64, random input, no decode) eager, channels_last and compiled.

    python benchmarks/ceilings.py --backbones mobilenet_v2,resnet18
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from featx.backbones import create_backbone  # noqa: E402
from featx.compiled import compiled_model  # noqa: E402


def per_second(run, count: int, repeats: int = 3) -> float:
    """``count`` / seconds of one call of ``run``, after a warm-up call."""
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return count * repeats / (time.perf_counter() - start)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="mobilenet_v2,resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows, table = [], ["| what | rate |", "|---|---|"]
    for n in (2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        gflops = per_second(lambda: a @ b, 2 * n ** 3) / 1e9
        rows.append({"what": f"matmul {n}", "gflops": gflops})
        table.append(f"| float32 matmul {n}x{n}, {torch.get_num_threads()} threads | {gflops:.1f} GFLOP/s |")
    for name in args.backbones.split(","):
        model = create_backbone(name, "none").model.eval()
        x = torch.randn(args.batch_size, 3, 224, 224)
        rates = {"eager contiguous": per_second(lambda: model(x), len(x))}
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        rates["eager channels_last"] = per_second(lambda: model(x), len(x))
        compiled = compiled_model(model, x, name)
        rates["compiled package (featx --compile)"] = per_second(lambda: compiled(x), len(x))
        for what, rate in rates.items():
            rows.append({"what": f"{name} forward, {what}", "images_per_second": rate})
            table.append(f"| {name} forward alone, batch {len(x)}, {what} | {rate:.1f} img/s |")
    write_results("ceilings", {"rows": rows}, table, args.out)


if __name__ == "__main__":
    main()
