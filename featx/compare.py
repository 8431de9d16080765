"""``featx compare``: which backbone, which head, and would more labels help, on the user's own labelled images.

Every backbone's features are extracted once into OUT/features/ (``featx.extract``: a rerun, or a rerun after a
kill, extracts only what is missing). Each head is fitted as ``featx fit-head --val none`` fits it (its
regularisation chosen on a hold-out of train) into OUT/heads/ and scored as ``featx evaluate`` scores it, on the
held-out split (test, else val). Around that: bootstrap confidence intervals over the held-out images (one seeded
set of resamples for every row, so differences are paired), seeded few-shot draws of the training set (label
efficiency), near-duplicate leakage between train and the held-out split (``featx.leakage``), and the fine-tuning
recipes asked for. ``featx.report`` writes the files.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featx import api, leakage, storage, store
from featx.backbones import BackboneSpec, NoTextTower, folder_name
from featx.decode import EvalTransform, ImageFiles
from featx.sources import Split, discover
from featx.version import __version__

ALL = "all"  # --shots: every training image
RECIPES = {  # --finetune: FinetuneConfig changes; lp-ft starts from this backbone's logreg head
    "finetune": {}, "lp-ft": {"head_init": "probe"}, "frozen": {"freeze": "backbone"},
    "scratch": {"init": "scratch", "head_lr_mult": 1.0},
}
SHARED_WITH_EXTRACT = ("device", "workers", "resize", "crop", "pool")  # recipe flags that extraction takes too
# FinetuneConfig fields that are not compare's recipe flags: set by compare, by each recipe, or Ray-only
SET_BY_COMPARE = ("backbone", "weights", "probe", "seed", "source", "label_key", "path_key", "init", "head_init",
                  "reuse", "freeze", "sync_bn")
TIMING_KEYS = ("images_per_second", "fit_seconds", "seconds")  # what a rerun measures anew


@dataclass(frozen=True)
class Candidate:
    """A backbone to compare: its name on the leaderboard (``NAME`` or ``NAME=WEIGHTS``), registry name, weights."""

    label: str
    name: str
    weights: str

    @property
    def folder(self) -> str:
        return folder_name(self.label.replace("=", "@"))


def _items(value) -> list:
    """A flag's list: ``a,b`` from the command line (fire gives text, a number or a tuple) or a Python list."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else \
        [] if value is None else [value]
    return [item.strip() if isinstance(item, str) else item for item in items if item != ""]


def parse_backbones(value) -> list[Candidate]:
    """``NAME[=WEIGHTS],...`` as candidates, each called by its name (by NAME=WEIGHTS where a name comes twice);
    none, or one named twice with the same weights, is an error."""
    pairs = [tuple(str(item).split("=", 1)) if "=" in str(item) else (str(item), "DEFAULT") for item in _items(value)]
    if not pairs:
        raise ValueError("--backbones names no backbone: e.g. --backbones resnet50,timm:convnext_tiny "
                         "(`featx backbones` lists them)")
    names = [name for name, _ in pairs]
    candidates = [Candidate(name if names.count(name) == 1 else f"{name}={weights}", name, weights)
                  for name, weights in pairs]
    folders = [c.folder for c in candidates]
    twice = sorted({c.label for c in candidates if folders.count(c.folder) > 1})
    if twice:
        raise ValueError(f"--backbones names {', '.join(twice)} more than once")
    return candidates


def parse_shots(value) -> list:
    """``1,2,4,...,all`` as sorted positive integers, then ``all``."""
    shots = []
    for item in _items(value):
        if item == ALL:
            shots.append(ALL)
        elif isinstance(item, bool) or not (isinstance(item, int) or str(item).isdigit()) or int(item) < 1:
            raise ValueError(f"--shots takes positive numbers of images per class and all; got {item!r}")
        else:
            shots.append(int(item))
    if not shots:
        raise ValueError("--shots is empty: e.g. --shots 1,2,4,8,16,all")
    return sorted({s for s in shots if s != ALL}) + ([ALL] if ALL in shots else [])


def _choices(value, known, flag: str) -> list[str]:
    chosen = [str(item) for item in _items(value)]
    unknown = [item for item in chosen if item not in known]
    if unknown:
        raise ValueError(f"{flag} must name some of {', '.join(known)}; got {', '.join(unknown)}")
    return list(dict.fromkeys(chosen))


