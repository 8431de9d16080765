"""Command line: ``python -m featx <command> --help``.

Commands import what only they need when they run (heads pull in scikit-learn and scipy, ~1 s), so
``featx extract`` starts without them.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import fire

from featx import backbones as backbone_registry
from featx.extract import ExtractError, ExtractOptions
from featx.extract import extract as run_extract


def extract(data, backbone="resnet18", weights="DEFAULT", out="features", mirror=None, batch_size=64,
            workers=None, reader="auto", device="auto", amp="auto", channels_last=True, compile=False,
            fold_batch_norm=True, forward_batch=None, decode_on_device=False, dtype="float32",
            compression=None, resize=None, crop=None, draft=False, resize_crop_only=False, shard_size=1024, splits=None,
            overwrite=False, views=1, augment_seed=0):
    """Run a frozen backbone over an ImageFolder tree and cache pooled features in HDF5.

    Writes OUT/BACKBONE/SPLIT.h5 for each split folder (train/, val/, test/) of DATA, or one file for DATA
    itself. An interrupted run resumes where it stopped; a finished one is left alone unless --overwrite.

    Args:
        data: data root (ImageFolder layout, with or without split folders).
        backbone: any torchvision classifier name (resnet18 ... resnet152, mobilenet_v2, squeezenet1_1, ...).
        weights: torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), a state-dict file, or none (random).
        out: output root folder.
        mirror: offline mirror folder with weights/ and datasets/ (default: $FEATX_MIRROR).
        batch_size: images decoded and written together.
        workers: decode threads or processes (default: one per CPU core).
        reader: auto (threads on a CPU-only run: decode, then forward, in turn; processes overlapping with a
            GPU), threads, or processes.
        device: auto, cpu, cuda, cuda:1 ...
        amp: auto (bf16 on CUDA, off on CPU), none, bf16, fp16.
        channels_last: run the model in channels_last memory format.
        compile: on CPU, compile the frozen model ahead of time once and reuse it from $FEATX_CACHE
            (default ~/.cache/featx); on CUDA, torch.compile.
        fold_batch_norm: fold each BatchNorm into the convolution before it (fewer passes over the
            activations; MobileNetV2 ~1.3x on CPU); features change by float32 rounding only. Not under --amp.
        forward_batch: images per model call (default: the whole batch). Features do not depend on it.
        decode_on_device: workers only read plain JPEGs; torchvision decodes, resizes and crops them on DEVICE
            (nvjpeg on CUDA). Other files are still decoded by PIL in the workers; --draft does not apply.
        dtype: stored feature dtype, float32 or float16.
        compression: HDF5 compression of features: gzip or lzf (default none).
        resize: shorter side after resizing (default: the weights' preset, usually 256).
        crop: centre-crop size (default: the weights' preset, usually 224).
        draft: decode JPEGs at reduced size (DCT scaling) before resizing; faster, not bit-exact.
        resize_crop_only: resample only the region the centre crop keeps (half the resize work); ~1 % of
            pixel values differ by one level from the exact path. Not with --decode_on_device's JPEGs.
        shard_size: images per committed shard (the most work an interruption can lose).
        splits: only these splits, e.g. --splits train,val.
        overwrite: recompute and replace existing output.
        views: store this many augmented views (RandomResizedCrop + flip) per training image instead of the
            centre crop, so heads train with augmentation for the cost of VIEWS forward passes.
        augment_seed: seed of the augmented views.
    """
    options = ExtractOptions(batch_size=batch_size, workers=workers, reader=reader, device=device, amp=amp,
                             channels_last=channels_last, compile=compile, forward_batch=forward_batch,
                             fold_batch_norm=fold_batch_norm,
                             decode_on_device=decode_on_device, dtype=dtype, compression=compression,
                             shard_size=shard_size, overwrite=overwrite, views=views, augment_seed=augment_seed)
    transform = None
    if resize is not None or crop is not None or draft or resize_crop_only:
        preset = backbone_registry.create_model(backbone, weights, mirror)[2]
        transform = replace(preset, resize=resize or preset.resize, crop=crop or preset.crop, draft=draft,
                            resize_crop_only=resize_crop_only)
    if isinstance(splits, str):
        splits = splits.split(",")
    run_extract(data, backbone, weights, out, mirror, transform, splits, options)


def fit_head(train, val="auto", head="logreg", out=None, **params):
    """Fit a classifier head on cached features and save it (default heads/BACKBONE/HEAD/).

    Args:
        train: training features file (from `featx extract`).
        val: validation features file; auto = val.h5 beside TRAIN when present; none = a stratified,
            deterministic 20% hold-out of TRAIN (views of one image never split).
        head: logreg (sklearn, C swept on val then refit on train+val), linear (torch nn.Linear, a grid of
            lr x weight decay trained together, streamed from the file), or knn (cosine, k chosen on val).
        out: head folder.
        params: head parameters, e.g. --Cs=[0.01,0.1,1] (logreg), --lrs=[0.01,0.1] --weight_decays=[0,1e-4]
            --epochs=20 --device=cuda --kernel=fused (linear), --ks=[1,5,20] --temperature=0.07 (knn), --seed=0.
    """
    from featx import fit

    fit.fit_head(train, val, head, out, **params)


def evaluate(head, features, out=None):
    """Evaluate a head on a features file: accuracy, balanced accuracy, top-5, per-class P/R/F1, confusion.

    Writes metrics.json and confusion.png to OUT (default HEAD/eval-SPLIT/).
    """
    from featx import fit

    fit.evaluate(head, features, out)


def predict(head, *inputs, topk=5, out=None, show=None, batch_size=64, workers=None, device="auto", mirror=None):
    """Classify image files and folders with backbone + head: top-k classes and probabilities.

    Args:
        head: head folder (from `featx fit-head`).
        inputs: image files and/or folders (searched recursively).
        topk: classes listed per image.
        out: write results here, as JSON if it ends in .json, else CSV (default: CSV on stdout).
        show: also write a contact sheet PNG of the images with predicted (and true) labels.
        batch_size: images decoded together.
        workers: decode threads (CPU) or processes (GPU); default: one per core.
        device: auto, cpu, cuda ...
        mirror: offline mirror to find the backbone's weights in (default: $FEATX_MIRROR).
    """
    if not inputs:
        raise ValueError("give at least one image file or folder to classify")
    from featx import predict as predict_module

    records = predict_module.predict(head, list(inputs), topk, batch_size, workers, device, mirror)
    if out:
        predict_module.write_records(records, out)
    else:
        print(predict_module.to_csv(records), end="")
    for record in records:
        if "error" in record:
            print(f"skipped {record['path']}: {record['error']}", file=sys.stderr)
    accuracy, labelled = predict_module.accuracy(records)
    if labelled:
        print(f"accuracy {accuracy:.4f} on {labelled} images whose folder names their class", file=sys.stderr)
    if show:
        predict_module.contact_sheet(records, show)


def export(head, out, onnx=True, mirror=None):
    """Fuse backbone + head into one model (normalised images -> logits): OUT/model.ts, model.onnx, model.json."""
    from featx import export as export_module

    export_module.export(head, out, onnx, mirror)


def finetune(data, out="runs/finetune", resume=False, mirror=None, **recipe):
    """Fine-tune a backbone end to end with a new head (at --head_lr_mult x the lr), or train from scratch.

    Writes OUT/: run.json, history.json, curves.png, last.pt (every epoch), best.pt (best val accuracy),
    metrics.json + confusion.png of the best model; OUT works with `featx predict` and `featx export`.

    Args:
        data: ImageFolder root with train/ and val/ (or test/).
        out: run folder.
        resume: continue from OUT/last.pt (same recipe) with its optimiser, schedule and RNG state.
        mirror: offline mirror for the weights (default: $FEATX_MIRROR).
        recipe: --backbone resnet18 --weights DEFAULT --init pretrained|scratch
            --head_init random|probe|reuse --probe HEAD_FOLDER --reuse "ants=310,bees=309"|auto
            --freeze none|backbone|layer2 --epochs 5 --batch_size 32 --lr 0.01 --head_lr_mult 10
            --optimizer sgd|adamw --momentum 0.9 --weight_decay 1e-4 --schedule constant|step|cosine
            --step_size 7 --gamma 0.1 --warmup_epochs 0 --resize 256 --crop 224 --workers N
            --reader auto|threads|processes --device auto --amp auto
            --channels_last True|False (default: on for CPU, off for CUDA) --seed 0
    """
    from featx.finetune import FinetuneConfig, Run

    unknown = sorted(set(recipe) - set(FinetuneConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown finetune options {unknown}; see `featx finetune --help`")
    Run(data, out, FinetuneConfig(**recipe), mirror).fit(resume)


def backbones():
    """List the backbone names the registry can build."""
    print("\n".join(backbone_registry.available()))


COMMANDS = {"extract": extract, "fit-head": fit_head, "evaluate": evaluate, "predict": predict, "export": export,
            "finetune": finetune, "backbones": backbones}
USER_ERRORS = (ValueError, FileNotFoundError, ExtractError, ConnectionError)


def main() -> None:
    """Entry point: run a command; user errors print one line and exit 2."""
    try:
        fire.Fire(COMMANDS, name="featx")
    except USER_ERRORS as error:
        print(f"featx: error: {error}", file=sys.stderr)
        sys.exit(2)
