"""Command line: ``featx <command> --help``.

Flags are checked against the command before it runs (``featx.flags``), so a misspelled flag costs nothing.
Commands import what only they need when they run (heads pull in scikit-learn and scipy, ~1 s), so
``featx extract`` starts without them. Every user error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
import textwrap

import fire

from featx import api, flags, storage
from featx import backbones as backbone_registry
from featx.compare import compare
from featx.engines import EngineError
from featx.extract import ExtractError
from featx.version import __version__


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
            precision="auto", runtime="auto", mirror=None, trust_pickle=False):
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
        precision: auto, fp32, bf16 or fp16, as `featx extract --precision`.
        runtime: auto, torch or onnxruntime, as `featx extract --runtime` (auto: the same remembered choice).
        mirror: offline mirror to find the backbone's weights in (default: $FEATX_MIRROR).
        trust_pickle: also load an older featx's pickled logreg head (model.joblib); it can run code.
    """
    from featx.predict import run as run_predict

    run_predict(head, list(inputs), topk, out, show, show_limit, batch_size, workers, device, mirror, trust_pickle,
                precision, runtime)


def export(head, out, onnx=True, mirror=None, trust_pickle=False):
    """Fuse backbone + head into one deployable model: normalised images -> logits.

    Writes OUT/model.ts (TorchScript), model.pt2 (torch.export), model.onnx and model.json (classes, preprocessing).

    Args:
        head: head folder (from `featx fit-head`) or finetune run folder.
        out: folder to write the exported model to.
        onnx: also write model.onnx.
        mirror: offline mirror to find the backbone's weights in (default: $FEATX_MIRROR).
        trust_pickle: also load an older featx's pickled logreg head (model.joblib); it can run code.
    """
    from featx import export as export_module

    export_module.export(head, out, onnx, mirror, trust_pickle)


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


def info(path):
    """Describe what PATH holds: a features file, a head or a finetune run.

    A features file: its provenance (backbone, weights, preprocessing, data, featx version) and counts; a head: its
    kind, classes, features and choice; a finetune run: its recipe, data, epochs and score.

    Args:
        path: a features file (from `featx extract`), a head folder (`featx fit-head`) or a finetune run folder.
    """
    from featx import store

    path = storage.location(path)
    if storage.is_url(path):
        print(store.summary(path))
    elif (path / "head.json").is_file():
        from featx.heads import describe

        print(describe(path))
    elif (path / "run.json").is_file():
        from featx.finetuning import describe_run

        print(describe_run(path))
    elif path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.h5") if not p.parent.name.endswith(".parts"))
        hint = f"; the features files in it: {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}" if files else ""
        raise ValueError(f"{path} is a folder, not a features file, a head or a finetune run{hint}")
    else:
        print(store.summary(path))


def backbones(mirror=None, runtimes=False, forget_runtimes=False):
    """List the backbones the registry can build, a family at a time: name, feature width, and whether the
    weights are here offline (the mirror, the download caches) or would be downloaded.

    Args:
        mirror: offline mirror folder (default: $FEATX_MIRROR).
        runtimes: list instead the runtime choices `--runtime auto` remembers on this host (per model, batch,
            threads and versions), with what it measured.
        forget_runtimes: forget them: the next `--runtime auto` run of each model measures again.
    """
    from featx.runtimes import remembered_choices

    if forget_runtimes:
        for choice in remembered_choices():
            os.remove(choice["file"])
            print(f"forgot {choice['file']}")
        return
    if runtimes:
        for choice in remembered_choices():
            rates = ", ".join(f"{name} {m['images_per_second']:.1f} img/s{'' if m['exact'] else ' (not exact)'}"
                              for name, m in choice.get("measured", {}).items())
            print(f"{choice.get('backbone', '?')}: {choice['runtime']} (batch {choice.get('batch', '?')}, "
                  f"{choice.get('threads', '?')} threads, torch {choice.get('torch', '?')}, onnxruntime "
                  f"{choice.get('onnxruntime', '?')}; {rates or choice.get('onnxruntime_failed', '')}; "
                  f"{choice.get('measured_at', '')}) {choice['file']}")
        return
    rows = [("BACKBONE", "FEATURES", "WEIGHTS"), *backbone_registry.listing(mirror)]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    print("\n".join(f"{name:{widths[0]}}  {dim:>{widths[1]}}  {where}" for name, dim, where in rows))


def as_command(function):
    """A Python API function as a command: the same signature and help; what it returns is not printed."""
    @functools.wraps(function)
    def run_command(*args, **kwargs) -> None:
        function(*args, **kwargs)

    return run_command


COMMANDS = {"extract": as_command(api.extract), "fit-head": fit_head, "evaluate": evaluate, "predict": predict,
            "export": export, "finetune": as_command(api.finetune), "export-features": export_features, "info": info,
            "backbones": backbones, "compare": as_command(compare)}
USER_ERRORS = (ValueError, OSError, ExtractError, pickle.UnpicklingError, EngineError)


def extra_flags(command: str) -> dict[str, object]:
    """Flags a command takes through ``**kwargs``: head parameters, the finetune recipe (name -> default)."""
    if command == "finetune":
        from featx.finetuning import FinetuneConfig

        return {name: field.default for name, field in FinetuneConfig.__dataclass_fields__.items()}
    if command == "compare":
        from featx.compare import recipe_flags

        return recipe_flags()
    if command == "fit-head":
        from featx.heads import HEADS

        return {name: None for head in HEADS.values() for name in head._get_param_names()}
    return {}


def overview() -> str:
    """``featx --help``."""
    lines = [f"featx {__version__}: cache frozen-backbone image features in HDF5, fit heads, fine-tune.", "",
             "usage: featx COMMAND ARGS [flags]     featx COMMAND --help     featx --version", "",
             "Files and folders may be URLs (s3://, http(s)://, any fsspec scheme): credentials from the standard",
             "chain (AWS_* variables, ~/.aws, AWS_ENDPOINT_URL); --storage_options JSON for anything else.", "",
             "commands:"]
    for name, function in COMMANDS.items():
        lines += textwrap.wrap(flags.first_sentence(function), flags.WIDTH, initial_indent=f"  {name:<16}",
                               subsequent_indent=" " * 18)
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
    args, storage_options = flags.take(args, "storage_options")
    storage.configure(storage_options)
    if command not in COMMANDS:
        close = flags.closest(command, COMMANDS)
        hint = f"did you mean {close}?" if close else f"commands: {', '.join(COMMANDS)}"
        raise flags.UsageError(f"no command {command!r}; {hint}")
    function, extra = COMMANDS[command], extra_flags(command)
    before_separator = args[:args.index("--")] if "--" in args else args
    if "-h" in before_separator or "--help" in before_separator:
        print(flags.help_page(command, function, extra, api.finetune if command == "compare" else None))
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
