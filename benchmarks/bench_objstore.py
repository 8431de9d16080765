"""Extract from object storage vs the same images on local disk, in one run: a local S3 server (SeaweedFS, on
loopback) holding the mirror's ants/bees images twice, as loose JPEGs (an ImageFolder) and as WebDataset tars.
Each extract is a fresh `featx extract` process (features written to the same place as its data: disk or S3),
interleaved over ``--repeats``; reported per layout: the rate featx prints (decode, embed, write), the whole
command's wall time (listing, tar indexing, merge and upload included), and the process's peak RSS. Then the time
to list a prefix of ``--list_objects`` objects. Run it in a loopback-only namespace:

    tests/isolated.sh .venv/bin/python benchmarks/bench_objstore.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "tests")]
from common import mirror, parse_args, write_results  # noqa: E402
from s3server import S3Server  # noqa: E402

from featx import storage  # noqa: E402

LAYOUTS = ("loose JPEGs", "tars")


def make_tars(data: Path, folder: Path, count: int) -> Path:
    """Every image of ``data`` (an ImageFolder) in ``count`` WebDataset tars, labelled by ``.cls``."""
    images = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    classes = sorted({p.parent.name for p in images})
    folder.mkdir(parents=True)
    for shard in range(count):
        with tarfile.open(folder / f"train-{shard:06d}.tar", "w") as tar:
            for number, image in enumerate(images[shard::count]):
                key = f"{shard:03d}{number:06d}"
                tar.add(image, f"{key}.jpg")
                label = tempfile.NamedTemporaryFile("w", suffix=".cls", delete=False)
                label.write(str(classes.index(image.parent.name)))
                label.close()
                tar.add(label.name, f"{key}.cls")
                os.unlink(label.name)
    return folder


def upload(server: S3Server, folder: Path, url: str) -> None:
    fs = server.client()
    fs.put([str(p) for p in sorted(folder.rglob("*")) if p.is_file()],
           [f"{url.removeprefix('s3://')}/{p.relative_to(folder).as_posix()}" for p in sorted(folder.rglob("*"))
            if p.is_file()])


def extract(data: str, out: str, backbone: list[str]) -> dict:
    """One `featx extract` in a fresh process: its printed rate (over all splits, by images), wall time, peak RSS."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "featx", "extract", data, "--out", out, *backbone],
                                   stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own resource usage
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        stdout.seek(0), stderr.seek(0)
        printed, errors = stdout.read(), stderr.read()
    if process.returncode:
        raise SystemExit(f"featx extract {data} failed:\n{errors[-2000:]}")
    rows = [(int(n), float(s)) for n, s in re.findall(r"(\d+) views processed in ([\d.]+)s", printed)]
    return {"images": sum(n for n, _ in rows), "rate": sum(n for n, _ in rows) / sum(s for _, s in rows),
            "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def listing_time(server: S3Server, count: int, repeats: int) -> dict:
    """Seconds to put ``count`` small objects (concurrently) and to list their prefix with ``storage.listing``."""
    fs = server.client()
    start = time.perf_counter()
    for first in range(0, count, 5000):
        fs.pipe({f"listing/many/{i:07d}.jpg": b"x" for i in range(first, min(first + 5000, count))})
    put = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        found = storage.listing("s3://listing/many")
        times.append(time.perf_counter() - start)
        assert len(found) == count, len(found)
    return {"objects": count, "put_s": put, "list_s": min(times), "list_s_all": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="ImageFolder (default: the mirror's ants/bees)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default=None, help="default: the mirror's real MobileNetV2, else none")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per layout and place; median kept")
    parser.add_argument("--tars", type=int, default=4, help="tar shards the images are packed into")
    parser.add_argument("--list_objects", type=int, default=100_000, help="objects in the listed prefix")
    args = parse_args(parser)
    data = args.data or mirror() / "datasets" / "hymenoptera_data"
    weights = args.weights or next((str(p) for p in [mirror() / "weights" / "mobilenet_v2-imagenet-features.pth"]
                                    if args.backbone == "mobilenet_v2" and p.is_file()), "none")
    backbone = ["--backbone", args.backbone, "--weights", weights, "--device", "cpu"]
    scratch = Path(tempfile.mkdtemp(prefix="featx-bench-objstore-"))
    os.environ["FEATX_CACHE"] = str(scratch / "cache")
    server = S3Server(scratch / "s3")
    server.start()
    try:
        os.environ.update(server.env())
        tars = make_tars(data, scratch / "tars", args.tars)
        places = {"loose JPEGs": (str(data), "s3://bench/images"), "tars": (str(tars), "s3://bench/tars")}
        server.client().mkdir("bench")
        server.client().mkdir("listing")
        upload(server, data, places["loose JPEGs"][1])
        upload(server, tars, places["tars"][1])
        extract(str(data), str(scratch / "warm-up"), backbone)  # the runtime choice is measured once, here
        runs: dict[str, list[dict]] = {f"{layout} {where}": [] for layout in LAYOUTS for where in ("disk", "S3")}
        for repeat in range(args.repeats):
            for layout in LAYOUTS:
                disk, url = places[layout]
                runs[f"{layout} disk"].append(extract(disk, str(scratch / f"out-{repeat}-{layout}"), backbone))
                runs[f"{layout} S3"].append(extract(url, f"s3://bench/out-{repeat}-{layout.split()[0]}", backbone))
        listed = listing_time(server, args.list_objects, 3)
    finally:
        server.stop()
    median = {name: {key: statistics.median(r[key] for r in rs) for key in ("rate", "wall_s", "peak_rss_mb")}
              for name, rs in runs.items()}
    table = ["| layout | where | img/s (featx's rate) | vs disk | wall s (whole command) | vs disk | peak RSS MB |"
             " vs disk |", "|---|---|---|---|---|---|---|---|"]
    for layout in LAYOUTS:
        disk = median[f"{layout} disk"]
        for where in ("disk", "S3"):
            row = median[f"{layout} {where}"]
            table.append(f"| {layout} | {where} | {row['rate']:.1f} | {row['rate'] / disk['rate']:.2f}x | "
                         f"{row['wall_s']:.1f} | {disk['wall_s'] / row['wall_s']:.2f}x | {row['peak_rss_mb']:.0f} | "
                         f"{row['peak_rss_mb'] / disk['peak_rss_mb']:.2f}x |")
    table += ["", f"Listing a prefix of {listed['objects']} objects: {listed['list_s']:.2f} s (best of 3; putting them "
              f"took {listed['put_s']:.1f} s). {runs['tars disk'][0]['images']} images, {args.backbone}, "
              f"{args.repeats} interleaved runs each (median)."]
    write_results("bench_objstore", {"backbone": args.backbone, "weights": weights, "repeats": args.repeats,
                                     "tars": args.tars, "runs": runs, "median": median, "listing": listed},
                  table, args.out)


if __name__ == "__main__":
    main()
