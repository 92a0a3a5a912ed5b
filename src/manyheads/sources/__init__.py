"""Data sources: where a run's table comes from, by name (``data: {source: NAME, path: ...}`` in YAML).

One source per file, registered by name in :data:`REGISTRY` (``base.register``); the config's
allowed ``data.source`` values are its names, in this order:

- ``utkface``: a folder of UTKFace images, labels from the file names
- ``fairface``: a FairFace label CSV (``data.images``: the image folder)
- ``csv``: any label CSV whose ``data.image_column`` names image files
- ``webdataset``: WebDataset shards (``data.path`` a URL pattern), streamed, not cached: a stream
- ``hf``: a Hugging Face data set folder written by ``save_to_disk`` (``data.split`` of a DatasetDict)
- ``parquet``: a Parquet table whose ``data.image_column`` holds image bytes or paths
- ``shapes``: generated shapes (no path; ``data.limit`` images)

    df = load(cfg.data, image_size=cfg.model.image_size, seed=cfg.split.seed)
"""

# Each entry registers itself on import: this order is the order the config lists the sources in.
from manyheads.sources.base import REGISTRY, Source, get, load, load_held_out, register  # noqa: I001
from manyheads.sources import utkface, fairface, csv, webdataset, hf, parquet, shapes  # noqa: F401

__all__ = ["REGISTRY", "Source", "get", "load", "load_held_out", "register"]
