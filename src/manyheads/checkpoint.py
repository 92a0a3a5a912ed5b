"""Checkpoints: the whole training state in one file, written atomically, read without pickled code.

A checkpoint holds model, optimizer, schedule and balancing state, RNG states, seed, epoch,
step and the history so far. It is written to a temporary file next to the target, flushed
to disk and renamed over the old one, so a crash mid-write leaves the previous checkpoint
intact; a temporary file left by a killed writer is never read, and the next save removes it.

    save(run_dir / "checkpoint.pt", state); state = load(run_dir / "checkpoint.pt")
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

NAME = "checkpoint.pt"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path``; once the block succeeds it is fsynced and renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. Readers of ``path``
    see the old file or the new one, never a part of either.

        with atomic_path("model.safetensors") as tmp: save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as file:  # the data must be on disk before the rename makes it visible
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except Exception as error:
        code = _out_of_space(error)
        if code is None:
            raise
        raise DiskFullError(path, code) from error
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    for stale in path.parent.glob(f".{path.name}.*-*.tmp"):  # left by writers killed mid-write
        if not _alive(stale.name[len(path.name) + 2 :].split("-")[0]):
            stale.unlink(missing_ok=True)


class DiskFullError(OSError):
    """The disk (or the user's quota) filled up while writing ``path``; the previous file is untouched.

    One line that names the file: ``str(error)``; ``error.errno`` is ENOSPC or EDQUOT.
    """

    def __init__(self, path: Path, code: int) -> None:
        reason = "disk quota exceeded" if code == _EDQUOT else "no space left on device"
        before = "the previous file is intact" if path.exists() else "no file was there before"
        super().__init__(code, f"{path}: {reason} while writing it; nothing was lost: {before}. Free some space "
                               f"(or choose another folder) and try again")  # fmt: skip
        self.filename = str(path)

    def __str__(self) -> str:
        return self.strerror


_EDQUOT = getattr(errno, "EDQUOT", 122)
_FULL = {errno.ENOSPC: "os error 28", _EDQUOT: f"os error {_EDQUOT}"}


def _out_of_space(error: BaseException) -> int | None:
    """ENOSPC or EDQUOT when ``error`` or an error it came from says the disk is full, else None.

    torch's writer reports a failed write as ``RuntimeError("... unexpected pos ...")`` raised while
    handling the OSError; safetensors as its own error whose text ends in ``(os error 28)``.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL:
            return error.errno
        for code, words in _FULL.items():
            if f"({words})" in str(error):
                return code
        error = error.__cause__ or error.__context__
    return None


def _alive(pid: str) -> bool:
    """Whether the process that named a temporary file still runs (this host); unknown counts as alive."""
    if not pid.isdigit() or os.name == "nt":  # on Windows os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # no permission to signal it, or a platform without signals: leave its file alone
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors and plain data only) atomically: temporary file, fsync, rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        torch.save(state, file)
    return Path(path)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: a file that carries code is refused, not run.

    state = load("runs/faces/checkpoint.pt")
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume (fit writes one when run_dir= is given)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt?): {error}") from None
        # torch's message is long; the line naming the refused object is the useful part
        detail = next((line for line in str(error).splitlines() if "nsupported" in line), "").strip()
        raise ValueError(
            f"{path}: refused to load: the file holds objects other than tensors and plain data, so "
            f"unpickling it could run code ({detail or 'not weights-only'}). Nothing in it was executed; "
            f"only load checkpoints you trust, with torch.load(weights_only=False)."
        ) from None
    except Exception as error:  # zip, pickle and I/O errors all mean the same here
        raise ValueError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {type(error).__name__}: {error}"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a manyheads checkpoint (no 'model' entry in a {type(state).__name__})")
    return state
