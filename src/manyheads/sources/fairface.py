"""``source: fairface``: a FairFace label CSV; images under ``data.images`` (default: the CSV's folder)."""

from pathlib import Path

from manyheads import datasets
from manyheads.sources.base import register


@register("fairface")
def read(data, image_size: int, seed: int):
    """``data: {source: fairface, path: fairface_label_train.csv, images: FOLDER}``"""
    return datasets.fairface(data.path, data.images or Path(data.path).expanduser().parent)
