"""The Python API for notebooks and scripts: ``featx.extract`` and ``featx.finetune`` are the commands themselves
(``featx extract`` and ``featx finetune`` call these functions: the same flags, names and defaults), plus
``featx.embed_images``, ``featx.load``, ``featx.to_dataframe``."""

from __future__ import annotations

import numpy as np
from PIL import Image

from featx.backbones import BackboneSpec, create_backbone
from featx.decode import EvalTransform, collate, load_rgb, to_rgb
from featx.embed import embedder_for
from featx.engines import RayOptions, ray_available
from featx.export_features import to_dataframe
from featx.extract import extract as run_extract
from featx.options import ExtractOptions
from featx.store import load


def extract(data, backbone="resnet18", weights="DEFAULT", out="features", *, mirror=None, batch_size=64,
            workers=None, reader="auto", device="auto", precision="auto", runtime="auto", channels_last=True,
            compile=False, fold_batch_norm=True, forward_batch=None, decode_on_device=None, dtype="float32",
            compression=None, resize=None, crop=None, draft=False, resize_crop_only=False, shard_size=1024,
            splits=None, overwrite=False, views=1, augment_seed=0, source="auto", root=None, engine="local",
            ray_address=None, ray_workers=None, ray_cpus_per_worker=1, layout="copy", label_key="label",
            path_key="path", pool="default") -> dict[str, dict]:
    """Run a frozen backbone over images and cache their pooled features in HDF5.

    Writes OUT/BACKBONE/SPLIT.h5 for each split of DATA (train/, val/, test/ folders, a manifest's split column),
    or one file for DATA as a whole. An interrupted run resumes where it stopped (with the runtime it started with);
    a finished one is left alone unless --overwrite. From Python, returns per split the written file (path), row and
    failure counts, timing and the failed files.

    Args:
        data: a folder of class folders (with or without split folders), a folder of unlabelled images, a CSV or
            Parquet manifest (path, label, split columns), or WebDataset tar shards ('shards/train-{000..009}.tar',
            a glob, or a folder of .tar files).
        source: how to read DATA: auto (from what it is), imagefolder, unlabelled, manifest, webdataset.
        root: the folder a manifest's relative paths start from (default: the manifest's folder).
        label_key: where labels are: the manifest column (or Hugging Face metadata.csv column); for tars the key of
            key.json (key.cls always wins), or txt to take the key.txt captions as labels.
        path_key: the manifest column that holds the image paths (default path; image_path, file_name, image ...
            are read with a note when there is no path column).
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
            natively: AVX512_BF16 / AMX; elsewhere refused, as emulation is slower than fp32), or int8 (CPU, ONNX
            Runtime: calibrated on 32 of your train images, refused in one line where it moves the features of 32
            others below cosine 0.99 to fp32; local engine). Recorded in the file's identity, so a resumed run
            never mixes precisions.
        runtime: what runs the model: auto (on CPU in fp32, the faster of torch and onnxruntime whose features
            stay within 1e-4 of PyTorch fp32, measured once per model and host), torch, or onnxruntime (CPU, fp32;
            ONNX Runtime comes with featx). Recorded in the provenance.
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
        splits: only these splits, e.g. --splits train,val (from Python, also a list).
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
    spec = BackboneSpec(backbone, weights, mirror, pool, resize, crop, draft, resize_crop_only)
    splits = splits.split(",") if isinstance(splits, str) else splits
    return run_extract(data, spec, out, options=options, splits=splits, source=source, root=root, engine=engine,
                       label_key=label_key, path_key=path_key,
                       ray_options=RayOptions(ray_address, ray_workers, ray_cpus_per_worker))


def finetune(data, out="runs/finetune", *, resume=False, overwrite=False, mirror=None, trust_pickle=False,
             engine="local", ray_address=None, ray_workers=2, ray_cpus_per_worker=1, ray_gpus_per_worker=0,
             **recipe) -> dict:
    """Fine-tune a backbone end to end with a new head (at --head_lr_mult x the lr), or train from scratch.

    Writes OUT/: run.json, checkpoint.json -> checkpoints/epoch-N/ (state, best weights, history; each epoch
    committed as one unit), history.json, curves.png, and metrics.json + confusion.png of the best model. OUT
    works with `featx predict` and `featx export`. From Python, returns the best-by-val model's metrics.

    Args:
        data: ImageFolder root with train/ and val/ (or test/); without val/, --val_fraction of train is held out.
        out: run folder.
        resume: continue from OUT's last finished epoch (same recipe; --epochs may grow) with its optimiser,
            schedule and RNG state.
        overwrite: replace the run already in OUT (without it, featx refuses to touch it).
        mirror: offline mirror for the weights (default: $FEATX_MIRROR).
        trust_pickle: let --probe load an older featx's pickled logreg head (model.joblib); it can run code.
        engine: local (this process), or ray (DDP over --ray_workers processes on Ray Train: gloo on CPUs, NCCL on
            GPUs; the same global batch and order, each worker taking its part; pip install 'featx[ray]').
        ray_address: the Ray cluster to join: HOST:PORT, auto, ray://host:port (default: a local Ray instance).
        ray_workers: DDP workers.
        ray_cpus_per_worker: CPU cores each worker gets (its torch and decode threads).
        ray_gpus_per_worker: GPUs each worker gets.
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
        path_key: the manifest column that holds the image paths (default path; image_path, file_name, image ...
            are read with a note when there is no path column).
        seed: seed of the head, the shuffling, the augmentation and the hold-out.
        sync_bn: --engine ray: BatchNorm statistics over the global batch (default: each worker's own).
    """
    from featx.finetuning import FinetuneConfig, LocalEngine  # scikit-learn and the heads: only to fine-tune
    from featx.finetuning import finetune as run_finetune

    unknown = sorted(set(recipe) - set(FinetuneConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"finetune has no flag {', '.join(unknown)}; `featx finetune --help` lists them")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be local or ray; got {engine!r}")
    if engine == "ray" and not ray_available():
        raise ValueError("--engine ray needs Ray: pip install 'featx[ray]'")
    if engine == "ray":
        from featx.ray_training import RayEngine, RayTrainOptions

        training_engine = RayEngine(RayTrainOptions(ray_address, ray_workers, ray_cpus_per_worker, ray_gpus_per_worker))
    else:
        training_engine = LocalEngine()
    return run_finetune(data, out, FinetuneConfig(**recipe), mirror=mirror, trust_pickle=trust_pickle, resume=resume,
                        overwrite=overwrite, engine=training_engine)


def embed_images(images: list, backbone: str = "resnet18", weights: str = "DEFAULT", *, mirror: str | None = None,
                 batch_size: int = 64, device: str = "auto", transform: EvalTransform | None = None,
                 pool: str = "default", runtime: str = "auto") -> np.ndarray:
    """Pooled features [N, D] (float32) of image files or PIL images, in memory: the preprocessing and numbers of
    ``extract`` (timm's ``num_classes=0``, img2vec's ``get_vec``). An image that cannot be decoded is an error
    naming it."""
    extractor = create_backbone(backbone, weights, mirror, transform, pool)
    embedder = embedder_for(extractor, device, runtime=runtime, batch_size=batch_size)
    rows = []
    for start in range(0, len(images), batch_size):
        pixels = [(i, extractor.transform(_rgb(image)), "") for i, image in enumerate(images[start:start + batch_size])]
        rows.append(embedder(collate(pixels).images).numpy())
    return np.concatenate(rows) if rows else np.empty((0, extractor.feature_dim), np.float32)


def _rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    try:
        return load_rgb(image)
    except Exception as error:  # noqa: BLE001 - named in one line
        raise ValueError(f"cannot decode {image}: {type(error).__name__}: {error}") from None


__all__ = ["embed_images", "extract", "finetune", "load", "to_dataframe"]
