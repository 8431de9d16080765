"""export-features on a large features file: time and peak RSS of featx's streamed Parquet and npy exports, beside the
plain way (load the whole file, build a pandas DataFrame, ``to_parquet``), each in a fresh process.

    python benchmarks/bench_export.py --rows 200000 --dim 1280
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

from featx.cli import guarded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_args, write_results  # noqa: E402

RUN = """
import json, sys, time
import featx, pandas, pyarrow.parquet  # imports are not the export's memory
kind, path, out = sys.argv[1:4]
start = time.perf_counter()
before_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
if kind == "plain":
    import pandas as pd
    from featx import store
    data = store.load(path)
    pd.DataFrame({"path": data.paths, "label": data.labels, "embedding": list(data.features)}).to_parquet(out)
else:
    from featx.export_features import export_features
    export_features(path, out, kind)
seconds = time.perf_counter() - start
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_kb / 1024, "added_mb": (peak_kb - before_kb) / 1024}))
"""


def features_file(path: Path, rows: int, dim: int) -> None:
    """A featx features file of random rows, written block by block (the file may exceed memory)."""
    from featx import store

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        chunk_rows = min(rows, max(1, (1 << 20) // (4 * dim)))
        features = f.create_dataset("features", (rows, dim), "float32", chunks=(chunk_rows, dim))
        for start in range(0, rows, 65536):
            features[start:start + 65536] = rng.normal(size=(min(65536, rows - start), dim)).astype(np.float32)
        f["labels"] = rng.integers(0, 10, rows)
        f["image_ids"] = np.arange(rows)
        f.create_dataset("paths", data=np.asarray([f"img/{i:08d}.jpg" for i in range(rows)], dtype=object),
                         dtype=store.STR)
        f.create_dataset("failed/paths", (0,), dtype=store.STR)
        f.create_dataset("failed/reasons", (0,), dtype=store.STR)
        attrs = {"format": store.FORMAT, "complete": True, "backbone": "synthetic", "weights": "none",
                 "weights_source": "", "weights_sha256": "", "feature_dim": dim, "transform": "{}",
                 "class_names": [f"c{i}" for i in range(10)], "split": "train", "views": 1, "augmentation": "{}",
                 "dtype": "float32", "file_list_sha256": "", "num_rows": rows}
        for key, value in attrs.items():
            f.attrs[key] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1280)
    args = parse_args(parser)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "train.h5"
        features_file(path, args.rows, args.dim)
        size_mb = path.stat().st_size / 2**20
        rows = {}
        for kind, out in (("plain", "plain.parquet"), ("parquet", "featx.parquet"), ("npy", "npy")):
            result = subprocess.run([sys.executable, "-c", RUN, kind, str(path), str(Path(scratch) / out)],
                                    capture_output=True, text=True, check=True)
            rows[kind] = json.loads(result.stdout.splitlines()[-1])
    table = [f"{args.rows:,} rows x {args.dim} float32 ({size_mb:.0f} MB of features)", "",
             "| export | seconds | peak RSS (MB) | added by the export (MB) | vs plain |", "|---|---|---|---|---|"]
    names = {"plain": "plain: load + pandas to_parquet", "parquet": "featx export-features --format parquet",
             "npy": "featx export-features --format npy"}
    for kind, row in rows.items():
        table.append(f"| {names[kind]} | {row['seconds']:.1f} | {row['peak_rss_mb']:.0f} | {row['added_mb']:.0f} | "
                     f"{row['added_mb'] / rows['plain']['added_mb']:.2f}x |")
    write_results("bench_export", {"rows": args.rows, "dim": args.dim, "results": rows}, table, args.out)


if __name__ == "__main__":
    guarded(main)
