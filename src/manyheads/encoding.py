"""Encoding: from a table of columns to encoded inputs and targets, then to batches on the device.

A table is a dict of columns (name -> list, numpy array or tensor), a pandas DataFrame, a
Hugging Face ``datasets.Dataset`` (read through :func:`manyheads.datasets.from_hf`), or a torch
Dataset yielding dicts. A torch Dataset's labels are read in one pass; a column of images in it
(PIL images, arrays, bytes) stays a :class:`DatasetColumn`, read again row by row as the images
are decoded into the cache, so the set is never all in memory. One column holds the inputs
(numeric arrays or images); every head reads the column of its own name. Missing labels (None,
NaN, pd.NA) mark rows that are not labelled for that head.

:func:`prepare` is the whole stage as ``fit`` runs it: the user's data (and a validation set
or fraction) in, encoded training and validation sets out; :class:`Batches` then serves one
epoch of shuffled batches on the training device. Messages and skipped-row records name rows
as the user's table does: by position, or by DataFrame index label when the index is not the
default ``0..n-1``.

    data = prepare(df, 0.15, heads, seed=0, image_size=224); batches = Batches(data.train, 64, device)
    table = columns_of(df); train, val = split(table, 0.15, seed=0)
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from manyheads import images as imaging
from manyheads.heads import Head
from manyheads.rows import BadRow, RowError

Table = dict[str, Any]


def _dataframe(data: Any) -> Any:
    """``data`` if it is a pandas DataFrame, else None (pandas not needed for other tables)."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover
        return None
    return data if isinstance(data, pd.DataFrame) else None


