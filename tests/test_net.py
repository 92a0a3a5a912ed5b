import pytest
import torch
from torch import nn

import manyheads as mh
from conftest import make_heads

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


# ---- hidden layers per head ---------------------------------------------------------------------


def test_hidden_gives_each_named_head_a_layer_of_its_own_and_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    net = mh.MultiHeadNet(small_trunk(), HEADS, image_size=16, hidden={"race": 12, "age": 5})
    net(torch.zeros(1, 3, 16, 16))  # materialise the lazy layers
    race, gender = net.head_layers["race"], net.head_layers["gender"]
    assert race.tower[0].weight.shape == (12, 16) and race.linear.weight.shape == (3, 12)
    assert isinstance(gender.tower, nn.Identity) and gender.linear.weight.shape == (1, 16)
    assert net.spec()["hidden"] == {"race": 12, "age": 5}
    pictures = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    before = net.eval().predict_proba(pictures)
    loaded = mh.load(net.save(tmp_path / "net.safetensors"), trunk=small_trunk())
    assert loaded.head_layers["age"].tower[0].out_features == 5
    for name, p in loaded.predict_proba(pictures).items():
        assert abs(p - before[name]).max() < 1e-6


def test_hidden_for_every_head_trains(table):
    torch.manual_seed(0)
    net = mh.MultiHeadNet(nn.Sequential(nn.Linear(8, 32), nn.ReLU()), make_heads(), hidden=16)
    result = mh.fit(net, table, validation=0.25, epochs=8, lr=3e-3, seed=0, progress=False)
    assert all(layer.tower[0].out_features == 16 for layer in net.head_layers.values())
    assert result.history["val/race/accuracy"].iloc[-1] > 0.6  # three balanced classes: constant gets ~0.33


@pytest.mark.parametrize(
    ("hidden", "message"),
    [({"height": 8}, r"names heads \['height'\]"), ({"race": -1}, r"units >= 0.*'race': -1"), (True, "units >= 0")],
)
def test_bad_hidden_settings_are_refused(hidden, message):
    with pytest.raises(ValueError, match=message):
        mh.MultiHeadNet(nn.Linear(4, 8), HEADS, hidden=hidden)


def _saved_with_spec(tmp_path, edit, weights=None):
    """A real model file whose JSON spec (or weights) were edited afterwards, as a damaged file would be."""
    import json

    from safetensors.torch import save_file

    net = conv_net()
    path = net.save(tmp_path / "good.safetensors")
    spec = mh.net.read_spec(path)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    if weights is not None:
        weights(state)
    text = edit(spec) if callable(edit) else edit
    damaged = tmp_path / "damaged.safetensors"
    save_file(state, str(damaged), metadata={"manyheads": text if isinstance(text, str) else json.dumps(text)})
    return damaged


def _with(spec, **changes):
    return {**spec, **changes}


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda s: "{not json", "not valid JSON"),
        (lambda s: [], "a list, not a mapping"),
        (lambda s: {}, "'heads' field"),
        (lambda s: _with(s, heads={"age": s["heads"]["age"]}), "do not fit the net"),  # a head fewer
        (
            lambda s: _with(s, heads={**s["heads"], "race": {"kind": "categorical", "labels": ["a", "b"]}}),
            "do not fit the net",
        ),  # labels of the wrong length
        (lambda s: _with(s, heads={**s["heads"], "race": {"kind": "shape"}}), "unknown head kind 'shape'"),
        (lambda s: _with(s, heads={"../../etc/x": s["heads"]["age"]}), "head name '../../etc/x' is not allowed"),
        (lambda s: _with(s, backbone="resnet999"), "unknown backbone 'resnet999'"),
        (lambda s: _with(s, backbone=7), "'backbone' field"),
        (lambda s: _with(s, image_size=10**7), "image_size must be a whole number of pixels in \\[8, 4096\\]"),
        (lambda s: _with(s, image_size=-3), "image_size must be a whole number of pixels in \\[8, 4096\\]"),
    ],
)
def test_a_damaged_model_file_is_refused_in_one_line_naming_the_file_and_field(tmp_path, edit, field):
    path = _saved_with_spec(tmp_path, edit)
    with pytest.raises(ValueError, match=field) as caught:
        mh.load(path, trunk=small_trunk())
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_model_with_non_finite_weights_is_refused_at_load_naming_it(tmp_path):
    def poison(state):
        state["head_layers.gender.linear.weight"][0, 0] = float("nan")

    path = _saved_with_spec(tmp_path, lambda s: s, weights=poison)
    with pytest.raises(ValueError, match=r"damaged.safetensors: the weights hold NaN or inf \(in \['head_layers"):
        mh.load(path, trunk=small_trunk())
    mh.load(tmp_path / "good.safetensors", trunk=small_trunk())  # the same file with finite weights loads
