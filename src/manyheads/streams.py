"""Streams: training data read a share at a time, for sets larger than the image cache.

The image cache holds the whole set at training size (N x 3 x S x S bytes: 49 GB for a million
faces at 128 px). A stream is read instead: WebDataset tar shards (:func:`from_webdataset`, written
by ``manyheads shard``), a Hugging Face ``datasets.IterableDataset`` (:func:`from_hf`) or a torch
``IterableDataset`` of dicts (:func:`from_iterable`). ``mh.fit`` takes any of them, or a shard URL
pattern, as its training data, with ``steps_per_epoch=`` (a stream has no length)::

    result = mh.fit(net, "shards/{000000..000099}.tar", validation=val_df, steps_per_epoch=1500, workers=4)

**Who reads what.** Every process (torchrun rank) and each of its DataLoader workers is a reader.
Shards are put in a seeded order per epoch and reader (rank, worker) takes
``order[rank::processes][worker::workers]``: webdataset's ``split_by_node`` then
``split_by_worker``. A Hugging Face data set is split over the readers by datasets'
``split_dataset_by_node`` (by shards when their number divides the readers, else every reader
reads all and keeps its share of the samples); a torch IterableDataset is read whole by every
reader, which keeps every readers-th sample (for generated streams). No sample is read by two
readers in an epoch, and the readers' shares make up the whole set. Each reader decodes only its
own samples, in the worker process, to uint8 [3, S, S] exactly as the image cache decodes the same
file; the batches are then augmented and normalised on the training device, as cached ones are.

**What an epoch is.** ``steps_per_epoch`` batches per process. Epoch e reads the stream in the
order drawn from (seed, e): shard order, then a seeded shuffle buffer of ``shuffle`` samples per
reader. A reader whose share runs out before the epoch ends starts a new lap (a new seeded
order), so an epoch of at most samples / (processes x batch_size) steps reads no sample twice
when the shards are of equal size: ``steps_per_epoch = samples // (processes * batch_size)``
makes an epoch one pass.

**Resume.** Step s of epoch e is a deterministic position: worker w of a process serves the steps
s with s % workers == w, each a batch of its next ``batch_size`` samples. A run resumed from a
checkpoint at (e, s) has every worker skip the samples of its steps before s (reading them, not
decoding them) and continues with exactly the batches an uninterrupted run would have taken. The
position depends on the number of processes, DataLoader workers, shards and the shuffle buffer:
a resume that changes one is refused (``stream`` in the checkpoint's options).

**Statistics of the training targets.** Heads fitted to the targets (a regression head's mean and
spread, ``class_weights="balanced"``, ``normalize=True``) take them from the label index
``labels.jsonl`` that ``manyheads shard`` writes beside the shards (every sample's labels, read
without opening a shard), else from the first ``stats`` samples of the stream in its given order
(default 5000; images not decoded), or from a table passed as ``stats=``. Every process computes
the same statistics.
"""

from __future__ import annotations

import os
import random
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain, islice
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from manyheads import encoding, shards
from manyheads import images as imaging
from manyheads.distributed import usable_cpus
from manyheads.heads import Head
from manyheads.rows import BadRow, RowError
from manyheads.shards import read_shards, write_shards

__all__ = ["Stream", "StreamBatches", "from_hf", "from_iterable", "from_webdataset", "of", "prepare", "read_shards",
           "write_shards"]  # fmt: skip

STATS_ROWS = 5000  # samples the statistics of the training targets are read from, without a label index
SHUFFLE = 1000  # samples in each reader's shuffle buffer
_META = ("__key__", "__url__")


class StreamError(ValueError):
    """A stream that cannot be read or batched; the message names the shard, sample or option."""


class SampleKey:
    """A stream sample as messages name it: ``'000017' (a sample of shards/000003.tar)``."""

    __slots__ = ("key", "where")

    def __init__(self, key: Any, where: Any = None) -> None:
        self.key, self.where = key, where

    def __str__(self) -> str:
        return f"{self.key!r} (a sample of {self.where})" if self.where else repr(self.key)

    __repr__ = __str__


