"""Fine-tuning checkpoints that become visible as one unit.

An epoch's checkpoint is a folder, ``checkpoints/epoch-NNNN/``, holding ``state.pt`` (model, optimiser, schedule,
scaler, RNG, counters, recipe), ``best.pt`` (the best weights so far) and ``history.json``. It is written under a
``.tmp`` name, made durable, renamed, and only then does ``checkpoint.json`` (replaced atomically) point at it.
A kill at any moment leaves the previous checkpoint in force, whole; older folders are deleted after the switch.
Everything is read back with ``torch.load(weights_only=True)`` and JSON: no pickle.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from featx import storage, store
from featx.tensors import load_tensors

POINTER = "checkpoint.json"
FOLDER = "checkpoints"


@dataclass
class Progress:
    """Where a run is: epochs and steps done, the best validation accuracy so far, the history of every epoch."""

    epoch: int = 0
    step: int = 0
    best_accuracy: float = -1.0
    history: list[dict] = field(default_factory=list)


def save(run: Path, progress: Progress, model, optimizer, scheduler, scaler, config: dict, improved: bool) -> Path:
    """Commit the run's state after ``progress.epoch`` (``commit``); ``improved``: the model is the new best."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "epoch": progress.epoch, "step": progress.step,
             "best_accuracy": progress.best_accuracy, "rng": torch.get_rng_state(), "config": config}
    return commit(run, progress.epoch, state, model.state_dict() if improved else None, progress.history)


def restore(run: Path, model, optimizer, scheduler, scaler, check: Callable[[dict], None]) -> Progress | None:
    """Load the committed checkpoint into the objects given, after ``check(state)`` (which raises to refuse it);
    None when the run has none."""
    found = load(run)
    if found is None:
        return None
    state, history = found
    check(state)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    return Progress(state["epoch"], state["step"], state["best_accuracy"], history)


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
    try:
        with store.writing(run / FOLDER):  # a full device is one line; the previous checkpoint stays in force
            return _commit(run, epoch, state, best, history)
    except BaseException:
        shutil.rmtree(run / FOLDER / f"epoch-{epoch:04d}.tmp", ignore_errors=True)  # frees the space it took
        raise


def _commit(run: Path, epoch: int, state: dict, best: dict | None, history: list[dict]) -> Path:
    previous = current(run)
    final = run / FOLDER / f"epoch-{epoch:04d}"
    tmp = final.with_name(final.name + ".tmp")
    for leftover in (tmp, final):  # a save killed before its switch
        if leftover != previous:
            shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save(state, tmp / "state.pt")
    if best is not None:
        _save(best, tmp / "best.pt")
    else:
        os.link(previous / "best.pt", tmp / "best.pt")
    (tmp / "history.json").write_text(json.dumps(history, indent=1))
    storage.commit_file(tmp, final)
    store.write_text(run / POINTER, json.dumps({"epoch": epoch, "folder": f"{FOLDER}/{final.name}"}))
    for old in (run / FOLDER).iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    store.write_text(run / "history.json", json.dumps(history, indent=1))  # a copy to read; resume never does
    return final


def _save(tensors: dict, path: Path) -> None:
    """``torch.save`` built in memory and written with one plain write, so a full device is an ordinary OSError."""
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    path.write_bytes(buffer.getbuffer())


def load(run: Path) -> tuple[dict, list[dict]] | None:
    """(state on the CPU, history) of the committed checkpoint, or None when the run has none."""
    folder = current(run)
    if folder is None:
        return None
    return load_tensors(folder / "state.pt", "checkpoint"), json.loads((folder / "history.json").read_text())


def best_weights(run: Path) -> dict:
    """The best model weights of a run folder."""
    folder = current(run)
    if folder is None:
        raise FileNotFoundError(f"{run} has no finished epoch to load (no {POINTER})")
    return load_tensors(folder / "best.pt", "checkpoint")
