"""The registry: classifier stripping per family, weight loading and its errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from featx.backbones import WeightsError, create_backbone, create_model

# Pooled feature widths as published for each architecture.
KNOWN_DIMS = {
    "resnet18": 512, "resnet50": 2048, "mobilenet_v2": 1280, "squeezenet1_1": 512, "mobilenet_v3_small": 1024,
    "efficientnet_b0": 1280, "shufflenet_v2_x0_5": 1024, "regnet_y_400mf": 440, "densenet121": 1024,
    "convnext_tiny": 768,
}


@pytest.mark.parametrize("name", sorted(KNOWN_DIMS))
def test_stripped_backbone_returns_pooled_features(name):
    backbone = create_backbone(name, "none")
    assert backbone.feature_dim == KNOWN_DIMS[name]
    with torch.inference_mode():
        out = backbone.model(torch.randn(2, 3, 96, 96))
    assert out.flatten(1).shape == (2, KNOWN_DIMS[name])


def test_random_init_is_seeded():
    a, b = create_backbone("resnet18", "none"), create_backbone("resnet18", "none")
    assert torch.equal(a.model.conv1.weight, b.model.conv1.weight)


def test_squeezenet_loads_shared_file_strictly(squeezenet_weights):
    model, info, _ = create_model("squeezenet1_1", str(squeezenet_weights))
    assert info.classifier_loaded and len(info.categories) == 1000 and info.categories[310] == "ant"
    reference = torch.load(squeezenet_weights, weights_only=True)
    assert torch.equal(model.state_dict()["classifier.1.weight"], reference["classifier.1.weight"])
    assert info.sha256 == "cd93719af1175b0e98d5b829c4b768248748808ad9bb712ae52a3dce0c7a5212"


def test_features_only_file_loads_without_classifier(mobilenet_weights):
    backbone = create_backbone("mobilenet_v2", str(mobilenet_weights))
    assert not backbone.weights.classifier_loaded and backbone.feature_dim == 1280
    reference = torch.load(mobilenet_weights, weights_only=True)
    assert torch.equal(backbone.model.state_dict()["features.0.0.weight"], reference["features.0.0.weight"])


def test_bare_file_name_is_found_in_mirror(mirror, monkeypatch):
    monkeypatch.setenv("FEATX_MIRROR", str(mirror))
    assert create_backbone("mobilenet_v2", "mobilenet_v2-imagenet-features.pth").weights.sha256.startswith("7c0df586")


def _one_line_error(name, weights) -> str:
    with pytest.raises(WeightsError) as caught:
        create_backbone(name, weights)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_backbone_key_is_named(mobilenet_weights, tmp_path):
    state = torch.load(mobilenet_weights, weights_only=True)
    del state["features.3.conv.0.0.weight"]
    torch.save(state, tmp_path / "broken.pth")
    assert "missing keys features.3.conv.0.0.weight" in _one_line_error("mobilenet_v2", str(tmp_path / "broken.pth"))


def test_wrong_architecture_is_refused(squeezenet_weights):
    message = _one_line_error("mobilenet_v2", str(squeezenet_weights))
    assert "do not fit mobilenet_v2" in message and "unexpected keys" in message


def test_nonexistent_file(tmp_path):
    assert "does not exist" in _one_line_error("resnet18", str(tmp_path / "nope.pth"))


def test_unknown_weights_name_lists_the_known_ones():
    assert "IMAGENET1K_V1" in _one_line_error("resnet18", "IMAGENET_V9")


class Payload:
    """An arbitrary class: loading it would need a full unpickle."""


def test_pickled_object_is_not_unpickled(tmp_path):
    torch.save({"w": Payload()}, tmp_path / "evil.pth")
    assert "not a tensors-only file" in _one_line_error("resnet18", str(tmp_path / "evil.pth"))


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        create_backbone("resnet19", "none")


def test_the_listing_gives_every_torchvision_models_feature_width():
    from test_faults import cli

    status, out, _ = cli("backbones", "--mirror", "none")
    widths = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if len(line.split()) >= 3}
    assert status == 0 and widths["resnet18"] == "512" and widths["resnet50"] == "2048"
    assert widths["mobilenet_v2"] == "1280" and widths["squeezenet1_1"] == "512"
    assert widths["regnet_y_400mf"] == str(torchvision.models.regnet_y_400mf().fc.in_features)  # built for real
    assert all(widths[name].isdigit() for name in torchvision.models.list_models(module=torchvision.models))


def test_the_listing_shows_the_mirrors_own_weights_files(mirror):
    from test_faults import cli

    status, out, _ = cli("backbones", "--mirror", mirror)
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert status == 0 and "--weights mobilenet_v2-imagenet-features.pth" in rows["mobilenet_v2"]
    assert "--weights squeezenet1_1-imagenet.pth" in rows["squeezenet1_1"] and "--weights" not in rows["resnet18"]