class Reader(NamedTuple):
    """One reader of a stream: process ``rank`` of ``processes``, DataLoader worker ``worker`` of ``workers``."""

    rank: int
    processes: int
    worker: int
    workers: int

    @property
    def index(self) -> int:
        """Its position among all readers, as ``order[rank::processes][worker::workers]`` takes them."""
        return self.rank + self.processes * self.worker

    @property
    def count(self) -> int:
        return self.processes * self.workers


# ---- the kinds of stream -----------------------------------------------------------------------


class Stream(torch.utils.data.IterableDataset):
    """Samples read a share at a time (see the module's notes); iterating it reads it once, in its own order.

    Subclasses say how a reader reads its share of one lap (:meth:`lap`) and how many DataLoader
    workers per process the stream can feed (:meth:`readers`).

        stream = from_webdataset("shards/{000000..000009}.tar"); first = next(iter(stream))
    """

    kind: ClassVar[str] = ""

    def __init__(self, *, shuffle: int = SHUFFLE, stats: Any = None) -> None:
        if isinstance(shuffle, bool) or not isinstance(shuffle, int) or shuffle < 0:
            raise ValueError(f"shuffle must be a number of samples >= 0 (0: no shuffle buffer), got {shuffle!r}")
        if stats is not None and (isinstance(stats, bool) or (isinstance(stats, int) and stats < 1)):
            raise ValueError(f"stats must be a number of samples >= 1, a table of labels or None, got {stats!r}")
        self.shuffle, self.stats = shuffle, stats

    def __iter__(self) -> Iterator[dict]:
        raise NotImplementedError

    def lap(self, epoch: int, lap: int, seed: int, reader: Reader) -> Iterator[dict]:
        """This reader's share of lap ``lap`` of epoch ``epoch``, in its seeded order; images not decoded."""
        raise NotImplementedError

    def readers(self, processes: int, workers: int) -> int:
        """The DataLoader workers per process this stream can feed, at most ``workers`` (at least 1)."""
        return max(1, workers)

    def label_index(self) -> tuple[Iterator[dict], str] | None:
        """Every sample's labels, one at a time, when the stream has an index of them: (rows, where it is)."""
        return None

    def record(self, processes: int, workers: int) -> dict[str, Any]:
        """What decides the order of the samples: a resume that changes any of it is refused."""
        return {"kind": self.kind, "shuffle": self.shuffle, "processes": processes,
                "workers": self.readers(processes, workers), "stats": self.stats_source()}  # fmt: skip

    def stats_source(self) -> str:
        """Where the targets' statistics come from: "table", "label index" or "first N samples"."""
        if self.stats is not None and not isinstance(self.stats, int):
            return "table"
        if self.stats is None and self.label_index() is not None:
            return "label index"
        return f"first {self.stats or STATS_ROWS} samples"

    def endless(self, epoch: int, seed: int, reader: Reader) -> Iterator[dict]:
        """The reader's samples of an epoch, lap after lap: never ends (a reader with no share is refused)."""
        for lap in range(sys.maxsize):
            empty = True
            for sample in self.lap(epoch, lap, seed, reader):
                empty = False
                yield sample
            if empty:
                raise StreamError(f"reader {reader.index + 1} of {reader.count} ({reader.processes} processes x "
                                  f"{reader.workers} workers) got no samples of the {self.kind} stream; use fewer "
                                  "workers, or a stream with more samples or shards")  # fmt: skip


