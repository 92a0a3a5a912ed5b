"""``source: hf``: a Hugging Face data set folder written by ``save_to_disk`` (``pip install "manyheads[hf]"``)."""

from manyheads import datasets
from manyheads.sources.base import register


@register("hf")
def read(data, image_size: int, seed: int):
    """``data: {source: hf, path: FOLDER, split: train}``: ClassLabel columns as names, images through the cache."""
    return datasets.from_hf(data.path, split=data.split)
