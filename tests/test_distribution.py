"""Tests for the distribution head (heads/distribution.py) and its losses DLDL-v2 and mean-variance."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import manyheads as mh
from manyheads.losses import resolve


def test_dldl_loss_matches_a_hand_computation():
    head = mh.Distribution(min=0, max=4, step=1, sigma=1.0)
    logits = torch.tensor([[0.0, 1.0, 2.0, 1.0, 0.0]])
    loss = resolve({"age": head})["age"](logits, torch.tensor([1.0]), torch.tensor([True]))
    label = [math.exp(-0.5 * (j - 1) ** 2) for j in range(5)]
    label = [v / sum(label) for v in label]
    q = [math.exp(v) for v in (0.0, 1.0, 2.0, 1.0, 0.0)]
    q = [v / sum(q) for v in q]
    kl = sum(p * (math.log(p) - math.log(r)) for p, r in zip(label, q))
    mean = sum(j * r for j, r in enumerate(q))  # 2.0 by symmetry
    assert loss.item() == pytest.approx(kl + abs(mean - 1.0), rel=1e-5)


def test_mean_variance_loss_matches_a_hand_computation():
    head = mh.Distribution(min=10, max=13, step=1)
    logits = torch.tensor([[0.0, 2.0, 0.0, -1.0]])
    loss = resolve({"age": head}, {"age": "mean_variance"})["age"](logits, torch.tensor([11.4]), torch.tensor([True]))
    p = torch.softmax(logits[0], 0).tolist()
    mean = sum(j * v for j, v in enumerate(p))
    variance = sum(v * (j - mean) ** 2 for j, v in enumerate(p))
    ce = -math.log(p[1])  # 11.4 is nearest to the bin of 11 (position 1)
    assert loss.item() == pytest.approx(ce + 0.2 * (mean - 1.4) ** 2 / 2 + 0.05 * variance, rel=1e-5)


def test_answers_are_the_mean_or_the_median_in_target_units_and_quantiles_bracket_them():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.4, 0.2, 0.1], [0.0001, 0.0001, 0.0001, 0.0001, 0.9996]]))
    mean = mh.Distribution(min=20, max=40, step=5)
    assert mean.decode(logits) == pytest.approx([30.0, 39.995], abs=1e-4)  # bins 20, 25, 30, 35, 40
    median = mh.Distribution(min=20, max=40, step=5, answer="median")
    assert median.decode(logits)[0] == pytest.approx(30.0)  # the middle of the middle bin
    low, high = mean.quantile(logits, 0.05), mean.quantile(logits, 0.95)
    assert (low[0] < 30 < high[0]) and high[1] <= 40 and low[0] >= 20
    assert mean.proba(logits).sum(dim=1).tolist() == pytest.approx([1.0, 1.0])


def test_targets_outside_the_bins_are_bad_rows_and_missing_ones_unlabelled():
    head = mh.Distribution(min=0, max=100)
    target, labelled = head.encode([31, None, 99.5], name="age")
    assert labelled.tolist() == [True, False, True] and target[0].item() == 31
    with pytest.raises(ValueError, match=r"head 'age', column 'age', row 1: 101 is outside \[0, 100\]"):
        head.encode([5, 101], name="age")
    with pytest.raises(ValueError, match="whole number of steps"):
        mh.Distribution(min=0, max=10, step=3)


def _faces(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    age = np.clip(40 + 15 * x[:, 0], 0, 90).round().astype(object)
    age[::4] = None  # partial labels: a quarter of the rows have no age
    return {"x": x, "age": list(age), "smile": list(x[:, 1] > 0)}


def _net():
    torch.manual_seed(0)
    heads = {"age": mh.Distribution(min=0, max=90, step=2), "smile": mh.Binary()}
    return mh.MultiHeadNet(nn.Sequential(nn.Linear(4, 32), nn.ReLU()), heads)


def test_trains_with_partial_labels_and_beats_the_constant_predictor():
    table = _faces(400)
    result = mh.fit(_net(), table, validation=0.25, epochs=30, lr=1e-2, seed=0, progress=False)
    ages = np.array([a for a in table["age"] if a is not None], dtype=float)
    first = result.history.iloc[0]
    assert first["train/age/labels"] + first["val/age/labels"] == 300  # a quarter of the 400 rows have no age
    assert result.history["val/age/mae"].iloc[-1] < 0.6 * np.abs(ages - np.median(ages)).mean()


def test_spec_onnx_and_the_service_answer_in_years(tmp_path):
    pytest.importorskip("onnxruntime")
    from manyheads.export import OnnxModel, export_onnx

    net = _net()
    table = _faces()
    mh.fit(net, table, epochs=2, seed=0, progress=False)
    loaded = mh.load(net.save(tmp_path / "m.safetensors"), trunk=nn.Sequential(nn.Linear(4, 32), nn.ReLU()))
    assert loaded.heads["age"].spec() == net.heads["age"].spec()
    years = net.predict(table["x"])["age"]
    assert loaded.predict(table["x"])["age"] == pytest.approx(years)
    assert net.predict_proba(table["x"])["age"].shape == (96, 46)
    onnx = OnnxModel(export_onnx(net, tmp_path / "m.onnx"))
    assert onnx.predict(table["x"])["age"] == pytest.approx(years, abs=1e-3)
    assert all(0 <= y <= 90 for y in years)
    answers = net.heads["age"].answers(onnx.outputs(table["x"][:2])["age"])  # what the service sends per image
    assert answers[0]["value"] == pytest.approx(years[0], abs=1e-3) and "probabilities" not in answers[0]


def test_the_service_answers_years_for_an_image():
    pytest.importorskip("fastapi")
    import io

    import httpx
    from PIL import Image

    from manyheads.serving import create_app, serve_in_thread

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net = mh.MultiHeadNet(trunk, {"age": mh.Distribution(min=0, max=90)}, image_size=16).eval()
    picture = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(picture, "PNG")
    expected = net.predict([Image.open(io.BytesIO(picture.getvalue()))])["age"][0]
    with serve_in_thread(create_app(net)) as url:
        answer = httpx.post(url + "/predict", files={"files": ("a.png", picture.getvalue())}, timeout=30).json()
    age = answer["predictions"][0]["age"]
    assert age["value"] == pytest.approx(expected, abs=1e-3) and 0 <= age["value"] <= 90
