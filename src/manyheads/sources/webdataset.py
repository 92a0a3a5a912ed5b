"""``source: webdataset``: WebDataset shards, streamed (needs ``manyheads[webdataset]``): data larger than the cache."""

from manyheads.sources.base import register


@register("webdataset", limited=False, stream=True)
def read(data, image_size: int, seed: int):
    """``data: {source: webdataset, path: "shards/{000000..000099}.tar", validation: ..., test: ...}``

    A stream (``manyheads shard`` writes the shards): ``train.steps_per_epoch`` sets its epoch, and
    the held-out rows are ``data.validation`` and ``data.test`` (shards or a CSV / Parquet table).
    """
    from manyheads import streams  # torch and webdataset, only when a stream is read

    return streams.from_webdataset(data.path)
