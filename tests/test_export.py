import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import manyheads as mh
from manyheads.export import OnnxModel, export_onnx
from manyheads.images import normalize

HEADS = {
    "age": mh.Regression(),
    "gender": mh.Binary(["male", "female"]),
    "race": mh.Categorical(["White", "Black", "Asian", "Indian", "Others"]),
    "decade": mh.Ordinal(["0-9", "10-19", "20-39", "40+"]),
    "tags": mh.MultiLabel(["glasses", "beard", "hat"]),
    "smiling": mh.Binary(),
}
TOL = 1e-4


def conv_net(size=24, heads=HEADS, seed=0):
    """A tiny conv trunk; logits are scaled up so that probabilities spread away from 0.5."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net = mh.MultiHeadNet(trunk, heads, image_size=size).eval()
    net(torch.zeros(1, 3, size, size))  # materialise the lazy head layers
    with torch.no_grad():
        for layer in net.head_layers.values():
            layer.linear.weight.mul_(20)
        if "age" in heads:  # standardised regression: its centre and scale buffers must be in the graph
            net.head_layers["age"].center.fill_(35.0)
            net.head_layers["age"].scale.fill_(12.0)
    return net


def pictures(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (30 + 7 * i, 41, 3), dtype=np.uint8) for i in range(n)]


def assert_same_predictions(net, model, inputs):
    expected, got = net.predict_proba(inputs), model.predict_proba(inputs)
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].shape == expected[name].shape
        assert np.abs(got[name] - expected[name]).max() <= TOL, name
    values, decoded = net.predict(inputs), model.predict(inputs)
    for name, head in net.heads.items():
        if head.continuous:
            assert np.abs(np.array(decoded[name]) - np.array(values[name])).max() <= TOL * 100  # values near 35
        else:
            assert decoded[name] == values[name], name


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net = conv_net()
    path = export_onnx(net, tmp_path_factory.mktemp("onnx") / "net.onnx")
    return net, path


@pytest.mark.parametrize("n", [1, 3])
def test_onnx_matches_torch_for_every_head_kind_and_batch_size(exported, n):
    net, path = exported
    assert_same_predictions(net, OnnxModel(path), pictures(n, seed=n))


def test_graph_takes_uint8_images_normalises_inside_and_has_a_dynamic_batch(exported):
    net, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image" and image.type == "tensor(uint8)"
    assert isinstance(image.shape[0], str) and image.shape[1:] == [3, 24, 24]
    assert [o.name for o in session.get_outputs()] == list(HEADS)
    for n in (1, 3, 5):
        x = torch.randint(0, 256, (n, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        outputs = dict(zip(HEADS, session.run(None, {"image": x.numpy()})))
        with torch.no_grad():
            raw = net(normalize(x))
        assert outputs["age"].shape == (n,)
        assert np.abs(outputs["age"] - raw["age"].numpy()).max() <= TOL * 100
        assert outputs["gender"].shape == (n, 2) and outputs["tags"].shape == (n, 3)
        assert outputs["decade"].shape == (n, 4)
        np.testing.assert_allclose(outputs["race"].sum(axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(outputs["decade"].sum(axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(outputs["gender"], net.heads["gender"].proba(raw["gender"]).numpy(), atol=TOL)


def test_the_file_alone_decodes_labels(exported):
    net, path = exported
    model = OnnxModel(path)  # no net needed: kinds and labels come from the metadata
    assert model.image_size == 24
    assert {n: h.spec() for n, h in model.heads.items()} == {n: h.spec() for n, h in net.heads.items()}
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["manyheads"]) == json.loads(json.dumps(net.spec()))
    assert json.loads(meta["manyheads.io"])["outputs"]["age"] == "value"
    decoded = model.predict(pictures(3))
    assert all(v in net.heads["race"].labels for v in decoded["race"])
    assert all(v in ("male", "female") for v in decoded["gender"])
    assert all(isinstance(v, bool) for v in decoded["smiling"])
    assert all(set(v) <= {"glasses", "beard", "hat"} for v in decoded["tags"])


def test_a_torchvision_backbone_exports(tmp_path):
    torch.manual_seed(0)
    heads = {"age": mh.Regression(), "gender": mh.Binary(["male", "female"]), "race": mh.Categorical(list("abc"))}
    net = mh.MultiHeadNet("mobilenet_v3_small", heads, image_size=64).eval()
    model = OnnxModel(export_onnx(net, tmp_path / "mobile.onnx"))
    assert model.spec()["backbone"] == "mobilenet_v3_small"
    for n in (1, 3):
        assert_same_predictions(net, model, pictures(n, seed=10 + n))


def test_flip_tta_is_inside_the_graph(tmp_path):
    net = conv_net()
    net.tta = "flip"
    model = OnnxModel(export_onnx(net, tmp_path / "tta.onnx"))
    assert model.spec()["tta"] == "flip"
    for n in (1, 3):
        assert_same_predictions(net, model, pictures(n, seed=20 + n))


def test_non_image_nets_take_float_input(tmp_path):
    torch.manual_seed(0)
    heads = {"y": mh.Regression(), "c": mh.Categorical(["a", "b", "c"])}
    net = mh.MultiHeadNet(nn.Sequential(nn.Linear(5, 16), nn.ReLU()), heads).eval()
    model = OnnxModel(export_onnx(net, tmp_path / "tab.onnx"))
    assert model.input_name == "input" and model.session.get_inputs()[0].type == "tensor(float)"
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    assert_same_predictions(net, model, x)


def test_export_keeps_training_mode_and_rejects_clashing_names(tmp_path):
    net = conv_net(heads={"image": mh.Regression()})
    with pytest.raises(ValueError, match="'image'"):
        export_onnx(net, tmp_path / "x.onnx")
    net = conv_net(heads={"age": mh.Regression()}).train()
    export_onnx(net, tmp_path / "y.onnx")
    assert net.training


def test_files_that_are_not_manyheads_exports_are_refused(tmp_path, exported):
    _, path = exported
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot load"):
        OnnxModel(garbage)
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="without a manyheads spec"):
        OnnxModel(tmp_path / "bare.onnx")
