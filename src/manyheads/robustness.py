"""Robustness: each head's primary metric when the test photos are shifted (zoomed out, re-compressed, blurred, ...).

A shift is one small entry of :data:`SHIFTS`: a function ``(image, rng) -> image`` on the decoded PIL
image, applied before the resize to the net's size, so it acts like another photo of the same face.
Random shifts draw from a generator seeded by ``(seed, row)``: one seed gives the same pixels every
time, whatever the order of the rows. Add one with ``@register("name", "what it does")``.

    scores(net, test_df, "zoom_out,jpeg30")  # {"zoom_out": {"age": 5.9, "gender": 0.91}, "jpeg30": {...}}
    shift_image("blur", Image.open("face.jpg"), seed=0)
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from tqdm.auto import tqdm

from manyheads import encoding, images
from manyheads.inference import evaluate

ShiftFunction = Callable[[Image.Image, np.random.Generator], Image.Image]
CLEAN = "none"  # the report's name for the images as they are; no shift may take it


@dataclass(frozen=True)
class Shift:
    """One registered shift: its name, what it does in words, and ``apply(image, rng) -> image`` (RGB, same size)."""

    name: str
    description: str
    apply: ShiftFunction


SHIFTS: dict[str, Shift] = {}


def register(name: str, description: str) -> Callable[[ShiftFunction], ShiftFunction]:
    """Add a shift to :data:`SHIFTS`: ``@register("sepia", "sepia toned")`` above ``def f(image, rng)``."""

    def add(function: ShiftFunction) -> ShiftFunction:
        if name == CLEAN or name in SHIFTS:
            raise ValueError(f"a shift named {name!r} exists already (or is reserved); pick another name, "
                             f"or `del SHIFTS[{name!r}]` first to replace it")  # fmt: skip
        SHIFTS[name] = Shift(name, description, function)
        return function

    return add


ZOOM_OUT = (0.6, 0.7)  # the face's share of the frame's side after zooming out, drawn per image
JPEG_QUALITY = 30
BLUR = 0.01  # Gaussian blur radius as a share of the shorter side: 2 px at 200 px
BRIGHTNESS = 0.6


@register("zoom_out", "shrunk to 60-70 % of the frame (seeded per image), the border pixels repeated around it")
def _zoom_out(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    scale = rng.uniform(*ZOOM_OUT)
    w, h = image.size
    small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    left, top = (w - small.width) // 2, (h - small.height) // 2
    return TF.pad(small, [left, top, w - small.width - left, h - small.height - top], padding_mode="edge")


@register("jpeg30", f"saved again as a JPEG of quality {JPEG_QUALITY}")
def _jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    with Image.open(buffer) as out:
        return out.convert("RGB")


@register("blur", f"Gaussian blur of radius {BLUR:.0%} of the shorter side (2 px at 200 px)")
def _blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(BLUR * min(image.size)))


@register("brightness", f"brightness x{BRIGHTNESS:g}")
def _brightness(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(BRIGHTNESS)


@register("greyscale", "greyscale (the same grey in all three channels)")
def _greyscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.convert("L").convert("RGB")


def shift_names(shifts: bool | str | Sequence[str] | None = True) -> list[str]:
    """The registered shifts ``shifts`` names: True, None or "all" for every one, else names (a list or "a,b").

    shift_names("zoom_out,jpeg30")  # ["zoom_out", "jpeg30"]; an unknown name raises, listing the known ones
    """
    if shifts is True or shifts is None or shifts == "all":
        return list(SHIFTS)
    names = [s.strip() for s in shifts.split(",")] if isinstance(shifts, str) else [str(s) for s in shifts]
    names = list(dict.fromkeys(n for n in names if n))
    unknown = [n for n in names if n not in SHIFTS]
    if unknown or not names:
        raise ValueError(f"unknown robustness shift(s) {unknown or shifts!r}; the shifts are {', '.join(SHIFTS)} "
                         "(comma-separated, or all)")  # fmt: skip
    return names


def shift_image(name: str, image: Image.Image, seed: int = 0, row: int = 0) -> Image.Image:
    """``image`` under the shift ``name``, as an RGB image of the same size; same seed and row, same pixels.

    shift_image("zoom_out", Image.open("face.jpg"), seed=0, row=17)
    """
    rng = np.random.default_rng([seed, row])
    return SHIFTS[shift_names([name])[0]].apply(image.convert("RGB"), rng)


def _decoded(item: Any, size: int) -> Image.Image | None:
    """The RGB image as encoding decodes it, before the resize to ``size``; None when it cannot be read.

    Files and encoded bytes are opened as :func:`images.load_rgb` opens them (JPEG draft, EXIF
    orientation); other items (arrays, tensors) are taken as it decodes them at the net's size.
    """
    if isinstance(item, bytes | bytearray | memoryview):
        item = io.BytesIO(bytes(item))
    try:
        if isinstance(item, str | os.PathLike | io.BytesIO):
            with Image.open(item) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (size, size))
                img.load()
                return ImageOps.exif_transpose(img).convert("RGB")
        if isinstance(item, Image.Image):
            return item.convert("RGB")
        return Image.fromarray(images.load_rgb(item, size).permute(1, 2, 0).numpy())
    # Pillow signals unreadable data with many exception types; the row is then left as it was,
    # so encoding skips it exactly as in the clean pass.
    except Exception:
        return None


def shifted_column(column: Sequence[Any], name: str, size: int, *, seed: int = 0, progress: bool | None = None):
    """The image column under shift ``name``, as uint8 [3, size, size] images (unreadable items left as they are).

    shifted_column(df["image"], "blur", 128)  # a [N, 3, 128, 128] uint8 tensor when every image reads
    """
    out = []
    bar = tqdm(column, desc=f"robustness: {name}", unit="img", disable=True if progress is False else None)
    for row, item in enumerate(bar):
        image = _decoded(item, size)
        out.append(item if image is None else images.load_rgb(shift_image(name, image, seed, row), size))
    return torch.stack(out) if out and all(isinstance(x, torch.Tensor) for x in out) else out


def scores(
    net: torch.nn.Module,
    data: Any,
    shifts: bool | str | Sequence[str] | None = True,
    *,
    inputs: str | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool | None = None,
) -> dict[str, dict[str, float | None]]:
    """Each head's primary metric on a labelled image table under each shift: one inference pass per shift.

    Rows that cannot be read are skipped, as in the clean report; ``progress`` None shows a bar on a terminal.

        scores(net, test_df, ["blur"])  # {"blur": {"age": 5.1, "gender": 0.93, "race": 0.84}}
    """
    names = shift_names(shifts)
    table = encoding.columns_of(data, "evaluation data")
    column = encoding.input_column(table, net.heads, inputs)
    size = getattr(net, "image_size", None)
    if size is None or not images.looks_like_images(table[column]):
        raise ValueError(f"robustness shifts act on images: input column {column!r} holds no images, or the net "
                         "has no image_size")  # fmt: skip
    out = {}
    for name in names:
        shifted = {**table, column: shifted_column(table[column], name, size, seed=seed, progress=progress)}
        metrics = evaluate(net, shifted, inputs=column, batch_size=batch_size, on_bad="skip")
        out[name] = {head: metrics[head].get(net.heads[head].primary) for head in net.heads}
    return out
