"""manyheads.images.decoding: one item (path, bytes, PIL image, array) to pixels, and which columns hold images."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import bad_cases, picture, save
from manyheads.images import BadImageError, load_rgb, looks_like_images

# ---- load_rgb -------------------------------------------------------------------------------


def test_every_input_form_gives_the_same_pixels(tmp_path):
    a = picture()
    expected = load_rgb(Image.fromarray(a), 32)
    assert expected.dtype == torch.uint8 and expected.shape == (3, 32, 32)
    png = save(tmp_path / "a.png", a)
    forms = [a, a.transpose(2, 0, 1), torch.from_numpy(a).permute(2, 0, 1), torch.from_numpy(a), png, str(png)]
    for form in forms:
        assert torch.equal(load_rgb(form, 32), expected), type(form)
    assert torch.equal(load_rgb(a.astype(np.float32) / 255, 32), expected)


def test_same_size_is_exact_and_resize_keeps_the_centre():
    a = picture(32, 32)
    assert torch.equal(load_rgb(a, 32), torch.from_numpy(a).permute(2, 0, 1))
    wide = np.zeros((50, 150, 3), np.uint8)
    wide[:, :50, 0] = 255  # red | green | blue thirds: the centre crop is the green one
    wide[:, 50:100, 1] = 255
    wide[:, 100:, 2] = 255
    out = load_rgb(wide, 20)
    assert out.shape == (3, 20, 20)
    assert (out[1, :, 2:-2] == 255).all() and (out[0, :, 2:-2] == 0).all() and (out[2, :, 2:-2] == 0).all()
    assert load_rgb(picture(10, 7), 24).shape == (3, 24, 24)  # upsampling works too


def test_modes_become_rgb(tmp_path):
    a = picture()
    gray = load_rgb(a[:, :, 0], 16)
    assert gray.shape == (3, 16, 16) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.equal(load_rgb(torch.from_numpy(a[:, :, :1]).permute(2, 0, 1), 16), gray)
    rgba = np.concatenate([a, np.full((40, 60, 1), 7, np.uint8)], axis=2)
    assert torch.equal(load_rgb(rgba, 16), load_rgb(a, 16))  # alpha is dropped
    cmyk = Image.fromarray(a).convert("CMYK")
    assert torch.equal(load_rgb(cmyk, 16), load_rgb(cmyk.convert("RGB"), 16))
    pal = Image.fromarray(a).convert("P")
    assert torch.equal(load_rgb(pal, 16), load_rgb(pal.convert("RGB"), 16))
    cmyk.save(tmp_path / "c.jpg")
    assert load_rgb(tmp_path / "c.jpg", 16).shape == (3, 16, 16)


def test_jpeg_draft_decodes_close_to_full_decode(tmp_path):
    y, x = np.mgrid[0:600, 0:800]
    a = np.stack([x * 255 // 800, y * 255 // 600, (x + y) * 255 // 1400], axis=2).astype(np.uint8)
    path = save(tmp_path / "big.jpg", a, quality=95)
    with Image.open(path) as full:
        reference = load_rgb(full.convert("RGB"), 64).float()
    assert (load_rgb(path, 64).float() - reference).abs().mean() < 2


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((32, 32, 3), np.uint8)
    a[:, 16:] = 255
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180
    path = tmp_path / "r.jpg"
    Image.fromarray(a).save(path, exif=exif, quality=95)
    out = load_rgb(path, 32).float()
    assert out[:, :, :12].mean() > 240 and out[:, :, 20:].mean() < 15


def test_bad_files_raise_naming_the_file(tmp_path):
    for path, reason in bad_cases(tmp_path).items():
        with pytest.raises(BadImageError) as info:
            load_rgb(path, 32)
        assert info.value.source == str(path) and info.value.reason == reason
        assert str(info.value) == f"{path}: {reason}"
        assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "array, words",
    [
        (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
        (np.full((8, 8, 3), np.inf), "NaN or inf"),
        (np.full((8, 8, 3), 2.0), "[0, 1]"),
        (np.zeros((8, 8, 3), np.int16), "uint8"),
        (np.zeros((5,), np.uint8), "expected shape"),
        (np.zeros((8, 8, 2), np.uint8), "expected shape"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "expected shape"),
    ],
)
def test_bad_arrays_say_what_was_expected(array, words):
    with pytest.raises(BadImageError, match=words.replace("[", r"\[")):
        load_rgb(array, 8)


@pytest.mark.parametrize(
    "item, words",
    [
        (b"", "<0 bytes>: zero bytes"),
        (b"no image here", "not an image"),
        ({"bytes": b"no image here", "path": "x/y.jpg"}, "x/y.jpg: not an image"),
        ({"bytes": None, "path": None}, "missing value"),
    ],
)
def test_bad_bytes_name_what_went_wrong(item, words):
    with pytest.raises(BadImageError, match=words):
        load_rgb(item, 8)


# ---- looks_like_images ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "column, expected",
    [
        ([None, "faces/a.JPG", "b.png"], True),
        ([float("nan"), "x.webp"], True),
        ([Image.new("RGB", (4, 4))], True),
        ([np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.uint8)], True),
        (torch.zeros(5, 3, 8, 8, dtype=torch.uint8), True),
        ([np.zeros(10, np.float32)], False),
        ([np.zeros((8, 8, 3), np.float32)], False),
        (np.zeros((5, 10), np.uint8), False),
        (["a", "b.txt"], False),
        ([1.5, 2.0], False),
        ([None, None], False),
        ([], False),
    ],
)
def test_looks_like_images(column, expected):
    assert looks_like_images(column) is expected
