"""``source: parquet``: a Parquet table whose image column holds bytes or paths (needs ``manyheads[parquet]``)."""

from manyheads import datasets
from manyheads.sources.base import register


@register("parquet")
def read(data, image_size: int, seed: int):
    """``data: {source: parquet, path: faces.parquet, image_column: image}``: paths relative to ``data.images``."""
    return datasets.from_parquet(data.path, data.images, image_column=data.image_column)
