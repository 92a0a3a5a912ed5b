"""``source: csv``: any label CSV whose ``data.image_column`` names image files."""

from manyheads import datasets
from manyheads.sources.base import register


@register("csv")
def read(data, image_size: int, seed: int):
    """``data: {source: csv, path: labels.csv, images: FOLDER, image_column: file}``"""
    return datasets.from_csv(data.path, data.images, image_column=data.image_column)
