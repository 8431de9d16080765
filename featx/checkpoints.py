"""Fine-tuning checkpoints that become visible as one unit.

An epoch's checkpoint is a folder, ``checkpoints/epoch-NNNN/``, holding ``state.pt`` (model, optimiser, schedule,
scaler, RNG, counters, recipe), ``best.pt`` (the best weights so far) and ``history.json``. It is written under a
``.tmp`` name, made durable, renamed, and only then does ``checkpoint.json`` (replaced atomically) point at it.
A kill at any moment leaves the previous checkpoint in force, whole; older folders are deleted after the switch.
Everything is read back with ``torch.load(weights_only=True)`` and JSON: no pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from featx import store

POINTER = "checkpoint.json"
FOLDER = "checkpoints"


def current(run: Path) -> Path | None:
    """The committed checkpoint folder of the run folder ``run``, or None when it has none."""
    pointer = run / POINTER
    if not pointer.is_file():
        return None
    try:
        folder = run / json.loads(pointer.read_text())["folder"]
    except (ValueError, KeyError) as error:
        raise ValueError(f"{pointer} is damaged ({error}); start the run again with --overwrite") from None
    if not folder.is_dir():
        raise ValueError(f"{pointer} points at {folder}, which is missing; start again with --overwrite")
    return folder


def commit(run: Path, epoch: int, state: dict, best: dict | None, history: list[dict]) -> Path:
    """Write epoch ``epoch``'s checkpoint and switch the pointer to it. ``best``: new best weights, or None to
    keep the previous checkpoint's (hard-linked, not copied)."""
    previous = current(run)
    final = run / FOLDER / f"epoch-{epoch:04d}"
    tmp = final.with_name(final.name + ".tmp")
    for leftover in (tmp, final):  # a save killed before its switch
        if leftover != previous:
            shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    if best is not None:
        torch.save(best, tmp / "best.pt")
    else:
        os.link(previous / "best.pt", tmp / "best.pt")
    (tmp / "history.json").write_text(json.dumps(history, indent=1))
    store.commit_file(tmp, final)
    store.write_text(run / POINTER, json.dumps({"epoch": epoch, "folder": f"{FOLDER}/{final.name}"}))
    for old in (run / FOLDER).iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    store.write_text(run / "history.json", json.dumps(history, indent=1))  # a copy to read; resume never does
    return final


def load(run: Path) -> tuple[dict, list[dict]] | None:
    """(state on the CPU, history) of the committed checkpoint, or None when the run has none."""
    folder = current(run)
    if folder is None:
        return None
    return store.load_tensors(folder / "state.pt", "checkpoint"), json.loads((folder / "history.json").read_text())


def best_weights(run: Path) -> dict:
    """The best model weights of a run folder."""
    folder = current(run)
    if folder is None:
        raise FileNotFoundError(f"{run} has no finished epoch to load (no {POINTER})")
    return store.load_tensors(folder / "best.pt", "checkpoint")
