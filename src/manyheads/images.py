"""Images as uint8 tensors at the training resolution: decode once, augment on the training device.

Example: ``x = normalize(Augment()(build_cache(paths, 128).images[:64].to(device)))``
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
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

from manyheads.distributed import LocalPeers
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
    this process and never reach the file. ``decoded`` is how many items this process decoded
    (bad ones included) to make it: 0 when it was read from ``cache_dir`` or decoded by a peer.
    """

    images: torch.Tensor
    kept: torch.Tensor
    bad: list[BadRow]
    decoded: int = 0


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
    return torch.from_numpy(_decode(item, size))


def _decode(item: Any, size: int, source: str | None = None) -> np.ndarray:
    if _is_path(item):
        return _decode_file(Path(item), size)
    if _is_bytes(item):
        return _decode_bytes(bytes(item), size, source or f"<{len(item)} bytes>")
    if _is_image_dict(item):
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
    if _is_missing(item):
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

    Paths and encoded bytes are decoded by a process pool of ``workers`` (default: all CPUs) once
    there are 64 or more of them. ``on_bad="error"`` raises the first :class:`BadImageError` met
    (pool order); ``"skip"`` leaves bad items out and lists them in ``.bad`` (``.kept`` maps rows
    to items). With ``cache_dir`` the result is stored as a ``.npy`` and memory-mapped. Its key is
    the size and each item: a file's absolute path, byte size and mtime, or a hash of encoded
    bytes; a later call with identical inputs memory-maps it instead of decoding. Any other items
    (PIL images, arrays) are keyed by their decoded pixels, so an identical set shares one file.
    Temp files (``*.tmp``) left by killed builds are never read. ``.decoded`` counts the items
    this process decoded (0 when the cache was read from ``cache_dir``).

    ``items`` that are neither a list, tuple, array nor tensor but a ``Sequence`` (a column of a
    torch Dataset) are streamed: each is read once, in order, and decoded straight into the cache,
    so with ``cache_dir`` a set larger than memory never sits in memory.

    Under torchrun with several processes per machine, the processes that call this with the same
    items decode them once between them: paths and bytes split by rows (``rank::size``), each
    process's pool taking its share of the CPUs; other items decoded by local rank 0 alone. All
    then memory-map the one file; without ``cache_dir`` it lies in a folder under the temp dir
    that is removed once every process has it open. ``MANYHEADS_CACHE_BUILD`` is ``split``
    (default), ``main`` (local rank 0 decodes everything) or ``each`` (every process decodes
    everything itself, as a single process does). A call that the other processes do not make
    within a minute (a report only rank 0 writes), or make after one of them has exited, is
    decoded by the process that makes it, alone.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    streamed = isinstance(items, Sequence) and not isinstance(items, (list, tuple, str))
    if not streamed:
        items = list(items)
    mode = _build_mode()
    together = len(items) > 0 and mode != "each" and LocalPeers.present()
    key = None
    if not streamed and all(_is_path(it) or _is_missing(it) or _is_encoded(it) for it in items):
        if cache_dir is not None or together:
            items = [str(Path(it).absolute()) if _is_path(it) else it for it in items]
            key = _cache_key(items, size)
    options = {"workers": workers, "progress": progress, "on_bad": on_bad}
    peers = LocalPeers.join(_work_name(items, size, key, cache_dir, mode)) if together else None
    if peers is not None:
        split = key is not None and mode == "split"
        return _refuse_bad(_SharedBuild(peers, items, size, cache_dir, key, split=split, **options).run(), on_bad)
    if cache_dir is None:
        out = np.empty((len(items), 3, size, size), np.uint8)
        kept, bad = _fill(out, items, size, workers, progress, on_bad)
        _compact(out, out, kept)
        return ImageCache(torch.from_numpy(out[: len(kept)]), kept, bad, len(items))
    if key is not None and (cached := _cached(cache_dir, size, key)) is not None:
        return _refuse_bad(cached, on_bad)
    return _build_file(Path(cache_dir), items, size, key, **options)[0]


