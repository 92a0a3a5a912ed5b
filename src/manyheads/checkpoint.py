"""Checkpoints: the whole training state in one file, written atomically, read without pickled code.

A checkpoint holds model, optimizer, schedule and balancing state, RNG states, epoch, step and
the history so far. It is written to a temporary file, flushed to disk and renamed over the
old one, so a crash mid-write leaves the previous checkpoint intact.

    save(run_dir / "checkpoint.pt", state); state = load(run_dir / "checkpoint.pt")
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

NAME = "checkpoint.pt"


def save(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically: temporary file, flush and fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: a file that carries code is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: refused to load, the file holds objects other than tensors and plain data "
            f"(it could run code); only load checkpoints you trust with torch.load directly. ({error})"
        ) from None