def _count(value, flag: str, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{flag} must be an integer of at least {least}; got {value!r}")
    return value


def resampled(labels: np.ndarray, predicted: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and balanced accuracy on each bootstrap resample of the images (a row of ``indices``); the same
    ``indices`` for every model make their differences paired."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    correct = (labels == predicted)[indices]
    recalls = []
    for label in np.unique(labels):
        member = (labels == label)[indices]
        count = member.sum(1)
        recalls.append(np.where(count > 0, (correct & member).sum(1) / np.maximum(count, 1), np.nan))
    return {"accuracy": correct.mean(1), "balanced_accuracy": np.nanmean(np.stack(recalls), 0)}


def interval(values: np.ndarray, confidence: float = 0.95) -> list[float]:
    """The central ``confidence`` interval of bootstrap ``values`` (percentile method)."""
    return [float(q) for q in np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])]


def _softmax_max(scores: np.ndarray) -> np.ndarray:
    """The probability of each row's predicted class, from logits."""
    scores = np.asarray(scores, np.float64)
    exp = np.exp(scores - scores.max(1, keepdims=True))
    return exp.max(1) / exp.sum(1)


def held_out_split(splits: dict[str, Split], split: str, data) -> str:
    """The split scored: ``split``, or for ``auto`` test, else val; train must be there too."""
    wanted = ("test", "val") if split == "auto" else (split,)
    held = next((name for name in wanted if name in splits), None)
    if "train" not in splits or held is None:
        raise ValueError(f"compare needs a train split and a held-out {' or '.join(wanted)} split; "
                         f"{storage.shown(data)} has {', '.join(splits) or 'none'} (use DATA/train/CLASS/ and "
                         "DATA/val/CLASS/ folders, or a manifest's split column)")
    return held


def check_shots(shots: list, train: Split) -> None:
    """More images per class than the smallest class holds is refused, naming it."""
    counts = np.bincount(train.labels[train.labels >= 0], minlength=len(train.class_names))
    smallest = int(counts.argmin())
    too_many = [s for s in shots if s != ALL and s > counts[smallest]]
    if too_many:
        raise ValueError(f"--shots {too_many[0]} is more than the smallest class ({train.class_names[smallest]}: "
                         f"{counts[smallest]} training images) holds; use at most {counts[smallest]}, or all")


def recipe_flags() -> dict:
    """The fine-tuning recipe's flags compare takes for its ``--finetune`` rows (name -> default): finetune's,
    less what compare sets itself or takes as its own flag (``--batch_size`` serves both)."""
    from featx.finetuning import FinetuneConfig

    own = inspect.signature(compare).parameters
    return {name: field.default for name, field in FinetuneConfig.__dataclass_fields__.items()
            if name not in SET_BY_COMPARE and name not in own}


