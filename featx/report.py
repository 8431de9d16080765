"""``featx compare``'s outputs: leaderboard.csv/.json/.md, label_efficiency.csv, curves.png,
confusion-LEADER.png, mistakes-LEADER.png, and report.html holding all of them (images embedded as data: URLs,
no script, nothing fetched). Each file is written whole (``storage.write_bytes``) or not at all."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import numpy as np

from featx import storage
from featx.decode import ImageFiles
from featx.leakage import describe
from featx.metrics import plot_confusion
from featx.predict import contact_sheet

COLUMNS = ("rank", "backbone", "model", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "balanced_accuracy",
           "balanced_accuracy_ci_low", "balanced_accuracy_ci_high", "macro_f1", "accuracy_without_near_duplicates",
           "held_out", "leader", "tied_with_leader", "feature_dim", "features_mb", "images_per_second", "fit_seconds")
EFFICIENCY_COLUMNS = ("backbone", "model", "shots", "train_images", "draws", "mean_accuracy", "std_accuracy",
                      "min_accuracy", "max_accuracy")
THUMBNAIL = 160
FLAT = 0.01  # label efficiency: a level within this of the best mean accuracy is where more labels stop helping


def write_text(path: Path, text: str) -> None:
    storage.write_bytes(path, text.encode())


def _png(draw) -> bytes:
    """The PNG ``draw(file)`` writes, as bytes."""
    buffer = io.BytesIO()
    draw(buffer)
    return buffer.getvalue()


def _number(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table_rows(board: dict) -> list[dict]:
    """The leaderboard as flat rows (the CSV's, the tables')."""
    return [{"rank": rank, **{k: row[k] for k in COLUMNS if k in row},
             "accuracy_ci_low": row["accuracy_ci"][0], "accuracy_ci_high": row["accuracy_ci"][1],
             "balanced_accuracy_ci_low": row["balanced_accuracy_ci"][0],
             "balanced_accuracy_ci_high": row["balanced_accuracy_ci"][1]}
            for rank, row in enumerate(board["leaderboard"], 1)]


def _csv(rows: list[dict], columns) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _number(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def shown_rows(board: dict) -> list[dict]:
    """The leaderboard as people read it (the Markdown and HTML tables): each interval beside its estimate."""
    def estimate(row: dict, key: str) -> str:
        return f"{row[key]:.4f} ({row[key + '_ci'][0]:.3f}–{row[key + '_ci'][1]:.3f})"

    return [{"rank": str(rank), "backbone": row["backbone"],
             "model": row["model"] + (" (leader)" if row["leader"] else " (tied)" if row["tied_with_leader"] else ""),
             "accuracy (95 % CI)": estimate(row, "accuracy"),
             "balanced accuracy (95 % CI)": estimate(row, "balanced_accuracy"), "macro-F1": _number(row["macro_f1"]),
             "without near copies": _number(row["accuracy_without_near_duplicates"]),
             "held out": "yes" if row["held_out"] else "NO", "img/s": _number(row["images_per_second"], 1),
             "dim": _number(row["feature_dim"]), "features MB": _number(row["features_mb"], 2),
             "fit s": _number(row["fit_seconds"], 2), "leader": row["leader"]}
            for rank, row in enumerate(board["leaderboard"], 1)]


SHOWN_COLUMNS = ("rank", "backbone", "model", "accuracy (95 % CI)", "balanced accuracy (95 % CI)", "macro-F1",
                 "without near copies", "held out", "img/s", "dim", "features MB", "fit s")


def _markdown(board: dict, verdicts: list[str]) -> str:
    settings = board["settings"]
    lines = [f"# featx compare: {settings['data']}", "",
             f"Held out: the {settings['held_out_split']} split, {settings['held_out_images']} images; 95 % intervals "
             f"from {settings['bootstrap']} bootstrap resamples (seed {settings['seed']}).", "",
             "| " + " | ".join(SHOWN_COLUMNS) + " |", "|---" * len(SHOWN_COLUMNS) + "|"]
    lines += ["| " + " | ".join(row[c] for c in SHOWN_COLUMNS) + " |" for row in shown_rows(board)]
    return "\n".join(lines + ["", *verdicts]) + "\n"


def verdicts(board: dict) -> list[str]:
    """What the numbers say, in sentences: the leader and its ties, where more labels stop helping, leakage."""
    rows = board["leaderboard"]
    leader = next(row for row in rows if row["leader"])
    tied = [f"{row['backbone']} + {row['model']}" for row in rows if row["tied_with_leader"]]
    held = "the best held-out score" if leader["held_out"] else "no score is held out"
    lines = [f"Leader ({held}): {leader['backbone']} + {leader['model']}, accuracy {leader['accuracy']:.4f} "
             f"({leader['accuracy_ci'][0]:.3f}–{leader['accuracy_ci'][1]:.3f}). "
             + (f"Tied with it within the 95 % interval of the paired difference: {', '.join(tied)}." if tied else
                "No other row is within the 95 % interval of the paired difference.")]
    not_held = [f"{row['backbone']} + {row['model']}" for row in rows if not row["held_out"]]
    if not_held:
        lines.append(f"NOT held out (the images scored were used to fit or select them): {', '.join(not_held)}.")
    for (backbone, model), curve in _curves(board).items():
        lines.append(f"Label efficiency, {backbone} + {model}: {flattens(curve, len(board['settings']['classes']))}.")
    near = board["near_duplicates"]
    lines.append(f"Near-duplicate leakage: {len(near)} of {board['settings']['held_out_images']} held-out images have "
                 "a near copy in train" + (" (accuracy without them in the table)." if near else "."))
    return lines


def flattens(curve: list[dict], classes: int) -> str:
    """Where more labels stop helping, in words, for one backbone x head's summary rows (sorted by shots)."""
    def at(level: dict) -> str:
        shots = f"{level['shots']} per class" if level["shots"] != "all" else \
            f"all {level['train_images']} images, ~{level['train_images'] // classes} per class"
        return f"{shots} ({level['mean_accuracy']:.3f})"

    best = max(level["mean_accuracy"] for level in curve)
    first = next(level for level in curve if level["mean_accuracy"] >= best - FLAT)
    if len(curve) == 1:
        return f"one level only: {at(first)}"
    if first is curve[-1]:
        return f"still rising from {at(curve[-2])} to {at(first)}: more labels would likely help"
    return f"more labels stop helping after ~{at(first)}; {at(curve[-1])}"


