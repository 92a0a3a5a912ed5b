"""manyheads.images.augment: Augment's crop, flip, colour, zoom-out, rotation, grey, blur, erase; normalize."""

import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from manyheads import images
from manyheads.images import Augment, normalize

# ---- Augment / normalize --------------------------------------------------------------------


def batch(b=64, h=24, w=24, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (b, 3, h, w), dtype=np.uint8))


def forbid_grid_sample(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("grid_sample called")

    monkeypatch.setattr(torch.nn.functional, "grid_sample", boom)


def test_augment_identity_is_exact(monkeypatch):
    forbid_grid_sample(monkeypatch)
    x = batch()
    out = Augment(crop_scale=None, flip=False, jitter=0)(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.equal(out, x.float() / 255)


def test_flip_only_mirrors_about_half(monkeypatch):
    forbid_grid_sample(monkeypatch)
    x = batch().float() / 255
    out = Augment(crop_scale=None, flip=True, jitter=0)(x, torch.Generator().manual_seed(1))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (same ^ mirrored).all()
    assert 20 <= mirrored.sum() <= 44


def test_affine_flip_without_crop_change_is_a_mirror():
    x = batch(16)
    out = Augment(crop_scale=(1.0, 1.0), ratio=(1, 1), translate=0, flip=True, jitter=0)(x)
    ref = x.float() / 255
    same = (out - ref).abs().flatten(1).amax(1) < 1e-5
    mirrored = (out - ref.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert (same | mirrored).all() and mirrored.any() and same.any()


def test_crop_zooms_in():
    ramp = torch.linspace(0, 1, 64).expand(8, 3, 64, 64).contiguous()
    out = Augment(crop_scale=(0.25, 0.25), ratio=(1, 1), translate=0, flip=False, jitter=0)(ramp)
    span = out[:, 0, 32, -1] - out[:, 0, 32, 0]
    assert torch.allclose(span, torch.full((8,), 0.5), atol=0.03)


def test_jitter_scales_brightness_per_sample():
    gray = torch.full((32, 3, 8, 8), 100, dtype=torch.uint8)
    out = Augment(crop_scale=None, flip=False, jitter=0.5)(gray, torch.Generator().manual_seed(0))
    per_image = out.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-6)  # each stays flat
    levels = per_image[:, 0] * 255 / 100
    assert levels.min() >= 0.5 - 1e-5 and levels.max() <= 1.5 + 1e-5 and levels.std() > 0.1


def test_jitter_is_brightness_contrast_then_saturation_per_sample():
    x = batch(16, 12, 10)
    u = torch.rand(16, 3, generator=torch.Generator().manual_seed(5))
    out = Augment(jitter=0.4)._jitter(x.float() / 255, u)
    # the textbook form, written out step by step: each factor in [0.6, 1.4], blended with grey
    f = 1 + 0.4 * (2 * u - 1)
    weights = torch.tensor(images.augment._GRAY).view(1, 3, 1, 1)
    y = (x.float() / 255 * f[:, 0].view(-1, 1, 1, 1)).clamp(0, 1)
    mean = (y * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    y = ((y - mean) * f[:, 1].view(-1, 1, 1, 1) + mean).clamp(0, 1)
    luma = (y * weights).sum(1, keepdim=True)
    expected = (y - luma) * f[:, 2].view(-1, 1, 1, 1) + luma
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("height, width", [(24, 24), (20, 36)])
def test_affine_grid_is_torchs(height, width):
    theta = torch.randn(8, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, [8, 3, height, width], align_corners=False)
    assert torch.allclose(images.augment._affine_grid(theta, height, width), expected, atol=1e-6)


def test_augment_in_range_and_deterministic():
    x = batch(16)
    aug = Augment()
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert a.shape == (16, 3, 24, 24) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x.float() / 255, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_on_cuda():
    x = batch(8).cuda()
    a = Augment()(x, torch.Generator(device="cuda").manual_seed(0))
    assert a.is_cuda and a.shape == x.shape and 0 <= a.min() <= a.max() <= 1
    assert normalize(a).is_cuda


def test_normalize_matches_torchvision():
    x = batch(4)
    expected = TF.normalize(x.float() / 255, images.IMAGENET_MEAN, images.IMAGENET_STD)
    assert torch.allclose(normalize(x), expected, atol=1e-6)
    assert torch.allclose(normalize(x.float() / 255, (0.5,) * 3, (0.25,) * 3), (x.float() / 255 - 0.5) / 0.25)
    assert isinstance(images.IMAGENET_MEAN, tuple) and isinstance(images.IMAGENET_STD, tuple)


# ---- Augment: zoom-out, rotation, grey, blur, erase -------------------------------------------

ALL_OFF = {"crop_scale": None, "flip": False, "jitter": 0}
NEW_OPTIONS = {
    "zoom_out": {"crop_scale": (1.2, 1.6), "padding": "border"},
    "rotate": {"rotate": 20},
    "grey": {"grey": 0.5},
    "blur": {"blur": 0.5},
    "erase": {"erase": 0.5},
    "erase_mean": {"erase": 0.5, "erase_fill": "mean"},
}
# Augment()(batch(16), generator seeded 7), called twice on the same generator: (sum, index-weighted sum)
# in float64, recorded from the code before zoom-out, rotation, grey, blur and erase existed.
RECORDED_DEFAULTS = [(13573.4667, 6807.3405), (14082.7479, 7073.7549)]


def checksum(out):
    w = torch.arange(out.numel(), dtype=torch.float64).view(out.shape) / out.numel()
    return float(out.double().sum()), float((out.double() * w).sum())


def test_defaults_are_unchanged_by_the_new_options():
    x = batch(16)
    g = torch.Generator().manual_seed(7)
    sums = [value for _ in range(2) for value in checksum(Augment()(x, g))]
    recorded = [value for pair in RECORDED_DEFAULTS for value in pair]
    assert sums == pytest.approx(recorded, abs=1e-3)  # the same draws and pixels as before
    off = Augment(padding="reflection", rotate=0, grey=0, blur=0, erase=0, erase_fill="noise")
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(2):  # also the generator's state: a second batch draws as before
        assert torch.equal(off(x, g1), Augment()(x, g2))
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("name", list(NEW_OPTIONS))
def test_each_new_option_changes_the_batch_and_is_reproducible(name):
    x = batch(32)
    aug = Augment(**{**ALL_OFF, **NEW_OPTIONS[name]})
    a = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(4)))
    assert not torch.equal(a, x.float() / 255)
    assert a.dtype == torch.float32 and 0 <= a.min() <= a.max() <= 1


@pytest.mark.parametrize("name", ["defaults", *NEW_OPTIONS])
def test_augment_leaves_the_callers_float_batch_as_it_was(name):
    x = batch(32).float() / 255
    before = x.clone()
    options = {} if name == "defaults" else {**ALL_OFF, **NEW_OPTIONS[name]}
    for extra in ({}, {"crop_scale": None, "flip": False}):  # with and without the resampling step
        out = Augment(**{**options, **extra})(x, torch.Generator().manual_seed(0))
        assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("name", ["grey", "blur", "erase", "erase_mean"])
def test_the_masked_path_of_accelerators_gives_the_chosen_samples_path_of_the_cpu(name, monkeypatch):
    x = batch(32)
    aug = Augment(**{**ALL_OFF, **NEW_OPTIONS[name]})
    subset = aug(x, torch.Generator().manual_seed(3))
    monkeypatch.setattr(images.augment, "_SUBSET_DEVICES", ())  # the CPU takes the accelerators' path
    masked = aug(x, torch.Generator().manual_seed(3))
    if name == "erase":  # the same rectangles; their noise is drawn for the whole batch there
        assert torch.equal(subset != x.float() / 255, masked != x.float() / 255)
    else:
        assert torch.allclose(subset, masked, atol=1e-6) and not torch.equal(subset, x.float() / 255)


def square(size=64, side=32):
    img = torch.zeros(1, 3, size, size)
    lo = (size - side) // 2
    img[..., lo : lo + side, lo : lo + side] = 1
    return img


def extent(out):
    """Width in pixels of the bright part of each sample's middle row."""
    return (out[:, 0, out.shape[-2] // 2] > 0.5).sum(-1).float()


def test_zoom_out_shrinks_a_centred_square():
    x = square().expand(4, -1, -1, -1)
    same = Augment(crop_scale=(1.0, 1.0), ratio=(1, 1), translate=0, flip=False, jitter=0, padding="zeros")(x)
    assert torch.equal(extent(same), torch.full((4,), 32.0))
    out = Augment(crop_scale=(2.0, 2.0), ratio=(1, 1), translate=0, flip=False, jitter=0, padding="zeros")(x)
    assert ((extent(out) - 32 / 2**0.5).abs() <= 1).all()  # the window's side is sqrt(2) the image's


def test_zoomed_out_picture_roams_the_frame_and_translate_goes_beyond_it():
    x = square(side=64).expand(200, -1, -1, -1)  # all white: the photo's own pixels
    aug = Augment(crop_scale=(2.0, 2.0), ratio=(1, 1), translate=0, flip=False, jitter=0, padding="zeros")
    out = aug(x, torch.Generator().manual_seed(0))
    bright = (out[:, 0] > 0.5).flatten(1).sum(1).float()
    assert ((bright - 64 * 64 / 2).abs() < 64 * 3).all()  # all of the photo is seen, at half the area
    left = out[:, 0, 32].argmax(-1)
    assert left.min() <= 1 and left.max() >= 16  # from one side of the frame to the other
    aug = Augment(crop_scale=(2.0, 2.0), ratio=(1, 1), translate=0.1, flip=False, jitter=0, padding="zeros")
    bright = (aug(x, torch.Generator().manual_seed(0))[:, 0] > 0.5).flatten(1).sum(1).float()
    assert (bright < 64 * 64 / 2 - 64).float().mean() > 0.2  # shifted beyond the frame's border


@pytest.mark.parametrize("padding, corner", [("zeros", 0.0), ("border", 0.6), ("reflection", 0.6)])
def test_zoom_out_padding_fills_outside_the_picture(padding, corner):
    x = torch.full((2, 3, 16, 16), 0.6)
    out = Augment(crop_scale=(3.0, 3.0), ratio=(1, 1), translate=0, flip=False, jitter=0, padding=padding)(x)
    # The photo covers a third of the frame (wherever it roams): the rest is padding.
    assert torch.allclose(out.flatten(2).amin(2), torch.full((2, 3), corner), atol=1e-6)
    assert torch.allclose(out[:, :, 8, 8], torch.full((2, 3), 0.6), atol=1e-6)


def test_rotate_turns_counter_clockwise_by_the_given_angle():
    x = torch.zeros(1, 3, 32, 32)
    x[..., 15:17, 16:28] = 1  # a bar from the centre to the right
    identity = torch.tensor([[[1.0, 0, 0], [0, 1, 0]]])
    theta = images.augment._rotate(identity, torch.tensor([torch.pi / 2]), 1.0)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    assert torch.allclose(out, torch.rot90(x, 1, (-2, -1)), atol=1e-5)  # now it points up
    wide = torch.rand(1, 3, 16, 32)  # half a turn on a non-square image is a flip of both axes
    theta = images.augment._rotate(identity, torch.tensor([torch.pi]), 2.0)
    grid = torch.nn.functional.affine_grid(theta, list(wide.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(wide, grid, align_corners=False)
    assert torch.allclose(out, wide.flip(-1, -2), atol=1e-5)
    box = torch.zeros(1, 3, 32, 64)
    box[..., 12:20, 28:36] = 1  # a centred square on a wide image: a quarter turn in pixels keeps it
    theta = images.augment._rotate(identity, torch.tensor([torch.pi / 2]), 2.0)
    grid = torch.nn.functional.affine_grid(theta, list(box.shape), align_corners=False)
    assert torch.allclose(torch.nn.functional.grid_sample(box, grid, align_corners=False), box, atol=1e-5)


def bar_angle(out):
    """Orientation (degrees, counter-clockwise) of each sample's bright bar, from its second moments."""
    m = out[:, 0]
    ys, xs = torch.meshgrid(torch.arange(m.shape[-2]).float(), torch.arange(m.shape[-1]).float(), indexing="ij")
    total = m.sum((1, 2))
    cx, cy = (m * xs).sum((1, 2)) / total, (m * ys).sum((1, 2)) / total
    dx, dy = xs - cx.view(-1, 1, 1), -(ys - cy.view(-1, 1, 1))  # y up
    mu20, mu02, mu11 = (m * dx**2).sum((1, 2)), (m * dy**2).sum((1, 2)), (m * dx * dy).sum((1, 2))
    return torch.rad2deg(0.5 * torch.atan2(2 * mu11, mu20 - mu02))


def test_rotate_draws_angles_within_the_range():
    x = torch.zeros(200, 3, 64, 64)
    x[..., 30:34, 12:52] = 1  # a horizontal bar through the centre
    aug = Augment(crop_scale=None, flip=False, jitter=0, rotate=30, padding="zeros")
    out = aug(x, torch.Generator().manual_seed(0))
    angles = bar_angle(out)
    assert angles.abs().max() <= 31 and angles.max() > 20 and angles.min() < -20
    assert angles.mean().abs() < 5
    assert torch.allclose(out[:, :, 32, 32], torch.ones(200, 3), atol=1e-5)  # turned about the centre


def test_grey_makes_the_chosen_share_of_samples_luma_grey():
    x = batch(400, 8, 8)
    out = Augment(crop_scale=None, flip=False, jitter=0, grey=0.3)(x, torch.Generator().manual_seed(0))
    ref = x.float() / 255
    chosen = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert 0.22 <= chosen.float().mean() <= 0.38
    luma = (ref * torch.tensor(images.augment._GRAY).view(1, 3, 1, 1)).sum(1)
    assert torch.allclose(out[chosen, 0], luma[chosen], atol=1e-6)
    assert torch.equal(out[~chosen], ref[~chosen])


def total_variation(x):
    down = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    return down + (x[..., 1:] - x[..., :-1]).abs().flatten(1).mean(1)


def test_blur_smooths_the_chosen_share_of_samples():
    x = batch(200, 64, 64)
    ref = x.float() / 255
    out = Augment(crop_scale=None, flip=False, jitter=0, blur=0.5)(x, torch.Generator().manual_seed(0))
    untouched = (out == ref).flatten(1).all(1)
    assert 0.38 <= (~untouched).float().mean() <= 0.62
    smoothed, before = total_variation(out[~untouched]), total_variation(ref[~untouched])
    assert (smoothed <= before + 1e-6).all() and smoothed.mean() < 0.8 * before.mean()
    assert torch.allclose(out[~untouched].mean((1, 2, 3)), ref[~untouched].mean((1, 2, 3)), atol=0.01)


def test_gaussian_blur_matches_torchvision_for_one_sigma():
    x = torch.rand(2, 3, 20, 24)
    ours = images.augment._gaussian_blur(x, torch.tensor([1.5, 0.7]), radius=4)
    assert torch.allclose(ours[:1], TF.gaussian_blur(x[:1], [9, 9], [1.5, 1.5]), atol=1e-5)
    assert torch.allclose(ours[1:], TF.gaussian_blur(x[1:], [9, 9], [0.7, 0.7]), atol=1e-5)


def test_erase_replaces_one_rectangle_per_chosen_sample():
    x = torch.full((300, 3, 32, 32), 0.5)
    out = Augment(crop_scale=None, flip=False, jitter=0, erase=0.5)(x, torch.Generator().manual_seed(0))
    changed = (out != 0.5).any(1)  # [B, H, W]
    erased = changed.flatten(1).any(1)
    assert 0.4 <= erased.float().mean() <= 0.6
    rows, cols = changed[erased].any(2), changed[erased].any(1)
    box = rows.sum(1) * cols.sum(1)
    assert torch.equal(changed[erased].flatten(1).sum(1), box)  # every pixel of its bounding box: a rectangle
    assert (rows.int().diff(dim=1) != 0).sum(1).le(2).all() and (cols.int().diff(dim=1) != 0).sum(1).le(2).all()
    assert 0.015 <= box.min() / 1024 and box.max() / 1024 <= 0.22
    assert ((out != 0.5).all(1) == changed).all()  # all three channels, as noise


def test_erase_mean_fills_with_the_sample_channel_means():
    x = torch.zeros(64, 3, 16, 16)
    x[..., 8:] = 1  # mean 0.5 per channel
    aug = Augment(crop_scale=None, flip=False, jitter=0, erase=1, erase_fill="mean")
    out = aug(x, torch.Generator().manual_seed(1))
    changed = (out != x).any(1)
    assert changed.flatten(1).any(1).all()
    assert torch.allclose(out.permute(0, 2, 3, 1)[changed], torch.full((int(changed.sum()), 3), 0.5))


@pytest.mark.parametrize(
    "options, field",
    [
        ({"crop_scale": (0.5, 5.0)}, "crop_scale"),
        ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
        ({"padding": "edge"}, "padding"),
        ({"rotate": -1}, "rotate"),
        ({"rotate": 200}, "rotate"),
        ({"grey": 1.5}, "grey"),
        ({"blur": -0.1}, "blur"),
        ({"erase": 2}, "erase"),
        ({"erase_fill": "zero"}, "erase_fill"),
    ],
)
def test_bad_augment_values_are_refused_naming_the_field(options, field):
    with pytest.raises(ValueError, match=rf"Augment's {field} must") as info:
        Augment(**options)
    assert "got" in str(info.value)


def test_augment_config_builds_the_same_augment_from_yaml(tmp_path):
    from manyheads.config import ConfigError, load_config

    example = os.path.join(os.path.dirname(__file__), "..", "examples", "utkface.yaml")
    built = load_config(example).fit_kwargs()["augment"]
    expected = Augment(crop_scale=(0.6, 2.0), ratio=(0.95, 1.05), translate=0.05, padding="border", flip=True,
                       rotate=10, jitter=0.2, grey=0.1, blur=0.1, erase=0.25)  # fmt: skip
    assert built == expected
    text = open(example).read().replace("erase: 0.25", "erase: 0.25\n    erase_fill: mean")
    (tmp_path / "run.yaml").write_text(text)
    assert load_config(tmp_path / "run.yaml").fit_kwargs()["augment"].erase_fill == "mean"
    (tmp_path / "bad.yaml").write_text(text.replace("padding: border", "padding: edge"))
    with pytest.raises(ConfigError, match="train.augment.padding"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_new_option_runs_on_cuda():
    x = batch(8).cuda()
    aug = Augment(crop_scale=(0.55, 1.3), padding="border", rotate=10, grey=0.5, blur=0.5, erase=0.5, jitter=0.2)
    a = aug(x, torch.Generator(device="cuda").manual_seed(0))
    assert a.is_cuda and a.shape == x.shape and 0 <= a.min() <= a.max() <= 1
    assert torch.equal(a, aug(x, torch.Generator(device="cuda").manual_seed(0)))