class DatasetColumn(Sequence):
    """One column of a torch Dataset of dicts, read when asked: ``column[i]`` is ``dataset[i][key]``.

    Images in a Dataset stay here until the image cache decodes them one by one; :func:`take`
    keeps the column lazy (a part of it is the same Dataset with fewer row positions).

        column = DatasetColumn(dataset, "image"); first = column[0]; part = column.take([0, 5])
    """

    def __init__(self, dataset: Any, key: str, rows: Sequence[int] | None = None) -> None:
        self.dataset, self.key = dataset, key
        self.rows = range(len(dataset)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return DatasetColumn(self.dataset, self.key, self.rows[i])
        return self.dataset[int(self.rows[i])].get(self.key)

    def take(self, rows: np.ndarray) -> DatasetColumn:
        return DatasetColumn(self.dataset, self.key, np.asarray(self.rows)[rows])


def _streams(value: Any) -> bool:
    """Whether a Dataset's value is an image to leave in the Dataset (not a path: paths are small)."""
    return not isinstance(value, str | os.PathLike) and imaging.looks_like_images([value])


def _dataset_table(data: torch.utils.data.Dataset, what: str) -> Table:
    """A torch Dataset's columns: its labels read in one pass, its image columns as :class:`DatasetColumn`."""
    n = len(data)
    first = data[0] if n else None
    if not isinstance(first, Mapping):
        raise ValueError(f"{what}: a Dataset must yield dicts of column -> value, got {type(first)}")
    lazy = [key for key, value in first.items() if _streams(value)]
    read: dict[Any, list] = {key: [] for key in first if key not in lazy}
    for i in range(n):
        row = first if i == 0 else data[i]
        if not isinstance(row, Mapping):
            raise ValueError(f"{what}: row {i} of the Dataset is a {type(row).__name__}, not a dict of column -> value")
        for key, values in read.items():
            values.append(row.get(key))
    return {key: DatasetColumn(data, key) if key in lazy else read[key] for key in first}


def _hugging_face(data: Any) -> Any:
    """A Hugging Face Dataset as a DataFrame (a DatasetDict is refused, naming its splits); else None."""
    hf = sys.modules.get("datasets")  # imported already wherever such an object exists
    if hf is None or not isinstance(data, hf.Dataset | hf.DatasetDict | hf.IterableDataset | hf.IterableDatasetDict):
        return None
    from manyheads.datasets import from_hf

    return from_hf(data)


def columns_of(data: Any, what: str = "train") -> Table:
    """Normalise a dict of columns, a DataFrame, a Hugging Face Dataset or a torch Dataset of dicts into columns.

    table = columns_of(df, "train")  # {"image": [...], "age": [...]}
    """
    if (frame := _hugging_face(data)) is not None:
        data = frame
    if (df := _dataframe(data)) is not None:
        duplicated = sorted({str(name) for name in df.columns[df.columns.duplicated()]})
        if duplicated:
            raise ValueError(f"{what}: the DataFrame has more than one column named {', '.join(map(repr, duplicated))}")
        return {str(name): df[name].tolist() for name in df.columns}
    if isinstance(data, Mapping):
        table = {str(k): v for k, v in data.items()}
    elif isinstance(data, torch.utils.data.Dataset):
        table = _dataset_table(data, what)
    else:
        raise ValueError(
            f"{what}: expected a dict of columns, a pandas DataFrame, a Hugging Face Dataset or a torch Dataset, "
            f"got {type(data).__name__}"
        )
    lengths = {name: len(column) for name, column in table.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{what}: columns have different lengths {lengths}")
    return table


def n_rows(table: Table) -> int:
    return len(next(iter(table.values()))) if table else 0


class IndexLabel:
    """A row named by its DataFrame index label; prints as ``'p17' (index label)``, so "row 'p17' (index label)".

    row = IndexLabel("p17"); f"row {row}"
    """

    __slots__ = ("label",)

    def __init__(self, label: Any) -> None:
        self.label = label.item() if isinstance(label, np.generic) else label  # numpy scalars: plain, JSON-able

    def __str__(self) -> str:
        return f"{self.label!r} (index label)"

    __repr__ = __str__


RowName = int | IndexLabel


def row_names(data: Any) -> list[IndexLabel] | None:
    """How messages name the rows of the user's data: index labels of a DataFrame whose index is
    not the default ``0..n-1``; None when positions name them (dicts, Datasets, default indexes).

    names = row_names(df.set_index("id"))  # [IndexLabel("a7"), ...]
    """
    df = _dataframe(data)
    if df is None:
        return None
    import pandas as pd

    return None if df.index.equals(pd.RangeIndex(len(df))) else [IndexLabel(label) for label in df.index]


def _recorded(row: RowName) -> Any:
    """A row name as a skipped-row record holds it: the index label itself, or the position."""
    return row.label if isinstance(row, IndexLabel) else int(row)


def take(table: Table, rows: np.ndarray | list[int]) -> Table:
    """The table restricted to ``rows`` (positions)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = {}
    for name, column in table.items():
        if isinstance(column, torch.Tensor | np.ndarray):
            out[name] = column[torch.as_tensor(rows) if isinstance(column, torch.Tensor) else rows]
        elif isinstance(column, DatasetColumn):  # stays lazy: the same Dataset, fewer rows
            out[name] = column.take(rows)
        else:
            out[name] = [column[i] for i in rows]
    return out


def held_out(n: int, fraction: float) -> int:
    """How many of ``n`` rows a held-out ``fraction`` takes: at least one, none for fraction 0."""
    return max(1, int(round(n * fraction))) if fraction else 0


def seeded_parts(n: int, sizes: Sequence[int], seed: int | None = 0) -> list[np.ndarray]:
    """Sorted row positions of consecutive parts of one seeded permutation of ``n`` rows.

    The parts have the given ``sizes``, then one more part takes the rest. ``fit``'s validation
    fraction and a run's test/validation split (``runs.Split``) both draw rows here.

        test, validation, train = seeded_parts(100, [15, 10], seed=0)
    """
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *sizes])
    return [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])] + [np.sort(order[bounds[-1] :])]


def split_rows(n: int, fraction: float, seed: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random (kept, held-out) row positions of ``n`` rows, ``fraction`` held out; both sorted.

    kept, held = split_rows(100, 0.2, seed=0)
    """
    if not 0 < fraction < 1:
        raise ValueError(f"a validation fraction must be between 0 and 1, got {fraction}")
    held, kept = seeded_parts(n, [held_out(n, fraction)], seed)
    return kept, held


def split(table: Table, fraction: float, seed: int | None = 0) -> tuple[Table, Table]:
    """Seeded random split into (train, held-out) with ``fraction`` of the rows held out."""
    kept, held = split_rows(n_rows(table), fraction, seed)
    return take(table, kept), take(table, held)


def input_column(table: Table, heads: Mapping[str, Head], inputs: str | None) -> str:
    """The name of the input column: ``inputs`` if given, else the one column that is no head."""
    missing = [name for name in heads if name not in table]
    if missing:
        raise ValueError(f"heads {missing} have no target column; the data has columns {sorted(table)}")
    if inputs is not None:
        if inputs not in table:
            raise ValueError(f"input column {inputs!r} not found; the data has columns {sorted(table)}")
        return inputs
    others = [name for name in table if name not in heads]
    if len(others) != 1:
        raise ValueError(f"cannot tell the input column: columns that are not heads are {others}; pass inputs='COLUMN'")
    return others[0]


@dataclass
class Encoded:
    """Inputs and targets as tensors. Images are uint8 [N, 3, S, S].

    ``bad`` lists dropped rows as :class:`~manyheads.rows.BadRow` records, named as the user's table
    names them, each with a short reason to count by ("truncated JPEG") and the full message.
    """

    inputs: torch.Tensor
    targets: dict[str, torch.Tensor]
    labelled: dict[str, torch.Tensor]
    images: bool = False
    bad: list[BadRow] = field(default_factory=list)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def to(self, device: torch.device | str) -> Encoded:
        move = {"device": device, "non_blocking": True}
        return Encoded(
            self.inputs.to(**move),
            {k: v.to(**move) for k, v in self.targets.items()},
            {k: v.to(**move) for k, v in self.labelled.items()},
            self.images,
            self.bad,
        )


def _numeric_inputs(
    column: Any, name: str, bad: dict[int, BadRow] | None, row_numbers: Sequence[RowName]
) -> torch.Tensor:
    try:
        if isinstance(column, torch.Tensor):
            inputs = column.float()
        else:
            inputs = torch.as_tensor(np.asarray([np.asarray(v, dtype=np.float32) for v in column]))
    except (TypeError, ValueError) as error:
        raise ValueError(f"input column {name!r}: values must be numbers or arrays of one shape ({error})") from None
    finite = torch.isfinite(inputs.reshape(inputs.shape[0], -1)).all(dim=1)
    for position in (~finite).nonzero().flatten().tolist():
        row = row_numbers[position]
        error = RowError(f"input column {name!r}, row {row}: contains NaN or inf", "input NaN or inf")
        if bad is None:
            raise RowError(f"{error} (on_bad='skip' drops such rows)", error.reason)
        bad.setdefault(position, error.bad_row(row))
    return inputs


def encode(
    table: Table,
    heads: Mapping[str, Head],
    input_name: str,
    *,
    image_size: int | None = None,
    on_bad: str = "error",
    cache_dir: str | None = None,
    workers: int | None = None,
    progress: bool = False,
    row_numbers: Sequence[RowName] | None = None,
) -> Encoded:
    """Encode the input column and each head's targets; ``on_bad="skip"`` drops bad rows, listed.

    ``row_numbers[i]`` is the row that messages and ``Encoded.bad`` name for position ``i`` (the
    row in the user's table when ``table`` is a part of it, or its :class:`IndexLabel`); by
    default the position itself.

        data = encode(table, heads, "image", image_size=224)
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    bad: dict[int, BadRow] | None = {} if on_bad == "skip" else None  # position -> record
    column = table[input_name]
    is_images = imaging.looks_like_images(column)
    if is_images:
        if image_size is None:
            raise ValueError(f"input column {input_name!r} holds images; pass image_size=")
        cache = imaging.ready_cache(column, image_size) or imaging.build_cache(
            column, image_size, cache_dir=cache_dir, workers=workers, progress=progress, on_bad=on_bad
        )
        for item in cache.bad:  # the cache names items by position
            bad[item.row] = item
    else:
        rows_named = row_numbers if row_numbers is not None else range(n_rows(table))
        inputs = _numeric_inputs(column, input_name, bad, rows_named)
    targets, labelled = {}, {}
    for name, head in heads.items():
        targets[name], labelled[name] = head.encode(table[name], name=name, bad=bad, row_numbers=row_numbers)
    keep = torch.ones(n_rows(table), dtype=torch.bool)
    if bad:
        keep[list(bad)] = False
    rows = keep.nonzero().flatten()
    if is_images:  # the cache holds the good images only: map table rows onto cache rows
        position = torch.full((len(keep),), -1, dtype=torch.int64)
        position[cache.kept] = torch.arange(len(cache.kept))
        inputs = cache.images if len(rows) == len(cache.kept) else cache.images[position[rows]]
    elif bad:
        inputs = inputs[rows]
    return Encoded(
        inputs,
        {k: v[rows] if bad else v for k, v in targets.items()},
        {k: v[rows] if bad else v for k, v in labelled.items()},
        images=is_images,
        bad=[
            record.at(_recorded(row_numbers[i]) if row_numbers is not None else i)
            for i, record in sorted((bad or {}).items())
        ],
    )


def fits_on_device(*sets: Encoded | None, device: torch.device, share: float = 0.25) -> bool:
    """Whether the encoded sets together take at most ``share`` of the device's free memory."""
    nbytes = sum(
        t.numel() * t.element_size()
        for data in sets
        if data is not None
        for t in (data.inputs, *data.targets.values(), *data.labelled.values())
    )
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= share * free


@dataclass
class Prepared:
    """What :func:`prepare` returns: the encoded training and validation sets, and the rows it skipped.

    ``bad`` lists skipped rows (``on_bad="skip"``) as :class:`~manyheads.rows.BadRow` records, those
    of the validation data with ``split="validation"``; ``input_column`` is the column the inputs came from.
    """

    train: Encoded
    validation: Encoded | None
    bad: list[BadRow]
    input_column: str

    @property
    def stats(self) -> Encoded:
        """The rows the training targets' statistics (regression scales, class weights) are taken from: all."""
        return self.train

    @property
    def images(self) -> bool:
        return self.train.images

    def probe(self, device: torch.device) -> torch.Tensor:
        """The first two training rows as a batch on ``device`` (for materialising lazy layers)."""
        return next(Batches(self.train, 2, device, shuffle=False).epoch(0))[0]

    def batches(self, batch_size: int, device: torch.device, **options: Any) -> Batches:
        """The training batches: ``Batches(self.train, batch_size, device, **options)``."""
        return Batches(self.train, batch_size, device, **options)

    def on(self, device: torch.device) -> Prepared:
        """Both sets moved onto a GPU they fit on (a quarter of its free memory): no copies per step.

        Elsewhere (the CPU, or sets too big) they stay where they are and batches are copied.

            data = prepare(df, 0.1, heads).on(torch.device("cuda"))
        """
        if device.type != "cuda" or not fits_on_device(self.train, self.validation, device=device):
            return self
        validation = self.validation.to(device) if self.validation is not None else None
        return replace(self, train=self.train.to(device), validation=validation)


def _table(data: Any, what: str) -> tuple[Table, list[IndexLabel] | None]:
    """The data's columns and row names (None: positions), refusing a table without rows."""
    table = columns_of(data, what)
    if n_rows(table) == 0:
        raise ValueError(f"{what}: the data has 0 rows (columns {sorted(table)})")
    return table, row_names(data)


def _part(names: list[IndexLabel] | None, rows: np.ndarray) -> list[RowName]:
    """The names of ``rows`` (positions in the user's table) of a part of it."""
    return rows.tolist() if names is None else [names[i] for i in rows]


def _warn_skipped(bad: list[BadRow]) -> None:
    reasons = ", ".join(f"{reason}: {n}" for reason, n in Counter(b.reason for b in bad).most_common())
    warnings.warn(
        f"on_bad='skip': skipped {len(bad)} bad rows ({reasons}), e.g. {bad[0].message}; result.skipped lists all",
        stacklevel=4,  # fit's caller
    )


def _check_trainable(data: Encoded, heads: Mapping[str, Head], bad: list[BadRow], allow_unlabelled: bool, warn: bool):
    """Refuse training data that cannot train: no rows, one row, or (unless allowed) a head without labels."""
    after = " left after skipping bad rows" if bad else ""
    if len(data) == 0:
        raise ValueError("no training rows left after encoding")
    if len(data) == 1:  # batch statistics (BatchNorm) need two rows, and one row trains nothing useful
        raise ValueError(f"the training data has 1 row{after}; training needs at least 2")
    unlabelled = [name for name in heads if not bool(data.labelled[name].any())]
    if unlabelled and not allow_unlabelled:
        raise ValueError(
            f"head(s) {unlabelled} have no labelled row in the training data ({len(data)} rows{after}): "
            f"nothing would train them and their loss would be NaN. Check the column(s), or pass "
            f"allow_unlabelled_heads=True to train the other heads anyway"
        )
    if unlabelled and warn:
        warnings.warn(
            f"head(s) {unlabelled} have no labelled row in the training data: they do not train and their "
            f"training loss is NaN (allow_unlabelled_heads=True)",
            stacklevel=4,
        )


def prepare(
    train: Any,
    validation: Any,
    heads: Mapping[str, Head],
    *,
    inputs: str | None = None,
    seed: int | None = 0,
    image_size: int | None = None,
    on_bad: str = "error",
    cache_dir: str | None = None,
    workers: int | None = None,
    progress: bool = False,
    warn: bool = True,
    allow_unlabelled_heads: bool = False,
) -> Prepared:
    """The data stage of ``fit``: the user's tables in, encoded training and validation sets out.

    ``validation`` is a table, None, or a fraction of ``train`` held out by a seeded split.
    Errors and skipped rows name the row of the table the user passed (position, or DataFrame
    index label). Raises ValueError for tables without rows, duplicated DataFrame columns, a
    training set left with fewer than 2 rows, or a head without any labelled training row
    (``allow_unlabelled_heads=True`` trains the other heads, with a warning). ``warn``: warn
    about skipped rows (rank 0 only, under torchrun).

        data = prepare(df, 0.15, heads, seed=0, image_size=224, on_bad="skip")
    """
    table, names = _table(train, "train")
    input_name = input_column(table, heads, inputs)
    # train_names, val_names: how errors name the rows of the user's tables (None: by position)
    if isinstance(validation, float):
        kept, held = split_rows(n_rows(table), validation, seed)
        table, val_table = take(table, kept), take(table, held)
        train_names, val_names = _part(names, kept), _part(names, held)
    else:
        train_names = names
        val_table, val_names = _table(validation, "validation") if validation is not None else (None, None)
    encode_options = dict(image_size=image_size, on_bad=on_bad, cache_dir=cache_dir, workers=workers, progress=progress)
    train_data = encode(table, heads, input_name, row_numbers=train_names, **encode_options)
    val_data = None
    if val_table is not None:
        val_data = encode(val_table, heads, input_name, row_numbers=val_names, **encode_options)
    bad = train_data.bad + ([b.at(b.row, "validation") for b in val_data.bad] if val_data else [])
    if bad and warn:
        _warn_skipped(bad)
    _check_trainable(train_data, heads, bad, allow_unlabelled_heads, warn)
    return Prepared(train_data, val_data, bad, input_name)


class Batches:
    """Shuffled batches of an :class:`Encoded` set on the training device, one epoch per call.

    The permutation of epoch ``e`` comes from ``seed`` and ``e`` alone, so a resumed run sees
    the same batches. Images are augmented (training) and normalised on the device.
    With ``shard=(rank, world)`` every rank takes every world-th row of the same permutation,
    so step ``s`` of all ranks together is exactly the batch of ``world * batch_size`` rows a
    single process would take (rows beyond an equal share are dropped, as DistributedSampler).
    ``drop_single=True`` (training) drops a final batch of exactly one row, as ``drop_last``
    would: BatchNorm cannot normalise one row.

        batches = Batches(data, 64, device, seed=0); x, targets, labelled = next(batches.epoch(0))
    """

    def __init__(
        self,
        data: Encoded,
        batch_size: int,
        device: torch.device,
        *,
        shuffle: bool = True,
        seed: int = 0,
        augment: Any = None,
        channels_last: bool = False,
        shard: tuple[int, int] = (0, 1),
        drop_single: bool = False,
    ) -> None:
        self.data, self.batch_size, self.device = data, batch_size, device
        self.shuffle, self.seed, self.augment = shuffle, seed, augment
        self.channels_last, self.shard = channels_last, shard
        rank, world = shard
        self.rows_per_rank = len(data) // world if world > 1 else len(data)
        self.steps = -(-self.rows_per_rank // batch_size)
        if drop_single and self.rows_per_rank > 1 and self.rows_per_rank % batch_size == 1:
            self.steps -= 1

    def __len__(self) -> int:
        return self.steps

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.data)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        rank, world = self.shard
        if world > 1:  # equal shards, as DistributedSampler with drop_last does
            order = order[: self.rows_per_rank * world][rank::world]
        return order.to(self.data.inputs.device)

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        # a set already on the device (the CPU, or a GPU it fits on) skips the no-op .to() calls
        return tensor if tensor.device == self.device else tensor.to(self.device, non_blocking=True)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, dict, dict]]:
        """Batches of one epoch, from batch ``start`` on (for resuming mid-epoch)."""
        order = self.order(epoch)
        data = self.data
        generator = None
        if self.augment is not None and data.images:
            generator = torch.Generator(device=self.device)
        for step in range(start, len(self)):
            rows = order[step * self.batch_size : (step + 1) * self.batch_size]
            x = self._on_device(data.inputs[rows])
            targets = {k: self._on_device(v[rows]) for k, v in data.targets.items()}
            labelled = {k: self._on_device(v[rows]) for k, v in data.labelled.items()}
            if data.images:
                x = device_images(x, self.augment, generator, seed=self.seed, epoch=epoch, step=step, shard=self.shard,
                                  channels_last=self.channels_last)  # fmt: skip
            yield x, targets, labelled


def device_images(
    x: torch.Tensor,
    augment: Any,
    generator: torch.Generator | None,
    *,
    seed: int,
    epoch: int,
    step: int,
    shard: tuple[int, int],
    channels_last: bool,
) -> torch.Tensor:
    """A uint8 batch of images on the device, augmented (with ``generator``) and normalised, as training takes it.

    The draws of step ``step`` come from (seed, epoch, step, rank) alone, so a resumed run augments
    alike; :class:`Batches` and ``streams.StreamBatches`` both batch through here.

        x = device_images(x, Augment(), torch.Generator(), seed=0, epoch=0, step=3, shard=(0, 1), channels_last=False)
    """
    if generator is not None:
        rank, world = shard
        # each rank draws its own crops, so ranks' samples are not augmented alike
        generator.manual_seed((seed * 1_000_003 + epoch * 10_007 + step) * world + rank)
        x = augment(x, generator=generator)
    x = imaging.normalize(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