def _curves(board: dict) -> dict[tuple, list[dict]]:
    curves: dict[tuple, list[dict]] = {}
    for level in board["label_efficiency"]:
        curves.setdefault((level["backbone"], level["model"]), []).append(level)
    return curves


def _curves_png(board: dict, file) -> None:
    from matplotlib.figure import Figure

    curves = _curves(board)
    models = list(dict.fromkeys(model for _, model in curves))
    figure = Figure(figsize=(5 * max(1, len(models)), 4))
    axes = figure.subplots(1, max(1, len(models)), squeeze=False)[0]
    classes = len(board["settings"]["classes"])
    for axis, model in zip(axes, models):
        for (backbone, name), curve in curves.items():
            if name == model:
                x = [level["train_images"] / classes for level in curve]
                axis.errorbar(x, [level["mean_accuracy"] for level in curve],
                              yerr=[level["std_accuracy"] for level in curve], marker="o", capsize=3, label=backbone)
        axis.set_xscale("log")
        axis.set_xlabel("training images per class (log)")
        axis.set_ylabel("held-out accuracy (mean ± sd of draws)")
        axis.set_title(model)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(file, dpi=90, format="png")


def _leader_row(board: dict, results: list[dict]) -> tuple[dict, dict, dict]:
    """The leader's leaderboard entry, its backbone's result and its row there."""
    leader = next(row for row in board["leaderboard"] if row["leader"])
    result = next(r for r in results if r["candidate"].label == leader["backbone"])
    return leader, result, next(row for row in result["rows"] if row["model"] == leader["model"])


def _originals(result: dict, split: str):
    """A function from a path of ``split`` (as the features files name it) to its image, decoded as it is (every
    backbone's result holds the same splits)."""
    found = result["splits"][split]
    images, index = ImageFiles(found.root, found.paths, None, members=found.members), \
        {path: i for i, path in enumerate(found.paths)}
    return lambda path: images.original(index[path])


def _mistakes_png(result: dict, row: dict, file) -> None:
    test = result["test"]
    names = list(test.class_names)
    records = [{"path": path, "true": names[label], "predicted": names[predicted], "probability": float(p)}
               for path, label, predicted, p in zip(test.paths, test.labels, row["predicted"], row["probability"])]
    contact_sheet(records, file, limit=24, confident_mistakes=True, load=_originals(result, test.meta["split"]))


