"""Fuse backbone + head into one deployable model: normalised image batch [B, 3, H, W] -> logits [B, C]."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from featx.backbones import backbone_from_source
from featx.finetuning import RUN_FILE, load_finetuned
from featx.heads import load_head


class Classifier(nn.Sequential):
    """Frozen backbone, then the head's torch module."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__(backbone, nn.Flatten(1), head)


def fused_model(folder: str | os.PathLike, mirror: str | None = None, trust_pickle: bool = False
                ) -> tuple[nn.Module, dict]:
    """A head folder (fused with its backbone) or a finetune run folder (its best model), in eval mode, and its
    provenance (class names, transform, backbone, weights hash)."""
    if (Path(folder) / RUN_FILE).is_file():
        return load_finetuned(folder)
    estimator = load_head(folder, trust_pickle)
    backbone = backbone_from_source(estimator.source_, mirror)
    return Classifier(backbone.model, estimator.to_torch()).eval(), estimator.source_


def export(head: str | os.PathLike, out: str | os.PathLike, onnx: bool = True, mirror: str | None = None,
           trust_pickle: bool = False) -> dict:
    """Export a head folder (fused with its backbone) or a finetune run folder.

    Writes ``model.ts`` (TorchScript, traced), ``model.pt2`` (``torch.export``, TorchScript's successor),
    ``model.onnx`` when ``onnx``/``onnxscript`` are installed, and ``model.json`` (class names, preprocessing)."""
    model, source = fused_model(head, mirror, trust_pickle)
    crop = source["transform"]["crop"]
    example = torch.randn(2, 3, crop, crop)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)  # deprecated in torch 2.14, still asked for
        torch.jit.trace(model, example).save(str(out / "model.ts"))
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, out / "model.pt2")
    written = {"torchscript": str(out / "model.ts"), "torch_export": str(out / "model.pt2")}
    if onnx:
        try:
            import onnx as _  # noqa: F401
            import onnxscript as _  # noqa: F401,F811
        except ImportError:
            print("onnx/onnxscript are not installed: skipping model.onnx (pip install onnx onnxscript)")
        else:
            torch.onnx.export(model, (example,), str(out / "model.onnx"), input_names=["images"],
                              output_names=["logits"], dynamic_shapes=({0: batch},))
            written["onnx"] = str(out / "model.onnx")
    description = {"input": "float32 [B, 3, H, W], RGB, scaled to 0..1 then normalised with mean/std",
                   "output": "logits [B, C]", "class_names": source["class_names"], "transform": source["transform"],
                   "backbone": source["backbone"], "weights_sha256": source["weights_sha256"], "files": written}
    (out / "model.json").write_text(json.dumps(description, indent=1))
    print(f"exported {source['backbone']} + head -> {', '.join(written.values())}")
    return description
