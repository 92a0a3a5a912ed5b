import shutil
from pathlib import Path

import pytest
import torch

import manyheads as mh
from manyheads import backbones

WEIGHTS = Path(__file__).resolve().parents[2] / "shared/weights/mobilenet_v2-b0353104.pth"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"])
def test_torchvision_backbones_give_features(name):
    trunk, features = backbones.create(name)
    trunk.eval()
    with torch.no_grad():
        out = trunk(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, features)


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown backbone 'resnet1000'"):
        backbones.create("resnet1000")


def test_named_backbone_net_predicts_images_and_round_trips(tmp_path):
    import numpy as np

    heads = {"age": mh.Regression(), "gender": mh.Binary(["male", "female"])}
    net = mh.MultiHeadNet("mobilenet_v3_small", heads, image_size=64)
    images = [np.random.default_rng(i).integers(0, 255, (80, 60, 3), dtype=np.uint8) for i in range(3)]
    before = net.predict(images)
    loaded = mh.load(net.save(tmp_path / "m.safetensors"))
    assert loaded.backbone == "mobilenet_v3_small" and loaded.image_size == 64
    assert loaded.predict(images) == before and len(before["gender"]) == 3


@pytest.mark.skipif(not WEIGHTS.exists(), reason=f"no pretrained checkpoint at {WEIGHTS}")
def test_pretrained_weights_load_offline_from_the_torch_cache(tmp_path, monkeypatch):
    (tmp_path / "hub/checkpoints").mkdir(parents=True)
    shutil.copy(WEIGHTS, tmp_path / "hub/checkpoints" / WEIGHTS.name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    net = mh.MultiHeadNet("mobilenet_v2", {"g": mh.Binary()}, pretrained=True)
    reference = torch.load(WEIGHTS, weights_only=True)
    assert torch.equal(net.trunk.features[0][0].weight, reference["features.0.0.weight"])


def test_pretrained_without_cache_names_the_file_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    import torchvision.models._api as weights_api

    monkeypatch.setattr(weights_api, "load_state_dict_from_url", _no_network)  # never touch the network
    with pytest.raises(RuntimeError, match="to work offline"):
        backbones.create("resnet18", pretrained=True)


def _no_network(*args, **kwargs):
    raise OSError("no network")


def test_classifier_and_its_dropout_are_removed():
    trunk, features = backbones.create("mobilenet_v2")
    assert features == 1280
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Dropout)) for m in trunk.classifier.modules())
    net = mh.MultiHeadNet("mobilenet_v2", {"g": mh.Binary()}, dropout=0.2)
    assert isinstance(net.drop, torch.nn.Dropout) and net.drop.p == 0.2