def compare(data, backbones=None, heads="logreg,linear,knn", shots="1,2,4,8,16,all", repeats=5, finetune=None,
            out="compare", *, split="auto", bootstrap=1000, seed=0, mirror=None, batch_size=64, source="auto",
            root=None, label_key="label", path_key="path", **recipe) -> dict:
    """Rank backbones x heads (and fine-tuning recipes) on your labelled images, with confidence intervals, label
    efficiency and near-duplicate leakage; writes OUT/report.html and its tables and figures.

    Writes OUT/: leaderboard.csv/.json/.md, label_efficiency.csv, curves.png, confusion-LEADER.png,
    mistakes-LEADER.png and one self-contained report.html; OUT/features/ (reused by a rerun), OUT/heads/ (each a
    `featx fit-head` head) and OUT/finetune/. From Python, returns what leaderboard.json holds.

    Args:
        data: labelled images with a train split and a val or test split (class folders, a manifest, tars).
        backbones: NAME[=WEIGHTS],... : any `featx backbones` name (resnet50, timm:..., open_clip:..., hf:...),
            with its weights (default DEFAULT; a file, or a name in the mirror).
        heads: logreg, linear, knn, zeroshot (CLIP backbones only), each fitted as `featx fit-head --val none`.
        shots: training images per class for the label-efficiency draws, and all.
        repeats: seeded draws per number of shots.
        finetune: fine-tuning recipes to add as rows: finetune (new head at 10x lr), lp-ft (from the logreg
            head), frozen (head only), scratch; each takes `featx finetune`'s recipe flags (--epochs, --lr,
            --batch_size ...), and its score is held out only where DATA has a test split (val picks its epoch).
        out: output folder (local).
        split: the held-out split scored: auto (test, else val), val or test.
        bootstrap: bootstrap resamples of the held-out images for the 95 % intervals.
        seed: seed of the draws, the resamples and the fine-tuning; recorded in every output.
        mirror: offline mirror for weights (default: $FEATX_MIRROR).
        batch_size: images per batch, extracting and fine-tuning.
        source: how to read DATA: auto, imagefolder, manifest, webdataset.
        root: the folder a manifest's relative paths start from.
        label_key: the manifest column or tar JSON key holding the label.
        path_key: the manifest column holding the image paths.
    """
    from featx import report  # scikit-learn, scipy, matplotlib: only when comparing
    from featx.heads import HEADS

    candidates = parse_backbones(backbones)
    heads = _choices(heads, list(HEADS), "--heads")
    recipes = _choices(finetune, list(RECIPES), "--finetune")
    shots = parse_shots(shots)
    repeats, bootstrap = _count(repeats, "--repeats"), _count(bootstrap, "--bootstrap", 100)
    unknown = sorted(set(recipe) - set(recipe_flags()))
    if unknown:
        raise ValueError(f"compare has no flag {', '.join(unknown)}; `featx compare --help` lists them")
    _count(seed, "--seed", 0)
    if split not in ("auto", "val", "test"):
        raise ValueError(f"--split must be auto, val or test; got {split!r}")
    if "lp-ft" in recipes and "logreg" not in heads:
        raise ValueError("--finetune lp-ft starts from the logreg head: add logreg to --heads")
    if storage.is_url(out):
        raise ValueError(f"compare writes a report to a local --out; got {storage.shown(out)}")
    splits = {s.name: s for s in discover(data, source, root, label_key, path_key)}
    if not all(s.labelled for s in splits.values()):
        raise ValueError(f"{storage.shown(data)} is unlabelled: compare scores classifiers, so it needs labels "
                         "(class folders, or a manifest's label column)")
    held = held_out_split(splits, split, data)
    check_shots(shots, splits["train"])
    for candidate in candidates:  # an unknown name or missing weights: said before anything is extracted
        try:
            BackboneSpec(candidate.name, candidate.weights, mirror).build()
        except (ValueError, OSError) as error:
            raise type(error)(f"backbone {candidate.label}: {error}") from None
    out = Path(out)
    settings = {"data": storage.shown(data), "held_out_split": held, "heads": heads, "finetune": recipes,
                "shots": shots, "repeats": repeats, "bootstrap": bootstrap, "seed": seed,
                "finetune_recipe": recipe, "featx_version": __version__}
    extract_options = dict(mirror=mirror, batch_size=batch_size, source=source, root=root, label_key=label_key,
                           path_key=path_key, **{k: recipe[k] for k in SHARED_WITH_EXTRACT if k in recipe})
    results = [_backbone(data, candidate, out, held, heads, recipes, settings, extract_options, splits)
               for candidate in candidates]
    board = leaderboard(results, splits[held], settings)
    report.write(out, board, results)
    return board