class ShardStream(Stream):
    """WebDataset tar shards, local files or any URL webdataset opens (``pipe:``, http, ...)."""

    kind = "webdataset"

    def __init__(self, urls: Any, *, shuffle: int = SHUFFLE, stats: Any = None) -> None:
        super().__init__(shuffle=shuffle, stats=stats)
        self.pattern, self.urls = urls, shards.expand(urls)
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        shards.check_local(self.urls, urls)
        self._index: Any = False  # looked for once, when first asked

    def __iter__(self) -> Iterator[dict]:
        return map(shards.parse, shards.raw_samples(self.urls))

    def lap(self, epoch: int, lap: int, seed: int, reader: Reader) -> Iterator[dict]:
        order = list(range(len(self.urls)))
        random.Random(f"{seed}/{epoch}/{lap}").shuffle(order)
        mine = [self.urls[i] for i in order[reader.rank :: reader.processes][reader.worker :: reader.workers]]
        samples = shards.raw_samples(mine)
        if self.shuffle:
            rng = random.Random(f"{seed}/{epoch}/{lap}/{reader.rank}/{reader.worker}")
            samples = shards.require().shuffle(self.shuffle, self.shuffle, rng=rng)(samples)
        return map(shards.parse, samples)

    def readers(self, processes: int, workers: int) -> int:
        n = len(self.urls)
        if n < processes:
            raise StreamError(f"{n} shards for {processes} processes: every process needs shards of its own. Write "
                              "smaller shards (manyheads shard --shard-size) or train on fewer processes")  # fmt: skip
        return max(1, min(workers, n // processes))

    def label_index(self) -> tuple[Iterator[dict], str] | None:
        if self._index is False:
            self._index = shards.find_index(self.urls)
        return None if self._index is None else (shards.index_rows(self._index, self.urls), str(self._index))

    def record(self, processes: int, workers: int) -> dict[str, Any]:
        return {**super().record(processes, workers), "shards": len(self.urls)}


class HuggingFaceStream(Stream):
    """A Hugging Face ``datasets.IterableDataset``: images stay encoded, class labels become their names."""

    kind = "hf"

    def __init__(self, dataset: Any, *, shuffle: int = SHUFFLE, stats: Any = None) -> None:
        super().__init__(shuffle=shuffle, stats=stats)
        import datasets as hf

        self.names: dict[str, list[str]] = {}
        for name, feature in (dataset.features or {}).items():
            if isinstance(feature, hf.Image) and feature.decode:  # the bytes, decoded as a file would be
                dataset = dataset.cast_column(name, hf.Image(decode=False))
            elif isinstance(feature, hf.ClassLabel):
                self.names[name] = feature.names
        self.dataset = dataset

    def _rows(self, dataset: Any, reader: Reader | None) -> Iterator[dict]:
        where = "the Hugging Face data set"
        position = 0
        for batch in dataset.iter(batch_size=256):  # iter(): no second split by torch worker
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                row = dict(zip(columns, values))
                for name, labels in self.names.items():
                    value = row.get(name)
                    row[name] = labels[value] if isinstance(value, int) and 0 <= value < len(labels) else None
                key = f"{position}" if reader is None else f"{reader.index}:{position}"
                row.setdefault("__key__", key)
                row.setdefault("__url__", where)
                position += 1
                yield row

    def __iter__(self) -> Iterator[dict]:
        return self._rows(self.dataset, None)

    def lap(self, epoch: int, lap: int, seed: int, reader: Reader) -> Iterator[dict]:
        from datasets.distributed import split_dataset_by_node

        dataset = self.dataset.shuffle(seed=seed, buffer_size=self.shuffle) if self.shuffle else self.dataset
        dataset = split_dataset_by_node(dataset, rank=reader.index, world_size=reader.count)
        dataset.set_epoch(epoch * 1009 + lap)  # datasets draws the shard order (and buffer) from seed and epoch
        return self._rows(dataset, reader)

    def readers(self, processes: int, workers: int) -> int:
        return max(1, min(workers, self.dataset.num_shards // processes))

    def record(self, processes: int, workers: int) -> dict[str, Any]:
        return {**super().record(processes, workers), "shards": self.dataset.num_shards}


class IterableStream(Stream):
    """A torch ``IterableDataset`` of dicts: every reader reads it whole and keeps every readers-th sample."""

    kind = "iterable"

    def __init__(self, dataset: torch.utils.data.IterableDataset, *, stats: Any = None) -> None:
        super().__init__(shuffle=0, stats=stats)
        self.dataset = dataset

    def _rows(self, reader: Reader | None) -> Iterator[dict]:
        start, step = (0, 1) if reader is None else (reader.index, reader.count)
        for position, row in islice(enumerate(self.dataset), start, None, step):
            if not isinstance(row, Mapping):
                raise StreamError(f"sample {position} of the IterableDataset is a {type(row).__name__}, "
                                  "not a dict of column -> value")  # fmt: skip
            yield {"__key__": position, "__url__": "the IterableDataset", **row}

    def __iter__(self) -> Iterator[dict]:
        return self._rows(None)

    def lap(self, epoch: int, lap: int, seed: int, reader: Reader) -> Iterator[dict]:
        return self._rows(reader)


def from_webdataset(urls: str | os.PathLike | Sequence[str], *, shuffle: int = SHUFFLE, stats: Any = None) -> Stream:
    """WebDataset shards as a stream: ``from_webdataset("shards/{000000..000099}.tar")``.

    ``urls``: a brace pattern or a list, local files or any URL webdataset opens (``pipe:curl ...``).
    Samples are ``KEY.jpg`` (or another image) and ``KEY.json`` with the labels, as ``manyheads shard``
    writes them. ``shuffle``: each reader's shuffle buffer, in samples (0: shard order only).
    ``stats``: where the targets' statistics come from (None: the label index beside the shards, else
    the first 5000 samples; a number of first samples; or a table of labels). Needs the webdataset extra.
    """
    return ShardStream(urls, shuffle=shuffle, stats=stats)


def from_hf(dataset: Any, *, shuffle: int = SHUFFLE, stats: Any = None) -> Stream:
    """A Hugging Face ``datasets.IterableDataset`` as a stream: ``from_hf(load_dataset(..., streaming=True)["train"])``.

    Split over processes and workers by ``datasets.distributed.split_dataset_by_node``: give it a
    number of shards divisible by processes x workers (``to_iterable_dataset(num_shards=...)``), or
    every reader reads all of it. ``shuffle`` and ``stats`` as for :func:`from_webdataset`.
    """
    hf = sys.modules.get("datasets")
    if hf is not None and isinstance(dataset, hf.IterableDatasetDict):
        raise ValueError(f"a Hugging Face IterableDatasetDict with the splits {list(dataset)}: pass one, e.g. "
                         f"dataset[{next(iter(dataset), 'train')!r}]")  # fmt: skip
    if hf is None or not isinstance(dataset, hf.IterableDataset):
        raise TypeError(f"expected a datasets.IterableDataset, got {type(dataset).__name__}")
    return HuggingFaceStream(dataset, shuffle=shuffle, stats=stats)


def from_iterable(dataset: torch.utils.data.IterableDataset, *, stats: Any = None) -> Stream:
    """A torch ``IterableDataset`` yielding dicts (column -> value) as a stream: ``from_iterable(Generated())``.

    Every reader iterates it whole and keeps every (processes x workers)-th sample: right for
    generated samples and tests; for data on disk write shards. Each epoch iterates it afresh. It
    must yield the whole stream in every process and worker (not split itself by ``get_worker_info``).
    """
    return IterableStream(dataset, stats=stats)


def of(data: Any) -> Stream | None:
    """``data`` as a stream (a Stream, a shard URL pattern, a Hugging Face or torch IterableDataset), else None.

    stream = of("shards/{000000..000009}.tar")  # a ShardStream; of(df) is None
    """
    if isinstance(data, Stream):
        return data
    if isinstance(data, str | os.PathLike) and ".tar" in os.fspath(data):
        return from_webdataset(data)
    hf = sys.modules.get("datasets")
    if hf is not None and isinstance(data, hf.IterableDataset | hf.IterableDatasetDict):
        return from_hf(data)
    if type(data).__module__.startswith("webdataset"):
        raise TypeError("a webdataset pipeline cannot be split by manyheads: pass its shards' URLs instead "
                        "(mh.streams.from_webdataset(urls), or the URL pattern itself)")  # fmt: skip
    if isinstance(data, torch.utils.data.IterableDataset):
        return from_iterable(data)
    return None


def default_workers() -> int:
    """DataLoader workers per process when ``workers=None``: this machine's cores over the processes on it."""
    return max(1, usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


# ---- decoding and encoding samples (in the DataLoader workers) --------------------------------


@dataclass
class Encoder:
    """A list of samples as one batch: images decoded to uint8 [B, 3, S, S], each head's targets encoded.

    Run in the DataLoader workers. The heads encode their own columns (``Head.encode``), so a
    missing, None or NaN label leaves a sample unlabelled for that head only, exactly as in a table.
    Bad samples: ``on_bad="error"`` returns the error (the worker passes it on, naming the sample),
    ``"skip"`` leaves them out of the batch and lists them in ``"bad"``.
    """

    heads: Mapping[str, Head]
    input_name: str
    image_size: int | None
    images: bool
    on_bad: str = "error"

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        keys = [sample.get("__key__") for sample in samples]
        names = [SampleKey(key, sample.get("__url__")) for key, sample in zip(keys, samples)]
        bad: dict[int, BadRow] | None = {} if self.on_bad == "skip" else None
        try:
            inputs = [self._input(sample.get(self.input_name), name, i, bad) for i, (sample, name) in
                      enumerate(zip(samples, names))]  # fmt: skip
            targets, labelled = {}, {}
            for head_name, head in self.heads.items():
                column = [sample.get(head_name) for sample in samples]
                targets[head_name], labelled[head_name] = head.encode(column, name=head_name, bad=bad,
                                                                      row_numbers=names)  # fmt: skip
        except RowError as error:
            return {"error": f"{error} (on_bad='skip' drops such samples)", "reason": error.reason}
        keep = [i for i in range(len(samples)) if not bad or i not in bad]
        stacked = [inputs[i] for i in keep]
        shape = (0, 3, self.image_size, self.image_size) if self.images else (0,)
        return {
            "keys": [keys[i] for i in keep],
            "inputs": torch.from_numpy(np.stack(stacked)) if stacked else torch.empty(shape),
            "targets": {k: v[keep] for k, v in targets.items()},
            "labelled": {k: v[keep] for k, v in labelled.items()},
            "bad": [record.at(keys[i]) for i, record in sorted((bad or {}).items())],
        }

    def _input(self, value: Any, name: SampleKey, position: int, bad: dict | None) -> np.ndarray | None:
        try:
            if self.images:
                return imaging.decode(value, self.image_size, str(name))  # the cache's own decoding
            return np.asarray(value, dtype=np.float32)
        except (RowError, TypeError, ValueError) as error:
            if isinstance(error, RowError):
                record = error.bad_row(name.key)
            else:
                record = BadRow(name.key, "bad input", f"{name}: input {self.input_name!r} unreadable ({error})")
            if bad is None:
                raise RowError(record.message, record.reason) from None
            bad[position] = record
            return None


class _Readers(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs for one epoch: its steps' batches, from step ``start`` on.

    Worker w (rotated by ``start``, so worker ids and steps line up on resume as in a run from step 0)
    serves the steps s with s % workers == w; it skips the samples of its steps before ``start``
    without decoding them, then yields its remaining batches, each of its next ``batch_size`` samples.
    """

    def __init__(self, stream: Stream, encode: Encoder, batch_size: int, *, epoch: int, start: int, steps: int,
                 seed: int, rank: int, processes: int, workers: int) -> None:  # fmt: skip
        super().__init__()
        self.stream, self.encode, self.batch_size = stream, encode, batch_size
        self.epoch, self.start, self.steps, self.seed = epoch, start, steps, seed
        self.rank, self.processes, self.workers = rank, processes, workers

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info is not None else 0) + self.start) % self.workers
        done = len(range(worker, self.start, self.workers))
        todo = len(range(worker, self.steps, self.workers)) - done
        reader = Reader(self.rank, self.processes, worker, self.workers)
        try:
            samples = islice(self.stream.endless(self.epoch, self.seed, reader), done * self.batch_size, None)
            for _ in range(todo):
                batch = self.encode(list(islice(samples, self.batch_size)))
                yield batch
                if "error" in batch:
                    return
        except RowError as error:  # a sample's .json that is not JSON
            yield {"error": str(error), "reason": error.reason}
        except Exception as error:  # e.g. a shard that cannot be read: the message, not a worker's traceback
            yield {"error": f"{type(error).__name__}: {error}", "reason": "stream error"}


class StreamBatches:
    """Batches of a stream on the training device, one epoch per call: the interface of :class:`encoding.Batches`.

        batches = StreamBatches(stream, encoder, 64, device, steps=500, seed=0)
        for x, targets, labelled in batches.epoch(0): ...

    ``len(batches)`` is ``steps`` per process; ``shard=(rank, processes)`` picks this process's
    share; ``workers`` DataLoader processes decode (0: in this process; the order of the samples is
    that of one worker). Augmentation draws as :class:`encoding.Batches` does, from (seed, epoch, step,
    rank), so a resumed run augments alike. ``skipped`` collects the samples ``on_bad="skip"`` left out.
    """

    def __init__(
        self,
        stream: Stream,
        encode: Encoder,
        batch_size: int,
        device: torch.device,
        *,
        steps: int,
        seed: int = 0,
        augment: Any = None,
        channels_last: bool = False,
        shard: tuple[int, int] = (0, 1),
        workers: int | None = None,
        skipped: dict | None = None,
        warn: bool = True,
    ) -> None:
        self.stream, self.encode, self.batch_size, self.device = stream, encode, batch_size, device
        self.steps, self.seed, self.augment, self.channels_last, self.shard = steps, seed, augment, channels_last, shard
        requested = default_workers() if workers is None else workers
        self.workers = stream.readers(shard[1], max(1, requested))  # readers per process
        self.processes = 0 if requested == 0 else self.workers  # DataLoader worker processes
        if warn and workers is not None and self.workers < workers:
            warnings.warn(f"workers={workers}, but the {stream.kind} stream feeds {self.workers} DataLoader workers "
                          f"per process ({shard[1]} processes): each worker reads shards of its own; write more, "
                          "smaller shards to use more workers", stacklevel=2)  # fmt: skip
        self.rows_per_rank = steps * batch_size
        self.skipped = {} if skipped is None else skipped
        self.warn = warn

    def __len__(self) -> int:
        return self.steps

    def collated(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """The epoch's batches from step ``start`` on, as the workers send them: keys, uint8 inputs, targets, ..."""
        rank, processes = self.shard
        readers = _Readers(self.stream, self.encode, self.batch_size, epoch=epoch, start=start, steps=self.steps,
                           seed=self.seed, rank=rank, processes=processes, workers=self.workers)  # fmt: skip
        extra = {"prefetch_factor": 2} if self.processes else {}
        loader = torch.utils.data.DataLoader(
            readers, batch_size=None, num_workers=self.processes, pin_memory=self.device.type == "cuda", **extra
        )
        for step, batch in enumerate(loader, start=start):
            self._check(batch, epoch, step)
            yield batch

    def _check(self, batch: dict, epoch: int, step: int) -> None:
        if "error" in batch:
            raise (StreamError if batch["reason"] == "stream error" else RowError)(batch["error"])
        for record in batch["bad"]:
            if self.warn and not self.skipped:
                warnings.warn(f"on_bad='skip': skipping bad samples of the stream, e.g. {record.message}; "
                              "result.skipped lists them", stacklevel=2)  # fmt: skip
            self.skipped.setdefault(record.row, record)
        if len(batch["keys"]) < 2:  # BatchNorm cannot normalise one row
            raise StreamError(f"epoch {epoch + 1}, step {step + 1}: {len(batch['keys'])} readable samples of "
                              f"{self.batch_size} (on_bad='skip' left out {len(batch['bad'])}); the stream has too "
                              "many bad samples here: fix them, or write the shards with manyheads shard")  # fmt: skip

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, dict, dict]]:
        """Batches of one epoch on the device, from batch ``start`` on (a resumed run continues there)."""
        move = {"device": self.device, "non_blocking": True}
        generator = None
        if self.augment is not None and self.encode.images:
            generator = torch.Generator(device=self.device)
        for step, batch in enumerate(self.collated(epoch, start), start=start):
            x = batch["inputs"].to(**move)
            targets = {k: v.to(**move) for k, v in batch["targets"].items()}
            labelled = {k: v.to(**move) for k, v in batch["labelled"].items()}
            if self.encode.images:
                x = encoding.device_images(x, self.augment, generator, seed=self.seed, epoch=epoch, step=step,
                                           shard=self.shard, channels_last=self.channels_last)  # fmt: skip
            yield x, targets, labelled


# ---- the data stage of fit for a stream --------------------------------------------------------


@dataclass
class Statistics:
    """The labels the training targets' statistics are taken from: each head's targets and labelled flags."""

    targets: dict[str, torch.Tensor]
    labelled: dict[str, torch.Tensor]
    rows: int
    where: str  # "the label index shards/labels.jsonl", "the first 5000 samples of the stream", ...


@dataclass
class PreparedStream:
    """What :func:`prepare` returns for a stream: the answers of :class:`encoding.Prepared` that fit reads.

    ``stats`` (the targets' statistics), ``images``, ``validation`` (an encoded table or None), ``bad``
    (rows skipped, so far), ``input_column``, ``probe`` (a first batch) and ``batches`` (the epochs).
    """

    stream: Stream
    stats: Statistics
    validation: encoding.Encoded | None
    input_column: str
    encoder: Encoder
    first: list[dict]
    steps_per_epoch: int
    workers: int | None = None
    warn: bool = True
    validation_bad: list[BadRow] = field(default_factory=list)
    skipped: dict[Any, BadRow] = field(default_factory=dict)  # filled while training

    @property
    def images(self) -> bool:
        return self.encoder.images

    @property
    def bad(self) -> list[BadRow]:
        return self.validation_bad + list(self.skipped.values())

    def on(self, device: torch.device) -> PreparedStream:
        """The validation set moved onto a GPU it fits on (as :meth:`encoding.Prepared.on`)."""
        if self.validation is None or device.type != "cuda":
            return self
        if not encoding.fits_on_device(self.validation, device=device):
            return self
        return replace(self, validation=self.validation.to(device))

    def probe(self, device: torch.device) -> torch.Tensor:
        """The stream's first samples as a normalised batch: for materialising lazy layers."""
        x = self.encoder(self.first)["inputs"].to(device)
        return imaging.normalize(x) if self.images else x

    def batches(self, batch_size: int, device: torch.device, **options: Any) -> StreamBatches:
        """The training batches: ``steps_per_epoch`` per epoch (``drop_single`` does not apply: batches are full)."""
        options.pop("drop_single", None)
        return StreamBatches(self.stream, self.encoder, batch_size, device, steps=self.steps_per_epoch,
                             workers=self.workers, skipped=self.skipped, warn=self.warn, **options)  # fmt: skip


def prepare(
    stream: Stream,
    validation: Any,
    heads: Mapping[str, Head],
    *,
    steps_per_epoch: int,
    inputs: str | None = None,
    image_size: int | None = None,
    on_bad: str = "error",
    cache_dir: str | None = None,
    workers: int | None = None,
    progress: bool = False,
    warn: bool = True,
    allow_unlabelled_heads: bool = False,
    seed: int | None = 0,
) -> PreparedStream:
    """The data stage of ``fit`` for a stream: its columns, the targets' statistics, the encoded validation table.

        data = prepare(from_webdataset("shards/{0..9}.tar"), val_df, heads, steps_per_epoch=100, image_size=128)

    Reads the stream's first samples (and its label index), decodes no image but the first two.
    ``validation`` is a table (or None), encoded once as ``fit`` encodes tables. Raises ValueError
    for a stream without samples, heads without a column, or a head without any labelled target
    among the statistics' rows (``allow_unlabelled_heads=True`` warns instead).
    """
    first = list(islice(iter(stream), 2))
    if not first:
        raise StreamError(f"the {stream.kind} stream holds no samples")
    stats_rows, where = _stats_rows(stream)
    seen = list(islice(stats_rows, 1000))  # the columns: of the first samples, and of the first labels
    columns = {c: [] for row in [*first, *seen] for c in row if c not in _META}
    input_name = encoding.input_column(columns, heads, inputs)
    images = imaging.looks_like_images([row.get(input_name) for row in first])
    if images and image_size is None:
        raise ValueError(f"input column {input_name!r} holds images; pass image_size=")
    stats = _statistics(chain(seen, stats_rows), where, heads, on_bad)
    _check_labelled(stats, heads, allow_unlabelled_heads, warn)
    val_data, val_bad = None, []
    if validation is not None:
        table = encoding.columns_of(validation, "validation")
        encoding.input_column(table, heads, input_name)  # the same input column; every head's column there
        options = dict(image_size=image_size, on_bad=on_bad, cache_dir=cache_dir, workers=workers, progress=progress)
        val_data = encoding.encode(table, heads, input_name, row_numbers=encoding.row_names(validation), **options)
        val_bad = [b.at(b.row, "validation") for b in val_data.bad]
        if val_bad and warn:
            warnings.warn(f"on_bad='skip': skipped {len(val_bad)} bad validation rows, e.g. {val_bad[0].message}",
                          stacklevel=3)  # fmt: skip
    encoder = Encoder(heads, input_name, image_size, images, on_bad)
    return PreparedStream(stream, stats, val_data, input_name, encoder, first, steps_per_epoch, workers, warn, val_bad)


def _stats_rows(stream: Stream) -> tuple[Iterator[dict], str]:
    """The rows of labels the statistics come from, one at a time, and where they are (for messages)."""
    if stream.stats is not None and not isinstance(stream.stats, int):
        table = encoding.columns_of(stream.stats, "stats")
        names = encoding.row_names(stream.stats) or range(encoding.n_rows(table))
        rows = ({"__key__": name, **{c: table[c][i] for c in table}} for i, name in enumerate(names))
        return rows, "the stats= table"
    found = stream.label_index() if stream.stats is None else None
    if found is not None:
        return found[0], f"the label index {found[1]}"
    return islice(iter(stream), stream.stats or STATS_ROWS), "the first samples of the stream"


def _statistics(rows: Iterator[dict], where: str, heads: Mapping[str, Head], on_bad: str) -> Statistics:
    """Each head's targets over ``rows``, encoded a chunk at a time: a million-line label index never sits in
    memory as rows, only as the encoded tensors."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in heads}
    count = 0
    while chunk := list(islice(rows, 65536)):
        names = [SampleKey(row.get("__key__"), row.get("__url__")) for row in chunk]
        for name, head in heads.items():
            bad = None if on_bad == "error" else {}  # skipped here are skipped again, and listed, when trained on
            parts[name].append(head.encode([row.get(name) for row in chunk], name=name, bad=bad, row_numbers=names))
        count += len(chunk)
    targets, labelled = {}, {}
    for name, head in heads.items():
        encoded = parts[name] or [head.encode([], name=name)]
        targets[name] = torch.cat([target for target, _ in encoded])
        labelled[name] = torch.cat([flags for _, flags in encoded])
    return Statistics(targets, labelled, count, f"{where} ({count} samples)")


def _check_labelled(stats: Statistics, heads: Mapping[str, Head], allowed: bool, warn: bool) -> None:
    unlabelled = [name for name in heads if not bool(stats.labelled[name].any())]
    if unlabelled and not allowed:
        raise ValueError(f"head(s) {unlabelled} have no labelled sample in {stats.where}: nothing would train them "
                         "and their targets' statistics are unknown. Check the labels, pass stats= a table of "
                         "labels, or pass allow_unlabelled_heads=True to train the other heads")  # fmt: skip
    if unlabelled and warn:
        warnings.warn(f"head(s) {unlabelled} have no labelled sample in {stats.where} (allow_unlabelled_heads=True)",
                      stacklevel=4)  # fmt: skip
