"""The Python API equals the CLI: ``featx.extract``, ``featx.finetune`` and ``featx.compare`` take every flag of
their command, by the same name and with the same default (the lists derived from both signatures), and return what
they wrote."""

from __future__ import annotations

import dataclasses

import pytest

import featx
from featx import store
from featx.cli import COMMANDS, extra_flags
from featx.compare import recipe_flags
from featx.finetuning import FinetuneConfig
from featx.flags import signature_flags

API = {"extract": (featx.extract, {}),
       "finetune": (featx.finetune, {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}),
       "compare": (featx.compare, recipe_flags())}


@pytest.mark.parametrize("command", sorted(API))
def test_every_cli_flag_is_an_api_keyword_with_the_same_default(command):
    function, recipe = API[command]
    cli_positional, cli_flags = signature_flags(COMMANDS[command])
    api_positional, api_flags = signature_flags(function)
    assert api_positional == cli_positional
    assert {**api_flags, **recipe} == {**cli_flags, **extra_flags(command)}
    assert len(cli_flags) + len(extra_flags(command)) > 10


def test_extract_and_finetune_from_python(image_folder, tmp_path):
    small = dict(weights="none", resize=40, crop=32, device="cpu", workers=0)
    summary = featx.extract(image_folder, "resnet18", out=tmp_path / "f", splits="val", pool="default", **small)
    assert list(summary) == ["val"] and store.load(summary["val"]["path"]).features.shape == (12, 512)
    with pytest.raises(ValueError, match="pool"):  # a torchvision model has one pooling: one line, not a TypeError
        featx.extract(image_folder, "resnet18", out=tmp_path / "g", pool="cls", **small)
    metrics = featx.finetune(image_folder, tmp_path / "run", backbone="resnet18", epochs=1, batch_size=6, **small)
    assert metrics["num_examples"] == 12 and 0 <= metrics["accuracy"] <= 1
    with pytest.raises(ValueError, match="no flag epoch"):
        featx.finetune(image_folder, tmp_path / "other", epoch=1)