def _backbone(data, candidate: Candidate, out: Path, held: str, heads: list[str], recipes: list[str],
              settings: dict, extract_options: dict, splits: dict[str, Split]) -> dict:
    """One backbone: its features (extracted or reused), its heads' rows, its label efficiency and its near-copy
    calibration."""
    from featx import fit

    folder, seconds = out / "features" / candidate.folder, {}
    with timed(seconds, "extraction"):
        summaries = api.extract(data, candidate.name, candidate.weights, folder, splits=["train", held],
                                **extract_options)
    files = {name: Path(summary["path"]) for name, summary in summaries.items()}
    train, test = store.load(files["train"]), store.load(files[held])
    rate = _extraction_rate(folder, summaries)
    size = sum(path.stat().st_size for path in files.values()) / 2**20
    rows = []
    for kind in heads:
        params = {"mirror": extract_options["mirror"]} if kind == "zeroshot" else {}
        fitting = {}
        try:
            with timed(fitting, "head_fits"):
                estimator = fit.fit_head(files["train"], "none", kind, out / "heads" / candidate.folder / kind,
                                         **params)
        except NoTextTower:  # zeroshot beside a backbone without one: that pair has no row
            print(f"featx: note: no zeroshot row for {candidate.label}: it has no text tower", file=sys.stderr)
            continue
        metrics, scores = fit.score(estimator, test, files[held])
        rows.append({"backbone": candidate.label, "model": kind, "kind": "head",
                     "chosen": estimator.selection_["chosen"], "images_per_second": rate,
                     "feature_dim": int(train.features.shape[1]), "features_mb": size,
                     "fit_seconds": fitting["head_fits"], "metrics": metrics, "predicted": scores.argmax(1),
                     "probability": _softmax_max(scores), "estimator": estimator})
    seconds["head_fits"] = sum(row["fit_seconds"] for row in rows)
    rows += [_finetuned(data, candidate, recipe, out, test, files[held], settings, extract_options)
             for recipe in recipes]
    seconds["finetune"] = sum(row["fit_seconds"] for row in rows if row["kind"] == "finetune")
    with timed(seconds, "label_efficiency"):
        efficiency = label_efficiency(rows, train, test, settings)
    with timed(seconds, "near_copies"):
        images = ImageFiles(splits["train"].root, splits["train"].paths, None, members=splits["train"].members)
        calibration = _calibration(candidate, train, images, settings["seed"], extract_options)
    return {"candidate": candidate, "rows": rows, "train": train, "test": test, "label_efficiency": efficiency,
            "seconds": seconds, "calibration": calibration, "splits": splits}


