import pytest
import torch
from torch import nn

import manyheads as mh

HEADS = {"age": mh.Regression(), "gender": mh.Binary(), "race": mh.Categorical(["a", "b", "c"])}


def small_trunk() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(16))


def conv_net(tta=None, seed=0):
    torch.manual_seed(seed)
    net = mh.MultiHeadNet(small_trunk(), HEADS, image_size=16, tta=tta)
    net(torch.zeros(1, 3, 16, 16))  # materialise the lazy layers
    return net


def test_flip_tta_averages_each_head_over_the_image_and_its_mirror_in_eval_mode_only():
    net, plain = conv_net("flip"), conv_net(None)
    plain.load_state_dict(net.state_dict())
    x = torch.randn(5, 3, 16, 16)
    net.eval(), plain.eval()
    with torch.no_grad():
        got, a, b = net(x), plain(x), plain(x.flip(3))
    for name in HEADS:
        torch.testing.assert_close(got[name], (a[name] + b[name]) / 2)
        assert not torch.allclose(got[name], a[name])  # the trunk is not mirror-symmetric: TTA changed answers
    net.train(), plain.train()
    with torch.no_grad():
        torch.testing.assert_close(net(x)["race"], plain(x)["race"])  # training sees single images


def test_tta_is_kept_by_save_and_load_and_used_by_predict(tmp_path):
    net = conv_net("flip").eval()
    pictures = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    before = net.predict_proba(pictures)
    path = net.save(tmp_path / "net.safetensors")
    loaded = mh.load(path, trunk=small_trunk())
    assert loaded.tta == "flip" and loaded.spec()["tta"] == "flip"
    for name, p in loaded.predict_proba(pictures).items():
        assert abs(p - before[name]).max() < 1e-6
    loaded.tta = None
    assert abs(loaded.predict_proba(pictures)["race"] - before["race"]).max() > 1e-4


def test_bad_tta_settings_are_refused():
    with pytest.raises(ValueError, match="tta='rotate'"):
        mh.MultiHeadNet(nn.Linear(4, 8), HEADS, tta="rotate")
    net = mh.MultiHeadNet(nn.Linear(4, 8), HEADS, tta="flip").eval()
    with pytest.raises(ValueError, match=r"mirrors image batches.*\[3, 4\]"):
        net(torch.randn(3, 4))
