"""Images as uint8 tensors at the training resolution: decode once, augment on the training device.

Example: ``x = normalize(Augment()(build_cache(paths, 128).images[:64].to(device)))``
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from manyheads.rows import BadRow, RowError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_SKIP_HINT = "pass on_bad='skip' to drop unreadable images and list them in .bad"
_GRAY = (0.299, 0.587, 0.114)


class BadImageError(RowError):
    """An image that cannot be decoded: ``raise BadImageError("a.jpg", "zero-byte file")``.

    ``detail`` is what went wrong ("corrupt JPEG (broken data stream)"), ``reason`` its short form.
    """

    def __init__(self, source: str, detail: str, hint: str = "") -> None:
        super().__init__(f"{source}: {detail}" + (f" ({hint})" if hint else ""), detail.split(" (")[0])
        self.source, self.detail = source, detail

    def bad_row(self, row: Any) -> BadRow:
        return BadRow(row, self.reason, f"{self.source}: {self.detail}", source=self.source)


def _bad_item(index: int, source: str, detail: str) -> BadRow:
    """The record of an item the cache leaves out (``row`` is its position among the items)."""
    return BadImageError(source, detail).bad_row(index)


@dataclass
class ImageCache:
    """Decoded images plus which input items they are: ``cache.images[j]`` is ``items[cache.kept[j]]``.

    ``images`` may be a copy-on-write view of a memory-mapped cache file: writes to it stay in
    this process and never reach the file.
    """

    images: torch.Tensor
    kept: torch.Tensor
    bad: list[BadRow]


def load_rgb(item: Any, size: int) -> torch.Tensor:
    """Decode one image to uint8 [3, size, size]: ``load_rgb("face.jpg", 128)``.

    ``item`` is a file path, a PIL image, or a numpy array / torch tensor: uint8 (or float in
    [0, 1]) shaped HW, HWC or CHW with 1, 3 or 4 channels (arrays default to HWC, tensors to CHW).
    Every mode becomes 8-bit RGB: 16-bit and float images are scaled, not clipped (see
    :func:`_to_rgb`); alpha is dropped, not composited. Files get their EXIF
    orientation applied. The shorter side is resized (antialiased bicubic) to ``size`` and the
    centre square is kept. Unreadable input raises :class:`BadImageError`. Truncated files are
    only detected while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False (Pillow's default).
    """
    return torch.from_numpy(_decode(item, size))


def _decode(item: Any, size: int, source: str | None = None) -> np.ndarray:
    if _is_path(item):
        return _decode_file(Path(item), size)
    if isinstance(item, Image.Image):
        source = source or getattr(item, "filename", "") or "<PIL image>"
        try:
            return _square(item, size)
        except (OSError, ValueError) as e:  # a truncated file behind the image, a mode Pillow cannot convert
            raise BadImageError(source, f"cannot decode ({e})") from e
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return _square(_array_to_pil(item, source or f"<{type(item).__name__} {tuple(item.shape)}>"), size)
    if _is_missing(item):
        raise BadImageError(source or repr(item), "missing value")
    raise TypeError(f"cannot load an image from {type(item).__name__}; expected a path, PIL image, array or tensor")


def _decode_file(path: Path, size: int) -> np.ndarray:
    src = str(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(src, "zero-byte file")
        img = Image.open(path)
    except FileNotFoundError:
        raise BadImageError(src, "file not found") from None
    except UnidentifiedImageError:
        raise BadImageError(src, "not an image") from None
    except Image.DecompressionBombError:
        raise BadImageError(src, "image too large (Pillow's decompression-bomb limit)") from None
    except OSError as e:  # permissions, a directory, I/O errors
        if e.errno is None and "truncat" in str(e).lower():  # cut short inside the header: Pillow's OSError
            kind = Image.registered_extensions().get(path.suffix.lower(), "image")
            raise BadImageError(src, f"truncated {kind}") from None
        raise BadImageError(src, f"cannot read file ({e.strerror or e})") from None
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


def _decode_all(items: list[Any], size: int, sources: list[str]) -> list[np.ndarray | BadRow]:
    out: list[np.ndarray | BadRow] = []
    for item, source in zip(items, sources):
        try:
            out.append(_decode(item, size, source))
        except BadImageError as e:
            out.append(e.bad_row(-1))
    return out


def ready_cache(column: Any, size: int) -> ImageCache | None:
    """A uint8 [N, 3, size, size] tensor already is what a cache would hold: used as is, not copied."""
    if isinstance(column, torch.Tensor) and column.dtype == torch.uint8 and tuple(column.shape[1:]) == (3, size, size):
        return ImageCache(column, torch.arange(len(column)), [])
    return None


def build_cache(
    items: Sequence[Any],
    size: int,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
    on_bad: str = "error",
) -> ImageCache:
    """Decode all items once into uint8 [N, 3, size, size]: ``build_cache(paths, 128).images``.

    Paths are decoded by a process pool of ``workers`` (default: all CPUs) once there are 64 or
    more of them. ``on_bad="error"`` raises the first :class:`BadImageError` met (pool order);
    ``"skip"`` leaves bad items out and lists them in ``.bad`` (``.kept`` maps rows to items).
    With ``cache_dir`` (paths only) the result is stored as a ``.npy`` keyed on size and each
    file's absolute path, byte size and mtime; a later call with identical inputs memory-maps it
    instead of decoding. Temp files (``*.tmp``) left by killed builds are never read.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    items = list(items)
    if cache_dir is None:
        out = np.empty((len(items), 3, size, size), np.uint8)
        kept, bad = _fill(out, items, size, workers, progress, on_bad)
        _compact(out, out, kept)
        return ImageCache(torch.from_numpy(out[: len(kept)]), kept, bad)

    if not all(_is_path(it) or _is_missing(it) for it in items):
        raise ValueError("cache_dir needs every item to be a file path (or a missing value)")
    paths = [str(Path(it).absolute()) if _is_path(it) else None for it in items]
    key = _cache_key(paths, size)
    npy = Path(cache_dir) / f"images-{size}px-{key[:24]}.npy"
    meta = npy.with_suffix(".json")
    cached = _open_cached(npy, meta, key, size)
    if cached is not None:
        return cached
    npy.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    temps = [p.with_name(f"{p.name}.{tag}") for p in (npy, npy.with_suffix(".c.npy"), meta)]
    tmp, tmp2, tmp_meta = temps
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(items), 3, size, size))
        kept, bad = _fill(out, paths, size, workers, progress, on_bad)
        if len(kept) == 0:
            return ImageCache(torch.empty((0, 3, size, size), dtype=torch.uint8), kept, bad)
        if bad:
            small = np.lib.format.open_memmap(tmp2, mode="w+", dtype=np.uint8, shape=(len(kept), *out.shape[1:]))
            out, tmp = _compact(out, small, kept), tmp2
        out.flush()
        del out
        # The sidecar is written last, so a cache file without a matching sidecar is never trusted.
        os.replace(tmp, npy)
        bad_rows = [[b.row, b.source, b.message.removeprefix(f"{b.source}: ")] for b in bad]
        tmp_meta.write_text(json.dumps({"key": key, "kept": kept.tolist(), "bad": bad_rows}))
        os.replace(tmp_meta, meta)
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
    result = _open_cached(npy, meta, key, size)
    if result is None:
        raise OSError(f"cache file {npy} could not be read back after writing")
    return result


