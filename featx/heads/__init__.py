"""Classifier heads on cached features: ``logreg`` (sklearn), ``linear`` (torch), ``knn`` (cosine), ``zeroshot``
(a CLIP model's text tower)."""

from __future__ import annotations

import os
from pathlib import Path

from featx.heads.base import Head, describe, holdout_split, read_record
from featx.heads.knn import KNNHead
from featx.heads.linear import LinearHead
from featx.heads.logreg import LogRegHead
from featx.heads.zeroshot import ZeroShotHead

HEADS: dict[str, type[Head]] = {cls.kind: cls for cls in (LogRegHead, LinearHead, KNNHead, ZeroShotHead)}


def make_head(kind: str, **params) -> Head:
    """A new head of ``kind`` with ``params`` (validated now)."""
    if kind not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}; got {kind!r}")
    known = HEADS[kind]._get_param_names()
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"head {kind} has no parameter {', '.join(unknown)}; its parameters: {', '.join(known)}")
    return HEADS[kind](**params)


def load_head(folder: str | os.PathLike, trust_pickle: bool = False) -> Head:
    """Load a head saved by ``Head.save`` / ``featx fit-head``. Nothing it reads can run code, except an older
    featx's pickled ``logreg`` head, which loads only with ``trust_pickle``."""
    record = read_record(folder)
    return HEADS[record["kind"]]._restore(Path(folder), record, trust_pickle)


__all__ = ["HEADS", "Head", "KNNHead", "LinearHead", "LogRegHead", "ZeroShotHead", "describe", "holdout_split",
           "load_head", "make_head"]
