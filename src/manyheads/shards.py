"""WebDataset shards: a table's images and labels written as tar shards, and read back.

Each sample of a shard is two files: ``KEY.jpg`` (or ``.png``, ...), the image file's own bytes,
never re-encoded, and ``KEY.json``, the row's labels (``null`` where a head has no label). The
key is the row's position in the table written, zero-padded. Beside the shards, ``labels.jsonl``
(the label index) lists every sample's key, shard, source file and labels, one JSON line each:
``fit`` takes the statistics of the training targets (a regression head's mean and spread, class
weights) from it, over the whole set, without reading a shard. Shards are read through the
``webdataset`` package (``pip install "manyheads[webdataset]"``), imported when first needed.

    written = write_shards(df, "shards", shard_size=1000); written.pattern  # 'shards/{000000..000019}.tar'
    table = read_shards("val/{000000..000001}.tar")  # a finite set of shards as a table (validation, test)
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from manyheads import images as imaging
from manyheads.rows import BadRow, RowError

INDEX = "labels.jsonl"
SHARD_NAME = "%06d.tar"  # webdataset.ShardWriter's pattern: 000000.tar, 000001.tar, ...
IMAGE_EXTENSIONS = tuple(suffix.lstrip(".") for suffix in imaging.IMAGE_SUFFIXES)
_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}  # Pillow format -> extension
_CHECK_SIZE = 16  # written images are decoded at this size once, so a corrupt file is named before training
_NOT_LOCAL = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://", "hf://", "sftp://", "ftps://")


def require() -> Any:
    """The webdataset module, or an ImportError naming the extra that installs it."""
    try:
        import webdataset
    except ImportError:
        message = 'WebDataset shards need the webdataset package: pip install "manyheads[webdataset]"'
        raise ImportError(message) from None
    return webdataset


def expand(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard URLs from a brace pattern (``"shards/{000000..000099}.tar"``, as webdataset expands it) or a list."""
    wds = require()
    if isinstance(urls, str | os.PathLike):
        return list(wds.shardlists.expand_urls(os.fspath(urls)))
    return [url for item in urls for url in wds.shardlists.expand_urls(os.fspath(item))]


def is_local(url: str) -> bool:
    """Whether a shard URL names a file here (not ``pipe:``, http, cloud storage)."""
    return not url.startswith(_NOT_LOCAL)


def local_path(url: str) -> Path:
    return Path(url.removeprefix("file://").removeprefix("file:")).expanduser()