@contextlib.contextmanager
def timed(seconds: dict, phase: str):
    """Add the block's wall time to ``seconds[phase]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


def _extraction_rate(folder: Path, summaries: dict) -> float | None:
    """Images per second of the extraction: measured now, or as recorded when these features were extracted."""
    from featx.report import write_text

    record = folder / "extraction.json"
    done = [s for s in summaries.values() if not s["skipped"] and s["seconds"] > 0]
    if done:
        rate = sum(s["num_rows"] for s in done) / sum(s["seconds"] for s in done)
        write_text(record, json.dumps({"images_per_second": rate}))
        return rate
    return json.loads(record.read_text())["images_per_second"] if record.is_file() else None


def _finetuned(data, candidate: Candidate, recipe: str, out: Path, test: store.FeatureSet, test_file: Path,
               settings: dict, extract_options: dict) -> dict:
    """A fine-tuning recipe's row: the run (resumed where a kill left it) and its predictions on the held-out
    images, by ``featx predict`` on the run folder."""
    from featx.finetuning import FinetuneConfig, finetune
    from featx.metrics import classification_metrics, load_seen, times_seen
    from featx.predict import predict

    run = out / "finetune" / candidate.folder / recipe
    changes = dict(RECIPES[recipe])
    if recipe == "lp-ft":
        changes["probe"] = str(out / "heads" / candidate.folder / "logreg")
    config = FinetuneConfig(**{**settings["finetune_recipe"], **changes}, backbone=candidate.name,
                            weights=candidate.weights, seed=settings["seed"], source=extract_options["source"],
                            batch_size=extract_options["batch_size"],
                            label_key=extract_options["label_key"], path_key=extract_options["path_key"])
    finetune(data, run, config, mirror=extract_options["mirror"], resume=True)
    history = json.loads((run / "history.json").read_text())  # every epoch's, across resumes
    root = test.meta["data_root"]
    images = [storage.join(root, path) for path in test.paths]
    records = predict(run, [os.fspath(image) for image in images], batch_size=extract_options["batch_size"],
                      mirror=extract_options["mirror"], device=extract_options.get("device", "auto"),
                      runtime="torch")  # a model scored once: no ONNX graph of it exported into the cache
    names = list(test.class_names)
    if json.loads((run / "run.json").read_text())["class_names"] != names:
        raise ValueError(f"{run} was trained on the classes of another dataset; delete it (compare trains it again)")
    scores = np.asarray([r["logits"] for r in records])
    metrics = classification_metrics(test.labels, scores, names)
    seen = times_seen(load_seen(run), test.content_hash)
    metrics.update(held_out=seen == 0, seen_in_fitting=seen or 0, features=str(test_file))
    return {"backbone": candidate.label, "model": f"finetune:{recipe}", "kind": "finetune", "chosen": None,
            "images_per_second": None, "feature_dim": None, "features_mb": None,
            "fit_seconds": sum(epoch.get("train_seconds", 0.0) for epoch in history), "metrics": metrics,
            "predicted": scores.argmax(1), "probability": _softmax_max(scores)}


def draws(labels: np.ndarray, shots: list, repeats: int, seed: int) -> list[tuple]:
    """(shots, repeat, training rows) of every label-efficiency draw: ``shots`` rows of each class, drawn by a
    generator seeded with (seed, shots, repeat); ``all`` is drawn once."""
    classes = np.unique(labels)
    result = []
    for k in shots:
        if k == ALL:
            result.append((ALL, 0, np.arange(len(labels))))
            continue
        for repeat in range(repeats):
            rng = np.random.default_rng([seed, k, repeat])
            rows = [rng.choice(np.flatnonzero(labels == label), k, replace=False) for label in classes]
            result.append((k, repeat, np.sort(np.concatenate(rows))))
    return result


def label_efficiency(rows: list[dict], train: store.FeatureSet, test: store.FeatureSet, settings: dict) -> list[dict]:
    """Held-out accuracy of every head refitted on every draw, with the hyperparameters its full-train fit chose
    (``Head.fixed_params``: a draw of one image per class leaves nothing to select on). The draws are tiny: one
    torch thread fits them 1.7x faster than two on 2 cores (waking a second thread costs more than its share)."""
    from featx.heads import make_head

    results, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for row in rows:
            if row["kind"] != "head" or row["model"] == "zeroshot":  # zero-shot uses no labels
                continue
            params = row["estimator"].fixed_params()
            for k, repeat, picked in draws(train.labels, settings["shots"], settings["repeats"], settings["seed"]):
                X, y = train.features[picked], train.labels[picked]
                head = make_head(row["model"], **params).fit(X, y, X, y)
                results.append({"backbone": row["backbone"], "model": row["model"], "shots": k, "repeat": repeat,
                                "train_images": len(picked),
                                "accuracy": float(np.mean(head.predict(test.features) == test.labels))})
    finally:
        torch.set_num_threads(threads)
    return results


def _calibration(candidate: Candidate, train: store.FeatureSet, images: ImageFiles, seed: int,
                 extract_options: dict) -> dict:
    """``leakage.calibrate`` on some of this backbone's training images, embedded as they were extracted."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(train.paths), min(leakage.CALIBRATION_IMAGES, len(train.paths)), replace=False))
    index = {path: i for i, path in enumerate(images.paths)}
    originals = [images.original(index[train.paths[row]]) for row in rows]
    source = train.meta.get("weights_source")
    weights = source if source and Path(source).is_file() else candidate.weights

    def embed(pictures):
        return api.embed_images(pictures, candidate.name, weights, mirror=extract_options["mirror"],
                                device=extract_options.get("device", "auto"),
                                pool=extract_options.get("pool", "default"),
                                transform=EvalTransform.from_dict(train.meta["transform"]))

    return leakage.calibrate(train.features, originals, rows, embed)


