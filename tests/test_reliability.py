"""Bad data tried on purpose through mh.fit: on_bad="error" names the file or row, "skip" drops and lists."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import manyheads as mh
from manyheads.encoding import split_rows
from manyheads.heads import head_from_spec
from manyheads.images import BadImageError, load_rgb

LABELS = ["a", "b", "c"]
FAST = dict(epochs=1, batch_size=8, image_size=32, progress=False, workers=1, seed=0)


def tiny_net(heads: dict | None = None) -> mh.MultiHeadNet:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return mh.MultiHeadNet(trunk, heads or {"age": mh.Regression(min=0, max=120), "kind": mh.Categorical(LABELS)})


def save_picture(path, mode="RGB", seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return str(path)


def corrupt_jpeg(good: bytes) -> bytes:
    """A JPEG whose header parses but whose Huffman table is zeroed: decoding fails."""
    data = bytearray(good)
    table = good.index(b"\xff\xc4")
    data[table + 5 : table + 25] = bytes(20)
    return bytes(data)


@pytest.fixture
def folder(tmp_path):
    """Eight good pictures (one PNG with alpha, one grayscale, one CMYK JPEG) and one file per defect."""
    good = [save_picture(tmp_path / f"ok{i}.jpg", seed=i) for i in range(5)]
    good += [
        save_picture(tmp_path / "alpha.png", "RGBA", 5),
        save_picture(tmp_path / "gray.jpg", "L", 6),
        save_picture(tmp_path / "cmyk.jpg", "CMYK", 7),
    ]
    jpeg = (tmp_path / "ok0.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "corrupt.jpg").write_bytes(corrupt_jpeg(jpeg))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is a text file, not a picture")
    bad = {
        "truncated.jpg": "truncated JPEG",
        "corrupt.jpg": "corrupt JPEG",
        "empty.jpg": "zero-byte file",
        "text.jpg": "not an image",
        "missing.jpg": "file not found",
    }
    return tmp_path, good, {str(tmp_path / name): kind for name, kind in bad.items()}


def table_of(images: list[str]) -> dict:
    n = len(images)
    return {"image": images, "age": [float(10 + 3 * i) for i in range(n)], "kind": [LABELS[i % 3] for i in range(n)]}


def test_png_with_alpha_grayscale_and_cmyk_decode_to_rgb(folder):
    tmp_path, good, _ = folder
    for name in ("alpha.png", "gray.jpg", "cmyk.jpg"):
        assert Image.open(tmp_path / name).mode in ("RGBA", "L", "CMYK")
        pixels = load_rgb(tmp_path / name, 32)
        assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.uint8
    gray = load_rgb(tmp_path / "gray.jpg", 32)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    result = mh.fit(tiny_net(), table_of(good), **FAST)  # all eight train, none skipped
    assert result.skipped == [] and result.history["train/kind/labels"].iloc[0] == len(good)


@pytest.mark.parametrize("name", ["truncated.jpg", "corrupt.jpg", "empty.jpg", "text.jpg", "missing.jpg"])
def test_a_bad_image_stops_training_naming_file_and_reason(folder, name):
    tmp_path, good, bad = folder
    path = str(tmp_path / name)
    with pytest.raises(BadImageError) as error:
        mh.fit(tiny_net(), table_of(good[:3] + [path] + good[3:]), **FAST)
    assert path in str(error.value) and bad[path] in str(error.value) and "on_bad='skip'" in str(error.value)
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("age", "thirty", "regression target must be a number, got 'thirty'"),
        ("age", -4.0, "-4.0 is outside [0, 120]"),
        ("age", math.inf, "must be finite"),
        ("kind", ["a", "b"], "expected one label of ['a', 'b', 'c'], got a list"),
        ("kind", "zebra", "'zebra' is not one of the head's labels"),
    ],
)
def test_a_bad_label_stops_training_naming_head_column_and_row(folder, column, value, message):
    _, good, _ = folder
    table = table_of(good)
    table[column][3] = value
    with pytest.raises(ValueError) as error:
        mh.fit(tiny_net(), table, **FAST)
    assert f"head {column!r}, column {column!r}, row 3: " in str(error.value)
    assert message in str(error.value)


def test_skip_drops_every_bad_row_counts_reasons_and_lists_them(folder):
    tmp_path, good, bad_images = folder
    images = good + list(bad_images)
    table = table_of(images)
    bad_labels = {1: ("age", "thirty", "label not a number"), 2: ("age", -4.0, "label outside [0, 120]")}
    bad_labels |= {
        3: ("kind", ["a"], "label of the wrong type"),
        4: ("kind", "zebra", "label not in the head's labels"),
    }
    for row, (column, value, _) in bad_labels.items():
        table[column][row] = value
    table["age"][5] = float("nan")  # a missing label, not a bad one: row 5 still trains "kind"
    run_dir = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = mh.fit(tiny_net(), table, on_bad="skip", run_dir=run_dir, **FAST)

    expected = {row: kind for row, (_, _, kind) in bad_labels.items()}
    expected |= {images.index(path): kind for path, kind in bad_images.items()}
    assert {item.row: item.reason for item in result.skipped} == expected
    for item in result.skipped:  # the full message names the file, or the head, column and row
        path = images[item.row]
        assert path in item.message if path in bad_images else f"row {item.row}: " in item.message
    assert json.loads((run_dir / "summary.json").read_text())["skipped"] == [b.as_dict() for b in result.skipped]

    messages = [str(w.message) for w in caught if "on_bad='skip'" in str(w.message)]
    assert len(messages) == 1 and f"skipped {len(expected)} bad rows" in messages[0]
    for kind in set(expected.values()):
        assert f"{kind}: 1" in messages[0]

    kept = len(images) - len(expected)
    history = result.history.iloc[0]
    assert history["train/kind/labels"] == kept
    assert history["train/age/labels"] == kept - 1  # the NaN age is unlabelled for "age" only
    assert all(math.isfinite(history[f"train/{head}/loss"]) for head in ("age", "kind"))


def test_skip_counts_repeated_reasons_together(folder):
    tmp_path, good, _ = folder
    jpeg = (tmp_path / "ok1.jpg").read_bytes()
    truncated = []
    for i in range(3):
        (tmp_path / f"cut{i}.jpg").write_bytes(jpeg[: len(jpeg) // (2 + i)])
        truncated.append(str(tmp_path / f"cut{i}.jpg"))
    table = table_of(good + truncated)
    table["kind"][0] = "zebra"
    with pytest.warns(
        UserWarning, match=r"skipped 4 bad rows \(truncated JPEG: 3, label not in the head's labels: 1\)"
    ):
        result = mh.fit(tiny_net(), table, on_bad="skip", **FAST)
    assert len(result.skipped) == 4


def test_nan_and_inf_in_tensor_inputs():
    x = torch.randn(40, 5)
    x[7, 2], x[11, 0] = float("nan"), float("inf")
    table = {"x": x, "y": x.nan_to_num().sum(1).tolist()}
    torch.manual_seed(0)
    net = mh.MultiHeadNet(nn.Sequential(nn.Linear(5, 8), nn.ReLU()), {"y": mh.Regression()})
    with pytest.raises(ValueError, match="input column 'x', row 7: contains NaN or inf"):
        mh.fit(net, table, epochs=1, progress=False)
    with pytest.warns(UserWarning, match=r"input NaN or inf: 2"):
        result = mh.fit(net, table, epochs=1, progress=False, on_bad="skip")
    assert [item.row for item in result.skipped] == [7, 11]
    assert result.history["train/y/labels"].iloc[0] == 38
    assert math.isfinite(result.history["train/y/loss"].iloc[0])


def test_with_a_validation_fraction_rows_are_named_as_in_the_users_table():
    x = torch.randn(40, 5)
    table = {"x": x, "y": x.sum(1).tolist()}
    train_rows, val_rows = split_rows(40, 0.25, seed=0)
    for row in (int(train_rows[-1]), int(val_rows[-1])):  # one bad row on each side of the split
        table["y"][row] = "n/a"
    options = dict(epochs=1, progress=False, validation=0.25, seed=0)
    torch.manual_seed(0)
    net = mh.MultiHeadNet(nn.Sequential(nn.Linear(5, 8), nn.ReLU()), {"y": mh.Regression()})
    with pytest.raises(ValueError, match=f"head 'y', column 'y', row {int(train_rows[-1])}: "):
        mh.fit(net, table, **options)
    with pytest.warns(UserWarning, match="label not a number: 2"):
        result = mh.fit(net, table, on_bad="skip", **options)
    named = sorted(item.row for item in result.skipped)
    assert named == sorted([int(train_rows[-1]), int(val_rows[-1])])
    assert all(f"row {item.row}: " in item.message for item in result.skipped)


def test_when_every_row_is_bad_training_says_so(folder):
    _, _, bad = folder
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no training rows left"):
        mh.fit(tiny_net(), table_of(list(bad)), on_bad="skip", **FAST)


def test_regression_bounds_round_trip_through_spec_and_model_file(tmp_path):
    head = mh.Regression(min=0, max=120)
    assert (
        head_from_spec(head.spec()).spec()
        == head.spec()
        == {"kind": "regression", "standardize": True, "min": 0, "max": 120}
    )
    assert mh.Regression().spec() == {"kind": "regression", "standardize": True}
    lower_only = head_from_spec(mh.Regression(min=0).spec())
    assert (lower_only.min, lower_only.max) == (0, None)
    target, labelled = lower_only.encode([5.0, 1e6, None], name="age")
    assert labelled.tolist() == [True, True, False]
    with pytest.raises(ValueError, match=r"head 'age', column 'age', row 1: -1 is outside \[0, inf\]"):
        lower_only.encode([5.0, -1], name="age")
    with pytest.raises(ValueError, match="min must not exceed max"):
        mh.Regression(min=10, max=1)

    torch.manual_seed(0)
    net = mh.MultiHeadNet(nn.Linear(4, 6), {"age": head, "kind": mh.Categorical(LABELS)})
    net(torch.zeros(2, 4))
    net.save(tmp_path / "m.safetensors")
    loaded = mh.load(tmp_path / "m.safetensors", trunk=nn.Linear(4, 6)).heads["age"]
    assert (loaded.min, loaded.max) == (0, 120) and repr(loaded) == "Regression(min=0, max=120)"
