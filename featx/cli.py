"""Command line: ``featx <command> --help``.

Flags are checked against the command before it runs (``featx.flags``), so a misspelled flag costs nothing.
Commands import what only they need when they run (heads pull in scikit-learn and scipy, ~1 s), so
``featx extract`` starts without them. Every user error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import pickle
import sys

import fire

from featx import backbones as backbone_registry
from featx import flags
from featx.engines import EngineError, RayOptions
from featx.extract import ExtractError, ExtractOptions, custom_transform
from featx.extract import extract as run_extract
from featx.version import __version__


def extract(data, backbone="resnet18", weights="DEFAULT", out="features", mirror=None, batch_size=64,
            workers=None, reader="auto", device="auto", precision="auto", runtime="auto", channels_last=True,
            compile=False,
            fold_batch_norm=True, forward_batch=None, decode_on_device=None, dtype="float32",
            compression=None, resize=None, crop=None, draft=False, resize_crop_only=False, shard_size=1024, splits=None,
            overwrite=False, views=1, augment_seed=0, source="auto", root=None, engine="local", ray_address=None,
            ray_workers=None, ray_cpus_per_worker=1, layout="copy", label_key="label", pool="default"):
    """Run a frozen backbone over images and cache their pooled features in HDF5.

    Writes OUT/BACKBONE/SPLIT.h5 for each split of DATA (train/, val/, test/ folders, a manifest's split column),
    or one file for DATA as a whole. An interrupted run resumes where it stopped; a finished one is left alone
    unless --overwrite.

    Args:
        data: a folder of class folders (with or without split folders), a folder of unlabelled images, a CSV or
            Parquet manifest (path, label, split columns), or WebDataset tar shards ('shards/train-{000..009}.tar',
            a glob, or a folder of .tar files).
        source: how to read DATA: auto (from what it is), imagefolder, unlabelled, manifest, webdataset.
        root: the folder a manifest's relative paths start from (default: the manifest's folder).
        label_key: where labels are: the manifest column (or Hugging Face metadata.csv column); for tars the key of
            key.json (key.cls always wins), or txt to take the key.txt captions as labels.
        backbone: any torchvision classifier name (resnet18 ... resnet152, mobilenet_v2, squeezenet1_1, ...),
            timm:NAME[.TAG] (any timm model), open_clip:ARCH[/PRETRAINED] (an OpenCLIP image tower), or
            hf:REPO_OR_FOLDER (a Hugging Face transformers vision model); `featx backbones` lists them.
        weights: DEFAULT (the library's pretrained weights: the mirror first, then a download), a torchvision
            weights name (IMAGENET1K_V1, ...), a state-dict or .safetensors file, or none (random).
        pool: default (the model's own pooled embedding: timm's global_pool, Hugging Face's pooler_output or
            else the class token), cls (the class token), or mean (the mean of the patch tokens); for timm: and
            hf: backbones. Recorded in the file's identity.
        out: output root folder.
        mirror: offline mirror folder holding weights/ and datasets/ (default: $FEATX_MIRROR; none: download).
        batch_size: images decoded and written together.
        workers: decode threads or processes (default: one per CPU core).
        reader: auto (threads on a CPU-only run: decode, then forward, in turn; processes overlapping with a
            GPU), threads, pipeline (threads decoding ahead of the model, overlapping it), or processes.
        device: auto, cpu, cuda, cuda:1 ...
        precision: auto (bf16 on CUDA, exact fp32 on CPU), fp32, bf16 or fp16 (on a CPU only where it has them
            natively: AVX512_BF16 / AMX; elsewhere refused, as emulation is slower than fp32). Recorded in the
            file's identity, so a resumed run never mixes precisions.
        runtime: what runs the model: auto (on CPU in fp32, the faster of torch and onnxruntime whose features
            stay within 1e-4 of PyTorch fp32, measured once per model and host), torch, or onnxruntime (CPU, fp32;
            pip install 'featx[onnx]'). Recorded in the provenance.
        channels_last: run the model in channels_last memory format.
        compile: on CPU, compile the frozen model ahead of time once and reuse it from $FEATX_CACHE
            (default ~/.cache/featx); on CUDA, torch.compile.
        fold_batch_norm: fold each BatchNorm into the convolution before it (fewer passes over the
            activations; MobileNetV2 ~1.3x on CPU); features change by float32 rounding only. Not in bf16/fp16.
        forward_batch: images per model call (default: the whole batch). Features do not depend on it.
        decode_on_device: threads only read the files' bytes; JPEGs are decoded in one batched call, resized and
            cropped on DEVICE (nvjpeg on CUDA), EXIF orientation applied. Other files, and JPEGs the device
            decoder rejects, take the CPU path (PIL). Default: on with CUDA, off on CPU; --draft does not apply.
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
        engine: local (this process) or ray (shards run by Ray actors on a cluster; pip install 'featx[ray]').
        ray_address: the Ray cluster to join: auto, ray://host:port (default: start a local Ray instance).
        ray_workers: Ray actors (default: one per GPU when the cluster has GPUs, else its CPUs divided by
            --ray_cpus_per_worker).
        ray_cpus_per_worker: CPU cores each Ray actor gets (its decode threads and torch threads).
        layout: copy (one merged file) or virtual (SPLIT.h5 reads the shards in SPLIT.h5.parts/ in place: no copy
            of the rows, for very large splits; keep the shards beside it).
    """
    options = ExtractOptions(batch_size=batch_size, workers=workers, reader=reader, device=device, precision=precision,
                             runtime=runtime, channels_last=channels_last, compile=compile,
                             forward_batch=forward_batch, fold_batch_norm=fold_batch_norm,
                             decode_on_device=decode_on_device, dtype=dtype, compression=compression,
                             shard_size=shard_size, overwrite=overwrite, views=views, augment_seed=augment_seed,
                             layout=layout)
    transform = custom_transform(backbone, weights, mirror, resize, crop, draft, resize_crop_only, pool)
    if isinstance(splits, str):
        splits = splits.split(",")
    ray_options = RayOptions(ray_address, ray_workers, ray_cpus_per_worker)
    run_extract(data, backbone, weights, out, mirror, transform, splits, options, source, root, engine, ray_options,
                label_key, pool)


def fit_head(train, val="auto", head="logreg", out=None, **params):
    """Fit a classifier head on cached features and save it (default heads/BACKBONE/HEAD/).

    Args:
        train: training features file (from `featx extract`).
        val: validation features file; auto = val.h5 beside TRAIN when present; none = a stratified,
            deterministic 20% hold-out of TRAIN (views of one image never split).
        head: logreg (sklearn, C swept on val then refit on train+val), linear (torch nn.Linear, a grid of
            lr x weight decay trained together, streamed from the file), knn (cosine, k chosen on val), or zeroshot
            (features of an open_clip: backbone; the class names in --prompts through CLIP's text tower, no
            training).
        out: head folder (default: heads/BACKBONE/HEAD). Reports of a head it replaces are deleted.
        Cs: logreg: the C values swept, e.g. --Cs=[0.01,0.1,1] (default: 23 values, 1e-6 ... 1e5).
        max_iter: logreg: lbfgs iterations per fit (default 1000).
        refit: logreg, knn: refit the chosen model on train + val (default True).
        lrs: linear: learning rates of the grid (default [0.003,0.03,0.3]).
        weight_decays: linear: weight decays of the grid (default [0,1e-4,1e-3,1e-2]).
        epochs: linear: passes over train (default: at least 5 and 300 steps).
        batch_size: linear: rows per SGD step (default 1024); knn: rows scored together.
        block_rows: linear: rows read per block (default: about 128 MB).
        device: linear: auto, cpu, cuda (default auto).
        ks: knn: the k values tried (default [1,3,5,10,20,50]).
        temperature: knn: vote temperature (default 0.07).
        seed: the hold-out's and the head's seed (default 0).
        prompts: zeroshot: the prompt, {} standing for the class name (default "a photo of a {}.").
        mirror: zeroshot: offline mirror to find the CLIP weights in (default: $FEATX_MIRROR).
    """
    from featx import fit

    fit.fit_head(train, val, head, out, **params)


def evaluate(head, features, out=None, trust_pickle=False):
    """Evaluate a head on a features file: accuracy, balanced accuracy, top-5, per-class P/R/F1, confusion.

    Writes metrics.json, predictions.csv and confusion.png to OUT.

    Args:
        head: head folder (from `featx fit-head`).
        features: features file to score (from `featx extract`, same backbone and weights as the head).
        out: report folder (default: HEAD/eval-SPLIT).
        trust_pickle: also load an older featx's pickled logreg head (model.joblib); it can run code.
    """
    from featx import fit

    fit.evaluate(head, features, out, trust_pickle)


def predict(head, *inputs, topk=5, out=None, show=None, show_limit=48, batch_size=64, workers=None, device="auto",
            mirror=None, trust_pickle=False):
    """Classify image files and folders with backbone + head: top-k classes and probabilities.

    Args:
        head: head folder (from `featx fit-head`) or finetune run folder.
        inputs: image files and/or folders (searched recursively).
        topk: classes listed per image.
        out: write results here, as JSON if it ends in .json, else CSV (default: CSV on stdout).
        show: also write a contact sheet PNG: mistakes first, then the least confident, with file names.
        show_limit: most images on the contact sheet.
        batch_size: images decoded together.
        workers: decode threads (CPU) or processes (GPU); default: one per core.
        device: auto, cpu, cuda ...
        mirror: offline mirror to find the backbone's weights in (default: $FEATX_MIRROR).
        trust_pickle: also load an older featx's pickled logreg head (model.joblib); it can run code.
    """
    from featx.predict import run as run_predict

    run_predict(head, list(inputs), topk, out, show, show_limit, batch_size, workers, device, mirror, trust_pickle)


def export(head, out, onnx=True, mirror=None, trust_pickle=False):
    """Fuse backbone + head into one deployable model: normalised images -> logits.

    Writes OUT/model.ts (TorchScript), model.pt2 (torch.export), model.onnx and model.json (classes, preprocessing).

    Args:
        head: head folder (from `featx fit-head`) or finetune run folder.
        out: folder to write the exported model to.
        onnx: also write model.onnx (needs the onnx extra: pip install 'featx[onnx]').
        mirror: offline mirror to find the backbone's weights in (default: $FEATX_MIRROR).
        trust_pickle: also load an older featx's pickled logreg head (model.joblib); it can run code.
    """
    from featx import export as export_module

    export_module.export(head, out, onnx, mirror, trust_pickle)


def finetune(data, out="runs/finetune", resume=False, overwrite=False, mirror=None, trust_pickle=False, **recipe):
    """Fine-tune a backbone end to end with a new head (at --head_lr_mult x the lr), or train from scratch.

    Writes OUT/: run.json, checkpoint.json -> checkpoints/epoch-N/ (state, best weights, history; each epoch
    committed as one unit), history.json, curves.png, and metrics.json + confusion.png of the best model. OUT
    works with `featx predict` and `featx export`.

    Args:
        data: ImageFolder root with train/ and val/ (or test/); without val/, --val_fraction of train is held out.
        out: run folder.
        resume: continue from OUT's last finished epoch (same recipe; --epochs may grow) with its optimiser,
            schedule and RNG state.
        overwrite: replace the run already in OUT (without it, featx refuses to touch it).
        mirror: offline mirror for the weights (default: $FEATX_MIRROR).
        trust_pickle: let --probe load an older featx's pickled logreg head (model.joblib); it can run code.
        backbone: torchvision backbone name, timm:NAME[.TAG], open_clip:ARCH[/PRETRAINED] or hf:REPO_OR_FOLDER.
        weights: DEFAULT, a torchvision weights name, a state-dict or .safetensors file, or none.
        pool: default, cls or mean (timm: and hf: backbones; see `featx extract --help`).
        init: pretrained, or scratch (random backbone: the from-scratch baseline).
        head_init: random (Xavier), probe (a fit-head head: LP-FT), or reuse (the ImageNet classifier's rows).
        probe: head folder for --head_init probe.
        reuse: for --head_init reuse: "ants=310,bees=309", or auto (match ImageNet class names).
        freeze: none, backbone (train only the head), or a module name: it and everything before it are frozen.
        epochs: training epochs.
        batch_size: images per step.
        lr: backbone learning rate (default: 0.01 for --head_init random, 1e-4 for probe and reuse).
        head_lr_mult: the new head's lr is this times --lr (default: 10 for a random head, 1 for probe and reuse).
        optimizer: sgd or adamw.
        momentum: SGD momentum.
        weight_decay: weight decay.
        schedule: constant, step, or cosine (per step, after the warm-up).
        step_size: step schedule: epochs between lr drops.
        gamma: step schedule: lr factor at each drop.
        warmup_epochs: linear warm-up length in epochs.
        resize: shorter side after resizing (default: the weights' preset).
        crop: crop size (default: the weights' preset).
        workers: decode threads or processes (default: one per core).
        reader: auto, threads, or processes.
        device: auto, cpu, cuda ...
        amp: auto (bf16 on CUDA), none, bf16, fp16.
        channels_last: channels_last memory format (default: on for CPU, off on CUDA).
        val_fraction: share of train held out for validation when DATA has no val/ split.
        source: how to read DATA: auto, imagefolder, manifest, webdataset (labelled sources only).
        label_key: the manifest column, tar JSON key, or txt (tar captions) that holds the label.
        seed: seed of the head, the shuffling, the augmentation and the hold-out.
    """
    from featx.finetune import FinetuneConfig
    from featx.finetune import finetune as run_finetune

    run_finetune(data, out, FinetuneConfig(**recipe), mirror, trust_pickle, resume, overwrite)


def export_features(features, out, format=None, normalize=False):
    """Write a features file for the tools that index and search embeddings (FAISS/autofaiss, DuckDB, Spark, pandas).

    OUT.parquet: one file, a row per image (path, label, class_name, split, caption and json where the source had
    them, embedding as a fixed-size list of float32), the provenance in its metadata. OUT with no extension: a folder
    in clip-retrieval's npy layout (img_emb/img_emb_0.npy + metadata/metadata_0.parquet) that embedding-reader and
    autofaiss read as it is. Streamed in chunks: memory stays flat.

    Args:
        features: features file (from `featx extract`).
        out: OUT.parquet, or a folder name with no extension (npy).
        format: parquet or npy (default: from OUT's extension; a mismatch is refused).
        normalize: L2-normalise each embedding (for cosine search with an inner-product index).
    """
    from featx.export_features import export_features as write

    print(f"wrote {write(features, out, format, normalize)}")


def info(features):
    """Print a features file's provenance (backbone, weights, preprocessing, data, featx version) and counts.

    Args:
        features: features file (from `featx extract`).
    """
    from featx import store

    print(store.summary(features))


def backbones(mirror=None):
    """List the backbones the registry can build, a family at a time: name, feature width, and whether the
    weights are here offline (the mirror, the download caches) or would be downloaded.

    Args:
        mirror: offline mirror folder (default: $FEATX_MIRROR).
    """
    rows = [("BACKBONE", "FEATURES", "WEIGHTS"), *backbone_registry.listing(mirror)]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    print("\n".join(f"{name:{widths[0]}}  {dim:>{widths[1]}}  {where}" for name, dim, where in rows))


COMMANDS = {"extract": extract, "fit-head": fit_head, "evaluate": evaluate, "predict": predict, "export": export,
            "finetune": finetune, "export-features": export_features, "info": info, "backbones": backbones}
USER_ERRORS = (ValueError, OSError, ExtractError, pickle.UnpicklingError, EngineError)


def extra_flags(command: str) -> dict[str, object]:
    """Flags a command takes through ``**kwargs``: head parameters, the finetune recipe (name -> default)."""
    if command == "finetune":
        from featx.finetune import FinetuneConfig

        return {name: field.default for name, field in FinetuneConfig.__dataclass_fields__.items()}
    if command == "fit-head":
        from featx.heads import HEADS

        return {name: None for head in HEADS.values() for name in head._get_param_names()}
    return {}


def overview() -> str:
    """``featx --help``."""
    lines = [f"featx {__version__}: cache frozen-backbone image features in HDF5, fit heads, fine-tune.", "",
             "usage: featx COMMAND ARGS [flags]     featx COMMAND --help     featx --version", "", "commands:"]
    lines += [f"  {name:<12} {flags.documented(function)[0].splitlines()[0]}" for name, function in COMMANDS.items()]
    return "\n".join(lines)


def run(argv: list[str]) -> None:
    """Check ``argv`` (command, then its arguments) and run the command."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return
    if argv[0] in ("--version", "version"):
        print(f"featx {__version__}")
        return
    command, args = argv[0], flags.normalise(argv[1:])
    if command not in COMMANDS:
        close = flags.closest(command, COMMANDS)
        hint = f"did you mean {close}?" if close else f"commands: {', '.join(COMMANDS)}"
        raise flags.UsageError(f"no command {command!r}; {hint}")
    function, extra = COMMANDS[command], extra_flags(command)
    before_separator = args[:args.index("--")] if "--" in args else args
    if "-h" in before_separator or "--help" in before_separator:
        print(flags.help_page(command, function, extra))
        return
    positional, known = flags.signature_flags(function)
    flags.check(command, positional, {**known, **extra}, args)
    fire.Fire(COMMANDS, [command, *args], name="featx")


def guarded(function, *args) -> None:
    """Run ``function(*args)``; a user error prints one line (``featx: error: ...``) and exits with status 2."""
    try:
        function(*args)
    except USER_ERRORS as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"featx: error: {message}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Entry point of the ``featx`` command."""
    guarded(run, sys.argv[1:])