def _fill(
    out: np.ndarray, items: list[Any], size: int, workers: int | None, progress: bool, on_bad: str
) -> tuple[torch.Tensor, list[BadRow]]:
    n = len(items)
    workers = (os.cpu_count() or 1) if workers is None else workers
    bad: list[BadRow] = []

    def store(i: int, res: np.ndarray | BadRow) -> None:
        if isinstance(res, BadRow):
            if on_bad == "error":
                raise BadImageError(res.source, res.message.removeprefix(f"{res.source}: "), _SKIP_HINT)
            bad.append(res.at(i))
        else:
            out[i] = res

    pooled = [i for i, it in enumerate(items) if _is_path(it)] if workers > 1 else []
    if len(pooled) < 64:
        pooled = []
    with tqdm(total=n, disable=not progress, desc="decoding images", unit="img") as bar:
        for i in sorted(set(range(n)) - set(pooled)):
            store(i, _decode_all([items[i]], size, [f"item {i}"])[0])
            bar.update()
        if pooled:
            chunk = max(1, min(64, len(pooled) // (workers * 4)))
            pool = ProcessPoolExecutor(workers)
            try:
                futures = {}
                for s in range(0, len(pooled), chunk):
                    idx = pooled[s : s + chunk]
                    paths = [os.fspath(items[i]) for i in idx]
                    futures[pool.submit(_decode_all, paths, size, paths)] = idx
                for fut in as_completed(futures):
                    for i, res in zip(futures[fut], fut.result()):
                        store(i, res)
                    bar.update(len(futures[fut]))
            finally:
                pool.shutdown(cancel_futures=True)
    bad.sort(key=lambda b: b.row)
    dropped = {b.row for b in bad}
    return torch.tensor([i for i in range(n) if i not in dropped], dtype=torch.int64), bad


def _compact(src: np.ndarray, dst: np.ndarray, kept: torch.Tensor) -> np.ndarray:
    for j, i in enumerate(kept.tolist()):  # in place is safe: kept is increasing, so i >= j
        if i != j or dst is not src:
            dst[j] = src[i]
    return dst


def _cache_key(paths: list[str | None], size: int) -> str:
    h = hashlib.sha256(f"manyheads.images v1 size={size}\n".encode())
    for p in paths:
        try:
            st = os.stat(p) if p is not None else None
        except OSError:
            st = None
        h.update((f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n" if st else f"{p}\0-\n").encode())
    return h.hexdigest()


def _open_cached(npy: Path, meta: Path, key: str, size: int) -> ImageCache | None:
    try:
        info = json.loads(meta.read_text())
        if info["key"] != key:
            return None
        arr = np.load(npy, mmap_mode="c")  # copy-on-write: writable for torch, file stays intact
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if arr.dtype != np.uint8 or arr.shape != (len(info["kept"]), 3, size, size):
        return None
    kept = torch.tensor(info["kept"], dtype=torch.int64)
    return ImageCache(torch.from_numpy(arr), kept, [_bad_item(*b) for b in info["bad"]])


@dataclass(kw_only=True)
class Augment:
    """Per-sample random crop, flip and colour jitter for a uint8 batch: ``Augment()(x, gen)``.

    The crop picks an area fraction in ``crop_scale`` and an aspect ratio in ``ratio``, shifted
    by up to ``translate`` of the image beyond the border (reflection padding); crop and flip are
    one ``affine_grid`` + ``grid_sample``. Jitter scales brightness, contrast and saturation by
    factors in [1 - jitter, 1 + jitter]. ``crop_scale=None`` turns the crop off; with
    ``flip=False`` and ``jitter=0`` as well the call is just ``x / 255``. Pass a generator on the
    batch's device for reproducible draws. Returns float (float32 for uint8 input) in [0, 1].
    """

    crop_scale: tuple[float, float] | None = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    translate: float = 0.05
    flip: bool = True
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _to_float(batch)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch [B, 3, H, W], got shape {tuple(x.shape)}")
        b = x.shape[0]
        u = torch.rand(b, 8, generator=generator, device=x.device, dtype=torch.float32)
        sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if self.flip else torch.ones_like(u[:, 4])
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            area = lo + (hi - lo) * u[:, 0]
            log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[:, 1]
            # Normalised coordinates span 2 per image side, so half-width == side fraction.
            w = (area * log_r.exp()).sqrt().clamp(max=1.0)
            h = (area / log_r.exp()).sqrt().clamp(max=1.0)
            cx = (1 - w + 2 * self.translate) * (2 * u[:, 2] - 1)
            cy = (1 - h + 2 * self.translate) * (2 * u[:, 3] - 1)
            zero = torch.zeros_like(w)
            theta = torch.stack([torch.stack([w * sign, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
            grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        elif self.flip:
            x = torch.where((sign < 0).view(b, 1, 1, 1), x.flip(-1), x)
        if self.jitter > 0:
            f = (1 + self.jitter * (2 * u[:, 5:8] - 1)).to(x.dtype).view(b, 3, 1, 1, 1)
            gray_w = _constant(_GRAY, x.dtype, x.device).view(1, 3, 1, 1)
            x = (x * f[:, 0]).clamp(0, 1)
            mean = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            x = ((x - mean) * f[:, 1] + mean).clamp(0, 1)
            gray = (x * gray_w).sum(1, keepdim=True)
            x = (x - gray) * f[:, 2] + gray
        return x.clamp(0, 1)


def _to_float(batch: torch.Tensor) -> torch.Tensor:
    if batch.dtype == torch.uint8:
        return batch.float().div(255)
    if batch.is_floating_point():
        return batch
    raise TypeError(f"expected a uint8 or floating batch, got {batch.dtype}")


def normalize(
    batch: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Channel-normalise a uint8 or [0, 1] float batch: ``normalize(Augment()(x))``."""
    x = _to_float(batch)
    m = _constant(tuple(mean), x.dtype, x.device).view(-1, 1, 1)
    s = _constant(tuple(std), x.dtype, x.device).view(-1, 1, 1)
    return (x - m) / s


@functools.lru_cache(maxsize=32)
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Made once per device: building it per batch is a blocking host-to-device copy on CUDA.
    return torch.tensor(values, dtype=dtype, device=device)


def _is_path(v: Any) -> bool:
    return isinstance(v, (str, os.PathLike))


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ in ("NAType", "NaTType")


def looks_like_images(column: Iterable[Any]) -> bool:
    """Whether a column holds images (paths, PIL images, uint8 2/3-D arrays): ``looks_like_images(df["img"])``.

    Looks at the first 5 non-missing values (among the first 1000); all must look like images.
    """
    values = [v for v in islice(iter(column), 1000) if not _is_missing(v)][:5]
    return bool(values) and all(_looks_like_image(v) for v in values)


def _looks_like_image(v: Any) -> bool:
    if _is_path(v):
        return os.fspath(v).lower().endswith(IMAGE_SUFFIXES)
    if isinstance(v, Image.Image):
        return True
    if isinstance(v, (np.ndarray, torch.Tensor)):
        return v.dtype == (torch.uint8 if isinstance(v, torch.Tensor) else np.uint8) and v.ndim in (2, 3)
    return False
