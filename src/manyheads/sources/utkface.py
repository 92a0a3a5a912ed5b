"""``source: utkface``: a folder of UTKFace images; age, gender and race come from the file names."""

from manyheads import datasets
from manyheads.sources.base import register


@register("utkface", limited=False)  # utkface(limit=) keeps evenly spaced rows itself
def read(data, image_size: int, seed: int):
    """``data: {source: utkface, path: FOLDER, limit: 1000}``"""
    return datasets.utkface(data.path, limit=data.limit)