def leaderboard(results: list[dict], held: Split, settings: dict) -> dict:
    """Every row's scores with bootstrap intervals, sorted; the leader (the best held-out score: one whose images
    chose an epoch or a parameter leads only where no score is held out), and the rows tied with it (the 95 %
    interval of the paired difference holds 0); near duplicates and the accuracy without them."""
    rows = [row for result in results for row in result["rows"]]
    labels, paths = results[0]["test"].labels, results[0]["test"].paths
    for result in results[1:]:  # every row scores the same images, in the same order (paired resamples)
        if result["test"].paths != paths:
            raise ValueError(f"the held-out features of {result['candidate'].label} and {results[0]['candidate'].label}"
                             " hold different images (one failed to decode for one of them?); see their failed/ lists")
    indices = np.random.default_rng(settings["seed"]).integers(0, len(labels), (settings["bootstrap"], len(labels)))
    near = near_duplicates(results)
    keep = ~np.isin(np.arange(len(labels)), [n["held_row"] for n in near])
    for row in rows:
        row["resampled"] = resampled(labels, row["predicted"], indices)
    candidates = [row for row in rows if row["metrics"]["held_out"]] or rows  # a score val chose cannot lead
    leader = max(candidates, key=lambda r: (r["metrics"]["accuracy"], r["metrics"]["balanced_accuracy"]))
    entries = []
    for row in sorted(rows, key=lambda r: (-r["metrics"]["accuracy"], -r["metrics"]["balanced_accuracy"])):
        metrics = row["metrics"]
        difference = leader["resampled"]["accuracy"] - row["resampled"]["accuracy"]
        entries.append({
            "backbone": row["backbone"], "model": row["model"], "kind": row["kind"],
            "accuracy": metrics["accuracy"], "accuracy_ci": interval(row["resampled"]["accuracy"]),
            "balanced_accuracy": metrics["balanced_accuracy"],
            "balanced_accuracy_ci": interval(row["resampled"]["balanced_accuracy"]),
            "macro_f1": float(np.mean([c["f1"] for c in metrics["per_class"].values()])),
            "accuracy_without_near_duplicates": float(np.mean(row["predicted"][keep] == labels[keep]))
            if keep.any() else None,
            "held_out": metrics["held_out"], "seen_in_fitting": metrics["seen_in_fitting"],
            "leader": row is leader, "tied_with_leader": row is not leader and interval(difference)[0] <= 0,
            "chosen": row["chosen"], "feature_dim": row["feature_dim"], "features_mb": row["features_mb"],
            "images_per_second": row["images_per_second"], "fit_seconds": row["fit_seconds"]})
    return {"settings": {**settings, "held_out_images": len(labels), "classes": list(held.class_names)},
            "leaderboard": entries, "label_efficiency": summarise_efficiency(results, settings),
            "near_duplicates": near,
            "calibration": {r["candidate"].label: r["calibration"] for r in results},
            "seconds": {phase: sum(r["seconds"][phase] for r in results) for phase in results[0]["seconds"]}}


def summarise_efficiency(results: list[dict], settings: dict) -> list[dict]:
    """Mean and spread of the draws' held-out accuracy, per backbone x head x shots."""
    draws_by_key: dict[tuple, list[dict]] = {}
    for result in results:
        for draw in result["label_efficiency"]:
            draws_by_key.setdefault((draw["backbone"], draw["model"], draw["shots"]), []).append(draw)
    summary = []
    for (backbone, model, k), found in draws_by_key.items():
        accuracy = np.asarray([d["accuracy"] for d in found])
        summary.append({"backbone": backbone, "model": model, "shots": k, "train_images": found[0]["train_images"],
                        "draws": len(found), "mean_accuracy": float(accuracy.mean()),
                        "std_accuracy": float(accuracy.std(ddof=1)) if len(found) > 1 else 0.0,
                        "min_accuracy": float(accuracy.min()), "max_accuracy": float(accuracy.max())})
    return summary


def near_duplicates(results: list[dict]) -> list[dict]:
    """Held-out images whose nearest training image, by any backbone's features, is past that backbone's
    calibrated threshold: (held-out row, training row, cosine, backbone), the closest first."""
    found: dict[int, dict] = {}
    for result in results:
        threshold = result["calibration"]["threshold"]
        index, cosine = leakage.nearest(result["train"].features, result["test"].features)
        for held_row in np.flatnonzero(cosine >= threshold):
            entry = {"held_row": int(held_row), "train_row": int(index[held_row]), "cosine": float(cosine[held_row]),
                     "backbone": result["candidate"].label, "held_path": result["test"].paths[held_row],
                     "train_path": result["train"].paths[index[held_row]]}
            if held_row not in found or entry["cosine"] > found[held_row]["cosine"]:
                found[int(held_row)] = entry
    return sorted(found.values(), key=lambda e: (-e["cosine"], e["held_row"]))


def without_timing(board: dict) -> dict:
    """``board`` without what a rerun measures anew (speeds, times): what must equal between runs."""
    return {**{k: v for k, v in board.items() if k not in TIMING_KEYS},
            "leaderboard": [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in board["leaderboard"]]}