def _refuse_bad(cache: ImageCache, on_bad: str) -> ImageCache:
    """A cache built under on_bad="skip" and read back under "error" raises for its first bad item."""
    if on_bad == "error" and cache.bad:
        first = cache.bad[0]
        raise BadImageError(first.source, first.message.removeprefix(f"{first.source}: "), _SKIP_HINT)
    return cache


_BUILD_MODES = ("split", "main", "each")


def _build_mode() -> str:
    """``MANYHEADS_CACHE_BUILD``: how the local processes under torchrun share a build (see build_cache)."""
    mode = os.environ.get("MANYHEADS_CACHE_BUILD", "split")
    if mode not in _BUILD_MODES:
        raise ValueError(f"MANYHEADS_CACHE_BUILD must be one of {', '.join(_BUILD_MODES)}, got {mode!r}")
    return mode


def _cache_files(cache_dir: str | os.PathLike[str], size: int, key: str) -> tuple[Path, Path]:
    npy = Path(cache_dir) / f"images-{size}px-{key[:24]}.npy"
    return npy, npy.with_suffix(".json")


def _cached(cache_dir: str | os.PathLike[str], size: int, key: str) -> ImageCache | None:
    """The valid cache of ``key`` in ``cache_dir``, memory-mapped, or None."""
    return _open_cached(*_cache_files(cache_dir, size, key), key, size)


def _temp_paths(folder: Path, size: int, tag: str) -> list[Path]:
    """One build's temp files (data, compacted data, sidecar): ``*.tmp`` names, never read as a cache."""
    return [folder / f"images-{size}px-building.{name}.{tag}.tmp" for name in ("npy", "c.npy", "json")]


def _tag() -> str:
    """Unique to one build: no two processes, however unrelated, write the same temp file."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _build_file(
    folder: Path, items: Sequence[Any], size: int, key: str | None, *, workers: int | None, progress: bool, on_bad: str
) -> tuple[ImageCache, str | None]:
    """Decode ``items`` into a memory-mapped file in ``folder``; ``key`` None: keyed by the decoded pixels.

    Returns the cache and its key, which is None when every item was bad (then nothing is written).
    """
    folder.mkdir(parents=True, exist_ok=True)
    temps = _temp_paths(folder, size, _tag())
    try:
        out = np.lib.format.open_memmap(temps[0], mode="w+", dtype=np.uint8, shape=(len(items), 3, size, size))
        kept, bad = _fill(out, items, size, workers, progress, on_bad)
        if len(kept) == 0:
            return ImageCache(torch.empty((0, 3, size, size), dtype=torch.uint8), kept, bad, len(items)), None
        key = key or _pixels_key(out, kept, bad, size)
        _move_into_place(out, temps, kept, bad, folder, size, key)
        del out
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
    return _read_back(folder, size, key, len(items)), key


def _move_into_place(
    out: np.ndarray, temps: list[Path], kept: torch.Tensor, bad: list[BadRow], folder: Path, size: int, key: str
) -> None:
    """Publish a filled building file (``temps[0]``) as the cache of ``key``: data renamed first, sidecar last.

    A valid cache of ``key`` already there (another process finished first) is kept, not replaced:
    processes may have it mapped, and on a network file system replacing it pulls it from under them.
    """
    if _cached(folder, size, key) is not None:
        return
    npy, meta = _cache_files(folder, size, key)
    tmp, tmp2, tmp_meta = temps
    if bad:
        small = np.lib.format.open_memmap(tmp2, mode="w+", dtype=np.uint8, shape=(len(kept), *out.shape[1:]))
        out, tmp = _compact(out, small, kept), tmp2
    out.flush()
    del out
    # The sidecar is written last, so a cache file without a matching sidecar is never trusted.
    os.replace(tmp, npy)
    tmp_meta.write_text(json.dumps({"key": key, "kept": kept.tolist(), "bad": _bad_rows(bad)}))
    os.replace(tmp_meta, meta)


def _read_back(folder: Path, size: int, key: str, decoded: int) -> ImageCache:
    """The published cache of ``key``, memory-mapped, with this process's decode count."""
    npy, meta = _cache_files(folder, size, key)
    result = _open_cached(npy, meta, key, size)
    if result is None:
        raise OSError(f"cache file {npy} could not be read back after writing")
    result.decoded = decoded
    return result


