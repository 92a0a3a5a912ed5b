"""One image item to pixels: a path, encoded bytes, a PIL image, an array or a Hugging Face image value.

Example: ``load_rgb("face.jpg", 128)`` is a uint8 [3, 128, 128] tensor; unreadable input raises
:class:`BadImageError`. :func:`looks_like_images` tells whether a column holds images at all.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from manyheads.rows import BadRow, RowError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class BadImageError(RowError):
    """An image that cannot be decoded: ``raise BadImageError("a.jpg", "zero-byte file")``.

    ``detail`` is what went wrong ("corrupt JPEG (broken data stream)"), ``reason`` its short form.
    """

    def __init__(self, source: str, detail: str, hint: str = "") -> None:
        super().__init__(f"{source}: {detail}" + (f" ({hint})" if hint else ""), detail.split(" (")[0])
        self.source, self.detail = source, detail

    def bad_row(self, row: Any) -> BadRow:
        return BadRow(row, self.reason, f"{self.source}: {self.detail}", source=self.source)


def load_rgb(item: Any, size: int) -> torch.Tensor:
    """Decode one image to uint8 [3, size, size]: ``load_rgb("face.jpg", 128)``.

    ``item`` is a file path, a PIL image, the encoded bytes of an image file, a Hugging Face image
    value ``{"bytes": ..., "path": ...}`` (the bytes when present, else the path), or a numpy array /
    torch tensor: uint8 (or float in [0, 1]) shaped HW, HWC or CHW with 1, 3 or 4 channels (arrays
    default to HWC, tensors to CHW).
    Every mode becomes 8-bit RGB: 16-bit and float images are scaled, not clipped (see
    :func:`_to_rgb`); alpha is dropped, not composited. Files get their EXIF
    orientation applied. The shorter side is resized (antialiased bicubic) to ``size`` and the
    centre square is kept. Unreadable input raises :class:`BadImageError`. Truncated files are
    only detected while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False (Pillow's default).
    """
    return torch.from_numpy(decode(item, size))


def decode(item: Any, size: int, source: str | None = None) -> np.ndarray:
    """:func:`load_rgb` as a numpy array, ``source`` naming the item in errors: ``decode(data, 128, "row 3")``."""
    if is_path(item):
        return _decode_file(Path(item), size)
    if is_bytes(item):
        return _decode_bytes(bytes(item), size, source or f"<{len(item)} bytes>")
    if is_image_dict(item):
        encoded, path = item.get("bytes"), item.get("path")
        if encoded is not None:
            return _decode_bytes(bytes(encoded), size, path or source or f"<{len(encoded)} bytes>")
        if path:
            return _decode_file(Path(path), size)
        raise BadImageError(source or repr(item), "missing value")
    if isinstance(item, Image.Image):
        source = source or getattr(item, "filename", "") or "<PIL image>"
        try:
            return _square(item, size)
        except (OSError, ValueError) as e:  # a truncated file behind the image, a mode Pillow cannot convert
            raise BadImageError(source, f"cannot decode ({e})") from e
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return _square(_array_to_pil(item, source or f"<{type(item).__name__} {tuple(item.shape)}>"), size)
    if is_missing(item):
        raise BadImageError(source or repr(item), "missing value")
    raise TypeError(
        f"cannot load an image from {type(item).__name__}; expected a path, PIL image, bytes, array or tensor"
    )


def _decode_file(path: Path, size: int) -> np.ndarray:
    src = str(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(src, "zero-byte file")
        img = Image.open(path)
    except FileNotFoundError:
        raise BadImageError(src, "file not found") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise _open_error(e, src, path.suffix) from None
    return _decode_opened(img, src, size)


def _decode_bytes(data: bytes, size: int, source: str) -> np.ndarray:
    """An image file's encoded bytes (from a Parquet table or a Hugging Face data set), decoded as its file would be."""
    if not data:
        raise BadImageError(source, "zero bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except (OSError, Image.DecompressionBombError) as e:
        raise _open_error(e, source, "") from None
    return _decode_opened(img, source, size)


def _open_error(e: Exception, src: str, suffix: str) -> BadImageError:
    """What went wrong opening an image (before its pixels are read), as a :class:`BadImageError`."""
    if isinstance(e, UnidentifiedImageError):
        return BadImageError(src, "not an image")
    if isinstance(e, Image.DecompressionBombError):
        return BadImageError(src, "image too large (Pillow's decompression-bomb limit)")
    # else an OSError: permissions, a directory, I/O errors, or cut short inside the header
    if getattr(e, "errno", None) is None and "truncat" in str(e).lower():
        kind = Image.registered_extensions().get(suffix.lower(), "image")
        return BadImageError(src, f"truncated {kind}")
    return BadImageError(src, f"cannot read file ({getattr(e, 'strerror', None) or e})")


def _decode_opened(img: Image.Image, src: str, size: int) -> np.ndarray:
    """Pixels of an opened file (or bytes): JPEG draft, load, EXIF orientation, centre square."""
    with img:
        fmt = img.format or "image"
        try:
            if fmt == "JPEG":
                img.draft("RGB", (size, size))  # DCT-domain downscale; keeps both sides >= size
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of a large image
            return _square(img, size)
        # Pillow's format plugins signal corrupt data with many exception types.
        except Exception as e:
            reason = f"truncated {fmt}" if "truncat" in str(e).lower() else f"corrupt {fmt} ({e})"
            raise BadImageError(src, reason) from e


def _square(img: Image.Image, size: int) -> np.ndarray:
    img = _to_rgb(img)
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB, scaling wide modes instead of clipping them as ``convert("RGB")`` does.

    16-bit grey (``I;16``, ``I;16B``, ...) maps 0..65535 to 0..255. ``I`` (32-bit integers) is read as
    8-bit values when they all lie in 0..255, as 16-bit ones when in 0..65535, else stretched from
    its minimum to its maximum; ``F`` (float) likewise as [0, 1], then 0..255, then stretched.
    Alpha is dropped, not composited (``P`` with transparency goes through RGBA, so Pillow does
    not warn); every other mode is Pillow's conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_to_8bit(np.asarray(img), mode)).convert("RGB")
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in img.info):
        img = img.convert("RGBA")
    return img.convert("RGB")


def _to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """One grey channel of a wide mode as uint8 (see :func:`_to_rgb`)."""
    if mode.startswith("I;16"):  # unsigned 16-bit, either byte order
        return _LUT16[a.astype(np.uint16, copy=False)]
    if a.size == 0:
        return np.zeros(a.shape, np.uint8)
    if mode == "F" and not np.isfinite(a).all():
        raise ValueError("float image contains NaN or inf")
    lo, hi = float(a.min()), float(a.max())
    ranges = ((1, 255.0), (255, 1.0)) if mode == "F" else ((255, 1.0), (65535, 255 / 65535))  # (top, scale)
    scale = next((scale for top, scale in ranges if lo >= 0 and hi <= top), None)
    if scale is None:  # outside every usual range: stretch what is there over 0..255
        scale = 255 / (hi - lo) if hi > lo else 0.0
    else:
        lo = 0.0
    out = (a.astype(np.float32) - np.float32(lo)) * np.float32(scale)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


_LUT16 = np.rint(np.arange(65536) * (255 / 65535)).astype(np.uint8)


def _array_to_pil(a: np.ndarray | torch.Tensor, source: str) -> Image.Image:
    is_tensor = isinstance(a, torch.Tensor)
    if is_tensor:
        t = a.detach().cpu()
        arr = (t.float() if t.is_floating_point() else t).numpy()
    else:
        arr = np.asarray(a)
    if arr.dtype != np.uint8:
        if arr.dtype.kind != "f":
            raise BadImageError(source, f"expected dtype uint8 (or float in [0, 1]), got {arr.dtype}")
        if not np.isfinite(arr).all():
            raise BadImageError(source, "float array contains NaN or inf")
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise BadImageError(source, "float array has values outside [0, 1]")
        arr = np.rint(arr.astype(np.float32) * 255).astype(np.uint8)
    shape_error = BadImageError(
        source, f"expected shape (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; got {arr.shape}"
    )
    if arr.ndim == 3:
        first, last = arr.shape[0] in (1, 3, 4), arr.shape[2] in (1, 3, 4)
        if first and (is_tensor or not last):
            arr = arr.transpose(1, 2, 0)
        elif not last:
            raise shape_error
        if arr.shape[2] == 1:
            arr = arr[:, :, 0]
    elif arr.ndim != 2:
        raise shape_error
    if arr.size == 0:
        raise BadImageError(source, f"empty image of shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


def is_path(v: Any) -> bool:
    return isinstance(v, (str, os.PathLike))


def is_bytes(v: Any) -> bool:
    return isinstance(v, (bytes, bytearray, memoryview))


def is_image_dict(v: Any) -> bool:
    """A Hugging Face image value (``{"bytes": ..., "path": ...}``, as its Image feature stores it)."""
    return isinstance(v, Mapping) and bool(v) and set(v) <= {"bytes", "path"}


def is_encoded(v: Any) -> bool:
    """An image file's bytes, or a Hugging Face image value: decoded like a file, keyed without decoding."""
    return is_bytes(v) or is_image_dict(v)


def is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ in ("NAType", "NaTType")


def looks_like_images(column: Iterable[Any]) -> bool:
    """Whether a column holds images (paths, PIL images, bytes, uint8 2/3-D arrays): ``looks_like_images(df["img"])``.

    Looks at the first 5 non-missing values (among the first 1000); all must look like images.
    Reads no more of the column than that (a streamed column reads those rows only).
    """
    values = list(islice((v for v in islice(iter(column), 1000) if not is_missing(v)), 5))
    return bool(values) and all(_looks_like_image(v) for v in values)


def _looks_like_image(v: Any) -> bool:
    if is_path(v):
        return os.fspath(v).lower().endswith(IMAGE_SUFFIXES)
    if isinstance(v, Image.Image) or is_encoded(v):
        return True
    if isinstance(v, (np.ndarray, torch.Tensor)):
        return v.dtype == (torch.uint8 if isinstance(v, torch.Tensor) else np.uint8) and v.ndim in (2, 3)
    return False
