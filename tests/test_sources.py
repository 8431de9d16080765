"""Sources and outputs: ImageFolder, unlabelled folders, CSV/Parquet manifests and WebDataset tars give the same
features; features out to Parquet, clip-retrieval's npy layout and pandas; the Python API."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder, sigkill_when
from test_faults import SMALL, cli, one_line_error

import featx
from featx import store
from featx.fit import fit_head
from featx.sources import detect, discover


def write_tars(folder: Path, samples: list[tuple[Path, int | str]], sizes: list[int], prefix: str = "val") -> str:
    """WebDataset tars of (image file, label) samples, ``sizes`` samples per tar, an integer label as ``key.cls``
    and a class name as ``key.json`` (``{"label": name}``); returns the brace spec."""
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for number, size in enumerate(sizes):
        with tarfile.open(folder / f"{prefix}-{number:06d}.tar", "w") as tar:
            for index, (image, label) in enumerate(samples[start:start + size], start):
                key = f"{index:06d}"
                tar.add(image, f"{key}{image.suffix}")
                data = str(label).encode() if isinstance(label, int) else json.dumps({"label": label}).encode()
                info = tarfile.TarInfo(f"{key}.{'cls' if isinstance(label, int) else 'json'}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        start += size
    return str(folder / f"{prefix}-{{000000..{len(sizes) - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def val_sources(hymenoptera, tmp_path_factory) -> dict[str, str]:
    """The 153 real val photos as ImageFolder, CSV and Parquet manifests, and three tars."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("sources")
    (split,) = discover(hymenoptera / "val")
    files = [hymenoptera / "val" / p for p in split.paths]
    rows = [{"path": str(f), "label": split.class_names[l]} for f, l in zip(files, split.labels)]
    with open(root / "val.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), root / "val.parquet")
    spec = write_tars(root / "tars", [(f, split.class_names[l]) for f, l in zip(files, split.labels)], [64, 64, 25])
    return {"imagefolder": str(hymenoptera / "val"), "csv": str(root / "val.csv"),
            "parquet": str(root / "val.parquet"), "webdataset": spec}


@pytest.mark.real_data
def test_every_source_gives_identical_features(val_sources, mobilenet_weights, tmp_path):
    loaded = {}
    for kind, data in val_sources.items():
        (summary,) = featx.extract(data, "mobilenet_v2", str(mobilenet_weights), tmp_path / kind, batch_size=64,
                                   device="cpu").values()
        loaded[kind] = store.load(summary["path"])
    reference = loaded["imagefolder"]
    assert len(reference.paths) == 153 and reference.meta["source"] == "imagefolder"
    for kind, features in loaded.items():
        assert np.abs(features.features - reference.features).max() == 0, kind
        assert features.labels.tolist() == reference.labels.tolist(), kind
        assert [features.class_names[i] for i in features.labels] == [reference.class_names[i] for i in
                                                                       reference.labels]
    assert loaded["webdataset"].meta["source"] == "webdataset" and loaded["webdataset"].paths[0] == \
        "val-000000.tar/000000"
    assert loaded["webdataset"].meta["split"] == "val" and loaded["csv"].meta["split"] == "all"


@pytest.mark.real_data
def test_a_logistic_head_fitted_through_a_manifest_scores_as_through_folders(hymenoptera, hymenoptera_features,
                                                                            mobilenet_weights, tmp_path):
    manifest = tmp_path / "ants_bees.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for split in discover(hymenoptera):
            writer.writerows([p, split.class_names[l], split.name] for p, l in zip(split.paths, split.labels))
    summaries = featx.extract(manifest, "mobilenet_v2", str(mobilenet_weights), tmp_path / "f", root=hymenoptera,
                              device="cpu")
    assert sorted(summaries) == ["train", "val"]
    head = fit_head(tmp_path / "f" / "mobilenet_v2" / "train.h5", "auto", "logreg", tmp_path / "head")
    reference = fit_head(hymenoptera_features / "train.h5", "auto", "logreg", tmp_path / "reference")
    assert head.selection_["val_accuracy"] == reference.selection_["val_accuracy"] == pytest.approx(0.9608, abs=1e-4)


def test_an_unlabelled_folder_extracts_refuses_heads_and_predicts(image_folder, tmp_path):
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    for i, image in enumerate(sorted((image_folder / "train").rglob("*.jpg"))[:6]):
        (photos / ("nested" if i % 2 else "") / f"photo{i}.jpg").write_bytes(image.read_bytes())
    assert detect(str(photos)) == "unlabelled"
    status, out, _ = cli("extract", photos, "--out", tmp_path / "f", *SMALL)
    assert status == 0
    features = store.load(tmp_path / "f" / "resnet18" / "all.h5")
    assert features.class_names == [] and set(features.labels.tolist()) == {-1} and len(features.paths) == 6
    assert "nested/photo1.jpg" in features.paths
    one_line_error(*cli("fit-head", tmp_path / "f" / "resnet18" / "all.h5")[::2], "unlabelled features", "fit-head")
    labelled = tmp_path / "labelled"
    cli("extract", image_folder, "--out", labelled, *SMALL)
    fit_head(labelled / "resnet18" / "train.h5", "none", "knn", tmp_path / "knn")
    one_line_error(*cli("evaluate", tmp_path / "knn", tmp_path / "f" / "resnet18" / "all.h5")[::2], "unlabelled")
    status, out, _ = cli("predict", tmp_path / "knn", photos, "--device", "cpu")
    assert status == 0 and len(out.splitlines()) == 7


def test_a_bad_manifest_names_the_row_and_column(tmp_path):
    def manifest(text: str) -> Path:
        path = tmp_path / "m.csv"
        path.write_text(text)
        return path

    with pytest.raises(ValueError, match="no 'path' column"):
        discover(manifest("file,label\na.jpg,cat\n"))
    with pytest.raises(ValueError, match=r"row 3, column split: 'training'"):
        discover(manifest("path,split\na.jpg,train\nb.jpg,training\n"))
    with pytest.raises(ValueError, match=r"row 3, column label: 'dog' is a class name, but row 2 holds an integer"):
        discover(manifest("path,label\na.jpg,1\nb.jpg,dog\n"))
    with pytest.raises(ValueError, match=r"row 2, column label: the label is empty"):
        discover(manifest("path,label\na.jpg,\n"))


def test_manifest_rows_whose_file_is_missing_are_recorded_as_failed(image_folder, tmp_path):
    images = sorted((image_folder / "train").rglob("*.jpg"))[:4]
    lines = ["path,label"] + [f"{p.relative_to(image_folder)},{p.parent.name}" for p in images] + \
            ["train/cats/missing.jpg,cats"]
    (image_folder / "m.csv").write_text("\n".join(lines) + "\n")
    status, out, _ = cli("extract", image_folder / "m.csv", "--out", tmp_path / "f", *SMALL)
    features = store.load(tmp_path / "f" / "resnet18" / "all.h5")
    assert status == 0 and len(features.paths) == 4
    assert features.failed[0][0] == "train/cats/missing.jpg" and "No such file" in features.failed[0][1]


def test_tars_keep_good_samples_record_bad_ones_and_resume_after_sigkill(image_folder, tmp_path):
    data = make_image_folder(tmp_path / "data", splits=("train",), per_class=12, size=(160, 160))
    images = sorted((data / "train").rglob("*.jpg"))
    samples = [(p, int(p.parent.name == "dogs")) for p in images]  # 24 samples
    (tmp_path / "bad.jpg").write_bytes(images[0].read_bytes()[:300] + b"\0" * 50)  # a corrupt JPEG
    samples[5] = (tmp_path / "bad.jpg", 0)
    spec = write_tars(tmp_path / "tars", samples, [6, 6, 6, 6], prefix="train")
    last = tmp_path / "tars" / "train-000003.tar"
    last.write_bytes(last.read_bytes()[:4000])  # cut inside its first member
    command = [sys.executable, "-m", "featx", "extract", spec, "--out", str(tmp_path / "f"), "--backbone",
               "resnet18", "--weights", "none", "--device", "cpu", "--workers", "1", "--batch_size", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "f" / "resnet18" / "train.h5.parts"
    sigkill_when(process, lambda: (parts / "part-00001.h5").exists())
    assert len(list(parts.glob("part-*.h5"))) in (2, 3), "not killed mid-run"
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "resuming" in result.stdout
    features = store.load(tmp_path / "f" / "resnet18" / "train.h5")
    failed = dict(features.failed)
    assert "train-000000.tar/000005" in failed and "train-000003.tar/000018" in failed
    assert "cut short" in failed["train-000003.tar/000018"] and "Error" in failed["train-000000.tar/000005"]
    assert features.paths == [f"train-{i // 6:06d}.tar/{i:06d}" for i in range(18) if i != 5]  # none twice


def test_our_tar_reading_agrees_with_webdataset(image_folder, tmp_path):
    import webdataset as wds

    images = sorted((image_folder / "train").rglob("*.jpg"))
    spec = write_tars(tmp_path / "tars", [(p, i % 2) for i, p in enumerate(images)], [5, 7], prefix="train")
    (split,) = discover(spec)
    theirs = [(s["__key__"], s["jpg"], int(s["cls"])) for s in wds.WebDataset(spec, shardshuffle=False)]
    ours = [(p.split("/")[1], m.read().getvalue(), int(split.class_names[l])) for p, m, l in
            zip(split.paths, split.members, split.labels)]
    assert ours == theirs and split.shard_sizes == (5, 7)


# --- outputs ---------------------------------------------------------------------------------------------------
def test_export_features_round_trips_exactly(image_folder, tmp_path):
    import pyarrow.parquet as pq
    from embedding_reader import EmbeddingReader

    cli("extract", image_folder, "--out", tmp_path / "f", *SMALL)
    path = tmp_path / "f" / "resnet18" / "train.h5"
    reference = store.load(path)
    assert cli("export-features", path, tmp_path / "train.parquet")[0] == 0
    table = pq.read_table(tmp_path / "train.parquet")
    assert table.column_names == ["path", "label", "class_name", "split", "embedding"]
    assert np.array_equal(np.stack(table["embedding"].to_numpy(zero_copy_only=False)), reference.features)
    assert table["path"].to_pylist() == reference.paths and table["class_name"].to_pylist()[0] == "cats"
    assert cli("export-features", path, tmp_path / "npy", "--format", "npy", "--normalize")[0] == 0
    normalised = reference.features / np.linalg.norm(reference.features, axis=1, keepdims=True)
    assert np.allclose(np.load(tmp_path / "npy" / "img_emb" / "img_emb_0.npy"), normalised, atol=1e-7)
    reader = EmbeddingReader(str(tmp_path / "npy" / "img_emb"), file_format="parquet_npy",
                             metadata_folder=str(tmp_path / "npy" / "metadata"), meta_columns=["image_path", "label"])
    read = [(embeddings, meta) for embeddings, meta in reader(batch_size=5, show_progress=False)]
    assert np.allclose(np.concatenate([e for e, _ in read]), normalised, atol=1e-7)
    assert sum((m["image_path"].tolist() for _, m in read), []) == reference.paths
    frame = featx.to_dataframe(path)
    assert list(frame.columns) == ["path", "label", "class_name", "split", "embedding"]
    assert np.array_equal(np.stack(frame["embedding"]), reference.features) and frame["path"].tolist() == \
        reference.paths


def test_embed_images_equals_extracted_rows(image_folder, tmp_path):
    cli("extract", image_folder, "--out", tmp_path / "f", *SMALL)
    features = featx.load(tmp_path / "f" / "resnet18" / "train.h5")
    from featx.decode import EvalTransform

    files = [str(image_folder / p) for p in features.paths[:10]]
    embedded = featx.embed_images(files, "resnet18", "none", device="cpu", transform=EvalTransform(40, 32))
    assert embedded.shape == (10, 512) and np.abs(embedded - features.features[:10]).max() <= 1e-6
    from PIL import Image

    pil = featx.embed_images([Image.open(f) for f in files[:2]], "resnet18", "none", device="cpu",
                             transform=EvalTransform(40, 32))
    assert np.abs(pil - features.features[:2]).max() <= 1e-6
    with pytest.raises(ValueError, match="cannot decode"):
        featx.embed_images([str(tmp_path / "missing.jpg")], "resnet18", "none", device="cpu")


def test_finetune_reads_manifests_and_tars(image_folder, tmp_path):
    from featx import checkpoints
    from featx.finetuning import FinetuneConfig, finetune, prepare

    images = sorted((image_folder / "train").rglob("*.jpg"))
    spec = write_tars(tmp_path / "tars", [(p, p.parent.name) for p in images], [6, 6], prefix="train")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in images))
    cfg = FinetuneConfig(backbone="squeezenet1_1", weights="none", resize=40, crop=32, batch_size=4, epochs=1,
                         workers=1, device="cpu")
    for name, data in (("tars", spec), ("csv", manifest)):
        run = prepare(data, cfg)
        assert len(run.loaders.train_split) == 10 and len(run.loaders.val_split) == 2
        assert run.class_names == ["cats", "dogs"]
        finetune(data, tmp_path / f"run-{name}", cfg)
        assert [h["epoch"] for h in checkpoints.load(tmp_path / f"run-{name}")[1]] == [0, 1]
