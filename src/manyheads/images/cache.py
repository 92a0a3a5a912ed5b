"""The image cache: a column's images decoded once into uint8 [N, 3, S, S], in memory or memory-mapped on disk.

Example: ``build_cache(paths, 128, cache_dir="cache").images``; under torchrun the local
processes share one build (see :func:`build_cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from manyheads.distributed import LocalPeers
from manyheads.images import decoding  # decoding.decode is looked up at each call: a patch of it is seen here
from manyheads.images.decoding import BadImageError, is_bytes, is_encoded, is_image_dict, is_missing, is_path
from manyheads.rows import BadRow

_SKIP_HINT = "pass on_bad='skip' to drop unreadable images and list them in .bad"


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


def _decode_all(items: list[Any], size: int, sources: list[str]) -> list[np.ndarray | BadRow]:
    out: list[np.ndarray | BadRow] = []
    for item, source in zip(items, sources):
        try:
            out.append(decoding.decode(item, size, source))
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
    if not streamed and all(is_path(it) or is_missing(it) or is_encoded(it) for it in items):
        if cache_dir is not None or together:
            items = [str(Path(it).absolute()) if is_path(it) else it for it in items]
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
    pooled = [i for i in rows if is_path(items[i]) or is_encoded(items[i])] if isinstance(items, list) else []
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
            part = [os.fspath(it) if is_path(it) else it for it in items[s : s + chunk]]
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
        if is_image_dict(item):
            item = item.get("bytes") if item.get("bytes") is not None else item.get("path")
        if is_bytes(item):
            h.update(f"bytes\0{hashlib.sha256(item).hexdigest()}\n".encode())
            continue
        p = None if is_missing(item) else item
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