def _bad_rows(bad: list[BadRow]) -> list[list[Any]]:
    """Bad items as the sidecar (and the peers of a shared build) pass them: [row, source, detail]."""
    return [[b.row, b.source, b.message.removeprefix(f"{b.source}: ")] for b in bad]


def _work_name(items: Sequence[Any], size: int, key: str | None, cache_dir: Any, mode: str) -> str:
    """What local peers must all ask for to share one build: the same items, size, folder and mode."""
    folder = "" if cache_dir is None else str(Path(cache_dir).absolute())
    return f"images {size}px mode={mode} dir={folder} items={key or _fingerprint(items)}"


def _fingerprint(items: Sequence[Any]) -> str:
    """A cheap identity of items without a key, so processes holding different images never share a build.

    Arrays and in-memory images give their shape and 256 pixels spread over them, file-backed PIL
    images their file name; a streamed column only its type and length (it is read once, by the
    process that decodes it), so under torchrun it must be the same column in every process.
    """
    h = hashlib.sha256(f"{type(items).__qualname__} n={len(items)}\n".encode())
    for item in items if isinstance(items, list) else ():
        h.update(_item_fingerprint(item))
    return h.hexdigest()


def _item_fingerprint(item: Any) -> bytes:
    if isinstance(item, Image.Image):
        if getattr(item, "filename", ""):  # not loaded yet, perhaps: the name, not the pixels
            return f"file {item.filename} {item.size}\n".encode()
        pixels = item.resize((16, 16), Image.Resampling.NEAREST).tobytes() if min(item.size) > 0 else b""
        return f"image {item.mode} {item.size}\n".encode() + pixels
    if isinstance(item, torch.Tensor):
        flat = item.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)].cpu().double().numpy()
        return f"tensor {tuple(item.shape)} {item.dtype}\n".encode() + sample.tobytes()
    if isinstance(item, np.ndarray) and not item.dtype.hasobject:
        flat = item.reshape(-1)
        sample = np.ascontiguousarray(flat[:: max(1, flat.size // 256)])
        return f"array {item.shape} {item.dtype}\n".encode() + sample.tobytes()
    return f"{type(item).__qualname__} {getattr(item, 'shape', '')} {item!r:.100}\n".encode()


class _SharedBuild:
    """One cache build by the local processes that joined it (see :func:`build_cache`).

    Local rank 0 plans: the cache is in ``cache_dir`` already, or it decodes everything itself
    (``split`` False), or it makes one temp file that every process fills with rows
    ``rank::size`` and that rank 0 then publishes by the usual rule (rename, sidecar last). A
    failure at any step is passed on, so every process raises the same error and none waits.

        cache = _SharedBuild(peers, paths, 128, "cache", key, split=True, workers=None, ...).run()
    """

    def __init__(
        self, peers: LocalPeers, items: Sequence[Any], size: int, cache_dir: Any, key: str | None, *,
        split: bool, workers: int | None, progress: bool, on_bad: str,
    ) -> None:  # fmt: skip
        self.peers, self.items, self.size, self.key, self.split = peers, items, size, key, split
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if workers is None and split:  # the peers' pools together use the machine's CPUs once
            workers = max(1, (os.cpu_count() or 1) // peers.size)
        self.workers, self.progress, self.on_bad = workers, progress, on_bad
        self.decoded = 0
        self.error: Exception | None = None  # this process's own failure: raised as itself
        self.temp: Path | None = None  # the temp folder rank 0 made when there is no cache_dir

    def run(self) -> ImageCache:
        """Every peer's part of the build; the same cache (or the same error) on every peer."""
        plan, done = self._lead() if self.peers.rank == 0 else self._follow()
        try:
            return self._result(plan, done)
        finally:
            self._release()

    def _lead(self) -> tuple[dict, dict]:
        plan = self._attempt(self._plan)
        self.peers.send("plan", plan)
        if "building" not in plan:
            return plan, plan
        try:
            parts = [self._attempt(self._decode_share, plan)]
            parts += [self.peers.receive("part", rank) for rank in range(1, self.peers.size)]
            done = self._attempt(self._finish, plan, parts)
        finally:  # after every share is in: nobody writes to the temp files any more
            for path in _temp_paths(Path(plan["folder"]), self.size, plan["tag"]):
                path.unlink(missing_ok=True)
        self.peers.send("done", done)
        return plan, done

    def _follow(self) -> tuple[dict, dict]:
        plan = self.peers.receive("plan")
        if "building" not in plan:
            return plan, plan
        self.peers.send("part", self._attempt(self._decode_share, plan))
        return plan, self.peers.receive("done")

    def _plan(self) -> dict:
        """Rank 0's first step: where the cache is (read, or decoded here), or where the shared build goes."""
        if self.cache_dir is None:
            self.temp = folder = Path(tempfile.mkdtemp(prefix="manyheads-images-"))
        else:
            folder = self.cache_dir
            folder.mkdir(parents=True, exist_ok=True)
            if self.key is not None and _cached(folder, self.size, self.key) is not None:
                return {"folder": str(folder), "key": self.key}
        if not self.split:  # rank 0 decodes everything, as a single process would
            options = {"workers": self.workers, "progress": self.progress, "on_bad": self.on_bad}
            cache, key = _build_file(folder, self.items, self.size, self.key, **options)
            self.decoded = cache.decoded
            return {"folder": str(folder), "key": key, "bad": _bad_rows(cache.bad)}
        tag = _tag()
        building = _temp_paths(folder, self.size, tag)[0]
        shape = (len(self.items), 3, self.size, self.size)
        np.lib.format.open_memmap(building, mode="w+", dtype=np.uint8, shape=shape).flush()  # zeros, sized
        return {"folder": str(folder), "key": self.key, "building": str(building), "tag": tag}

    def _decode_share(self, plan: dict) -> dict:
        """Decode rows ``rank::size`` into the shared temp file; the bad ones go back to rank 0."""
        out = np.load(plan["building"], mmap_mode="r+")
        rows = range(self.peers.rank, len(self.items), self.peers.size)
        self.decoded = len(rows)
        _, bad = _fill(out, self.items, self.size, self.workers, self.progress, self.on_bad, rows)
        out.flush()
        return {"bad": _bad_rows(bad)}

    def _finish(self, plan: dict, parts: list[dict]) -> dict:
        """Rank 0, once every share is in: the first failure, or the file published (none when all are bad)."""
        failed = next((part["failed"] for part in parts if "failed" in part), None)
        if failed is not None:
            return {"failed": failed}
        bad = sorted((_bad_item(*b) for part in parts for b in part["bad"]), key=lambda b: b.row)
        dropped = {b.row for b in bad}
        kept = torch.tensor([i for i in range(len(self.items)) if i not in dropped], dtype=torch.int64)
        if len(kept) == 0:
            return {"key": None, "bad": _bad_rows(bad)}
        folder = Path(plan["folder"])
        out = np.load(plan["building"], mmap_mode="r+")
        _move_into_place(out, _temp_paths(folder, self.size, plan["tag"]), kept, bad, folder, self.size, self.key)
        return {"key": self.key}

    def _result(self, plan: dict, done: dict) -> ImageCache:
        """The published cache, or the first failure of any peer raised here too."""
        if "failed" in done:
            raise self._failure(done["failed"])
        if done["key"] is None:  # every item was bad: nothing was written
            empty = torch.empty((0, 3, self.size, self.size), dtype=torch.uint8)
            bad = [_bad_item(*b) for b in done["bad"]]
            return ImageCache(empty, torch.empty(0, dtype=torch.int64), bad, self.decoded)
        return _read_back(Path(plan["folder"]), self.size, done["key"], self.decoded)

    def _release(self) -> None:
        """Without cache_dir: once every peer has the file open (or has failed), rank 0 removes the folder."""
        if self.cache_dir is not None:
            return
        if self.peers.rank:
            self.peers.send("opened", True)
            return
        for rank in range(1, self.peers.size):
            self.peers.receive("opened", rank)
        if self.temp is not None:  # the open files stay readable: a mapping outlives the file's name
            shutil.rmtree(self.temp, ignore_errors=True)

    def _attempt(self, step: Callable[..., dict], *args: Any) -> dict:
        """``step(*args)``, or the record of its failure for the peers (the exception is kept to raise here)."""
        try:
            return step(*args)
        except Exception as e:
            self.error = e
            bad = [e.source, e.detail] if isinstance(e, BadImageError) else None
            return {"failed": {"rank": self.peers.rank, "bad": bad, "message": f"{type(e).__name__}: {e}"}}

    def _failure(self, failed: dict) -> Exception:
        if failed["rank"] == self.peers.rank and self.error is not None:
            return self.error
        if failed["bad"] is not None:  # the very error that process raised: the same on every peer
            return BadImageError(*failed["bad"], _SKIP_HINT)
        return RuntimeError(f"local rank {failed['rank']} failed building the image cache: {failed['message']}")


def _fill(
    out: np.ndarray,
    items: Sequence[Any],
    size: int,
    workers: int | None,
    progress: bool,
    on_bad: str,
    rows: range | None = None,
) -> tuple[torch.Tensor, list[BadRow]]:
    """Decode ``items`` (those at ``rows``; default all) into ``out``; a list's paths and bytes go through a pool."""
    rows = range(len(items)) if rows is None else rows
    workers = (os.cpu_count() or 1) if workers is None else workers
    bad: list[BadRow] = []

    def store(i: int, res: np.ndarray | BadRow) -> None:
        if isinstance(res, BadRow):
            if on_bad == "error":
                raise BadImageError(res.source, res.message.removeprefix(f"{res.source}: "), _SKIP_HINT)
            bad.append(res.at(i))
        else:
            out[i] = res

    # only a list is looked at before decoding: a streamed column is read once, in order
    pooled = [i for i in rows if _is_path(items[i]) or _is_encoded(items[i])] if isinstance(items, list) else []
    if len(pooled) < 64 or workers <= 1:
        pooled = []
    with tqdm(total=len(rows), disable=not progress, desc="decoding images", unit="img") as bar:
        in_pool = set(pooled)
        for i in rows:
            if i not in in_pool:
                store(i, _decode_all([items[i]], size, [f"item {i}"])[0])
                bar.update()
        if pooled:
            _fill_pooled(store, bar, [items[i] for i in pooled], pooled, size, workers)
    bad.sort(key=lambda b: b.row)
    dropped = {b.row for b in bad}
    return torch.tensor([i for i in rows if i not in dropped], dtype=torch.int64), bad


def _fill_pooled(store: Any, bar: Any, items: list[Any], rows: list[int], size: int, workers: int) -> None:
    """Decode paths and bytes in a process pool, ``store(row, result)`` each as it comes back."""
    chunk = max(1, min(64, len(rows) // (workers * 4)))
    pool = ProcessPoolExecutor(workers)
    try:
        futures = {}
        for s in range(0, len(rows), chunk):
            part = [os.fspath(it) if _is_path(it) else it for it in items[s : s + chunk]]
            sources = [it if isinstance(it, str) else f"item {i}" for it, i in zip(part, rows[s : s + chunk])]
            futures[pool.submit(_decode_all, part, size, sources)] = rows[s : s + chunk]
        for fut in as_completed(futures):
            for i, res in zip(futures[fut], fut.result()):
                store(i, res)
            bar.update(len(futures[fut]))
    finally:
        pool.shutdown(cancel_futures=True)


def _compact(src: np.ndarray, dst: np.ndarray, kept: torch.Tensor) -> np.ndarray:
    for j, i in enumerate(kept.tolist()):  # in place is safe: kept is increasing, so i >= j
        if i != j or dst is not src:
            dst[j] = src[i]
    return dst


def _cache_key(items: list[Any], size: int) -> str:
    """Key of absolute paths (path, byte size, mtime), encoded bytes (their hash) and missing values."""
    h = hashlib.sha256(f"manyheads.images v1 size={size}\n".encode())
    for item in items:
        if _is_image_dict(item):
            item = item.get("bytes") if item.get("bytes") is not None else item.get("path")
        if _is_bytes(item):
            h.update(f"bytes\0{hashlib.sha256(item).hexdigest()}\n".encode())
            continue
        p = None if _is_missing(item) else item
        try:
            st = os.stat(p) if p is not None else None
        except OSError:
            st = None
        h.update((f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n" if st else f"{p}\0-\n").encode())
    return h.hexdigest()


def _pixels_key(out: np.ndarray, kept: torch.Tensor, bad: list[BadRow], size: int) -> str:
    """Key of decoded rows (items that have no cheaper identity: PIL images, arrays, streamed columns)."""
    h = hashlib.sha256(f"manyheads.images pixels v1 size={size} n={len(out)}\n".encode())
    for i in kept.tolist():
        h.update(out[i].data)
    h.update(json.dumps([[b.row, b.message] for b in bad]).encode())
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


_PADDINGS = ("reflection", "border", "zeros")
_ERASE_FILLS = ("noise", "mean")
_MAX_CROP_AREA = 4.0  # a window 4x the image's area: the face spans half the frame's side
_BLUR_SIGMA = (0.1, 2.0)  # pixels at 128 px, scaled with the image's side
_ERASE_AREA = (0.02, 0.2)  # as torchvision's RandomErasing
_ERASE_RATIO = (0.3, 3.3)


@dataclass(kw_only=True)
class Augment:
    """Per-sample random crop, flip, rotation and colour for a uint8 batch: ``Augment()(x, gen)``.

    The crop picks an area fraction in ``crop_scale`` and an aspect ratio in ``ratio``, shifted
    by up to ``translate`` of the image beyond the border. An area above 1 zooms out: the window
    is larger than the image, so the face shrinks inside the frame (``Augment(crop_scale=(0.6, 1.4),
    padding="border")``). ``padding`` fills what lies outside the image: "reflection" (mirror),
    "border" (edge pixels) or "zeros". ``rotate`` turns by a uniform angle in [-rotate, rotate]
    degrees; crop, flip and rotation are one ``affine_grid`` + ``grid_sample``. Jitter scales
    brightness, contrast and saturation by factors in [1 - jitter, 1 + jitter]. Then, each with its
    own probability per sample: ``grey`` (3 equal luma channels), ``blur`` (Gaussian, sigma in
    [0.1, 2] px at 128 px, scaled with the image) and ``erase`` (one rectangle of 2-20 % of the area,
    aspect 0.3-3.3, filled with uniform noise or the sample's channel means, ``erase_fill``).

    ``crop_scale=None`` and ``rotate=0`` turn the affine step off; with ``flip=False``, ``jitter=0``
    and no grey, blur or erase as well the call is just ``x / 255``. The new options are off by
    default, and while off they draw nothing from the generator. Pass a generator on the batch's
    device for reproducible draws. Returns float (float32 for uint8 input) in [0, 1].
    """

    crop_scale: tuple[float, float] | None = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    translate: float = 0.05
    flip: bool = True
    jitter: float = 0.1
    padding: str = "reflection"
    rotate: float = 0.0
    grey: float = 0.0
    blur: float = 0.0
    erase: float = 0.0
    erase_fill: str = "noise"

    def __post_init__(self) -> None:
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= _MAX_CROP_AREA:
            raise ValueError(
                f"Augment's crop_scale must satisfy 0 < low <= high <= {_MAX_CROP_AREA:g} (area fractions; "
                f"above 1 zooms out), got {self.crop_scale}"
            )
        if not 0 <= self.jitter < 1:
            raise ValueError(f"Augment's jitter must be in [0, 1), got {self.jitter}")
        if not 0 <= self.rotate <= 180:
            raise ValueError(f"Augment's rotate must be in [0, 180] degrees, got {self.rotate}")
        for name in ("grey", "blur", "erase"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"Augment's {name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name, choices in (("padding", _PADDINGS), ("erase_fill", _ERASE_FILLS)):
            if getattr(self, name) not in choices:
                allowed = ", ".join(map(repr, choices))
                raise ValueError(f"Augment's {name} must be one of {allowed}, got {getattr(self, name)!r}")

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _to_float(batch)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch [B, 3, H, W], got shape {tuple(x.shape)}")
        b = x.shape[0]
        u = torch.rand(b, 8, generator=generator, device=x.device, dtype=torch.float32)
        # Drawn only when a newer option is on, so default runs keep their draws (and checkpoints their streams).
        extra = self.rotate > 0 or self.grey > 0 or self.blur > 0 or self.erase > 0
        v = torch.rand(b, 9, generator=generator, device=x.device, dtype=torch.float32) if extra else None
        sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if self.flip else torch.ones_like(u[:, 4])
        if self.crop_scale is not None or self.rotate > 0:
            theta = self._theta(u, v, sign, x.shape[-1] / x.shape[-2])
            grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding, align_corners=False)
        elif self.flip:
            x = torch.where((sign < 0).view(b, 1, 1, 1), x.flip(-1), x)
        if self.jitter > 0:
            x = self._jitter(x, u[:, 5:8])
        if v is not None:
            x = self._grey_blur_erase(x, v, generator)
        return x.clamp(0, 1)

    def _theta(self, u: torch.Tensor, v: torch.Tensor | None, sign: torch.Tensor, aspect: float) -> torch.Tensor:
        """[B, 2, 3] maps output to input coordinates: turn, flip, then the crop window and its shift."""
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            area = lo + (hi - lo) * u[:, 0]
            log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[:, 1]
            # Normalised coordinates span 2 per image side, so half-width == side fraction. A side is
            # capped at the image's while the area is at most 1; zoomed-out windows may exceed it.
            cap = area.clamp(min=1.0)
            w = torch.minimum((area * log_r.exp()).sqrt(), cap)
            h = torch.minimum((area / log_r.exp()).sqrt(), cap)
            # Zoomed in, the window roams inside the image; zoomed out, the image roams inside it.
            cx = ((1 - w).abs() + 2 * self.translate) * (2 * u[:, 2] - 1)
            cy = ((1 - h).abs() + 2 * self.translate) * (2 * u[:, 3] - 1)
        else:
            w = h = torch.ones_like(sign)
            cx = cy = torch.zeros_like(sign)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([w * sign, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        if v is None or self.rotate == 0:
            return theta
        return _rotate(theta, math.radians(self.rotate) * (2 * v[:, 0] - 1), aspect)

    def _jitter(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        f = (1 + self.jitter * (2 * u - 1)).to(x.dtype).view(x.shape[0], 3, 1, 1, 1)
        gray_w = _constant(_GRAY, x.dtype, x.device).view(1, 3, 1, 1)
        x = (x * f[:, 0]).clamp(0, 1)
        mean = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = ((x - mean) * f[:, 1] + mean).clamp(0, 1)
        gray = (x * gray_w).sum(1, keepdim=True)
        return (x - gray) * f[:, 2] + gray

    def _grey_blur_erase(self, x: torch.Tensor, v: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, _, height, width = x.shape
        if self.grey > 0:
            gray_w = _constant(_GRAY, x.dtype, x.device).view(1, 3, 1, 1)
            grey = (x * gray_w).sum(1, keepdim=True).expand_as(x)
            x = torch.where((v[:, 1] < self.grey).view(b, 1, 1, 1), grey, x)
        if self.blur > 0:
            scale = min(height, width) / 128
            sigma = (_BLUR_SIGMA[0] + (_BLUR_SIGMA[1] - _BLUR_SIGMA[0]) * v[:, 3]) * scale
            blurred = _gaussian_blur(x, sigma, radius=math.ceil(3 * _BLUR_SIGMA[1] * scale))
            x = torch.where((v[:, 2] < self.blur).view(b, 1, 1, 1), blurred, x)
        if self.erase > 0:
            mask = _erase_mask(v[:, 5:9], height, width) & (v[:, 4] < self.erase).view(b, 1, 1)
            if self.erase_fill == "noise":
                fill = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
            else:
                fill = x.mean((2, 3), keepdim=True).expand_as(x)
            x = torch.where(mask.unsqueeze(1), fill, x)
        return x


def _rotate(theta: torch.Tensor, angle: torch.Tensor, aspect: float) -> torch.Tensor:
    """``theta`` [B, 2, 3] with each sample first turned by its ``angle`` (radians): ``_rotate(theta, a, w / h)``.

    The turn is in pixels, so a non-square image (``aspect`` = width / height) is not sheared.
    """
    cos, sin = angle.cos(), angle.sin()
    turn = torch.stack([torch.stack([cos, -sin / aspect], 1), torch.stack([sin * aspect, cos], 1)], 1)
    return torch.cat([theta[:, :, :2] @ turn.to(theta.dtype), theta[:, :, 2:]], 2)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur each sample of ``x`` [B, C, H, W] with its own ``sigma`` [B] (pixels): ``_gaussian_blur(x, s, 6)``.

    Separable: two depthwise convolutions, reflection at the edges (as torchvision's gaussian_blur).
    """
    b, c, height, width = x.shape
    radius = max(0, min(radius, height - 1, width - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma.to(x.dtype).view(b, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B * C, K]
    y = F.pad(x.reshape(1, b * c, height, width), (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c).view(b, c, height, width)


def _erase_mask(v: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One rectangle per sample as a bool mask [B, H, W], from 4 uniforms per sample: ``_erase_mask(u, 32, 32)``.

    Area fraction in [0.02, 0.2] and aspect ratio (height / width) in [0.3, 3.3], log-uniform, as
    torchvision's RandomErasing; sides are clipped to the image instead of redrawn.
    """
    area = (_ERASE_AREA[0] + (_ERASE_AREA[1] - _ERASE_AREA[0]) * v[:, 0]) * height * width
    lo, hi = math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1])
    ratio = (lo + (hi - lo) * v[:, 1]).exp()
    eh = (area * ratio).sqrt().round().clamp(1, height)
    ew = (area / ratio).sqrt().round().clamp(1, width)
    top = (v[:, 2] * (height - eh + 1)).floor()
    left = (v[:, 3] * (width - ew + 1)).floor()
    rows = torch.arange(height, device=v.device, dtype=v.dtype).view(1, -1)
    cols = torch.arange(width, device=v.device, dtype=v.dtype).view(1, -1)
    in_rows = (rows >= top.view(-1, 1)) & (rows < (top + eh).view(-1, 1))
    in_cols = (cols >= left.view(-1, 1)) & (cols < (left + ew).view(-1, 1))
    return in_rows.unsqueeze(2) & in_cols.unsqueeze(1)


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


def _is_bytes(v: Any) -> bool:
    return isinstance(v, (bytes, bytearray, memoryview))


def _is_image_dict(v: Any) -> bool:
    """A Hugging Face image value (``{"bytes": ..., "path": ...}``, as its Image feature stores it)."""
    return isinstance(v, Mapping) and bool(v) and set(v) <= {"bytes", "path"}


def _is_encoded(v: Any) -> bool:
    """An image file's bytes, or a Hugging Face image value: decoded like a file, keyed without decoding."""
    return _is_bytes(v) or _is_image_dict(v)


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ in ("NAType", "NaTType")


def looks_like_images(column: Iterable[Any]) -> bool:
    """Whether a column holds images (paths, PIL images, bytes, uint8 2/3-D arrays): ``looks_like_images(df["img"])``.

    Looks at the first 5 non-missing values (among the first 1000); all must look like images.
    Reads no more of the column than that (a streamed column reads those rows only).
    """
    values = list(islice((v for v in islice(iter(column), 1000) if not _is_missing(v)), 5))
    return bool(values) and all(_looks_like_image(v) for v in values)


def _looks_like_image(v: Any) -> bool:
    if _is_path(v):
        return os.fspath(v).lower().endswith(IMAGE_SUFFIXES)
    if isinstance(v, Image.Image) or _is_encoded(v):
        return True
    if isinstance(v, (np.ndarray, torch.Tensor)):
        return v.dtype == (torch.uint8 if isinstance(v, torch.Tensor) else np.uint8) and v.ndim in (2, 3)
    return False
