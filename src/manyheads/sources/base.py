"""The source registry: a run config's ``data.source`` names one entry, which reads the table.

An entry is a function ``(data, image_size, seed) -> DataFrame`` registered by name; ``needs_path``
says whether it reads ``data.path`` (the shapes source generates its images), ``limited`` whether
:func:`load` keeps ``data.limit`` evenly spaced rows of what it returns (entries that apply
``limit`` themselves say False). A ``stream`` entry returns a :class:`manyheads.streams.Stream`
instead (data larger than the image cache): it is not split, its held-out rows come from
``data.validation`` and ``data.test`` (:func:`load_held_out`).

    @register("jsonl")  # data: {source: jsonl, path: labels.jsonl}, one {"image": PATH, ...} per line
    def read(data, image_size, seed): return pd.read_json(data.path, lines=True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from manyheads.config import DataConfig

Reader = Callable[["DataConfig", int, int], pd.DataFrame]


@dataclass(frozen=True)
class Source:
    """A registered data source: its name, its reader, and what :func:`load` does around it.

    source = get("parquet"); source.needs_path  # True
    """

    name: str
    read: Reader
    needs_path: bool = True
    limited: bool = True
    stream: bool = False


REGISTRY: dict[str, Source] = {}


def register(
    name: str, *, needs_path: bool = True, limited: bool = True, stream: bool = False
) -> Callable[[Reader], Reader]:
    """Register a reader as the source ``name``: ``@register("parquet")`` above ``def read(data, image_size, seed)``."""

    def add(read: Reader) -> Reader:
        if name in REGISTRY:
            raise ValueError(f"a data source {name!r} is registered already; pick another name")
        REGISTRY[name] = Source(name, read, needs_path, limited, stream)
        return read

    return add


def get(name: str) -> Source:
    """The source registered as ``name``; a miss lists the registered names."""
    if name not in REGISTRY:
        raise ValueError(f"unknown data source {name!r}; choose one of {list(REGISTRY)}")
    return REGISTRY[name]


def load(data: DataConfig, *, image_size: int, seed: int = 0) -> pd.DataFrame:
    """The table a config's ``data`` section names: ``load(cfg.data, image_size=128, seed=0)``.

    Raises FileNotFoundError, naming the path and the source, when ``data.path`` does not exist.
    ``image_size`` and ``seed`` are for generated sources (shapes are drawn at the training size).
    """
    source = get(data.source)
    if source.needs_path and not source.stream:  # a stream checks its own shards (a pattern is no path)
        path = Path(data.path or "").expanduser()
        if not data.path or not path.exists():
            raise FileNotFoundError(
                f"data not found: {path} (data.path of the {data.source} source; or pass --data PATH)"
            )
    table = source.read(data, image_size, seed)
    if source.limited and data.limit is not None and data.limit < len(table):  # evenly spaced rows
        table = table.iloc[np.linspace(0, len(table) - 1, data.limit).round().astype(int)].reset_index(drop=True)
    return table


def load_held_out(path: str, data: DataConfig, what: str) -> pd.DataFrame:
    """Held-out rows of a stream source (``data.validation``, ``data.test``) as a table.

    ``path`` is WebDataset shards (a URL pattern with ``.tar``, read whole), or a CSV or Parquet
    label table (image paths relative to ``data.images``, else the file's folder).

        test = load_held_out("shards/test/{000000..000002}.tar", cfg.data, "data.test")
    """
    from manyheads import datasets, shards

    if ".tar" in path:
        return shards.read_shards(path)
    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".parquet") or not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"{what}: {path} is neither shards (a .tar URL pattern) nor a CSV or Parquet file here")
    read = datasets.from_csv if suffix == ".csv" else datasets.from_parquet
    return read(path, data.images, image_column=data.image_column)
