"""Discovery and decoding: odd and corrupt files are decoded or reported, never fatal, never shift labels."""

from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from featx import store
from featx.backbones import BackboneSpec
from featx.decode import EvalTransform, ImageFiles, collate, load_rgb
from featx.extract import extract
from featx.options import ExtractOptions
from featx.sources import discover


def _jpeg_bytes(size=(40, 30), colour=(200, 30, 30), **save) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def write_odd_files(folder):
    """Every odd case of the issue; returns (good names, bad names)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "truncated.jpg").write_bytes(_jpeg_bytes((300, 200))[:600])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    Image.new("CMYK", (40, 30), (255, 0, 0, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)).save(folder / "sixteen_bit.png")
    palette = Image.new("P", (40, 30), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(folder / "palette_transparent.png", transparency=0)
    Image.new("L", (40, 30), 128).save(folder / "gray.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (60, 30), (0, 0, 255)).save(folder / "rotated.jpg", exif=exif)
    Image.new("RGB", (40, 30), (0, 200, 0)).save(folder / "animated.gif")
    (folder / ".hidden.jpg").write_bytes(_jpeg_bytes())
    (folder / "notes.txt").write_text("ignored")
    good = ["animated.gif", "cmyk.jpg", "gray.jpg", "palette_transparent.png", "rotated.jpg", "sixteen_bit.png"]
    return good, ["empty.jpg", "text.jpg", "truncated.jpg"]


def test_decoding_of_odd_modes(tmp_path):
    good, _ = write_odd_files(tmp_path)
    for name in good:
        assert load_rgb(tmp_path / name).mode == "RGB"
    assert load_rgb(tmp_path / "rotated.jpg").size == (30, 60)  # EXIF orientation applied
    assert load_rgb(tmp_path / "sixteen_bit.png").getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped
    assert load_rgb(tmp_path / "palette_transparent.png").getpixel((0, 0)) == (255, 255, 255)  # over white
    assert load_rgb(tmp_path / "gray.jpg").getpixel((5, 5)) == (128, 128, 128)
    cyan = load_rgb(tmp_path / "cmyk.jpg").getpixel((5, 5))
    assert cyan[0] < 30 and cyan[1] > 220 and cyan[2] > 220


def test_discover_splits_and_classes(image_folder):
    (image_folder / "train" / "cats" / ".DS_Store").write_text("x")
    (image_folder / "train" / ".hidden_class").mkdir()
    splits = discover(image_folder)
    assert [s.name for s in splits] == ["train", "val"]
    train = splits[0]
    assert train.class_names == ("cats", "dogs") and len(train) == 12
    assert all(p.startswith("train/") for p in train.paths)
    assert [p.split("/")[1] for p in train.paths] == [train.class_names[i] for i in train.labels]


def test_discover_without_splits_is_one_split(image_folder):
    (split,) = discover(image_folder / "val")
    assert split.name == "val" and len(split) == 12 and split.paths[0].startswith("cats/")


def test_class_missing_from_train_is_an_error(image_folder):
    (image_folder / "val" / "birds").mkdir()
    with pytest.raises(ValueError, match=r"\['birds'\].*train"):
        discover(image_folder)


def test_odd_files_extract_without_crashing(tmp_path):
    data = tmp_path / "data"
    good, bad = write_odd_files(data / "odd")
    (data / "plain").mkdir()
    Image.new("RGB", (50, 40), (10, 10, 10)).save(data / "plain" / "a.jpg")
    out = tmp_path / "features"
    options = ExtractOptions(batch_size=4, workers=1, shard_size=4)
    summary = extract(data, BackboneSpec("resnet18", "none"), out, options=options)["all"]
    assert summary["num_rows"] == len(good) + 1 and summary["num_failed"] == len(bad)
    with h5py.File(out / "resnet18" / "all.h5") as f:
        paths = list(f["paths"].asstr()[:])
        assert sorted(paths) == sorted([f"odd/{n}" for n in good] + ["plain/a.jpg"])
        names = f.attrs["class_names"].tolist()
        assert [names[i] for i in f["labels"][:]] == [p.split("/")[0] for p in paths]
        assert sorted(f["failed/paths"].asstr()[:]) == [f"odd/{n}" for n in bad]
        reasons = dict(zip(f["failed/paths"].asstr()[:], f["failed/reasons"].asstr()[:]))
        assert "truncated" in reasons["odd/truncated.jpg"].lower()
        assert "UnidentifiedImageError" in reasons["odd/text.jpg"]
        assert np.isfinite(f["features"][:]).all()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_decode_on_device_agrees_with_pil_and_reports_the_same_failures(tmp_path, device):
    data = tmp_path / "data"
    good, bad = write_odd_files(data / "odd")
    for i in range(5):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (90, 120, 3), np.uint8)).save(
            data / "odd" / f"photo{i}.jpg", quality=90)
    runs = {}
    for on_device in (False, True):
        options = ExtractOptions(batch_size=4, workers=1, device=device, precision="fp32", decode_on_device=on_device)
        extract(data, BackboneSpec("resnet18", "none"), tmp_path / str(on_device), options=options)
        runs[on_device] = store.load(tmp_path / str(on_device) / "resnet18" / "all.h5")
    pil, nvjpeg = runs[False], runs[True]
    assert nvjpeg.meta["decoder"] == "torchvision.io.decode_jpeg" and pil.meta["decoder"] == "PIL"
    assert pil.paths == nvjpeg.paths and len(pil.paths) == len(good) + 5
    assert sorted(p for p, _ in pil.failed) == sorted(p for p, _ in nvjpeg.failed) == [f"odd/{n}" for n in bad]
    cosine = (pil.features * nvjpeg.features).sum(1) / np.linalg.norm(pil.features, axis=1) / np.linalg.norm(
        nvjpeg.features, axis=1)
    assert cosine.min() >= 0.999, cosine


@pytest.mark.parametrize("size", [(300, 257), (257, 300), (256, 256), (80, 100), (1000, 224), (701, 500)])
def test_resize_crop_only_is_within_one_level_of_resize_then_crop(size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))  # noise: the worst case
    exact, region = EvalTransform()(image).int(), EvalTransform(resize_crop_only=True)(image).int()
    assert region.shape == exact.shape == (3, 224, 224)
    assert (region - exact).abs().max() <= 1


def test_resize_crop_only_is_recorded_only_when_set():
    assert "resize_crop_only" not in EvalTransform().describe()  # files from before the option keep their identity
    described = EvalTransform(resize_crop_only=True).describe()
    assert described["resize_crop_only"] and EvalTransform.from_dict(described) == EvalTransform(resize_crop_only=True)
    with pytest.raises(ValueError, match="resize_crop_only needs one of PIL's filters.*'nearest-exact'"):
        EvalTransform(interpolation="nearest-exact", resize_crop_only=True)


def test_batches_are_channels_last_copies_of_the_pixels(tmp_path):
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
    files = ImageFiles(tmp_path, tuple(f"{i}.png" for i in range(3)), EvalTransform(resize=224))
    batch = collate([files[i] for i in range(3)])
    assert batch.images.shape == (3, 3, 224, 224) and batch.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch.images, torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2))


def _device_pipeline_files(folder: Path) -> list[str]:
    """An EXIF-rotated JPEG, a greyscale JPEG, a PNG, a plain JPEG, and a JPEG cut short, as photos come."""
    from PIL import Image as PILImage

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    rotated = PILImage.fromarray(pixels)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(folder / "rotated.jpg", quality=95, exif=exif)
    PILImage.fromarray(pixels[..., 0]).save(folder / "grey.jpg", quality=95)
    PILImage.fromarray(pixels).save(folder / "plain.png")
    PILImage.fromarray(pixels).save(folder / "plain.jpg", quality=95)
    (folder / "cut.jpg").write_bytes((folder / "plain.jpg").read_bytes()[:600])
    return ["rotated.jpg", "grey.jpg", "plain.png", "plain.jpg", "cut.jpg"]


def device_pipeline_matches_pil(folder: Path, device: str, max_mean_difference: float) -> None:
    """The device pipeline (bytes read in threads, one batched decode on DEVICE, EXIF applied, other files by PIL)
    against the PIL path, image by image; the cut JPEG is recorded as failed by both, nothing else is dropped."""
    from featx.decode import decode_on_device, read_batches

    names = tuple(_device_pipeline_files(folder))
    transform = EvalTransform(resize=48, crop=40)
    exact = collate([ImageFiles(folder, names, transform)[i] for i in range(len(names))])
    on_device = ImageFiles(folder, names, transform, encoded=True)
    (batch,) = read_batches(on_device, [list(range(len(names)))], 2, torch.device(device))
    assert batch.encoded_indices.tolist() == [0, 1, 3, 4]  # only JPEGs' bytes were read; the PNG was decoded
    decoded = decode_on_device(batch, transform, torch.device(device))
    assert decoded.indices.tolist() == exact.indices.tolist() == [0, 1, 2, 3]
    assert [i for i, _ in decoded.failed] == [i for i, _ in exact.failed] == [4]
    difference = (decoded.images.cpu().float() - exact.images.float()).abs()
    assert difference.mean(dim=(1, 2, 3)).max() <= max_mean_difference  # rotated right: ~100 levels otherwise


def test_device_pipeline_on_cpu_matches_pil(tmp_path):
    device_pipeline_matches_pil(tmp_path, "cpu", 1.0)
