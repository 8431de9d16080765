"""Labels from data other tools wrote: WebDataset's own TarWriter, img2dataset folders, manifests from pandas,
pyarrow and Excel, Hugging Face imagefolders; split names; what is kept beside the labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from test_faults import SMALL, cli, one_line_error

from featx import store
from featx.sources import detect, discover


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    data = make_image_folder(tmp_path / "photos", splits=("train",), per_class=6)
    return sorted((data / "train").rglob("*.jpg"))  # 6 cats, then 6 dogs


def tar_writer_shards(folder: Path, photos: list[Path], fields, name: str = "train") -> str:
    """Shards written by the webdataset package's own TarWriter, ``fields(i, photo)`` giving each sample's extra
    members; two shards of six."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(2):
        with wds.TarWriter(str(folder / f"{name}-{shard:06d}.tar")) as sink:
            for i in range(shard * 6, shard * 6 + 6):
                sink.write({"__key__": f"{i:06d}", "jpg": photos[i].read_bytes(), **fields(i, photos[i])})
    return str(folder / f"{name}-{{000000..000001}}.tar")


def test_cls_is_the_label_whatever_else_a_sample_holds(photos, tmp_path):
    """TarWriter writes cls < jpg < json < txt: a JSON without a label and a caption must not relabel a sample."""
    spec = tar_writer_shards(tmp_path / "tars", photos, lambda i, p: {
        "cls": str(int("dogs" in p.name)), "json": json.dumps({"width": 48, "url": f"http://x/{i}"}),
        "txt": f"a photo, number {i}"})
    (split,) = discover(spec)
    assert split.class_names == ("0", "1") and split.labels.tolist() == [0] * 6 + [1] * 6
    columns = dict(split.columns)
    assert columns["caption"][3] == "a photo, number 3" and json.loads(columns["json"][3])["url"] == "http://x/3"


def test_a_caption_is_never_a_label_unless_asked(photos, tmp_path):
    spec = tar_writer_shards(tmp_path / "tars", photos, lambda i, p: {
        "txt": p.parent.name, "json": json.dumps({"width": 48})})
    (split,) = discover(spec)
    assert not split.labelled and set(split.labels.tolist()) == {-1}
    (split,) = discover(spec, label_key="txt")
    assert split.class_names == ("cats", "dogs") and split.labels.tolist() == [0] * 6 + [1] * 6
    status, _, _ = cli("extract", spec, "--out", tmp_path / "f", *SMALL)
    assert status == 0
    one_line_error(*cli("fit-head", tmp_path / "f" / "resnet18" / "train.h5")[::2], "unlabelled")


def test_a_json_label_comes_through_label_key(photos, tmp_path):
    spec = tar_writer_shards(tmp_path / "tars", photos, lambda i, p: {
        "json": json.dumps({"species": p.parent.name, "label": i % 3})})
    assert discover(spec)[0].labels.tolist() == [i % 3 for i in range(12)]
    (split,) = discover(spec, label_key="species")
    assert split.class_names == ("cats", "dogs")


def test_captions_and_json_travel_to_the_features_file_and_parquet(photos, tmp_path):
    import pyarrow.parquet as pq

    spec = tar_writer_shards(tmp_path / "tars", photos, lambda i, p: {
        "cls": str(i % 2), "txt": f"caption {i}", "json": json.dumps({"i": i})})
    assert cli("extract", spec, "--out", tmp_path / "f", *SMALL, "--batch_size", "5")[0] == 0
    path = tmp_path / "f" / "resnet18" / "train.h5"
    features = store.load(path)
    assert features.columns["caption"] == [f"caption {i}" for i in range(12)]
    assert [json.loads(j)["i"] for j in features.columns["json"]] == list(range(12))
    assert cli("export-features", path, tmp_path / "rows.parquet")[0] == 0
    table = pq.read_table(tmp_path / "rows.parquet")
    assert table.column("caption").to_pylist() == features.columns["caption"]
    assert table.column("json").to_pylist() == features.columns["json"]
    provenance = json.loads(table.schema.metadata[b"featx"])
    assert provenance["backbone"] == "resnet18" and provenance["weights_sha256"] == features.meta["weights_sha256"]
    assert provenance["featx_version"] and provenance["data_root"] == features.meta["data_root"]
    status, out, _ = cli("info", path)
    assert status == 0 and "12 rows x 512" in out and "weights_sha256" in out and "columns/caption" in out


