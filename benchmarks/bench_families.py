"""Extract images/s of one small model per backbone family (torchvision, timm, OpenCLIP, Hugging Face), random
weights, default options (so `--runtime auto` picks per model), on the mirror's ants/bees val split. Each run is a
fresh process; the rate is `extract`'s own for the split (model build and start-up excluded). The Hugging Face model
is a random DINOv2-small (ViT-S/14) saved with `save_pretrained`, since no hub is reachable here.

    python benchmarks/bench_families.py --repeats 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_fresh_process, mirror, parse_args, write_results  # noqa: E402

from featx import store  # noqa: E402
from featx.backbones import BackboneSpec  # noqa: E402
from featx.cli import guarded  # noqa: E402
from featx.extract import extract  # noqa: E402

FAMILIES = ("resnet18", "timm:resnet18", "open_clip:ViT-S-32", "open_clip:ViT-B-32", "hf:dinov2-small")


def dinov2_small(folder: Path) -> str:
    """A random DINOv2-small with DINOv2's image processor, as ``save_pretrained`` writes it; its backbone name."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                             patch_size=14, image_size=518)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      resample=3, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return f"hf:{folder}"


def extract_val(data: Path, backbone: str, out: str) -> dict:
    summary = extract(data, BackboneSpec(backbone, "none"), out, splits=["val"])["val"]
    meta = store.read_meta(summary["path"])
    return {"images_per_second": summary["images_per_second"], "runtime": meta["runtime"],
            "feature_dim": meta["feature_dim"], "pool": meta.get("pool")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs per backbone (interleaved); the best is kept")
    parser.add_argument("--data", type=Path, default=None, help="image folder with val/ (default: mirror's ants/bees)")
    parser.add_argument("--backbones", default=",".join(FAMILIES),
                        help="comma-separated; hf:dinov2-small is a random DINOv2-small saved here")
    args = parse_args(parser)
    data = args.data or mirror() / "datasets" / "hymenoptera_data"
    os.environ["FEATX_CACHE"] = tempfile.mkdtemp(prefix="featx-bench-cache-")
    with tempfile.TemporaryDirectory() as folder:
        backbones = [dinov2_small(Path(folder) / "dinov2-small") if name == "hf:dinov2-small" else name
                     for name in args.backbones.split(",")]
        best: dict = {}
        for repeat in range(args.repeats):
            for backbone in backbones:
                result = in_fresh_process(extract_val, data, backbone, str(Path(folder) / f"out{repeat}"))
                print(f"{backbone}: {result['images_per_second']:.1f} images/s ({result['runtime']})", flush=True)
                if result["images_per_second"] > best.get(backbone, {}).get("images_per_second", 0):
                    best[backbone] = result
    rows = [{"backbone": name if not name.startswith("hf:/") else "hf: DINOv2-small (random)", **result}
            for name, result in best.items()]
    table = ["| backbone | images/s | runtime (auto) | features | pool |", "|---|---|---|---|---|"]
    table += [f"| {r['backbone']} | {r['images_per_second']:.1f} | {r['runtime']} | {r['feature_dim']} | {r['pool']} |"
              for r in rows]
    write_results("bench_families", {"data": str(data), "rows": rows}, table, args.out)


if __name__ == "__main__":
    guarded(main)
