"""Where `featx compare`'s time goes: the whole compare of 2 backbones x 3 heads x 6 shot levels x 5 draws on
ants/bees (real MobileNetV2 and SqueezeNet 1.1 weights), each run a fresh process into a fresh folder (every
feature extracted), against the same command's rerun (features reused). Reported per phase, from the run's own
leaderboard.json: extraction, the leaderboard's head fits, the label-efficiency fits, the near-copy calibration;
and the whole process's wall time. Target: the head fits (leaderboard + label efficiency) at most 20 % of the
first run's wall time.

    python benchmarks/bench_compare.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mirror, parse_args, write_results  # noqa: E402

PHASES = ("extraction", "head_fits", "label_efficiency", "near_copies")


def run(data: Path, backbones: str, out: Path, extra: list[str]) -> dict:
    """One `featx compare` process: its wall time and the phase seconds it recorded."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "featx", "compare", str(data), "--backbones", backbones,
                             "--out", str(out), *extra], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return {"wall": wall, **json.loads((out / "leaderboard.json").read_text())["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="labelled ImageFolder with train/ and val/ (default: ants/bees)")
    parser.add_argument("--backbones", help="default: the mirror's MobileNetV2 and SqueezeNet 1.1")
    parser.add_argument("--shots", default="1,2,4,8,16,all")
    parser.add_argument("--repeats", type=int, default=3, help="fresh runs (each followed by its rerun)")
    parser.add_argument("--draws", type=int, default=5, help="compare's --repeats: draws per shot level")
    args = parse_args(parser)
    root = mirror()
    data = args.data or root / "datasets" / "hymenoptera_data"
    backbones = args.backbones or (f"mobilenet_v2={root / 'weights' / 'mobilenet_v2-imagenet-features.pth'},"
                                   f"squeezenet1_1={root / 'weights' / 'squeezenet1_1-imagenet.pth'}")
    extra = ["--shots", args.shots, "--repeats", str(args.draws)]
    runs = {"first run (extracts)": [], "rerun (features reused)": []}
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as scratch:
        for repeat in range(args.repeats):
            out = Path(scratch) / f"run{repeat}"
            runs["first run (extracts)"].append(run(data, backbones, out, extra))
            runs["rerun (features reused)"].append(run(data, backbones, out, extra))
    medians = {name: {key: statistics.median(r[key] for r in measured) for key in measured[0]}
               for name, measured in runs.items()}
    table = [f"`featx compare` of {backbones.count(',') + 1} backbones x 3 heads x {len(args.shots.split(','))} shot "
             f"levels x {args.draws} draws on {data.name}; median of {args.repeats} fresh processes (seconds)", "",
             "| run | wall | extraction | head fits (leaderboard) | label-efficiency fits | near-copy calibration | "
             "head fits / wall |", "|---|---|---|---|---|---|---|"]
    for name, m in medians.items():
        share = (m["head_fits"] + m["label_efficiency"]) / m["wall"]
        table.append(f"| {name} | {m['wall']:.1f} | {m['extraction']:.1f} | {m['head_fits']:.2f} | "
                     f"{m['label_efficiency']:.2f} | {m['near_copies']:.2f} | **{share:.0%}** |")
    first = medians["first run (extracts)"]
    table += ["", f"Target: head fits ≤ 20 % of the first run's wall time: "
              f"{(first['head_fits'] + first['label_efficiency']) / first['wall']:.0%}. The rest of the wall time: "
              "interpreter and library start-up, the report (figures, contact sheet, report.html)."]
    write_results("bench_compare", {"runs": runs, "medians": medians, "backbones": backbones, "shots": args.shots,
                                    "draws": args.draws}, table, args.out)


if __name__ == "__main__":
    main()
