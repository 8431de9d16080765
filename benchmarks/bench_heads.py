"""fit-head cost vs N on synthetic features in HDF5: streaming `linear` rows/s and peak RSS, `logreg` C sweep time.

Each fit runs in a fresh process so its peak RSS is its own.

    python benchmarks/bench_heads.py --rows 10000,100000,1000000 --dims 512,2048 --dtypes float32,float16
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

from featx import store
from featx.cli import guarded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_args, write_results  # noqa: E402

FIT = """
import json, sys, time, h5py
from featx.heads import make_head
kind, path, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with h5py.File(path, "r") as f:
    X = f["features"] if kind == "linear" else f["features"][:]
    y = f["labels"][:]
    start = time.perf_counter()
    head = make_head(kind, **params).fit(X, y)
    seconds = time.perf_counter() - start
epochs = head.selection_.get("epochs", 1)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so it would report the parent's peak
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "epochs": epochs, "rows_per_second": len(y) * epochs / seconds,
                  "peak_rss_mb": peak_kb / 1024,
                  "chosen": head.selection_["chosen"]}))
"""


def synthetic(path: Path, rows: int, dim: int, dtype: str = "float32", classes: int = 10) -> None:
    """Class-clustered Gaussian features written block by block (the file may exceed memory), chunked as
    ``featx extract`` writes them."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    with h5py.File(path, "w") as f:
        chunk_rows = min(rows, max(1, store.CHUNK_BYTES // (dim * np.dtype(dtype).itemsize)))
        features = f.create_dataset("features", (rows, dim), dtype, chunks=(chunk_rows, dim))
        labels = rng.integers(0, classes, rows)
        for start in range(0, rows, 65536):
            block = labels[start:start + 65536]
            features[start:start + len(block)] = centres[block] + rng.normal(0, 2, (len(block), dim)).astype(
                np.float32)
        f["labels"] = labels


def fit(kind: str, path: Path, params: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", FIT, kind, str(path), json.dumps(params)], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--dims", default="512,2048")
    parser.add_argument("--dtypes", default="float32,float16", help="stored feature dtypes (logreg: float32 only)")
    parser.add_argument("--max_bytes", type=float, default=2.5e9, help="skip files larger than this")
    parser.add_argument("--logreg_max_rows", type=int, default=100_000)
    args = parse_args(parser)
    rows_out = []
    table = ["| head | N | D | stored | fit s | rows/s (x epochs) | peak RSS MB | chosen |",
             "|---|---|---|---|---|---|---|---|"]
    configs = {"linear (default 3 lr x 4 wd grid, 5 epochs)": ("linear", {"epochs": 5}),
               "linear (one head, 5 epochs)": ("linear", {"epochs": 5, "lrs": [0.03], "weight_decays": [0.0]}),
               "logreg (23-value C sweep + refit)": ("logreg", {})}
    with tempfile.TemporaryDirectory() as folder:
        for dtype, dim, rows in itertools.product(args.dtypes.split(","), map(int, args.dims.split(",")),
                                                  map(int, args.rows.split(","))):
            if rows * dim * np.dtype(dtype).itemsize > args.max_bytes:
                continue
            path = Path(folder) / f"{rows}x{dim}-{dtype}.h5"
            synthetic(path, rows, dim, dtype)
            for name, (kind, params) in configs.items():
                if kind == "logreg" and (rows > args.logreg_max_rows or dtype != "float32"):
                    continue
                result = fit(kind, path, params)
                rows_out.append({"head": name, "rows": rows, "dim": dim, "dtype": dtype, **result})
                table.append(f"| {name} | {rows} | {dim} | {dtype} | {result['seconds']:.1f} | "
                             f"{result['rows_per_second']:.0f} | {result['peak_rss_mb']:.0f} | {result['chosen']} |")
                print(table[-1], flush=True)
            path.unlink()
    write_results("bench_heads", {"rows": rows_out}, table, args.out)


if __name__ == "__main__":
    guarded(main)
