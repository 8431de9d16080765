"""Extraction as a Ray job: the shards of every split run on the cluster's actors (one per GPU, or per N cores),
and this driver merges. Submit it to a running cluster (the output folder must be on storage every node sees):

    ray job submit --working-dir . -- python jobs/ray_extract.py DATA --out /shared/features --backbone resnet50

Rerunning the same command resumes: finished shards are kept. Watch it with `ray job logs --follow JOB_ID`.
"""

from __future__ import annotations

import argparse
import os

import featx
from featx import flags
from featx.cli import guarded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="image folder, manifest or tar shards (as `featx extract` takes them)")
    parser.add_argument("--out", required=True, help="features root folder, on storage every node sees")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument("--device", default="auto", help="auto (GPUs where the cluster has them), cpu, cuda")
    parser.add_argument("--ray_address", default=os.environ.get("RAY_ADDRESS", "auto"))
    parser.add_argument("--ray_workers", type=int, default=None, help="actors (default: one per GPU, or per N cores)")
    parser.add_argument("--ray_cpus_per_worker", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--shard_size", type=int, default=1024)
    parser.add_argument("--layout", default="copy", help="copy, or virtual (no copy of the rows at the merge)")
    args = flags.parse_script_args(parser)
    summaries = featx.extract(args.data, args.backbone, args.weights, args.out, device=args.device,
                              batch_size=args.batch_size, shard_size=args.shard_size, layout=args.layout,
                              engine="ray", ray_address=args.ray_address, ray_workers=args.ray_workers,
                              ray_cpus_per_worker=args.ray_cpus_per_worker)
    for split, summary in summaries.items():
        print(f"{split}: {summary['path']}")


if __name__ == "__main__":
    guarded(main)