def _thumbnail(image) -> str:
    image = image.copy()
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _near_pairs_html(board: dict, results: list[dict]) -> str:
    near = board["near_duplicates"]
    if not near:
        return "<p>No held-out image has a near copy in train.</p>"
    held, train = _originals(results[0], results[0]["test"].meta["split"]), _originals(results[0], "train")
    cells = []
    for entry in near[:50]:
        pictures = [held(entry["held_path"]), train(entry["train_path"])]
        cells.append("<tr>" + "".join(f"<td><img src='{_thumbnail(picture)}' alt='{kind}'><br>{html.escape(path)}</td>"
                                      for picture, kind, path in zip(pictures, ("held-out", "train"),
                                                                     (entry["held_path"], entry["train_path"])))
                     + f"<td>{entry['cosine']:.4f} ({html.escape(entry['backbone'])})</td></tr>")
    more = f"<p>... and {len(near) - 50} more (leaderboard.json).</p>" if len(near) > 50 else ""
    return ("<table><tr><th>held-out image</th><th>nearest training image</th><th>cosine (backbone)</th></tr>"
            + "".join(cells) + "</table>" + more)


def _html(board: dict, results: list[dict], lines: list[str], images: dict[str, bytes]) -> str:
    settings = board["settings"]

    def table(rows: list[dict], columns) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr" + (" class='leader'" if row.get("leader") else "") + ">"
                       + "".join(f"<td>{html.escape(_number(row.get(c)))}</td>" for c in columns) + "</tr>"
                       for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    def embedded(name: str) -> str:
        return (f"<figure><img src='data:image/png;base64,{base64.b64encode(images[name]).decode()}' "
                f"alt='{html.escape(name)}'><figcaption>{html.escape(name)}</figcaption></figure>")

    calibration = "".join(f"<li>{html.escape(label)}: {html.escape(describe(c))}</li>"
                          for label, c in board["calibration"].items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>featx compare: {html.escape(settings['data'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}}tr.leader{{background:#e6f4e6}}
img{{max-width:100%}}</style></head><body>
<h1>featx compare</h1>
<p>Data: {html.escape(settings['data'])}; held out: the {html.escape(settings['held_out_split'])} split,
{settings['held_out_images']} images, classes {html.escape(', '.join(settings['classes']))}. Seed {settings['seed']},
{settings['bootstrap']} bootstrap resamples, shots {html.escape(', '.join(map(str, settings['shots'])))} x
{settings['repeats']} draws; featx {html.escape(settings['featx_version'])}.</p>
<h2>Leaderboard</h2>
{''.join(f'<p>{html.escape(line)}</p>' for line in lines)}
{table(shown_rows(board), SHOWN_COLUMNS)}
<h2>Label efficiency</h2>
<p>Each head refitted on seeded draws of k training images per class, with the hyperparameters its full-train fit
chose; mean ± sd of the draws' held-out accuracy.</p>
{embedded('curves.png')}
{table(board['label_efficiency'], EFFICIENCY_COLUMNS)}
<h2>The leader</h2>
{embedded(next(n for n in images if n.startswith('confusion-')))}
{embedded(next(n for n in images if n.startswith('mistakes-')))}
<h2>Near-duplicate leakage</h2>
<p>A held-out image is a near copy when its nearest training image's cosine similarity passes the threshold
calibrated for the backbone on your own images:</p><ul>{calibration}</ul>
{_near_pairs_html(board, results)}
</body></html>
"""


def write(out: Path, board: dict, results: list[dict]) -> None:
    """Every output of ``featx compare`` into ``out``."""
    lines = verdicts(board)
    leader, result, row = _leader_row(board, results)
    name = f"{result['candidate'].folder}-{leader['model'].replace(':', '-')}"
    images = {"curves.png": _png(lambda f: _curves_png(board, f)),
              f"confusion-{name}.png": _png(lambda f: plot_confusion(
                  row["metrics"], f, f"{leader['backbone']} + {leader['model']}: accuracy {leader['accuracy']:.3f}")),
              f"mistakes-{name}.png": _png(lambda f: _mistakes_png(result, row, f))}
    for image_name, data in images.items():
        storage.write_bytes(out / image_name, data)
    write_text(out / "leaderboard.json", json.dumps(board, indent=1, default=_plain))
    write_text(out / "leaderboard.csv", _csv(table_rows(board), COLUMNS))
    write_text(out / "leaderboard.md", _markdown(board, lines))
    write_text(out / "label_efficiency.csv", _csv(board["label_efficiency"], EFFICIENCY_COLUMNS))
    write_text(out / "report.html", _html(board, results, lines, images))
    print("\n".join(lines) + f"\n-> {out / 'report.html'}")


def _plain(value):
    """numpy scalars and arrays as JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")