def test_an_img2dataset_folder_is_webdataset_and_unlabelled_unless_asked(photos, tmp_path):
    folder = tmp_path / "img2dataset"
    tar_writer_shards(folder, photos, lambda i, p: {"txt": f"caption {i}", "json": json.dumps({"key": i})},
                      name="0000")
    for shard in ("00000", "00001"):
        (folder / f"{shard}.parquet").write_bytes(b"PAR1")  # img2dataset's per-shard tables, never read
        (folder / f"{shard}_stats.json").write_text("{}")
    assert detect(str(folder)) == "webdataset"
    (split,) = discover(folder)
    assert len(split) == 12 and not split.labelled and dict(split.columns)["caption"][0] == "caption 0"


def test_source_unlabelled_reads_tars_without_their_labels(photos, tmp_path):
    spec = tar_writer_shards(tmp_path / "tars", photos, lambda i, p: {"cls": str(i % 2)})
    (split,) = discover(spec, "unlabelled")
    assert len(split) == 12 and not split.labelled


def test_compressed_tars_are_refused_by_name(photos, tmp_path):
    import gzip

    tar_writer_shards(tmp_path / "tars", photos, lambda i, p: {"cls": "0"})
    packed = tmp_path / "train-000000.tar.gz"
    packed.write_bytes(gzip.compress((tmp_path / "tars" / "train-000000.tar").read_bytes()))
    one_line_error(*cli("extract", packed, "--out", tmp_path / "f", *SMALL)[::2], str(packed), "compressed")
    assert not (tmp_path / "f").exists()  # refused before any work


