import io
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import manyheads as mh
from manyheads.datasets import UTKFACE_RACES

RACES = ["a", "b", "c"]


def make_table(n: int = 600, seed: int = 0, missing_age: int = 0) -> dict:
    """Synthetic rows whose every target depends on the inputs: age, gender and race heads."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    age = (40 + 15 * x[:, 0] + rng.normal(size=n)).astype(object)
    if missing_age:
        age[:missing_age] = None
    gender = np.where(x[:, 1] > 0, "female", "male")
    race = np.array(RACES)[np.argmax(x[:, 2:5], axis=1)]
    return {"x": x, "age": list(age), "gender": list(gender), "race": list(race)}


def make_heads() -> dict:
    return {"age": mh.Regression(), "gender": mh.Binary(["male", "female"]), "race": mh.Categorical(RACES)}


def make_net(seed: int = 0, heads: dict | None = None) -> mh.MultiHeadNet:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
    return mh.MultiHeadNet(trunk, heads or make_heads())


class Sleep(nn.Module):
    """Makes a model slow, deterministically: every forward pass takes ``seconds`` more."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def slow_image_net(seconds: float = 0.0) -> mh.MultiHeadNet:
    """A tiny 32-px image net (age, gender, race) whose answers differ per image; each pass ``seconds`` longer."""
    torch.manual_seed(0)
    trunk = nn.Sequential(
        Sleep(seconds), nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    heads = {"age": mh.Regression(), "gender": mh.Binary(["male", "female"]), "race": mh.Categorical(UTKFACE_RACES)}
    net = mh.MultiHeadNet(trunk, heads, image_size=32).eval()
    net(torch.zeros(1, 3, 32, 32))
    with torch.no_grad():
        for layer in net.head_layers.values():
            layer.linear.weight.mul_(30)  # answers far apart (a mix-up cannot pass for rounding), bars that differ
        net.head_layers["age"].center.fill_(40.0)
    return net


def half_written_save(error: Exception):
    """A stand-in for torch.save that writes half the file, then raises ``error``: a crash or a full disk mid-write."""
    real_save = torch.save

    def save(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.seek(file.tell() // 2)
        file.truncate()  # half a file on disk, then the failure
        raise error

    return save


# ---- images: tests/test_images_decode.py and tests/test_images_cache.py ----------------------------


def picture(h=40, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path, array, **kw):
    Image.fromarray(array).save(path, **kw)
    return path


def bad_cases(tmp_path):
    good = io.BytesIO()
    Image.fromarray(picture(64, 64)).save(good, "JPEG")
    (tmp_path / "half.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, not a picture")
    return {
        tmp_path / "half.jpg": "truncated JPEG",
        tmp_path / "empty.jpg": "zero-byte file",
        tmp_path / "missing.jpg": "file not found",
        tmp_path / "text.jpg": "not an image",
    }


@pytest.fixture
def one_thread():
    """One torch thread: tiny shapes gain nothing from more, and a busy machine punishes oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def table():
    return make_table()
