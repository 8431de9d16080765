"""Features out to the tools people index and search them with: Parquet (one row per image, for pandas, DuckDB,
Spark), clip-retrieval's npy layout (``img_emb/img_emb_0.npy`` + ``metadata/metadata_0.parquet``, read as they are
by embedding-reader and autofaiss), and pandas. Files are streamed in chunks: memory stays flat whatever their size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from featx import storage, store

FORMATS = ("parquet", "npy")
CHUNK_BYTES = 32 << 20  # float32 features read and written at a time


def chunks(path: str | os.PathLike, rows: int | None = None, normalize: bool = False
           ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str], dict[str, list[str]]]]:
    """(float32 features, labels, paths, {column: texts}) blocks of a features file the caller checked with
    ``store.read_meta`` (default: about ``CHUNK_BYTES`` each), L2-normalised on request."""
    with store.open_h5(path) as f:
        rows = rows or max(256, CHUNK_BYTES // (4 * f["features"].shape[1]))
        columns = f.get("columns", {})
        for start in range(0, f["features"].shape[0], rows):
            features = f["features"][start:start + rows].astype(np.float32)
            if normalize:
                features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
            texts = {name: list(columns[name].asstr()[start:start + rows]) for name in columns}
            yield features, f["labels"][start:start + rows], list(f["paths"].asstr()[start:start + rows]), texts


def column_names(path: str | os.PathLike) -> list[str]:
    """The per-row text columns a features file keeps (``caption``, ``json``), possibly none."""
    with store.open_h5(path) as f:
        return list(f.get("columns", {}))


def metadata(paths: list[str], labels: np.ndarray, meta: dict, path_column: str = "path",
             texts: dict[str, list[str]] | None = None):
    """A pyarrow table: path, label, class_name (null when unlabelled), split, then the text columns (caption,
    json), with the features file's provenance in the schema's metadata (key ``featx``)."""
    import pyarrow as pa

    names = meta["class_names"]
    table = pa.table({path_column: pa.array(paths, pa.string()), "label": pa.array(labels, pa.int64()),
                      "class_name": pa.array([names[i] if i >= 0 else None for i in labels.tolist()], pa.string()),
                      "split": pa.array([meta["split"]] * len(paths), pa.string()),
                      **{name: pa.array(values, pa.string()) for name, values in (texts or {}).items()}})
    return table.replace_schema_metadata({"featx": json.dumps(store.provenance(meta))})


def to_parquet(path: str | os.PathLike, out: str | os.PathLike, normalize: bool = False,
               rows: int | None = None) -> Path:
    """One Parquet file, a row per image: path, label, class_name, split, the text columns, embedding (fixed-size
    list of float32); the file's provenance in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = store.read_meta(path)
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder: give the Parquet file's name (or remove the folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = None
    try:
        for features, labels, paths, texts in chunks(path, rows, normalize):
            table = metadata(paths, labels, meta, texts=texts).append_column(
                "embedding", pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), features.shape[1]))
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        if writer is None:  # no rows: an empty file with the schema
            empty = metadata([], np.empty(0, np.int64), meta, texts=_no_texts(path))
            pq.write_table(empty.append_column("embedding", pa.array([], pa.list_(pa.float32(), meta["feature_dim"]))),
                           tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if writer is not None:
            writer.close()
    storage.commit_file(tmp, out)
    return out


def to_npy(path: str | os.PathLike, out: str | os.PathLike, normalize: bool = False, rows: int | None = None) -> Path:
    """clip-retrieval's layout in ``out``: ``img_emb/img_emb_0.npy`` (float32 [N, D]) and
    ``metadata/metadata_0.parquet`` (image_path, label, class_name, split), rows in the same order."""
    import pyarrow.parquet as pq

    meta = store.read_meta(path)
    out = Path(out)
    (out / "img_emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    embeddings, table = out / "img_emb" / "img_emb_0.npy", out / "metadata" / "metadata_0.parquet"
    schema = metadata([], np.empty(0, np.int64), meta, "image_path", _no_texts(path)).schema
    with open(_tmp(embeddings), "wb") as f, pq.ParquetWriter(_tmp(table), schema) as writer:
        shape = (meta["num_rows"], meta["feature_dim"])
        np.lib.format.write_array_header_2_0(f, {"descr": np.dtype(np.float32).str, "fortran_order": False,
                                                 "shape": shape})
        for features, labels, paths, texts in chunks(path, rows, normalize):  # as they come: no array of N rows
            f.write(np.ascontiguousarray(features).tobytes())
            writer.write_table(metadata(paths, labels, meta, "image_path", texts))
    storage.commit_file(_tmp(embeddings), embeddings)
    storage.commit_file(_tmp(table), table)
    return out


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _no_texts(path: str | os.PathLike) -> dict[str, list[str]]:
    return {name: [] for name in column_names(path)}


def output_format(out: str | os.PathLike, format: str | None = None) -> str:
    """The format ``out`` asks for: ``.parquet``/``.pq`` is parquet, a name with no extension an npy folder;
    ``format``, when given, must agree with the extension."""
    suffix = Path(out).suffix.lower()
    implied = "parquet" if suffix in (".parquet", ".pq") else "npy" if not suffix else None
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    if implied is None:
        raise ValueError(f"{out}: featx writes Parquet (name it .parquet) or clip-retrieval's npy folder (a name "
                         f"with no extension), not {suffix}")
    if format is not None and format != implied:
        raise ValueError(f"{out} names a {implied} output but --format is {format}; name it "
                         f"{'a folder with no extension' if format == 'npy' else 'OUT.parquet'}")
    return implied


def export_features(path: str | os.PathLike, out: str | os.PathLike, format: str | None = None,
                    normalize: bool = False) -> Path:
    """Write a features file to ``out`` as Parquet (``.parquet``) or clip-retrieval's npy folder (no extension), on
    disk or on object storage (written in a scratch folder, then each file uploaded whole)."""
    write = to_parquet if output_format(out, format) == "parquet" else to_npy
    if not storage.is_url(out):
        return write(path, out, normalize)
    with storage.local_output(storage.parent(out)) as folder:
        write(path, folder / storage.name(out), normalize)
    return out


def to_dataframe(path: str | os.PathLike, normalize: bool = False):
    """A pandas DataFrame of a features file: path, label, class_name, split, embedding (a float32 array per row)."""
    import pandas as pd

    meta = store.read_meta(path)
    frames = [metadata(paths, labels, meta, texts=texts).to_pandas().assign(embedding=list(features))
              for features, labels, paths, texts in chunks(path, normalize=normalize)]
    if frames:
        return pd.concat(frames, ignore_index=True)
    return metadata([], np.empty(0, np.int64), meta, texts=_no_texts(path)).to_pandas()
