"""``source: shapes``: generated images of shapes (no files), for demos and tests."""

from manyheads import datasets
from manyheads.sources.base import register


@register("shapes", needs_path=False, limited=False)
def read(data, image_size: int, seed: int):
    """``data: {source: shapes, limit: 480}``: drawn at the training size (16..128 px), so nothing is resized."""
    return datasets.shapes(data.limit or 512, size=max(16, min(image_size, 128)), seed=seed)
