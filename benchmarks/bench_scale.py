"""The same images through the local engine and through Ray with 1 and 2 workers, in one run: images/s in steady
state (after start-up), the engine's fixed start-up cost, and the ratio; then the merge of a 1M-row split, copied
vs the virtual layout. Ray runs on loopback only, so run it in a loopback-only network namespace:

    tests/isolated.sh python benchmarks/bench_scale.py --out benchmarks/results    # 2,205 images: ants/bees train x9
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from featx.cli import guarded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mirror, parse_args, replicated, write_results  # noqa: E402

RUN = """
import json, os, sys, time
from pathlib import Path
start = time.perf_counter()
from featx.backbones import BackboneSpec, create_backbone
from featx.engines import LocalEngine, RayEngine, RayOptions
from featx.extract import split_dataset
from featx.options import ExtractOptions
from featx.shards import plan_shards
from featx.sources import discover
engine, workers, data, backbone, weights, out = sys.argv[1], int(sys.argv[2]), *sys.argv[3:7]
options = ExtractOptions(batch_size=64, shard_size=64, device="cpu")
split = discover(data)[0]
extractor = create_backbone(backbone, weights)
dataset = split_dataset(split, extractor, options)
shards = dict(enumerate(plan_shards(len(dataset), options.shard_size, options.batch_size)))
parts = Path(out)
parts.mkdir(parents=True)
if engine == "local":
    local_engine = LocalEngine(extractor, options)
    ready = time.perf_counter()
    local_engine.run(dataset, parts, shards)
else:
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_engine = RayEngine(BackboneSpec(backbone, weights), extractor, options,
                           RayOptions(workers=workers, cpus_per_worker=2 // workers))
    ray_engine.start()
    ready = time.perf_counter()
    ray_engine.run(dataset, parts, shards)
end = time.perf_counter()
print(json.dumps({"images": len(dataset), "startup_s": ready - start, "steady_s": end - ready, "total_s": end - start}))
"""

MERGE = """
import json, sys, time
import numpy as np
from pathlib import Path
from featx import store
rows, dim, layout, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
parts, per_shard = folder / "train.h5.parts", 10_000
parts.mkdir(parents=True)
rng = np.random.default_rng(0)
block = rng.normal(size=(per_shard, dim)).astype(np.float32)
for number, first in enumerate(range(0, rows, per_shard)):
    writer = store.ShardWriter(store.shard_path(parts, number), dim, "float32", per_shard)
    writer.append(np.arange(first, first + per_shard), block, np.arange(first, first + per_shard, dtype=np.uint64))
    writer.commit()
attrs = {"views": 1, "feature_dim": dim, "dtype": "float32", "split": "train", "class_names": ["a"]}
start = time.perf_counter()
store.merge(parts, folder / "train.h5", attrs, tuple(f"{i}.jpg" for i in range(rows)), np.zeros(rows, np.int64),
            layout=layout)
merged = time.perf_counter() - start
print(json.dumps({"merge_s": merged, "file_mb": (folder / "train.h5").stat().st_size / 2**20}))
"""


def timed_run(code: str, *args) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="image folder (default: the mirror's ants/bees)")
    parser.add_argument("--copies", type=int, default=9, help="link each training image this many times (9: 2,205)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--merge_rows", type=int, default=1_000_000)
    parser.add_argument("--merge_dim", type=int, default=512)
    args = parse_args(parser)
    args.data = args.data or mirror() / "datasets" / "hymenoptera_data"
    rows, table = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        data = replicated(args.data / "train", args.copies, Path(scratch) / "data") if args.copies > 1 else args.data
        for name, engine, workers in (("local", "local", 1), ("ray, 1 worker x 2 cores", "ray", 1),
                                      ("ray, 2 workers x 1 core", "ray", 2)):
            rows[name] = timed_run(RUN, engine, workers, data, args.backbone, "none", Path(scratch) / name)
            print(name, rows[name], flush=True)
        merges = {layout: timed_run(MERGE, args.merge_rows, args.merge_dim, layout, Path(scratch) / f"m-{layout}")
                  for layout in ("copy", "virtual")}
    local = rows["local"]["images"] / rows["local"]["steady_s"]
    table += [f"{rows['local']['images']:,} images ({args.data.name}/train linked {args.copies}x), {args.backbone} "
              "(random weights), CPU, batch 64, shard 64", "",
              "| engine | start-up (s) | steady images/s | vs local | total (s) |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        rate = row["images"] / row["steady_s"]
        table.append(f"| {name} | {row['startup_s']:.1f} | {rate:.1f} | {rate / local:.2f}x | {row['total_s']:.1f} |")
    table += ["", f"merge of {args.merge_rows:,} x {args.merge_dim} float32 rows in 10,000-row shards", "",
              "| layout | merge (s) | merged file (MB) |", "|---|---|---|"]
    table += [f"| {layout} | {m['merge_s']:.2f} | {m['file_mb']:.0f} |" for layout, m in merges.items()]
    write_results("bench_scale", {"copies": args.copies, "backbone": args.backbone, "engines": rows,
                                  "merge": merges}, table, args.out)


if __name__ == "__main__":
    guarded(main)