def _csv(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


def test_manifest_from_excel_pandas_and_pyarrow(photos, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = "".join(f"{p},{float('dogs' in p.name)}\n" for p in photos)  # pandas writes integer labels as 0.0
    (split,) = discover(_csv(tmp_path / "excel.csv", "path,label\n" + rows, bom=True))  # Excel's "CSV UTF-8"
    assert split.class_names == ("0", "1") and split.labels.tolist() == [0] * 6 + [1] * 6
    pq.write_table(pa.table({"path": [str(p) for p in photos], "label": [float("dogs" in p.name) for p in photos]}),
                   tmp_path / "floats.parquet")
    assert discover(tmp_path / "floats.parquet")[0].labels.tolist() == [0] * 6 + [1] * 6
    pq.write_table(pa.table({"path": [str(p) for p in photos], "label": [i % 2 == 0 for i in range(12)]}),
                   tmp_path / "bools.parquet")
    with pytest.raises(ValueError, match="row 0, column label: True is a boolean"):
        discover(tmp_path / "bools.parquet")
    pq.write_table(pa.table({"path": [str(p) for p in photos], "label": [[0, 1]] * 12}), tmp_path / "lists.parquet")
    with pytest.raises(ValueError, match="row 0, column label.*several values"):
        discover(tmp_path / "lists.parquet")
    with pytest.raises(ValueError, match="has a header but no rows"):
        discover(_csv(tmp_path / "empty.csv", "path,label,split\n"))


def test_duplicates_and_files_in_two_splits_are_reported(photos, tmp_path, capsys):
    rows = [f"{p},{p.parent.name},train\n" for p in photos]
    text = "path,label,split\n" + "".join(rows) + rows[0] + rows[1] + rows[2].replace(",train", ",validation")
    splits = discover(_csv(tmp_path / "m.csv", text))
    assert [s.name for s in splits] == ["train", "val"] and [len(s) for s in splits] == [12, 1]
    err = capsys.readouterr().err
    assert "2 duplicate rows" in err and "1 files are in more than one split" in err
    conflicting = "path,label,split\n" + rows[0] + rows[0].replace("cats,train", "dogs,val") + rows[7]
    with pytest.raises(ValueError, match=r"rows 2 and 3: .*cats_000.jpg has two labels"):
        discover(_csv(tmp_path / "conflict.csv", conflicting))


@pytest.mark.parametrize("alias", ["validation", "valid", "dev"])
def test_split_aliases_are_val_everywhere(photos, image_folder, alias, tmp_path):
    (image_folder / "val").rename(image_folder / alias)
    assert [s.name for s in discover(image_folder)] == ["train", "val"]
    rows = "".join(f"{p},{p.parent.name},{'train' if i % 3 else alias}\n" for i, p in enumerate(photos))
    assert [s.name for s in discover(_csv(tmp_path / "m.csv", "path,label,split\n" + rows))] == ["train", "val"]
    spec = tar_writer_shards(tmp_path / "tars", photos, lambda i, p: {"cls": "0"}, name=alias)
    assert discover(spec)[0].name == "val"


def test_fit_head_finds_a_validation_folder(image_folder, tmp_path):
    (image_folder / "val").rename(image_folder / "validation")
    assert cli("extract", image_folder, "--out", tmp_path / "f", *SMALL)[0] == 0
    assert (tmp_path / "f" / "resnet18" / "val.h5").is_file()
    status, out, _ = cli("fit-head", tmp_path / "f" / "resnet18" / "train.h5", "--head", "knn", "--out",
                         tmp_path / "knn")
    assert status == 0 and "val.h5" in out


def test_a_hugging_face_imagefolder_keeps_its_labels_and_splits(photos, tmp_path):
    root = tmp_path / "hf"
    for split, chosen in (("train", photos[::2]), ("validation", photos[1::2])):
        (root / split).mkdir(parents=True)
        lines = ["file_name,label"]
        for p in chosen:
            (root / split / p.name).write_bytes(p.read_bytes())
            lines.append(f"{p.name},{p.parent.name}")
        (root / split / "metadata.csv").write_text("\n".join(lines) + "\n")
    assert detect(str(root)) == "hf-imagefolder"
    train, val = discover(root)
    assert (train.name, val.name, len(train), len(val)) == ("train", "val", 6, 6)
    assert train.class_names == ("cats", "dogs") and np.array_equal(val.labels, [0, 0, 0, 1, 1, 1])
    assert val.paths[0] == "validation/cats_001.jpg"
    for split in ("train", "validation"):
        metadata = root / split / "metadata.csv"
        metadata.write_text(metadata.read_text().replace("file_name,label", "file_name,species"))
    one_line_error(*cli("extract", root, *SMALL)[::2], "metadata.csv", "no 'label' column", "--label_key")
    assert len(discover(root, label_key="species")[0]) == 6


def test_a_label_key_no_sample_has_is_one_line_naming_what_they_hold(photos, tmp_path):
    spec = tar_writer_shards(tmp_path / "tars", photos, lambda i, p: {"json": {"species": i % 2, "url": "u"}})
    one_line_error(*cli("extract", spec, "--out", tmp_path / "f", "--label_key", "nokey", *SMALL)[::2],
                   "--label_key 'nokey'", "their .json keys: species, url")
    assert not (tmp_path / "f").exists()
    assert discover(spec, label_key="species")[0].class_names == ("0", "1")


@pytest.mark.parametrize("column", ["image_path", "file_name", "image"])
def test_a_manifest_whose_paths_are_under_another_name(photos, column, tmp_path, capsys):
    rows = "".join(f"{p.relative_to(tmp_path)},{p.parent.name}\n" for p in photos)
    (split,) = discover(_csv(tmp_path / "m.csv", f"{column},label\n" + rows))
    assert len(split) == 12 and split.class_names == ("cats", "dogs")
    assert f"reading the image paths from {column!r}" in capsys.readouterr().err
    renamed = _csv(tmp_path / "n.csv", "where,label\n" + rows)
    one_line_error(*cli("extract", renamed, "--out", tmp_path / "f", *SMALL)[::2], "no 'path' column", "--path_key")
    status, _, err = cli("extract", renamed, "--path_key", "where", "--out", tmp_path / "f", *SMALL)
    assert status == 0 and len(store.load(tmp_path / "f" / "resnet18" / "all.h5").paths) == 12, err


def test_a_datasets_save_to_disk_folder_is_refused_by_name(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    for name in ("dataset_info.json", "state.json", "data-00000-of-00001.arrow"):
        (folder / name).write_text("{}")
    one_line_error(*cli("extract", folder, "--out", tmp_path / "f", *SMALL)[::2], "Hugging Face `datasets` folder",
                   "save_to_disk")
