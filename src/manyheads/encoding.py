"""Encoding: from a table of columns to encoded inputs and targets, then to batches on the device.

A table is a dict of columns (name -> list, numpy array or tensor), a pandas DataFrame, or a
torch Dataset yielding dicts (read once). One column holds the inputs (numeric arrays or
images); every head reads the column of its own name. Missing labels (None, NaN, pd.NA) mark
rows that are not labelled for that head.

    table = columns_of(df); train, val = split(table, 0.15, seed=0)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from manyheads import images as imaging
from manyheads.heads import Head, Reason

Table = dict[str, Any]


def columns_of(data: Any, what: str = "train") -> Table:
    """Normalise a dict of columns, a DataFrame or a Dataset of dicts into a dict of columns."""
    try:
        import pandas as pd

        if isinstance(data, pd.DataFrame):
            return {str(name): data[name].tolist() for name in data.columns}
    except ImportError:  # pragma: no cover
        pass
    if isinstance(data, Mapping):
        table = {str(k): v for k, v in data.items()}
    elif isinstance(data, torch.utils.data.Dataset):
        rows = [data[i] for i in range(len(data))]
        if not rows or not isinstance(rows[0], Mapping):
            raise ValueError(
                f"{what}: a Dataset must yield dicts of column -> value, got {type(rows[0] if rows else None)}"
            )
        table = {key: [row.get(key) for row in rows] for key in rows[0]}
    else:
        raise ValueError(
            f"{what}: expected a dict of columns, a pandas DataFrame or a torch Dataset, got {type(data).__name__}"
        )
    lengths = {name: len(column) for name, column in table.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{what}: columns have different lengths {lengths}")
    return table


def n_rows(table: Table) -> int:
    return len(next(iter(table.values()))) if table else 0


def take(table: Table, rows: np.ndarray | list[int]) -> Table:
    """The table restricted to ``rows`` (positions)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = {}
    for name, column in table.items():
        if isinstance(column, torch.Tensor | np.ndarray):
            out[name] = column[torch.as_tensor(rows) if isinstance(column, torch.Tensor) else rows]
        else:
            out[name] = [column[i] for i in rows]
    return out


def split_rows(n: int, fraction: float, seed: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random (kept, held-out) row positions of ``n`` rows, ``fraction`` held out; both sorted."""
    if not 0 < fraction < 1:
        raise ValueError(f"a validation fraction must be between 0 and 1, got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, int(round(n * fraction)))
    return np.sort(order[held:]), np.sort(order[:held])


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

    ``bad`` lists dropped rows as ``{"row", "kind", "reason"}``: ``kind`` is a short reason to
    count by ("truncated JPEG", "label not a number"), ``reason`` the full message.
    """

    inputs: torch.Tensor
    targets: dict[str, torch.Tensor]
    labelled: dict[str, torch.Tensor]
    images: bool = False
    bad: list[dict] = field(default_factory=list)

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


def _numeric_inputs(column: Any, name: str, bad: dict[int, str] | None, row_numbers: Sequence[int]) -> torch.Tensor:
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
        if bad is None:
            raise ValueError(f"input column {name!r}, row {row}: contains NaN or inf (on_bad='skip' drops such rows)")
        bad.setdefault(position, Reason(f"input column {name!r}, row {row}: NaN or inf", "input NaN or inf"))
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
    row_numbers: Sequence[int] | None = None,
) -> Encoded:
    """Encode the input column and each head's targets; ``on_bad="skip"`` drops bad rows, listed.

    ``row_numbers[i]`` is the row that messages and ``Encoded.bad`` name for position ``i`` (the
    row in the user's table when ``table`` is a part of it); by default the position itself.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    bad: dict[int, str] | None = {} if on_bad == "skip" else None  # position -> reason
    column = table[input_name]
    is_images = imaging.looks_like_images(column)
    if is_images:
        if image_size is None:
            raise ValueError(f"input column {input_name!r} holds images; pass image_size=")
        cache = imaging.ready_cache(column, image_size) or imaging.build_cache(
            list(column), image_size, cache_dir=cache_dir, workers=workers, progress=progress, on_bad=on_bad
        )
        for item in cache.bad:  # "corrupt JPEG (broken data stream...)" counts as "corrupt JPEG"
            bad[item.index] = Reason(f"{item.source}: {item.reason}", item.reason.split(" (")[0])
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
            {
                "row": int(row_numbers[i]) if row_numbers is not None else i,
                "kind": getattr(reason, "kind", "bad row"),
                "reason": str(reason),
            }
            for i, reason in sorted((bad or {}).items())
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


class Batches:
    """Shuffled batches of an :class:`Encoded` set on the training device, one epoch per call.

    The permutation of epoch ``e`` comes from ``seed`` and ``e`` alone, so a resumed run sees
    the same batches. Images are augmented (training) and normalised on the device.
    With ``shard=(rank, world)`` every rank takes every world-th row of the same permutation,
    so step ``s`` of all ranks together is exactly the batch of ``world * batch_size`` rows a
    single process would take (rows beyond an equal share are dropped, as DistributedSampler).
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
    ) -> None:
        self.data, self.batch_size, self.device = data, batch_size, device
        self.shuffle, self.seed, self.augment = shuffle, seed, augment
        self.channels_last, self.shard = channels_last, shard
        rank, world = shard
        self.rows_per_rank = len(data) // world if world > 1 else len(data)

    def __len__(self) -> int:
        return -(-self.rows_per_rank // self.batch_size)

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
        rank, world = self.shard
        generator = None
        if self.augment is not None and data.images:
            generator = torch.Generator(device=self.device)
        for step in range(start, len(self)):
            rows = order[step * self.batch_size : (step + 1) * self.batch_size]
            x = self._on_device(data.inputs[rows])
            targets = {k: self._on_device(v[rows]) for k, v in data.targets.items()}
            labelled = {k: self._on_device(v[rows]) for k, v in data.labelled.items()}
            if data.images:
                if generator is not None:
                    # each rank draws its own crops, so ranks' samples are not augmented alike
                    generator.manual_seed((self.seed * 1_000_003 + epoch * 10_007 + step) * world + rank)
                    x = self.augment(x, generator=generator)
                x = imaging.normalize(x)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            yield x, targets, labelled