def check_local(urls: list[str], pattern: Any) -> None:
    """Refuse shard files that are not there: FileNotFoundError naming one and the pattern."""
    missing = [url for url in urls if is_local(url) and not local_path(url).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards not found, e.g. {missing[0]} (from "
                                f"{pattern!r}); write them with `manyheads shard TABLE --out DIR`")  # fmt: skip


# ---- writing -------------------------------------------------------------------------------------


@dataclass
class Written:
    """What :func:`write_shards` wrote: the folder, the shard files, the sample count and size, rows skipped."""

    folder: Path
    shards: list[str]
    samples: int
    bytes: int
    skipped: list[BadRow] = field(default_factory=list)
    given: str = ""  # the folder as the caller named it, for the pattern

    @property
    def pattern(self) -> str:
        """The shards as one brace pattern, for ``data.path`` in YAML or ``mh.fit``."""
        folder = self.given or str(self.folder)
        stems = [Path(name).stem for name in self.shards]
        inner = stems[0] if len(stems) == 1 else f"{{{stems[0]}..{stems[-1]}}}"
        return f"{folder.rstrip('/')}/{inner}.tar"


def write_shards(
    table: Any,
    out: str | os.PathLike,
    *,
    shard_size: int | None = None,
    max_size: float | None = None,
    image_column: str = "image",
    on_bad: str = "error",
    progress: bool = False,
) -> Written:
    """Write a table (a DataFrame with an image column of paths or image bytes) as WebDataset shards in ``out``.

        written = write_shards(mh.datasets.from_csv("labels.csv"), "shards", shard_size=1000)

    A shard closes after ``shard_size`` samples (default 1000) or once it holds ``max_size`` bytes.
    Images keep their files' bytes; each is decoded once (small) so a bad file is named now, not
    mid-training: ``on_bad="error"`` raises naming the row and file, ``"skip"`` leaves the row
    out and lists it in ``skipped``. Labels are every other column, as JSON (missing labels as
    null). ``out`` must not hold shards or a label index already (nothing is overwritten); the
    files are written into a temporary folder inside it and moved there once all are written.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    wds = require()
    folder = Path(out).expanduser()
    refuse_existing(folder)
    if image_column not in table.columns:
        raise ValueError(f"the table has no image column {image_column!r}; its columns are {list(table.columns)}")
    labels = [str(c) for c in table.columns if c != image_column]
    temp = folder / f".manyheads-shard-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp.mkdir(parents=True)
    skipped: list[BadRow] = []
    try:
        written, size = _write(wds, table, image_column, labels, temp, shard_size, max_size, on_bad, skipped, progress)
        if written == 0:
            raise ValueError(f"no sample written: all {len(table)} rows were bad (e.g. {skipped[0].message})")
        shards = sorted(p.name for p in temp.glob("*.tar"))
        for name in [*shards, INDEX]:
            os.replace(temp / name, folder / name)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return Written(folder, shards, written, size, skipped, given=os.fspath(out))


def refuse_existing(folder: Path) -> None:
    """Refuse a folder that holds shards or a label index already (nothing is overwritten): a ValueError naming them."""
    found = sorted(p.name for p in folder.glob("*.tar")) + ([INDEX] if (folder / INDEX).exists() else [])
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(f"{folder} already holds shards ({shown}); nothing was written. Write into a new --out "
                         "folder, or remove those files first")  # fmt: skip


def _write(wds, table, image_column, labels, temp, shard_size, max_size, on_bad, skipped, progress) -> tuple[int, int]:
    """Write every good row into shards in ``temp`` and the label index; (samples written, image bytes)."""
    from tqdm.auto import tqdm

    n = len(table)
    width = max(6, len(str(max(n - 1, 0))))
    columns = [table[c].tolist() for c in labels]
    sizes = dict(maxcount=shard_size or (1000 if max_size is None else 10**12), maxsize=max_size or 3e12)
    written = size = 0
    with (
        wds.ShardWriter(str(temp / SHARD_NAME), verbose=0, encoder=False, **sizes) as writer,
        open(temp / INDEX, "w", encoding="utf-8") as index,
    ):
        rows = zip(table[image_column].tolist(), *columns)
        for position, (item, *values) in enumerate(tqdm(rows, total=n, disable=not progress, desc="sharding")):
            try:
                data, extension, source = _image_file(item, position)
                row_labels = {name: _jsonable(value, name, position) for name, value in zip(labels, values)}
            except RowError as error:
                if on_bad == "error":
                    raise RowError(f"{error} (--on-bad skip leaves such rows out)", error.reason) from None
                skipped.append(error.bad_row(position))
                continue
            key = f"{position:0{width}d}"
            encoded = json.dumps(row_labels, ensure_ascii=False, allow_nan=False).encode()
            writer.write({"__key__": key, extension: data, "json": encoded})
            line = {"key": key, "shard": Path(writer.fname).name, "source": source, "labels": row_labels}
            index.write(json.dumps(line, ensure_ascii=False) + "\n")
            written, size = written + 1, size + len(data)
    return written, size


def _image_file(item: Any, position: int) -> tuple[bytes, str, str | None]:
    """(the image file's bytes, its extension, its path or None) of one table cell; decoded once to check it."""
    where = f"row {position}"
    if imaging.is_image_dict(item):
        item = item.get("bytes") if item.get("bytes") is not None else item.get("path")
    if isinstance(item, str | os.PathLike):
        path = Path(item)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise imaging.BadImageError(f"{where} ({path})", "file not found") from None
        except OSError as error:
            raise imaging.BadImageError(f"{where} ({path})", f"cannot read file ({error.strerror or error})") from None
        source, extension = str(path), path.suffix.lower().lstrip(".")
    elif imaging.is_bytes(item):
        data, source, extension = bytes(item), None, ""
    else:
        raise RowError(f"{where}: the image is a {type(item).__name__}, not a file path or an image file's bytes; "
                       "shards keep the files' own bytes", "not an image file")  # fmt: skip
    described = f"{where} ({source})" if source else f"{where} (<{len(data)} bytes>)"
    if not data:
        raise imaging.BadImageError(described, "zero-byte file")
    try:  # decoded as the image cache decodes it (a file by its path: the same messages), so bad ones are named now
        imaging.decode(source if source else data, _CHECK_SIZE, described)
    except imaging.BadImageError as error:
        raise imaging.BadImageError(described, error.detail) from None
    if extension not in IMAGE_EXTENSIONS:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as opened:
            extension = _FORMATS.get(opened.format or "", "img")
    return data, extension, source


def _jsonable(value: Any, column: str, position: int) -> Any:
    """A label as JSON holds it: numbers, strings, booleans, lists of them; None for a missing label."""
    if isinstance(value, np.ndarray | list | tuple):
        return [_jsonable(v, column, position) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value  # inf stays: the head refuses it, naming the row
    if isinstance(value, bool | int | float | str):
        return value
    raise RowError(f"row {position}, column {column!r}: a {type(value).__name__} label cannot be written as JSON",
                   "label not JSON")  # fmt: skip


# ---- reading -------------------------------------------------------------------------------------


def raw_samples(urls: Iterable[str]) -> Iterator[dict]:
    """The samples of these shards in order, as webdataset groups a tar's files (bytes by extension)."""
    wds = require()
    return wds.tarfile_to_samples()(iter([{"url": url} for url in urls]))


def parse(raw: dict) -> dict[str, Any]:
    """A webdataset sample as a row: ``image`` (the first image file's bytes), the .json labels, other files.

    ``.cls`` files become integers and ``.txt`` files text; other files stay bytes under their extension.
    """
    key, url = raw.get("__key__"), raw.get("__url__")
    row: dict[str, Any] = {"__key__": key, "__url__": url}
    for extension, value in raw.items():
        if extension.startswith("__"):
            continue
        if extension == "json":
            try:
                labels = json.loads(value)
            except ValueError as error:
                message = f"sample {key!r} of {url}: its .json is not valid JSON ({error})"
                raise RowError(message, "labels not JSON") from None
            row.update(labels if isinstance(labels, dict) else {"json": labels})
        elif extension in IMAGE_EXTENSIONS and "image" not in row:
            row["image"] = value
        elif extension == "cls":
            row["cls"] = int(value.decode().strip())
        elif extension == "txt":
            row["txt"] = value.decode()
        else:
            row[extension] = value
    return row


def read_shards(urls: str | os.PathLike | Sequence[str]) -> Any:
    """A finite set of shards as a DataFrame (``image`` bytes, one column per label), indexed by sample key.

        validation = read_shards("val/{000000..000003}.tar")  # for fit(..., validation=) or the test report

    Errors about its rows then name the sample keys.
    """
    import pandas as pd

    found = expand(urls)
    check_local(found, urls)
    rows = [parse(raw) for raw in raw_samples(found)]
    if not rows:
        raise ValueError(f"{urls}: the shards hold no samples")
    table = pd.DataFrame(rows).set_index("__key__").drop(columns="__url__")
    table.index.name = None
    return table


def find_index(urls: list[str]) -> Path | None:
    """The label index beside local shards, when it covers every shard named; else None.

    None when the shards are not local files, there is no ``labels.jsonl`` beside the first, or it
    does not list every shard named (shards not written by ``manyheads shard``).
    """
    if not urls or not all(is_local(url) for url in urls):
        return None
    path = local_path(urls[0]).parent / INDEX
    if not path.is_file():
        return None
    wanted = {local_path(url).name for url in urls}
    covered = {entry["shard"] for entry in _index_entries(path)}
    return path if wanted <= covered else None


def index_rows(path: Path, urls: list[str]) -> Iterator[dict]:
    """The label index's samples of these shards, one at a time: ``{"__key__", "__url__", **labels}``."""
    wanted = {local_path(url).name for url in urls}
    for entry in _index_entries(path):
        if entry["shard"] in wanted:
            yield {"__key__": entry["key"], "__url__": entry["shard"], **entry["labels"]}


def _index_entries(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            try:
                entry = json.loads(line)
                if isinstance(entry["shard"], str) and isinstance(entry["labels"], dict) and "key" in entry:
                    yield entry
                    continue
            except (ValueError, KeyError, TypeError):
                pass
            raise ValueError(f"{path}, line {number}: not a label index line (as manyheads shard writes)")
